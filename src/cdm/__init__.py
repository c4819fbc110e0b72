"""cdm: Compartmentalized Diffusion Models (Golatkar et al.) on a frozen, pretrained U-ViT.

Layers, imported one way only: ``sampling`` (schedules, solvers; no models) and ``data`` at the bottom,
``autoencoder`` (latent mode), ``backbone`` (U-ViT, pixel or latent codec, pretrained bundle), ``training``,
``evaluation``, ``generation``, then ``cli``.
Heavy submodules load lazily: ``import cdm`` is cheap.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "Backbone": "cdm.backbone",
    "UViT": "cdm.backbone",
    "UViTConfig": "cdm.backbone",
    "PixelCodec": "cdm.backbone",
    "LatentCodec": "cdm.backbone",
    "Autoencoder": "cdm.autoencoder",
    "NoiseSchedule": "cdm.sampling",
    "sample": "cdm.sampling",
    "classifier_free_guidance": "cdm.sampling",
    "Source": "cdm.data",
    "load_source": "cdm.data",
    "mnist": "cdm.data",
    "public_protected": "cdm.data",
    "glyphs": "cdm.data",
    "split_stratified": "cdm.data",
    "split_by_classes": "cdm.data",
    "PretrainConfig": "cdm.training",
    "pretrain": "cdm.training",
    "DigitClassifier": "cdm.evaluation",
    "fid": "cdm.evaluation",
    "judge": "cdm.evaluation",
    "generate": "cdm.generation",
    "sample_backbone": "cdm.generation",
    "CdmError": "cdm.errors",
    "DataError": "cdm.errors",
    "WeightsError": "cdm.errors",
    "TrainingError": "cdm.errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'cdm' has no attribute {name!r}")


def __dir__():
    return __all__
