"""``cdm``: pretrain the backbone, train the judge classifier, sample, score, demo."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import typer
from rich.console import Console

from ..errors import CdmError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compartmentalized Diffusion Models: generators whose training data stays protected.")
console = Console(stderr=True, soft_wrap=True)
REPO = Path(__file__).resolve().parents[3]
DEFAULT_BACKBONE = REPO / "weights" / "backbone"
DEFAULT_CLASSIFIER = REPO / "weights" / "classifier"


@app.callback()
def _root() -> None:
    """Compartmentalized Diffusion Models: generators whose training data stays protected."""


def _threads(n: int | None) -> None:
    import torch

    if n:
        torch.set_num_threads(n)


def _device(name: str) -> str:
    import torch

    try:
        dev = torch.device(name)
    except RuntimeError:
        raise typer.BadParameter(f"unknown device {name!r} (cpu, cuda, cuda:1 ...)", param_hint="--device") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise typer.BadParameter("no CUDA device on this machine", param_hint="--device")
    return name


def _command() -> str:
    return "cdm " + shlex.join(sys.argv[1:])


@app.command()
def pretrain(
    out: Path = typer.Option(..., help="Run directory: checkpoint, then the finished backbone bundle."),
    steps: int = typer.Option(4000, help="Total optimiser steps."),
    batch_size: int = typer.Option(64),
    lr: float = typer.Option(2e-3),
    lr_schedule: str = typer.Option("cosine", help="constant | cosine"),
    glyphs: int = typer.Option(0, help="Synthetic digit glyphs added to the 1,000 public MNIST digits."),
    public_digits: bool = typer.Option(True, help="--no-public-digits: glyphs only (a domain gap to the protected "
                                       "handwritten digits, the paper's setting)."),
    seed: int = typer.Option(0),
    max_minutes: float | None = typer.Option(None, help="Stop after a checkpoint once this long (resume later)."),
    threads: int | None = typer.Option(None, help="torch CPU threads (default: torch's choice)."),
) -> None:
    """Pretrain the class-conditional U-ViT backbone on PUBLIC data only (resumable, deterministic)."""
    from ..training import PretrainConfig
    from ..training import pretrain as run

    _threads(threads)
    cfg = PretrainConfig(steps=steps, batch_size=batch_size, lr=lr, lr_schedule=lr_schedule, glyphs=glyphs,
                         public_digits=public_digits, seed=seed)
    rec = run(cfg, out, max_minutes=max_minutes, command=_command())
    state = "finished" if rec["finished"] else "paused (run the same command to resume)"
    console.print(f"{state} at step {rec['steps_done']}/{steps}, loss {rec['final_loss']:.4f}, "
                  f"{rec['wall_seconds']:.0f} s in all -> {out}")


def _parse_classes(spec: str | None) -> list[int] | None:
    if not spec:
        return None
    try:
        return [int(c) for c in spec.split(",") if c.strip()]
    except ValueError:
        raise CdmError(f"--classes: expected comma-separated integers, got {spec!r}") from None


@app.command()
def sample(
    out: Path = typer.Option(Path("out/samples"), help="Directory for samples.npz and samples.png."),
    backbone: Path = typer.Option(DEFAULT_BACKBONE, help="Backbone directory (config.json + model.safetensors)."),
    per_class: int = typer.Option(10, help="Images per class."),
    classes: str | None = typer.Option(None, help="Comma-separated class labels (default: all)."),
    n: int | None = typer.Option(None, help="Draw N unconditional images instead of per-class ones."),
    solver: str = typer.Option("ddim", help="ddim | dpmpp2m | ddpm (ancestral; needed by --weighting ito)"),
    steps: int = typer.Option(50, help="Solver steps."),
    guidance: float = typer.Option(2.0, help="Classifier-free guidance scale (1 = none)."),
    seed: int = typer.Option(0),
    bf16: bool = typer.Option(False, help="bfloat16 autocast for the denoiser."),
    store: Path | None = typer.Option(None, help="Compartment store (with --sources)."),
    sources: str | None = typer.Option(None, help="Comma-separated sources to compose (one = that compartment)."),
    weighting: str = typer.Option("ito", help="ito | router | isolated | classifier | naive | single."),
    sparse: float = typer.Option(0.0, help="Stop evaluating a source for a sample once its weight < this."),
    threads: int | None = typer.Option(None),
) -> None:
    """Draw images from the backbone, one compartment, or a composition of compartments (PNG grid + .npz)."""
    import numpy as np

    from ..backbone import Backbone
    from ..demo import write_samples
    from ..generation import generate, sample_backbone

    _threads(threads)
    wanted = _parse_classes(classes)
    if (store is None) != (sources is None):
        raise CdmError("--store and --sources go together")
    if weighting == "ito" and sources and "," in sources and solver != "ddpm":
        raise CdmError("--weighting ito tracks densities along a stochastic path: use --solver ddpm")
    bb = Backbone.from_pretrained(backbone)
    eps, composed, names = None, None, []
    if store is not None:
        from ..operations import compose

        names = [s for s in sources.split(",") if s]
        with _open_store(store) as st:
            composed = compose(st, bb, names, weighting=weighting, threshold=sparse, seed=seed)
        eps = composed
    trajectories: list = []
    if n is not None:
        images, labels = generate(eps or bb.eps, schedule=bb.schedule, codec=bb.codec, n=n, solver=solver, steps=steps,
                                  seed=seed, bf16=bf16, progress=True, trajectories=trajectories)
    else:
        images, labels = sample_backbone(bb, per_class=per_class, classes=wanted, solver=solver, eps=eps, steps=steps,
                                         guidance=guidance, seed=seed, bf16=bf16, progress=True,
                                         trajectories=trajectories)
    write_samples(out, "samples", images, labels, nrow=per_class if n is None else 10)
    msg = f"{len(images)} images -> {out / 'samples.npz'}, {out / 'samples.png'}"
    if composed is not None:
        from ..io import atomic_write_bytes
        import io as _io

        traj = np.concatenate([t.numpy() for t in trajectories], axis=1)  # (calls, N or 2N with guidance, n)
        buf = _io.BytesIO()
        np.savez_compressed(buf, weights=traj, sources=np.array(names))
        atomic_write_bytes(out / "weights.npz", buf.getvalue())
        final = traj[-1, : len(images)].mean(0)
        msg += (f"; {composed.evals} denoiser evaluations in the last batch; mean final weights "
                + ", ".join(f"{k}={v:.2f}" for k, v in zip(names, final, strict=True)) + f" -> {out / 'weights.npz'}")
    console.print(msg)


@app.command("train-classifier")
def train_classifier_cmd(
    out: Path = typer.Option(DEFAULT_CLASSIFIER, help="Directory for the classifier bundle."),
    steps: int = typer.Option(800),
    seed: int = typer.Option(0),
    threads: int | None = typer.Option(None),
) -> None:
    """Train the digit classifier (FID features and judge) on the PUBLIC MNIST slice; report held-out accuracy."""
    from ..data import public_protected
    from ..evaluation import down_up, judge, train_classifier
    from ..training import git_commit, machine_info

    _threads(threads)
    public, protected = public_protected()
    model, record = train_classifier(public.images, public.labels, steps=steps, seed=seed)
    plain = judge(model, protected.images, protected.labels)
    blurred = judge(model, down_up(protected.images), protected.labels)
    record.update(command=_command(), commit=git_commit(), machine=machine_info(),
                  data={"train": public.id, "train_content_hash": public.content_hash, "held_out": protected.id},
                  held_out={"accuracy": plain["accuracy"], "mean_max_prob": plain["mean_max_prob"],
                            "down_up_accuracy": blurred["accuracy"], "down_up_mean_max_prob": blurred["mean_max_prob"],
                            "n": plain["n"]})
    model.save_pretrained(out, record=record)
    console.print_json(json.dumps(record["held_out"]))


@app.command()
def score(
    samples: Path = typer.Argument(..., help="An .npz with images (uint8 N x 28 x 28) and optional labels."),
    reference: str = typer.Option("mnist/protected", help="Source spec of the real reference set."),
    classifier: Path = typer.Option(DEFAULT_CLASSIFIER),
) -> None:
    """Score samples with the shipped classifier: accuracy vs requested labels, confidence, FID vs real digits."""
    from ..data import load_npz, load_source
    from ..demo import score_samples
    from ..evaluation import DigitClassifier

    src = load_npz(samples)
    print(json.dumps(score_samples(src.images, src.labels, DigitClassifier.from_pretrained(classifier),
                                   load_source(reference)), indent=2))


@app.command()
def demo(
    out: Path = typer.Option(Path("out/demo"), help="Report directory."),
    backbone: Path = typer.Option(DEFAULT_BACKBONE),
    classifier: Path = typer.Option(DEFAULT_CLASSIFIER),
    per_class: int = typer.Option(10, help="Images per class in each grid."),
    steps: int = typer.Option(300, help="Training steps per demo compartment."),
    seed: int = typer.Option(0),
) -> None:
    """The main job on the embedded data: backbone samples, two compartments, a forget; writes report.md."""
    from ..demo import run_demo

    run_demo(out, backbone=backbone, classifier=classifier, per_class=per_class, steps=steps, seed=seed,
             log=console.print)
    console.print(f"report -> {out / 'report.md'}")


@app.command()
def bench(
    profile: str = typer.Option("quick", help="toy (seconds, CI), quick (under 25 min on 2 cores) or full."),
    out: Path = typer.Option(Path("out/bench"), help="Results directory (resumable: rerun to continue)."),
    parts: str = typer.Option("all", help="Comma-separated parts, or all: paragon, table1, two_domain, cost, "
                              "continual, forget, memorization, dp, attribution."),
    backbone: Path = typer.Option(DEFAULT_BACKBONE),
    classifier: Path = typer.Option(DEFAULT_CLASSIFIER),
    threads: int | None = typer.Option(None, help="Torch CPU threads (default: all cores)."),
    device: str = typer.Option("cpu", help="Where the backbone's transformer runs: cpu, cuda, cuda:1 ..."),
) -> None:
    """The seed paper's evaluation on the embedded data: results.json, report.md, plots, sample sets."""
    from ..benchmark import PARTS, run_bench

    _threads(threads)
    chosen = PARTS if parts == "all" else tuple(p.strip() for p in parts.split(",") if p.strip())
    res = run_bench(profile, out, backbone=backbone, classifier=classifier, parts=chosen, progress=False,
                    meta={"command": _command()}, device=_device(device))
    console.print(f"{res['meta']['wall_seconds']:.0f} s of parts; report -> {out / 'report.md'}")


def _open_store(path: Path, create: bool = False):
    from ..store import Store

    return Store.create(path) if create else Store.open(path)


def _compartment_config(steps: int, prompts: int, unconditional: bool, seed: int, batch_size: int, lr: float):
    from ..compartments import CompartmentConfig

    return CompartmentConfig(steps=steps, n_prompts=prompts, conditional=not unconditional, seed=seed,
                             batch_size=batch_size, lr=lr)


@app.command()
def add(
    spec: str = typer.Argument(..., help="Source: mnist/protected/strat8-0, a folder, an .npz ... (see cdm.data)."),
    store: Path = typer.Option(..., help="Compartment store directory (created if missing)."),
    name: str = typer.Option(..., help="Name of the source in the store (letters, digits, . _ -)."),
    tags: str = typer.Option("", help="Comma-separated access tags."),
    steps: int = typer.Option(2000, help="Optimiser steps."),
    prompts: int = typer.Option(8, help="Prompt tokens per block (P)."),
    unconditional: bool = typer.Option(False, help="One prompt set instead of one per class."),
    batch_size: int = typer.Option(64),
    lr: float = typer.Option(0.1),
    seed: int = typer.Option(0),
    backbone: Path = typer.Option(DEFAULT_BACKBONE),
    max_minutes: float | None = typer.Option(None, help="Pause after a checkpoint; run again to resume."),
    threads: int | None = typer.Option(None),
    dp_epsilon: float | None = typer.Option(None, help="Train with DP-SGD to this epsilon (sample-level; "
                                                        "--batch-size is then the expected Poisson batch)."),
    dp_delta: float | None = typer.Option(None, help="DP delta (default min(1/N, 1e-5))."),
    dp_clip: float = typer.Option(1.0, help="DP per-sample gradient clipping norm."),
    dp_augmult: int = typer.Option(1, help="DP: (t, noise) draws per sample, averaged before clipping."),
    dp_accountant: str = typer.Option("rdp", help="DP accountant: rdp | prv."),
) -> None:
    """Add a data source: register it and train its compartment (no other compartment changes)."""
    from ..backbone import Backbone
    from ..data import load_source
    from ..operations import add_source

    _threads(threads)
    cfg = _compartment_config(steps, prompts, unconditional, seed, batch_size, lr)
    source = load_source(spec)
    bb = Backbone.from_pretrained(backbone)
    with _open_store(store, create=True) as st:
        if dp_epsilon is not None:
            from ..operations import add_source_dp
            from ..privacy import DPConfig

            dp = DPConfig(epsilon=dp_epsilon, delta=dp_delta, max_grad_norm=dp_clip, augmult=dp_augmult,
                          accountant=dp_accountant)
            out = add_source_dp(st, bb, source, name=name, cfg=cfg, dp=dp, tags=tuple(t for t in tags.split(",") if t),
                                max_minutes=max_minutes)
        else:
            out = add_source(st, bb, source, name=name, cfg=cfg, tags=tuple(t for t in tags.split(",") if t),
                             max_minutes=max_minutes)
    rec = out["record"]
    if not out["finished"]:
        console.print(f"paused at step {rec['steps_done']}/{steps}; run the same command to resume")
        return
    console.print(f"compartment '{name}': {len(source)} samples, {rec['steps_done']} steps, "
                  f"{rec['wall_seconds']:.1f} s, loss {rec['final_loss']:.4f}, "
                  f"weights {out['row']['weights_sha256'][:12]}")
    if rec.get("dp"):
        d = rec["dp"]
        console.print(f"DP: epsilon {d['epsilon']:.3f} (target {d['target_epsilon']:g}, {d['accountant']}) at delta "
                      f"{d['delta']:.2g}; noise multiplier {d['noise_multiplier']:.3f}, clip {d['max_grad_norm']:g}, "
                      f"sample rate {d['sample_rate']:.4f}, {d['steps']} steps, augmult {d['augmult']}")


@app.command()
def paragon(
    store: Path = typer.Option(...),
    sources: str | None = typer.Option(None, help="Comma-separated source names (default: all)."),
    steps: int = typer.Option(2000),
    prompts: int = typer.Option(8),
    unconditional: bool = typer.Option(False),
    batch_size: int = typer.Option(64),
    lr: float = typer.Option(0.1),
    seed: int = typer.Option(0),
    backbone: Path = typer.Option(DEFAULT_BACKBONE),
    threads: int | None = typer.Option(None),
) -> None:
    """Train the paragon: one compartment with the same prompt budget on the union of the sources."""
    from ..backbone import Backbone
    from ..operations import train_paragon

    _threads(threads)
    cfg = _compartment_config(steps, prompts, unconditional, seed, batch_size, lr)
    bb = Backbone.from_pretrained(backbone)
    with _open_store(store) as st:
        out = train_paragon(st, bb, cfg=cfg, sources=sources.split(",") if sources else None)
    rec = out["record"]
    console.print(f"paragon on {rec['source']['n']} samples: {rec['steps_done']} steps, {rec['wall_seconds']:.1f} s")


@app.command()
def forget(
    name: str = typer.Argument(..., help="Source name in the store."),
    store: Path = typer.Option(...),
    sample: list[str] | None = typer.Option(None, help="Sample id (content hash or >= 12-char prefix); repeat."),
    reason: str = typer.Option("", help="Why (kept in the audit log)."),
    backbone: Path = typer.Option(DEFAULT_BACKBONE),
    threads: int | None = typer.Option(None),
) -> None:
    """Forget a source (delete everything derived from it) or, with --sample, samples of it (exact retrain)."""
    from ..operations import forget_samples, forget_source

    _threads(threads)
    with _open_store(store) as st:
        if sample:
            from ..backbone import Backbone

            out = forget_samples(st, Backbone.from_pretrained(backbone), name, list(sample), reason=reason)
            console.print(f"forgot {out['n_removed']} sample(s) of '{name}': compartment retrained from scratch in "
                          f"{out['seconds']:.1f} s ({out['before'][:12]} -> {out['after'][:12]})"
                          + (f"; dropped joint compartments {out['dropped']} (retrain them)" if out["dropped"] else ""))
        else:
            out = forget_source(st, name, reason=reason)
            console.print(f"forgot source '{name}' in {out['seconds'] * 1000:.0f} ms: removed {out['removed']}"
                          + (f"; retrain {[r['cid'] for r in out['retrain']]}" if out["retrain"] else ""))


@app.command()
def sources(store: Path = typer.Option(...)) -> None:
    """List the store's sources and compartments."""
    from rich.table import Table

    with _open_store(store) as st:
        comps = st.compartments()
        table = Table(title=f"store {store}")
        for col in ("source", "samples", "tags", "compartments", "added"):
            table.add_column(col)
        for s in st.sources():
            cids = [f"{c['cid']} ({c['kind']})" for c in comps if s["id"] in c["sources"]]
            table.add_row(s["id"], str(s["n"]), ",".join(s["tags"]), ", ".join(cids) or "-", s["added_at"][:19])
    Console().print(table)


@app.command()
def show(name: str = typer.Argument(...), store: Path = typer.Option(...),
         hashes: bool = typer.Option(False, help="Also print every sample hash.")) -> None:
    """Show a compartment's manifest (source, hashes, backbone, config, seed, steps, wall time, DP)."""
    from rich.table import Table

    with _open_store(store) as st:
        m = dict(st.compartment(name)["manifest"])
    src = dict(m.get("source", {}))
    n_hashes = len(src.get("sample_hashes", []))
    if not hashes:
        src["sample_hashes"] = f"<{n_hashes} hashes; --hashes to print>"
    m["source"] = src
    table = Table(title=f"compartment {name}", show_header=False)
    for k in sorted(m):
        v = m[k]
        table.add_row(k, json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else str(v))
    Console().print(table)


@app.command()
def audit(store: Path = typer.Option(...), limit: int = typer.Option(20)) -> None:
    """The latest audit records: who, when, what, before/after hashes."""
    from rich.table import Table

    with _open_store(store) as st:
        rows = st.audit_log(limit=limit)
    table = Table(title="audit log")
    for col in ("seq", "when", "who", "action", "target", "before", "after", "details"):
        table.add_column(col)
    for r in rows:
        table.add_row(str(r["seq"]), r["ts"][:19], r["actor"], r["action"], str(r["target"]),
                      (r["before_hash"] or "")[:12], (r["after_hash"] or "")[:12], json.dumps(r["details"])[:80])
    Console().print(table)


@app.command("train-router")
def train_router_cmd(
    store: Path = typer.Option(..., help="Compartment store."),
    sources: str | None = typer.Option(None, help="Comma-separated sources (default: all with a compartment)."),
    kind: str = typer.Option("router", help="router (joint heads on the compartments' mid tokens, the paper's) | "
                                            "classifier (a separate noisy classifier) | isolated (one head per "
                                            "source, trained on it and public data only)"),
    steps: int = typer.Option(500, help="Optimiser steps (per head for --kind isolated)."),
    batch_size: int = typer.Option(64),
    lr: float = typer.Option(3e-3),
    seed: int = typer.Option(0),
    backbone: Path = typer.Option(DEFAULT_BACKBONE),
    threads: int | None = typer.Option(None),
) -> None:
    """Train learned composition weights for `cdm sample --weighting router|classifier|isolated`."""
    from ..backbone import Backbone
    from ..composition.heads import HeadConfig
    from ..operations import train_isolated_op, train_router_op

    _threads(threads)
    if kind not in ("router", "classifier", "isolated"):
        raise CdmError(f"--kind must be router, classifier or isolated, got {kind!r}")
    cfg = HeadConfig(steps=steps, batch_size=batch_size, lr=lr, seed=seed)
    bb = Backbone.from_pretrained(backbone)
    names = [s for s in sources.split(",") if s] if sources else None
    with _open_store(store) as st:
        if kind == "isolated":
            for name in names or [r["cid"] for r in st.compartments(kind="compartment")]:
                out = train_isolated_op(st, bb, name, cfg=cfg)
                rec = out["record"]
                console.print(f"isolated head '{out['row']['cid']}': {rec['steps']} steps, "
                              f"{rec['wall_seconds']:.1f} s, loss {rec['final_loss']:.4f}, "
                              f"held-out accuracy {rec['accuracy']:.3f} (vs core)")
            return
        out = train_router_op(st, bb, names, kind=kind, cfg=cfg)
    rec = out["record"]
    console.print(f"{kind} '{out['row']['cid']}' on {', '.join(out['row']['sources'])}: {rec['steps']} steps, "
                  f"{rec['wall_seconds']:.1f} s, loss {rec['final_loss']:.4f}, held-out accuracy "
                  f"{rec['accuracy']:.3f} (chance {rec['chance']:.3f}); by t: {rec['accuracy_by_t']}")


# ----------------------------------------------------------------------------------------------- the service
DEMO_STORE = Path("out/demo/store")
keys_app = typer.Typer(no_args_is_help=True, help="API keys of the service (hashed in the store's registry).")
app.add_typer(keys_app, name="keys")


@app.command()
def serve(
    store: Path = typer.Option(DEMO_STORE, help="Compartment store to serve (default: the demo's, `cdm demo`)."),
    host: str = typer.Option("127.0.0.1", help="Interface to listen on."),
    port: int = typer.Option(8000),
    backbone: Path = typer.Option(DEFAULT_BACKBONE),
    threads: int = typer.Option(1, help="torch CPU threads per worker thread."),
    workers: int = typer.Option(1, help="Generate requests computed at once."),
    queue: int = typer.Option(16, help="Generate requests waiting beyond those (503 when full)."),
    max_n: int = typer.Option(16, help="Images per request."),
    max_steps: int = typer.Option(100, help="Sampler steps per request."),
    max_body_kb: int = typer.Option(64, help="JSON body limit (KiB)."),
    max_upload_mb: int = typer.Option(32, help="Uploaded .npz limit (MiB)."),
    train_steps: int = typer.Option(300, help="Default training steps of a source added over HTTP."),
    log_level: str = typer.Option("info"),
) -> None:
    """Serve generation by access rights over HTTP (API + web page at /, OpenAPI at /docs)."""
    try:
        import uvicorn

        from ..server import Limits, create_app, list_keys
    except ImportError as e:
        raise CdmError(f"the service needs fastapi, uvicorn and python-multipart: pip install -e . ({e})") from None
    if not (store / "registry.sqlite").is_file():
        hint = " (build it with `cdm demo`)" if store == DEMO_STORE else ""
        raise CdmError(f"{store}: no compartment store{hint}")
    limits = Limits(max_n=max_n, max_steps=max_steps, max_body_bytes=max_body_kb * 1024,
                    max_upload_bytes=max_upload_mb * 1024 * 1024, workers=workers, queue=queue, threads=threads,
                    default_train_steps=train_steps, max_train_steps=max(train_steps, Limits.max_train_steps))
    _threads(threads)
    asgi = create_app(store, backbone=backbone, limits=limits)
    live = [k for k in list_keys(store) if k.revoked_at is None]
    if not live:
        console.print(f"no API key yet: make one with `cdm keys create admin --admin --store {store}`")
    console.print(f"serving {store} on http://{host}:{port}/ ({len(live)} live key(s); API docs at /docs)")
    uvicorn.run(asgi, host=host, port=port, log_level=log_level)


@keys_app.command("create")
def keys_create(
    name: str = typer.Argument(..., help="Key name (the actor in the audit log)."),
    store: Path = typer.Option(DEMO_STORE),
    sources: str = typer.Option("", help="Comma-separated sources this key may use."),
    admin: bool = typer.Option(False, help="An admin key: every source, and the admin endpoints."),
) -> None:
    """Create an API key; prints the token once (only its sha256 is stored)."""
    from ..server.keys import create_key

    with _open_store(store) as st:
        token, key = create_key(st, name, sources=[s for s in sources.split(",") if s], admin=admin)
    console.print(f"key '{key.name}'" + (" (admin)" if key.admin else f" for {', '.join(key.sources) or 'no source'}")
                  + ": keep the token, it is not stored")
    print(token)


@keys_app.command("list")
def keys_list(store: Path = typer.Option(DEMO_STORE)) -> None:
    """List API keys (names, rights, prefixes; never the tokens)."""
    from rich.table import Table

    from ..server.keys import list_keys

    table = Table(title=f"API keys of {store}")
    for col in ("name", "admin", "sources", "prefix", "created", "revoked"):
        table.add_column(col)
    with _open_store(store):
        keys = list_keys(store)
    for k in keys:
        table.add_row(k.name, "yes" if k.admin else "", ",".join(k.sources), k.prefix + "...", k.created_at[:19],
                      (k.revoked_at or "")[:19])
    Console().print(table)


@keys_app.command("revoke")
def keys_revoke(name: str = typer.Argument(...), store: Path = typer.Option(DEMO_STORE)) -> None:
    """Revoke an API key (it never authenticates again; its row stays for the audit trail)."""
    from ..server.keys import revoke_key

    with _open_store(store) as st:
        key = revoke_key(st, name)
    console.print(f"key '{key.name}' revoked at {key.revoked_at}")


@app.command()
def attribute(
    store: Path = typer.Option(..., help="Compartment store."),
    sources: str = typer.Option(..., help="Comma-separated sources to compose and attribute to."),
    out: Path = typer.Option(Path("out/attribution"), help="Directory: samples.npz/png and credits.json."),
    n: int = typer.Option(16, help="Unconditional samples to generate and attribute."),
    steps: int = typer.Option(25, help="Probability-flow ODE (DDIM, eta 0) steps."),
    probes: int = typer.Option(2, help="Hutchinson probes per step (>= 2 gives a standard error)."),
    exact: bool = typer.Option(False, help="Exact divergence (one backward pass per dimension; slow)."),
    weighting: str = typer.Option("ode", help="ode (tracked along the path) | router | classifier | isolated."),
    priors: str | None = typer.Option(None, help="Comma-separated lambda_i (default: source sizes)."),
    density: str = typer.Option("auto", help="Each source's density: class-mixture (its classes weighted by its "
                                "own class counts) | prompt-row (its unconditional prompts) | auto (the class "
                                "mixture where it applies)."),
    seed: int = typer.Option(0),
    backbone: Path = typer.Option(DEFAULT_BACKBONE),
    threads: int | None = typer.Option(None),
) -> None:
    """Credit attribution: generate from a composition and say which sources made each sample (likelihood
    decomposition C_i along the probability-flow ODE, and the time-integrated weights W_i)."""
    import numpy as np

    from ..backbone import Backbone
    from ..demo import write_samples
    from ..io import atomic_write_json
    from ..operations import attribute_samples

    _threads(threads)
    names = [s for s in sources.split(",") if s]
    lam = [float(v) for v in priors.split(",")] if priors else None
    bb = Backbone.from_pretrained(backbone)
    with _open_store(store) as st:
        r = attribute_samples(st, bb, names, n=n, seed=seed, steps=steps, probes=probes, exact=exact, priors=lam,
                              weighting=weighting, density=density)
    write_samples(out, "samples", r["images"], None, nrow=min(n, 10))
    per = [{"sample": i, "credit": dict(zip(names, map(float, r["credit"][i]), strict=True)),
            "credit_se": dict(zip(names, map(float, r["credit_se"][i]), strict=True)),
            "weight_path": dict(zip(names, map(float, r["weight_path"][i]), strict=True)),
            "loglik_change_nats": float(r["loglik_change"][i])} for i in range(n)]
    summary = {"sources": names, "priors": r["priors"], "density": r["density"], "weighting": weighting, "steps": steps,
               "probes": r["probes"], "exact": exact, "seed": seed, "command": _command(),
               "mean_credit": dict(zip(names, map(float, r["credit"].mean(0)), strict=True)),
               "mean_weight_path": dict(zip(names, map(float, r["weight_path"].mean(0)), strict=True)),
               "samples": per}
    atomic_write_json(out / "credits.json", summary)
    top = np.clip(r["credit"], 0, None).argmax(1)
    console.print(f"{n} samples ({r['density']}) -> {out / 'samples.png'}; credits -> {out / 'credits.json'}; "
                  "top-credit source: "
                  + ", ".join(f"{nm} {int((top == k).sum())}" for k, nm in enumerate(names))
                  + "; mean credit " + ", ".join(f"{k}={v:.2f}" for k, v in summary["mean_credit"].items())
                  + "; mean weight path " + ", ".join(f"{k}={v:.2f}" for k, v in summary["mean_weight_path"].items()))


def main() -> None:
    try:
        app()
    except (CdmError, ValueError) as e:  # bad input: one line, no traceback
        console.print(f"[red]error:[/red] {e}")
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
