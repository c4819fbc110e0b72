"""Shared by tests/test_server*.py: a tiny store (tiny backbone, 4-step compartments) and a real `cdm serve`
process on 127.0.0.1, spoken to with the standard library only (urllib)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import torch

from cdm.backbone import Backbone, PixelCodec, UViT, UViTConfig
from cdm.compartments import CompartmentConfig
from cdm.data import public_protected, split_by_classes, split_stratified
from cdm.operations import add_source
from cdm.server.keys import create_key, revoke_key
from cdm.store import Store

CFG = CompartmentConfig(steps=4, batch_size=8, n_prompts=2, checkpoint_every=2, warmup=1)
SOURCES = ("alpha", "beta", "gamma")


def tiny_backbone(path: Path) -> Path:
    torch.manual_seed(0)
    net = UViT(UViTConfig(img_size=14, patch_size=7, embed_dim=16, depth=1, num_heads=2))
    Backbone(net, codec=PixelCodec(28, 14)).save_pretrained(path)
    return path


def small_parts():
    _, protected = public_protected()
    small = protected.subset(np.arange(0, 4000, 25), id="mnist/protected/every25")  # 160 digits
    low, high = split_by_classes(small, [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]])
    mixed = split_stratified(small, 2)[0]
    return {"alpha": low, "beta": high, "gamma": mixed}


def build_store(root: Path, keys: dict[str, list[str] | None],
                backbone: Path | None = None) -> tuple[Path, Path, dict[str, str]]:
    """A store with sources alpha (digits 0-4), beta (5-9), gamma (mixed), one tiny compartment each, and the
    given keys (name -> granted sources; None: admin), on ``backbone`` (default: a tiny random one). Returns
    (store, backbone dir, name -> token)."""
    bb_dir = backbone or tiny_backbone(root / "bb")
    bb = Backbone.from_pretrained(bb_dir)
    tokens = {}
    with Store.create(root / "store") as st:
        for name, src in small_parts().items():
            add_source(st, bb, src, name=name, cfg=CFG, progress=False, actor="setup")
        for name, grants in keys.items():
            tokens[name], _ = create_key(st, name, sources=grants or [], admin=grants is None, actor="setup")
    return root / "store", bb_dir, tokens


def revoke(store: Path, name: str) -> None:
    with Store.open(store) as st:
        revoke_key(st, name, actor="setup")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m cdm serve ...` in a subprocess; ``.url``; ``.request(...)``; stop() kills it."""

    def __init__(self, store: Path, backbone: Path, *args: str, log: Path | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self.log = open(log or store.parent / f"server-{self.port}.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cdm", "serve", "--store", str(store), "--backbone", str(backbone),
             "--port", str(self.port), "--log-level", "warning", *args],
            stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 90
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {Path(self.log.name).read_text()}")
            try:
                if self.request("GET", "/healthz")[0] == 200:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                self.stop()
                raise RuntimeError("server did not start in 90 s")
            time.sleep(0.2)

    def request(self, method: str, path: str, body=None, token: str | None = None, headers: dict | None = None,
                raw: bytes | None = None, timeout: float = 120) -> tuple[int, object]:
        hdrs = dict(headers or {})
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
            hdrs.setdefault("Content-Type", "application/json")
        if token is not None:
            hdrs["Authorization"] = f"Bearer {token}"
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=hdrs)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as res:
                status, payload = res.status, res.read()
        except urllib.error.HTTPError as e:
            status, payload = e.code, e.read()
        try:
            return status, json.loads(payload)
        except ValueError:
            return status, payload

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def multipart(fields: dict[str, str], files: dict[str, tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = "cdmtestboundary7d1f"
    out = []
    for k, v in fields.items():
        out.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode())
    for k, (fname, data) in files.items():
        out.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"; filename="{fname}"\r\n'
                   f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    out.append(f"--{boundary}--\r\n".encode())
    return b"".join(out), f"multipart/form-data; boundary={boundary}"


def post_generate(port: int, body: dict, token: str, timeout: float = 120.0) -> tuple[int, dict, dict]:
    """POST /v1/generate on 127.0.0.1:``port``: (status, headers with lower-case names, json)."""
    import http.client
    import json

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/v1/generate", body=json.dumps(body),
                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        res = conn.getresponse()
        return res.status, {k.lower(): v for k, v in res.getheaders()}, json.loads(res.read())
    finally:
        conn.close()
