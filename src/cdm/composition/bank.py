"""Compartments on one backbone as a bank: every (sample, compartment) pair in ONE batched forward.

Rows carry their own prompts (the prompt tables are stacked and gathered per row), so n compartments cost one
backbone call on n x B rows instead of n calls.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..backbone import Backbone
from ..compartments import Compartment

__all__ = ["CompartmentBank"]


class CompartmentBank:
    def __init__(self, backbone: Backbone, compartments: Sequence[Compartment]):
        if not compartments:
            raise ValueError("no compartments to compose")
        shapes = {(c.prompts.table.weight.shape, c.prompts.shape, c.prompts.gate_shape, c.config.conditional)
                  for c in compartments}
        if len(shapes) != 1:
            raise ValueError("compartments to compose in one batch must share prompt count and conditioning")
        self.backbone = backbone
        self.compartments = list(compartments)
        self.tables = torch.stack([c.prompts.table.weight.detach() for c in compartments])  # (n, rows, flat)

    def __len__(self) -> int:
        return len(self.compartments)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, index: torch.Tensor, y: torch.Tensor | None = None,
                 return_mid: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """eps for each row from compartment ``index[row]``; with ``return_mid`` also that forward's tokens after
        the mid block (rows, L, D), for router heads."""
        first = self.compartments[0]
        rows = first.row(y, x.shape[0])  # same row layout for every compartment
        prompt_kw = first.prompts.split(self.tables[index, rows].to(x.device))
        labels = first.backbone_labels(y, x.shape[0])
        return self.backbone.net(x, t, y=None if labels is None else labels.to(x.device), return_mid=return_mid,
                                 **prompt_kw)
