"""Compartments on one backbone as a bank: every (sample, compartment) pair in ONE batched forward.

Rows carry their own prompts (the prompt tables are stacked and gathered per row; a text compartment's caption
map is applied per compartment, its adapters gathered per row), so n compartments cost one backbone call on
n x B rows instead of n calls.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..backbone import Backbone
from ..compartments import Compartment, net_inputs

__all__ = ["CompartmentBank"]


class CompartmentBank:
    def __init__(self, backbone: Backbone, compartments: Sequence[Compartment]):
        if not compartments:
            raise ValueError("no compartments to compose")
        shapes = {(c.prompts.table.weight.shape, c.prompts.shape, c.prompts.gate_shape, c.config.conditional,
                   c.config.text_encoder, c.config.text_tokens if c.config.text else None, c.config.adapter_rank)
                  for c in compartments}
        if len(shapes) != 1:
            raise ValueError("compartments to compose in one batch must share prompt count, conditioning (classes, "
                             "captions and their encoder) and adapters")
        self.backbone = backbone
        self.compartments = list(compartments)
        self.tables = torch.stack([c.prompts.table.weight.detach() for c in compartments])  # (n, rows, flat)
        first = self.compartments[0]
        self.text = first.config.text
        self.adapters = None
        if first.adapters is not None:
            self.adapters = (torch.stack([c.adapters.down.detach() for c in compartments]),
                             torch.stack([c.adapters.up.detach() for c in compartments]))

    def __len__(self) -> int:
        return len(self.compartments)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, index: torch.Tensor, y: torch.Tensor | None = None,
                 return_mid: bool = False, text: torch.Tensor | None = None
                 ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """eps for each row from compartment ``index[row]``; with ``return_mid`` also that forward's tokens after
        the mid block (rows, L, D), for router heads. ``text``: (rows or 1, dim) caption embeddings (text
        compartments)."""
        first, b = self.compartments[0], x.shape[0]
        text = first.check_text(text, b)
        rows = first.row(y, b)  # same row layout for every compartment
        split = first.prompts.split(self.tables[index, rows].to(x.device))
        tokens = None
        if text is not None:
            tokens = torch.empty((b, first.config.text_tokens * first.dim), dtype=self.tables.dtype)
            for i in index.unique().tolist():
                at = (index == i).nonzero()[:, 0]
                tokens[at] = self.compartments[i].text_proj(text[at].to(self.tables.dtype)).detach()
            tokens = tokens.view(b, -1, first.dim).to(x.device)
        adapters = None if self.adapters is None else tuple(a[index].to(x.device) for a in self.adapters)
        labels = first.backbone_labels(y, b)
        return self.backbone.net(x, t, y=None if labels is None else labels.to(x.device), return_mid=return_mid,
                                 **net_inputs(split, tokens, adapters))


class ClassMixtureBank:
    """The unconditional density of each class-conditional compartment as the mixture of its classes, ``p_i(x) = sum_y
    pi_i(y) p_i(x | y)``, with ``pi_i`` the class frequencies of source i's own data.

    A compartment's unconditional prompt row (the one row of an unconditional compartment) only refines the
    backbone's null-class prediction, and the backbone (public data, every class) draws every class there: measured
    on the shipped backbone, a digits-0-4 row drew 5-9 digits in 19% of its confidently read samples and a 5-9 row
    0-4 digits in 22% (``benchmarks/attribution_domains.py purity``). The class mixture puts mass only on the
    classes the source holds, so it is the density to compose and attribute with when sources have labels and
    samples are unconditional. Each component (source i, class y with ``n_i(y) > 0``) is one row of the bank; the
    composition over components with priors ``lambda_i pi_i(y)`` (:meth:`priors`) is Prop. 3.1 applied to the finer
    mixture, and per-source weights or credits are the sums over a source's components (:attr:`source`).
    """

    def __init__(self, bank: CompartmentBank, class_counts):
        import numpy as np

        counts = np.asarray(class_counts, dtype=np.float64)
        first = bank.compartments[0]
        if not first.config.conditional:
            raise ValueError("a class mixture needs class-conditional compartments")
        if counts.shape != (len(bank), first.num_classes) or not np.isfinite(counts).all() or (counts < 0).any():
            raise ValueError(f"class_counts must be non-negative, shaped ({len(bank)}, {first.num_classes}); got "
                             f"{counts.shape}")
        empty = np.flatnonzero(counts.sum(1) == 0)
        if empty.size:
            raise ValueError(f"source(s) {empty.tolist()} hold no labelled sample: no class mixture")
        src, cls = np.nonzero(counts > 0)
        self.bank = bank
        self.source = torch.as_tensor(src, dtype=torch.long)  # component -> source index
        self.label = torch.as_tensor(cls, dtype=torch.long)  # component -> class
        self.class_prior = torch.as_tensor(counts[src, cls] / counts.sum(1)[src], dtype=torch.float64)
        self.n_sources = len(bank)

    def __len__(self) -> int:
        return len(self.source)

    def priors(self, source_priors=None) -> list[float]:
        """Component priors ``lambda_i pi_i(y)`` from per-source ``lambda`` (default uniform)."""
        lam = torch.ones(self.n_sources, dtype=torch.float64) if source_priors is None else \
            torch.as_tensor(source_priors, dtype=torch.float64)
        if lam.shape != (self.n_sources,):
            raise ValueError(f"need {self.n_sources} source priors, got {tuple(lam.shape)}")
        return (lam[self.source] * self.class_prior).tolist()

    def __call__(self, x: torch.Tensor, t: torch.Tensor, index: torch.Tensor, y: torch.Tensor | None = None,
                 return_mid: bool = False):
        if y is not None:
            raise ValueError("a class mixture is the unconditional density: it takes no label")
        return self.bank(x, t, self.source[index], y=self.label[index], return_mid=return_mid)
