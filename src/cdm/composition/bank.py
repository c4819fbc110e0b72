"""Compartments on one backbone as a bank: every (sample, compartment) pair in ONE batched forward.

Rows carry their own prompts (the prompt tables are stacked and gathered per row; a text compartment's caption
map is applied per compartment, its adapters gathered per row, its LoRA factors passed stacked with each row's
compartment index), so n compartments cost one backbone call on n x B rows instead of n calls. The stacked tables
live on the backbone's device, and every row's keywords are made there.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..backbone import Backbone
from ..compartments import Compartment, net_inputs

__all__ = ["CompartmentBank"]


class CompartmentBank:
    def __init__(self, backbone: Backbone, compartments: Sequence[Compartment]):
        if not compartments:
            raise ValueError("no compartments to compose")
        shapes = {(c.prompts.table.weight.shape, c.prompts.shape, c.prompts.gate_shape, c.config.conditional,
                   c.config.text_encoder, c.config.text_tokens if c.config.text else None, c.config.adapter_rank,
                   c.config.lora_rank) for c in compartments}
        if len(shapes) != 1:
            raise ValueError("compartments to compose in one batch must share prompt count, conditioning (classes, "
                             "captions and their encoder), adapters and LoRA rank")
        self.backbone = backbone
        self.compartments = list(compartments)
        dev = backbone.device
        self.tables = torch.stack([c.prompts.table.weight.detach().to(dev) for c in compartments])  # (n, rows, flat)
        first = self.compartments[0]
        self.text = first.config.text
        # each text compartment's caption map (weight, bias), on the backbone's device
        self.text_maps = [(c.text_proj.weight.detach().to(dev), c.text_proj.bias.detach().to(dev))
                          for c in compartments] if self.text else None
        self.adapters = None
        if first.adapters is not None:
            self.adapters = (torch.stack([c.adapters.down.detach().to(dev) for c in compartments]),
                             torch.stack([c.adapters.up.detach().to(dev) for c in compartments]))
        # LoRA: each target's factors stacked over compartments, (n, n_blocks, in, r) and (n, n_blocks, r, out); a
        # call passes them with the rows' compartment index, and the backbone gathers them one block at a time
        self.lora = None
        if first.lora is not None:
            sets = [c.lora.factors() for c in compartments]
            self.lora = {name: tuple(torch.cat([s[name][j].detach().to(dev) for s in sets]) for j in (0, 1))
                         for name in sets[0]}

    def __len__(self) -> int:
        return len(self.compartments)

    @property
    def device(self) -> torch.device:
        """The backbone's device, where the bank's tables live and its rows are evaluated."""
        return self.backbone.device

    def __call__(self, x: torch.Tensor, t: torch.Tensor, index: torch.Tensor, y: torch.Tensor | None = None,
                 return_mid: bool = False, text: torch.Tensor | None = None
                 ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """eps for each row from compartment ``index[row]``; with ``return_mid`` also that forward's tokens after
        the mid block (rows, L, D), for router heads. ``text``: (rows or 1, dim) caption embeddings (text
        compartments)."""
        first, b, dev = self.compartments[0], x.shape[0], self.tables.device
        text = first.check_text(text, b)
        index = index.to(dev)
        rows = first.row(y, b).to(dev)  # same row layout for every compartment
        split = first.prompts.split(self.tables[index, rows])
        tokens = None
        if text is not None:
            text = text.to(dev, self.tables.dtype)
            tokens = torch.empty((b, first.config.text_tokens * first.dim), dtype=self.tables.dtype, device=dev)
            for i in index.unique().tolist():
                at = (index == i).nonzero()[:, 0]
                tokens[at] = F.linear(text[at], *self.text_maps[i])
            tokens = tokens.view(b, -1, first.dim)
        adapters = None if self.adapters is None else tuple(a[index] for a in self.adapters)
        lora = None if self.lora is None else {**self.lora, "index": index}
        labels = first.backbone_labels(y, b)
        return self.backbone.net(x, t, y=None if labels is None else labels.to(dev), return_mid=return_mid,
                                 **net_inputs(split, tokens, adapters, lora))


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

    @property
    def device(self) -> torch.device:
        return self.bank.device

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
        index = index.to(self.source.device)
        return self.bank(x, t, self.source[index], y=self.label[index], return_mid=return_mid)
