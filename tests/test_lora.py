"""LoRA compartments: a new one is exactly the backbone (bit for bit), the update is the merged low-rank weight, a
bank of LoRA compartments equals their separate forwards, config checks, parameter count, save / load, training
(deterministic, resumable, through a store), and a compartment without LoRA is drawn exactly as before."""

import copy
import dataclasses

import numpy as np
import pytest
import torch

from cdm.backbone import Backbone, UViT, UViTConfig
from cdm.backbone.uvit import LORA_TARGETS, lora_shapes
from cdm.compartments import Compartment, CompartmentConfig
from cdm.composition import CompartmentBank
from cdm.data import public_protected, split_stratified
from cdm.errors import WeightsError
from cdm.operations import add_source, load_compartment
from cdm.store import Store
from cdm.training.compartment import train_compartment

LORA = CompartmentConfig(steps=3, batch_size=8, n_prompts=2, warmup=1, validation=0.0, lora_rank=2)


@pytest.fixture(scope="module")
def backbone():
    """Three blocks (in, mid, out with a long skip), so every block kind gets its own factors."""
    torch.manual_seed(0)
    return Backbone(UViT(UViTConfig(img_size=14, patch_size=7, embed_dim=16, depth=3, num_heads=2))).freeze()


@pytest.fixture(scope="module")
def parts():
    _, protected = public_protected()
    return split_stratified(protected.subset(np.arange(0, 4000, 50), id="mnist/protected/every50"), 2)


def _inputs(n=4):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 14, 14, generator=g), torch.tensor([3, 250, 600, 990][:n]), torch.tensor([1, 7, 10, 3][:n])


def _randomise(comp, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in comp.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return comp


@pytest.mark.parametrize("gated", [True, False])
def test_a_new_lora_compartment_adds_exactly_nothing(backbone, gated):
    cfg = CompartmentConfig(n_prompts=2, gated=gated, lora_rank=3)
    comp = Compartment.for_backbone(backbone, cfg)
    comp.init_prompts(torch.Generator().manual_seed(0))
    plain = Compartment.for_backbone(backbone, CompartmentConfig(n_prompts=2, gated=gated))
    plain.init_prompts(torch.Generator().manual_seed(0))
    x, t, y = _inputs()
    with torch.no_grad():
        got = comp.eps(backbone, x, t, y)
        assert torch.equal(got, plain.eps(backbone, x, t, y))  # LoRA at b = 0 changes no bit
        if gated:  # and a gated one is the backbone itself, bit for bit
            assert torch.equal(got, backbone.net(x, t, y=y))
        assert all(bool(a.abs().sum() > 0) and not b.any() for a, b in comp.lora.factors().values())
        for name in LORA_TARGETS:  # every target's update reaches the output
            moved = copy.deepcopy(comp)
            getattr(moved.lora, f"{name}_b").normal_()
            assert not torch.allclose(moved.eps(backbone, x, t, y), got), name


def test_lora_is_the_merged_low_rank_weight(backbone):
    comp = _randomise(Compartment.for_backbone(backbone, CompartmentConfig(n_prompts=2, lora_rank=2)), 3)
    merged = copy.deepcopy(backbone.net)
    blocks = [*merged.in_blocks, merged.mid_block, *merged.out_blocks]
    linears = {"qkv": lambda b: b.attn.qkv, "proj": lambda b: b.attn.proj, "fc1": lambda b: b.mlp.fc1,
               "fc2": lambda b: b.mlp.fc2}
    with torch.no_grad():
        for name, (a, b) in comp.lora.factors().items():
            for k, blk in enumerate(blocks):
                lin = linears[name](blk)
                lin.weight += (a[0, k] @ b[0, k]).T  # y = x W^T: W + (a b)^T
    x, t, y = _inputs()
    kw = comp.net_kwargs(y, None, x.shape[0])
    with torch.no_grad():
        want = merged(x, t, **{k: v for k, v in kw.items() if k != "lora"})
        torch.testing.assert_close(backbone.net(x, t, **kw), want, atol=1e-5, rtol=1e-5)


def test_a_bank_of_lora_compartments_equals_their_forwards(backbone):
    cfg = CompartmentConfig(n_prompts=2, lora_rank=2, adapter_rank=2)
    comps = [_randomise(Compartment.for_backbone(backbone, cfg), s) for s in (1, 2, 3)]
    bank = CompartmentBank(backbone, comps)
    x, t, y = _inputs()
    index = torch.tensor([2, 0, 1, 2])
    with torch.no_grad():
        got, mid = bank(x, t, index, y=y, return_mid=True)
        for k, i in enumerate(index.tolist()):
            want, want_mid = backbone.net(x[k:k + 1], t[k:k + 1], return_mid=True,
                                          **comps[i].net_kwargs(y[k:k + 1], None, 1))
            torch.testing.assert_close(got[k:k + 1], want, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(mid[k:k + 1], want_mid, atol=1e-5, rtol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the benchmarks' sampling dtype runs too
            assert torch.isfinite(bank(x, t, index, y=y).float()).all()
    plain = Compartment.for_backbone(backbone, CompartmentConfig(n_prompts=2, adapter_rank=2))
    with pytest.raises(ValueError, match="LoRA rank"):
        CompartmentBank(backbone, [comps[0], plain])


def test_wrong_lora_inputs_are_refused(backbone):
    x, t, _ = _inputs(2)
    c = backbone.config
    good = {k: (torch.zeros(1, c.n_blocks, i, 2), torch.zeros(1, c.n_blocks, 2, o)) for k, (i, o) in
            lora_shapes(c).items()}
    assert torch.equal(backbone.net(x, t, lora=good), backbone.net(x, t))
    bad = [{k: v for k, v in good.items() if k != "fc2"},  # a target missing
           {**good, "qkv": (torch.zeros(1, c.n_blocks, 16, 2), torch.zeros(1, c.n_blocks, 2, 16))},  # wrong out
           {k: (a.expand(3, -1, -1, -1), b.expand(3, -1, -1, -1)) for k, (a, b) in good.items()},  # 3 sets, 2 rows
           {**good, "index": torch.zeros(3, dtype=torch.long)}]  # index of the wrong length
    for lora in bad:
        with pytest.raises(ValueError, match="lora must map qkv, proj, fc1, fc2"):
            backbone.net(x, t, lora=lora)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "4"])
def test_bad_lora_rank_is_refused(bad):
    with pytest.raises(ValueError, match="lora_rank must be a whole number >= 0"):
        CompartmentConfig(lora_rank=bad)


def test_parameter_count_and_tensors_on_disk(backbone):
    c = backbone.config
    plain = Compartment.for_backbone(backbone, CompartmentConfig(n_prompts=2))
    comp = Compartment.for_backbone(backbone, CompartmentConfig(n_prompts=2, lora_rank=3))
    per_block = sum(3 * (i + o) for i, o in lora_shapes(c).values())
    assert comp.n_parameters - plain.n_parameters == c.n_blocks * per_block
    names = {f"lora.{k}_{ab}" for k in LORA_TARGETS for ab in "ab"}
    assert set(comp.tensors()) == {"prompts"} | names
    _randomise(comp, 5)
    back = Compartment.for_backbone(backbone, CompartmentConfig(n_prompts=2, lora_rank=3))
    back.load_tensors(comp.tensors())
    assert all(torch.equal(v, comp.tensors()[k]) for k, v in back.tensors().items())
    with pytest.raises(WeightsError, match="expected the tensors"):
        plain.load_tensors(comp.tensors())
    with pytest.raises(WeightsError, match="lora.qkv_a has shape"):
        Compartment.for_backbone(backbone, CompartmentConfig(n_prompts=2, lora_rank=2)).load_tensors(comp.tensors())


def test_without_lora_a_compartment_is_drawn_as_before(backbone):
    """LoRA's factors are drawn after everything else, so the other tensors of a seeded compartment do not depend on
    whether it has LoRA (and one without it draws exactly what it drew before LoRA existed)."""
    draws = {}
    for rank in (0, 2):
        comp = Compartment.for_backbone(backbone, CompartmentConfig(n_prompts=2, adapter_rank=2, lora_rank=rank))
        comp.init_prompts(torch.Generator().manual_seed(7))
        draws[rank] = comp.tensors()
    assert all(torch.equal(v, draws[2][k]) for k, v in draws[0].items())


def test_lora_trains_deterministically_and_round_trips_a_store(backbone, parts, tmp_path):
    a1, rec = train_compartment(backbone, parts[0], LORA, progress=False)
    a2, _ = train_compartment(backbone, parts[0], LORA, progress=False)
    assert rec.finished and np.isfinite(rec.final_loss) and rec.config["lora_rank"] == 2
    assert all(torch.equal(v, a2.tensors()[k]) for k, v in a1.tensors().items())
    assert all(b.any() for _, b in a1.lora.factors().values())  # b left zero: the update trains
    cfg = CompartmentConfig(steps=4, batch_size=8, n_prompts=2, warmup=1, validation=0.0, lora_rank=2,
                            checkpoint_every=2)
    full, _ = train_compartment(backbone, parts[0], cfg, progress=False)  # a paused run resumes bit for bit
    paused, rec = train_compartment(backbone, parts[0], cfg, work_dir=tmp_path / "w", max_minutes=0.0, progress=False)
    assert paused is None and rec.steps_done == 2
    resumed, _ = train_compartment(backbone, parts[0], cfg, work_dir=tmp_path / "w", progress=False)
    assert all(torch.equal(v, full.tensors()[k]) for k, v in resumed.tensors().items())
    with Store.create(tmp_path / "store") as st:
        add_source(st, backbone, parts[0], name="a", cfg=LORA, progress=False)
        loaded = load_compartment(st, backbone, "a")
    assert loaded.config.lora_rank == 2
    assert all(torch.equal(v, a1.tensors()[k]) for k, v in loaded.tensors().items())


def test_dp_and_a_mixed_paragon_refuse_lora_and_the_cli_trains_it(backbone, parts, tmp_path):
    from typer.testing import CliRunner

    from cdm.cli.main import app
    from cdm.errors import CdmError
    from cdm.operations import check_add, paragon_config
    from cdm.privacy import DPConfig

    with pytest.raises(CdmError, match="adapters and LoRA are not supported"):
        check_add(backbone, parts[0], name="a", cfg=LORA, dp=DPConfig(epsilon=8.0))
    with Store.create(tmp_path / "store") as st:
        add_source(st, backbone, parts[0], name="a", cfg=LORA, progress=False)
        add_source(st, backbone, parts[1], name="b", cfg=dataclasses.replace(LORA, lora_rank=0), progress=False)
        with pytest.raises(CdmError, match="LoRA rank"):
            paragon_config(st, ["a", "b"])
    backbone.save_pretrained(tmp_path / "bb")
    res = CliRunner().invoke(app, ["add", "mnist/protected/strat8-0", "--store", str(tmp_path / "cli"), "--name",
                                   "s", "--steps", "2", "--batch-size", "4", "--prompts", "2", "--lora", "2",
                                   "--backbone", str(tmp_path / "bb")])
    assert res.exit_code == 0, res.output
    with Store.open(tmp_path / "cli") as st:
        assert load_compartment(st, backbone, "s").config.lora_rank == 2
