"""Deterministic splits of a Source into compartments.

Assignments depend on sample content (hashes), labels and a seed only, never on array order, so the same
data always lands in the same part. Splits compose: a part is a Source and can be split again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from ..errors import DataError
from .source import Source

__all__ = ["format_groups", "split_by_classes", "split_stratified", "stratified_tag"]


def stratified_tag(k: int, seed: int = 0) -> str:
    """The id segment of a stratified split: ``strat<k>`` for seed 0, else ``strat<k>s<seed>``."""
    return f"strat{k}" if seed == 0 else f"strat{k}s{seed}"


def split_stratified(src: Source, k: int, *, seed: int = 0) -> list[Source]:
    """Split ``src`` into ``k`` disjoint parts with the same class mix (ids ``"<src.id>/strat<k>-<j>"``).

    Within each class (or among all samples, if unlabelled) samples are ordered by
    ``sha256(f"{seed}:{sample_hash}")`` and dealt round robin; the dealing continues from class to class, so
    per class and in total the part sizes differ by at most 1. A seed other than 0 is part of the id
    (``strat<k>s<seed>-<j>``). Each part keeps the order of ``src``.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise DataError(f"{src.id}: number of parts must be a positive integer, got {k!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataError(f"{src.id}: split seed must be a non-negative integer, got {seed!r}")
    k, seed = int(k), int(seed)
    if k > len(src):
        raise DataError(f"{src.id}: cannot split {len(src)} samples into {k} parts")
    hashes = src.sample_hashes
    keys = [hashlib.sha256(f"{seed}:{h}".encode()).hexdigest() for h in hashes]
    if src.labels is None:
        strata = [np.arange(len(src))]
    else:
        strata = [np.flatnonzero(src.labels == c) for c in range(len(src.classes))]
    part = np.empty(len(src), dtype=np.int64)
    dealt = 0
    for members in strata:
        # Ties (identical images) are broken by index; such samples are interchangeable, so content is unaffected.
        ordered = sorted(members.tolist(), key=lambda i: (keys[i], i))
        part[ordered] = (dealt + np.arange(len(ordered))) % k
        dealt += len(ordered)
    tag = stratified_tag(k, seed)
    return [src.subset(np.flatnonzero(part == j), f"{src.id}/{tag}-{j}") for j in range(k)]


def _runs(labels: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"``."""
    ordered = sorted(set(int(c) for c in labels))
    runs: list[str] = []
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        runs.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(runs)


def format_groups(groups: Sequence[Sequence[int]]) -> str:
    """Compact text for class groups: ``[[0,1,2,3,4],[5,6,7,8,9]]`` -> ``"0-4|5-9"``, ``[[0,2],[7]]`` -> ``"0,2|7"``."""
    return "|".join(_runs(group) for group in groups)


def split_by_classes(src: Source, groups: Sequence[Sequence[int]]) -> list[Source]:
    """One part per group of class labels (ids ``"<src.id>/classes[<groups>]-<j>"``, e.g. ``classes[0-4|5-9]-0``).

    Needs a labelled source; each label must exist and appear in at most one group, and each group must hold
    samples. Parts keep the labels and class names of ``src`` and its order.
    """
    if src.labels is None:
        raise DataError(f"{src.id}: splitting by classes needs a labelled source")
    if isinstance(groups, (str, bytes)) or not len(groups):
        raise DataError(f"{src.id}: class groups must be a non-empty list of lists of labels")
    seen: set[int] = set()
    clean: list[list[int]] = []
    for j, group in enumerate(groups):
        if isinstance(group, (str, bytes, int, np.integer)) or not len(group):
            raise DataError(f"{src.id}: class group {j} must be a non-empty list of labels, got {group!r}")
        labels = []
        for c in group:
            if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or not 0 <= c < len(src.classes):
                raise DataError(f"{src.id}: class label {c!r} in group {j} is not in 0..{len(src.classes) - 1}")
            if int(c) in seen:
                raise DataError(f"{src.id}: class label {c} appears in more than one group (or twice)")
            seen.add(int(c))
            labels.append(int(c))
        clean.append(labels)
    tag = f"classes[{format_groups(clean)}]"
    parts = []
    for j, labels in enumerate(clean):
        idx = np.flatnonzero(np.isin(src.labels, labels))
        if not len(idx):
            raise DataError(f"{src.id}: class group {j} ({_runs(labels)}) has no samples")
        parts.append(src.subset(idx, f"{src.id}/{tag}-{j}"))
    return parts
