"""``cdm``: pretrain the backbone, train the judge classifier, sample, score, demo."""

from __future__ import annotations

import json
import shlex
import sys
from enum import Enum
from pathlib import Path

import typer
from rich.console import Console

from ..compartments import CompartmentConfig
from ..data import FILTERS
from ..training.pretrain import PretrainConfig
from ..composition.registry import REGISTRY, names as weighting_names
from ..errors import CdmError
from ..operations.generate import UNCONDITIONAL
from ..sampling import SCHEDULES, SOLVERS
from ..shipped import shipped

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compartmentalized Diffusion Models: generators whose training data stays protected.")
console = Console(stderr=True, soft_wrap=True)
DEFAULT_BACKBONE = shipped("backbone")  # package data (works from a wheel too)
DEFAULT_CLASSIFIER = shipped("classifier")
_CC = CompartmentConfig()  # the defaults of `cdm add` and `cdm paragon` are the config's (one place)
_PC = PretrainConfig()  # and those of `cdm pretrain`


def _choices(name: str, values) -> type[Enum]:
    """A str Enum of ``values``: typer lists them in --help and refuses anything else before any work starts."""
    return Enum(name, {v: v for v in values}, type=str)


# Every choice comes from where the choice is made: weightings from the registry, solvers from cdm.sampling.
Weighting = _choices("Weighting", weighting_names())
Solver = _choices("Solver", SOLVERS)
Schedule = _choices("Schedule", SCHEDULES)
LrSchedule = _choices("LrSchedule", ("constant", "cosine"))
HeadKind = _choices("HeadKind", sorted({s.heads for s in REGISTRY.values() if s.heads}))
Density = _choices("Density", ("auto", "class-mixture", "prompt-row"))
AttributionWeighting = _choices("AttributionWeighting", ("ode", *(k for k in weighting_names() if REGISTRY[k].heads)))
Accountant = _choices("Accountant", ("rdp", "prv"))
Profile = _choices("Profile", ("toy", "quick", "full"))
Dataset = _choices("Dataset", ("digits", "emoji"))
Unconditional = _choices("Unconditional", UNCONDITIONAL)
# per dataset: the shipped backbone and judge its commands default to, and its shipped latent backbone (--latent)
DATASET_WEIGHTS = {"digits": ("backbone", "classifier"), "emoji": ("backbone-emoji", "judge-emoji")}
LATENT_BACKBONES = {"emoji": "backbone-emoji-latent"}
# `cdm bench` on digits defaults to the domain-gap backbone (pretrained on font glyphs, not handwriting): on the
# digit backbone most compartments have nothing left to learn (7 of 8 kept step 0), so the tables showed nothing
BENCH_BACKBONES = {"digits": "backbone-glyphs"}


def _dataset_weights(dataset: str, backbone: Path | None, classifier: Path | None, latent: bool) -> tuple:
    """(backbone, judge) for a command on ``dataset``: the given ones, else the shipped ones (``latent``: the
    dataset's shipped latent backbone)."""
    bb_name, judge_name = DATASET_WEIGHTS[dataset]
    if latent:
        if backbone is not None:
            raise CdmError("--latent picks the shipped latent backbone: leave out --backbone (or give a latent one "
                           "without --latent)")
        if dataset not in LATENT_BACKBONES:
            raise CdmError(f"no latent backbone ships for {dataset}; give one with --backbone (`cdm pretrain "
                           "--autoencoder ...` trains one)")
        bb_name = LATENT_BACKBONES[dataset]
    return backbone or shipped(bb_name), classifier or shipped(judge_name)


def _latent_option():
    return typer.Option(False, help="Latent mode: the dataset's shipped latent backbone (U-ViT on the latents of "
                                    "cdm's autoencoder, shipped:autoencoder-emoji). A --backbone that is latent "
                                    "needs no flag.")
Filter = _choices("Filter", FILTERS)
WEIGHTING_HELP = "How composition weights are obtained: " + "; ".join(
    f"{k}: {REGISTRY[k].help}" for k in weighting_names()) + "."


def _value(choice) -> str | None:
    return None if choice is None else (choice.value if isinstance(choice, Enum) else str(choice))


def _threads_option():
    return typer.Option(None, help="torch CPU threads (default: torch's choice, all cores).")


def _store_option(help: str = "Compartment store directory."):
    return typer.Option(..., help=help)


def _backbone_option():
    return typer.Option(None, help="Backbone directory or shipped:NAME. Default: the store's own (recorded when "
                                   "the store was created); a store refuses another.")


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


def _device_option():
    return typer.Option("cpu", help="Where to run: cpu (the bit-exact reference), cuda, cuda:1 ...")


def _on(bb, device: str):
    """The backbone moved to ``device``: training, sampling, weightings and attribution follow it there."""
    return bb if device == "cpu" else bb.to(_device(device))


def _command() -> str:
    return "cdm " + shlex.join(sys.argv[1:])


@app.command()
def pretrain(
    out: Path = typer.Option(..., help="Run directory: checkpoint, then the finished backbone bundle."),
    data: str = typer.Option("", help="Source spec of PUBLIC images (a folder, an .npz ...); default: the public "
                             "digits (and --glyphs)."),
    data_size: int = typer.Option(_PC.data_size, help="Side of the stored square images the backbone takes "
                                  "(the data is fitted to it)."),
    channels: int = typer.Option(_PC.channels, help="1 grey or 3 RGB."),
    image_size: int = typer.Option(_PC.img_size, help="Side the U-ViT sees (data_size must be a multiple: average "
                                   "pooling in, bilinear upsampling out; latent mode: data_size / the autoencoder's "
                                   "factor)."),
    autoencoder: str = typer.Option("", help="Latent mode: an autoencoder folder (diffusers AutoencoderKL) or "
                                    "shipped:autoencoder-emoji; the U-ViT then works on its latents."),
    patch_size: int = typer.Option(_PC.patch_size, help="U-ViT patch side."),
    embed_dim: int = typer.Option(_PC.embed_dim, help="U-ViT token width."),
    depth: int = typer.Option(_PC.depth, help="U-ViT blocks (depth // 2 in, 1 mid, depth // 2 out)."),
    heads: int = typer.Option(_PC.num_heads, help="Attention heads."),
    unconditional: bool = typer.Option(False, help="No class token (labels ignored; no guidance)."),
    steps: int = typer.Option(4000, help="Total optimiser steps."),
    batch_size: int = typer.Option(_PC.batch_size, help="Images per optimiser step."),
    lr: float = typer.Option(_PC.lr, help="Peak learning rate (AdamW)."),
    lr_schedule: LrSchedule = typer.Option("cosine", help="Learning-rate schedule."),
    schedule: Schedule = typer.Option(_PC.schedule, help="Noise schedule."),
    glyphs: int = typer.Option(0, help="Synthetic digit glyphs added to the 1,000 public MNIST digits."),
    public_digits: bool = typer.Option(True, help="--no-public-digits: glyphs only (a domain gap to the protected "
                                       "handwritten digits, the paper's setting)."),
    seed: int = typer.Option(0, help="Seed of initialisation, batches and noise."),
    max_minutes: float | None = typer.Option(None, help="Stop after a checkpoint once this long (resume later)."),
    threads: int | None = _threads_option(),
) -> None:
    """Pretrain a U-ViT backbone on PUBLIC data only (resumable, deterministic)."""
    from ..training import PretrainConfig
    from ..training import pretrain as run

    _threads(threads)
    try:
        cfg = PretrainConfig(data=data, data_size=data_size, channels=channels, img_size=image_size,
                             autoencoder=autoencoder,
                             patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=heads,
                             unconditional=unconditional, schedule=_value(schedule), steps=steps,
                             batch_size=batch_size, lr=lr, lr_schedule=_value(lr_schedule), glyphs=glyphs,
                             public_digits=public_digits, seed=seed)
        cfg.model_config(), cfg.image_spec  # noqa: B018 (validates the architecture and image spec first)
        if autoencoder:
            from ..training.pretrain import make_codec

            make_codec(cfg)  # the autoencoder loads and fits the sizes, before any work
    except ValueError as e:
        raise CdmError(f"pretrain: {e}") from None
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
    store: Path | None = typer.Option(None, help="Compartment store (with --sources)."),
    sources: str | None = typer.Option(None, help="Comma-separated sources to compose (one = that compartment)."),
    weighting: Weighting = typer.Option("ito", help=WEIGHTING_HELP),
    backbone: Path | None = typer.Option(None, help="Backbone directory or shipped:NAME (default: the store's, "
                                         "else the shipped one)."),
    per_class: int = typer.Option(10, help="Images per class (an unconditional backbone: images in all, unless --n)."),
    classes: str | None = typer.Option(None, help="Comma-separated class labels (default: all)."),
    n: int | None = typer.Option(None, help="Draw N unconditional images instead of per-class ones."),
    unconditional: Unconditional = typer.Option("mixture", help="--n from class-conditional compartments: mixture "
                                                "(each image's class drawn from the sources' class counts) or null "
                                                "(their null-class prompt row; close to the public backbone)."),
    prompt: list[str] = typer.Option([], help="A caption to draw (repeatable; text compartments): --per-class "
                                     "images of each."),
    solver: Solver | None = typer.Option(None, help="Default: what the weighting needs (ddpm, the ancestral solver, "
                                         "for ito over several sources), else ddim."),
    steps: int = typer.Option(50, help="Solver steps."),
    guidance: float = typer.Option(2.0, help="Classifier-free guidance scale (1 = none; class or caption "
                                   "conditional only)."),
    seed: int = typer.Option(0, help="Seed of the initial noise and of stochastic solvers."),
    bf16: bool = typer.Option(False, help="bfloat16 autocast for the denoiser."),
    sparse: float = typer.Option(0.0, help="Stop evaluating a source for a sample once its weight < this."),
    threads: int | None = _threads_option(),
    device: str = _device_option(),
) -> None:
    """Draw images from the backbone, one compartment, or a composition of compartments (PNG grid + .npz)."""
    import io as _io

    import numpy as np

    from ..backbone import Backbone
    from ..generation import class_labels
    from ..io import atomic_write_bytes, atomic_write_json
    from ..operations import generate_from_store, store_backbone
    from ..viz import write_samples

    _threads(threads)
    wanted = _parse_classes(classes)
    if (store is None) != (sources is None):
        raise CdmError("--store and --sources go together")
    names = [s for s in (sources or "").split(",") if s]
    if store is not None and not names:
        raise CdmError("--sources: name at least one source")
    from ..composition.registry import resolve_solver

    resolve_solver(_value(weighting), len(names), _value(solver))  # refuse a wrong pair before loading anything
    st = _open_store(store) if store is not None else None
    try:
        bb = store_backbone(st, backbone) if st is not None else Backbone.from_pretrained(backbone or DEFAULT_BACKBONE)
        bb = _on(bb, device)
        if n is None and bb.config.num_classes <= 0:  # an unconditional backbone has no classes: per_class images
            if wanted:
                raise CdmError("--classes: this backbone is unconditional (it has no classes); use --n")
            n = per_class
        captions = [c for c in prompt for _ in range(per_class)] or None
        if captions is not None and (n is not None or wanted):
            raise CdmError("--prompt draws --per-class images of each caption: no --n or --classes with it")
        labels = None if n is not None or captions else class_labels(bb, wanted, per_class)  # ValueError: one line
        gen = generate_from_store(st, bb, names, labels=labels, n=n, weighting=_value(weighting),
                                  solver=_value(solver), steps=steps, guidance=guidance, seed=seed, threshold=sparse,
                                  bf16=bf16, progress=True, captions=captions, unconditional=_value(unconditional))
    finally:
        if st is not None:
            st.close()
    write_samples(out, "samples", gen.images, gen.labels, nrow=per_class if n is None else 10)
    if gen.captions is not None:
        atomic_write_json(out / "captions.json", gen.captions)
    msg = f"{len(gen.images)} images ({gen.solver} x{gen.steps}) -> {out / 'samples.npz'}, {out / 'samples.png'}"
    if gen.weights is not None:
        buf = _io.BytesIO()
        np.savez_compressed(buf, weights=gen.weights, sources=np.array(gen.sources))
        atomic_write_bytes(out / "weights.npz", buf.getvalue())
        final = gen.final_weights.mean(0)
        msg += (f"; {gen.evals} denoiser evaluations; mean final weights "
                + ", ".join(f"{k}={v:.2f}" for k, v in zip(gen.sources, final, strict=True))
                + f" -> {out / 'weights.npz'}")
    console.print(msg)


@app.command("train-autoencoder")
def train_autoencoder_cmd(
    out: Path = typer.Option(..., help="Directory for the autoencoder (diffusers AutoencoderKL layout)."),
    steps: int = typer.Option(3000, help="Optimiser steps."),
    glyphs: int = typer.Option(3000, help="Coloured font glyphs beside Noto and the public digits."),
    seed: int = typer.Option(0, help="Seed of initialisation, colours, batches and augmentation."),
    threads: int | None = _threads_option(),
) -> None:
    """Train cdm's small autoencoder for latent mode on PUBLIC data; report PSNR on every artist and the digits."""
    from ..autoencoder.train import AutoencoderTrainConfig, train_autoencoder
    from ..shipped import WEIGHTS_DIR

    if out.resolve().is_relative_to(WEIGHTS_DIR.resolve()):
        raise CdmError(f"--out {out} is inside the shipped weights ({WEIGHTS_DIR}); pick another directory")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CdmError(f"--out {out}: exists and is not an empty directory; pick a new one")
    if steps < 1 or glyphs < 0:
        raise CdmError("--steps must be >= 1 and --glyphs >= 0")
    _threads(threads)
    ae, record = train_autoencoder(AutoencoderTrainConfig(steps=steps, glyphs=glyphs, seed=seed), out,
                                   command=_command())
    console.print(f"{ae} -> {out}")
    console.print_json(json.dumps({"psnr": record["psnr"], "psnr_public": record["psnr_public"]}))


@app.command("train-classifier")
def train_classifier_cmd(
    out: Path = typer.Option(..., help="Directory for the classifier bundle (a new one: the shipped classifier is "
                                       "shipped:classifier and is never overwritten from here)."),
    steps: int | None = typer.Option(None, help="Optimiser steps (default: 800 digits, 3000 emoji)."),
    seed: int = typer.Option(0, help="Seed of initialisation and batches."),
    dataset: Dataset = typer.Option("digits", help="digits: the digit judge, on the PUBLIC MNIST slice; emoji: the "
                                    "emoji judge (category and artist), on half 1 of all five artists."),
    threads: int | None = _threads_option(),
) -> None:
    """Train a judge (FID features, class and source heads) and report its accuracy on held-out real images."""
    from ..data import public_protected
    from ..evaluation import down_up, judge, train_classifier
    from ..provenance import git_commit, machine_info

    from ..shipped import WEIGHTS_DIR

    if out.resolve().is_relative_to(WEIGHTS_DIR.resolve()):
        raise CdmError(f"--out {out} is inside the shipped weights ({WEIGHTS_DIR}); pick another directory")
    if steps is not None and steps < 1:
        raise CdmError("--steps must be >= 1")
    _threads(threads)
    if _value(dataset) == "emoji":
        from ..evaluation.emoji_judge import train_emoji_judge

        model, record = train_emoji_judge(steps=steps or 3000, seed=seed)
        record.update(command=_command(), commit=git_commit(), machine=machine_info())
        model.save_pretrained(out, record=record)
        console.print_json(json.dumps(record["held_out"]))
        return
    steps = steps or 800
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
    samples: Path = typer.Argument(..., help="An .npz with 28x28 grey digit images (uint8 N x 28 x 28) and optional "
                                   "labels: the shipped classifier judges digits only."),
    reference: str = typer.Option("mnist/protected", help="Source spec of the real reference set."),
    classifier: Path = typer.Option(DEFAULT_CLASSIFIER, help="Classifier directory (FID features and judge)."),
) -> None:
    """Score samples with the shipped classifier: accuracy vs requested labels, confidence, FID vs real digits."""
    from ..data import load_npz, load_source
    from ..evaluation import DigitClassifier, score_samples

    src = load_npz(samples)
    print(json.dumps(score_samples(src.images, src.labels, DigitClassifier.from_pretrained(classifier),
                                   load_source(reference)), indent=2))


@app.command()
def demo(
    out: Path | None = typer.Option(None, help="Report directory, the demo's store is OUT/store (default: "
                                    "out/demo, out/demo-emoji)."),
    dataset: Dataset = typer.Option("digits", help="digits: two digit sources; emoji: four artists' emoji on a "
                                    "backbone that saw only Noto's."),
    backbone: Path | None = typer.Option(None, help="Backbone directory or shipped:NAME (default: the dataset's "
                                         "shipped one)."),
    classifier: Path | None = typer.Option(None, help="Judge directory (default: the dataset's shipped one)."),
    per_class: int | None = typer.Option(None, help="Images per class in each grid (default: 10 digits, 6 emoji)."),
    steps: int | None = typer.Option(None, help="Training steps per demo compartment (default: 300 digits, "
                                     "100 emoji)."),
    seed: int = typer.Option(0, help="Seed of training and sampling."),
    latent: bool = _latent_option(),
    text: bool = typer.Option(False, help="emoji: also train text compartments on the emoji's captions and draw "
                              "held-out captions from their composition."),
) -> None:
    """The main job on the embedded data: backbone samples, compartments, composition, attribution, a forget;
    writes report.md."""
    name = _value(dataset)
    backbone, classifier = _dataset_weights(name, backbone, classifier, latent)
    if name == "emoji":
        from ..demo_emoji import run_emoji_demo

        out = out or Path("out/demo-emoji")
        run_emoji_demo(out, backbone=backbone, judge=classifier, per_class=per_class or 6, steps=steps or 100,
                       seed=seed, log=console.print, text=text)
    else:
        if text:
            raise CdmError("--text: the text demo runs on emoji (--dataset emoji); the digits' captions are their "
                           "class names")
        from ..demo import run_demo

        out = out or Path("out/demo")
        run_demo(out, backbone=backbone, classifier=classifier, per_class=per_class or 10, steps=steps or 300,
                 seed=seed, log=console.print)
    console.print(f"report -> {out / 'report.md'}; store -> {out / 'store'} (try `cdm sources --store "
                  f"{out / 'store'}`)")


@app.command()
def bench(
    profile: Profile = typer.Option("quick", help="toy (seconds, CI), quick (under 25 min on 2 cores) or full."),
    dataset: Dataset = typer.Option("digits", help="digits: the seed paper's evaluation on MNIST; emoji: five "
                                    "artists, Noto public and four protected."),
    out: Path | None = typer.Option(None, help="Results directory, resumable: rerun to continue (default: "
                                    "out/bench, out/bench-emoji)."),
    parts: str = typer.Option("all", help="Comma-separated parts, or all. digits: paragon, table1, two_domain, "
                              "cost, continual, forget, memorization, dp, attribution; emoji: judge, backbone, "
                              "artists, composed, attribution, memorization, forget."),
    backbone: Path | None = typer.Option(None, help="Backbone directory or shipped:NAME (default: digits "
                                         "shipped:backbone-glyphs, pretrained on font glyphs so compartments have a "
                                         "domain gap to learn; emoji the dataset's)."),
    classifier: Path | None = typer.Option(None, help="Judge directory (default: the dataset's shipped one)."),
    threads: int | None = _threads_option(),
    device: str = _device_option(),
    latent: bool = _latent_option(),
    splits: str | None = typer.Option(None, help="digits: comma-separated source counts of the tables' rows "
                                      "(default: the profile's, 2,4,8); another value makes a custom profile."),
    methods: str | None = typer.Option(None, help="digits: comma-separated weightings the tables compare "
                                       "(default: all); another value makes a custom profile."),
    bf16: bool | None = typer.Option(None, "--bf16/--no-bf16", help="digits: bfloat16 autocast for sampling "
                                     "(default: the profile's; slower than float32 on CPUs without bf16 units)."),
) -> None:
    """The benchmark on the embedded data: results.json, report.md, plots, sample sets."""
    name = _value(dataset)
    if backbone is None and not latent and name in BENCH_BACKBONES:
        backbone = shipped(BENCH_BACKBONES[name])
    backbone, classifier = _dataset_weights(name, backbone, classifier, latent)
    _threads(threads)
    if name == "emoji":
        from ..benchmark.emoji import EMOJI_PARTS, run_emoji_bench

        out = out or Path("out/bench-emoji")
        chosen = EMOJI_PARTS if parts == "all" else tuple(p.strip() for p in parts.split(",") if p.strip())
        run_emoji_bench(_value(profile), out, backbone=backbone, judge=classifier, parts=chosen,
                        meta={"command": _command()})
        console.print(f"report -> {out / 'report.md'}")
        return
    from ..benchmark import PARTS, run_bench

    out = out or Path("out/bench")
    chosen = PARTS if parts == "all" else tuple(p.strip() for p in parts.split(",") if p.strip())
    prof = _value(profile)
    if splits is not None or methods is not None or bf16 is not None:
        from ..benchmark import PROFILES, with_overrides

        try:
            ks = None if splits is None else tuple(int(k) for k in splits.split(",") if k.strip())
        except ValueError:
            raise CdmError(f"--splits: expected comma-separated integers, got {splits!r}") from None
        if ks is not None and (not ks or min(ks) < 1):
            raise CdmError(f"--splits: expected positive integers, got {splits!r}")
        ms = None if methods is None else tuple(m.strip() for m in methods.split(",") if m.strip())
        prof = with_overrides(PROFILES[prof], splits=ks, methods=ms, bf16=bf16)
    res = run_bench(prof, out, backbone=backbone, classifier=classifier, parts=chosen, progress=False,
                    meta={"command": _command()}, device=_device(device))
    console.print(f"{res['meta']['wall_seconds']:.0f} s of parts; report -> {out / 'report.md'}")


def _open_store(path: Path):
    from ..store import Store

    return Store.open(path)


# The compartment options `add`, `add-many` and `train-compartment` share: (default, help, extra flag names).
_COMPARTMENT_OPTIONS = {
    "steps": (_CC.steps, "Optimiser steps."),
    "prompts": (_CC.n_prompts, "Prompt tokens per block (P)."),
    "unconditional": (False, "One prompt set instead of one per class."),
    "adapters": (0, "Rank of parallel FFN adapters in every block (0: prompts only)."),
    "lora": (0, "Rank of LoRA updates of every block's attention and MLP weights (0: none; prompts alone measured "
                "best, docs/results.md#compartment-capacity)."),
    "batch_size": (_CC.batch_size, "Samples per optimiser step."),
    "lr": (_CC.lr, "Learning rate (Adam, cosine schedule)."),
    "dp_clip": (1.0, "DP per-sample gradient clipping norm."),
    "dp_augmult": (1, "DP: (t, noise) draws per sample, averaged before clipping."),
    "dp_accountant": ("rdp", "DP accountant."),
    "fit_filter": ("lanczos", "Resize filter when a source's images differ from the backbone's (size or "
                              "channels).", "--filter"),
}


def _opt(name: str):
    default, help, *flags = _COMPARTMENT_OPTIONS[name]
    return typer.Option(default, *flags, help=help)


def _compartment_config(steps: int, prompts: int, unconditional: bool, seed: int, batch_size: int, lr: float,
                        text: bool = False, adapters: int = 0, lora: int = 0):
    from ..compartments import CompartmentConfig
    from ..text import MINILM

    return CompartmentConfig(steps=steps, n_prompts=prompts, conditional=not unconditional, seed=seed,
                             batch_size=batch_size, lr=lr, text_encoder=MINILM if text else None,
                             adapter_rank=adapters, lora_rank=lora)


def _dp_option(dp_epsilon, dp_delta, dp_clip, dp_augmult, dp_accountant):
    if dp_epsilon is None:
        return None
    from ..privacy import DPConfig

    return DPConfig(epsilon=dp_epsilon, delta=dp_delta, max_grad_norm=dp_clip, augmult=dp_augmult,
                    accountant=_value(dp_accountant))


def _fit_to(bb, source, fit_filter):
    """The source's images as the backbone takes them (a note when they had to be resized or converted)."""
    from ..data import fit

    if source.spec == bb.codec.spec:
        return source
    fitted = fit(source, bb.codec.spec, filter=_value(fit_filter))
    console.print(f"{source.id}: {source.spec} images fitted to the backbone's {bb.codec.spec} ({_value(fit_filter)})")
    return fitted


def _learned_note(rec) -> str:
    if rec.learned:
        return ""
    return ("; WARNING: it learnt nothing (validation kept step 0, so it equals the backbone): train longer or "
            "with another --lr")


@app.command()
def add(
    spec: str = typer.Argument(..., help="Source: mnist/protected/strat8-0, a folder, an .npz ... (see cdm.data)."),
    store: Path = typer.Option(..., help="Compartment store directory (created if missing, with this backbone)."),
    name: str = typer.Option(..., help="Name of the source in the store (letters, digits, . _ -)."),
    tags: str = typer.Option("", help="Comma-separated access tags."),
    steps: int = _opt("steps"),
    prompts: int = _opt("prompts"),
    unconditional: bool = _opt("unconditional"),
    text: bool = typer.Option(False, help="Condition on the source's captions (all-MiniLM-L6-v2 embeddings -> "
                              "linear -> prompt tokens) instead of classes; sample with --prompt."),
    adapters: int = _opt("adapters"),
    lora: int = _opt("lora"),
    batch_size: int = _opt("batch_size"),
    lr: float = _opt("lr"),
    seed: int = typer.Option(_CC.seed, help="Seed of prompts, batches and noise (training is deterministic)."),
    backbone: Path | None = _backbone_option(),
    max_minutes: float | None = typer.Option(None, help="Pause after a checkpoint; run again to resume."),
    threads: int | None = _threads_option(),
    device: str = _device_option(),
    dp_epsilon: float | None = typer.Option(None, help="Train with DP-SGD to this epsilon (sample-level; "
                                                        "--batch-size is then the expected Poisson batch)."),
    dp_delta: float | None = typer.Option(None, help="DP delta (default min(1/N, 1e-5))."),
    dp_clip: float = _opt("dp_clip"),
    dp_augmult: int = _opt("dp_augmult"),
    dp_accountant: Accountant = _opt("dp_accountant"),
    fit_filter: Filter = _opt("fit_filter"),
) -> None:
    """Add a data source: register it and train its compartment (no other compartment changes)."""
    from ..backbone import Backbone
    from ..data import load_source
    from ..operations import add_source, check_add, store_backbone
    from ..store import REGISTRY_NAME, Store, check_source_name

    _threads(threads)
    check_source_name(name)  # before anything is read or written
    cfg = _compartment_config(steps, prompts, unconditional, seed, batch_size, lr, text, adapters, lora)
    dp = _dp_option(dp_epsilon, dp_delta, dp_clip, dp_augmult, dp_accountant)
    source = load_source(spec)
    tag_list = tuple(t for t in tags.split(",") if t)
    if (store / REGISTRY_NAME).is_file():
        st = Store.open(store)
        try:
            bb = store_backbone(st, backbone)
            source = _fit_to(bb, source, fit_filter)
            check_add(bb, source, name=name, cfg=cfg, dp=dp)
        except BaseException:
            st.close()
            raise
    else:
        bb = Backbone.from_pretrained(backbone or DEFAULT_BACKBONE)
        source = _fit_to(bb, source, fit_filter)
        check_add(bb, source, name=name, cfg=cfg, dp=dp)  # nothing is written before this passes
        st = Store.create(store, backbone_hash=bb.hash, backbone_ref=bb.ref)
    with st:
        out = add_source(st, _on(bb, device), source, name=name, cfg=cfg, tags=tag_list, max_minutes=max_minutes,
                         dp=dp)
    rec = out.record
    if not out.finished:
        console.print(f"paused at step {rec.steps_done}/{steps}; run the same command to resume")
        return
    console.print(f"compartment '{name}': {len(source)} samples, {rec.steps_done} steps, "
                  f"{rec.wall_seconds:.1f} s, loss {rec.final_loss:.4f}, "
                  f"weights {out.compartment.weights_sha256[:12]}" + _learned_note(rec))
    if rec.dp:
        d = rec.dp
        console.print(f"DP: epsilon {d['epsilon']:.3f} (target {d['target_epsilon']:g}, {d['accountant']}) at delta "
                      f"{d['delta']:.2g}; noise multiplier {d['noise_multiplier']:.3f}, clip {d['max_grad_norm']:g}, "
                      f"sample rate {d['sample_rate']:.4f}, {d['steps']} steps, augmult {d['augmult']}")


# ----------------------------------------------------------------------------------------------- scale-out
Executor = _choices("Executor", ("ray", "sequential"))
TaskDevice = _choices("TaskDevice", ("auto", "cpu", "cuda"))
ManyHeads = _choices("ManyHeads", ("none", "isolated", "router", "classifier"))


def _named_specs(specs: list[str] | None, specs_file: Path | None) -> list[tuple[str, str]]:
    from ..scale.many import parse_named_spec

    args = list(specs or [])
    if specs_file is not None:
        if not specs_file.is_file():
            raise CdmError(f"--specs-file {specs_file}: no such file")
        args += [ln.strip() for ln in specs_file.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    if not args:
        raise CdmError("give sources as NAME=SPEC arguments (or --specs-file)")
    named = [parse_named_spec(a) for a in args]
    names = [n for n, _ in named]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise CdmError(f"source names given twice: {', '.join(dupes)}")
    return named


@app.command("add-many")
def add_many_cmd(
    specs: list[str] | None = typer.Argument(None, help="Sources as NAME=SPEC (e.g. s0=mnist/protected/strat8-0); "
                                             "every one gets the options below."),
    store: Path = typer.Option(..., help="Compartment store directory (created if missing, with this backbone)."),
    specs_file: Path | None = typer.Option(None, help="A file of NAME=SPEC lines (blank lines and # comments "
                                           "skipped), added to the arguments."),
    executor: Executor = typer.Option("ray", help="ray: compartments as Ray tasks (an embedded Ray on this machine, "
                                      "or --ray-address); sequential: one after another in this process."),
    workers: int | None = typer.Option(None, help="CPUs of the embedded Ray (default: all of this machine's); "
                                       "jobs at once = workers / threads."),
    ray_address: str | None = typer.Option(None, help="An existing Ray cluster (HOST:PORT of its head; see "
                                           "docs/scale.md) instead of an embedded one."),
    threads: int = typer.Option(1, help="torch threads per job (and Ray CPUs per task). Bit-identical results need "
                                "equal thread counts: `cdm add --threads` the same."),
    device: TaskDevice = typer.Option("auto", help="auto: a GPU per task when the cluster (ray) or this machine "
                                      "(sequential) has one; cpu: the bit-exact reference; cuda."),
    gpus_per_task: float | None = typer.Option(None, help="GPUs a task asks for on cuda (default 1; 0.25: four "
                                               "tasks share one)."),
    max_retries: int = typer.Option(3, help="Re-runs of a task whose worker process died (killed, lost node)."),
    skip_existing: bool = typer.Option(False, help="Skip names whose stored compartment has the same content and "
                                       "config (resume an interrupted run); others already stored are refused."),
    heads: ManyHeads = typer.Option("none", help="Also train heads after the compartments: isolated (one per "
                                    "source, as more jobs), router or classifier (joint, by this process)."),
    head_steps: int = typer.Option(500, help="Optimiser steps of each head."),
    core: str | None = typer.Option(None, help="--heads isolated: PUBLIC images the heads contrast each source "
                                    "with (default: the public digits)."),
    tags: str = typer.Option("", help="Comma-separated access tags of every source."),
    steps: int = _opt("steps"),
    prompts: int = _opt("prompts"),
    unconditional: bool = _opt("unconditional"),
    text: bool = typer.Option(False, help="Condition on the sources' captions (see `cdm add --help`)."),
    adapters: int = _opt("adapters"),
    lora: int = _opt("lora"),
    batch_size: int = _opt("batch_size"),
    lr: float = _opt("lr"),
    seed: int = typer.Option(_CC.seed, help="Seed of prompts, batches and noise (the same for every source)."),
    backbone: Path | None = _backbone_option(),
    dp_epsilon: float | None = typer.Option(None, help="Train every compartment with DP-SGD to this epsilon."),
    dp_delta: float | None = typer.Option(None, help="DP delta (default min(1/N, 1e-5) per source)."),
    dp_clip: float = _opt("dp_clip"),
    dp_augmult: int = _opt("dp_augmult"),
    dp_accountant: Accountant = _opt("dp_accountant"),
    fit_filter: Filter = _opt("fit_filter"),
) -> None:
    """Add many sources at once: every check first, then their compartments trained as parallel jobs (Ray tasks)
    while this process stores each result (the store's only writer)."""
    from ..backbone import Backbone
    from ..data import load_source
    from ..operations import check_add, store_backbone
    from ..scale.executor import ExecutorConfig
    from ..scale.many import add_many
    from ..store import REGISTRY_NAME, Store

    named = _named_specs(specs, specs_file)
    cfg = _compartment_config(steps, prompts, unconditional, seed, batch_size, lr, text, adapters, lora)
    dp = _dp_option(dp_epsilon, dp_delta, dp_clip, dp_augmult, dp_accountant)
    ex = ExecutorConfig(executor=_value(executor), workers=workers, address=ray_address, threads=threads,
                        device=_value(device), gpus_per_task=gpus_per_task, max_retries=max_retries)
    head_cfg = None
    if _value(heads) != "none":
        from ..composition import HeadConfig

        head_cfg = HeadConfig(steps=head_steps, seed=seed)
    tag_list = tuple(t for t in tags.split(",") if t)
    exists = (store / REGISTRY_NAME).is_file()
    st = Store.open(store) if exists else None
    try:
        bb = store_backbone(st, backbone) if st is not None else Backbone.from_pretrained(backbone or DEFAULT_BACKBONE)
        sources = []
        for name, spec in named:  # every source loaded, fitted and checked before anything is written
            source = _fit_to(bb, load_source(spec), fit_filter)
            check_add(bb, source, name=name, cfg=cfg, dp=dp)
            sources.append((name, source))
        core_source = _fit_to(bb, load_source(core), fit_filter) if core else None
        if st is None:
            st = Store.create(store, backbone_hash=bb.hash, backbone_ref=bb.ref)
        out = add_many(st, bb, sources, cfg=cfg, ex=ex, dp=dp, tags=tag_list, skip_existing=skip_existing,
                       heads=_value(heads), head_cfg=head_cfg, core=core_source)
    finally:
        if st is not None:
            st.close()
    for run in out.runs:
        retried = {k: v - 1 for k, v in run.attempts.items() if v > 1}
        console.print(f"{run.executor} ({run.device}, {run.parallel} at once): {len(run.done)} job(s) in "
                      f"{run.seconds:.1f} s" + (f"; retried {retried}" if retried else ""))
    for name, rec in out.records.items():
        console.print(f"compartment '{name}': {rec.source['n']} samples, {rec.steps_done} steps, "
                      f"{rec.wall_seconds:.1f} s, loss {rec.final_loss:.4f}, weights "
                      f"{out.stored[name].weights_sha256[:12]}" + _learned_note(rec))
    for cid, c in out.heads.items():
        console.print(f"{c.kind} '{cid}' stored")
    if out.skipped:
        console.print(f"skipped (already stored with the same content and config): {', '.join(out.skipped)}")
    if out.failures:
        raise CdmError(f"{len(out.failures)} job(s) failed (their sources stay incomplete; rerun with "
                       "--skip-existing to finish): " + "; ".join(f"{k}: {v}" for k, v in out.failures.items()))


@app.command("train-compartment")
def train_compartment_cmd(
    spec: str = typer.Argument(..., help="Source: a folder, an .npz, mnist/protected/strat8-0 ... (see cdm.data)."),
    out: Path = typer.Option(..., help="New bundle directory (must not exist or be empty): prompts.safetensors + "
                             "manifest.json, written atomically."),
    backbone: Path | None = typer.Option(None, help="Backbone directory or shipped:NAME: the one of the store the "
                                         "bundle is for (its hash is checked on import). Default: the shipped one."),
    steps: int = _opt("steps"),
    prompts: int = _opt("prompts"),
    unconditional: bool = _opt("unconditional"),
    text: bool = typer.Option(False, help="Condition on the source's captions (see `cdm add --help`)."),
    adapters: int = _opt("adapters"),
    lora: int = _opt("lora"),
    batch_size: int = _opt("batch_size"),
    lr: float = _opt("lr"),
    seed: int = typer.Option(_CC.seed, help="Seed of prompts, batches and noise (training is deterministic)."),
    threads: int | None = _threads_option(),
    dp_epsilon: float | None = typer.Option(None, help="Train with DP-SGD to this epsilon (the bundle carries the "
                                            "accounting)."),
    dp_delta: float | None = typer.Option(None, help="DP delta (default min(1/N, 1e-5))."),
    dp_clip: float = _opt("dp_clip"),
    dp_augmult: int = _opt("dp_augmult"),
    dp_accountant: Accountant = _opt("dp_accountant"),
    fit_filter: Filter = _opt("fit_filter"),
) -> None:
    """Train a compartment where the data lives, with no store: a bundle to send for `cdm import` (the data never
    leaves this machine; the bundle holds the prompts, the sample hashes and the training record)."""
    from ..backbone import Backbone
    from ..data import load_source
    from ..operations.sources import check_trainable, train_source
    from ..scale.bundle import write_bundle

    _threads(threads)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CdmError(f"--out {out}: exists and is not an empty directory; pick a new one")
    cfg = _compartment_config(steps, prompts, unconditional, seed, batch_size, lr, text, adapters, lora)
    dp = _dp_option(dp_epsilon, dp_delta, dp_clip, dp_augmult, dp_accountant)
    bb = Backbone.from_pretrained(backbone or DEFAULT_BACKBONE)
    source = _fit_to(bb, load_source(spec), fit_filter)
    check_trainable(bb, source, cfg=cfg, dp=dp)
    comp, record = train_source(bb, source, cfg, dp)
    manifest = write_bundle(out, bb, source, comp.tensors(), record, command=_command())
    console.print(f"bundle of {spec}: {len(source)} samples, {record.steps_done} steps, {record.wall_seconds:.1f} s, "
                  f"loss {record.final_loss:.4f}, weights {manifest['weights_sha256'][:12]}, backbone "
                  f"{bb.hash[:12]} -> {out}" + _learned_note(record)
                  + (f"; DP epsilon {record.dp['epsilon']:.3f}" if record.dp else ""))


@app.command("import")
def import_cmd(
    bundle: Path = typer.Argument(..., help="A bundle directory from `cdm train-compartment`."),
    store: Path = typer.Option(..., help="Compartment store (created if missing, with --backbone)."),
    name: str = typer.Option(..., help="Name of the source in the store. An imported source of that name is "
                             "re-imported (replaced, e.g. after its owner retrained without some samples)."),
    tags: str = typer.Option("", help="Comma-separated access tags."),
    backbone: Path | None = typer.Option(None, help="Backbone directory or shipped:NAME. Default: the store's; for a "
                                         "new store, the one the bundle names if it is shipped, else the shipped "
                                         "default. Its hash must be the bundle's."),
) -> None:
    """Import a compartment bundle trained elsewhere: its integrity, backbone, config and shapes are checked before
    anything is written; the store records that it does not hold the source's data."""
    from ..backbone import Backbone
    from ..operations import store_backbone
    from ..scale.bundle import import_bundle, read_bundle
    from ..store import REGISTRY_NAME, Store, check_source_name

    check_source_name(name)
    b = read_bundle(bundle)  # integrity first: nothing is opened or created for a bad bundle
    if (store / REGISTRY_NAME).is_file():
        st = Store.open(store)
        try:
            bb = store_backbone(st, backbone)
        except BaseException:
            st.close()
            raise
    else:
        ref = b.manifest.get("backbone_ref")
        bb = Backbone.from_pretrained(backbone or (ref if isinstance(ref, str) and ref.startswith("shipped:")
                                                   else DEFAULT_BACKBONE))
        if bb.hash != b.backbone_hash:
            raise CdmError(f"bundle {bundle} was trained on backbone {b.backbone_hash[:12]}, not {bb.hash[:12]} "
                           f"({bb.ref}): pass --backbone with the bundle's backbone")
        st = None
    try:
        if st is None:
            from ..scale.bundle import check_importable

            check_importable(b, bb)  # shapes and classes too, before the store is created
            st = Store.create(store, backbone_hash=bb.hash, backbone_ref=bb.ref)
        out = import_bundle(st, bb, bundle, name=name, tags=tuple(t for t in tags.split(",") if t))
    finally:
        if st is not None:
            st.close()
    c = out.compartment
    what = "re-imported" if out.reimport else "imported"
    console.print(f"{what} '{name}' ({b.source['n']} samples, spec {b.source.get('spec')}, weights "
                  f"{c.weights_sha256[:12]}); the store does not hold its data"
                  + (f"; {out.n_removed} sample(s) dropped, {out.n_added} added since the previous bundle"
                     if out.reimport else ""))


@app.command()
def paragon(
    store: Path = _store_option(),
    sources: str | None = typer.Option(None, help="Comma-separated source names (default: all)."),
    steps: int | None = typer.Option(None, help="Optimiser steps (default: the compartments' steps added up, the "
                                     "same budget); prompt table, lr and seed are the compartments' own."),
    backbone: Path | None = _backbone_option(),
    threads: int | None = _threads_option(),
    device: str = _device_option(),
) -> None:
    """Train the paragon: one compartment with the same prompt budget on the union of the sources."""
    from ..operations import paragon_config, store_backbone, train_paragon

    _threads(threads)
    with _open_store(store) as st:
        names = [s for s in sources.split(",") if s] if sources else [s["id"] for s in st.sources()]
        bb = _on(store_backbone(st, backbone), device)
        out = train_paragon(st, bb, cfg=paragon_config(st, names, steps) if names else None, sources=names)
    rec = out.record
    console.print(f"paragon on {rec.source['n']} samples: {rec.steps_done} steps, {rec.wall_seconds:.1f} s"
                  + _learned_note(rec))


@app.command()
def forget(
    name: str = typer.Argument(..., help="Source name in the store."),
    store: Path = _store_option(),
    sample: list[str] | None = typer.Option(None, help="Sample id (content hash or >= 12-char prefix); repeat."),
    reason: str = typer.Option("", help="Why (kept in the audit log)."),
    backbone: Path | None = _backbone_option(),
    threads: int | None = _threads_option(),
) -> None:
    """Forget a source (delete everything derived from it) or, with --sample, samples of it (exact retrain)."""
    from ..operations import forget_samples, forget_source, store_backbone

    _threads(threads)
    with _open_store(store) as st:
        if sample:
            out = forget_samples(st, store_backbone(st, backbone), name, list(sample), reason=reason)
            console.print(f"forgot {out.n_removed} sample(s) of '{name}': compartment retrained from scratch in "
                          f"{out.seconds:.1f} s ({out.before[:12]} -> {out.after[:12]})"
                          + (f"; dropped joint compartments {out.dropped} (retrain them)" if out.dropped else ""))
        else:
            out = forget_source(st, name, reason=reason)
            console.print(f"forgot source '{name}' in {out.seconds * 1000:.0f} ms: removed {out.removed}"
                          + (f"; retrain {[r.cid for r in out.retrain]} on the remaining sources" if out.retrain
                             else ""))


@app.command()
def sources(store: Path = _store_option()) -> None:
    """List the store's sources, their compartments and state (incomplete adds, compartments that learnt nothing)."""
    from rich.table import Table

    incomplete = []
    with _open_store(store) as st:
        comps = st.compartments()
        bb = st.backbone
        table = Table(title=f"store {store}" + (f" (backbone {bb['hash'][:12]}"
                                                + (f", {bb['ref']})" if bb["ref"] else ")") if bb else ""))
        for col in ("source", "samples", "tags", "compartments", "state", "added"):
            table.add_column(col)
        for s in st.sources():
            cids = [f"{c['cid']} ({c['kind']})" for c in comps if s["id"] in c["sources"]]
            if not s["complete"]:
                state = "incomplete"
                incomplete.append(s["id"])
            elif any(c["cid"] == s["id"] and c["kind"] == "compartment" for c in comps):
                learned = st.compartment(s["id"])["manifest"].get("learned")
                state = "learnt nothing (= backbone)" if learned is False else "ready"
                if not s.get("data_held", True):
                    state += " (imported: data not held)"
            else:
                state = "no compartment"
            table.add_row(s["id"], str(s["n"]), ",".join(s["tags"]), ", ".join(cids) or "-", state,
                          s["added_at"][:19])
    Console().print(table)
    for name in incomplete:
        console.print(f"'{name}' is incomplete (its add stopped before the compartment was stored): rerun the same "
                      f"`cdm add ... --name {name}` to resume, or `cdm forget {name} --store {store}` to remove it")


@app.command()
def show(name: str = typer.Argument(..., help="Compartment id (a source's name, paragon, router ...)."),
         store: Path = _store_option(),
         hashes: bool = typer.Option(False, help="Also print every sample hash.")) -> None:
    """Show a compartment's manifest (source, hashes, backbone, config, seed, steps, wall time, DP, learned)."""
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
    if m.get("learned") is False:
        console.print(f"'{name}' learnt nothing: validation kept step 0, so it equals the backbone")


@app.command()
def audit(store: Path = _store_option(), limit: int = typer.Option(20, help="How many of the latest records.")) -> None:
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
    store: Path = _store_option(),
    sources: str | None = typer.Option(None, help="Comma-separated sources (default: all with a compartment)."),
    kind: HeadKind = typer.Option("router", help="; ".join(f"{s.heads}: {s.help}" for s in REGISTRY.values()
                                                           if s.heads) + "."),
    steps: int = typer.Option(500, help="Optimiser steps (per head for --kind isolated)."),
    batch_size: int = typer.Option(64, help="Noisy samples per optimiser step."),
    lr: float = typer.Option(3e-3, help="Learning rate."),
    seed: int = typer.Option(0, help="Seed of initialisation, batches and noise."),
    core: str | None = typer.Option(None, help="--kind isolated: source spec of PUBLIC images the heads contrast "
                                    "each source with (default: the public digits; fitted to the backbone)."),
    backbone: Path | None = _backbone_option(),
    threads: int | None = _threads_option(),
    device: str = _device_option(),
) -> None:
    """Train the heads a learned weighting needs (`cdm sample --weighting router|classifier|isolated`)."""
    from ..composition import HeadConfig
    from ..operations import store_backbone, train_heads

    _threads(threads)
    kind = _value(kind)
    cfg = HeadConfig(steps=steps, batch_size=batch_size, lr=lr, seed=seed)
    names = [s for s in sources.split(",") if s] if sources else None
    with _open_store(store) as st:
        from ..data import load_source

        for out in train_heads(st, _on(store_backbone(st, backbone), device), names, kind, cfg=cfg,
                               core=load_source(core) if core else None):
            c, rec = out.compartment, out.record
            chance = f" (chance {rec['chance']:.3f})" if "chance" in rec else " (vs the public core)"
            console.print(f"{c.kind} '{c.cid}' on {', '.join(c.sources)}: {rec['steps']} steps, "
                          f"{rec['wall_seconds']:.1f} s, loss {rec['final_loss']:.4f}, held-out accuracy "
                          f"{rec['accuracy']:.3f}{chance}")


@app.command("import-uvit")
def import_uvit_cmd(
    checkpoint: Path = typer.Argument(..., help="A baofff/U-ViT checkpoint: a .pth state dict (or one nested under "
                                      "nnet_ema, ema, model, state_dict ...; EMA first), or their training-checkpoint "
                                      "directory (its nnet_ema.pth). Read with torch.load(weights_only=True): a file "
                                      "that needs code to unpickle is refused."),
    config: str = typer.Option(..., help="A released config by name (cifar10_uvit_small, celeba64_uvit_small, "
                               "imagenet64_uvit_mid, imagenet64_uvit_large, imagenet256_uvit_large, "
                               "imagenet256_uvit_huge, imagenet512_uvit_large, imagenet512_uvit_huge) or a JSON file "
                               "{\"nnet\": their config.nnet, \"schedule\": NAME, \"null_class\": ..., "
                               "\"image_size\": ..., \"latent\": {...}} (see cdm.backbone.convert)."),
    out: Path = typer.Option(..., help="New backbone directory (must not exist or be empty); written atomically."),
    autoencoder: Path | None = typer.Option(None, help="Latent models (imagenet256_*, imagenet512_*): the folder of "
                                            "their autoencoder as a diffusers AutoencoderKL (config.json + "
                                            "diffusion_pytorch_model.safetensors), e.g. Stable Diffusion's VAE."),
) -> None:
    """Import a baofff/U-ViT checkpoint as a cdm backbone: model.safetensors, config.json with the schedule it was
    trained with (and, for a latent model, its autoencoder's folder and hash), training.json with the checkpoint's
    sha256."""
    from ..backbone.convert import import_uvit

    r = import_uvit(checkpoint, config, out, command=_command(), autoencoder=autoencoder)
    c = r.model
    kind = ("unconditional" if c.num_classes <= 0 else f"{c.num_classes} classes"
            + (f", null class {c.null_class}" if c.null_class is not None else ", no null class (use --guidance 1)"))
    console.print(f"imported {r.config_name} ({c.in_chans}x{c.img_size}x{c.img_size}, {kind}, schedule "
                  f"{r.schedule.name}){f' from entry {r.entry!r}' if r.entry else ''}, sha256 {r.sha256[:12]} -> {out}"
                  + (f" (latent, autoencoder {r.codec['autoencoder']})" if r.latent else "")
                  + f"; try `cdm sample --backbone {out}" + (" --n 10`" if c.num_classes <= 0 else "`"))


@app.command("import-uvit-t2i")
def import_uvit_t2i_cmd(
    checkpoint: Path = typer.Argument(..., help="Their MS-COCO text-to-image .pth (or training directory); read with "
                                      "torch.load(weights_only=True)."),
    config: str = typer.Option(..., help="mscoco_uvit_small, mscoco_uvit_small_deep, or a JSON file {\"nnet\": "
                               "{\"name\": \"uvit_t2i\", ...}, \"schedule\": NAME, \"context\": {...}}."),
    out: Path = typer.Option(..., help="New directory (must not exist or be empty); written atomically."),
) -> None:
    """Import baofff/U-ViT's text-to-image (uvit_t2i) checkpoint: strict names, safetensors + config.json. It
    conditions on CLIP token embeddings (not shipped here), so it is kept as a network, not a cdm backbone."""
    from ..backbone.convert import import_uvit_t2i

    r = import_uvit_t2i(checkpoint, config, out, command=_command())
    c = r.model
    console.print(f"imported {r.config_name} (depth {c.depth}, {c.num_clip_token} context tokens of {c.clip_dim}, "
                  f"schedule {r.schedule.name}){f' from entry {r.entry!r}' if r.entry else ''}, sha256 "
                  f"{r.sha256[:12]} -> {out}; load it with cdm.backbone.load_uvit_t2i")


# ----------------------------------------------------------------------------------------------- the service
keys_app = typer.Typer(no_args_is_help=True, help="API keys of the service (hashed in the store's registry).")
app.add_typer(keys_app, name="keys")


@app.command()
def serve(
    store: Path = _store_option("Compartment store to serve (`cdm demo` builds out/demo/store)."),
    host: str = typer.Option("127.0.0.1", help="Interface to listen on."),
    port: int = typer.Option(8000, help="TCP port."),
    backbone: Path | None = _backbone_option(),
    threads: int = typer.Option(1, help="torch CPU threads per worker thread."),
    workers: int = typer.Option(1, help="Generate requests computed at once."),
    queue: int = typer.Option(16, help="Generate requests waiting beyond those (503 when full)."),
    per_key_queue: int = typer.Option(4, help="Generate requests one key may have running or waiting (503 beyond: "
                                      "no key fills the queue)."),
    max_n: int = typer.Option(16, help="Images per request."),
    max_steps: int = typer.Option(100, help="Sampler steps per request."),
    max_body_kb: int = typer.Option(64, help="JSON body limit (KiB)."),
    max_upload_mb: int = typer.Option(32, help="Uploaded .npz limit (MiB)."),
    train_steps: int = typer.Option(300, help="Default training steps of a source added over HTTP."),
    log_level: str = typer.Option("info", help="uvicorn log level (debug, info, warning, error)."),
) -> None:
    """Serve generation by access rights over HTTP (API + web page at /, OpenAPI at /docs)."""
    try:
        import uvicorn

        from ..server import Limits, create_app, list_keys
    except ImportError as e:
        raise CdmError(f"the service needs fastapi, uvicorn and python-multipart: pip install -e . ({e})") from None
    from ..operations import store_backbone

    if not (store / "registry.sqlite").is_file():
        raise CdmError(f"{store}: no compartment store (`cdm demo` builds out/demo/store; `cdm add` makes one)")
    limits = Limits(max_n=max_n, max_steps=max_steps, max_body_bytes=max_body_kb * 1024,
                    max_upload_bytes=max_upload_mb * 1024 * 1024, workers=workers, queue=queue,
                    per_key_queue=per_key_queue, threads=threads,
                    default_train_steps=train_steps, max_train_steps=max(train_steps, Limits.max_train_steps))
    _threads(threads)
    with _open_store(store) as st:
        bb = store_backbone(st, backbone)
        live = [k for k in list_keys(st) if k.revoked_at is None]
    asgi = create_app(store, backbone=bb, limits=limits)
    if not live:
        console.print(f"no API key yet: make one with `cdm keys create admin --admin --store {store}`")
    console.print(f"serving {store} on http://{host}:{port}/ ({len(live)} live key(s); API docs at /docs)")
    uvicorn.run(asgi, host=host, port=port, log_level=log_level)


@keys_app.command("create")
def keys_create(
    name: str = typer.Argument(..., help="Key name (the actor in the audit log)."),
    store: Path = _store_option(),
    sources: str = typer.Option("", help="Comma-separated sources this key may use."),
    tags: str = typer.Option("", help="Comma-separated access-tag patterns: every source so tagged, now or later "
                             "(e.g. 'license:CC-BY-*')."),
    admin: bool = typer.Option(False, help="An admin key: every source, and the admin endpoints."),
) -> None:
    """Create an API key; prints the token once (only its sha256 is stored)."""
    from ..server.keys import create_key

    with _open_store(store) as st:
        token, key = create_key(st, name, sources=[s for s in sources.split(",") if s],
                                tags=[t for t in tags.split(",") if t], admin=admin)
    rights = "(admin)" if key.admin else "for " + (", ".join(key.sources) or "no source") + \
        (f" (tags {', '.join(key.tags)})" if key.tags else "")
    console.print(f"key '{key.name}' {rights}: keep the token, it is not stored")
    print(token)


@keys_app.command("list")
def keys_list(store: Path = _store_option()) -> None:
    """List API keys (names, rights, prefixes; never the tokens)."""
    from rich.table import Table

    from ..server.keys import list_keys

    table = Table(title=f"API keys of {store}")
    for col in ("name", "admin", "sources", "tags", "prefix", "created", "revoked"):
        table.add_column(col)
    with _open_store(store) as st:
        keys = list_keys(st)
    for k in keys:
        table.add_row(k.name, "yes" if k.admin else "", ",".join(k.sources), ",".join(k.tags), k.prefix + "...",
                      k.created_at[:19],
                      (k.revoked_at or "")[:19])
    Console().print(table)


@keys_app.command("revoke")
def keys_revoke(name: str = typer.Argument(..., help="Key name."), store: Path = _store_option()) -> None:
    """Revoke an API key (it never authenticates again; its row stays for the audit trail)."""
    from ..server.keys import revoke_key

    with _open_store(store) as st:
        key = revoke_key(st, name)
    console.print(f"key '{key.name}' revoked at {key.revoked_at}")


@app.command()
def attribute(
    store: Path = _store_option(),
    sources: str = typer.Option(..., help="Comma-separated sources to compose and attribute to."),
    out: Path = typer.Option(Path("out/attribution"), help="Directory: samples.npz/png and credits.json."),
    n: int = typer.Option(16, help="Unconditional samples to generate and attribute."),
    steps: int = typer.Option(25, help="Probability-flow ODE (DDIM, eta 0) steps."),
    probes: int = typer.Option(2, help="Hutchinson probes per step (>= 2 gives a standard error)."),
    exact: bool = typer.Option(False, help="Exact divergence (one backward pass per dimension; slow)."),
    weighting: AttributionWeighting = typer.Option("ode", help="ode: the posterior tracked along the path; or "
                                                   "learned heads from the store."),
    priors: str | None = typer.Option(None, help="Comma-separated lambda_i (default: source sizes)."),
    density: Density = typer.Option("auto", help="Each source's density: class-mixture (its classes weighted by its "
                                "own class counts) | prompt-row (its unconditional prompts) | auto (the class "
                                "mixture where it applies)."),
    seed: int = typer.Option(0, help="Seed of the samples' initial noise and of the probes."),
    prompt: list[str] = typer.Option([], help="Text compartments: a caption (repeatable); --n samples of each, "
                                     "attributed with the caption-conditioned densities."),
    backbone: Path | None = _backbone_option(),
    threads: int | None = _threads_option(),
    device: str = _device_option(),
) -> None:
    """Credit attribution: generate from a composition and say which sources made each sample (likelihood
    decomposition C_i along the probability-flow ODE, and the time-integrated weights W_i)."""
    import numpy as np

    from ..io import atomic_write_json
    from ..operations import attribute_samples, store_backbone
    from ..viz import write_samples

    _threads(threads)
    weighting, density = _value(weighting), _value(density)
    names = [s for s in sources.split(",") if s]
    try:
        lam = [float(v) for v in priors.split(",")] if priors else None
    except ValueError:
        raise CdmError(f"--priors: expected comma-separated numbers, got {priors!r}") from None
    with _open_store(store) as st:
        captions = [c for c in prompt for _ in range(n)] or None
        bb = _on(store_backbone(st, backbone), device)
        r = attribute_samples(st, bb, names, n=n, seed=seed, steps=steps, probes=probes, exact=exact, priors=lam,
                              weighting=weighting, density=density, captions=captions)
    n = len(r.images)
    write_samples(out, "samples", r.images, None, nrow=min(n, 10))
    per = [{"sample": i, "credit": dict(zip(names, map(float, r.credit[i]), strict=True)),
            "credit_se": dict(zip(names, map(float, r.credit_se[i]), strict=True)),
            "weight_path": dict(zip(names, map(float, r.weight_path[i]), strict=True)),
            "loglik_change_nats": float(r.loglik_change[i]),
            **({} if captions is None else {"caption": captions[i]})} for i in range(n)]
    summary = {"sources": names, "priors": r.priors, "density": r.density, "weighting": weighting, "steps": steps,
               "probes": r.probes, "exact": exact, "seed": seed, "command": _command(),
               "mean_credit": dict(zip(names, map(float, r.credit.mean(0)), strict=True)),
               "mean_weight_path": dict(zip(names, map(float, r.weight_path.mean(0)), strict=True)),
               "samples": per}
    atomic_write_json(out / "credits.json", summary)
    top = np.clip(r.credit, 0, None).argmax(1)
    console.print(f"{n} samples ({r.density}) -> {out / 'samples.png'}; credits -> {out / 'credits.json'}; "
                  "top-credit source: "
                  + ", ".join(f"{nm} {int((top == k).sum())}" for k, nm in enumerate(names))
                  + "; mean credit " + ", ".join(f"{k}={v:.2f}" for k, v in summary["mean_credit"].items())
                  + "; mean weight path " + ", ".join(f"{k}={v:.2f}" for k, v in summary["mean_weight_path"].items()))


def _is_usage_error(e: BaseException) -> bool:
    """click's UsageError (typer vendors its own click, so match the interface: exit code 2, a message)."""
    return getattr(e, "exit_code", None) == 2 and callable(getattr(e, "format_message", None))


def main() -> None:
    try:
        code = app(standalone_mode=False)
    except (CdmError, ValueError) as e:  # bad input: one line, no traceback
        console.print(f"[red]error:[/red] {e}")
        raise SystemExit(2) from None
    except Exception as e:
        if not _is_usage_error(e):
            raise
        # a typo in a command, an option or a choice: one line, before any work starts
        message = e.format_message().replace("Value error, ", "")
        if message:  # (empty after the help that a bare `cdm` prints)
            ctx = getattr(e, "ctx", None)
            where = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
            console.print(f"[red]error:[/red] {message}{where}")
        raise SystemExit(2) from None
    raise SystemExit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
