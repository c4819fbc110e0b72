"""The text-to-image U-ViT: baofff/U-ViT libs/uvit_t2i.py state-dict compatibility (names, shapes, outputs), deep
prompts, input errors, and the import of their MS-COCO checkpoints (.pth -> safetensors + config.json)."""

import json

import pytest
import torch
import torch.nn.functional as F

from cdm.backbone.convert import (
    UVIT_T2I_RELEASES,
    _t2i_model_config,
    import_uvit,
    import_uvit_t2i,
    load_uvit_t2i,
)
from cdm.backbone.uvit_t2i import UViTT2I, UViTT2IConfig
from cdm.errors import WeightsError
from uvit_reference import ref_image, ref_patches, ref_time, ref_trunk

# their libs/uvit_t2i.py UViT constructor defaults, and configs/mscoco_uvit_small.py's config.nnet (the Deep model:
# the same with --config.nnet.depth=16, their README)
REF_DEFAULTS = dict(img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
                    qkv_bias=False, mlp_time_embed=False, clip_dim=768, num_clip_token=77, conv=True, skip=True)
MSCOCO_SMALL = dict(img_size=32, in_chans=4, patch_size=2, embed_dim=512, depth=12, num_heads=8, mlp_ratio=4,
                    qkv_bias=False, mlp_time_embed=False, clip_dim=768, num_clip_token=77)
TINY = dict(img_size=8, patch_size=2, in_chans=4, embed_dim=32, depth=4, num_heads=4, clip_dim=12, num_clip_token=5)
TINY_OPTIONS = {  # the reference's switches: conv, skip, mlp_time_embed, qkv_bias; odd depth too
    "defaults": {},
    "no_conv_no_skip": dict(conv=False, skip=False),
    "mlp_time_qkv_bias_depth5": dict(mlp_time_embed=True, qkv_bias=True, depth=5),
}


def ref(nnet: dict) -> dict:
    """Their constructor's arguments for their ``config.nnet`` (whose ``name`` picks the class)."""
    return {**REF_DEFAULTS, **{k: v for k, v in nnet.items() if k != "name"}}


def config(nnet: dict) -> UViTT2IConfig:
    return UViTT2IConfig(**ref(nnet))


def reference_keys(nnet: dict) -> dict[str, tuple[int, ...]]:
    """Names and shapes of their libs/uvit_t2i.py UViT(**nnet) state dict, written out from its constructor."""
    c = ref(nnet)
    d, p, C = c["embed_dim"], c["patch_size"], c["in_chans"]
    h = int(d * c["mlp_ratio"])
    keys = {"pos_embed": (1, 1 + c["num_clip_token"] + (c["img_size"] // p) ** 2, d),
            "patch_embed.proj.weight": (d, C, p, p), "patch_embed.proj.bias": (d,),
            "context_embed.weight": (d, c["clip_dim"]), "context_embed.bias": (d,)}
    if c["mlp_time_embed"]:
        keys.update({"time_embed.0.weight": (4 * d, d), "time_embed.0.bias": (4 * d,),
                     "time_embed.2.weight": (d, 4 * d), "time_embed.2.bias": (d,)})

    def block(prefix, skip):
        b = {f"{prefix}.norm1.weight": (d,), f"{prefix}.norm1.bias": (d,), f"{prefix}.attn.qkv.weight": (3 * d, d),
             f"{prefix}.attn.proj.weight": (d, d), f"{prefix}.attn.proj.bias": (d,), f"{prefix}.norm2.weight": (d,),
             f"{prefix}.norm2.bias": (d,), f"{prefix}.mlp.fc1.weight": (h, d), f"{prefix}.mlp.fc1.bias": (h,),
             f"{prefix}.mlp.fc2.weight": (d, h), f"{prefix}.mlp.fc2.bias": (d,)}
        if c["qkv_bias"]:
            b[f"{prefix}.attn.qkv.bias"] = (3 * d,)
        if skip:
            b.update({f"{prefix}.skip_linear.weight": (d, 2 * d), f"{prefix}.skip_linear.bias": (d,)})
        return b

    for i in range(c["depth"] // 2):
        keys.update(block(f"in_blocks.{i}", False))
        keys.update(block(f"out_blocks.{i}", c["skip"]))
    keys.update(block("mid_block", False))
    keys.update({"norm.weight": (d,), "norm.bias": (d,), "decoder_pred.weight": (p * p * C, d),
                 "decoder_pred.bias": (p * p * C,)})
    if c["conv"]:
        keys.update({"final_layer.weight": (C, C, 3, 3), "final_layer.bias": (C,)})
    return keys


def reference_forward(sd: dict, nnet: dict, x, t, context):
    """An independent functional forward following their UViT.forward step by step: [time, context, patches] +
    pos_embed, the trunk (tests/uvit_reference.py: explicit softmax attention, long skips, norm, decoder_pred),
    the extras dropped, (p1 p2 C) unpatchify by hand, the optional 3x3 conv."""
    c = ref(nnet)
    d, p, n_ctx = c["embed_dim"], c["patch_size"], c["num_clip_token"]
    tok = ref_patches(sd, x, p)
    ctx = F.linear(context, sd["context_embed.weight"], sd["context_embed.bias"])
    h = torch.cat([ref_time(sd, t, d, c["mlp_time_embed"])[:, None], ctx, tok], 1) + sd["pos_embed"]
    h = ref_trunk(sd, h, c["depth"], d, c["num_heads"])
    assert h.shape[1] == 1 + n_ctx + tok.shape[1]
    return ref_image(sd, h[:, 1 + n_ctx:], c["img_size"], p, c["in_chans"])


def published(nnet: dict, seed: int = 1) -> dict[str, torch.Tensor]:
    """A "published" checkpoint: random weights under the reference names."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * 0.1 for k, s in reference_keys(nnet).items()}


def inputs(nnet: dict, batch: int = 3):
    c = ref(nnet)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(batch, c["in_chans"], c["img_size"], c["img_size"], generator=g)
    context = torch.randn(batch, c["num_clip_token"], c["clip_dim"], generator=g)
    return x, torch.tensor([1.0, 417.5, 1000.0])[:batch], context


def shapes(net) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


@pytest.mark.parametrize("options", TINY_OPTIONS.values(), ids=TINY_OPTIONS.keys())
def test_tiny_state_dict_names_and_shapes_are_the_references(options):
    nnet = {**TINY, **options}
    assert shapes(UViTT2I(config(nnet))) == reference_keys(nnet)


@pytest.mark.parametrize("name,depth,millions", [("mscoco_uvit_small", 12, 45), ("mscoco_uvit_small_deep", 16, 58)])
def test_mscoco_release_configs_have_the_references_shapes(name, depth, millions):
    nnet = {**MSCOCO_SMALL, "depth": depth}
    cfg = _t2i_model_config(UVIT_T2I_RELEASES[name], name)
    assert cfg == config(nnet) and cfg.extras == 78 and cfg.num_patches == 256
    with torch.device("meta"):
        net = UViTT2I(cfg)
    assert shapes(net) == reference_keys(nnet)
    assert round(sum(p.numel() for p in net.parameters()) / 1e6) == millions  # the paper's 45M / 58M


@pytest.mark.parametrize("options", TINY_OPTIONS.values(), ids=TINY_OPTIONS.keys())
def test_published_checkpoint_loads_strict_and_gives_the_references_outputs(options, tmp_path):
    from safetensors.torch import save_file

    from cdm.io import load_state_dict

    nnet = {**TINY, **options}
    ckpt = published(nnet)
    save_file(ckpt, str(tmp_path / "t2i.safetensors"))
    net = UViTT2I(config(nnet))
    net.load_state_dict(load_state_dict(tmp_path / "t2i.safetensors"), strict=True)
    x, t, context = inputs(nnet)
    with torch.no_grad():
        out = net(x, t, context)
        torch.testing.assert_close(out, reference_forward(ckpt, nnet, x, t, context), atol=1e-5, rtol=1e-4)
        # one context shared by the batch (e.g. the empty caption of classifier-free guidance) = it repeated
        shared = net(x, t, context[:1])
        torch.testing.assert_close(shared, net(x, t, context[:1].expand(3, -1, -1)))
        # a 0-dim timestep is every sample's
        torch.testing.assert_close(net(x, torch.tensor(417.5), context)[1], out[1], atol=1e-6, rtol=0)


def test_deep_prompts_same_semantics_as_uvit():
    c = config(TINY)
    torch.manual_seed(0)
    net = UViTT2I(c).eval()
    x, t, context = inputs(TINY)
    with torch.no_grad():
        plain = net(x, t, context)
        empty = net(x, t, context, prompts=torch.zeros(1, c.n_blocks, 0, c.embed_dim))
        prompts = torch.randn(1, c.n_blocks, 3, c.embed_dim)
        joined = net(x, t, context, prompts=prompts)
        gated_off = net(x, t, context, prompts=prompts, prompt_gate=torch.zeros(1, c.n_blocks, c.num_heads))
        gated_on = net(x, t, context, prompts=prompts, prompt_gate=torch.ones(3, c.n_blocks, c.num_heads))
    torch.testing.assert_close(empty, plain, atol=1e-6, rtol=0)  # P = 0 is the plain network
    torch.testing.assert_close(gated_off, plain, atol=1e-6, rtol=0)  # a zero gate too
    assert not torch.allclose(joined, plain, atol=1e-4) and not torch.allclose(gated_on, plain, atol=1e-4)
    grads = torch.zeros(1, c.n_blocks, 2, c.embed_dim, requires_grad=True)
    net.requires_grad_(False)(x, t, context, prompts=grads).pow(2).sum().backward()
    assert (grads.grad.abs().sum(dim=(0, 2, 3)) > 0).all()  # every block's prompt reaches the output
    with pytest.raises(ValueError, match="prompts must be"):
        net(x, t, context, prompts=torch.zeros(1, c.n_blocks + 1, 2, c.embed_dim))
    with pytest.raises(ValueError, match="prompt_gate must be"):
        net(x, t, context, prompt_gate=torch.zeros(1, c.n_blocks, c.num_heads))


@pytest.mark.parametrize("bad", [(3, 4, 12), (3, 5, 13), (2, 5, 12), (5, 12), (3, 1, 5, 12)])
def test_wrong_context_shape_is_a_short_value_error(bad):
    net = UViTT2I(config(TINY))
    x, t, _ = inputs(TINY)
    with pytest.raises(ValueError, match=r"context must be \(B or 1, 5, 12\) text tokens, got") as e:
        net(x, t, torch.zeros(bad))
    assert len(str(e.value)) < 120
    with pytest.raises(ValueError, match="context must be"):
        net(x, t, None)
    with pytest.raises(ValueError, match=r"expected input \(B, 4, 8, 8\)"):
        net(torch.zeros(3, 3, 8, 8), t, torch.zeros(3, 5, 12))


@pytest.mark.parametrize("options", [{}, dict(conv=False, skip=False, mlp_time_embed=True)], ids=["default", "options"])
def test_pth_checkpoint_imports_reloads_strict_and_gives_identical_outputs(options, tmp_path):
    nnet = {"name": "uvit_t2i", **TINY, **options}
    ckpt = published(nnet, seed=7)
    torch.save({"nnet_ema": ckpt} if options else ckpt, tmp_path / "mscoco_tiny.pth")
    (tmp_path / "tiny.json").write_text(json.dumps({"nnet": nnet, "schedule": "linear", "guidance": 2.0,
                                                    "context": {"encoder": "random"}}))
    r = import_uvit_t2i(tmp_path / "mscoco_tiny.pth", tmp_path / "tiny.json", tmp_path / "out", command="test")
    assert r.model == config(nnet) and r.schedule.name == "linear" and r.entry == ("nnet_ema" if options else "")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors",
                                                                    "training.json"]
    net, conf = load_uvit_t2i(tmp_path / "out")
    assert conf["kind"] == "cdm-uvit-t2i" and conf["context"] == {"encoder": "random"} and conf["latent"] is None
    record = json.loads((tmp_path / "out" / "training.json").read_text())
    assert record["imported_from"]["sha256"] == r.sha256 and record["guidance"] == 2.0
    direct = UViTT2I(config(nnet))
    direct.load_state_dict(ckpt, strict=True)
    x, t, context = inputs(nnet)
    with torch.no_grad():
        out = net(x, t, context)
        assert torch.equal(out, direct(x, t, context))
        torch.testing.assert_close(out, reference_forward(ckpt, nnet, x, t, context), atol=1e-5, rtol=1e-4)


def test_the_cli_imports_a_t2i_checkpoint(tmp_path):
    from typer.testing import CliRunner

    from cdm.cli.main import app

    nnet = {"name": "uvit_t2i", **TINY}
    torch.save(published(nnet, seed=3), tmp_path / "t.pth")
    (tmp_path / "t.json").write_text(json.dumps({"nnet": nnet, "schedule": "linear"}))
    res = CliRunner().invoke(app, ["import-uvit-t2i", str(tmp_path / "t.pth"), "--config", str(tmp_path / "t.json"),
                                   "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert "load it with cdm.backbone.load_uvit_t2i" in res.output
    assert load_uvit_t2i(tmp_path / "out")[1]["kind"] == "cdm-uvit-t2i"
    res = CliRunner().invoke(app, ["import-uvit", str(tmp_path / "t.pth"), "--config", "mscoco_uvit_small",
                                   "--out", str(tmp_path / "o2")])
    assert res.exit_code != 0 and "cdm import-uvit-t2i" in str(res.exception)


def test_named_configs_are_checked_against_the_checkpoint(tmp_path):
    # mscoco_uvit_small's shapes at no cost (zero-stride tensors), imported as the Deep model: refused, shortly
    # (2 more in-blocks of 11 tensors, 2 more out-blocks of 13)
    small = {k: torch.zeros(1).expand(s) for k, s in reference_keys(MSCOCO_SMALL).items()}
    torch.save(small, tmp_path / "mscoco_uvit_small.pth")
    with pytest.raises(WeightsError, match=r"do not match the config: 48 missing \(in_blocks\.6\.") as e:
        import_uvit_t2i(tmp_path / "mscoco_uvit_small.pth", "mscoco_uvit_small_deep", tmp_path / "o")
    assert len(str(e.value)) < 400 and not (tmp_path / "o").exists()
    torch.save(published(TINY), tmp_path / "tiny.pth")
    with pytest.raises(WeightsError, match="wrong shape"):
        import_uvit_t2i(tmp_path / "tiny.pth", "mscoco_uvit_small", tmp_path / "o")
    with pytest.raises(WeightsError, match="not a released text-to-image U-ViT config"):
        import_uvit_t2i(tmp_path / "tiny.pth", "cifar10_uvit_small", tmp_path / "o")
    with pytest.raises(WeightsError, match="import it with `cdm import-uvit-t2i`"):  # and the other way round
        import_uvit(tmp_path / "tiny.pth", "mscoco_uvit_small", tmp_path / "o")
    (tmp_path / "label.json").write_text(json.dumps({"nnet": {"name": "uvit"}, "schedule": "linear"}))
    with pytest.raises(WeightsError, match="'uvit' is not 'uvit_t2i': import it with `cdm import-uvit`"):
        import_uvit_t2i(tmp_path / "tiny.pth", tmp_path / "label.json", tmp_path / "o")
    (tmp_path / "extra.json").write_text(json.dumps({"nnet": {"name": "uvit_t2i"}, "schedule": "linear",
                                                     "null_class": 0}))
    with pytest.raises(WeightsError, match="unknown fields null_class"):
        import_uvit_t2i(tmp_path / "tiny.pth", tmp_path / "extra.json", tmp_path / "o")
