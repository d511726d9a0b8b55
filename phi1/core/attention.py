"""Causal self-attention kernels: flash-attn, torch SDPA, and an explicit math path that is the reference.

The choice is one small function (`select_backend`) so the model stays one class. All three take
q, k, v as (B, nh, T, hs) and return (B, nh, Tq, hs). `keep` is an optional bool mask (B, 1, Tq, Tk),
True where a query may attend; without it the attention is causal with the queries aligned to the last keys
(which is what a KV cache needs).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

logger = logging.getLogger("phi1.attention")

try:  # flash-attn is optional: not installable on CPU machines
    from flash_attn import flash_attn_func as _flash_attn_func
except Exception:  # ImportError, or a CUDA/ABI mismatch raised at import
    _flash_attn_func = None


def flash_attn_available() -> bool:
    return _flash_attn_func is not None


def select_backend(requested: str, device: torch.device, dtype: torch.dtype) -> tuple[str, str]:
    """Resolve 'auto' (or check a forced choice) for tensors on `device` of `dtype`.

    Returns (backend, reason). Raises ValueError when a forced backend cannot run here.
    """
    flash_ok = flash_attn_available() and device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
    if requested == "flash":
        if not flash_ok:
            why = "flash-attn is not installed" if not flash_attn_available() else f"needs CUDA fp16/bf16, got {device.type} {dtype}"
            raise ValueError(f"ModelConfig.attention_backend='flash' cannot run: {why}; use 'auto' or 'sdpa'")
        return "flash", "forced"
    if requested in ("sdpa", "math"):
        return requested, "forced"
    if flash_ok:
        return "flash", "flash-attn installed, CUDA half precision"
    if not flash_attn_available():
        return "sdpa", "flash-attn not installed"
    return "sdpa", f"flash-attn needs CUDA fp16/bf16, tensors are {device.type} {dtype}"


def causal_keep_mask(
    q_len: int, k_len: int, key_padding: torch.Tensor | None, device: torch.device
) -> torch.Tensor | None:
    """Bool mask (B or 1, 1, Tq, Tk): causal with queries aligned to the last keys, and no padded keys.

    `key_padding` is (B, Tk) with 1 for real tokens and 0 for padding, or None. Returns None when plain
    top-left causal attention (q_len == k_len, no padding) is enough, so SDPA can take its fast path.
    """
    if key_padding is None and q_len == k_len:
        return None
    query_pos = torch.arange(k_len - q_len, k_len, device=device).unsqueeze(1)  # (Tq, 1)
    key_pos = torch.arange(k_len, device=device).unsqueeze(0)  # (1, Tk)
    keep = (key_pos <= query_pos).unsqueeze(0).unsqueeze(0)  # (1, 1, Tq, Tk)
    if key_padding is not None:
        keep = keep & key_padding.bool()[:, None, None, :]
        # A padding query would see no key at all (softmax of nothing is NaN): let it see itself.
        keep = keep | (key_pos == query_pos).unsqueeze(0).unsqueeze(0)
    return keep


def math_attention(q, k, v, keep: torch.Tensor | None, dropout_p: float, scale: float) -> torch.Tensor:
    """The reference: scores and softmax in fp32 (phi-2 overflowed fp16 here), then back to the input dtype."""
    q_len, k_len = q.shape[-2], k.shape[-2]
    scores = torch.matmul(q.float(), k.float().transpose(-2, -1)) * scale  # (B, nh, Tq, Tk)
    if keep is None:
        keep = causal_keep_mask(q_len, k_len, None, q.device)
        if keep is None:
            keep = torch.ones(q_len, k_len, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if dropout_p > 0:
        probs = F.dropout(probs, p=dropout_p)
    return torch.matmul(probs, v.float()).to(q.dtype)


def sdpa_attention(q, k, v, keep: torch.Tensor | None, dropout_p: float, scale: float) -> torch.Tensor:
    if keep is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=dropout_p, scale=scale)


def flash_attention(q, k, v, keep: torch.Tensor | None, dropout_p: float, scale: float) -> torch.Tensor:
    if keep is not None:
        # Padded batches (generation) need an explicit mask, which flash_attn_func does not take.
        return sdpa_attention(q, k, v, keep, dropout_p, scale)
    # flash-attn wants (B, T, nh, hs) and aligns causal queries to the last keys, as a KV cache needs.
    out = _flash_attn_func(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p, softmax_scale=scale, causal=True
    )
    return out.transpose(1, 2)


KERNELS = {"flash": flash_attention, "sdpa": sdpa_attention, "math": math_attention}


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
