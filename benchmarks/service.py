"""The service on a real store, measured over HTTP: a `cdm serve` process on 127.0.0.1 with the shipped backbone.

1. Copy the demo's store (``cdm demo`` leaves ``out/demo/store`` with ``digits-0-4``; it forgets
   ``digits-5-9``) to ``--work``, make an admin key, start ``cdm serve`` (1 worker, 1 torch thread).
2. Through the admin API, add ``digits-5-9`` (the demo's spec) and ``glyphs`` (synthetic font digits) from
   uploaded .npz files, as background jobs (progress polled).
3. Keys: alice (digits-0-4), bob (digits-5-9, glyphs), carol (digits-0-4, digits-5-9), eve (nothing), a revoked
   key, a bogus key. The leak matrix: every key x every non-empty subset of the three sources, the default
   (no sources given) and an unknown source; expected status vs observed.
4. Load: 200 generate requests, 8 at a time (4 per key, a key's share of the queue: carol / bob), 2 images,
   10 steps each.
5. The page in headless Chromium (tests/browser/page.mjs) with carol's key: 10 digits 0-9, 25 steps,
   screenshot -> ``--shot``.
6. Forget ``glyphs`` through the API; bob's default request no longer composes it, asking for it is 404.

    python benchmarks/service.py --work out/service --shot docs/service.png --out benchmarks/results/service

``burst`` (issue 14, item 5): 40 generate requests at once on a fresh `cdm serve` (1 worker, queue 16, the
default per-key share): 17 from one key whose clients give up after 0.5 s (sent first: they would fill the
queue), then 23 from three other keys whose clients retry after ``Retry-After`` on 503 (up to 90 s). Measured:
how long the other keys waited for their answers, how many 503s they got, and whether the abandoned work ran.
The store: sources alpha / beta / gamma (160 MNIST digits, tests/serverkit.py) with 4-step compartments on the
shipped backbone, so a request costs what it costs in the service. Run it against another checkout by putting
its ``src`` first on ``PYTHONPATH`` (the server process inherits it)::

    PYTHONPATH=/tmp/cdm-before/src python benchmarks/service.py burst --label before \
        --out benchmarks/results/service-burst
    python benchmarks/service.py burst --label after --out benchmarks/results/service-burst
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
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

try:
    from cdm.provenance import git_commit, machine_info
except ImportError:  # an older checkout (burst --label before)
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
        # each key keeps concurrency/2 requests in flight, within its share of the queue (per_key_queue)
        with ThreadPoolExecutor(args.concurrency // 2) as carol, ThreadPoolExecutor(args.concurrency // 2) as bob:
            futures = [(carol if i % 2 == 0 else bob).submit(one, b) for i, b in enumerate(bodies)]
            res = [f.result() for f in futures]
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
            "server": "1 worker thread, 1 torch thread, queue 16 (per key: the default share)"}
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


# ------------------------------------------------------------------------------------------------ burst
BURST_KEYS = {"impatient": ["alpha", "beta"], "alice": ["alpha", "beta"], "bob": ["beta", "gamma"],
              "carol": ["alpha", "gamma"]}


def _post(url_port: int, body: dict, token: str, timeout: float) -> tuple[int, dict, dict]:
    from serverkit import post_generate

    return post_generate(url_port, body, token, timeout)


def burst_store(root: Path, backbone: Path) -> tuple[Path, dict[str, str]]:
    """Sources alpha / beta / gamma (tests/serverkit.py) with 4-step compartments on ``backbone``; the keys."""
    from serverkit import build_store

    store, _, tokens = build_store(root, BURST_KEYS, backbone=backbone)
    return store, tokens


def burst(argv: list[str]) -> None:
    import threading

    ap = argparse.ArgumentParser(prog="service.py burst")
    ap.add_argument("--label", required=True, help="before | after (the file name of the result)")
    ap.add_argument("--work", type=Path, default=REPO / "out/service-burst")
    ap.add_argument("--backbone", type=Path, default=REPO / "weights/backbone")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/service-burst")
    ap.add_argument("--impatient", type=int, default=17)
    ap.add_argument("--others", type=int, default=23)
    ap.add_argument("--give-up", type=float, default=0.5, help="seconds before an impatient client gives up")
    ap.add_argument("--deadline", type=float, default=90.0, help="seconds a patient client keeps retrying")
    args = ap.parse_args(argv)
    log = lambda *a: print(*a, flush=True)  # noqa: E731
    import cdm

    env = f"PYTHONPATH={os.environ['PYTHONPATH']} " if os.environ.get("PYTHONPATH") else ""
    results: dict = {"command": env + "python " + " ".join(sys.argv), "label": args.label, "commit": git_commit(),
                     "cdm": str(Path(cdm.__file__).resolve().parent), "machine": machine_info()}
    work = args.work / args.label
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    t0 = time.perf_counter()
    store, tokens = burst_store(work, args.backbone)
    log(f"store in {time.perf_counter() - t0:.1f} s")
    srv = Server(store, args.backbone, "--workers", "1", "--threads", "1", "--queue", "16", "--max-steps", "100",
                 log=work / "server.log")
    body = {"n": 2, "steps": 25, "classes": [3]}  # default sources: the key's two
    try:
        for name in ("alice", "impatient"):  # warm-up (not counted), and the cost of one request
            status, _, out = _post(srv.port, {**body, "seed": 99}, tokens[name], 120)
            assert status == 200, out
        results["request"] = {**body, "sources": "the key's two (default)", "compute_seconds": out["seconds"]}
        health0 = srv.request("GET", "/healthz")[1]
        results["server"] = {"limits": health0["limits"]}

        impatient: list[dict] = []
        others: list[dict] = []
        lock = threading.Lock()

        def give_up(i: int) -> None:
            t = time.perf_counter()
            try:
                status, _, out = _post(srv.port, {**body, "seed": i}, tokens["impatient"], args.give_up)
                rec = {"status": status, "detail": out.get("detail") if status != 200 else None}
            except TimeoutError:
                rec = {"status": "gave up"}
            rec["seconds"] = round(time.perf_counter() - t, 3)
            with lock:
                impatient.append(rec)

        def patient(i: int, key: str) -> None:
            t = time.perf_counter()
            statuses, first_detail = [], None
            while True:
                status, headers, out = _post(srv.port, {**body, "seed": 100 + i}, tokens[key], 120)
                if not statuses and status == 503:
                    first_detail = out.get("detail")
                statuses.append(status)
                if status != 503 or time.perf_counter() - t > args.deadline:
                    break
                time.sleep(float(headers.get("retry-after", "1")))
            with lock:
                others.append({"key": key, "statuses": statuses, "answered": status == 200,
                               "compute_seconds": out.get("seconds") if status == 200 else None,
                               "wait_seconds": round(time.perf_counter() - t, 3),
                               "first_503_detail": first_detail})

        other_keys = ["alice", "bob", "carol"]
        load_before = list(os.getloadavg())  # the machine may be shared: say how busy it was
        threads = [threading.Thread(target=give_up, args=(i,)) for i in range(args.impatient)]
        threads += [threading.Thread(target=patient, args=(i, other_keys[i % 3])) for i in range(args.others)]
        t0 = time.perf_counter()
        for th in threads[:args.impatient]:
            th.start()
        time.sleep(0.05)  # the impatient ones first: they would fill the queue
        for th in threads[args.impatient:]:
            th.start()
        for th in threads:
            th.join(300)
        burst_wall = time.perf_counter() - t0
        deadline = time.time() + 120  # until the server is idle (abandoned work that still runs)
        while srv.request("GET", "/healthz")[1]["admitted"] and time.time() < deadline:
            time.sleep(0.1)
        idle_after = time.perf_counter() - t0
        health = srv.request("GET", "/healthz")[1]
    finally:
        srv.stop()
    waits = np.array([o["wait_seconds"] for o in others])
    first = [o["statuses"][0] for o in others]
    compute = [o["compute_seconds"] for o in others if o["compute_seconds"] is not None]
    results["burst"] = {
        "load_average_before": load_before, "load_average_after": list(os.getloadavg()),
        "others_compute_seconds_mean": round(float(np.mean(compute)), 3) if compute else None,
        "requests": args.impatient + args.others, "impatient_requests": args.impatient,
        "impatient_give_up_seconds": args.give_up, "other_requests": args.others,
        "other_keys": other_keys, "patient_retry": f"after Retry-After on 503, for up to {args.deadline:.0f} s",
    }
    results["others"] = {
        "answered_200": sum(o["answered"] for o in others),
        "first_attempt_503": sum(s == 503 for s in first),
        "first_attempt_503_key_share": sum(o["first_503_detail"] is not None and "per key" in o["first_503_detail"]
                                           for o in others),
        "total_503_responses": sum(o["statuses"].count(503) for o in others),
        "first_answer_s": round(float(waits.min()), 2),  # when the service started answering the other keys
        "wait_p50_s": round(float(np.percentile(waits, 50)), 2),
        "wait_p95_s": round(float(np.percentile(waits, 95)), 2),
        "wait_max_s": round(float(waits.max()), 2), "wait_mean_s": round(float(waits.mean()), 2),
    }
    results["impatient"] = {
        "gave_up": sum(r["status"] == "gave up" for r in impatient),
        "refused_503_at_once": sum(r["status"] == 503 for r in impatient),
        "answered_before_giving_up": sum(r["status"] == 200 for r in impatient),
    }
    generated = health["generated_requests"] - health0["generated_requests"]
    results["server_after"] = {
        "generate_requests_computed": generated,
        "abandoned_requests_computed_anyway": generated - results["others"]["answered_200"]
        - results["impatient"]["answered_before_giving_up"],
        "abandoned_queued_cancelled": health.get("abandoned_queued"),
        "abandoned_running_stopped": health.get("abandoned_running"),
        "rejected_busy": health.get("rejected_busy"), "rejected_key_share": health.get("rejected_key_share"),
        "burst_wall_s": round(burst_wall, 2), "server_idle_after_s": round(idle_after, 2),
    }
    log(json.dumps({k: results[k] for k in ("others", "impatient", "server_after")}, indent=1))
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / f"{args.label}.json", results)
    log(f"-> {args.out / (args.label + '.json')}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["burst"]:
        burst(sys.argv[2:])
    else:
        main()
