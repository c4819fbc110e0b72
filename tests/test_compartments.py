"""Compartments: frozen backbone, determinism, order independence, exact forgetting, resumability."""

import numpy as np
import pytest
import torch

from cdm.backbone import Backbone, UViT, UViTConfig
from cdm.compartments import Compartment, CompartmentConfig
from cdm.data import Source, public_protected, split_stratified
from cdm.errors import DataError, TrainingError, WeightsError
from cdm.io import state_dict_sha256
from cdm.training.compartment import train_compartment

CFG = CompartmentConfig(steps=6, batch_size=8, n_prompts=2, checkpoint_every=3, warmup=2, validate_every=2, lr=0.1)


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return Backbone(UViT(UViTConfig(img_size=14, patch_size=7, embed_dim=16, depth=3, num_heads=2))).freeze()


@pytest.fixture(scope="module")
def source():
    _, protected = public_protected()
    return split_stratified(protected, 8)[0].subset(np.arange(60), id="mnist/protected/strat8-0/first60")


def _hash(comp):
    return state_dict_sha256(comp.tensors())


def test_backbone_unchanged_and_only_prompts_saved(backbone, source):
    before = state_dict_sha256(backbone.net.state_dict())
    comp, record = train_compartment(backbone, source, CFG, progress=False)
    assert state_dict_sha256(backbone.net.state_dict()) == before == record.backbone_hash
    assert set(comp.tensors()) == {"prompts"}
    c = backbone.config
    assert comp.tensors()["prompts"].shape == (10 + 1, c.n_blocks * (2 * c.embed_dim + c.num_heads))  # prompts + gates
    assert record.source["sample_hashes"] == sorted(source.sample_hashes)


def test_bit_identical_retrain_and_order_independence(backbone, source):
    a, _ = train_compartment(backbone, source, CFG, progress=False)
    b, _ = train_compartment(backbone, source, CFG, progress=False)
    perm = np.random.default_rng(0).permutation(len(source))
    c, _ = train_compartment(backbone, source.subset(perm, id="shuffled"), CFG, progress=False)
    d, _ = train_compartment(backbone, source, CompartmentConfig(**{**CFG.to_dict(), "seed": 1}), progress=False)
    assert _hash(a) == _hash(b) == _hash(c) != _hash(d)


def test_forgetting_a_sample_equals_training_without_it(backbone, source):
    gone = [source.sample_hashes[5], source.sample_hashes[17][:16]]
    retrained, _ = train_compartment(backbone, source.without(gone), CFG, progress=False)
    keep = [i for i in range(len(source)) if i not in (5, 17)][::-1]  # the same samples, another order, another id
    direct = Source(id="direct", images=source.images[keep], labels=source.labels[keep], classes=source.classes)
    fresh, _ = train_compartment(backbone, direct, CFG, progress=False)
    full, _ = train_compartment(backbone, source, CFG, progress=False)
    assert _hash(retrained) == _hash(fresh) != _hash(full)


def test_resume_is_bit_identical(backbone, source, tmp_path):
    full, _ = train_compartment(backbone, source, CFG, progress=False)
    paused, rec = train_compartment(backbone, source, CFG, work_dir=tmp_path, max_minutes=0.0, progress=False)
    assert paused is None and rec.steps_done == 3
    resumed, rec = train_compartment(backbone, source, CFG, work_dir=tmp_path, progress=False)
    assert rec.finished and _hash(resumed) == _hash(full)
    with pytest.raises(TrainingError, match="another source"):
        train_compartment(backbone, source.subset(np.arange(10), id="other"), CFG, work_dir=tmp_path, progress=False)


def test_unconditional_compartment_and_denoiser(backbone, source):
    cfg = CompartmentConfig(**{**CFG.to_dict(), "conditional": False})
    comp, _ = train_compartment(backbone, source, cfg, progress=False)
    assert comp.tensors()["prompts"].shape[0] == 1
    eps = comp.denoiser(backbone)
    x = torch.randn(3, 1, 14, 14)
    assert eps(x, torch.tensor([1, 500, 999])).shape == x.shape


def test_conditional_rows(backbone):
    comp = Compartment.for_backbone(backbone, CFG)
    assert comp.row(torch.tensor([0, 9, 10]), 3).tolist() == [0, 9, 10]  # null class -> unconditional row 10
    assert comp.row(None, 2).tolist() == [10, 10]


def test_bad_sources_and_tensors(backbone, source):
    with pytest.raises(DataError, match="needs labels"):
        train_compartment(backbone, Source(id="u", images=source.images), CFG, progress=False)
    with pytest.raises(DataError, match="empty"):
        train_compartment(backbone, source.subset(np.arange(0), id="e"), CFG, progress=False)
    comp = Compartment.for_backbone(backbone, CFG)
    with pytest.raises(WeightsError, match="shape"):
        comp.load_tensors({"prompts": torch.zeros(3, 4)})
    with pytest.raises(WeightsError, match=r"expected the tensors \['prompts'\], got \['extra', 'prompts'\]"):
        comp.load_tensors({"prompts": comp.tensors()["prompts"], "extra": torch.zeros(1)})


def test_nan_loss_is_a_training_error(backbone, source, monkeypatch):
    import importlib

    mod = importlib.import_module("cdm.training.compartment")
    real = mod.eps_loss
    monkeypatch.setattr(mod, "eps_loss", lambda *a, **k: real(*a, **k) * float("nan"))
    with pytest.raises(TrainingError, match="loss is nan at step 0"):
        train_compartment(backbone, source, CFG, progress=False)


@pytest.mark.parametrize("bad", [{"lr": float("nan")}, {"steps": 0}, {"n_prompts": 0}, {"label_dropout": 1.5},
                                 {"lr_schedule": "step"}])
def test_bad_config_is_refused(bad):
    with pytest.raises(ValueError):
        CompartmentConfig(**{**CFG.to_dict(), **bad})


@pytest.mark.parametrize("conditional", [True, False])
def test_gated_compartment_starts_exactly_at_the_backbone(backbone, conditional):
    comp = Compartment.for_backbone(backbone, CompartmentConfig(n_prompts=3, conditional=conditional))
    comp.init_prompts(torch.Generator().manual_seed(1))
    x, t = torch.randn(4, 1, 14, 14), torch.tensor([0, 10, 500, 999])
    y = torch.tensor([1, 2, 3, 10])
    with torch.no_grad():
        start = comp.eps(backbone, x, t, y if conditional else None)
        plain = backbone.net(x, t, y=y if conditional else None)
        assert torch.equal(start, plain)
        comp.prompts.table.weight[:, comp.prompts.n_prompt_numbers:] = 0.3  # open the gates: prompts now act
        assert (comp.eps(backbone, x, t, y if conditional else None) - plain).abs().max() > 1e-3
    joint = Compartment.for_backbone(backbone, CompartmentConfig(n_prompts=3, gated=False))
    assert joint.prompts.table.weight.shape[1] == backbone.config.n_blocks * 3 * backbone.config.embed_dim
    assert CompartmentConfig.from_dict({**CompartmentConfig().to_dict(), "gated": True}).gated
    legacy = {k: v for k, v in CompartmentConfig().to_dict().items() if k != "gated"}
    assert CompartmentConfig.from_dict(legacy).gated is False  # compartments written before gates existed


def test_validation_keeps_the_best_step_and_records_the_curve(backbone, source):
    from cdm.training.compartment import canonical_order, split_validation
    from cdm.training.loss import held_out_loss

    comp, record = train_compartment(backbone, source, CFG, progress=False)
    v = record.validation
    assert v["n"] == 6 and [s for s, _ in v["curve"]] == [0, 2, 4, 6]
    assert v["start_loss"] == v["curve"][0][1] and v["best_loss"] == min(x for _, x in v["curve"])
    data = canonical_order(source)
    train_rows, val_rows = split_validation(data, CFG.validation)
    again = held_out_loss(comp.denoiser(backbone), backbone.codec.encode(data.images[val_rows]), backbone.schedule,
                          y=torch.tensor(data.labels[val_rows]), draws=8, seed=CFG.seed)
    assert again == pytest.approx(v["best_loss"], abs=1e-6)  # the kept prompts are the best step's
    assert len(train_rows) == len(source) - 6 and not set(train_rows) & set(val_rows)
    _, none = train_compartment(backbone, source, CompartmentConfig(**{**CFG.to_dict(), "validation": 0.0}),
                                progress=False)
    assert none.validation is None
