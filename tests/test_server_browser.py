"""The web page in headless Chromium (Debian's chromium driven by playwright-core from npm, installed by
.ci/run): connect with a key, see only its sources, click Generate, see the images with their source weights,
and keep a screenshot. Skipped, saying why, only where node, chromium or playwright-core are missing."""

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
    store, bb, tokens = build_store(tmp_path, {"ab": ["alpha", "beta"]})
    srv = Server(store, bb)
    shot = Path(os.environ.get("CDM_SCREENSHOT", tmp_path / "page.png"))
    try:
        res = subprocess.run(["node", str(HERE / "page.mjs"), srv.url + "/", tokens["ab"], str(shot)],
                             capture_output=True, text=True, timeout=120, cwd=HERE,
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
    assert "image(s) in" in seen["status"] and not seen["errors"], seen
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
