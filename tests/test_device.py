"""The device path: with the backbone on a device (``backbone.to("cuda")``) compartment training, head training,
sampling (solvers, composed denoisers, weightings) and attribution all run there, the device taken from
``backbone.device``; the CPU stays the bit-exact reference.

Three kinds of test:

- CPU: option handling, and that the whole flow below is deterministic on the CPU (the reference for exact
  forgetting; the CPU path is bit-identical to what it was before the device path existed, checked once when it
  was written by running this flow on both versions).
- a *fake device* (no GPU needed, runs everywhere): tensors "on" it report the device ``meta`` but hold real CPU
  data, and any operation that mixes them with (non-scalar) CPU tensors fails, as CUDA does, as does ``.numpy()``
  on them. The flow runs with the backbone on it: every tensor cdm creates must follow the backbone, and the
  results must equal the CPU's (the arithmetic is the CPU's, so they agree to float rounding).
- CUDA (skipped without a GPU): the same flow on a real GPU, checked against the CPU within tolerances.
"""

import copy
import dataclasses
import hashlib

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils._python_dispatch import TorchDispatchMode
from typer.testing import CliRunner

from cdm.backbone import Backbone, UViT, UViTConfig
from cdm.cli.main import app
from cdm.compartments import Compartment, CompartmentConfig
from cdm.composition import (ClassifierWeighting, ClassMixtureBank, CompartmentBank, ComposedDenoiser, ItoWeighting,
                             NaiveWeighting, RouterWeighting, SingleWeighting, train_isolated_head,
                             train_noisy_classifier, train_router)
from cdm.composition.heads import state_tensors
from cdm.data import public_protected, split_stratified
from cdm.generation import sample_backbone
from cdm.training.compartment import train_compartment
from cdm.training.loss import eps_loss, held_out_loss

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _inputs(backbone, b=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 1, 14, 14, generator=g)
    t = torch.randint(0, 1000, (b,), generator=g)
    y = torch.randint(0, backbone.config.num_classes, (b,), generator=g)
    return x, t, y


# ----------------------------------------------------------------------------------------------- a fake device

FAKE = torch.device("meta")
_aten = torch.ops.aten
_CROSS = {_aten.copy_.default, _aten._to_copy.default, _aten._copy_from.default, _aten._local_scalar_dense.default,
          _aten.is_same_size.default}  # the ops CUDA lets cross devices
_INDEX = {_aten.index.Tensor, _aten.index_put_.default, _aten.index_put.default, _aten._index_put_impl_.default}


class OnFake(torch.Tensor):
    """A tensor on the fake device: reports ``meta``, holds a CPU tensor ``elem`` with the data."""

    elem: torch.Tensor
    __slots__ = ["elem"]

    @staticmethod
    def __new__(cls, elem, requires_grad=False):
        r = torch.Tensor._make_wrapper_subclass(cls, elem.size(), strides=elem.stride(),
                                                storage_offset=elem.storage_offset(), dtype=elem.dtype,
                                                layout=elem.layout, device=FAKE, requires_grad=requires_grad)
        r.elem = elem
        return r

    def __repr__(self, **_):
        return f"OnFake({self.elem!r})"

    def tolist(self):  # CUDA tensors have it (a copy to the host)
        return self.elem.tolist()

    @property
    def is_meta(self):  # for Python code that special-cases meta tensors (load_state_dict skips copying into them)
        return False

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _dispatch(func, args, kwargs or {})


def _dispatch(func, args, kwargs):
    flat, _ = tree_flatten((args, kwargs))
    if any(type(a) is torch.Tensor and a.device == FAKE for a in flat):
        raise AssertionError(f"fake device: {func} got a real meta tensor (a constructor the fake does not cover)")
    on = [a for a in flat if isinstance(a, OnFake)]
    off = [a for a in flat if isinstance(a, torch.Tensor) and not isinstance(a, OnFake) and a.dim() > 0]
    device = kwargs.get("device")
    if on and off and func not in _CROSS:
        if func in _INDEX and isinstance(args[0], OnFake):  # CUDA takes CPU indices into a device tensor
            off = [a for a in off if a is args[0] or (len(args) > 2 and a is args[2])]
        if off:
            raise RuntimeError(f"fake device: {func} mixes tensors on the device with CPU tensors of shapes "
                               f"{[tuple(a.shape) for a in off]}")
    unwrap = lambda e: e.elem if isinstance(e, OnFake) else e  # noqa: E731
    kw = tree_map(unwrap, kwargs)
    to_fake = device is not None and torch.device(device) == FAKE
    if to_fake:
        kw["device"] = torch.device("cpu")
    out = func(*tree_map(unwrap, args), **kw)
    if func is _aten.copy_.default or (func._schema.is_mutable and isinstance(args[0], OnFake)
                                       and out is args[0].elem):
        return args[0]  # in place: the same wrapper
    if func is _aten._local_scalar_dense.default or not (to_fake if device is not None else on):
        return out
    return tree_map(lambda e: OnFake(e) if isinstance(e, torch.Tensor) and not isinstance(e, OnFake) else e, out)


class _Dispatch(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return _dispatch(func, args, kwargs or {})


class _FromData(TorchFunctionMode):
    """``torch.tensor(data, device=meta)`` and its kin skip the dispatcher (meta tensors get no data): build them on
    the CPU and move them."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.tensor, torch.as_tensor, torch.Tensor.new_tensor):
            target = kwargs.get("device", args[0].device if func is torch.Tensor.new_tensor else None)
            if target is not None and torch.device(target) == FAKE:
                if func is torch.Tensor.new_tensor:
                    args, kwargs = args[1:], {"dtype": args[0].dtype, **kwargs}
                    func = torch.tensor
                kwargs = {k: v for k, v in kwargs.items() if k != "device"}
                return func(*args, **kwargs).to(FAKE)
        return func(*args, **kwargs)


class FakeDevice:
    """Inside it, ``.to("meta")`` and factories with ``device="meta"`` make tensors on the fake device."""

    def __enter__(self):
        self.modes = (_FromData(), _Dispatch())
        for m in self.modes:
            m.__enter__()
        return FAKE

    def __exit__(self, *exc):
        for m in reversed(self.modes):
            m.__exit__(*exc)


def on_fake(tiny: Backbone) -> Backbone:
    """A copy of ``tiny`` on the fake device (call inside ``FakeDevice``) whose U-ViT refuses inputs from elsewhere:
    cdm's own loops must hand it tensors on its device (``UViT.forward`` would move CPU ones, silently slow)."""
    bb = copy.deepcopy(tiny).to(FAKE)
    forward = bb.net.forward

    def strict(*args, **kwargs):
        flat, _ = tree_flatten((args, kwargs))
        assert all(a.device == FAKE for a in flat if torch.is_tensor(a)), "a CPU tensor reached the U-ViT"
        return forward(*args, **kwargs)

    bb.net.forward = strict
    return bb


def test_the_fake_device_behaves_like_an_accelerator():
    with FakeDevice():
        a = torch.randn(3, 4)
        b = a.to(FAKE)
        assert isinstance(b, OnFake) and b.device == FAKE and torch.equal(b.cpu(), a)
        with pytest.raises(RuntimeError, match="mixes"):
            b + a
        assert (b + torch.tensor(1.0)).device == FAKE  # a CPU scalar is fine, as on CUDA
        with pytest.raises(RuntimeError):
            b.numpy()
        lin = torch.nn.Linear(4, 2).to(FAKE)
        lin(b).pow(2).mean().backward()
        assert lin.weight.grad.device == FAKE and torch.zeros(2, device=FAKE).device == FAKE
        z = torch.zeros(3, device=FAKE)
        z[torch.tensor([0, 2])] = 5.0
        assert z.tolist() == [5.0, 0.0, 5.0]
        assert torch.as_tensor(3.0, device=FAKE).item() == 3.0 and z.new_tensor([1, 2]).tolist() == [1, 2]
        lin.load_state_dict({k: torch.ones_like(v.cpu()) for k, v in lin.state_dict().items()})
        assert lin.weight.cpu().eq(1).all()


# ----------------------------------------------------------------------------------------------- the flow

CFG = CompartmentConfig(steps=6, batch_size=8, n_prompts=2, checkpoint_every=3, warmup=2, validate_every=2, lr=0.1)
HEADS = dict(steps=4, batch_size=8, eval_size=8)


@pytest.fixture(scope="module")
def tiny():
    """A tiny class-conditional U-ViT (random weights, seed 0): 14x14 inputs, patch 7, dim 16, three blocks."""
    torch.manual_seed(0)
    return Backbone(UViT(UViTConfig(img_size=14, patch_size=7, embed_dim=16, depth=3, num_heads=2))).freeze()


@pytest.fixture(scope="module")
def sources():
    _, protected = public_protected()
    return [s.subset(np.arange(40), id=f"part{i}") for i, s in enumerate(split_stratified(protected, 8)[:2])]


def flow(bb: Backbone, sources, tmp_path=None, text: bool = False) -> dict:
    """Train two compartments (and an unconditional one with adapters, optionally one paused and resumed), sample
    from one and from their composition (ito, naive, single, router, classifier; several solvers), train the heads,
    and attribute; every result on the CPU, by name. Device-agnostic: the device is the backbone's."""
    dev, out = bb.device, {}
    comps = []
    for i, s in enumerate(sources):
        comp, rec = train_compartment(bb, s, CFG, progress=False)
        assert comp.device == dev
        out[f"comp{i}"] = comp.tensors()["prompts"]
        out[f"curve{i}"] = torch.tensor([v for _, v in rec.validation["curve"]])
        comps.append(comp.eval().requires_grad_(False))
    plain = dataclasses.replace(CFG, conditional=False, adapter_rank=2, validation=0.0)
    if tmp_path is not None:  # paused after its first checkpoint, then resumed: the resumed optimiser on dev
        first, _ = train_compartment(bb, sources[0], plain, progress=False, work_dir=tmp_path, max_minutes=0.0)
        assert first is None
    comp, _ = train_compartment(bb, sources[0], plain, progress=False, work_dir=tmp_path)
    out["adapters"] = torch.cat([v.flatten() for v in comp.tensors().values()])
    x, t, y = _inputs(bb)
    out["held_out"] = torch.tensor(held_out_loss(comp.denoiser(bb), x.to(dev), bb.schedule, draws=2))

    # sampling: one compartment, and the composition under every weighting that needs no heads
    kw = dict(per_class=1, classes=[1, 7], steps=5)
    out["one_ddim"] = torch.from_numpy(sample_backbone(bb, eps=comps[0].denoiser(bb), **kw)[0])
    out["one_dpm"] = torch.from_numpy(sample_backbone(bb, eps=comps[0].denoiser(bb), solver="dpmpp2m", **kw)[0])
    bank = CompartmentBank(bb, comps)
    counts = np.stack([np.bincount(s.labels, minlength=10) for s in sources])
    for name, weighting in (("ito", ItoWeighting(bb.schedule)), ("naive", NaiveWeighting()),
                            ("single", SingleWeighting(torch.Generator().manual_seed(3)))):
        composed = ComposedDenoiser(bank, weighting, priors=[1.0, 2.0], class_priors=counts)
        traj = []
        images, _ = sample_backbone(bb, eps=composed, solver="ddpm", guidance=2.0, trajectories=traj, **kw)
        out[f"{name}_images"], out[f"{name}_weights"] = torch.from_numpy(images), traj[0]
    composed = ComposedDenoiser(bank, ItoWeighting(bb.schedule), threshold=0.2)
    composed(x.to(dev), t.to(dev))  # first call: the weights are the priors
    eps = composed(x.to(dev), (t.clamp(min=7) - 7).to(dev))
    assert eps.device == dev
    out["ito_eps"], out["ito_evals"] = eps.cpu(), torch.tensor(composed.evals)

    # heads: the router, an isolated head, a noisy classifier; and sampling through them
    heads, rec = train_router(bb, comps, sources, **HEADS)
    assert next(heads.parameters()).device == dev
    out["router"] = torch.cat([v.flatten() for v in state_tensors(heads).values()])
    out["router_acc"] = torch.tensor(rec["accuracy"])
    head, rec = train_isolated_head(bb, comps[1], sources[1], sources[0], **HEADS)
    out["isolated"] = torch.cat([v.flatten() for v in state_tensors(head).values()])
    extra = {} if dev.type == "cpu" else {"device": dev}
    model, rec = train_noisy_classifier(bb.schedule, bb.codec, sources, **HEADS, **extra)
    out["classifier"] = torch.cat([v.flatten() for v in state_tensors(model).values()])
    for name, weighting in (("router", RouterWeighting(heads)), ("classifier", ClassifierWeighting(model))):
        traj = []
        images, _ = sample_backbone(bb, eps=ComposedDenoiser(bank, weighting), trajectories=traj, **kw)
        out[f"{name}_images"], out[f"{name}_weights"] = torch.from_numpy(images), traj[0]

    # attribution: along the ODE by the class mixture, with a learned weighting, and with exact divergences
    from cdm.attribution import attribute

    noise = torch.randn(3, 1, 14, 14, generator=torch.Generator().manual_seed(5))
    mixture = ClassMixtureBank(bank, counts)
    runs = {"ode": dict(bank=mixture, priors=mixture.priors()),
            "router": dict(bank=bank, weighting=RouterWeighting(heads)),
            "exact": dict(bank=bank, exact=True, steps=2)}
    for name, kw in runs.items():
        res = attribute(kw.pop("bank"), noise, schedule=bb.schedule, **{"steps": 4, "probes": 2, **kw})
        for key in ("x0", "credit", "L", "weight_path", "weights"):
            out[f"attr_{name}_{key}"] = torch.from_numpy(np.asarray(res[key]))
    return out


def store_flow(bb: Backbone, sources, root) -> dict:
    """The same through a store (what the CLI and the service call): add two sources (one with DP-SGD), generate from
    one and from both (ito, router, classifier), attribute, forget a sample. No device argument anywhere."""
    from cdm.operations import (add_source, add_source_dp, attribute_samples, forget_samples, generate_from_store,
                                load_compartment, train_router_op)
    from cdm.privacy import DPConfig
    from cdm.store import Store

    st, out, names = Store.create(root), {}, [s.id for s in sources]
    add_source(st, bb, sources[0], name=names[0], cfg=CFG, progress=False)
    add_source_dp(st, bb, sources[1], name=names[1], cfg=dataclasses.replace(CFG, steps=3, validation=0.0),
                  dp=DPConfig(epsilon=50.0), progress=False)
    for n in names:
        out[f"stored_{n}"] = load_compartment(st, bb, n).tensors()["prompts"]
    kw = dict(labels=[1, 7], steps=4)
    out["one"] = torch.from_numpy(generate_from_store(st, bb, names[:1], **kw).images)
    g = generate_from_store(st, bb, names, guidance=2.0, **kw)
    out["ito"], out["ito_w"], out["ito_evals"] = torch.from_numpy(g.images), torch.from_numpy(g.weights), \
        torch.tensor(g.evals)
    for kind in ("router", "classifier"):
        train_router_op(st, bb, names, kind=kind, progress=False, **HEADS)
        g = generate_from_store(st, bb, names, weighting=kind, **kw)
        out[kind], out[f"{kind}_w"] = torch.from_numpy(g.images), torch.from_numpy(g.weights)
    for w in ("ode", "router"):
        a = attribute_samples(st, bb, names, n=2, steps=3, weighting=w)
        out[f"attr_{w}_credit"], out[f"attr_{w}_x0"] = torch.from_numpy(a.credit), torch.from_numpy(a.x0)
    forget_samples(st, bb, names[0], [sources[0].sample_hashes[3]], progress=False)
    out["forgot"] = load_compartment(st, bb, names[0]).tensors()["prompts"]
    return out


def text_flow(bb: Backbone, sources, root) -> dict:
    """Text compartments (caption maps, adapters) through a store: train, generate from captions (one compartment
    with guidance, the ito composition), train the router on captions and sample with it, attribute captioned
    samples."""
    from cdm.operations import add_source, attribute_samples, generate_from_store, load_compartment, train_router_op
    from cdm.store import Store
    from cdm.text import MINILM

    cfg = CompartmentConfig(text_encoder=MINILM, steps=4, batch_size=8, n_prompts=2, text_tokens=2, adapter_rank=2,
                            checkpoint_every=2, warmup=1, validation=0.0)
    st, out, names = Store.create(root), {}, [s.id for s in sources]
    for s in sources:
        add_source(st, bb, s, name=s.id, cfg=cfg, progress=False)
        out[f"stored_{s.id}"] = torch.cat([v.flatten() for v in load_compartment(st, bb, s.id).tensors().values()])
    captions = ["a handwritten seven", "a handwritten one"]
    out["one"] = torch.from_numpy(generate_from_store(st, bb, names[:1], captions=captions, steps=3,
                                                      guidance=2.0).images)
    g = generate_from_store(st, bb, names, captions=captions, steps=3)
    out["ito"], out["ito_w"] = torch.from_numpy(g.images), torch.from_numpy(g.weights)
    train_router_op(st, bb, names, progress=False, **HEADS)
    g = generate_from_store(st, bb, names, captions=captions, steps=3, weighting="router")
    out["router"], out["router_w"] = torch.from_numpy(g.images), torch.from_numpy(g.weights)
    a = attribute_samples(st, bb, names, captions=captions, steps=3)
    out["attr_credit"], out["attr_x0"] = torch.from_numpy(a.credit), torch.from_numpy(a.x0)
    return out


def _digest(out: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(out):
        h.update(k.encode() + out[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _close(got: dict, want: dict, atol: float, rtol: float, exact: tuple[str, ...] = ()) -> None:
    assert set(got) == set(want)
    for k in sorted(want):
        assert got[k].device.type == "cpu", k
        if k in exact or got[k].dtype == torch.uint8:  # images: a grey level of rounding at most
            diff = (got[k].double() - want[k].double()).abs().max().item()
            assert diff <= (0 if k in exact else 1), (k, diff)
            continue
        torch.testing.assert_close(got[k].double(), want[k].double(), atol=atol, rtol=rtol, msg=k)


@pytest.fixture(scope="module")
def reference(tiny, sources, tmp_path_factory):
    """The flow on the CPU, run twice: bit-identical (the CPU is the reference)."""
    out = flow(tiny, sources, tmp_path_factory.mktemp("cpu"))
    again = flow(tiny, sources)
    assert _digest(out) == _digest(again)
    return out


def test_cpu_flow_is_deterministic(reference):
    assert reference["comp0"].shape[0] == 11 and torch.isfinite(reference["attr_ode_credit"]).all()


def test_flow_follows_the_backbone_onto_a_device(tiny, sources, reference, tmp_path):
    """Everything the flow creates lives on the backbone's (fake) device: a CPU tensor mixed in would fail. The
    arithmetic is the CPU's, so results agree with the CPU's to float rounding (some kernels differ: Adam's
    single-tensor update on a tensor subclass, autograd's accumulation order)."""
    with FakeDevice():
        bb = on_fake(tiny)
        assert bb.device == FAKE and bb.hash == tiny.hash
        got = flow(bb, sources, tmp_path)
    _close(got, reference, atol=1e-4, rtol=1e-3, exact=("ito_evals",))


def test_store_operations_follow_the_backbone_onto_a_device(tiny, sources, tmp_path):
    cpu = store_flow(tiny, sources, tmp_path / "cpu")
    assert _digest(cpu) == _digest(store_flow(tiny, sources, tmp_path / "again"))  # the CPU reference
    with FakeDevice():
        got = store_flow(on_fake(tiny), sources, tmp_path / "dev")
    _close(got, cpu, atol=1e-4, rtol=1e-3, exact=("ito_evals",))


def test_text_compartments_follow_the_backbone_onto_a_device(tiny, sources, tmp_path):
    cpu = text_flow(tiny, sources, tmp_path / "cpu")
    assert _digest(cpu) == _digest(text_flow(tiny, sources, tmp_path / "again"))
    with FakeDevice():
        got = text_flow(on_fake(tiny), sources, tmp_path / "dev")
    _close(got, cpu, atol=1e-4, rtol=1e-3)


def test_a_cpu_compartment_still_trains_through_a_device_backbone(tiny):
    """A caller's CPU tensors and CPU compartment keep working with the backbone elsewhere (moved differentiably)."""
    bb = copy.deepcopy(tiny)
    grads = []
    with FakeDevice():
        bb.to(FAKE)
        for b in (tiny, bb):
            comp = Compartment.for_backbone(b, CompartmentConfig(n_prompts=2))
            comp.init_prompts(torch.Generator().manual_seed(0))
            x, t, y = _inputs(b)
            noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
            eps_loss(comp.denoiser(b), x, t, noise, b.schedule, y=y).backward()
            grads.append(comp.prompts.table.weight.grad)
        frozen = comp.eval().requires_grad_(False)
        out = frozen.denoiser(bb)(x.to(FAKE), t.to(FAKE), y.to(FAKE))  # read through a copy on the device
        assert out.device == FAKE and frozen.device.type == "cpu"
    assert not isinstance(grads[1], OnFake) and torch.allclose(grads[1], grads[0], atol=1e-6)


# ----------------------------------------------------------------------------------------------- options, CUDA


def test_to_cpu_keeps_hash_and_outputs(backbone):
    x, t, y = _inputs(backbone)
    before, h = backbone.eps(x, t, y=y), backbone.hash
    assert backbone.to("cpu") is backbone and backbone.device == torch.device("cpu")
    assert backbone.hash == h and torch.equal(backbone.eps(x, t, y=y), before)


def test_bench_refuses_an_unknown_or_absent_device(tmp_path):
    run = CliRunner().invoke
    res = run(app, ["bench", "--profile", "toy", "--out", str(tmp_path / "b"), "--device", "tpu-ish"])
    assert res.exit_code != 0 and "unknown device" in res.output
    if not torch.cuda.is_available():
        res = run(app, ["bench", "--profile", "toy", "--out", str(tmp_path / "b"), "--device", "cuda"])
        assert res.exit_code != 0 and "no CUDA device" in res.output
    assert not (tmp_path / "b").exists()  # refused before anything was written


class _NoTF32:
    """cuDNN convolutions (the patch embedding) run in TF32 by default: off inside, for float32 comparisons."""

    def __enter__(self):
        self.before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.before


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm().clamp(min=1e-12)).item()


@pytest.fixture(scope="module")
def on_cuda(tiny, sources, tmp_path_factory):
    """The flow with the backbone on the GPU, run twice."""
    bb = copy.deepcopy(tiny).to("cuda")
    with _NoTF32():
        return flow(bb, sources, tmp_path_factory.mktemp("cuda")), flow(bb, sources)


@cuda
def test_flow_on_cuda_matches_the_cpu(on_cuda, reference):
    """The whole flow with the backbone on the GPU (nothing crosses to the CPU: the flow asserts where compartments
    and heads live, and the fake-device tests cover every tensor): finite and close to the CPU's. Training amplifies
    float differences step by step, so trained tensors are compared by relative norm; the same inputs through the
    same weights (``ito_eps``, one composed step) entry by entry."""
    got = on_cuda[0]
    assert all(torch.isfinite(v.double()).all() for v in got.values())
    assert int(got["ito_evals"]) == int(reference["ito_evals"])
    for k in ("comp0", "comp1", "adapters", "router", "isolated", "classifier", "attr_exact_L"):
        assert _relative(got[k], reference[k]) < 5e-2, k
    for k in ("ito_images", "naive_images", "one_ddim", "one_dpm", "router_images"):  # grey levels, 5 steps
        assert (got[k].double() - reference[k].double()).abs().mean() < 8, k


@cuda
def test_flow_on_cuda_is_deterministic(on_cuda):
    """Per-device determinism where cdm asks for it: training (deterministic kernels on) and sampling."""
    got, again = on_cuda
    for k in ("comp0", "comp1", "adapters", "router", "isolated", "classifier", "one_ddim", "ito_images",
              "ito_weights", "router_images"):
        assert torch.equal(got[k], again[k]), k


@cuda
def test_composed_eps_on_cuda_matches_the_cpu(tiny, reference):
    """Same compartments, same inputs: one composed Ito step on the GPU equals the CPU's within 1e-4."""
    comps = []
    for i in (0, 1):
        c = Compartment.for_backbone(tiny, CFG)
        c.load_tensors({"prompts": reference[f"comp{i}"]})
        comps.append(c.eval().requires_grad_(False))
    gpu = copy.deepcopy(tiny).to("cuda")
    x, t, y = _inputs(tiny)
    outs = []
    with _NoTF32():
        for bb, dev in ((tiny, "cpu"), (gpu, "cuda")):
            composed = ComposedDenoiser(CompartmentBank(bb, comps), ItoWeighting(bb.schedule))
            composed(x.to(dev), t.to(dev), y=y.to(dev))
            outs.append(composed(x.to(dev), (t.clamp(min=7) - 7).to(dev), y=y.to(dev)))
    assert outs[1].device.type == "cuda"
    torch.testing.assert_close(outs[1].cpu(), outs[0], atol=1e-4, rtol=1e-3)


@cuda
def test_net_on_cuda_takes_and_returns_cpu_tensors(backbone):
    x, t, y = _inputs(backbone)
    ref_eps, ref_mid = backbone.eps(x, t, y=y, return_mid=True)
    gpu = copy.deepcopy(backbone).to("cuda")
    assert gpu.device.type == "cuda" and gpu.hash == backbone.hash
    eps, mid = gpu.eps(x, t, y=y, return_mid=True)
    assert eps.device.type == "cpu" and mid.device.type == "cpu"
    torch.testing.assert_close(eps, ref_eps, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(mid, ref_mid, atol=1e-4, rtol=1e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the caller's autocast is honoured on the device
        assert gpu.eps(x, t, y=y).dtype == torch.bfloat16


@cuda
def test_prompt_gradients_reach_cpu_parameters(backbone):
    gpu = copy.deepcopy(backbone).to("cuda")
    grads = []
    for bb in (backbone, gpu):
        comp = Compartment.for_backbone(bb, CompartmentConfig(n_prompts=2))
        comp.init_prompts(torch.Generator().manual_seed(0))
        x, t, y = _inputs(bb)
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))  # the same noise for both
        eps_loss(comp.denoiser(bb), x, t, noise, bb.schedule, y=y).backward()
        grads.append(comp.prompts.table.weight.grad)
    assert grads[1].device.type == "cpu" and grads[1].abs().sum() > 0
    # cuDNN convolutions (patch embedding) run in TF32 by default: compare the whole gradient, not each entry
    assert ((grads[1] - grads[0]).norm() / grads[0].norm()).item() < 1e-2
