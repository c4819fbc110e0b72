"""Weights on disk: a directory holding ``config.json`` + ``model.safetensors`` (+ optional JSON records).

cdm never reads pickles. A ``.pt``/``.pth``/``.ckpt`` file offered as weights is refused before it is opened;
the one reader of such files is ``cdm import-uvit`` (:mod:`cdm.backbone.convert`), which calls
``torch.load(weights_only=True)`` only, so a checkpoint that needs code to unpickle is refused. Every write goes
to a temporary file in the same directory and is renamed into place (``os.replace`` is atomic on POSIX), so a
crash leaves either the old or the new file, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import WeightsError

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "atomic_write_bytes",
    "atomic_write_json",
    "file_sha256",
    "load_state_dict",
    "load_strict",
    "read_json",
    "save_state_dict",
    "state_dict_sha256",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
_FILE_MODE = 0o644
_PICKLE_SUFFIXES = {".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle"}
_PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK\x03\x04")  # protocol 2-5, zip (torch.save)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)  # mkstemp makes 0600; written files are ordinary 0644 files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: not found")
    try:
        obj = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: expected a JSON object")
    return obj


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def state_dict_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """A hash of tensor names, dtypes, shapes and bytes: equal iff the weights are bit-identical."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_state_dict(path: str | os.PathLike, state: Mapping[str, torch.Tensor],
                    metadata: dict[str, str] | None = None) -> None:
    """Save tensors as safetensors, atomically."""
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        raise WeightsError(f"{path}: refusing a pickle-based checkpoint ({path.suffix}); cdm loads safetensors only "
                           "(convert it once, in a trusted environment, with safetensors.torch.save_file)")
    with open(path, "rb") as f:
        head = f.read(9)
    size = path.stat().st_size
    # A safetensors file starts with the little-endian u64 length of a JSON header that opens with "{"; only a
    # file that is not one of those is checked for pickle / zip magic bytes (a header length can start with them).
    looks_safetensors = len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= size - 8
    if not looks_safetensors and head.startswith(_PICKLE_MAGIC):
        raise WeightsError(f"{path}: this file is a pickle / torch.save archive, not safetensors; refusing to load it")


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a safetensors file; pickles, missing and corrupt files raise :class:`WeightsError`."""
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_NAME
    if not path.is_file():
        raise WeightsError(f"{path}: not found")
    _refuse_pickle(path)
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{path}: not a readable safetensors file ({e})") from None


def load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str | os.PathLike) -> None:
    """``load_state_dict(strict=True)`` with a short :class:`WeightsError` instead of torch's long message."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))

    def few(keys: list[str]) -> str:
        return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")

    problems = []
    if missing:
        problems.append(f"{len(missing)} missing ({few(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected ({few(unexpected)})")
    if wrong:
        k = wrong[0]
        problems.append(f"{len(wrong)} of the wrong shape (e.g. {k}: {tuple(state[k].shape)} in the file, "
                        f"{tuple(expected[k].shape)} in the config)")
    if problems:
        raise WeightsError(f"{where}: weights do not match the config: " + "; ".join(problems))
    bad_dtype = sorted(k for k in state if state[k].is_floating_point() != expected[k].is_floating_point())
    if bad_dtype:
        raise WeightsError(f"{where}: tensor {bad_dtype[0]} has dtype {state[bad_dtype[0]].dtype}, "
                           f"expected {expected[bad_dtype[0]].dtype}")
    model.load_state_dict(state, strict=True)


def config_from_dict(cls, d: dict, what: str, ignore: tuple[str, ...] = ()):
    """Build the config dataclass ``cls`` from ``d``; unknown fields are an error naming them."""
    import dataclasses

    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known - set(ignore))
    if unknown:
        raise ValueError(f"unknown {what} config fields: {', '.join(unknown)}")
    return cls(**{k: v for k, v in d.items() if k in known})
