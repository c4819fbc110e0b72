"""``cdm``: pretrain the backbone, train the judge classifier, sample, score, demo."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from ..errors import CdmError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compartmentalized Diffusion Models: generators whose training data stays protected.")
console = Console(stderr=True)
REPO = Path(__file__).resolve().parents[3]
DEFAULT_BACKBONE = REPO / "weights" / "backbone"
DEFAULT_CLASSIFIER = REPO / "weights" / "classifier"


@app.callback()
def _root() -> None:
    """Compartmentalized Diffusion Models: generators whose training data stays protected."""


def _threads(n: int | None) -> None:
    import torch

    if n:
        torch.set_num_threads(n)


def _command() -> str:
    return "cdm " + shlex.join(sys.argv[1:])


@app.command()
def pretrain(
    out: Path = typer.Option(..., help="Run directory: checkpoint, then the finished backbone bundle."),
    steps: int = typer.Option(4000, help="Total optimiser steps."),
    batch_size: int = typer.Option(64),
    lr: float = typer.Option(2e-3),
    lr_schedule: str = typer.Option("cosine", help="constant | cosine"),
    glyphs: int = typer.Option(0, help="Synthetic digit glyphs added to the 1,000 public MNIST digits."),
    seed: int = typer.Option(0),
    max_minutes: Optional[float] = typer.Option(None, help="Stop after a checkpoint once this long (resume later)."),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads (default: torch's choice)."),
) -> None:
    """Pretrain the class-conditional U-ViT backbone on PUBLIC data only (resumable, deterministic)."""
    from ..training import PretrainConfig, pretrain as run

    _threads(threads)
    cfg = PretrainConfig(steps=steps, batch_size=batch_size, lr=lr, lr_schedule=lr_schedule, glyphs=glyphs, seed=seed)
    rec = run(cfg, out, max_minutes=max_minutes, command=_command())
    state = "finished" if rec["finished"] else "paused (run the same command to resume)"
    console.print(f"{state} at step {rec['steps_done']}/{steps}, loss {rec['final_loss']:.4f}, "
                  f"{rec['wall_seconds']:.0f} s in all -> {out}")


def main() -> None:
    try:
        app()
    except CdmError as e:
        console.print(f"[red]error:[/red] {e}")
        raise SystemExit(2)


if __name__ == "__main__":
    main()
