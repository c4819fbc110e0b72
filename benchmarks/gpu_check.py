"""The device path on a lent GPU, in one short call: throughput with everything on the device, and the CUDA tests.

Measures, with the glyph backbone (``shipped:backbone-glyphs``) moved to ``--device`` and so everything around it
(prompts, optimiser, batches, noise, solvers, composed denoiser, weightings):

- ``train_steps_per_s``: compartment training steps per second (batch 64, a class-conditional compartment on a
  split of the protected digits, no validation or checkpoints), after a short warm-up run;
- ``sample_images_per_s``: images per second of ancestral sampling (``ddpm``, 50 steps, classifier-free guidance
  2) from the 8-way composition under the ``ito`` weighting (every image evaluates all 8 compartments each step);
  ``sample_images_per_s_one``: the same from one compartment alone. Compartments are initialised, not trained:
  the cost of a step does not depend on the prompts' values;
- ``tests``: ``pytest tests/test_device.py`` (the CUDA tests run where a GPU is present), its exit code and summary.

Writes JSON to ``--out``. On an H200 the whole run takes well under 3 minutes; ``--device cpu --quick`` checks the
script itself on any machine in about a minute (tiny sizes, figures meaningless)::

    python benchmarks/gpu_check.py --out gpu.json                     # on the GPU machine
    python benchmarks/gpu_check.py --device cpu --quick --out /tmp/g.json --no-tests
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from cdm.backbone import Backbone
from cdm.compartments import Compartment, CompartmentConfig
from cdm.composition import CompartmentBank, ComposedDenoiser, ItoWeighting
from cdm.data import public_protected, split_stratified
from cdm.generation import sample_backbone
from cdm.io import atomic_write_json
from cdm.provenance import git_commit, machine_info
from cdm.training.compartment import train_compartment

ROOT = Path(__file__).resolve().parents[1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_rate(bb: Backbone, steps: int, batch: int) -> dict:
    """Steps per second of compartment training on the backbone's device (a warm-up run first: CUDA context,
    kernels, allocator)."""
    _, protected = public_protected()
    source = split_stratified(protected, 8)[0]
    cfg = CompartmentConfig(steps=steps, batch_size=batch, validation=0.0, checkpoint_every=10**9, warmup=5)
    train_compartment(bb, source, dataclasses.replace(cfg, steps=5), progress=False)
    _sync(bb.device)
    t0 = time.perf_counter()
    comp, rec = train_compartment(bb, source, cfg, progress=False)
    _sync(bb.device)
    seconds = time.perf_counter() - t0
    assert comp.device == bb.device and np.isfinite(rec.final_loss)
    return {"train_steps_per_s": round(steps / seconds, 2), "train_steps": steps, "train_batch": batch,
            "train_seconds": round(seconds, 2), "train_final_loss": round(float(rec.final_loss), 5)}


def sample_rate(bb: Backbone, n_sources: int, per_class: int, steps: int, batch: int) -> dict:
    """Images per second, ancestral sampling with guidance 2: the ito composition of ``n_sources`` compartments, and
    one compartment alone."""
    comps = []
    for i in range(n_sources):
        c = Compartment.for_backbone(bb, CompartmentConfig())
        c.init_prompts(torch.Generator().manual_seed(i))
        with torch.no_grad():  # open the gates a little, so the prompts act as a trained compartment's do
            c.prompts.table.weight[:, c.prompts.n_prompt_numbers:] = 0.1
        comps.append(c.eval().requires_grad_(False))
    kw = dict(per_class=per_class, solver="ddpm", steps=steps, guidance=2.0, batch_size=batch)
    out = {"sample_steps": steps, "sample_sources": n_sources, "sample_batch": batch}
    sample_backbone(bb, eps=comps[0].denoiser(bb), **{**kw, "per_class": 1, "steps": 2})  # warm-up
    for key, eps in (("", None), ("_one", comps[0].denoiser(bb))):
        composed = None
        if eps is None:
            composed = ComposedDenoiser(CompartmentBank(bb, comps), ItoWeighting(bb.schedule))
            eps = composed
        _sync(bb.device)
        t0 = time.perf_counter()
        images, _ = sample_backbone(bb, eps=eps, **kw)
        _sync(bb.device)
        seconds = time.perf_counter() - t0
        out[f"sample_images_per_s{key}"] = round(len(images) / seconds, 2)
        out[f"sample_images{key}"] = len(images)
        out[f"sample_seconds{key}"] = round(seconds, 2)
        if composed is not None:
            out["sample_evals_per_image"] = round(composed.evals / max(1, len(images)) / 2, 1)  # per branch of cfg
    return out


def run_tests(device: str) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests" / "test_device.py")]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    lines = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.strip()]
    return {"tests_rc": res.returncode, "tests_summary": lines[-1] if lines else "",
            "tests_failures": [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))][:20],
            "tests_seconds": round(time.perf_counter() - t0, 1), "tests_cuda": torch.cuda.is_available(),
            "tests_command": shlex.join(cmd)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="where to write the JSON")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--backbone", default="shipped:backbone-glyphs")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks the script, the figures mean nothing")
    ap.add_argument("--no-tests", action="store_true", help="skip pytest tests/test_device.py")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device on this machine (use --device cpu --quick to check the script)")
    t_all = time.perf_counter()
    bb = Backbone.from_pretrained(args.backbone).to(device)
    sizes = dict(train_steps=5, sample_per_class=1, sample_steps=3, batch=250) if args.quick else \
        dict(train_steps=300, sample_per_class=100, sample_steps=50, batch=500)
    result = {"device": str(device), "backbone": args.backbone, "backbone_hash": bb.hash, "quick": args.quick}
    result.update(train_rate(bb, sizes["train_steps"], 64))
    print(json.dumps(result), flush=True)
    result.update(sample_rate(bb, 8, sizes["sample_per_class"], sizes["sample_steps"], sizes["batch"]))
    print(json.dumps(result), flush=True)
    if not args.no_tests:
        result.update(run_tests(args.device))
    result["gpu"] = {"train_steps_per_s": result["train_steps_per_s"],
                     "sample_images_per_s": result["sample_images_per_s"]}
    result["seconds"] = round(time.perf_counter() - t_all, 1)
    result["meta"] = {"command": "python " + shlex.join(sys.argv), "commit": git_commit(), "machine": machine_info(),
                      "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
