"""Provenance of a record: which code (``git_commit``) ran on which machine (``machine_info``).

Every training record, benchmark part and result file carries both. Imports nothing of cdm, so any layer may
use it.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

__all__ = ["git_commit", "machine_info"]


def git_commit() -> str:
    """HEAD (``-dirty`` with uncommitted changes to tracked files). ``$CDM_COMMIT``, when set, is taken instead:
    for a copy of the tree whose git metadata is absent or stale (e.g. a working tree sent to a GPU machine
    with the checkout's original ``.git``)."""
    if os.environ.get("CDM_COMMIT"):
        return os.environ["CDM_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=5, cwd=Path(__file__).resolve().parent).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_info() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": sys.version.split()[0],
            "torch": torch.__version__, "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
