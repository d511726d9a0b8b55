"""PyTorch references of the fused ops: the fallback when csrc/fused_ops is not built, and what its tests
compare against. Plain eager code, so `torch.compile` can fuse it on its own."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's tanh approximation of GELU (HuggingFace's `gelu_new`)."""
    return F.gelu(x, approximate="tanh")


def bias_gelu_reference(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """gelu_new(x + bias), x (..., n), bias (n,), in x's dtype."""
    return gelu_new(x + bias.to(x.dtype))


def rotary_angles(position_ids: torch.Tensor, rotary_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, each (B, T, rotary_dim / 2) fp32, for positions (B, T).

    Computed per forward rather than cached: B*T*rotary_dim/2 multiplies are nothing next to attention, and a
    model built on the meta device or moved between devices has no buffer to rebuild.
    """
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, device=position_ids.device, dtype=torch.float32) / rotary_dim))
    angles = position_ids.float().unsqueeze(-1) * inv_freq  # (B, T, rd/2)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first rotary_dim dims of x (B, nh, T, hs) by NeoX rotate-half; pass the rest through.

    cos, sin: (B, T, rotary_dim / 2) fp32 from `rotary_angles`. Arithmetic in fp32; the result has x's dtype.
    """
    half = cos.shape[-1]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, rd/2): broadcast over heads
    x1 = x[..., :half].float()
    x2 = x[..., half : 2 * half].float()
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
    return torch.cat((rotated, x[..., 2 * half :]), dim=-1)


def rotary_qkv_reference(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v (each (B, nh, T, hs)) from the fused projection's output qkv (B, T, nh, 3, hs), with q and k
    rotated by `apply_rotary`."""
    q, k, v = (qkv[:, :, :, i].transpose(1, 2) for i in range(3))
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v
