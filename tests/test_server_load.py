"""A bounded load test on a real `cdm serve` process: 200 generate requests, 8 at a time (4 per key: a key's
share of the queue, ``per_key_queue``, is 4 by default), from two keys with different rights; zero errors, and
the latency percentiles printed."""

import json
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from serverkit import Server, build_store

REQUESTS, CONCURRENCY = 200, 8


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("load")
    store, bb, tokens = build_store(root, {"ab": ["alpha", "beta"], "g": ["gamma"]})
    srv = Server(store, bb, "--workers", "1", "--queue", "16")
    yield srv, tokens
    srv.stop()


def test_load_200_requests_8_concurrent(served):
    srv, tokens = served
    bodies = [({"sources": ["alpha", "beta"], "classes": [i % 10], "n": 2, "steps": 4, "seed": i}, tokens["ab"])
              if i % 2 == 0 else ({"n": 2, "steps": 4, "seed": i, "weighting": "naive"}, tokens["g"])
              for i in range(REQUESTS)]

    def one(args):
        body, token = args
        t0 = time.perf_counter()
        status, out = srv.request("POST", "/v1/generate", body, token=token)
        ok = status == 200 and len(out["images"]) == 2 and set(out["images"][0]["weights"]) == set(
            body.get("sources", ["gamma"]))
        return ok, status, time.perf_counter() - t0

    t0 = time.perf_counter()
    per_key = CONCURRENCY // 2  # each key keeps 4 requests in flight, within its share of the queue
    with ThreadPoolExecutor(per_key) as ab, ThreadPoolExecutor(per_key) as g:
        futures = [(ab if i % 2 == 0 else g).submit(one, b) for i, b in enumerate(bodies)]
        results = [f.result() for f in futures]
    wall = time.perf_counter() - t0
    lat = np.array([r[2] for r in results]) * 1000
    errors = [r[1] for r in results if not r[0]]
    stats = {"requests": REQUESTS, "concurrency": CONCURRENCY, "errors": len(errors),
             "p50_ms": round(float(np.percentile(lat, 50)), 1), "p95_ms": round(float(np.percentile(lat, 95)), 1),
             "max_ms": round(float(lat.max()), 1), "throughput_rps": round(REQUESTS / wall, 1)}
    print("\nload:", json.dumps(stats))
    assert not errors, errors[:5]
    health = srv.request("GET", "/healthz")[1]
    assert health["generated_requests"] >= REQUESTS and health["rejected_busy"] == 0 and health["admitted"] == 0
    assert health["rejected_key_share"] == 0 and health["abandoned_queued"] == health["abandoned_running"] == 0
