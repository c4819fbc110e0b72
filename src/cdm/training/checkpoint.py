"""Resumable training state in ONE safetensors file (atomic rename), so a kill at any moment leaves the
previous checkpoint or the new one. Holds the model, its EMA, AdamW moments and a JSON header. Tensors are written
from the CPU (whatever device trained them) and loaded back beside the parameters they belong to."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..errors import WeightsError
from ..io import load_state_dict, save_state_dict

__all__ = ["load_checkpoint", "save_checkpoint"]


def save_checkpoint(path: Path, net: nn.Module, ema: nn.Module | None, opt: torch.optim.Optimizer,
                    header: dict) -> None:
    names = {id(p): n for n, p in net.named_parameters()}
    tensors = {f"net.{k}": v for k, v in net.state_dict().items()}
    if ema is not None:
        tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    for group in opt.param_groups:
        for p in group["params"]:
            for k, v in opt.state.get(p, {}).items():
                tensors[f"opt.{k}.{names[id(p)]}"] = torch.as_tensor(v).reshape(-1) if k == "step" else v
    save_state_dict(path, tensors, metadata={"header": json.dumps(header, sort_keys=True)})


def load_checkpoint(path: Path, net: nn.Module, ema: nn.Module | None, opt: torch.optim.Optimizer) -> dict:
    from safetensors import safe_open

    tensors = load_state_dict(path)
    with safe_open(str(path), "pt") as f:
        header = json.loads((f.metadata() or {}).get("header", "{}"))
    try:
        net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")}, strict=True)
        if ema is not None:
            ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}, strict=True)
    except RuntimeError as e:
        raise WeightsError(f"{path}: checkpoint does not fit the configured model ({str(e).splitlines()[0]})") from None
    params = dict(net.named_parameters())
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, field, name = key.split(".", 2)
            if name not in params:
                raise WeightsError(f"{path}: optimizer state for unknown parameter {name!r}")
            p = params[name]
            opt.state[p][field] = v.reshape(()) if field == "step" else v.to(p.device)  # moments beside their parameter
    return header
