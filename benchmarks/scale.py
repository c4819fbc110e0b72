"""Scale-out (issue 21): 8 compartments trained one after another and as Ray tasks, bit for bit the same; a worker
killed mid-task; a compartment trained where the data lives and imported.

- **sequential**: ``add_many`` with the sequential executor (this process, ``--threads`` torch threads, one
  compartment after another) into a fresh store; timed from the first registration to the last stored
  compartment.
- **ray**: the same sources into another fresh store with an embedded Ray of ``--workers`` CPUs (one torch thread
  and one Ray CPU per task); timed from ``ray.init`` (the session's start included) to the last stored
  compartment. ``identical``: every compartment's weights_sha256 equals the sequential run's.
- **retry**: in the same Ray session, two of the sources again into a third store, the worker training the second
  SIGKILLed at half its steps on its first attempt (Ray retries the task); ``retry_ok``: the run completes, the
  task ran twice, and both compartments equal the sequential run's.
- **import**: the first source trained as a bundle with no store (``train_source`` + ``write_bundle``, what ``cdm
  train-compartment`` does) and imported into a new store (``import_bundle``); ``import_ok``: the
  bundle verifies, its weights equal the sequential run's compartment of that source, the store records that it
  does not hold the data, ``forget --sample`` is refused with the owner's instructions and nothing changes, the
  audit log has the import.

Ray runs only in a network namespace that has only loopback: the script re-executes itself under ``unshare -n``
(root) unless it is in one already (``--no-netns``: skip that, e.g. on a cluster; not for this project's machines).

    python benchmarks/scale.py --out benchmarks/results/scale                  # the measurement (~8 min, 2 cores)
    python benchmarks/scale.py --steps 4 --out /tmp/scale-tiny                 # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks/results/scale")
    p.add_argument("--backbone", default="shipped:backbone-glyphs")
    p.add_argument("--spec", default="mnist/protected/strat8-{k}", help="source spec with {k} = 0..compartments-1")
    p.add_argument("--compartments", type=int, default=8)
    p.add_argument("--steps", type=int, default=60, help="optimiser steps per compartment (60: the sequential run "
                   "takes 3-4 min on an idle 2-core machine)")
    p.add_argument("--workers", type=int, default=2, help="CPUs of the embedded Ray (one task per CPU)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the sequential run and of each task "
                   "(bit-identity needs equal thread counts)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip", default="", help="comma-separated checks to skip: retry, import")
    p.add_argument("--no-netns", action="store_true", help="do not enter a loopback-only network namespace")
    p.add_argument("--strace", action="store_true", help="run under strace -f -e trace=connect,sendto and report "
                   "any non-loopback address (slows the timed runs)")
    return p.parse_args(argv)


def _enter_netns(args) -> bool:
    """Run this script again inside a loopback-only network namespace (and under strace with --strace); True when
    that child ran (this process then only reports). False: go on here (in such a namespace already, or
    --no-netns)."""
    import subprocess

    from cdm.scale.ray_env import (REQUIRE_LOOPBACK, foreign_addresses, have_netns_tools, loopback_only,
                                   loopback_only_argv, strace_argv)

    if loopback_only() or args.no_netns:
        return False
    why = have_netns_tools()
    if why is not None:
        sys.exit(f"benchmarks/scale.py: {why}; pass --no-netns to run Ray with the network namespace of this "
                 "process (not on this project's machines)")
    argv = [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:]]
    args.out.mkdir(parents=True, exist_ok=True)
    log = Path(tempfile.mkdtemp(prefix="cdm-scale-strace-")) / "strace.log"
    if args.strace:
        argv = strace_argv(argv, log)
    env = {**os.environ, REQUIRE_LOOPBACK: "1", "CDM_SCALE_COMMAND": _command()}
    code = subprocess.run(loopback_only_argv(argv), env=env).returncode
    if code != 0:
        sys.exit(code)
    if args.strace:  # the whole run's connect/sendto calls: nothing but loopback?
        from cdm.io import atomic_write_json

        foreign = foreign_addresses(log.read_text())
        results = json.loads((args.out / "results.json").read_text())
        results["meta"]["strace"] = {"command": "strace -f -qq -e trace=connect,sendto", "foreign": foreign[:20],
                                     "n_foreign": len(foreign), "lines": len(log.read_text().splitlines())}
        atomic_write_json(args.out / "results.json", results)
        print(f"strace: {len(foreign)} non-loopback address(es) in {results['meta']['strace']['lines']} lines")
        shutil.rmtree(log.parent, ignore_errors=True)
    return True


def _command() -> str:
    return os.environ.get("CDM_SCALE_COMMAND") or "python " + shlex.join(
        [str(Path(sys.argv[0]).resolve().relative_to(REPO)) if Path(sys.argv[0]).resolve().is_relative_to(REPO)
         else sys.argv[0], *sys.argv[1:]])


def _weights(st) -> dict[str, str]:
    return {r["cid"]: r["weights_sha256"] for r in st.compartments()}


def main(argv=None) -> None:
    args = _args(argv)
    if _enter_netns(args):
        return
    import torch

    from cdm.backbone import Backbone
    from cdm.compartments import CompartmentConfig
    from cdm.data import fit, load_source
    from cdm.io import atomic_write_json
    from cdm.provenance import git_commit, machine_info
    from cdm.scale.executor import ExecutorConfig, Runner
    from cdm.scale.many import add_many
    from cdm.scale.ray_env import loopback_only, ray_session
    from cdm.store import Store

    torch.set_num_threads(args.threads)
    skip = {s for s in args.skip.split(",") if s}
    out_dir = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="cdm-scale-"))
    t_all = time.perf_counter()
    try:
        bb = Backbone.from_pretrained(args.backbone)
        sources = []
        for k in range(args.compartments):
            src = load_source(args.spec.format(k=k))
            sources.append((f"s{k}", src if src.spec == bb.codec.spec else fit(src, bb.codec.spec)))
        cfg = CompartmentConfig(steps=args.steps, seed=args.seed)
        seq_ex = ExecutorConfig(executor="sequential", threads=args.threads, device="cpu")
        ray_ex = ExecutorConfig(executor="ray", workers=args.workers, threads=1, device="cpu")
        log = print

        # 1. sequential
        log(f"sequential: {args.compartments} compartments x {args.steps} steps, {args.threads} thread(s)")
        with Store.create(work / "sequential") as st:
            t0 = time.perf_counter()
            seq = add_many(st, bb, sources, cfg=cfg, ex=seq_ex, progress=True)
            sequential_seconds = time.perf_counter() - t0
            want = _weights(st)
        assert not seq.failures, seq.failures
        log(f"sequential: {sequential_seconds:.1f} s")

        # 2. ray (the session's start timed), then 3. the retry check in the same session
        log(f"ray: {args.workers} workers")
        t0 = time.perf_counter()
        retry = {"skipped": True}
        with ray_session(args.workers) as ray:
            startup = time.perf_counter() - t0
            with Store.create(work / "ray") as st:
                r = Runner(ray_ex, bb, ray)
                many = add_many(st, bb, sources, cfg=cfg, ex=ray_ex, progress=True, session=r)
                ray_seconds = time.perf_counter() - t0
                got = _weights(st)
                ray_run = many.runs[0]
            log(f"ray: {ray_seconds:.1f} s ({startup:.1f} s to start Ray)")
            if "retry" not in skip:
                victim = sources[1][0]
                kill_ex = replace(ray_ex, kill_once=(victim, max(1, args.steps // 2)))
                with Store.create(work / "retry") as st:
                    t1 = time.perf_counter()
                    again = add_many(st, bb, sources[:2], cfg=cfg, ex=kill_ex, progress=True,
                                     session=Runner(kill_ex, bb, ray))
                    retried = _weights(st)
                run = again.runs[0]
                retry = {"killed": run.killed, "attempts": run.attempts, "seconds": round(time.perf_counter() - t1, 1),
                         "failures": again.failures, "kill_at_step": kill_ex.kill_once[1],
                         "identical": all(retried.get(n) == want[n] for n, _ in sources[:2])}
                retry["ok"] = (not again.failures and run.killed == [victim] and run.attempts.get(victim) == 2
                               and retry["identical"])
                log(f"retry: {retry}")
        identical = got == want

        # 4. import: trained with no store, where the data lives
        imp = {"skipped": True}
        if "import" not in skip:
            imp = _import_check(bb, sources[0], cfg, want, work, args.threads)
            log(f"import: {imp}")

        result = {
            "sequential_seconds": round(sequential_seconds, 1),
            "ray_seconds": round(ray_seconds, 1),
            "speedup": round(sequential_seconds / ray_seconds, 3),
            "workers": args.workers,
            "compartments": args.compartments,
            "identical": identical,
            "retry_ok": bool(retry.get("ok", False)),
            "import_ok": bool(imp.get("ok", False)),
            "ray_startup_seconds": round(startup, 1),
            "weights": {"sequential": want, "ray": got},
            "ray_attempts": ray_run.attempts,
            "retry": retry,
            "import": imp,
            "meta": {
                "command": _command(), "commit": git_commit(), "machine": machine_info(),
                "date": time.strftime("%Y-%m-%d"), "backbone": args.backbone, "backbone_hash": bb.hash,
                "sources": {n: s.id for n, s in sources}, "n_per_source": {n: len(s) for n, s in sources},
                "config": cfg.to_dict(),
                "threads_sequential": args.threads, "threads_per_task": 1, "ray_cpus": args.workers,
                "sequential_executor": "cdm.scale add_many, executor sequential (in-process)",
                "ray_executor": "cdm.scale add_many, embedded Ray (ray_session), one CPU per task",
                "ray_version": __import__("ray").__version__, "netns_loopback_only": loopback_only(),
                "strace": args.strace, "wall_seconds": round(time.perf_counter() - t_all, 1),
            },
        }
        atomic_write_json(out_dir / "results.json", result)
        log(json.dumps({k: v for k, v in result.items() if k not in ("weights", "meta", "retry", "import")}))
        log(f"-> {out_dir / 'results.json'}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _import_check(bb, named, cfg, want: dict, work: Path, threads: int) -> dict:
    """Owner side: train with no store and write a bundle; store side: import it, check it and the refusals."""
    import torch

    from cdm.errors import CdmError
    from cdm.operations import forget_samples
    from cdm.operations.sources import train_source
    from cdm.scale.bundle import import_bundle, read_bundle, write_bundle
    from cdm.store import Store

    name, source = named
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    comp, record = train_source(bb, source, cfg, progress=False)
    write_bundle(work / "bundle", bb, source, comp.tensors(), record, command="benchmarks/scale.py")
    bundle = read_bundle(work / "bundle")
    out = {"bundle_weights_sha256": bundle.manifest["weights_sha256"],
           "train_seconds": round(time.perf_counter() - t0, 1)}
    with Store.create(work / "imported", backbone_hash=bb.hash, backbone_ref=bb.ref) as st:
        imp = import_bundle(st, bb, work / "bundle", name=name)
        stored = imp.compartment.weights_sha256
        before = (len(st.audit_log()), stored)
        try:
            forget_samples(st, bb, name, [source.sample_hashes[0]], progress=False)
            refused = False
        except CdmError as e:
            refused = "cdm train-compartment" in str(e) and "cdm import" in str(e)
        after = (len(st.audit_log()), st.compartment(name)["weights_sha256"])
        out.update(weights_equal_sequential=stored == want[name] == bundle.manifest["weights_sha256"],
                   data_held=st.source(name)["data_held"], forget_sample_refused=refused,
                   unchanged_after_refusal=before == after,
                   audit=[a["action"] for a in st.audit_log()][-3:], verify=st.verify())
    out["ok"] = bool(out["weights_equal_sequential"] and out["data_held"] is False and out["forget_sample_refused"]
                     and out["unchanged_after_refusal"] and out["audit"][-1] == "import" and out["verify"] == [])
    return out


if __name__ == "__main__":
    main()
