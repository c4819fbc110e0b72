"""Shared fixtures. A test module that needs another backbone defines its own ``backbone`` fixture."""

import pytest
import torch

from cdm.backbone import Backbone, UViT, UViTConfig


@pytest.fixture(scope="module")
def backbone():
    """A tiny frozen U-ViT (random weights, seed 0): 14x14 inputs, patch 7, dim 16, one block per stage."""
    torch.manual_seed(0)
    return Backbone(UViT(UViTConfig(img_size=14, patch_size=7, embed_dim=16, depth=1, num_heads=2))).freeze()
