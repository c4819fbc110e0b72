"""The benchmark's figures, written as PNG next to its report."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from ..io import atomic_write_bytes
from .profiles import METHODS

__all__ = ["plot_continual", "plot_credit", "plot_table1", "plot_two_domain"]


def plot_credit(two: np.ndarray, same: np.ndarray, domain: np.ndarray, confident: np.ndarray, path: Path) -> None:
    """Figure 5 analog: the credit of the first source per sample, different vs same domain."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2), sharey=True)
    bins = np.linspace(-0.25, 1.25, 31)
    for d, label in enumerate(["read as 0-4", "read as 5-9"]):
        sel = confident & (domain == d)
        if sel.any():
            axes[0].hist(two[sel, 0], bins=bins, alpha=0.6, label=label)
    axes[0].set_title("different domains: credit of digits 0-4")
    if confident.any():
        axes[0].legend(fontsize=7)
    axes[1].hist(same[:, 0], bins=bins, alpha=0.8, color="grey")
    axes[1].set_title("one domain (2 stratified halves): credit of half 0")
    for ax in axes:
        ax.set_xlabel("credit")
    axes[0].set_ylabel("samples")
    _save(fig, path)


def plot_two_domain(paths: dict, path: Path, steps: int) -> None:
    """Mean weight of the digits-0-4 compartment over sampling steps, per weighting, for samples the
    classifier reads as 0-4 vs 5-9 (``paths``: name -> (weights (steps, N, 2), domain (N,)))."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(paths), figsize=(3.6 * len(paths), 3.2), sharey=True)
    for ax, (name, (w, domain)) in zip(np.atleast_1d(axes), paths.items(), strict=True):
        for d, label in enumerate(["read as 0-4", "read as 5-9"]):
            if (domain == d).any():
                ax.plot(np.arange(w.shape[0]), w[:, domain == d, 0].mean(1), label=label)
        ax.set_title(name)
        ax.set_xlabel(f"sampling step (of {steps})")
        ax.set_ylim(-0.02, 1.02)
    np.atleast_1d(axes)[0].set_ylabel("mean w(digits 0-4)")
    np.atleast_1d(axes)[0].legend(fontsize=7)
    _save(fig, path)


def plot_table1(table: dict, path: Path, splits: str = "stratified") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted(table, key=int)
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for method in dict.fromkeys(("paragon", *METHODS, *table[ks[0]])):
        if any(method not in table[k] for k in ks):
            continue  # (a run from before the method was benchmarked)
        ax.plot([int(k) for k in ks], [table[k][method] for k in ks], marker="o", label=method,
                linestyle="--" if method == "paragon" else "-")
    ax.set_xticks([int(k) for k in ks])
    ax.set_xlabel(f"number of sources ({splits} splits)")
    ax.set_ylabel("FID (classifier features)")
    ax.legend(fontsize=7)
    _save(fig, path)


def plot_continual(rows: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4))
    for op, marker in (("add", "o"), ("drop", "s")):
        sel = [r for r in rows if r["op"] == op]
        ax.plot([r["n_sources"] for r in sel], [r["fid_relative_to_one"] for r in sel], marker=marker,
                label="adding sources" if op == "add" else "dropping sources")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("sources composed (Itô weights)")
    ax.set_ylabel("FID relative to one source")
    ax.legend(fontsize=7)
    _save(fig, path)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
