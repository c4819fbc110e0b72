"""What travels between the driver and a training task, as plain data: bytes in cdm's on-disk formats
(safetensors, JSON), numpy arrays and JSON-ready dicts.

- the **backbone**: its bundle's files (``config.json``, ``model.safetensors``; for a latent backbone also its
  autoencoder's folder), sent once per run (``ray.put``) and rebuilt once per worker process, checked against its
  hash;
- a **source**: its images, labels, class names and captions as arrays, with its content hash (checked when
  rebuilt), plus its rows already in the backbone's space when the driver has them cached (latents, caption
  embeddings);
- the **result**: the compartment's tensors as safetensors bytes and its training record as a dict.

Nothing here reads a pickle from a file; Ray moves these objects between processes with its own serialiser.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..backbone import Backbone
from ..data import Source
from ..errors import WeightsError

__all__ = ["backbone_from_payload", "backbone_payload", "source_from_payload", "source_payload", "tensors_from_bytes",
           "tensors_to_bytes"]

_BACKBONES: dict[tuple[str, str], Backbone] = {}  # per worker process: (hash, device) -> rebuilt backbone


def _folder_files(path: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(path.iterdir()) if f.is_file()}


def backbone_payload(backbone: Backbone) -> dict:
    """The backbone as bytes: ``{"hash", "ref", "files": {name: bytes}, "autoencoder": {name: bytes} | None}``."""
    with tempfile.TemporaryDirectory(prefix="cdm-bb-") as tmp:
        root = Path(tmp)
        backbone.save_pretrained(root / "backbone")
        ae = None
        if backbone.latent:
            backbone.codec.autoencoder.save_pretrained(root / "autoencoder")
            ae = _folder_files(root / "autoencoder")
        return {"hash": backbone.hash, "ref": backbone.ref, "files": _folder_files(root / "backbone"),
                "autoencoder": ae}


def backbone_from_payload(payload: dict, device: str = "cpu") -> Backbone:
    """The backbone a payload holds, rebuilt (once per process and device) and checked against its hash."""
    key = (payload["hash"], device)
    if key in _BACKBONES:
        return _BACKBONES[key]
    with tempfile.TemporaryDirectory(prefix="cdm-bb-") as tmp:
        root = Path(tmp)
        for folder, files in (("backbone", payload["files"]), ("autoencoder", payload.get("autoencoder"))):
            if files is None:
                continue
            (root / folder).mkdir()
            for name, data in files.items():
                if "/" in name or name.startswith("."):
                    raise WeightsError(f"backbone payload: bad file name {name!r}")
                (root / folder / name).write_bytes(data)
        ae = None
        if payload.get("autoencoder") is not None:
            from ..autoencoder import Autoencoder

            ae = Autoencoder.from_pretrained(root / "autoencoder")
        bb = Backbone.from_pretrained(root / "backbone", autoencoder=ae)
    if bb.hash != payload["hash"]:
        raise WeightsError(f"backbone payload: rebuilt backbone is {bb.hash[:12]}, expected {payload['hash'][:12]}")
    bb.ref = payload.get("ref")
    if device != "cpu":
        bb.to(device)
    _BACKBONES[key] = bb
    return bb


def source_payload(source: Source) -> dict:
    """A source as arrays: ``{"id", "images", "labels", "classes", "captions", "content_hash"}``."""
    return {"id": source.id, "images": source.images, "labels": source.labels, "classes": list(source.classes),
            "captions": None if source.captions is None else list(source.captions),
            "content_hash": source.content_hash}


def source_from_payload(payload: dict) -> Source:
    """The source a payload holds, checked against its content hash."""
    src = Source(id=payload["id"], images=np.asarray(payload["images"]), labels=payload["labels"],
                 classes=tuple(payload["classes"]), captions=payload["captions"])
    if src.content_hash != payload["content_hash"]:
        raise WeightsError(f"source payload {payload['id']}: content hash {src.content_hash[:12]} is not the "
                           f"expected {payload['content_hash'][:12]}")
    return src


def tensors_to_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    """Tensors as a safetensors file's bytes."""
    return st_save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})


def tensors_from_bytes(data: bytes) -> dict[str, torch.Tensor]:
    try:
        return st_load(data)
    except Exception as e:  # safetensors raises its own error types
        raise WeightsError(f"not a safetensors payload ({e})") from None
