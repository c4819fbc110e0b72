"""U-ViT (Bao et al., 2022, "All are Worth Words"), with deep prompts.

Parameter names and shapes equal those of the reference implementation (github baofff/U-ViT,
``libs/uvit.py``), so a published checkpoint, converted once to safetensors, loads with ``strict=True`` and
gives the same outputs (same token order ``[label, time, patches]``, same ``(p1 p2 C)`` pixel order within a
patch). Written here rather than imported because the reference ships no package, and because cdm adds one
thing to it: *deep prompts* (Jia et al., 2022; the CDM paper's compartments), learnable tokens prepended to
the sequence before every block and dropped after it.

Prompts: a tensor ``(B or 1, n_blocks, P, D)`` with ``n_blocks = depth // 2 + 1 + depth // 2`` (in-blocks, mid
block, out-blocks in order). Block ``k`` sees ``cat(prompts[:, k], tokens)``; its prompt outputs are thrown
away, so prompts steer the image tokens through attention only. In out-blocks the prompt is prepended after
``skip_linear`` (prompts have no skip partner). ``prompts=None`` is the plain U-ViT.

Gated prompts (``prompt_gate``, ``(B or 1, n_blocks, H)``): instead of joining the softmax, the image tokens
attend to the prompts in a separate softmax whose output is added, scaled per head by the gate (the zero-init
gated attention of LLaMA-Adapter, Zhang et al., 2023). With the gate at zero the network is exactly the plain
U-ViT, so a compartment starts from the backbone instead of from a random perturbation of it; the prompt
tokens skip the MLP (their outputs are thrown away in both forms).

Parallel adapters (``adapters = (down, up)``, ``(B or 1, n_blocks, D, r)`` and ``(B or 1, n_blocks, r, D)``):
block ``k`` adds ``gelu(h @ down[k]) @ up[k]`` beside its MLP (``h`` the MLP's normalised input), in the same
block order as prompts; with ``up`` at zero the network is exactly the plain U-ViT.

LoRA (``lora = {"qkv": (a, b), "proj": ..., "fc1": ..., "fc2": ...}``, optionally with ``"index"``): low-rank
updates ``W x + b(a(x))`` of every block's attention ``qkv`` / ``proj`` and MLP ``fc1`` / ``fc2`` linears (Hu et
al., 2021), ``a`` ``(G, n_blocks, in, r)`` and ``b`` ``(G, n_blocks, r, out)`` (:func:`lora_shapes`). Without
``"index"`` G is B or 1 (one factor set per row, or one for all); with ``"index"`` (B,) row ``i`` uses factor set
``index[i]``, gathered one block at a time (a bank of compartments passes its G stacked sets once instead of a
copy per row). With ``b`` at zero the network is exactly the plain U-ViT.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..io import config_from_dict

__all__ = ["LORA_TARGETS", "Geometry", "UViT", "UViTConfig", "build_trunk", "check_prompts", "lora_shapes", "patchify",
           "reference_init", "run_blocks", "timestep_embedding", "unpatchify"]


class Geometry:
    """What every U-ViT config shares (fields img_size, patch_size, embed_dim, num_heads, depth): the block and
    patch counts, and the checks of those fields."""

    def _check_geometry(self) -> None:
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not a multiple of num_heads {self.num_heads}")

    @property
    def n_blocks(self) -> int:
        return 2 * (self.depth // 2) + 1

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2


@dataclass(frozen=True)
class UViTConfig(Geometry):
    img_size: int = 14  # side of the (square) model-space image
    patch_size: int = 2  # side of a patch; img_size must be a multiple
    in_chans: int = 1  # image channels
    embed_dim: int = 128  # token width D
    depth: int = 7  # blocks in all: depth // 2 in, 1 mid, depth // 2 out
    num_heads: int = 4  # attention heads (embed_dim must be a multiple)
    mlp_ratio: float = 4.0  # MLP hidden width / D
    qkv_bias: bool = False  # the reference default: no bias on qkv
    mlp_time_embed: bool = True  # time token = MLP(sinusoid) instead of the bare sinusoid
    num_classes: int = 11  # rows of label_emb (reference semantics: -1 = unconditional, no label token)
    null_class: int | None = 10  # the label row used as "no condition" for classifier-free guidance (None when
    #                              unconditional: num_classes <= 0 implies it, whatever is passed)
    conv: bool = True  # 3x3 final_layer conv after unpatchify
    skip: bool = True  # long skip connections (skip_linear) in the out-blocks

    def __post_init__(self) -> None:
        if self.num_classes <= 0 and self.null_class is not None:  # an unconditional U-ViT has no label rows
            object.__setattr__(self, "null_class", None)
        self._check_geometry()
        if self.null_class is not None and not 0 <= self.null_class < self.num_classes:
            raise ValueError(f"null_class {self.null_class} outside 0..{self.num_classes - 1}")

    @property
    def extras(self) -> int:
        """Tokens before the patches: label (if class-conditional) and time."""
        return 2 if self.num_classes > 0 else 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> UViTConfig:
        return config_from_dict(cls, d, "U-ViT")


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[cos, sin]`` of (possibly fractional) timesteps, as in the reference."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, (H/p)(W/p), p*p*C), pixel order (p1 p2 C) within a patch."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Inverse of :func:`patchify`."""
    b, n, pd = x.shape
    p = int(round((pd // channels) ** 0.5))
    h = int(round(n**0.5))
    if h * h != n or p * p * channels != pd:
        raise ValueError(f"cannot unpatchify tokens of shape {tuple(x.shape)} with {channels} channels")
    x = x.reshape(b, h, h, p, p, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, channels, h * p, h * p)


def _plus_lora(y: torch.Tensor, x: torch.Tensor, ab: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """``y`` (a linear's output on ``x`` (B, N, in)) plus its low-rank update ``(x @ a) @ b``, ``a`` (B or 1, in, r),
    ``b`` (B or 1, r, out); ``ab`` None: ``y`` itself."""
    if ab is None:
        return y
    a, b = ab
    return y + torch.matmul(torch.matmul(x, a.to(x.dtype)), b.to(x.dtype)).to(y.dtype)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def _heads(self, x: torch.Tensor, lora: dict | None = None) -> torch.Tensor:
        b, n, d = x.shape
        qkv = _plus_lora(self.qkv(x), x, None if lora is None else lora["qkv"])
        return qkv.reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                gate: torch.Tensor | None = None, lora: dict | None = None) -> torch.Tensor:
        """Self-attention over ``x``. With ``context`` (B, P, D) and ``gate`` (B, H): plus a separate attention
        from ``x`` to the context tokens, scaled per head by ``gate`` (zero gate: exactly plain attention).
        ``lora``: this block's ``{"qkv": (a, b), "proj": (a, b), ...}`` low-rank updates (see the module)."""
        b, n, d = x.shape
        q, k, v = self._heads(x, lora)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, Dh); scale Dh^-1/2 as reference
        if context is not None:
            _, kc, vc = self._heads(context, lora)
            out = out + gate[:, :, None, None].to(out.dtype) * F.scaled_dot_product_attention(q, kc, vc)
        out = out.transpose(1, 2).reshape(b, n, d)
        return _plus_lora(self.proj(out), out, None if lora is None else lora["proj"])


class Mlp(nn.Module):
    """timm's Mlp layout (fc1, GELU, fc2), so that parameter names match."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, lora: dict | None = None) -> torch.Tensor:
        if lora is None:
            return self.fc2(self.act(self.fc1(x)))
        h = self.act(_plus_lora(self.fc1(x), x, lora["fc1"]))
        return _plus_lora(self.fc2(h), h, lora["fc2"])


class Block(nn.Module):
    """Pre-LN transformer block; out-blocks first fuse the long skip with ``skip_linear(cat(x, skip))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, skip: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None, prompt: torch.Tensor | None = None,
                gate: torch.Tensor | None = None, adapter: tuple[torch.Tensor, torch.Tensor] | None = None,
                lora: dict | None = None) -> torch.Tensor:
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        if prompt is not None and gate is not None:  # gated prompts: image tokens read them through a gated branch
            context = self.norm1(prompt.to(x.dtype).expand(x.shape[0], -1, -1))
            x = x + self.attn(self.norm1(x), context, gate.expand(x.shape[0], -1), lora=lora)
            return x + self._ffn(x, adapter, lora)
        if prompt is not None:
            x = torch.cat([prompt.to(x.dtype).expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.attn(self.norm1(x), lora=lora)
        x = x + self._ffn(x, adapter, lora)
        if prompt is not None:
            x = x[:, prompt.shape[1]:]
        return x

    def _ffn(self, x: torch.Tensor, adapter: tuple[torch.Tensor, torch.Tensor] | None,
             lora: dict | None = None) -> torch.Tensor:
        h = self.norm2(x)
        if adapter is None:
            return self.mlp(h, lora)
        down, up = (a.to(h.dtype) for a in adapter)
        return self.mlp(h, lora) + torch.matmul(F.gelu(torch.matmul(h, down)), up)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def _sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """2-D sin-cos position table (grid*grid, dim): half the channels encode rows, half columns."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    coords = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    out = []
    for pos in (rows.reshape(-1), cols.reshape(-1)):
        args = pos[:, None] * omega[None]
        out += [torch.sin(args), torch.cos(args)]
    table = torch.cat(out, dim=1)
    return F.pad(table, (0, dim - table.shape[1])).float()


def build_trunk(net: nn.Module, c: Geometry) -> None:
    """The blocks, final norm, decoder and final conv of a U-ViT (the reference's names, in its order)."""
    d = c.embed_dim
    blk = dict(dim=d, num_heads=c.num_heads, mlp_ratio=c.mlp_ratio, qkv_bias=c.qkv_bias)
    net.in_blocks = nn.ModuleList([Block(**blk) for _ in range(c.depth // 2)])
    net.mid_block = Block(**blk)
    net.out_blocks = nn.ModuleList([Block(**blk, skip=c.skip) for _ in range(c.depth // 2)])
    net.norm = nn.LayerNorm(d)
    net.decoder_pred = nn.Linear(d, c.patch_size**2 * c.in_chans)
    net.final_layer = nn.Conv2d(c.in_chans, c.in_chans, 3, padding=1) if c.conv else nn.Identity()


def reference_init(net: nn.Module) -> None:
    """The reference's initialisation: truncated-normal linear weights (std 0.02), zero biases, unit norms."""
    for m in net.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


LORA_TARGETS = ("qkv", "proj", "fc1", "fc2")  # the linears of every block that LoRA updates


def lora_shapes(c: Geometry) -> dict[str, tuple[int, int]]:
    """``{target: (in, out)}`` of a block's LoRA targets: attention ``qkv`` (D -> 3D) and ``proj`` (D -> D), MLP
    ``fc1`` (D -> hidden) and ``fc2`` (hidden -> D)."""
    d, hidden = c.embed_dim, int(c.embed_dim * c.mlp_ratio)
    return {"qkv": (d, 3 * d), "proj": (d, d), "fc1": (d, hidden), "fc2": (hidden, d)}


def _check_lora(c: Geometry, b: int, lora: dict) -> None:
    want = lora_shapes(c)
    problem = None
    if not isinstance(lora, dict) or set(lora) - {"index"} != set(LORA_TARGETS):
        problem = f"keys {sorted(lora) if isinstance(lora, dict) else type(lora).__name__}"
    else:
        groups = set()
        for name, (n_in, n_out) in want.items():
            ab = lora[name]
            if not isinstance(ab, (tuple, list)) or len(ab) != 2:
                problem = f"{name} is not an (a, b) pair"
                break
            a, f = ab
            if (a.ndim != 4 or f.ndim != 4 or a.shape[1:3] != (c.n_blocks, n_in)
                    or f.shape[1:] != (c.n_blocks, a.shape[3], n_out) or f.shape[0] != a.shape[0]):
                problem = f"{name} factors are {tuple(a.shape)} and {tuple(f.shape)}"
                break
            groups.add(a.shape[0])
        index = lora.get("index")
        if problem is None and len(groups) != 1:
            problem = f"factor sets differ in number ({sorted(groups)})"
        elif problem is None and index is None and groups.pop() not in (1, b):
            problem = f"{a.shape[0]} factor sets for {b} rows and no index"
        elif problem is None and index is not None and (index.ndim != 1 or index.shape[0] != b
                                                        or index.dtype not in (torch.int64, torch.int32)):
            problem = f"index must be ({b},) integers, got {tuple(index.shape)} {index.dtype}"
    if problem is not None:
        raise ValueError(f"lora must map {', '.join(LORA_TARGETS)} to factors a (G, {c.n_blocks}, in, r) and b (G, "
                         f"{c.n_blocks}, r, out), (in, out) = {want}, G = B or 1, or any G with an 'index' (B,) of "
                         f"each row's factor set; {problem}")


def check_prompts(c: Geometry, b: int, prompts: torch.Tensor | None, prompt_gate: torch.Tensor | None,
                  adapters: tuple[torch.Tensor, torch.Tensor] | None = None, lora: dict | None = None) -> None:
    """Shape checks of the per-block inputs (deep prompts, gates, adapters, LoRA) for a batch of ``b``."""
    if prompts is not None and (prompts.ndim != 4 or prompts.shape[1] != c.n_blocks
                                or prompts.shape[3] != c.embed_dim or prompts.shape[0] not in (1, b)):
        raise ValueError(f"prompts must be (B or 1, {c.n_blocks}, P, {c.embed_dim}), got {tuple(prompts.shape)}")
    if prompt_gate is not None and (prompts is None or prompt_gate.shape[1:] != (c.n_blocks, c.num_heads)
                                    or prompt_gate.shape[0] not in (1, b)):
        raise ValueError(f"prompt_gate must be (B or 1, {c.n_blocks}, {c.num_heads}) and come with prompts")
    if adapters is not None:
        down, up = adapters
        if (down.ndim != 4 or down.shape[1:3] != (c.n_blocks, c.embed_dim) or up.ndim != 4
                or up.shape[1:] != (c.n_blocks, down.shape[3], c.embed_dim) or down.shape[0] not in (1, b)
                or up.shape[0] != down.shape[0]):
            raise ValueError(f"adapters must be (B or 1, {c.n_blocks}, {c.embed_dim}, r) and "
                             f"(B or 1, {c.n_blocks}, r, {c.embed_dim})")
    if lora is not None:
        _check_lora(c, b, lora)


def run_blocks(net: nn.Module, h: torch.Tensor, prompts: torch.Tensor | None = None,
               prompt_gate: torch.Tensor | None = None, adapters: tuple[torch.Tensor, torch.Tensor] | None = None,
               lora: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The U-shaped pass over ``net``'s in-, mid- and out-blocks (long skips), block ``k`` getting its prompts,
    gates, adapters and LoRA factors (gathered per row here, one block at a time, when ``lora`` has an index);
    returns ``(tokens after the last block, tokens after the mid block)``."""
    def per_block(i: int) -> dict:
        out = {} if adapters is None else {"adapter": (adapters[0][:, i], adapters[1][:, i])}
        if prompts is not None:
            out.update(prompt=prompts[:, i], gate=None if prompt_gate is None else prompt_gate[:, i])
        if lora is not None:
            index = lora.get("index")
            out["lora"] = {name: tuple(f[:, i] if index is None else f[index, i] for f in lora[name])
                           for name in LORA_TARGETS}
        return out

    half, skips = len(net.in_blocks), []
    for i, blk in enumerate(net.in_blocks):
        h = blk(h, **per_block(i))
        skips.append(h)
    h = mid = net.mid_block(h, **per_block(half))
    for i, blk in enumerate(net.out_blocks):
        h = blk(h, skips.pop(), **per_block(half + 1 + i))
    return h, mid


class UViT(nn.Module):
    """The U-ViT noise-prediction network: ``forward(x, timesteps, y=None, prompts=None) -> eps``.

    ``timesteps`` are the discrete training timesteps (0..T-1, as U-ViT's latent models take them) and may be
    fractional. ``y`` holds class labels; pass ``config.null_class`` for the unconditional branch.
    """

    def __init__(self, config: UViTConfig | None = None, **overrides):
        super().__init__()
        c = config or UViTConfig()
        if overrides:
            c = UViTConfig.from_dict({**c.to_dict(), **overrides})
        self.config = c
        d = c.embed_dim
        self.patch_embed = PatchEmbed(c.patch_size, c.in_chans, d)
        self.time_embed = (
            nn.Sequential(nn.Linear(d, 4 * d), nn.SiLU(), nn.Linear(4 * d, d)) if c.mlp_time_embed else nn.Identity()
        )
        if c.num_classes > 0:
            self.label_emb = nn.Embedding(c.num_classes, d)
        self.pos_embed = nn.Parameter(torch.zeros(1, c.extras + c.num_patches, d))
        build_trunk(self, c)
        self._init_weights()

    def _init_weights(self) -> None:
        reference_init(self)
        with torch.no_grad():
            c = self.config
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
            # Patches start from a 2-D sin-cos table (measured here to train much faster than random init).
            self.pos_embed[0, c.extras:] = _sincos_2d(c.embed_dim, c.img_size // c.patch_size)

    @property
    def n_blocks(self) -> int:
        return self.config.n_blocks

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        y: torch.Tensor | None = None,
        prompts: torch.Tensor | None = None,
        return_mid: bool = False,
        prompt_gate: torch.Tensor | None = None,
        adapters: tuple[torch.Tensor, torch.Tensor] | None = None,
        lora: dict | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Predict eps. With ``return_mid`` also return the tokens after the mid block (B, extras + patches, D),
        prompts dropped: what the CDM router heads read. ``adapters`` / ``lora``: see the module.

        Inputs on another device than the weights are moved to the weights' device, and the outputs are returned
        on the input's device (differentiably), under the caller's autocast dtype. cdm's own loops run on the
        weights' device (``Backbone.device``), so nothing crosses there; this keeps a caller's CPU tensors (or a
        CPU compartment trained through an accelerator's backbone) working."""
        home, dev = x.device, self.pos_embed.device
        if home == dev:
            return self._forward(x, timesteps, y, prompts, return_mid, prompt_gate, adapters, lora)
        move = lambda v: None if v is None else v.to(dev)  # noqa: E731
        amp = (torch.autocast(dev.type, dtype=torch.get_autocast_dtype(home.type))
               if torch.is_autocast_enabled(home.type) else contextlib.nullcontext())
        with amp:
            out = self._forward(move(x), move(timesteps), move(y), move(prompts), return_mid, move(prompt_gate),
                                None if adapters is None else tuple(move(a) for a in adapters),
                                None if lora is None else {k: move(v) if torch.is_tensor(v) else tuple(map(move, v))
                                                           for k, v in lora.items()})
        return tuple(o.to(home) for o in out) if return_mid else out.to(home)

    def _forward(self, x, timesteps, y, prompts, return_mid, prompt_gate, adapters=None, lora=None):
        c = self.config
        if x.ndim != 4 or x.shape[1:] != (c.in_chans, c.img_size, c.img_size):
            raise ValueError(f"expected input (B, {c.in_chans}, {c.img_size}, {c.img_size}), got {tuple(x.shape)}")
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        check_prompts(c, x.shape[0], prompts, prompt_gate, adapters, lora)
        if c.num_classes > 0 and y is None:
            if c.null_class is None:
                raise ValueError("this U-ViT is class-conditional and has no null class: pass y")
            y = torch.full((x.shape[0],), c.null_class, dtype=torch.long, device=x.device)
        if c.num_classes <= 0 and y is not None:
            raise ValueError("this U-ViT is unconditional: it takes no y")
        h = self.patch_embed(x)
        time_token = self.time_embed(timestep_embedding(timesteps, c.embed_dim).to(h.dtype))
        h = torch.cat([time_token.unsqueeze(1), h], dim=1)
        if y is not None:
            h = torch.cat([self.label_emb(y.expand(x.shape[0])).unsqueeze(1), h], dim=1)
        h, mid = run_blocks(self, h + self.pos_embed, prompts, prompt_gate, adapters, lora)
        h = self.decoder_pred(self.norm(h))[:, c.extras:]
        eps = self.final_layer(unpatchify(h, c.in_chans))
        return (eps, mid) if return_mid else eps
