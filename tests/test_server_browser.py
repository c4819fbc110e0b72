"""The web page in headless Chromium (Debian's chromium driven by playwright-core from npm, installed by
.ci/run): connect with a key, see only its sources and the weightings they allow, click Generate, see the
images with their source weights, and keep a screenshot; then an invalid number (an error status, no
request), switching keys (the previous key's images go), a failed connect (the header names no key), and a key
in the URL (not used); all under the page's Content-Security-Policy (a violation is an error). Skipped, saying
why, only where node, chromium or playwright-core are missing."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from serverkit import Server, build_store

HERE = Path(__file__).resolve().parent / "browser"
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
MISSING = [what for what, ok in [("node", shutil.which("node")), (f"chromium ({CHROMIUM})", Path(CHROMIUM).exists()),
                                 ("playwright-core (npm install in tests/browser)",
                                  (HERE / "node_modules" / "playwright-core").is_dir())] if not ok]

pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"browser test needs {', '.join(MISSING)}; .ci/run installs "
                                                      "them (apt-get install chromium; npm install in tests/browser)")


def test_page_generates_and_shows_weights(tmp_path):
    store, bb, tokens = build_store(tmp_path, {"ab": ["alpha", "beta"], "g": ["gamma"]})
    srv = Server(store, bb)
    shot = Path(os.environ.get("CDM_SCREENSHOT", tmp_path / "page.png"))
    try:
        me = srv.request("GET", "/v1/sources", token=tokens["ab"])[1]
        res = subprocess.run(["node", str(HERE / "page.mjs"), srv.url + "/", tokens["ab"], str(shot), tokens["g"]],
                             capture_output=True, text=True, timeout=180, cwd=HERE,
                             env={**os.environ, "CHROMIUM": CHROMIUM})
    finally:
        srv.stop()
    assert res.returncode == 0, res.stdout + res.stderr
    seen = json.loads(res.stdout.strip().splitlines()[-1])
    assert seen["sources"] == ["alpha", "beta"]  # gamma is not offered to this key
    assert len(seen["cards"]) == 10 and all(c["width"] == 28 for c in seen["cards"])
    for card in seen["cards"]:
        names = [w[0] for w in card["weights"]]
        assert names == ["alpha", "beta"] and abs(sum(w[1] for w in card["weights"]) - 1) < 0.02
    assert "image(s) in" in seen["status"] and not seen["errors"], seen  # errors: page errors, CSP violations
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the weighting menu is the server's list for this key (no heads trained: no router/classifier/isolated)
    assert seen["weightings"] == me["weightings"] == ["ito", "naive", "single"]
    for label, src in zip(seen["sourceLabels"], me["sources"], strict=True):
        assert ("learnt nothing: equals the backbone" in label) == (src["learned"] is False), (label, src)
    # an invalid number: said in the status line, nothing sent
    bad = seen["invalid"]
    assert bad["statusClass"] == "error" and "Images must be a whole number from 1 to 16" in bad["status"], bad
    assert bad["requests"] == 0
    # switching keys: the first key's images and summary go, the header and sources are the new key's
    sw = seen["switched"]
    assert sw["cards"] == 0 and sw["summaryHidden"] and sw["whoami"].startswith("key 'g'"), sw
    assert sw["sources"] == ["gamma"] and not sw["controlsHidden"]
    # a failed connect: the header names no key, no controls, the error is shown
    failed = seen["failed"]
    assert failed["whoami"] == "" and failed["controlsHidden"] and failed["cards"] == 0, failed
    assert failed["statusClass"] == "error" and failed["status"].startswith("401"), failed
    # a key in the URL's hash is not read
    hashed = seen["hashKey"]
    assert hashed["requests"] == 0 and hashed["keyField"] == "" and hashed["controlsHidden"], hashed
