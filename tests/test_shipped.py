"""Integration tests on the shipped weights (real configs): the backbone draws the asked digit, the judge reads
held-out digits, and both load as safetensors bundles."""

from pathlib import Path

import numpy as np
import pytest
import torch

from cdm.backbone import Backbone
from cdm.data import public_protected
from cdm.evaluation import DigitClassifier, down_up, judge
from cdm.generation import sample_backbone

WEIGHTS = Path(__file__).resolve().parents[1] / "weights"


@pytest.fixture(scope="module")
def classifier():
    return DigitClassifier.from_pretrained(WEIGHTS / "classifier")


@pytest.fixture(scope="module")
def backbone():
    return Backbone.from_pretrained(WEIGHTS / "backbone")


def test_classifier_reads_held_out_digits(classifier):
    _, protected = public_protected()
    assert judge(classifier, protected.images, protected.labels)["accuracy"] >= 0.97
    assert judge(classifier, down_up(protected.images), protected.labels)["accuracy"] >= 0.97


def test_backbone_draws_the_requested_digit(backbone, classifier):
    torch.set_num_threads(2)
    images, labels = sample_backbone(backbone, per_class=10, guidance=2.0, steps=50, seed=123)
    assert images.shape == (100, 28, 28) and images.dtype == np.uint8
    assert judge(classifier, images, labels)["accuracy"] >= 0.9


def test_bf16_sampling_stays_close(backbone, classifier):
    images, labels = sample_backbone(backbone, per_class=3, guidance=2.0, steps=25, seed=7, bf16=True,
                                     solver="dpmpp2m")
    assert judge(classifier, images, labels)["accuracy"] >= 0.8


def test_shipped_backbone_hash_is_recorded(backbone):
    assert len(backbone.hash) == 64 and backbone.record["finished"]


def test_demo_runs_end_to_end(tmp_path):
    import json

    from cdm.demo import run_demo

    res = run_demo(tmp_path, backbone=WEIGHTS / "backbone", classifier=WEIGHTS / "classifier", per_class=1, steps=2,
                   progress=False, log=lambda *a: None)
    for name in ("report.md", "backbone.png", "composed.png", "weights.png", "results.json",
                 "compartment-digits-0-4.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert res["forget"]["remaining_sources"] == ["digits-0-4"] and res["forget"]["store_problems"] == []
    assert json.loads((tmp_path / "results.json").read_text())["backbone"]["n"] == 10
    assert res["compartments"]["composed"]["routed_to_owner"] == 1.0  # class priors: each digit to its owner
    assert (tmp_path / "composed-unconditional.npz").stat().st_size > 0
    att = res["attribution"]
    assert att["density"] == "class-mixture" and att["n"] == 2 and (tmp_path / "attribution.png").stat().st_size > 0
    assert all(abs(sum(s["credit"]) - 1) < 1e-6 and len(s["weight_path"]) == 2 for s in att["samples"])
    assert "Credit attribution" in (tmp_path / "report.md").read_text()
