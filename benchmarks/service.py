"""The service on a real store, measured over HTTP: a `cdm serve` process on 127.0.0.1 with the shipped backbone.

1. Copy the demo's store (``cdm demo`` leaves ``out/demo/store`` with ``digits-0-4``; it forgets
   ``digits-5-9``) to ``--work``, make an admin key, start ``cdm serve`` (1 worker, 1 torch thread).
2. Through the admin API, add ``digits-5-9`` (the demo's spec) and ``glyphs`` (synthetic font digits) from
   uploaded .npz files, as background jobs (progress polled).
3. Keys: alice (digits-0-4), bob (digits-5-9, glyphs), carol (digits-0-4, digits-5-9), eve (nothing), a revoked
   key, a bogus key. The leak matrix: every key x every non-empty subset of the three sources, the default
   (no sources given) and an unknown source; expected status vs observed.
4. Load: 200 generate requests, 8 at a time (alternating keys carol / bob), 2 images, 10 steps each.
5. The page in headless Chromium (tests/browser/page.mjs) with carol's key: 10 digits 0-9, 25 steps,
   screenshot -> ``--shot``.
6. Forget ``glyphs`` through the API; bob's default request no longer composes it, asking for it is 404.

    python benchmarks/service.py --work out/service --shot docs/service.png --out benchmarks/results/service
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from serverkit import Server, multipart  # noqa: E402

from cdm.data import load_source  # noqa: E402
from cdm.io import atomic_write_json  # noqa: E402
from cdm.server.keys import create_key, revoke_key  # noqa: E402
from cdm.store import Store  # noqa: E402
from cdm.training import git_commit, machine_info  # noqa: E402

SOURCES = ("digits-0-4", "digits-5-9", "glyphs")
UPLOADS = {"digits-5-9": ("mnist/protected/classes[0-4|5-9]-1", 100), "glyphs": ("glyphs:digits:1000:seed=0", 50)}
KEYS = {"alice": ["digits-0-4"], "bob": ["digits-5-9", "glyphs"], "carol": ["digits-0-4", "digits-5-9"],
        "eve": [], "mallory": list(SOURCES)}  # mallory's key is revoked


def npz_bytes(src) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, images=src.images, labels=src.labels)
    return buf.getvalue()


def wait_job(srv, token, job_id, log) -> dict:
    last = None
    while True:
        job = srv.request("GET", f"/v1/admin/jobs/{job_id}", token=token)[1]
        if job["progress"] != last:
            log(f"  job {job['target']}: {job['status']} {job['steps_done']}/{job['steps_total']}")
            last = job["progress"]
        if job["status"] in ("done", "failed"):
            return job
        time.sleep(1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--demo-store", type=Path, default=REPO / "out/demo/store")
    ap.add_argument("--work", type=Path, default=REPO / "out/service")
    ap.add_argument("--shot", type=Path, default=REPO / "docs/service.png")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/service")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=8)
    args = ap.parse_args()
    log = lambda *a: print(*a, flush=True)  # noqa: E731
    results: dict = {"command": "python " + " ".join(sys.argv), "commit": git_commit(), "machine": machine_info()}

    store = args.work / "store"
    if args.work.exists():
        shutil.rmtree(args.work)
    shutil.copytree(args.demo_store, store, ignore=shutil.ignore_patterns(".lock"))
    with Store.open(store) as st:
        results["demo_store_sources"] = [s["id"] for s in st.sources()]
        admin, _ = create_key(st, "admin", admin=True, actor="benchmark")
    srv = Server(store, REPO / "weights/backbone", "--workers", "1", "--threads", "1", "--queue", "16",
                 "--max-steps", "100", log=args.work / "server.log")
    try:
        # 2. sources through the admin API
        results["add_source_jobs"] = {}
        for name, (spec, steps) in UPLOADS.items():
            src = load_source(spec)
            body, ctype = multipart({"name": name, "tags": "benchmark", "steps": str(steps)},
                                    {"file": (f"{name}.npz", npz_bytes(src))})
            status, out = srv.request("POST", "/v1/admin/sources", raw=body, token=admin,
                                      headers={"Content-Type": ctype})
            assert status == 202, out
            log(f"add {name} ({len(src)} images, {steps} steps) -> job {out['job']['id']}")
            job = wait_job(srv, admin, out["job"]["id"], log)
            assert job["status"] == "done", job
            results["add_source_jobs"][name] = {"spec": spec, "n": len(src), **job["result"],
                                                "job_seconds": round(job["finished_at"] - job["started_at"], 1)}
        # 3. keys and the leak matrix
        tokens = {}
        with Store.open(store) as st:
            for name, grants in KEYS.items():
                tokens[name], _ = create_key(st, name, sources=grants, actor="benchmark")
            revoke_key(st, "mallory", actor="benchmark")
        tokens["admin"] = admin
        tokens["bogus"] = "cdm_" + "x" * 43
        subsets = [list(c) for r in range(1, 4) for c in itertools.combinations(SOURCES, r)]
        cols = ["+".join(s) for s in subsets] + ["(default)", "unknown"]
        matrix, wrong = {}, []
        for key, token in tokens.items():
            grants = None if key == "admin" else KEYS.get(key)
            live = key not in ("mallory", "bogus")
            for subset, col in zip(subsets + [None, ["nope"]], cols, strict=True):
                body = {"n": 1, "steps": 6, "classes": [3]}
                if subset is not None:
                    body["sources"] = subset
                status, out = srv.request("POST", "/v1/generate", body, token=token)
                if not live:
                    expect = 401
                elif col == "unknown":
                    expect = 404
                elif subset is None:
                    expect = 200 if (grants is None or grants) else 403
                else:
                    expect = 200 if grants is None or set(subset) <= set(grants) else 403
                if status == 200:
                    want = subset if subset is not None else (list(SOURCES) if grants is None else grants)
                    if out["sources"] != want or any(set(i["weights"]) != set(want) for i in out["images"]):
                        wrong.append((key, col, "composed other sources than asked"))
                if status != expect:
                    wrong.append((key, col, status, expect))
                matrix.setdefault(key, {})[col] = status
        results["leak_matrix"] = {"columns": cols, "rows": matrix, "mismatches": wrong,
                                  "checked": len(tokens) * len(cols)}
        log("leak matrix:")
        log(f"{'':>8} " + " ".join(f"{c:>13.13}" for c in cols))
        for key, row in matrix.items():
            log(f"{key:>8} " + " ".join(f"{row[c]:>13}" for c in cols))
        log(f"mismatches: {wrong}")

        # 4. load
        bodies = [({"sources": ["digits-0-4", "digits-5-9"], "classes": [i % 10], "n": 2, "steps": 10, "seed": i},
                   tokens["carol"]) if i % 2 == 0 else
                  ({"n": 2, "steps": 10, "seed": i, "classes": [i % 10]}, tokens["bob"]) for i in range(args.requests)]

        def one(a):
            t0 = time.perf_counter()
            status, out = srv.request("POST", "/v1/generate", a[0], token=a[1])
            return status, time.perf_counter() - t0, (out.get("seconds") if status == 200 else None)

        srv.request("POST", "/v1/generate", bodies[0][0], token=bodies[0][1])  # warm-up (not counted)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            res = list(pool.map(one, bodies))
        wall = time.perf_counter() - t0
        lat = np.array([r[1] for r in res]) * 1000
        compute = np.array([r[2] for r in res if r[2] is not None]) * 1000
        results["load"] = {
            "requests": args.requests, "concurrency": args.concurrency, "errors": sum(r[0] != 200 for r in res),
            "statuses": {str(s): sum(r[0] == s for r in res) for s in sorted({r[0] for r in res})},
            "request": "2 images, 10 steps, class-conditional; carol: digits-0-4+digits-5-9 (ito, ddpm), "
                       "bob: digits-5-9+glyphs (default sources)",
            "p50_ms": round(float(np.percentile(lat, 50)), 1), "p95_ms": round(float(np.percentile(lat, 95)), 1),
            "max_ms": round(float(lat.max()), 1), "compute_p50_ms": round(float(np.percentile(compute, 50)), 1),
            "throughput_rps": round(args.requests / wall, 2), "wall_s": round(wall, 1),
            "server": "1 worker thread, 1 torch thread, queue 16"}
        log("load:", json.dumps(results["load"]))

        # 5. the page
        args.shot.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        page = subprocess.run(["node", str(REPO / "tests/browser/page.mjs"), srv.url + "/", tokens["carol"],
                               str(args.shot.resolve())], capture_output=True, text=True, timeout=300,
                              cwd=REPO / "tests/browser")
        assert page.returncode == 0, page.stdout + page.stderr
        seen = json.loads(page.stdout.strip().splitlines()[-1])
        results["page"] = {"sources_offered": seen["sources"], "images": len(seen["cards"]),
                           "weights": [dict(c["weights"]) for c in seen["cards"]], "status": seen["status"],
                           "errors": seen["errors"], "seconds": round(time.perf_counter() - t0, 1),
                           "screenshot": str(args.shot)}
        log("page:", seen["sources"], seen["status"])

        # 6. forget glyphs through the API
        status, out = srv.request("DELETE", "/v1/admin/sources/glyphs?reason=benchmark", token=admin)
        after = {
            "forget_status": status, "forget_seconds": out.get("seconds"),
            "bob_lists": [s["name"] for s in srv.request("GET", "/v1/sources", token=tokens["bob"])[1]["sources"]],
            "bob_default_sources": srv.request("POST", "/v1/generate", {"n": 1, "steps": 6, "classes": [7]},
                                               token=tokens["bob"])[1]["sources"],
            "bob_asks_glyphs": srv.request("POST", "/v1/generate", {"n": 1, "steps": 6, "sources": ["glyphs"]},
                                           token=tokens["bob"])[0],
            "admin_asks_glyphs": srv.request("POST", "/v1/generate", {"n": 1, "steps": 6, "sources": ["glyphs"]},
                                             token=admin)[0],
        }
        results["forget"] = after
        log("forget:", after)
        results["audit_tail"] = [(a["actor"], a["action"], a["target"]) for a in
                                 srv.request("GET", "/v1/admin/audit?limit=12", token=admin)[1]]
    finally:
        srv.stop()
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "results.json", results)
    log(f"-> {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
