"""Training loops: backbone pretraining and compartments, and the record a compartment's training leaves."""

from .loss import draw_noise, eps_loss
from .pretrain import PretrainConfig, pretrain, public_training_set
from .record import TrainingRecord

__all__ = ["PretrainConfig", "TrainingRecord", "draw_noise", "eps_loss", "pretrain", "public_training_set"]
