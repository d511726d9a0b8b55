"""Autograd functions over the csrc/fused_ops kernels, and the two entry points the model calls.

`bias_gelu` and `rotary_qkv` run the kernels when `phi1.ops.prepare` (or `build`) has loaded them for the tensor's device,
and the PyTorch references otherwise, or while `torch.compile` traces (it fuses the references itself).
"""

from __future__ import annotations

import torch

from phi1.ops.loader import loaded
from phi1.ops.reference import bias_gelu_reference, gelu_new, rotary_qkv_reference


def _kernels(t: torch.Tensor):
    if torch.compiler.is_compiling():
        return None
    return loaded(t.device)


class _BiasGelu(torch.autograd.Function):
    """gelu_new(x + bias). Saves x and bias (what a plain gelu would save: its input, one activation)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        kernels = loaded(x.device)
        x, bias = x.contiguous(), bias.contiguous()
        ctx.save_for_backward(x, bias)
        ctx.kernels = kernels
        return kernels.bias_gelu_forward(x, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, bias = ctx.saved_tensors
        # The kernel sums the bias gradient over every token in fp32 as it writes grad_x.
        grad_x, grad_bias = ctx.kernels.bias_gelu_backward(grad.contiguous(), x, bias)
        return grad_x, grad_bias.to(bias.dtype)


class _RotaryQKV(torch.autograd.Function):
    """(B, T, nh, 3, hs) -> (3, B, nh, T, hs) with q and k rotated; the backward rotates back (the rotation is
    orthogonal, so it is the same kernel with the angle negated)."""

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int) -> torch.Tensor:
        kernels = loaded(qkv.device)
        cos, sin = cos.float().contiguous(), sin.float().contiguous()
        ctx.save_for_backward(cos, sin)
        ctx.kernels, ctx.rotary_dim = kernels, rotary_dim
        return kernels.rotary_qkv_forward(qkv.contiguous(), cos, sin, rotary_dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return ctx.kernels.rotary_qkv_backward(grad.contiguous(), cos, sin, ctx.rotary_dim), None, None, None


def bias_gelu(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """gelu_new(x + bias) for x (..., n) and bias (n,) or None, in x's dtype (bias is cast, as F.linear does
    under autocast)."""
    if bias is None:
        return gelu_new(x)
    if _kernels(x) is None:
        return bias_gelu_reference(x, bias)
    # The cast is outside the Function so autograd returns the bias gradient in the parameter's dtype.
    return _BiasGelu.apply(x, bias.to(x.dtype))


def rotary_qkv(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v, each (B, nh, T, hs), from the fused projection's output qkv (B, T, nh, 3, hs), the first
    rotary_dim = 2 * cos.shape[-1] dims of q and k rotated. cos, sin: (B, T, rotary_dim / 2) fp32."""
    if _kernels(qkv) is None:
        return rotary_qkv_reference(qkv, cos, sin)
    q, k, v = _RotaryQKV.apply(qkv, cos, sin, 2 * cos.shape[-1]).unbind(0)
    return q, k, v
