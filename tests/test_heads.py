"""Learned composition weights (router, noisy classifier, isolated density-ratio heads) on a tiny backbone:
they separate sources, compose through ComposedDenoiser + CompartmentBank, survive a store round trip, are
dropped exactly as forgetting requires, are deterministic; and the isolated heads' ratio derivation holds on
Gaussians with a known posterior."""

import math

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from cdm.cli.main import app
from cdm.compartments import Compartment, CompartmentConfig
from cdm.composition import (ClassifierWeighting, CompartmentBank, ComposedDenoiser, HeadBank, HeadConfig,
                             IsolatedWeighting, RouterWeighting, fit_density_ratio, train_isolated_head,
                             train_noisy_classifier, train_router)
from cdm.composition.heads import state_tensors
from cdm.data import Source, public_protected
from cdm.errors import CdmError, TrainingError
from cdm.io import state_dict_sha256
from cdm.composition.registry import REGISTRY
from cdm.operations import (add_source, compose, forget_source, head_cid, runnable_weightings, source_data,
                            train_isolated_op, train_router_op)
from cdm.sampling import sample
from cdm.store import Store

torch.set_num_threads(1)

CFG = CompartmentConfig(steps=4, batch_size=8, n_prompts=2, checkpoint_every=4, warmup=1, validation=0.0)
FAST = dict(steps=40, batch_size=32, eval_size=128)


@pytest.fixture(scope="module")
def sources():
    """Two obviously different sources: MNIST digits and the same digits inverted (black ink on white)."""
    _, protected = public_protected()
    plain = protected.subset(np.arange(0, 4000, 50), id="plain")
    inv = Source(id="inv", images=255 - plain.images, labels=plain.labels, classes=plain.classes)
    return plain, inv


@pytest.fixture(scope="module")
def compartments(backbone):
    out = []
    for s in range(2):
        c = Compartment.for_backbone(backbone, CompartmentConfig(n_prompts=2))
        c.init_prompts(torch.Generator().manual_seed(s))
        out.append(c.eval().requires_grad_(False))
    return out


def _noisy(backbone, source, t, n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = backbone.codec.encode(source.images[:n])
    tt = torch.full((n,), t)
    return backbone.schedule.add_noise(x0, torch.randn(x0.shape, generator=g), tt), tt


def _store(path, backbone, sources):
    st = Store.create(path)
    for src in sources:
        add_source(st, backbone, src, name=src.id, cfg=CFG, progress=False)
    return st


# ----------------------------------------------------------------------------------------------- learning


def test_router_separates_sources_and_composes(backbone, sources, compartments):
    heads, rec = train_router(backbone, compartments, list(sources), steps=120, batch_size=32)
    assert rec["steps"] == 120 and rec["chance"] == 0.5 and rec["balance"] == "balanced"
    assert [s["id"] for s in rec["sources_seen"]] == ["plain", "inv"] and math.isfinite(rec["final_loss"])
    assert rec["accuracy_by_t"]["250-499"] > 0.9  # held-out batch, moderate t
    composed = ComposedDenoiser(CompartmentBank(backbone, compartments), RouterWeighting(heads))
    for k, src in enumerate(sources):
        x, t = _noisy(backbone, src, 400, seed=k)
        composed.reset()
        out = composed(x, t)
        w = composed.trajectory()[-1]
        assert out.shape == x.shape and torch.allclose(w.sum(1), torch.ones(len(x), dtype=torch.float64))
        assert (w.argmax(1) == k).float().mean() > 0.9  # the weight goes to the source x_t came from


def test_noisy_classifier_separates_sources(backbone, sources, compartments):
    model, rec = train_noisy_classifier(backbone.schedule, backbone.codec, list(sources), steps=120, batch_size=32)
    assert rec["accuracy_by_t"]["250-499"] > 0.9 and rec["arch"]["n_sources"] == 2
    composed = ComposedDenoiser(CompartmentBank(backbone, compartments), ClassifierWeighting(model))
    x, t = _noisy(backbone, sources[1], 400)
    composed(x, t)
    w = composed.trajectory()[-1]
    assert torch.allclose(w.sum(1), torch.ones(len(x), dtype=torch.float64)) and (w.argmax(1) == 1).float().mean() > 0.9


def test_isolated_ratio_heads_give_the_posterior():
    """Two heads trained separately, each on its own Gaussian against one shared core Gaussian (balanced
    logistic regression on features [x, x^2], so the optimum is the exact quadratic log-ratio), compose through
    the ComposedDenoiser into the true posterior lambda_i p_i / sum_j lambda_j p_j: log p_core cancels."""
    core, comps, priors = (0.0, 1.5), [(1.0, 0.6), (-0.8, 0.7)], [0.3, 0.7]

    def log_normal(x, mu, s):
        return -0.5 * ((x - mu) / s) ** 2 - math.log(s) - 0.5 * math.log(2 * math.pi)

    def drawer(mu, s):
        return lambda g, m: (mu + s * torch.randn(m, 1, generator=g), torch.zeros(m, dtype=torch.long), None)

    def features(x, t=None, y=None):
        return torch.stack([x, x * x / 2], dim=-1).view(x.shape[0], 1, 2)  # one token (L=1) of width 2

    cfg = HeadConfig(steps=600, batch_size=1024, lr=0.05, lr_schedule="constant", warmup=0, grad_clip=100.0)
    heads = []
    for i, (mu, s) in enumerate(comps):
        torch.manual_seed(i)
        head = nn.Linear(2, 1)
        rec = fit_density_ratio(head, features, drawer(mu, s), drawer(*core), cfg)
        assert rec["steps"] == 600 and rec["accuracy"] > 0.6
        grid = torch.linspace(-1.5, 2.0, 50)
        est = head(features(grid)).view(-1).detach().double()
        true = log_normal(grid.double(), mu, s) - log_normal(grid.double(), *core)
        assert (est - true).abs().max() < 0.15  # each head alone: the analytic log-ratio to the core
        heads.append(head)

    bank = HeadBank(heads)

    class FeatureBank:  # a "backbone" whose mid tokens are the features, for two sources
        def __len__(self):
            return 2

        def __call__(self, x, t, index, return_mid=False, **cond):
            return torch.zeros_like(x), features(x.view(-1))

    g = torch.Generator().manual_seed(123)
    pick = torch.rand(4000, generator=g) < priors[0]
    x = torch.where(pick, comps[0][0] + comps[0][1] * torch.randn(4000, generator=g),
                    comps[1][0] + comps[1][1] * torch.randn(4000, generator=g))
    composed = ComposedDenoiser(FeatureBank(), IsolatedWeighting(bank), priors=priors)
    composed(x.view(-1, 1, 1, 1), torch.zeros(4000, dtype=torch.long))
    w = composed.trajectory()[-1][:, 0]
    la = math.log(priors[0]) + log_normal(x.double(), *comps[0])
    lb = math.log(priors[1]) + log_normal(x.double(), *comps[1])
    true_w = torch.sigmoid(la - lb)
    err = (w - true_w).abs()
    assert err.mean() < 0.01 and err.max() < 0.05
    assert (true_w - priors[0]).abs().mean() > 0.2  # the test has teeth: the prior alone is far off


def test_nan_loss_is_a_training_error():
    head = nn.Linear(2, 1)
    bad = lambda g, m: (torch.full((m, 1), float("nan")), torch.zeros(m, dtype=torch.long), None)  # noqa: E731
    with pytest.raises(TrainingError, match="loss is nan"):
        fit_density_ratio(head, lambda x, t, y: torch.cat([x, x], 1).view(-1, 1, 2), bad, bad,
                          HeadConfig(steps=3, batch_size=4))


def test_training_is_deterministic(backbone, sources, compartments):
    core = public_protected()[0]
    a, _ = train_router(backbone, compartments, list(sources), seed=3, **FAST)
    b, _ = train_router(backbone, compartments, list(sources), seed=3, **FAST)
    c, _ = train_router(backbone, compartments, list(sources), seed=4, **FAST)
    sha = lambda m: state_dict_sha256(state_tensors(m))  # noqa: E731
    assert sha(a) == sha(b) != sha(c)
    h1, _ = train_isolated_head(backbone, compartments[1], sources[1], core, steps=10, batch_size=16)
    h2, _ = train_isolated_head(backbone, compartments[1], sources[1], core, steps=10, batch_size=16)
    m1, _ = train_noisy_classifier(backbone.schedule, backbone.codec, list(sources), steps=10, batch_size=16)
    m2, _ = train_noisy_classifier(backbone.schedule, backbone.codec, list(sources), steps=10, batch_size=16)
    assert sha(h1) == sha(h2) and sha(m1) == sha(m2)


# ----------------------------------------------------------------------------------------------- store


def test_store_round_trip_compose_and_forget(tmp_path, backbone, sources):
    st = _store(tmp_path / "st", backbone, sources)
    with st:
        names = ["plain", "inv"]
        train_router_op(st, backbone, names, kind="router", progress=False, **FAST)
        train_router_op(st, backbone, names, kind="classifier", progress=False, **FAST)
        for n in names:
            train_isolated_op(st, backbone, n, progress=False, steps=20, batch_size=16)
        rows = {r["cid"]: r for r in st.compartments()}
        assert rows["router"]["kind"] == "router" and rows["router"]["sources"] == names
        assert rows["noisy-classifier"]["kind"] == "classifier" and rows["noisy-classifier"]["sources"] == names
        assert rows["inv.head"]["kind"] == "isolated-head" and rows["inv.head"]["sources"] == ["inv"]
        man = st.compartment("router")["manifest"]
        assert [e["name"] for e in man["sources_seen"]] == names and man["steps"] == 40
        assert man["seed"] == 0 and "wall_seconds" in man and "accuracy" in man
        assert st.verify() == []

        # the stored router is the one direct training gives (round trip + determinism)
        comps = [compose(st, backbone, names, weighting="naive").bank.compartments[i] for i in range(2)]
        direct, _ = train_router(backbone, comps, [source_data(st, n) for n in names], **FAST)
        stored, _ = st.load_compartment("router", backbone_hash=backbone.hash)
        assert state_dict_sha256(stored) == state_dict_sha256(state_tensors(direct))

        # every learned weighting composes and samples; weights sum to 1; a reordered request reorders them
        x, t = _noisy(backbone, sources[0], 300, n=6)
        for weighting in ("router", "classifier", "isolated"):
            composed = compose(st, backbone, names, weighting=weighting)
            out = sample(composed, torch.randn(4, 1, 14, 14, generator=torch.Generator().manual_seed(0)),
                         schedule=backbone.schedule, steps=3)
            w = composed.trajectory()
            assert out.shape == (4, 1, 14, 14) and w.shape == (3, 4, 2)
            assert torch.allclose(w.sum(-1), torch.ones(3, 4, dtype=torch.float64))
            composed.reset()
            composed(x, t, y=torch.tensor([0, 1, 2, 10, 10, 3]))  # class-conditional rows too
            flipped = compose(st, backbone, names[::-1], weighting=weighting, priors=[1, 1])
            composed_u = compose(st, backbone, names, weighting=weighting, priors=[1, 1])
            composed_u(x, t)
            flipped(x, t)
            torch.testing.assert_close(flipped.trajectory()[-1], composed_u.trajectory()[-1].flip(1))

        # what the registry offers for these sources now: everything, as every head is trained and current; for
        # one source only what needs no heads; nothing for no source (the service's menu comes from here)
        assert runnable_weightings(st, names) == [w for w in REGISTRY if REGISTRY[w].public]
        assert runnable_weightings(st, names[:1]) == ["ito", "naive", "single"] and runnable_weightings(st, []) == []

        # forgetting 'inv' drops its compartment, its own head and both joint weightings (listed for retraining),
        # and nothing of 'plain'
        plain_head = st.compartment("plain.head")["weights_sha256"]
        out = forget_source(st, "inv", reason="test")
        assert set(out.removed) == {"inv", "inv.head", "router", "noisy-classifier"}
        assert {r.cid: r.sources for r in out.retrain} == {"router": ["plain"], "noisy-classifier": ["plain"]}
        assert st.compartment("plain.head")["weights_sha256"] == plain_head
        assert runnable_weightings(st, ["plain"]) == ["ito", "naive", "single"]
        assert st.verify() == []
        assert compose(st, backbone, ["plain"], weighting="isolated") is not None
        with pytest.raises(CdmError, match="no router covers sources plain"):
            compose(st, backbone, ["plain"], weighting="router")


def test_missing_learned_weights_are_a_short_error(tmp_path, backbone, sources):
    with _store(tmp_path / "st", backbone, sources) as st:
        with pytest.raises(CdmError) as e:
            compose(st, backbone, ["plain", "inv"], weighting="router")
        assert str(e.value) == (f"no router covers sources plain, inv: run `cdm train-router --store {st.path} "
                                "--sources plain,inv`")
        with pytest.raises(CdmError, match="no noisy classifier covers .* --kind classifier`"):
            compose(st, backbone, ["plain", "inv"], weighting="classifier")
        train_isolated_op(st, backbone, "plain", progress=False, steps=2, batch_size=4)
        with pytest.raises(CdmError, match=r"no isolated head for sources inv: .*--sources inv --kind isolated`"):
            compose(st, backbone, ["plain", "inv"], weighting="isolated")
        assert head_cid("inv") == "inv.head"


def test_cli_train_router_and_sample(tmp_path, backbone, sources):
    backbone.save_pretrained(tmp_path / "bb")
    _store(tmp_path / "st", backbone, sources).close()
    run = CliRunner().invoke
    common = ["--store", str(tmp_path / "st"), "--backbone", str(tmp_path / "bb"), "--steps", "3", "--batch-size", "8"]
    for kind in ("router", "isolated"):
        res = run(app, ["train-router", *common, "--sources", "plain,inv", "--kind", kind])
        assert res.exit_code == 0, res.output
    with Store.open(tmp_path / "st") as st:
        assert {"router", "plain.head", "inv.head"} <= {r["cid"] for r in st.compartments()}
    res = run(app, ["sample", "--backbone", str(tmp_path / "bb"), "--store", str(tmp_path / "st"), "--sources",
                    "plain,inv", "--n", "3", "--steps", "2", "--weighting", "router", "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    with np.load(tmp_path / "o" / "weights.npz") as f:
        assert f["weights"].shape == (2, 3, 2) and np.allclose(f["weights"].sum(-1), 1)
