"""Import a baofff/U-ViT checkpoint (``.pth``) as a cdm backbone bundle (see :mod:`cdm.backbone.pretrained`).

``import_uvit(checkpoint, config, out)`` reads the checkpoint with ``torch.load(weights_only=True)`` (a file that
needs code to unpickle is refused; nothing else in cdm reads a pickle), loads it strictly into cdm's U-ViT
(same parameter names), and writes ``config.json`` (model, the noise schedule the checkpoint was trained with,
codec) + ``model.safetensors`` + ``training.json`` (the source file's sha256, the config, the provenance)
into a new directory, atomically (a temporary directory renamed into place). Everything is checked first.

``config`` is one of the released configs by name (:data:`UVIT_RELEASES`, from baofff/U-ViT ``configs/*.py``
at commit ce55170 and its training scripts) or a JSON file of the same form::

    {"nnet": {...their config.nnet, their defaults...}, "schedule": "vpsde",
     "null_class": 1000, "image_size": 32, "latent": {...}}

(``null_class``: the label row of the unconditional branch, if trained with one; ``image_size``: the side of
stored images for a pixel model, default ``nnet.img_size``; ``latent``: present for a latent-space model.)

Latent models (ImageNet 256/512, on Stable Diffusion's KL-f8 latents) need their autoencoder: ``autoencoder`` is
its folder as a diffusers ``AutoencoderKL`` (``cdm.autoencoder.Autoencoder``); it is checked against the model
(latent channels, image side / factor = the U-ViT's side) and recorded in the codec entry
``{"kind": "latent", "autoencoder": PATH, "autoencoder_hash": ..., "data_size": 256, "channels": 3}``, so the
bundle loads and samples like any backbone (``cdm.backbone.LatentCodec``).

The text-to-image model (their ``libs/uvit_t2i.py``, MS-COCO) is no backbone (it is conditioned on text, not
labels) and has its own import: ``import_uvit_t2i(checkpoint, config, out)`` (:data:`UVIT_T2I_RELEASES`, or a JSON
file of the same form with ``"nnet": {"name": "uvit_t2i", ...}`` and optional ``"context"``) writes the same three
files, ``config.json`` of kind ``cdm-uvit-t2i`` (model, schedule, and what it needs around it: the text encoder
(``context``) and the autoencoder (``latent``) it was trained with, described, not loaded);
``load_uvit_t2i(dir)`` reads it back as a :class:`cdm.backbone.uvit_t2i.UViTT2I`.
"""

from __future__ import annotations

import os
import pickle
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import WeightsError
from ..io import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    atomic_write_json,
    file_sha256,
    load_state_dict,
    load_strict,
    read_json,
    save_state_dict,
)
from ..sampling import SCHEDULES, NoiseSchedule
from .pixels import PixelCodec
from .pretrained import KIND
from .uvit import UViT, UViTConfig
from .uvit_t2i import UViTT2I, UViTT2IConfig

__all__ = ["T2I_KIND", "UVIT_RELEASES", "UVIT_T2I_RELEASES", "UViTImport", "UViTT2IImport", "import_uvit",
           "import_uvit_t2i", "load_uvit_t2i", "read_uvit_checkpoint", "resolve_uvit_config",
           "resolve_uvit_t2i_config"]

SOURCE = "github.com/baofff/U-ViT@ce551708dc9cde9818d2af7d84dfadfeb7bd9034"
# the constructor defaults of their libs/uvit.py UViT (a JSON config's nnet falls back on these, not on cdm's)
NNET_DEFAULTS = {"img_size": 224, "patch_size": 16, "in_chans": 3, "embed_dim": 768, "depth": 12, "num_heads": 12,
                 "mlp_ratio": 4.0, "qkv_bias": False, "qk_scale": None, "mlp_time_embed": False, "num_classes": -1,
                 "use_checkpoint": False, "conv": True, "skip": True}
_SD_AUTOENCODER = "Stable Diffusion KL-f8 autoencoder, scale_factor 0.18215 (their libs/autoencoder.py)"


def _pixel(**nnet) -> dict:
    return {"name": "uvit", **nnet}


# name -> {"nnet": their config.nnet, "schedule", "null_class", "latent", "guidance", "from"}. Every nnet entry is
# copied from configs/<name>.py; the schedule from the script their README trains and evaluates it with:
# train.py / eval.py and train_ldm.py / eval_ldm.py use sde.VPSDE() (beta 0.1 -> 20, the network fed t * 999):
# cdm's "vpsde"; train_ldm_discrete.py / eval_ldm_discrete.py use stable_diffusion_beta_schedule() (scaled
# linear 0.00085 -> 0.012), cdm's "linear", with the network fed n = t + 1 (see cdm.sampling.schedule).
# null_class: datasets.py's empty label for cfg=True datasets is K = 1000 (the 1001st label row).
# guidance: their sample.scale s in eps_c + s (eps_c - eps_u) is cdm's guidance 1 + s.
UVIT_RELEASES: dict[str, dict] = {
    "cifar10_uvit_small": {  # U-ViT-S/2, CIFAR-10 32x32, unconditional; train.py
        "nnet": _pixel(img_size=32, patch_size=2, embed_dim=512, depth=12, num_heads=8, mlp_ratio=4, qkv_bias=False,
                       mlp_time_embed=False, num_classes=-1),
        "schedule": "vpsde", "from": "configs/cifar10_uvit_small.py, train.py (sde.VPSDE)"},
    "celeba64_uvit_small": {  # U-ViT-S/4, CelebA 64x64, unconditional; train.py
        "nnet": _pixel(img_size=64, patch_size=4, embed_dim=512, depth=12, num_heads=8, mlp_ratio=4, qkv_bias=False,
                       mlp_time_embed=False, num_classes=-1),
        "schedule": "vpsde", "from": "configs/celeba64_uvit_small.py, train.py (sde.VPSDE)"},
    "imagenet64_uvit_mid": {  # U-ViT-M/4, ImageNet 64x64, 1000 classes, trained without a null class; train.py
        "nnet": _pixel(img_size=64, patch_size=4, embed_dim=768, depth=16, num_heads=12, mlp_ratio=4, qkv_bias=False,
                       mlp_time_embed=False, num_classes=1000, use_checkpoint=True),
        "schedule": "vpsde", "from": "configs/imagenet64_uvit_mid.py, train.py (sde.VPSDE)"},
    "imagenet64_uvit_large": {  # U-ViT-L/4, ImageNet 64x64, 1000 classes, no null class; train.py
        "nnet": _pixel(img_size=64, patch_size=4, embed_dim=1024, depth=20, num_heads=16, mlp_ratio=4, qkv_bias=False,
                       mlp_time_embed=False, num_classes=1000, use_checkpoint=True),
        "schedule": "vpsde", "from": "configs/imagenet64_uvit_large.py, train.py (sde.VPSDE)"},
    "imagenet256_uvit_large": {  # U-ViT-L/2 on 4x32x32 SD latents; train_ldm.py (continuous time)
        "nnet": _pixel(img_size=32, patch_size=2, in_chans=4, embed_dim=1024, depth=20, num_heads=16, mlp_ratio=4,
                       qkv_bias=False, mlp_time_embed=False, num_classes=1001, use_checkpoint=True),
        "schedule": "vpsde", "null_class": 1000, "guidance": 1.4,
        "latent": {"autoencoder": _SD_AUTOENCODER, "weights": "assets/stable-diffusion/autoencoder_kl.pth",
                   "image_size": 256},
        "from": "configs/imagenet256_uvit_large.py, train_ldm.py (sde.VPSDE)"},
    "imagenet256_uvit_huge": {  # U-ViT-H/2 on 4x32x32 SD latents; train_ldm_discrete.py
        "nnet": _pixel(img_size=32, patch_size=2, in_chans=4, embed_dim=1152, depth=28, num_heads=16, mlp_ratio=4,
                       qkv_bias=False, mlp_time_embed=False, num_classes=1001, use_checkpoint=True, conv=False),
        "schedule": "linear", "null_class": 1000, "guidance": 1.4,
        "latent": {"autoencoder": _SD_AUTOENCODER, "weights": "assets/stable-diffusion/autoencoder_kl_ema.pth",
                   "image_size": 256},
        "from": "configs/imagenet256_uvit_huge.py, train_ldm_discrete.py (stable_diffusion_beta_schedule)"},
    "imagenet512_uvit_large": {  # U-ViT-L/4 on 4x64x64 SD latents; train_ldm.py (continuous time)
        "nnet": _pixel(img_size=64, patch_size=4, in_chans=4, embed_dim=1024, depth=20, num_heads=16, mlp_ratio=4,
                       qkv_bias=False, mlp_time_embed=False, num_classes=1001, use_checkpoint=True),
        "schedule": "vpsde", "null_class": 1000, "guidance": 1.7,
        "latent": {"autoencoder": _SD_AUTOENCODER, "weights": "assets/stable-diffusion/autoencoder_kl.pth",
                   "image_size": 512},
        "from": "configs/imagenet512_uvit_large.py, train_ldm.py (sde.VPSDE)"},
    "imagenet512_uvit_huge": {  # U-ViT-H/4 on 4x64x64 SD latents; train_ldm_discrete.py
        "nnet": _pixel(img_size=64, patch_size=4, in_chans=4, embed_dim=1152, depth=28, num_heads=16, mlp_ratio=4,
                       qkv_bias=False, mlp_time_embed=False, num_classes=1001, use_checkpoint=True, conv=False),
        "schedule": "linear", "null_class": 1000, "guidance": 1.7,
        "latent": {"autoencoder": _SD_AUTOENCODER, "weights": "assets/stable-diffusion/autoencoder_kl_ema.pth",
                   "image_size": 512},
        "from": "configs/imagenet512_uvit_huge.py, train_ldm_discrete.py (stable_diffusion_beta_schedule)"},
}

# their libs/uvit_t2i.py UViT: the constructor defaults of libs/uvit.py without labels, plus the text context
T2I_NNET_DEFAULTS = {**{k: v for k, v in NNET_DEFAULTS.items() if k != "num_classes"}, "clip_dim": 768,
                     "num_clip_token": 77}
T2I_KIND = "cdm-uvit-t2i"


def _t2i(**nnet) -> dict:
    return {"name": "uvit_t2i", **nnet}


# MS-COCO 256x256 on 4x32x32 SD latents, captions as CLIP tokens; train_t2i_discrete.py / eval_t2i_discrete.py:
# stable_diffusion_beta_schedule() (cdm's "linear", network fed n = t + 1), sample.scale 1 (guidance 2), the empty
# caption's encoding as the unconditional context. Their autoencoder scale is 0.23010 here (config.autoencoder),
# not the 0.18215 of the ImageNet latent models.
_MSCOCO = {
    "schedule": "linear", "guidance": 2.0,
    "latent": {"autoencoder": "Stable Diffusion KL-f8 autoencoder, scale_factor 0.23010 (configs/mscoco_uvit_small.py)",
               "weights": "assets/stable-diffusion/autoencoder_kl.pth", "scale_factor": 0.2301, "image_size": 256},
    "context": {"encoder": "openai/clip-vit-large-patch14 text model (transformers CLIPTextModel): last_hidden_state "
                           "of the caption padded/truncated to 77 tokens (their libs/clip.py FrozenCLIPEmbedder)",
                "unconditional": "the same encoding of the empty caption '' (scripts/extract_empty_feature.py)"},
}
UVIT_T2I_RELEASES: dict[str, dict] = {
    "mscoco_uvit_small": {  # U-ViT-S/2, 13 blocks
        "nnet": _t2i(img_size=32, in_chans=4, patch_size=2, embed_dim=512, depth=12, num_heads=8, mlp_ratio=4,
                     qkv_bias=False, mlp_time_embed=False, clip_dim=768, num_clip_token=77),
        **_MSCOCO, "from": "configs/mscoco_uvit_small.py, train_t2i_discrete.py (stable_diffusion_beta_schedule)"},
    "mscoco_uvit_small_deep": {  # U-ViT-S/2 (Deep), 17 blocks: their README trains it with --config.nnet.depth=16
        "nnet": _t2i(img_size=32, in_chans=4, patch_size=2, embed_dim=512, depth=16, num_heads=8, mlp_ratio=4,
                     qkv_bias=False, mlp_time_embed=False, clip_dim=768, num_clip_token=77),
        **_MSCOCO, "from": "configs/mscoco_uvit_small.py with --config.nnet.depth=16 (README), train_t2i_discrete.py "
                           "(stable_diffusion_beta_schedule)"},
}
_SCHEDULE_NOTES = {
    "vpsde": "their continuous time s in [0, 1] (network input s * 999) is integer t = 999 s here; abar is exact at "
             "every t >= 1, abar_0 = abar(s = 1e-3) (cdm.sampling.schedule)",
    "linear": "their discrete-time networks were fed n = t + 1 for this abar_t; cdm feeds t (one step of 1000 off)",
}
_CONFIG_KEYS = {"nnet", "schedule", "null_class", "image_size", "latent", "guidance", "from"}
_T2I_CONFIG_KEYS = {"nnet", "schedule", "latent", "context", "guidance", "from"}
# checkpoint nestings: their eval scripts load a plain state dict (nnet_ema.pth of a training checkpoint
# directory, utils.TrainState.save); other trainers wrap it. EMA first.
_NESTED = ("nnet_ema", "ema", "model_ema", "nnet", "model", "state_dict", "module")


@dataclass(frozen=True)
class UViTT2IImport:
    """What :func:`import_uvit_t2i` wrote."""

    out: Path
    config_name: str
    model: UViTT2IConfig
    schedule: NoiseSchedule
    entry: str  # where in the checkpoint the weights were ("" = the file is the state dict)
    sha256: str  # of the checkpoint file


@dataclass(frozen=True)
class UViTImport:
    """What :func:`import_uvit` wrote."""

    out: Path
    config_name: str
    model: UViTConfig
    schedule: NoiseSchedule
    codec: dict
    entry: str  # where in the checkpoint the weights were ("" = the file is the state dict)
    sha256: str  # of the checkpoint file
    latent: bool


def resolve_uvit_config(spec: str | os.PathLike) -> tuple[str, dict]:
    """``(name, release dict)`` for a released config name or a JSON file; WeightsError otherwise."""
    s = str(spec)
    if s in UVIT_RELEASES:
        return s, UVIT_RELEASES[s]
    if s in UVIT_T2I_RELEASES:
        raise WeightsError(f"--config {s}: a text-to-image U-ViT (uvit_t2i): import it with `cdm import-uvit-t2i`")
    path = Path(s)
    if path.suffix.lower() != ".json" and not path.is_file():
        raise WeightsError(f"--config {s}: not a released U-ViT config ({', '.join(UVIT_RELEASES)}) nor a JSON file")
    return path.stem, _release_json(path, _CONFIG_KEYS)


def resolve_uvit_t2i_config(spec: str | os.PathLike) -> tuple[str, dict]:
    """``(name, release dict)`` for a released text-to-image config name or a JSON file; WeightsError otherwise."""
    s = str(spec)
    if s in UVIT_T2I_RELEASES:
        return s, UVIT_T2I_RELEASES[s]
    path = Path(s)
    if s in UVIT_RELEASES or (path.suffix.lower() != ".json" and not path.is_file()):
        raise WeightsError(f"--config {s}: not a released text-to-image U-ViT config "
                           f"({', '.join(UVIT_T2I_RELEASES)}) nor a JSON file")
    return path.stem, _release_json(path, _T2I_CONFIG_KEYS)


def _release_json(path: Path, keys: set[str]) -> dict:
    rel = read_json(path)
    unknown = sorted(set(rel) - keys)
    if unknown:
        raise WeightsError(f"{path}: unknown fields {', '.join(unknown)} (known: {', '.join(sorted(keys))})")
    if not isinstance(rel.get("nnet"), dict) or not isinstance(rel.get("schedule"), str):
        raise WeightsError(f"{path}: needs \"nnet\" (their config.nnet) and \"schedule\" (one of "
                           f"{', '.join(SCHEDULES)})")
    return rel


def _nnet_kwargs(rel: dict, where: str, name: str, defaults: dict) -> dict:
    """Their ``config.nnet`` (network ``name``) over their constructor ``defaults``, as cdm config fields."""
    nnet = dict(rel["nnet"])
    got = nnet.pop("name", name)
    if got != name:
        hint = {"uvit": "`cdm import-uvit`", "uvit_t2i": "`cdm import-uvit-t2i`"}.get(got)
        raise WeightsError(f"{where}: nnet name {got!r} is not {name!r}" + (f": import it with {hint}" if hint else ""))
    unknown = sorted(set(nnet) - set(defaults))
    if unknown:
        raise WeightsError(f"{where}: unknown nnet fields {', '.join(unknown)}")
    kw = {**defaults, **nnet}
    if kw.pop("qk_scale") is not None:
        raise WeightsError(f"{where}: qk_scale other than the default head_dim ** -0.5 is not supported")
    kw.pop("use_checkpoint")  # gradient checkpointing: training only, no weights
    return kw


def _model_config(rel: dict, where: str) -> UViTConfig:
    kw = _nnet_kwargs(rel, where, "uvit", NNET_DEFAULTS)
    try:
        return UViTConfig(**kw, null_class=rel.get("null_class"))
    except (TypeError, ValueError) as e:
        raise WeightsError(f"{where}: invalid U-ViT config ({e})") from None


def _t2i_model_config(rel: dict, where: str) -> UViTT2IConfig:
    kw = _nnet_kwargs(rel, where, "uvit_t2i", T2I_NNET_DEFAULTS)
    try:
        return UViTT2IConfig(**kw)
    except (TypeError, ValueError) as e:
        raise WeightsError(f"{where}: invalid text-to-image U-ViT config ({e})") from None


def _schedule(rel: dict, where: str) -> NoiseSchedule:
    try:
        return NoiseSchedule(rel["schedule"])
    except ValueError as e:
        raise WeightsError(f"{where}: {e}") from None


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise WeightsError(f"--out {out}: exists and is not an empty directory; pick a new one")


def _load_meta(cls, cfg, state: dict[str, torch.Tensor], where: str | os.PathLike) -> torch.nn.Module:
    """``cls(cfg)`` built without random init and loaded strictly from ``state`` (the networks have no buffers)."""
    with torch.device("meta"):
        net = cls(cfg)
    net = net.to_empty(device="cpu")
    load_strict(net, state, where)  # names the first missing / unexpected / wrong-shape keys
    return net


def _write_bundle(out: Path, state: dict[str, torch.Tensor], config: dict, record: dict) -> None:
    """``model.safetensors``, ``config.json`` and ``training.json`` into ``out``, atomically."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        os.chmod(tmp, 0o755)
        save_state_dict(tmp / WEIGHTS_NAME, state)
        atomic_write_json(tmp / CONFIG_NAME, config)
        atomic_write_json(tmp / "training.json", record)
        os.replace(tmp, out)  # onto a missing or empty directory
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _codec(rel: dict, cfg: UViTConfig, where: str, autoencoder: str | os.PathLike | None) -> dict:
    if rel.get("latent") is not None:
        if not isinstance(rel["latent"], dict):
            raise WeightsError(f"{where}: \"latent\" must be an object (the autoencoder it needs)")
        lat = rel["latent"]
        if autoencoder is None:
            need = lat.get("autoencoder", "the one it was trained on")
            raise WeightsError(f"{where} is a latent model: give its autoencoder's folder with --autoencoder DIR (a "
                               f"diffusers AutoencoderKL; it needs {need})")
        from ..autoencoder import Autoencoder

        ae = Autoencoder.from_pretrained(autoencoder)
        size = lat.get("image_size", cfg.img_size * ae.factor)
        if (ae.latent_channels, size) != (cfg.in_chans, cfg.img_size * ae.factor):
            raise WeightsError(f"{where}: the model takes {cfg.in_chans}x{cfg.img_size}x{cfg.img_size} latents of "
                               f"{size}x{size} images; autoencoder {autoencoder} gives {ae.latent_channels} channels "
                               f"at 1/{ae.factor} of the side")
        return {"kind": "latent", "autoencoder": ae.ref, "autoencoder_hash": ae.hash, "data_size": size,
                "channels": ae.channels}
    if cfg.in_chans not in (1, 3):
        raise WeightsError(f"{where}: a pixel model needs 1 or 3 channels, got in_chans {cfg.in_chans} (a latent "
                           "model needs \"latent\")")
    size = rel.get("image_size", cfg.img_size)
    try:
        return PixelCodec(data_size=size, model_size=cfg.img_size, channels=cfg.in_chans).to_dict()
    except (TypeError, ValueError) as e:
        raise WeightsError(f"{where}: invalid image_size ({e})") from None


def _few(keys) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")


def read_uvit_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict in a U-ViT checkpoint and where it was in the file (``""``: the file is one).

    ``.pth`` and the like are read with ``torch.load(weights_only=True)`` only; a ``.safetensors`` file is read as
    such; a training-checkpoint directory of theirs means its ``nnet_ema.pth``."""
    path = Path(path)
    if path.is_dir() and (path / "nnet_ema.pth").is_file():
        path = path / "nnet_ema.pth"
    if path.is_dir():
        raise WeightsError(f"{path}: a directory without nnet_ema.pth; give the checkpoint file")
    if not path.is_file():
        raise WeightsError(f"{path}: no such checkpoint file")
    if path.suffix.lower() == ".safetensors":
        obj = load_state_dict(path)
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.startswith("Weights only")]
            code = next((ln for ln in lines if "global" in ln.lower()), None)  # a class or function to import
            if code is not None:
                raise WeightsError(f"{path}: refusing a checkpoint that needs code to unpickle "
                                   f"({code[:200]})") from None
            why = next((ln for ln in lines if "unsupported" in ln.lower()), lines[0] if lines else "")
            raise WeightsError(f"{path}: not a checkpoint that torch.load(weights_only=True) can read "
                               f"({why[:200]})") from None
        except (RuntimeError, EOFError, OSError, ValueError, AttributeError, KeyError, IndexError) as e:
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise WeightsError(f"{path}: not a readable torch checkpoint ({first})") from None
    entry = ""
    if isinstance(obj, Mapping) and not all(torch.is_tensor(v) for v in obj.values()):
        entry = next((k for k in _NESTED if isinstance(obj.get(k), Mapping)), "")
        if not entry:
            raise WeightsError(f"{path}: not a state dict and none of {', '.join(_NESTED)} holds one (top-level "
                               f"keys: {_few(map(str, obj))})")
        obj = obj[entry]
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsError(f"{path}{f' [{entry!r}]' if entry else ''}: expected a state dict (name -> tensor), "
                           f"got {type(obj).__name__}{' (empty)' if isinstance(obj, Mapping) else ''}")
    bad = sorted(str(k) for k, v in obj.items() if not isinstance(k, str) or not torch.is_tensor(v))
    if bad:
        raise WeightsError(f"{path}: entries that are not tensors: {_few(bad)}")
    state = dict(obj)
    for prefix in ("module.", "_orig_mod."):  # DistributedDataParallel, torch.compile
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state, entry


def _checkpoint_state(checkpoint: Path) -> tuple[dict[str, torch.Tensor], str, Path]:
    """The state dict, where it was in the file, and the file itself (a training directory's nnet_ema.pth)."""
    state, entry = read_uvit_checkpoint(checkpoint)
    return state, entry, checkpoint / "nnet_ema.pth" if checkpoint.is_dir() else checkpoint


def _record(src: Path, entry: str, state: dict, name: str, rel: dict, config, schedule: NoiseSchedule,
            command: str | None) -> dict:
    """training.json: where the weights came from (file sha256, entry, dtypes, config) and how to use them."""
    dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in state.values()})
    record = {"imported_from": {"file": src.name, "sha256": file_sha256(src), "entry": entry or None,
                                "dtypes": dtypes, "config": name, "config_from": rel.get("from", str(config)),
                                "source": SOURCE},
              "schedule_note": _SCHEDULE_NOTES.get(schedule.name), "command": command}
    if rel.get("guidance") is not None:
        record["guidance"] = rel["guidance"]  # their sample.scale + 1
    return record


def import_uvit(checkpoint: str | os.PathLike, config: str | os.PathLike, out: str | os.PathLike,
                command: str | None = None, autoencoder: str | os.PathLike | None = None) -> UViTImport:
    """Check everything, then write the bundle into ``out`` (new, or an empty directory) atomically."""
    out, checkpoint = Path(out), Path(checkpoint)
    _check_out(out)
    name, rel = resolve_uvit_config(config)
    where = f"config {name}"
    cfg = _model_config(rel, where)
    schedule = _schedule(rel, where)
    if autoencoder is not None and rel.get("latent") is None:
        raise WeightsError(f"{where} is a pixel model: it takes no --autoencoder")
    codec = _codec(rel, cfg, where, autoencoder)
    state, entry, src = _checkpoint_state(checkpoint)
    net = _load_meta(UViT, cfg, state, f"{src}{f' [{entry!r}]' if entry else ''} (config {name})")
    record = _record(src, entry, state, name, rel, config, schedule, command)
    if rel.get("latent") is not None:
        record["autoencoder"] = {"needs": rel["latent"].get("autoencoder"), "given": codec["autoencoder"],
                                 "hash": codec["autoencoder_hash"]}
    _write_bundle(out, net.state_dict(), {"kind": KIND, "model": cfg.to_dict(), "schedule": schedule.to_dict(),
                                          "codec": codec}, record)
    return UViTImport(out=out, config_name=name, model=cfg, schedule=schedule, codec=codec, entry=entry,
                      sha256=record["imported_from"]["sha256"], latent=rel.get("latent") is not None)


def import_uvit_t2i(checkpoint: str | os.PathLike, config: str | os.PathLike, out: str | os.PathLike,
                    command: str | None = None) -> UViTT2IImport:
    """Import their text-to-image U-ViT (``mscoco_uvit_small``, ``mscoco_uvit_small_deep`` or a JSON config):
    check everything, then write ``model.safetensors``, ``config.json`` (kind ``cdm-uvit-t2i``: model, schedule,
    ``context`` and ``latent`` as described by the config) and ``training.json`` into ``out`` atomically."""
    out, checkpoint = Path(out), Path(checkpoint)
    _check_out(out)
    name, rel = resolve_uvit_t2i_config(config)
    where = f"config {name}"
    cfg = _t2i_model_config(rel, where)
    schedule = _schedule(rel, where)
    bad = [k for k in ("context", "latent") if rel.get(k) is not None and not isinstance(rel[k], dict)]
    if bad:
        raise WeightsError(f"{where}: \"{bad[0]}\" must be an object (a description of what the model needs)")
    state, entry, src = _checkpoint_state(checkpoint)
    net = _load_meta(UViTT2I, cfg, state, f"{src}{f' [{entry!r}]' if entry else ''} (config {name})")
    record = _record(src, entry, state, name, rel, config, schedule, command)
    _write_bundle(out, net.state_dict(), {"kind": T2I_KIND, "model": cfg.to_dict(), "schedule": schedule.to_dict(),
                                          "context": rel.get("context"), "latent": rel.get("latent")}, record)
    return UViTT2IImport(out=out, config_name=name, model=cfg, schedule=schedule, entry=entry,
                         sha256=record["imported_from"]["sha256"])


def load_uvit_t2i(path: str | os.PathLike) -> tuple[UViTT2I, dict]:
    """An imported text-to-image U-ViT (a directory written by :func:`import_uvit_t2i`), frozen in eval mode, and
    its ``config.json``."""
    path = Path(path)
    conf = read_json(path / CONFIG_NAME)
    if conf.get("kind") != T2I_KIND:
        raise WeightsError(f"{path / CONFIG_NAME}: kind {conf.get('kind')!r}, expected {T2I_KIND!r}")
    try:
        cfg = UViTT2IConfig.from_dict(conf["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise WeightsError(f"{path / CONFIG_NAME}: invalid model config ({e})") from None
    net = _load_meta(UViTT2I, cfg, load_state_dict(path / WEIGHTS_NAME), path / WEIGHTS_NAME)
    return net.eval().requires_grad_(False), conf
