"""Training loops: backbone pretraining (compartments come next)."""

from .loss import draw_noise, eps_loss
from .pretrain import (
    PretrainConfig,
    git_commit,
    machine_info,
    pretrain,
    public_training_set,
)

__all__ = ["PretrainConfig", "draw_noise", "eps_loss", "git_commit", "machine_info", "pretrain", "public_training_set"]
