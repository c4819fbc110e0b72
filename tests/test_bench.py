"""`cdm bench` on the toy profile: the code path, the results.json schema, saved samples, resuming."""

import json
from pathlib import Path

import numpy as np
import pytest

from cdm.benchmark import PARTS, run_bench

WEIGHTS = Path(__file__).resolve().parents[1] / "weights"


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    res = run_bench("toy", out, backbone=WEIGHTS / "backbone", classifier=WEIGHTS / "classifier")
    return out, res


@pytest.mark.slow
def test_toy_bench_writes_the_documented_schema(toy):
    out, res = toy
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["table1"] == res["table1"]
    assert set(res["table1"]["2"]) == {"paragon", "router", "classifier", "isolated", "ito", "naive", "single"}
    assert all(np.isfinite(v) and v > 0 for v in res["table1"]["2"].values())
    for method in ("router", "isolated", "ito", "naive"):
        cell = res["two_domain"][method]
        assert 0 <= cell["confident_in_domain"] <= 1 and len(cell["domain_fraction"]) == 2
    assert set(res["cost"]) == {"single", "dense2", "sparse2", "dense2_classes", "sparse2_classes", "prior2_classes"}
    assert res["cost"]["dense2"]["evals"] == 2 * res["cost"]["single"]["evals"]
    assert res["cost"]["dense2_classes"]["evals"] == 2 * res["cost"]["single"]["evals"]  # no class priors: dense
    # class priors on disjoint class groups: one compartment per sample, from the first step
    assert res["cost"]["prior2_classes"]["evals"] == res["cost"]["single"]["evals"]
    assert set(res["table1_classes"]["2"]) == {"paragon", "router", "classifier", "isolated", "ito", "naive",
                                               "single", "class_prior"}
    assert res["table1_classes_detail"]["2"]["groups"] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    u = res["unconditional_detail"]
    assert res["unconditional_confident"] == u["mixture"]["confident"] and 0 <= u["null"]["confident"] <= 1
    drawn = np.load(out / "samples" / "unconditional-classes2-mixture.npz")
    assert drawn["labels"].shape == (20,) and set(drawn["labels"].tolist()) <= set(range(10))
    assert "labels" not in np.load(out / "samples" / "unconditional-classes2-null.npz")
    assert set(res["forget"]) >= {"source_seconds", "sample_seconds", "paragon_seconds"}
    assert [r["n_sources"] for r in res["continual"]] == [1, 2, 1] and res["continual"][0]["fid_relative_to_one"] == 1
    assert set(res["memorization"]) == {"paragon", "router", "classifier", "isolated", "ito", "naive", "single"}
    assert all(0 <= v <= 1 for v in res["memorization"].values())
    assert res["meta"]["profile"] == "toy" and set(res["meta"]["part_seconds"]) == set(PARTS)
    assert set(res["table1_selection"]["2"]["best_steps"]) == {"s0", "s1"}
    samples = np.load(out / "samples" / "table1-k2-router.npz")
    assert samples["images"].shape == (20, 28, 28) and samples["images"].dtype == np.uint8
    assert list(samples["labels"]) == list(np.repeat(np.arange(10), 2))
    assert set(res["dp"]) == {"3", "8", "inf"} and res["dp"]["inf"]["epsilon"] is None
    assert 0 < res["dp"]["3"]["epsilon"] <= 3.05 and res["dp"]["3"]["dp"]["noise_multiplier"] > 0
    assert 0 <= res["attribution"]["same_domain_entropy"] <= 1
    assert res["attribution"]["density"].startswith("class mixture")
    assert (out / "stores" / "two-domain-classes" / "registry.sqlite").exists()  # its own class-conditional pair
    for f in ("report.md", "table1.png", "table1_classes.png", "two_domain_weights.png", "continual.png", "credit.png"):
        assert (out / f).stat().st_size > 0
    assert "Table 1 analog" in (out / "report.md").read_text()


@pytest.mark.slow
def test_rerun_resumes_from_cached_parts_and_refuses_another_profile(toy):
    out, res = toy
    before = {p: (out / "parts" / f"{p}.json").stat().st_mtime_ns for p in PARTS}
    again = run_bench("toy", out, backbone=WEIGHTS / "backbone", classifier=WEIGHTS / "classifier")
    assert again["table1"] == res["table1"]
    assert {p: (out / "parts" / f"{p}.json").stat().st_mtime_ns for p in PARTS} == before  # nothing recomputed
    with pytest.raises(ValueError, match="another profile"):
        run_bench("quick", out, backbone=WEIGHTS / "backbone", classifier=WEIGHTS / "classifier")
    with pytest.raises(ValueError, match="unknown parts"):
        run_bench("toy", out, backbone=WEIGHTS / "backbone", classifier=WEIGHTS / "classifier", parts=("tables",))


@pytest.mark.parametrize("naive, single8, verdicts", [
    (40.78, 40.43, ("MISSED", "met", "MISSED")),  # the quick run on the glyph backbone: equal is not "worse"
    (40.78, 33.0, ("MISSED", "MISSED", "MISSED")),  # single improving from 4 to 8 sources is not degrading
    (44.0, 41.0, ("met", "met", "MISSED")),  # 5% worse is clearly worse; single strictly degrading
])
def test_report_checks_the_targets_with_margins(naive, single8, verdicts):
    from cdm.benchmark import report

    t = {"2": {"paragon": 27.0, "router": 30.0, "isolated": 30.0, "ito": 31.0, "naive": 30.0, "single": 30.0},
         "4": {"paragon": 27.0, "router": 34.0, "isolated": 34.0, "ito": 35.0, "naive": 34.0, "single": 34.8},
         "8": {"paragon": 27.0, "router": 40.77, "isolated": 40.8, "ito": 41.6, "naive": naive, "single": single8}}
    meta = {"profile": "quick", "commit": "x", "machine": {}, "wall_seconds": 1.0, "profile_config": {}}
    lines = [ln for ln in report({"table1": t, "meta": meta}).splitlines() if ln.startswith("- ")]
    naive_line = next(ln for ln in lines if ln.startswith("- naive"))
    single_line = next(ln for ln in lines if ln.startswith("- single"))
    paragon_line = next(ln for ln in lines if ln.startswith("- composed"))
    assert naive_line.endswith(verdicts[0]) and single_line.endswith(verdicts[1])
    assert paragon_line.endswith(verdicts[2])  # 40.77 / 27 = 1.51


def test_report_says_where_each_part_ran():
    from cdm.benchmark import report, where_ran

    gpu = where_ran({"machine": {"cpus": 16, "torch_threads": 3, "torch": "2.11", "cuda": "NVIDIA H200"},
                  "device": "cuda"})
    cpu = where_ran({"machine": {"cpus": 2, "torch_threads": 1, "torch": "2.13", "cuda": None}, "device": "cpu"})
    assert "H200" in gpu and "H200" not in cpu
    meta = {"profile": "full", "commit": "x", "wall_seconds": 1.0, "profile_config": {},
            "part_machines": {"paragon": gpu, "table1": gpu, "continual": cpu}}
    text = report({"meta": meta})
    assert f"- {gpu}: paragon, table1" in text and f"- {cpu}: continual" in text
