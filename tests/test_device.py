"""The transformer on an accelerator, everything around it on the CPU (``Backbone.to``, ``UViT.forward``).

The CUDA tests run where a GPU is present (they are skipped in CI, which has none); the CPU ones check the
option handling and that moving to the CPU changes nothing."""

import pytest
import torch
from typer.testing import CliRunner

from cdm.cli.main import app
from cdm.compartments import Compartment, CompartmentConfig
from cdm.training.loss import eps_loss

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _inputs(backbone, b=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 1, 14, 14, generator=g)
    t = torch.randint(0, 1000, (b,), generator=g)
    y = torch.randint(0, backbone.config.num_classes, (b,), generator=g)
    return x, t, y


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


@cuda
def test_net_on_cuda_takes_and_returns_cpu_tensors(backbone):
    import copy

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
    import copy

    gpu = copy.deepcopy(backbone).to("cuda")
    grads = []
    for bb in (backbone, gpu):
        comp = Compartment.for_backbone(bb, CompartmentConfig(n_prompts=2))
        comp.init_prompts(torch.Generator().manual_seed(0))
        x, t, y = _inputs(bb)
        eps_loss(comp.denoiser(bb), x, t, torch.randn_like(x), bb.schedule, y=y).backward()
        grads.append(comp.prompts.table.weight.grad)
    assert grads[1].device.type == "cpu" and grads[1].abs().sum() > 0
    # cuDNN convolutions (patch embedding) run in TF32 by default: compare the whole gradient, not each entry
    assert ((grads[1] - grads[0]).norm() / grads[0].norm()).item() < 1e-2
