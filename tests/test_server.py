"""The service over real HTTP (a `cdm serve` process on 127.0.0.1, a tiny store): the leak matrix (every key x
every source subset), limits, admin jobs (add a source from an upload, forget samples), forgetting a source
leaves no trace, audit actors, and the keys CLI."""

import base64
import io
import itertools
import json
import sqlite3
import threading
import time

import numpy as np
import pytest
from typer.testing import CliRunner

from cdm.cli.main import app as cli
from cdm.store import Store
from serverkit import SOURCES, Server, build_store, multipart, revoke, small_parts

# key name -> granted sources (None: admin)
KEYS = {"admin": None, "a": ["alpha"], "ab": ["alpha", "beta"], "bg": ["beta", "gamma"], "none": [],
        "revoked": ["alpha", "beta", "gamma"]}
TINY = {"n": 1, "steps": 2}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("svc")
    store, bb, tokens = build_store(root, KEYS)
    revoke(store, "revoked")
    srv = Server(store, bb, "--max-n", "16", "--max-steps", "200", "--queue", "2", "--max-upload-mb", "1",
                 "--train-steps", "6")
    yield srv, store, tokens
    srv.stop()


def _allowed(key: str, subset) -> bool:
    grants = KEYS[key]
    return key != "revoked" and (grants is None or set(subset) <= set(grants))


def test_leak_matrix(served):
    """Every key x every non-empty subset of sources, plus the default and an unknown source: 200 only when
    every requested source is granted (and then exactly those are composed), else 403 / 401 / 404."""
    srv, _, tokens = served
    subsets = [list(c) for r in range(1, len(SOURCES) + 1) for c in itertools.combinations(SOURCES, r)]
    tokens = {**tokens, "bogus": "cdm_" + "x" * 43, "nokey": None}
    table = {}
    for key, token in tokens.items():
        for subset in subsets:
            status, out = srv.request("POST", "/v1/generate", {"sources": subset, **TINY}, token=token)
            if key in ("revoked", "bogus", "nokey"):
                expect = 401
            else:
                expect = 200 if _allowed(key, subset) else 403
            assert status == expect, (key, subset, status, out)
            if status == 200:
                assert out["sources"] == subset
                assert [c["cid"] for c in out["compartments"]] == subset
                assert all(set(img["weights"]) == set(subset) for img in out["images"])
                assert out["attribution"].startswith("weight-path")
                for img in out["images"]:
                    assert set(img["attribution"]) == set(subset)
                    assert abs(sum(img["attribution"].values()) - 1) < 1e-3
            table[key, "+".join(subset)] = status
        # default: every granted source; unknown: 404 for any live key
        status, out = srv.request("POST", "/v1/generate", TINY, token=token)
        granted = list(SOURCES) if KEYS.get(key, ()) is None else KEYS.get(key)
        if key in ("revoked", "bogus", "nokey"):
            assert status == 401
        elif not granted:
            assert status == 403
        else:
            assert status == 200 and out["sources"] == granted, (key, out)
        status, _ = srv.request("POST", "/v1/generate", {"sources": ["zeta"], **TINY}, token=token)
        assert status == (401 if key in ("revoked", "bogus", "nokey") else 404)
        status, me = srv.request("GET", "/v1/sources", token=token)
        if status == 200:
            assert [s["name"] for s in me["sources"]] == granted
    print("\nleak matrix (rows: keys, columns: requested sources):")
    cols = ["+".join(s) for s in subsets]
    print(" " * 8 + " ".join(f"{c:>17}" for c in cols))
    for key in tokens:
        print(f"{key:>8}" + " ".join(f"{table[key, c]:>17}" for c in cols))


def test_generate_response(served):
    srv, _, tokens = served
    body = {"sources": ["alpha", "beta"], "classes": [1, 7], "n": 4, "steps": 8, "seed": 3}
    status, out = srv.request("POST", "/v1/generate", body, token=tokens["ab"])
    assert status == 200, out
    assert out["solver"] == "ddpm" and out["weighting"] == "ito" and out["n"] == 4
    assert [img["label"] for img in out["images"]] == [1, 7, 1, 7]
    for img in out["images"]:
        png = base64.b64decode(img["png"])
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        assert abs(sum(img["weights"].values()) - 1) < 1e-3 and abs(sum(img["final_weights"].values()) - 1) < 1e-3
    assert base64.b64decode(out["grid_png"])[:4] == b"\x89PNG"
    again = srv.request("POST", "/v1/generate", body, token=tokens["ab"])[1]
    assert [i["png"] for i in again["images"]] == [i["png"] for i in out["images"]]  # seeded: reproducible
    status, out = srv.request("POST", "/v1/generate", {"n": 2, "steps": 3, "weighting": "naive"}, token=tokens["bg"])
    # unconditional: each image's class is drawn from the sources' class mixture, then naive weighs the sources
    # by their share of that class, lambda_i(y)
    assert status == 200 and out["solver"] == "ddim"
    parts = small_parts()
    counts = {s: np.bincount(parts[s].labels, minlength=10) for s in ("beta", "gamma")}
    for img in out["images"]:
        y = img["label"]
        assert y in range(10) and counts["beta"][y] + counts["gamma"][y] > 0
        share = counts["beta"][y] / (counts["beta"][y] + counts["gamma"][y])
        assert img["weights"] == pytest.approx({"beta": share, "gamma": 1 - share}, abs=0.01)


def test_limits_and_errors(served):
    srv, _, tokens = served
    t = tokens["admin"]
    for bad in ({"n": 17}, {"n": 0}, {"steps": 201}, {"classes": [10]}, {"classes": []}, {"sources": []},
                {"weighting": "magic"}, {"unknown_field": 1}, {"sources": ["alpha", "beta"], "solver": "ddim"}):
        status, out = srv.request("POST", "/v1/generate", {**TINY, **bad}, token=t)
        assert status == 422, (bad, status, out)
    status, out = srv.request("POST", "/v1/generate", {"sources": ["alpha", "beta"], "weighting": "router", **TINY},
                              token=t)
    assert status == 422 and "router" in out["detail"] and "<store>" in out["detail"]  # no server path leaks
    big = json.dumps({**TINY, "pad": "x" * 70_000}).encode()
    status, out = srv.request("POST", "/v1/generate", raw=big, token=t, headers={"Content-Type": "application/json"})
    assert status == 413
    chunks = iter([b'{"n": 1, "pad": "', b"y" * 70_000, b'"}'])  # no Content-Length: counted while read
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    conn.request("POST", "/v1/generate", body=chunks, encode_chunked=True,
                 headers={"Authorization": f"Bearer {t}", "Content-Type": "application/json"})
    assert conn.getresponse().status == 413
    conn.close()
    assert srv.request("GET", "/v1/admin/audit", token=tokens["a"])[0] == 403  # not an admin key
    assert srv.request("GET", "/v1/sources")[0] == 401
    assert srv.request("GET", "/v1/sources", headers={"X-API-Key": tokens["a"]})[0] == 200
    status, spec = srv.request("GET", "/openapi.json")
    assert status == 200 and "/v1/generate" in spec["paths"] and "/v1/admin/sources/{name}" in spec["paths"]
    status, page = srv.request("GET", "/")
    assert status == 200 and b'id="generate"' in page and b"http" not in page.split(b"<footer")[0]  # no CDN


def test_queue_full_is_503(served):
    """workers 1 + queue 2: three slow requests fill it, the fourth is refused at once with 503."""
    srv, _, tokens = served
    slow = {"n": 16, "steps": 200, "classes": [0], "sources": ["alpha", "beta", "gamma"]}
    results = []
    threads = [threading.Thread(target=lambda: results.append(
        srv.request("POST", "/v1/generate", slow, token=tokens["admin"])[0])) for _ in range(3)]
    for th in threads:
        th.start()
    deadline = time.time() + 30
    while srv.request("GET", "/healthz")[1]["admitted"] < 3:
        assert time.time() < deadline
        time.sleep(0.01)
    t0 = time.perf_counter()
    status, out = srv.request("POST", "/v1/generate", TINY, token=tokens["admin"])
    assert status == 503 and "busy" in out["detail"] and time.perf_counter() - t0 < 2
    for th in threads:
        th.join()
    assert results == [200, 200, 200]


def _npz(src) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, images=src.images, labels=src.labels)
    return buf.getvalue()


def _wait(srv, token, job_id, timeout=120):
    seen = []
    deadline = time.time() + timeout
    while True:
        status, job = srv.request("GET", f"/v1/admin/jobs/{job_id}", token=token)
        assert status == 200
        seen.append(job["progress"])
        if job["status"] in ("done", "failed"):
            return job, seen
        assert time.time() < deadline, job
        time.sleep(0.05)


def test_admin_add_source_job_and_forget_samples(served):
    srv, store, tokens = served
    t = tokens["admin"]
    src = small_parts()["beta"]
    body, ctype = multipart({"name": "delta", "tags": "uploaded"}, {"file": ("delta.npz", _npz(src))})
    assert srv.request("POST", "/v1/admin/sources", raw=body, token=tokens["ab"],
                       headers={"Content-Type": ctype})[0] == 403
    status, out = srv.request("POST", "/v1/admin/sources", raw=body, token=t, headers={"Content-Type": ctype})
    assert status == 202, out
    job, seen = _wait(srv, t, out["job"]["id"])
    assert job["status"] == "done", job
    assert job["steps_done"] == job["steps_total"] == 6 and seen[-1] == 1.0
    assert job["result"]["n"] == len(src)
    status, out = srv.request("POST", "/v1/generate", {"sources": ["delta"], **TINY}, token=t)
    assert status == 200
    assert srv.request("POST", "/v1/generate", {"sources": ["delta"], **TINY}, token=tokens["ab"])[0] == 403
    # name taken, bad name, bad file, too large
    assert srv.request("POST", "/v1/admin/sources", raw=body, token=t, headers={"Content-Type": ctype})[0] == 409
    bad, ctype2 = multipart({"name": "-bad"}, {"file": ("x.npz", _npz(src))})
    assert srv.request("POST", "/v1/admin/sources", raw=bad, token=t, headers={"Content-Type": ctype2})[0] == 422
    junk, ctype3 = multipart({"name": "junk"}, {"file": ("x.npz", b"not a zip")})
    status, out = srv.request("POST", "/v1/admin/sources", raw=junk, token=t, headers={"Content-Type": ctype3})
    assert status == 422 and "x.npz" in out["detail"] and "/tmp" not in out["detail"]
    huge, ctype4 = multipart({"name": "huge"}, {"file": ("h.npz", b"0" * (1024 * 1024 + 10))})
    assert srv.request("POST", "/v1/admin/sources", raw=huge, token=t, headers={"Content-Type": ctype4})[0] == 413

    # forget two samples of delta: an exact retrain as a job; the compartment changes
    before = srv.request("GET", "/v1/admin/sources", token=t)[1]
    w_before = next(s for s in before if s["name"] == "delta")["compartments"][0]["weights_sha256"]
    status, out = srv.request("POST", "/v1/admin/sources/delta/forget-samples", token=t,
                              body={"sample_ids": list(src.sample_hashes[:2]), "reason": "owner request"})
    assert status == 202, out
    job, _ = _wait(srv, t, out["job"]["id"])
    assert job["status"] == "done" and job["result"]["n_removed"] == 2 and job["result"]["before"] == w_before
    listed = {s["name"]: s for s in srv.request("GET", "/v1/sources", token=t)[1]["sources"]}
    assert listed["delta"]["n"] == len(src) - 2
    log = srv.request("GET", "/v1/admin/audit?limit=50", token=t)[1]
    mine = [(r["action"], r["target"]) for r in log if r["actor"] == "admin"]
    assert ("add-source", "delta") in mine and ("put", "delta") in mine and ("forget-samples", "delta") in mine


def test_forget_via_api_leaves_no_trace(served):
    srv, store, tokens = served
    t, bg = tokens["admin"], tokens["bg"]
    assert srv.request("DELETE", "/v1/admin/sources/gamma?reason=contract%20ended", token=bg)[0] == 403
    status, out = srv.request("DELETE", "/v1/admin/sources/gamma?reason=contract%20ended", token=t)
    assert status == 200 and out["removed"] == ["gamma"], out
    forget_seq = out["audit_seq"]
    # the key that had it: no longer listed, the default request no longer composes it, asking for it is 404
    assert [s["name"] for s in srv.request("GET", "/v1/sources", token=bg)[1]["sources"]] == ["beta"]
    status, out = srv.request("POST", "/v1/generate", TINY, token=bg)
    assert status == 200 and out["sources"] == ["beta"] and "gamma" not in json.dumps(out)
    for key in ("bg", "admin"):
        assert srv.request("POST", "/v1/generate", {"sources": ["gamma"], **TINY}, token=tokens[key])[0] == 404
        assert srv.request("POST", "/v1/generate", {"sources": ["beta", "gamma"], **TINY},
                           token=tokens[key])[0] == 404
    assert srv.request("DELETE", "/v1/admin/sources/gamma", token=t)[0] == 404
    # no grant, file or compartment of it remains; the audit log names it once, with the admin as actor
    with sqlite3.connect(store / "registry.sqlite") as db:
        assert db.execute("SELECT count(*) FROM api_key_sources WHERE source_id = 'gamma'").fetchone()[0] == 0
        assert db.execute("SELECT count(*) FROM sources WHERE id = 'gamma'").fetchone()[0] == 0
    assert not any("gamma" in p.name for p in store.rglob("*"))
    log = [r for r in srv.request("GET", "/v1/admin/audit?limit=100", token=t)[1] if r["seq"] >= forget_seq]
    assert [(r["action"], r["actor"]) for r in log if r["target"] == "gamma"] == [("forget-source", "admin")]
    keys = {k["name"]: k for k in srv.request("GET", "/v1/admin/keys", token=t)[1]}
    assert keys["bg"]["sources"] == ["beta"] and "token" not in keys["bg"]


def test_admin_key_endpoints(served):
    srv, _, tokens = served
    t = tokens["admin"]
    status, out = srv.request("POST", "/v1/admin/keys", {"name": "carol", "sources": ["alpha"]}, token=t)
    assert status == 201 and out["token"].startswith("cdm_")
    carol = out["token"]
    assert srv.request("POST", "/v1/generate", {"sources": ["alpha"], **TINY}, token=carol)[0] == 200
    assert srv.request("POST", "/v1/admin/keys", {"name": "carol"}, token=t)[0] == 409
    assert srv.request("POST", "/v1/admin/keys", {"name": "x", "sources": ["zeta"]}, token=t)[0] == 404
    assert srv.request("DELETE", "/v1/admin/keys/carol", token=t)[0] == 200
    assert srv.request("POST", "/v1/generate", {"sources": ["alpha"], **TINY}, token=carol)[0] == 401


def test_keys_cli(tmp_path):
    with Store.create(tmp_path / "st"):
        pass
    run = CliRunner().invoke
    res = run(cli, ["keys", "create", "ops", "--admin", "--store", str(tmp_path / "st")])
    assert res.exit_code == 0, res.output
    token = res.output.strip().splitlines()[-1]
    assert token.startswith("cdm_")
    registry = (tmp_path / "st" / "registry.sqlite").read_bytes()
    assert token.encode() not in registry  # only the hash is at rest
    res = run(cli, ["keys", "create", "x", "--sources", "nope", "--store", str(tmp_path / "st")])
    assert res.exit_code != 0
    res = run(cli, ["keys", "list", "--store", str(tmp_path / "st")], env={"COLUMNS": "200"})
    assert res.exit_code == 0 and "ops" in res.output and token not in res.output
    res = run(cli, ["keys", "revoke", "ops", "--store", str(tmp_path / "st")])
    assert res.exit_code == 0 and "revoked" in res.output
    with Store.open(tmp_path / "st") as st:
        assert [a["action"] for a in st.audit_log()] == ["key-create", "key-revoke"]


def _strict_json(payload: bytes):
    """Parse as standard JSON: NaN / Infinity are not JSON."""
    def no(const):
        raise ValueError(f"non-standard JSON constant {const}")

    return json.loads(payload, parse_constant=no)


def test_non_finite_numbers_are_422_without_echo(served):
    """NaN / +-Infinity in any JSON number field: 422 with a valid JSON answer that does not echo them (the
    default handler echoed the input, which JSON cannot encode: 500)."""
    import http.client

    srv, _, tokens = served
    t = tokens["admin"]
    cases = [("/v1/generate", '{"guidance": NaN, "n": 1, "steps": 2}'),
             ("/v1/generate", '{"n": NaN, "steps": 2}'),
             ("/v1/generate", '{"n": 1, "steps": Infinity}'),
             ("/v1/generate", '{"n": 1, "steps": 2, "seed": -Infinity}'),
             ("/v1/generate", '{"n": 1, "steps": 2, "classes": [Infinity]}'),
             ("/v1/generate", '{"n": 1, "steps": 2, "sources": [NaN]}'),
             ("/v1/admin/keys", '{"name": "nan", "sources": [NaN]}'),
             ("/v1/admin/keys", '{"name": "nan", "admin": Infinity}'),
             ("/v1/admin/sources/alpha/forget-samples", '{"sample_ids": [NaN]}')]
    for path, body in cases:
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
        conn.request("POST", path, body=body.encode(), headers={"Authorization": f"Bearer {t}",
                                                                 "Content-Type": "application/json"})
        res = conn.getresponse()
        payload = res.read()
        conn.close()
        assert res.status == 422, (path, body, res.status, payload[:300])
        detail = _strict_json(payload)["detail"]
        assert detail and all(set(d) == {"loc", "msg", "type"} for d in detail), detail
        assert b"Infinity" not in payload and b"input" not in payload and b": NaN" not in payload, payload
    assert srv.request("GET", "/v1/admin/keys", token=t)[1] and "nan" not in {
        k["name"] for k in srv.request("GET", "/v1/admin/keys", token=t)[1]}  # nothing written
    # the invalid generate requests are in the audit log too (by key name)
    log = [r for r in srv.request("GET", "/v1/admin/audit?limit=20", token=t)[1] if r["action"] == "generate"]
    assert [r["details"]["status"] for r in log[-6:]] == [422] * 6 and {r["actor"] for r in log[-6:]} == {"admin"}
    assert "guidance must be a finite number" in log[-6]["details"]["outcome"]
    # a finite out-of-range value still says what is wrong (and the page can show it)
    status, out = srv.request("POST", "/v1/generate", {"guidance": 11.0, **TINY}, token=t)
    assert status == 422 and out["detail"][0]["loc"] == ["body", "guidance"] and "10" in out["detail"][0]["msg"]


def test_security_headers(served):
    """Every answer (the page, its static files, JSON, errors, a 413 from the body limit) carries the CSP,
    X-Frame-Options and nosniff; only /docs allows the Swagger CDN."""
    import urllib.error
    import urllib.request

    srv, _, tokens = served
    page_csp = ("default-src 'self'; img-src 'self' data:; script-src 'self'; style-src 'self'; "
                "frame-ancestors 'none'; base-uri 'none'; form-action 'self'")

    def headers(path, method="GET", data=None, token=None):
        req = urllib.request.Request(srv.url + path, method=method, data=data,
                                     headers={"Authorization": f"Bearer {token}"} if token else {})
        try:
            with urllib.request.urlopen(req, timeout=30) as res:
                return res.status, res.headers
        except urllib.error.HTTPError as e:
            return e.code, e.headers

    for path, method, data, token, code in [("/", "GET", None, None, 200), ("/static/app.js", "GET", None, None, 200),
                                            ("/static/nope.js", "GET", None, None, 404),
                                            ("/v1/sources", "GET", None, tokens["a"], 200),
                                            ("/v1/sources", "GET", None, None, 401),
                                            ("/v1/generate", "POST", b"x" * 70_000, tokens["a"], 413),
                                            ("/openapi.json", "GET", None, None, 200)]:
        status, h = headers(path, method, data, token)
        assert status == code, (path, status)
        assert h["Content-Security-Policy"] == page_csp, (path, h)
        assert h["X-Frame-Options"] == "DENY" and h["X-Content-Type-Options"] == "nosniff", (path, h)
    status, h = headers("/docs")
    assert status == 200 and "https://cdn.jsdelivr.net" in h["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in h["Content-Security-Policy"] and h["X-Frame-Options"] == "DENY"
    js = srv.request("GET", "/static/app.js")[1]
    assert b"location.hash" not in js and b"URLSearchParams" not in js  # never a key from the URL


def test_sources_lists_weightings_learned_and_limits(served):
    srv, store, tokens = served
    status, me = srv.request("GET", "/v1/sources", token=tokens["ab"])
    assert status == 200 and me["weightings"] == ["ito", "naive", "single"]  # no heads trained in this store
    assert me["limits"] == {"max_n": 16, "max_steps": 200, "per_key_queue": 4, "classes": 10}
    with Store.open(store) as st:  # what the compartment's manifest says (None: it does not)
        want = {s["name"]: st.compartment(s["name"])["manifest"].get("learned") for s in me["sources"]}
    assert {s["name"]: s["learned"] for s in me["sources"]} == want
    assert srv.request("GET", "/v1/sources", token=tokens["none"])[1]["weightings"] == []
    admin_view = srv.request("GET", "/v1/admin/sources", token=tokens["admin"])[1]
    assert all("learned" in s for s in admin_view)
