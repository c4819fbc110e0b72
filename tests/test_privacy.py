"""DP-SGD compartments: accounting equals Opacus', prompts only, backbone untouched, refusals, determinism."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus import GradSampleModule
from opacus.accountants import RDPAccountant

from cdm.compartments import Compartment, CompartmentConfig
from cdm.data import public_protected, split_stratified
from cdm.errors import TrainingError
from cdm.io import state_dict_sha256
from cdm.privacy import DPConfig, PromptDenoiser, calibrate, epsilon_spent, train_compartment_dp
from cdm.privacy.dp import per_sample_grads

CFG = CompartmentConfig(steps=4, batch_size=8, n_prompts=2, warmup=2, checkpoint_every=2)


@pytest.fixture(scope="module")
def source():
    _, protected = public_protected()
    return split_stratified(protected, 8)[0].subset(np.arange(40), id="mnist/protected/strat8-0/first40")


def _opacus_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    acc = RDPAccountant()
    for _ in range(steps):
        acc.step(noise_multiplier=sigma, sample_rate=q)
    return acc.get_epsilon(delta=delta)


@settings(max_examples=8, deadline=None)
@given(eps=st.floats(1.0, 10.0), steps=st.integers(10, 300), q=st.floats(0.005, 0.2))
def test_reported_epsilon_is_opacus_accountant(eps, steps, q):
    delta = 1e-5
    sigma = calibrate(eps, delta, q, steps)
    ours = epsilon_spent(sigma, q, steps, delta)
    assert ours == pytest.approx(_opacus_epsilon(sigma, q, steps, delta), rel=1e-9)
    assert eps - 0.05 <= ours <= eps + 1e-9  # meets the budget, tightly


def test_training_record_prompts_only_and_determinism(backbone, source, tmp_path):
    before = state_dict_sha256(backbone.net.state_dict())
    dp = DPConfig(epsilon=8.0, augmult=2)
    comp, rec = train_compartment_dp(backbone, source, CFG, dp, progress=False)
    again, _ = train_compartment_dp(backbone, source, CFG, dp, progress=False, work_dir=tmp_path / "w")
    assert state_dict_sha256(backbone.net.state_dict()) == before == rec.backbone_hash
    assert all(not p.requires_grad for p in backbone.net.parameters())
    assert set(comp.tensors()) == {"prompts"} and torch.equal(comp.tensors()["prompts"], again.tensors()["prompts"])
    d = rec.dp
    assert d["delta"] == 1e-5 and d["steps"] == 4 and d["augmult"] == 2 and d["sample_rate"] == 8 / 40
    assert d["epsilon"] == pytest.approx(_opacus_epsilon(d["noise_multiplier"], d["sample_rate"], 4, 1e-5), abs=1e-4)
    assert d["epsilon"] <= 8.0 + 1e-9
    assert {k for k in rec.to_dict() if k != "dp"} >= {"source", "backbone_hash", "config", "seed", "steps_done",
                                                      "finished"}
    model = PromptDenoiser(backbone, comp)
    assert [n for n, _ in model.named_parameters()] == ["prompts.table.weight"]


@pytest.mark.filterwarnings("ignore:Full backward hook")
def test_per_sample_grads_match_autograd(backbone, source):
    comp = Compartment.for_backbone(backbone, CFG)
    comp.init_prompts(torch.Generator().manual_seed(0))
    gsm = GradSampleModule(PromptDenoiser(backbone, comp), batch_first=True, loss_reduction="sum")
    g = torch.Generator().manual_seed(1)
    x0 = backbone.codec.encode(source.images[:3]).repeat_interleave(2, 0)
    y = torch.tensor(source.labels[:3]).repeat_interleave(2)
    t = torch.randint(0, 1000, (6,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    xt = backbone.schedule.add_noise(x0, noise, t)
    gs, _ = per_sample_grads(gsm, comp, xt, t, noise, y, augmult=2)
    w = comp.prompts.table.weight
    for i in range(3):
        sl = slice(2 * i, 2 * i + 2)
        loss = (comp.eps(backbone, xt[sl], t[sl], y[sl]) - noise[sl]).pow(2).flatten(1).mean(1).mean()
        (ref,) = torch.autograd.grad(loss, w)
        assert torch.allclose(gs[i], ref, atol=1e-6)


def test_refusals(backbone, source):
    with pytest.raises(TrainingError, match="cannot be met|drown"):
        train_compartment_dp(backbone, source, CompartmentConfig(**{**CFG.to_dict(), "steps": 2000}),
                             DPConfig(epsilon=0.01), progress=False)
    with pytest.raises(TrainingError, match="sample rate"):
        train_compartment_dp(backbone, source, CompartmentConfig(**{**CFG.to_dict(), "batch_size": 64}),
                             epsilon=3.0, progress=False)
    with pytest.raises(ValueError, match="epsilon"):
        DPConfig(epsilon=-1)


def test_cli_add_with_dp_then_attribute(tmp_path, backbone, source):
    import json

    from typer.testing import CliRunner

    from cdm.cli.main import app
    from cdm.store import Store

    backbone.save_pretrained(tmp_path / "bb")
    half = len(source) // 2
    source.subset(np.arange(half), id="a").to_npz(tmp_path / "a.npz")
    source.subset(np.arange(half, len(source)), id="b").to_npz(tmp_path / "b.npz")
    run = CliRunner().invoke
    common = ["--store", str(tmp_path / "st"), "--backbone", str(tmp_path / "bb")]
    for name, extra in (("a", ["--dp-epsilon", "8", "--dp-augmult", "2"]), ("b", [])):
        res = run(app, ["add", str(tmp_path / f"{name}.npz"), "--name", name, "--steps", "2", "--prompts", "2",
                        "--batch-size", "4", "--unconditional", *extra, *common])
        assert res.exit_code == 0, res.output
    with Store.open(tmp_path / "st") as st:
        dp = st.compartment("a")["manifest"]["dp"]
        assert dp["epsilon"] <= 8 and dp["augmult"] == 2 and dp["delta"] == 1e-5
        assert st.compartment("b")["manifest"]["dp"] is None
    res = run(app, ["add", str(tmp_path / "a.npz"), "--name", "c", "--steps", "3000", "--dp-epsilon", "0.01",
                    "--batch-size", "4", *common])
    assert res.exit_code != 0 and "cannot be met" in str(res.exception) + res.output
    with Store.open(tmp_path / "st") as st:
        assert "c" not in {s["id"] for s in st.sources()}  # refused before anything was registered
    res = run(app, ["attribute", "--sources", "a,b", "--n", "2", "--steps", "2", "--out", str(tmp_path / "att"),
                    *common])
    assert res.exit_code == 0, res.output
    credits = json.loads((tmp_path / "att" / "credits.json").read_text())
    assert len(credits["samples"]) == 2 and set(credits["samples"][0]["credit"]) == {"a", "b"}


def test_forgetting_a_sample_of_a_dp_source_retrains_it_with_dp(backbone, source, tmp_path):
    """An exact retrain keeps the privacy guarantee: the compartment is retrained with DP-SGD and the recorded
    parameters, bit-identical to DP training on the reduced source (it was retrained without DP before)."""
    from cdm.operations import add_source, forget_samples, load_compartment
    from cdm.store import Store

    dp = DPConfig(epsilon=8.0, delta=1e-5)
    cfg = CompartmentConfig(**{**CFG.to_dict(), "validation": 0.0})
    with Store.create(tmp_path / "st") as st:
        add_source(st, backbone, source, name="private", cfg=cfg, dp=dp, progress=False)
        gone = source.sample_hashes[3]
        forget_samples(st, backbone, "private", [gone], progress=False)
        manifest = st.compartment("private")["manifest"]
        assert manifest["dp"] is not None and manifest["dp"]["target_epsilon"] == 8.0
        direct, _ = train_compartment_dp(backbone, source.without([gone]), cfg, dp, progress=False)
        assert torch.equal(load_compartment(st, backbone, "private").tensors()["prompts"], direct.tensors()["prompts"])
