"""An independent functional U-ViT following baofff/U-ViT's code step by step (explicit softmax attention,
explicit (p1 p2 C) patch order), shared by the class-conditional and text-to-image tests: equal weights must
give equal outputs."""

import math

import torch
import torch.nn.functional as F


def ref_time(sd: dict, t: torch.Tensor, d: int, mlp: bool) -> torch.Tensor:
    """The time token: the sinusoid of t, through the time MLP when the model has one."""
    half = d // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    temb = torch.cat([torch.cos(args), torch.sin(args)], -1)
    if mlp:
        temb = F.linear(F.silu(F.linear(temb, sd["time_embed.0.weight"], sd["time_embed.0.bias"])),
                        sd["time_embed.2.weight"], sd["time_embed.2.bias"])
    return temb


def ref_patches(sd: dict, x: torch.Tensor, p: int) -> torch.Tensor:
    return F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=p).flatten(2).transpose(1, 2)


def ref_trunk(sd: dict, h: torch.Tensor, depth: int, d: int, heads: int) -> torch.Tensor:
    """In-, mid- and out-blocks with long skips, then the final norm and decoder_pred (all tokens)."""
    B = h.shape[0]

    def blk(prefix, h, skip=None):
        if skip is not None:
            h = F.linear(torch.cat([h, skip], -1), sd[f"{prefix}.skip_linear.weight"], sd[f"{prefix}.skip_linear.bias"])
        a = F.layer_norm(h, (d,), sd[f"{prefix}.norm1.weight"], sd[f"{prefix}.norm1.bias"])
        qkv = F.linear(a, sd[f"{prefix}.attn.qkv.weight"], sd.get(f"{prefix}.attn.qkv.bias"))
        qkv = qkv.reshape(B, -1, 3, heads, d // heads)  # 'B L (K H D)'
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        att = ((q @ k.transpose(-2, -1)) * (d // heads) ** -0.5).softmax(-1)
        a = (att @ v).transpose(1, 2).reshape(B, -1, d)
        h = h + F.linear(a, sd[f"{prefix}.attn.proj.weight"], sd[f"{prefix}.attn.proj.bias"])
        m = F.layer_norm(h, (d,), sd[f"{prefix}.norm2.weight"], sd[f"{prefix}.norm2.bias"])
        m = F.linear(F.gelu(F.linear(m, sd[f"{prefix}.mlp.fc1.weight"], sd[f"{prefix}.mlp.fc1.bias"])),
                     sd[f"{prefix}.mlp.fc2.weight"], sd[f"{prefix}.mlp.fc2.bias"])
        return h + m

    skips = []
    for i in range(depth // 2):
        h = blk(f"in_blocks.{i}", h)
        skips.append(h)
    h = blk("mid_block", h)
    for i in range(depth // 2):
        h = blk(f"out_blocks.{i}", h, skips.pop() if f"out_blocks.{i}.skip_linear.weight" in sd else None)
    h = F.layer_norm(h, (d,), sd["norm.weight"], sd["norm.bias"])
    return F.linear(h, sd["decoder_pred.weight"], sd["decoder_pred.bias"])


def ref_image(sd: dict, h: torch.Tensor, img_size: int, p: int, C: int) -> torch.Tensor:
    """Patch tokens (B, N, p*p*C) -> the image, pixel by pixel in (p1 p2 C) order, then the 3x3 conv if any."""
    B, g = h.shape[0], img_size // p
    img = torch.zeros(B, C, img_size, img_size)
    for r in range(g):
        for col in range(g):
            patch = h[:, r * g + col]
            for p1 in range(p):
                for p2 in range(p):
                    for ch in range(C):
                        img[:, ch, r * p + p1, col * p + p2] = patch[:, (p1 * p + p2) * C + ch]
    if "final_layer.weight" in sd:
        img = F.conv2d(img, sd["final_layer.weight"], sd["final_layer.bias"], padding=1)
    return img
