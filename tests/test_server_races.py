"""The service under concurrency, with real threads against a real `cdm serve` process on 127.0.0.1 (issue 14):

- forgetting a source races with generate requests: the forget waits for work in progress, queued work resolves
  its default sources when it starts (so it composes what remains), and queued work that named the source gets
  410; a sample-level forget's removal waits for work in progress too;
- abandoned requests: a client that gives up frees its place (queued work is cancelled, running work stops),
  one key holds at most ``per_key_queue`` places, and every generate request is in the audit log (key name,
  never the token).

Timing is bounded: every wait has a deadline, the slow requests take a few seconds on the tiny backbone."""

from __future__ import annotations

import http.client
import json
import shutil
import threading
import time

import pytest

from serverkit import Server, build_store, post_generate, small_parts

KEYS = {"admin": None, "hb": ["alpha", "beta"], "imp": ["alpha"], "other": ["beta", "gamma"], "third": ["gamma"]}
TINY = {"n": 1, "steps": 2}
# Seconds on the tiny backbone even on an idle machine (at 400 steps an idle CI machine answered a request in under
# the 1 s its client waited, so "a running request whose client leaves" was not running any more).
SLOW = {"n": 48, "steps": 1000, "classes": [0]}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("races")
    store, bb, tokens = build_store(root, KEYS)
    return root, store, bb, tokens


def _server(built, tmp_path, *args) -> tuple[Server, dict]:
    """A server on a fresh copy of the module's store (each test forgets different things)."""
    _, store, bb, tokens = built
    copy = tmp_path / "store"
    shutil.copytree(store, copy, ignore=shutil.ignore_patterns(".lock"))
    return Server(copy, bb, "--max-steps", str(SLOW["steps"]), "--max-n", str(SLOW["n"]), *args), tokens


def _wait_for(srv, what, predicate, timeout=30.0):
    deadline = time.time() + timeout
    while True:
        health = srv.request("GET", "/healthz")[1]
        if predicate(health):
            return health
        assert time.time() < deadline, (what, health)
        time.sleep(0.02)


def _in_thread(results, name, fn, *args, **kwargs) -> threading.Thread:
    def run():
        out = fn(*args, **kwargs)
        results[name] = (*out, time.time()) if isinstance(out, tuple) else (out, time.time())

    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th


def _post(srv, body, token, timeout=120.0):
    """POST /v1/generate: (status, headers, json)."""
    return post_generate(srv.port, body, token, timeout)


def _abandon(srv, body, token, after: float) -> str:
    """POST /v1/generate and give up after ``after`` seconds (the socket is closed, as a client that gives up
    does)."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=after)
    try:
        conn.request("POST", "/v1/generate", body=json.dumps(body),
                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        res = conn.getresponse()
        return f"answered {res.status}"
    except TimeoutError:
        return "gave up"
    finally:
        conn.close()


def test_forget_waits_for_work_in_progress_and_queued_work_resolves_late(built, tmp_path):
    """A (running, default sources alpha+beta) finishes with beta and is answered no later than the DELETE;
    queued B (default sources) composes alpha only; queued C (named alpha+beta) gets 410; queued D (named alpha)
    is unaffected. A sample-level forget's removal waits for a running request on that source."""
    srv, tokens = _server(built, tmp_path)
    try:
        res: dict = {}
        threads = [_in_thread(res, "A", _post, srv, SLOW, tokens["hb"])]
        _wait_for(srv, "A running", lambda h: h["running"] == 1)
        threads += [_in_thread(res, "B", _post, srv, TINY, tokens["hb"]),
                    _in_thread(res, "C", _post, srv, {"sources": ["alpha", "beta"], **TINY}, tokens["hb"]),
                    _in_thread(res, "D", _post, srv, {"sources": ["alpha"], **TINY}, tokens["admin"])]
        _wait_for(srv, "B, C, D queued", lambda h: h["admitted"] == 4 and h["running"] == 1)
        status, out = srv.request("DELETE", "/v1/admin/sources/beta?reason=race", token=tokens["admin"])
        deleted_at = time.time()
        assert status == 200 and out["removed"] == ["beta"], out
        for th in threads:
            th.join(120)
        a_status, _, a_out, a_at = res["A"]
        assert a_status == 200 and a_out["sources"] == ["alpha", "beta"]  # its work started before the forget
        assert a_at <= deleted_at + 1.0, (a_at - deleted_at)  # A was not still computing after the DELETE ...
        b_status, _, b_out, _ = res["B"]
        assert b_status == 200 and b_out["sources"] == ["alpha"], (b_status, b_out)  # resolved when it started
        assert all(set(img["weights"]) == {"alpha"} for img in b_out["images"])
        c_status, _, c_out, _ = res["C"]
        assert c_status == 410 and "beta" in c_out["detail"], (c_status, c_out)
        d_status, _, d_out, _ = res["D"]
        assert d_status == 200 and d_out["sources"] == ["alpha"], (d_status, d_out)
        assert srv.request("POST", "/v1/generate", {"sources": ["beta"], **TINY}, token=tokens["hb"])[0] == 404
        assert out["waited_seconds"] > 0.5, out  # ... because the DELETE waited for its work

        # a sample-level forget: its removal waits for a running request composing that source
        res = {}
        th = _in_thread(res, "E", _post, srv, {"sources": ["alpha", "gamma"], **SLOW}, tokens["admin"])
        _wait_for(srv, "E running", lambda h: h["running"] == 1)
        ids = list(small_parts()["gamma"].sample_hashes[:2])
        status, out = srv.request("POST", "/v1/admin/sources/gamma/forget-samples", {"sample_ids": ids},
                                  token=tokens["admin"])
        assert status == 202, out
        th.join(120)
        deadline = time.time() + 60
        while True:
            job = srv.request("GET", f"/v1/admin/jobs/{out['job']['id']}", token=tokens["admin"])[1]
            if job["status"] in ("done", "failed"):
                break
            assert time.time() < deadline, job
            time.sleep(0.05)
        e_status, _, e_out, e_at = res["E"]
        assert job["status"] == "done" and e_status == 200 and e_out["sources"] == ["alpha", "gamma"]
        assert e_out["compartments"][1]["weights_sha256"] == job["result"]["before"]  # E used the old gamma ...
        assert job["finished_at"] >= e_at - 0.5, (job["finished_at"] - e_at)  # ... and finished before the removal
    finally:
        srv.stop()


def test_abandoned_requests_free_their_places_and_keys_have_a_share(built, tmp_path):
    """workers 1, queue 16, per_key_queue 4 (the defaults): while A (key other) runs, key imp queues 4 slow
    requests and gives up on them; a 5th from imp is refused at once (503, its share is full) while key third
    is still admitted; the 4 abandoned ones are cancelled within a poll of their clients leaving (they never
    run), so third is answered right after A. A running request whose client leaves stops too. Every generate
    request is in the audit log by key name, never with the token."""
    srv, tokens = _server(built, tmp_path)
    try:
        res: dict = {}
        threads = [_in_thread(res, "A", _post, srv, {"sources": ["beta", "gamma"], **SLOW}, tokens["other"])]
        _wait_for(srv, "A running", lambda h: h["running"] == 1)
        a_started = time.time()
        threads += [_in_thread(res, f"imp{i}", _abandon, srv, {"seed": i, **SLOW}, tokens["imp"], after=2.0)
                    for i in range(4)]
        _wait_for(srv, "imp queued", lambda h: h["admitted"] == 5)
        t0 = time.perf_counter()
        status, headers, out = _post(srv, {"seed": 9, **SLOW}, tokens["imp"])
        assert status == 503 and time.perf_counter() - t0 < 2, (status, out)
        assert "limit 4 per key" in out["detail"] and headers.get("retry-after") == "1", (out, headers)
        threads.append(_in_thread(res, "third", _post, srv, TINY, tokens["third"]))
        _wait_for(srv, "third queued", lambda h: h["admitted"] == 6)
        for th in threads[1:5]:
            th.join(10)
        gave_up = time.time()
        assert [res[f"imp{i}"][0] for i in range(4)] == ["gave up"] * 4
        health = _wait_for(srv, "abandoned freed", lambda h: h["admitted"] == 2, timeout=2.0)
        assert health["abandoned_queued"] == 4 and health["running"] == 1, health  # A still runs
        assert time.time() - gave_up < 2.0
        for th in threads:
            th.join(120)
        a_status, _, a_out, a_at = res["A"]
        t_status, _, t_out, t_at = res["third"]
        assert a_status == 200 and t_status == 200, (res["A"][:3], res["third"][:3])
        assert t_at - a_at < 2.0, (t_at - a_at)  # third ran right after A, not after imp's four slow requests
        health = srv.request("GET", "/healthz")[1]
        assert health["generated_requests"] == 2 and health["admitted"] == 0, health  # imp's work never ran

        # a running request whose client leaves is stopped at its next sampler step
        res = {}
        th = _in_thread(res, "run", _abandon, srv, {"seed": 5, **SLOW}, tokens["imp"], after=1.0)
        _wait_for(srv, "imp running", lambda h: h["running"] == 1)
        th.join(10)
        assert res["run"][0] == "gave up"
        gave_up = time.time()
        health = _wait_for(srv, "running stopped", lambda h: h["admitted"] == 0 and h["running"] == 0, timeout=2.0)
        assert health["abandoned_running"] == 1 and health["generated_requests"] == 2, health
        assert time.time() - gave_up < 2.0 and gave_up - a_started < 60

        # the audit log: every generate request, by key name, never the token
        log = srv.request("GET", "/v1/admin/audit?limit=100", token=tokens["admin"])[1]
        gen = [r for r in log if r["action"] == "generate"]
        by_key = {}
        for r in gen:
            assert r["actor"] == r["target"] and set(r["details"]) >= {"requested", "sources", "n", "seed", "steps",
                                                                        "weighting", "status", "seconds"}, r
            by_key.setdefault(r["actor"], []).append(r["details"]["status"])
        assert sorted(by_key["imp"]) == [499] * 5 + [503], by_key
        assert by_key["other"] == [200] and by_key["third"] == [200], by_key
        ran = next(r for r in gen if r["actor"] == "other")["details"]
        assert ran["sources"] == ["beta", "gamma"] and ran["n"] == SLOW["n"] and ran["seed"] == 0
        assert ran["steps"] == SLOW["steps"]
        dump = json.dumps(log)
        assert not any(tok in dump for tok in tokens.values())
    finally:
        srv.stop()
