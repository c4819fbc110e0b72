"""Emoji by five artists, beyond the data (test_emoji.py): licences as store tags and key grants by tag, the colour
judge with an artist head, the emoji benchmark and demo end to end on tiny configs (a 2-step backbone and judge:
the numbers mean nothing, the paths and the result keys are what is checked)."""

import json
import sqlite3

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cdm.benchmark.emoji import EMOJI_PARTS, PROTECTED, populated_categories, run_emoji_bench, targets
from cdm.cli.main import app
from cdm.data import EMOJI_CATEGORIES, Source, license_of, load_source
from cdm.errors import DataError
from cdm.evaluation import ClassifierConfig, FIDScorer, ImageClassifier, classify, source_probs, train_classifier
from cdm.evaluation.emoji_judge import ARTIST_ORDER, emoji_judge_config, judge_data
from cdm.operations import license_tags
from cdm.server.keys import authenticate, create_key
from cdm.store import Store
from cdm.training import PretrainConfig, pretrain


def _src(name: str, seed: int) -> Source:
    rng = np.random.default_rng(seed)
    return Source(name, rng.integers(0, 255, (4, 8, 8), dtype=np.uint8))


def _register(st: Store, name: str, tags: list[str]) -> None:
    s = _src(name, len(name))
    st.add_source(name, content_hash=s.content_hash, n=len(s), classes=[], tags=tags)


# -- licences and grants by tag --------------------------------------------------------------------------------


def test_emoji_sources_carry_their_licence_as_a_tag():
    assert license_of("emoji:twemoji") == "CC-BY-4.0"
    assert license_of("emoji:openmoji/strat2-0") == "CC-BY-SA-4.0"  # splits keep the prefix
    assert license_of("emoji:fluent:animals-nature@32x32x3") == "MIT"
    assert license_of("emoji:noto") == "Apache-2.0"
    assert license_of("mnist/protected") is None and license_of("emoji:apple") is None
    src = load_source("emoji:twemoji/strat2-0")
    assert license_tags(src, ("demo",)) == ("demo", "license:CC-BY-4.0")
    assert license_tags(src, ("license:custom",)) == ("license:custom",)  # an explicit licence wins
    assert license_tags(load_source("mnist/protected/strat2-0")) == ()


def test_a_key_granted_by_tag_follows_the_tags(tmp_path):
    with Store.create(tmp_path / "st") as st:
        _register(st, "twemoji", ["license:CC-BY-4.0"])
        _register(st, "openmoji", ["license:CC-BY-SA-4.0"])
        _register(st, "fluent", ["license:MIT"])
        token, key = create_key(st, "cc-by", tags=["license:CC-BY-*"])
        by_name, _ = create_key(st, "named", sources=["fluent"])
        exact, _ = create_key(st, "exact", tags=["license:CC-BY-4.0"])
        assert key.sources == ("openmoji", "twemoji") and key.tags == ("license:CC-BY-*",) and key.granted == ()
        assert key.may_use("twemoji") and not key.may_use("fluent")
        assert authenticate(st, exact).sources == ("twemoji",)
        # a source added later with a matching tag is granted at once; a retag takes it away
        _register(st, "emojione", ["license:CC-BY-SA-4.0"])
        assert authenticate(st, token).sources == ("emojione", "openmoji", "twemoji")
        st.set_tags("twemoji", ["license:custom"])
        assert authenticate(st, token).sources == ("emojione", "openmoji")
        assert authenticate(st, exact).sources == ()
        # forgetting a source removes it from tag grants and from named grants alike
        st.forget_source("openmoji", reason="test")
        st.forget_source("fluent", reason="test")
        assert authenticate(st, token).sources == ("emojione",)
        assert authenticate(st, by_name).sources == ()
        created = [a for a in st.audit_log() if a["action"] == "key-create" and a["target"] == "cc-by"]
        assert created[0]["details"]["tags"] == ["license:CC-BY-*"]
        with pytest.raises(Exception, match="tag"):
            create_key(st, "bad", tags=[""])
        assert "bad" not in {k["name"] for k in st.keys()}


def test_a_schema_3_store_gains_tag_grants_on_open(tmp_path):
    with Store.create(tmp_path / "st") as st:
        _register(st, "twemoji", ["license:CC-BY-4.0"])
        token, _ = create_key(st, "old", sources=["twemoji"])
    db = sqlite3.connect(tmp_path / "st" / "registry.sqlite")
    db.executescript("DROP TABLE api_key_tags; PRAGMA user_version=3;")
    db.close()
    with Store.open(tmp_path / "st") as st:
        assert authenticate(st, token).sources == ("twemoji",)
        _, key = create_key(st, "new", tags=["license:*"])
        assert key.sources == ("twemoji",)


def test_cli_keys_create_by_tag(tmp_path):
    with Store.create(tmp_path / "st") as st:
        _register(st, "twemoji", ["license:CC-BY-4.0"])
        _register(st, "fluent", ["license:MIT"])
    run = CliRunner().invoke
    res = run(app, ["keys", "create", "customer", "--store", str(tmp_path / "st"), "--tags", "license:CC-BY-*"])
    assert res.exit_code == 0, res.output
    assert "twemoji" in res.output and "fluent" not in res.output.split("keep the token")[0]
    res = run(app, ["keys", "list", "--store", str(tmp_path / "st")], env={"COLUMNS": "200"})
    assert res.exit_code == 0 and "license:CC-BY-*" in res.output


# -- the colour judge ------------------------------------------------------------------------------------------


def test_an_rgb_classifier_with_a_source_head(tmp_path):
    images, cats, artists = judge_data(1)
    pick = np.random.default_rng(0).choice(len(images), 200, replace=False)
    cfg = ClassifierConfig(num_classes=10, widths=(8, 16), feature_dim=16, image_size=32, channels=3, num_sources=5)
    model, record = train_classifier(images[pick], cats[pick], sources=artists[pick], config=cfg, steps=3,
                                     batch_size=16, progress=False, background=1.0)
    assert record["with_sources"] and record["config"]["num_sources"] == 5
    probs = source_probs(model, images[:7])
    assert probs.shape == (7, 5) and np.allclose(probs.sum(1), 1, atol=1e-5)
    pred, prob, feats = classify(model, images[:7].transpose(0, 3, 1, 2))  # channels-first is accepted too
    assert pred.shape == (7,) and feats.shape == (7, 16)
    model.save_pretrained(tmp_path / "judge", record=record)
    loaded = ImageClassifier.from_pretrained(tmp_path / "judge")
    assert np.allclose(source_probs(loaded, images[:7]), probs, atol=1e-6)
    assert FIDScorer(loaded, images[:50])(images[50:100]) >= 0
    with pytest.raises(DataError, match=r"\(N, 32, 32, 3\)"):
        classify(loaded, np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(DataError, match="no source head"):
        source_probs(ImageClassifier(ClassifierConfig()), np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(DataError, match="source head"):
        train_classifier(images[:8], cats[:8], sources=artists[:8], config=ClassifierConfig(image_size=32,
                                                                                             channels=3), steps=1)
    with pytest.raises(ValueError, match="num_sources"):
        ClassifierConfig(num_sources=1)


def test_the_judge_halves_are_disjoint_and_cover_every_artist():
    a_img, a_cat, a_art = judge_data(0)
    b_img, b_cat, b_art = judge_data(1)
    assert len(a_img) + len(b_img) == 5 * 1081
    assert sorted(set(a_art.tolist())) == list(range(5)) == sorted(set(b_art.tolist()))
    for i, _ in enumerate(ARTIST_ORDER):  # per artist the halves split the subjects
        ha = [x.tobytes() for x in a_img[a_art == i]]
        hb = [x.tobytes() for x in b_img[b_art == i]]
        drawn_twice = {h for h in ha + hb if (ha + hb).count(h) > 1}  # Fluent draws 2 pairs of subjects alike
        assert len(drawn_twice) <= 2 and not (set(ha) & set(hb)) - drawn_twice
    assert emoji_judge_config().num_sources == 5 and len(populated_categories()) == 8


# -- the benchmark and the demo, end to end on tiny weights -----------------------------------------------------


@pytest.fixture(scope="module")
def tiny_emoji(tmp_path_factory):
    root = tmp_path_factory.mktemp("emoji")
    cfg = PretrainConfig(data="emoji:noto", data_size=32, channels=3, img_size=16, patch_size=4, embed_dim=16,
                         depth=3, num_heads=2, steps=2, batch_size=8, warmup=1, checkpoint_every=2)
    assert pretrain(cfg, root / "bb", progress=False)["finished"]
    images, cats, artists = judge_data(1)
    cfg = ClassifierConfig(num_classes=10, widths=(8, 16), feature_dim=16, image_size=32, channels=3, num_sources=5)
    model, record = train_classifier(images[:64], cats[:64], sources=artists[:64], config=cfg, steps=2,
                                     batch_size=16, progress=False)
    model.save_pretrained(root / "judge", record=record)
    return root


def test_emoji_bench_toy_writes_every_result(tiny_emoji, tmp_path):
    torch.manual_seed(0)
    res = run_emoji_bench("toy", tmp_path / "bench", backbone=tiny_emoji / "bb", judge=tiny_emoji / "judge",
                          meta={"command": "test"})
    for key in ("judge", "backbone", "artists", "composed", "attribution", "memorization", "forget_seconds", "meta"):
        assert key in res, key
    assert set(res["judge"]) >= {"artist_acc", "category_acc"}
    assert set(res["backbone"]) >= {"fid", "category_acc"}
    assert set(res["artists"]) == set(PROTECTED)
    for v in res["artists"].values():
        assert set(v) >= {"fid_backbone", "fid_compartment", "artist_acc"} and 0 <= v["artist_acc"] <= 1
        assert any(t.startswith("license:") for t in v["tags"])
    assert set(res["composed"]) == {"router", "ito", "naive"}
    for v in res["composed"].values():
        assert 0 <= v["in_set"] <= 1 and 0 <= v["hybrid"] <= 1 and v["in_set"] + v["hybrid"] <= 1 + 1e-9
    assert "top1" in res["attribution"]
    assert set(res["memorization"]) >= {"backbone", "ito", "naive", "router", *PROTECTED}
    assert res["forget"]["remaining"] == sorted(a for a in PROTECTED if a != "emojione")
    assert res["targets"] == targets(res) and "hybrid_at_most_half_of_naive" in res["targets"]
    assert res["meta"]["command"] == "test" and len(res["meta"]["categories"]) == 8
    assert (tmp_path / "bench" / "report.md").read_text().startswith("# Emoji by five artists")
    assert json.loads((tmp_path / "bench" / "results.json").read_text())["artists"] == res["artists"]
    # resumable: a second run reads every part from its cache
    again = run_emoji_bench("toy", tmp_path / "bench", backbone=tiny_emoji / "bb", judge=tiny_emoji / "judge",
                            parts=EMOJI_PARTS)
    assert again["artists"] == res["artists"]
    with pytest.raises(ValueError, match="another profile"):
        run_emoji_bench("quick", tmp_path / "bench", backbone=tiny_emoji / "bb", judge=tiny_emoji / "judge")


def test_emoji_bench_refuses_a_digit_backbone(tmp_path, tiny_emoji):
    with pytest.raises(ValueError, match="backbone of 32x32 RGB images"):
        run_emoji_bench("toy", tmp_path / "b", backbone="shipped:backbone", judge=tiny_emoji / "judge")
    with pytest.raises(ValueError, match="not an emoji judge"):
        run_emoji_bench("toy", tmp_path / "b", backbone=tiny_emoji / "bb", judge="shipped:classifier")
    assert not (tmp_path / "b").exists()


def test_emoji_demo_cli(tiny_emoji, tmp_path):
    res = CliRunner().invoke(app, ["demo", "--dataset", "emoji", "--out", str(tmp_path / "demo"), "--backbone",
                                   str(tiny_emoji / "bb"), "--classifier", str(tiny_emoji / "judge"), "--steps", "2",
                                   "--per-class", "1", "--text"])
    assert res.exit_code == 0, res.output
    out = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert set(out["compartments"]) == set(PROTECTED)
    assert len(out["text"]["prompts"]) == 6 and set(out["text"]) >= {"ito", "naive"}
    assert out["key"]["may_use"] == ["emojione", "openmoji", "twemoji"]  # every CC-BY* licence, not MIT
    assert out["forget"]["key_may_use_after"] == ["openmoji", "twemoji"]
    assert out["forget"]["remaining"] == ["fluent", "openmoji", "twemoji"] and not out["forget"]["store_problems"]
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "emoji by five artists" in report and (tmp_path / "demo" / "composed-naive.png").exists()
    assert "Captions in, images out" in report and (tmp_path / "demo" / "text-ito.png").exists()
    assert EMOJI_CATEGORIES[0] in report


def test_emoji_bench_cli_runs_chosen_parts(tiny_emoji, tmp_path):
    out = tmp_path / "b"
    res = CliRunner().invoke(app, ["bench", "--dataset", "emoji", "--profile", "toy", "--out", str(out), "--parts",
                                   "judge,backbone", "--backbone", str(tiny_emoji / "bb"), "--classifier",
                                   str(tiny_emoji / "judge")])
    assert res.exit_code == 0, res.output
    got = json.loads((out / "results.json").read_text())
    assert set(got) >= {"judge", "backbone", "meta"} and "artists" not in got
    assert got["meta"]["command"].startswith("cdm ")
    res = CliRunner().invoke(app, ["bench", "--dataset", "emoji", "--profile", "toy", "--out", str(out), "--parts",
                                   "tables", "--backbone", str(tiny_emoji / "bb"), "--classifier",
                                   str(tiny_emoji / "judge")])
    assert res.exit_code != 0 and "unknown parts" in str(res.exception)
