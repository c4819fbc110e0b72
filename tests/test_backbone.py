"""The U-ViT: baofff/U-ViT state-dict compatibility (names, shapes, outputs), deep prompts, I/O errors."""

import pickle

import pytest
import torch

from cdm.backbone import Backbone, UViT, UViTConfig, patchify, unpatchify
from cdm.errors import WeightsError
from uvit_reference import ref_image, ref_patches, ref_time, ref_trunk

# cifar10_uvit_small (img 32, patch 2, dim 512, depth 12, 8 heads, unconditional) and a small
# class-conditional one with an MLP time embedding (ImageNet-style null class = last row).
CIFAR10_SMALL = UViTConfig(img_size=32, patch_size=2, in_chans=3, embed_dim=512, depth=12, num_heads=8,
                           mlp_time_embed=False, num_classes=-1, null_class=None)
SMALL_COND = UViTConfig(img_size=8, patch_size=2, in_chans=3, embed_dim=64, depth=5, num_heads=4,
                        mlp_time_embed=True, num_classes=11, null_class=10)


def reference_keys(c: UViTConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of baofff/U-ViT's UViT state dict, written out from its constructor."""
    d, p, C = c.embed_dim, c.patch_size, c.in_chans
    h = int(d * c.mlp_ratio)
    extras = 2 if c.num_classes > 0 else 1
    keys = {"pos_embed": (1, extras + (c.img_size // p) ** 2, d),
            "patch_embed.proj.weight": (d, C, p, p), "patch_embed.proj.bias": (d,)}
    if c.mlp_time_embed:
        keys.update({"time_embed.0.weight": (4 * d, d), "time_embed.0.bias": (4 * d,),
                     "time_embed.2.weight": (d, 4 * d), "time_embed.2.bias": (d,)})
    if c.num_classes > 0:
        keys["label_emb.weight"] = (c.num_classes, d)

    def block(prefix, skip):
        b = {f"{prefix}.norm1.weight": (d,), f"{prefix}.norm1.bias": (d,), f"{prefix}.attn.qkv.weight": (3 * d, d),
             f"{prefix}.attn.proj.weight": (d, d), f"{prefix}.attn.proj.bias": (d,), f"{prefix}.norm2.weight": (d,),
             f"{prefix}.norm2.bias": (d,), f"{prefix}.mlp.fc1.weight": (h, d), f"{prefix}.mlp.fc1.bias": (h,),
             f"{prefix}.mlp.fc2.weight": (d, h), f"{prefix}.mlp.fc2.bias": (d,)}
        if skip:
            b.update({f"{prefix}.skip_linear.weight": (d, 2 * d), f"{prefix}.skip_linear.bias": (d,)})
        return b

    for i in range(c.depth // 2):
        keys.update(block(f"in_blocks.{i}", False))
        keys.update(block(f"out_blocks.{i}", True))
    keys.update(block("mid_block", False))
    keys.update({"norm.weight": (d,), "norm.bias": (d,), "decoder_pred.weight": (p * p * C, d),
                 "decoder_pred.bias": (p * p * C,), "final_layer.weight": (C, C, 3, 3), "final_layer.bias": (C,)})
    return keys


def reference_forward(sd: dict, c: UViTConfig, x, t, y=None):
    """An independent functional forward following the reference code step by step (tests/uvit_reference.py:
    explicit softmax attention, explicit (p1 p2 C) patch order), used to check that equal weights give equal
    outputs."""
    seq = [ref_time(sd, t, c.embed_dim, c.mlp_time_embed)[:, None], ref_patches(sd, x, c.patch_size)]
    if y is not None:
        seq.insert(0, sd["label_emb.weight"][y][:, None])
    h = ref_trunk(sd, torch.cat(seq, 1) + sd["pos_embed"], c.depth, c.embed_dim, c.num_heads)
    return ref_image(sd, h[:, (2 if y is not None else 1):], c.img_size, c.patch_size, c.in_chans)


@pytest.mark.parametrize("config", [CIFAR10_SMALL, SMALL_COND], ids=["cifar10_uvit_small", "small_cond"])
def test_state_dict_matches_reference_names_and_shapes(config, tmp_path):
    net = UViT(config)
    got = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert got == reference_keys(config)
    # a "published" checkpoint: random weights under the reference names, stored as safetensors
    torch.manual_seed(1)
    ckpt = {k: torch.randn(s) * 0.05 for k, s in reference_keys(config).items()}
    from safetensors.torch import save_file

    from cdm.io import load_state_dict

    save_file(ckpt, str(tmp_path / "uvit.safetensors"))
    fresh = UViT(config)
    fresh.load_state_dict(load_state_dict(tmp_path / "uvit.safetensors"), strict=True)
    if config is SMALL_COND:  # the full forward check is cheap for the small config only
        x = torch.randn(3, config.in_chans, config.img_size, config.img_size)
        t = torch.tensor([0.0, 17.5, 999.0])
        y = torch.tensor([0, 3, 10])
        with torch.no_grad():
            torch.testing.assert_close(fresh(x, t, y), reference_forward(ckpt, config, x, t, y), atol=1e-5, rtol=1e-4)


def test_cifar10_small_forward_matches_reference():
    c = UViTConfig(img_size=8, patch_size=2, in_chans=3, embed_dim=64, depth=4, num_heads=8, mlp_time_embed=False,
                   num_classes=-1, null_class=None)
    torch.manual_seed(0)
    net = UViT(c)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([5.0, 500.0])
    with torch.no_grad():
        torch.testing.assert_close(net(x, t), reference_forward(net.state_dict(), c, x, t), atol=1e-5, rtol=1e-4)


def test_patchify_roundtrip_and_order():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    tokens = patchify(x, 2)
    assert tokens.shape == (2, 4, 12)
    # (p1 p2 C): the first three entries of the first token are the three channels of pixel (0, 0)
    assert tokens[0, 0, :3].tolist() == [x[0, 0, 0, 0].item(), x[0, 1, 0, 0].item(), x[0, 2, 0, 0].item()]
    assert torch.equal(unpatchify(tokens, 3), x)


def test_deep_prompts_are_prepended_and_dropped():
    c = UViTConfig(img_size=8, patch_size=2, embed_dim=32, depth=3, num_heads=2)
    torch.manual_seed(0)
    net = UViT(c).eval()
    x, t, y = torch.randn(4, 1, 8, 8), torch.randint(0, 1000, (4,)), torch.randint(0, 10, (4,))
    with torch.no_grad():
        plain = net(x, t, y)
        empty = net(x, t, y, prompts=torch.zeros(1, c.n_blocks, 0, 32))
        shared = torch.randn(1, c.n_blocks, 5, 32)
        a = net(x, t, y, prompts=shared)
        b = net(x, t, y, prompts=shared.expand(4, -1, -1, -1).clone())
        per = torch.randn(4, c.n_blocks, 5, 32)
        single = net(x[:1], t[:1], y[:1], prompts=per[:1])
        batch = net(x, t, y, prompts=per)
    assert torch.allclose(plain, empty, atol=1e-6)  # P = 0 is the plain U-ViT
    assert a.shape == plain.shape and not torch.allclose(a, plain, atol=1e-4)
    torch.testing.assert_close(a, b)  # a (1, ...) prompt broadcasts over the batch
    torch.testing.assert_close(single, batch[:1], atol=1e-5, rtol=1e-4)  # per-sample prompts stay per sample
    with pytest.raises(ValueError, match="prompts must be"):
        net(x, t, y, prompts=torch.randn(4, c.n_blocks + 1, 5, 32))


def test_prompt_gradients_reach_every_block():
    c = UViTConfig(img_size=8, patch_size=2, embed_dim=32, depth=5, num_heads=2)
    net = UViT(c).requires_grad_(False)
    prompts = torch.zeros(1, c.n_blocks, 3, 32, requires_grad=True)
    net(torch.randn(2, 1, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 2]), prompts=prompts).pow(2).sum().backward()
    assert (prompts.grad.abs().sum(dim=(0, 2, 3)) > 0).all()


def test_wrong_input_shape_is_a_clear_error():
    net = UViT(UViTConfig(img_size=8, patch_size=2, embed_dim=32, depth=3, num_heads=2))
    with pytest.raises(ValueError, match=r"expected input \(B, 1, 8, 8\)"):
        net(torch.randn(2, 1, 10, 10), torch.tensor([1, 2]))


def _tiny_backbone() -> Backbone:
    from cdm.backbone import PixelCodec

    net = UViT(UViTConfig(img_size=14, patch_size=7, embed_dim=16, depth=1, num_heads=2))
    return Backbone(net, codec=PixelCodec(28, 14))


def test_backbone_save_load_roundtrip(tmp_path):
    bb = _tiny_backbone()
    bb.save_pretrained(tmp_path / "bb", record={"steps": 1})
    back = Backbone.from_pretrained(tmp_path / "bb")
    assert back.hash == bb.hash and back.record == {"steps": 1}
    assert all(not p.requires_grad for p in back.net.parameters())


def test_wrong_shape_checkpoint_is_refused(tmp_path):
    bb = _tiny_backbone()
    bb.save_pretrained(tmp_path / "bb")
    other = Backbone(UViT(UViTConfig(img_size=14, patch_size=7, embed_dim=24, depth=1, num_heads=2)))
    from cdm.io import save_state_dict

    save_state_dict(tmp_path / "bb" / "model.safetensors", other.net.state_dict())
    with pytest.raises(WeightsError, match="wrong shape") as e:
        Backbone.from_pretrained(tmp_path / "bb")
    assert len(str(e.value)) < 300


def test_pickle_is_refused_without_being_opened(tmp_path):
    bb = _tiny_backbone()
    bb.save_pretrained(tmp_path / "bb")
    evil = tmp_path / "model.pt"
    evil.write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(WeightsError, match="pickle"):
        Backbone.from_pretrained(evil)
    # a pickle renamed to model.safetensors is refused too (magic bytes), and so is a corrupt file
    (tmp_path / "bb" / "model.safetensors").write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(WeightsError, match="pickle"):
        Backbone.from_pretrained(tmp_path / "bb")
    (tmp_path / "bb" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(WeightsError, match="not a readable safetensors"):
        Backbone.from_pretrained(tmp_path / "bb")


def test_missing_or_foreign_config_is_refused(tmp_path):
    with pytest.raises(WeightsError, match="no such backbone"):
        Backbone.from_pretrained(tmp_path / "nope")
    bb = _tiny_backbone()
    bb.save_pretrained(tmp_path / "bb")
    (tmp_path / "bb" / "config.json").write_text('{"kind": "digit-classifier"}')
    with pytest.raises(WeightsError, match="kind"):
        Backbone.from_pretrained(tmp_path / "bb")


def test_state_dict_hash_covers_scalars_and_detects_changes():
    from cdm.io import state_dict_sha256

    a = {"w": torch.ones(2, 2), "n": torch.tensor(3)}
    b = {"w": torch.ones(2, 2), "n": torch.tensor(4)}
    assert state_dict_sha256(a) != state_dict_sha256(b)
    assert state_dict_sha256(a) == state_dict_sha256({"n": torch.tensor(3), "w": torch.ones(2, 2)})


def test_safetensors_whose_header_length_looks_like_pickle_magic_still_loads(tmp_path):
    from safetensors.torch import save_file

    from cdm.io import load_state_dict

    # grow the header until its length's first two bytes are 0x80 0x04 (pickle protocol 4's opening)
    for pad in range(0, 4000):
        path = tmp_path / "x.safetensors"
        save_file({"w": torch.zeros(1)}, str(path), metadata={"pad": "a" * pad})
        head = path.read_bytes()[:2]
        if head == b"\x80\x04":
            break
    else:
        pytest.skip("could not build such a header")
    assert torch.equal(load_state_dict(path)["w"], torch.zeros(1))
