"""`cdm import-uvit`: baofff/U-ViT checkpoints (made here with torch.save, nothing downloaded) become backbones
that give bit-identical outputs; pickles that need code, mismatched weights and occupied --out are refused
before anything is written; unconditional and RGB backbones sample through `cdm sample`."""

import hashlib
import inspect
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cdm.backbone import UVIT_RELEASES, Backbone, PixelCodec, UViT, UViTConfig
from cdm.backbone.convert import resolve_uvit_config
from cdm.cli.main import app, import_uvit_cmd
from cdm.errors import WeightsError
from cdm.generation import generate

runner = CliRunner()

# tiny configs in their config.nnet form (their constructor defaults apply: in_chans 3, conv, skip ...)
UNCOND_RGB = {"nnet": {"name": "uvit", "img_size": 32, "patch_size": 8, "embed_dim": 16, "depth": 2, "num_heads": 2,
                       "mlp_ratio": 2, "num_classes": -1}, "schedule": "vpsde"}
COND_NULL = {"nnet": {"img_size": 8, "patch_size": 2, "in_chans": 1, "embed_dim": 16, "depth": 3, "num_heads": 4,
                      "qkv_bias": True, "mlp_time_embed": True, "num_classes": 5, "conv": False},
             "schedule": "ddpm_linear", "null_class": 4, "image_size": 16}


def _config(rel: dict) -> UViTConfig:
    kw = {"in_chans": 3, "mlp_time_embed": False,
          **{k: v for k, v in rel["nnet"].items() if k not in ("name", "use_checkpoint")}}
    return UViTConfig(**kw, null_class=rel.get("null_class"))


def _reference(rel: dict, seed: int = 0) -> UViT:
    """A U-ViT with every tensor random (biases and norms too), under the reference parameter names."""
    torch.manual_seed(seed)
    net = UViT(_config(rel)).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return net


def _write(tmp: Path, rel: dict, payload=None, seed: int = 0) -> tuple[Path, Path, UViT]:
    """(checkpoint .pth, config .json, the reference net) in tmp."""
    net = _reference(rel, seed)
    ckpt, cfg = tmp / "uvit.pth", tmp / "tiny.json"
    torch.save(net.state_dict() if payload is None else payload(net.state_dict()), ckpt)
    cfg.write_text(json.dumps(rel))
    return ckpt, cfg, net


def _import(ckpt, config, out):
    return runner.invoke(app, ["import-uvit", str(ckpt), "--config", str(config), "--out", str(out)])


def _inputs(c: UViTConfig):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, c.in_chans, c.img_size, c.img_size, generator=g)
    t = torch.tensor([0, 411, 999])
    y = torch.tensor([0, 3, c.null_class]) if c.num_classes > 0 else None
    return x, t, y


@pytest.mark.parametrize("rel, payload, entry", [
    (UNCOND_RGB, None, None),
    (COND_NULL, lambda sd: {"nnet_ema": sd, "nnet": {k: v + 1 for k, v in sd.items()}, "step": 7}, "nnet_ema"),
    (UNCOND_RGB, lambda sd: {"state_dict": {f"module.{k}": v.half() for k, v in sd.items()}}, "state_dict"),
], ids=["plain", "nested-ema", "ddp-fp16"])
def test_import_gives_bit_identical_outputs(tmp_path, rel, payload, entry):
    ckpt, cfg, net = _write(tmp_path, rel, payload)
    if payload is not None and entry == "state_dict":  # fp16 in the file: the reference is its float32 value
        net.load_state_dict({k: v.half().float() for k, v in net.state_dict().items()})
    res = _import(ckpt, cfg, tmp_path / "bb")
    assert res.exit_code == 0, res.output
    bb = Backbone.from_pretrained(tmp_path / "bb")
    c = bb.config
    assert c == _config(rel) and bb.schedule.name == rel["schedule"]
    x, t, y = _inputs(c)
    with torch.no_grad():
        assert torch.equal(bb.net(x, t, y), net(x, t, y))
    # sampling the imported backbone is sampling the reference net
    kw = dict(schedule=bb.schedule, codec=bb.codec, steps=3, in_chans=c.in_chans, seed=1)
    kw.update(labels=np.array([0, 2]), null_class=c.null_class, guidance=1.5) if c.num_classes > 0 else kw.update(n=2)
    with torch.no_grad():
        a, _ = generate(bb.eps, **kw)
        b, _ = generate(net, **kw)
    assert np.array_equal(a, b)
    cfg_json = json.loads((tmp_path / "bb" / "config.json").read_text())
    rec = json.loads((tmp_path / "bb" / "training.json").read_text())["imported_from"]
    assert rec["sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest() and rec["config"] == "tiny"
    assert rec["entry"] == entry
    if rel is UNCOND_RGB:
        assert cfg_json["codec"] == {"data_size": 32, "model_size": 32, "channels": 3} and a.shape == (2, 32, 32, 3)
    else:
        assert cfg_json["codec"] == {"data_size": 16, "model_size": 8} and a.shape == (2, 16, 16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bb", "tiny.json", "uvit.pth"]  # no temporary left


def _pwned(path):
    Path(path).write_text("code ran")


class Payload:
    """Unpickling this runs code (what torch.load(weights_only=False) would do)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return _pwned, (self.marker,)


def test_a_checkpoint_that_needs_code_is_refused_and_nothing_is_written(tmp_path):
    marker = tmp_path / "pwned"
    ckpt, cfg, _ = _write(tmp_path, UNCOND_RGB, lambda sd: {"model": sd, "extra": Payload(str(marker))})
    res = _import(ckpt, cfg, tmp_path / "bb")
    assert isinstance(res.exception, WeightsError) and "needs code to unpickle" in str(res.exception)
    assert "_pwned" in str(res.exception) and not marker.exists()
    # the CLI prints one line and exits 2
    proc = subprocess.run([sys.executable, "-m", "cdm", "import-uvit", str(ckpt), "--config", str(cfg),
                           "--out", str(tmp_path / "bb")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "needs code to unpickle" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not marker.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["tiny.json", "uvit.pth"]


def test_a_state_dict_that_does_not_match_the_config_is_refused_naming_keys(tmp_path):
    def edit(sd):
        sd = dict(sd)
        del sd["mid_block.attn.qkv.weight"]
        sd["label_emb.weight"] = torch.zeros(2, 16)
        return sd

    ckpt, cfg, _ = _write(tmp_path, UNCOND_RGB, edit)
    res = _import(ckpt, cfg, tmp_path / "bb")
    msg = str(res.exception)
    assert isinstance(res.exception, WeightsError) and "1 missing (mid_block.attn.qkv.weight)" in msg
    assert "1 unexpected (label_emb.weight)" in msg and not (tmp_path / "bb").exists()
    # the right names under another config: the shapes are named
    wide = {**UNCOND_RGB, "nnet": {**UNCOND_RGB["nnet"], "embed_dim": 32}}
    (tmp_path / "wide.json").write_text(json.dumps(wide))
    ckpt, _, _ = _write(tmp_path, UNCOND_RGB)
    res = _import(ckpt, tmp_path / "wide.json", tmp_path / "bb")
    assert "of the wrong shape" in str(res.exception) and not (tmp_path / "bb").exists()
    # a released config on a tiny checkpoint
    res = _import(ckpt, "cifar10_uvit_small", tmp_path / "bb")
    assert "wrong shape" in str(res.exception) and "config cifar10_uvit_small" in str(res.exception)


def test_bad_out_config_and_files_are_refused_before_writing(tmp_path):
    ckpt, cfg, _ = _write(tmp_path, UNCOND_RGB)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    cut = tmp_path / "cut.pth"
    cut.write_bytes(ckpt.read_bytes()[:2000])
    for args, needle in [
        ((ckpt, cfg, busy), "not an empty directory"),
        ((ckpt, "cifar10", tmp_path / "o"), "not a released U-ViT config"),
        ((ckpt, "mscoco_uvit_small", tmp_path / "o"), "text-to-image"),
        ((tmp_path / "missing.pth", cfg, tmp_path / "o"), "no such checkpoint"),
        ((cfg, cfg, tmp_path / "o"), "torch.load(weights_only=True) can read"),
        ((cut, cfg, tmp_path / "o"), "not a readable torch checkpoint"),
    ]:
        res = _import(*args)
        assert isinstance(res.exception, WeightsError) and needle in str(res.exception), (needle, res.exception)
    for bad, needle in [({"nnet": {"name": "uvit_t2i"}, "schedule": "vpsde"}, "uvit_t2i"),
                        ({"nnet": {"img_size": 8, "qk_scale": 0.1}, "schedule": "vpsde"}, "qk_scale"),
                        ({"nnet": {"img_size": 8, "patch_size": 2, "in_chans": 4}, "schedule": "vpsde"}, "latent"),
                        ({"nnet": {"img_size": 8, "depthh": 2}, "schedule": "vpsde"}, "depthh"),
                        ({"nnet": {"img_size": 8, "patch_size": 2}, "schedule": "sigmoid"}, "unknown noise schedule"),
                        ({"nnet": {"img_size": 8, "patch_size": 2}, "schedule": "vpsde", "image_size": 12},
                         "invalid image_size"),
                        ({"nnet": {}, "schedule": "vpsde", "extra": 1}, "unknown fields extra")]:
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        res = _import(ckpt, tmp_path / "bad.json", tmp_path / "o")
        assert isinstance(res.exception, WeightsError) and needle in str(res.exception), (needle, res.exception)
    assert (busy / "keep.txt").read_text() == "mine" and not (tmp_path / "o").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    run = tmp_path / "500000.ckpt"  # their training-checkpoint directory: its nnet_ema.pth is the model
    run.mkdir()
    (run / "nnet_ema.pth").write_bytes(ckpt.read_bytes())
    assert _import(run, cfg, empty).exit_code == 0 and (empty / "model.safetensors").is_file()
    assert json.loads((empty / "training.json").read_text())["imported_from"]["file"] == "nnet_ema.pth"


def test_unconditional_backbone_samples_through_cdm_sample(tmp_path):
    ckpt, cfg, _ = _write(tmp_path, UNCOND_RGB)
    assert _import(ckpt, cfg, tmp_path / "bb").exit_code == 0
    res = runner.invoke(app, ["sample", "--backbone", str(tmp_path / "bb"), "--n", "2", "--steps", "2",
                              "--out", str(tmp_path / "s")])
    assert res.exit_code == 0, res.output
    with np.load(tmp_path / "s" / "samples.npz") as f:
        assert f["images"].shape == (2, 32, 32, 3) and f["images"].dtype == np.uint8 and "labels" not in f
    # without --n: --per-class images in all; --classes makes no sense
    res = runner.invoke(app, ["sample", "--backbone", str(tmp_path / "bb"), "--per-class", "3", "--steps", "1",
                              "--out", str(tmp_path / "s3")])
    assert res.exit_code == 0, res.output
    with np.load(tmp_path / "s3" / "samples.npz") as f:
        assert f["images"].shape == (3, 32, 32, 3)
    res = runner.invoke(app, ["sample", "--backbone", str(tmp_path / "bb"), "--classes", "1", "--out",
                              str(tmp_path / "s4")])
    assert "unconditional" in str(res.exception) and not (tmp_path / "s4").exists()


def test_latent_models_import_with_their_autoencoder_and_sample(tmp_path):
    """An SD-style AutoencoderKL (f8, 4 latent channels, random weights, saved with diffusers' save_pretrained)
    plugs in: the imagenet256-style latent U-ViT imports with --autoencoder and samples end to end."""
    from diffusers import AutoencoderKL

    name, rel = resolve_uvit_config("imagenet256_uvit_huge")
    assert rel["nnet"]["conv"] is False and rel["null_class"] == 1000 and rel["schedule"] == "linear"
    torch.manual_seed(0)
    sd_like = AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=4,
                            scaling_factor=0.18215)
    sd_like.save_pretrained(tmp_path / "vae")  # diffusers' own writer: config.json + diffusion_pytorch_model...
    tiny = {"nnet": {"img_size": 4, "patch_size": 2, "in_chans": 4, "embed_dim": 16, "depth": 1, "num_heads": 2,
                     "num_classes": 3}, "schedule": "vpsde", "null_class": 2,
            "latent": {**rel["latent"], "image_size": 32}}
    ckpt, cfg, net = _write(tmp_path, tiny)
    res = _import(ckpt, cfg, tmp_path / "nope")
    assert "--autoencoder" in str(res.exception) and not (tmp_path / "nope").exists()
    res = runner.invoke(app, ["import-uvit", str(ckpt), "--config", str(cfg), "--out", str(tmp_path / "bb"),
                              "--autoencoder", str(tmp_path / "vae")])
    assert res.exit_code == 0, res.output
    codec = json.loads((tmp_path / "bb" / "config.json").read_text())["codec"]
    assert codec["kind"] == "latent" and codec["data_size"] == 32 and len(codec["autoencoder_hash"]) == 64
    bb = Backbone.from_pretrained(tmp_path / "bb")
    assert bb.latent and bb.codec.autoencoder.scale == pytest.approx(0.18215) and bb.codec.model_size == 4
    res = runner.invoke(app, ["sample", "--backbone", str(tmp_path / "bb"), "--per-class", "1", "--steps", "2",
                              "--out", str(tmp_path / "s")])
    assert res.exit_code == 0, res.output
    with np.load(tmp_path / "s" / "samples.npz") as f:
        assert f["images"].shape == (2, 32, 32, 3) and f["images"].dtype == np.uint8
    # another autoencoder than the recorded one is refused, in one line
    torch.manual_seed(1)
    other = AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                          up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=4)
    other.save_pretrained(tmp_path / "vae2")
    with pytest.raises(WeightsError, match="is not the one this backbone was trained with"):
        Backbone.from_pretrained(tmp_path / "bb", autoencoder=tmp_path / "vae2")
    # a pixel model takes no autoencoder; pickled-only autoencoder folders are refused
    (tmp_path / "vae3").mkdir()
    (tmp_path / "vae3" / "config.json").write_text((tmp_path / "vae" / "config.json").read_text())
    (tmp_path / "vae3" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(WeightsError, match="pickles, which cdm never loads"):
        Backbone.from_pretrained(tmp_path / "bb", autoencoder=tmp_path / "vae3")


def test_released_configs_are_their_configs():
    """Spot checks against baofff/U-ViT configs/*.py (e.g. depth 12 = 6 in-blocks, a mid block, 6 out-blocks)."""
    cifar = _config(UVIT_RELEASES["cifar10_uvit_small"])
    assert (cifar.img_size, cifar.patch_size, cifar.in_chans, cifar.embed_dim, cifar.depth, cifar.num_heads) == \
        (32, 2, 3, 512, 12, 8) and cifar.n_blocks == 13 and cifar.num_classes == -1 and not cifar.mlp_time_embed
    i64 = _config(UVIT_RELEASES["imagenet64_uvit_large"])
    assert (i64.embed_dim, i64.depth, i64.num_heads, i64.num_classes, i64.null_class) == (1024, 20, 16, 1000, None)
    assert {k for k, r in UVIT_RELEASES.items() if r.get("latent")} == {
        "imagenet256_uvit_large", "imagenet256_uvit_huge", "imagenet512_uvit_large", "imagenet512_uvit_huge"}
    help_text = inspect.signature(import_uvit_cmd).parameters["config"].default.help
    assert all(name in help_text for name in UVIT_RELEASES)  # `cdm import-uvit --help` lists every one
    assert {UVIT_RELEASES[k]["schedule"] for k in ("cifar10_uvit_small", "celeba64_uvit_small", "imagenet64_uvit_mid",
                                                   "imagenet256_uvit_large", "imagenet512_uvit_large")} == {"vpsde"}


def test_unconditional_config_needs_no_null_class():
    c = UViTConfig(num_classes=-1)
    assert c.null_class is None and UViTConfig.from_dict({**c.to_dict(), "null_class": 10}) == c
    net = UViT(UViTConfig(img_size=4, patch_size=2, embed_dim=8, depth=1, num_heads=2, num_classes=-1))
    assert not hasattr(net, "label_emb") and net(torch.randn(2, 1, 4, 4), torch.tensor([1, 2])).shape == (2, 1, 4, 4)
    with pytest.raises(ValueError, match="null_class 11 outside"):
        UViTConfig(num_classes=11, null_class=11)


def test_pixel_codec_rgb_and_grey_unchanged():
    grey = PixelCodec(28, 14)
    assert grey.to_dict() == {"data_size": 28, "model_size": 14}  # configs as before
    img = np.random.default_rng(0).integers(0, 256, (2, 28, 28), dtype=np.uint8)
    x = grey.encode(img)
    assert x.shape == (2, 1, 14, 14) and grey.decode(x).shape == (2, 28, 28)
    rgb = PixelCodec(32, 32, channels=3)
    img = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    x = rgb.encode(img)
    assert x.shape == (2, 3, 32, 32) and torch.equal(x[:, 1], torch.as_tensor(img[..., 1]).float() / 127.5 - 1)
    assert np.array_equal(rgb.decode(x), img)  # exact round trip at model size
    with pytest.raises(ValueError, match="channels must be 1"):
        PixelCodec(32, 32, channels=4)
    with pytest.raises(Exception, match=r"expected uint8 images \(N, 32, 32, 3\)"):
        rgb.encode(img[..., 0])


@pytest.mark.slow
def test_cifar10_uvit_small_imports_and_samples(tmp_path):
    """The issue's example at full size (44M parameters): import, then `cdm sample --n 2` gives 2 x 32 x 32 x 3."""
    c = _config(UVIT_RELEASES["cifar10_uvit_small"])
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in UViT(c).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    torch.save({k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}, tmp_path / "x.pth")
    res = _import(tmp_path / "x.pth", "cifar10_uvit_small", tmp_path / "D")
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["sample", "--backbone", str(tmp_path / "D"), "--n", "2", "--steps", "1",
                              "--out", str(tmp_path / "s")])
    assert res.exit_code == 0, res.output
    with np.load(tmp_path / "s" / "samples.npz") as f:
        assert f["images"].shape == (2, 32, 32, 3)
