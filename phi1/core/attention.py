"""Causal self-attention kernels: flash-attn, torch SDPA, and an explicit math path that is the reference.

The choice is one small function (`select_backend`) so the model stays one class. All three take
q, k, v as (B, nh, T, hs) and return (B, nh, Tq, hs). `keep` is an optional bool mask (B, 1, Tq, Tk),
True where a query may attend; without it the attention is causal with the queries aligned to the last keys
(which is what a KV cache needs).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

logger = logging.getLogger("phi1.attention")

try:  # flash-attn is optional: not installable on CPU machines
    from flash_attn import flash_attn_func as _flash_attn_func
    from flash_attn import flash_attn_varlen_func as _flash_attn_varlen_func
except Exception:  # ImportError, or a CUDA/ABI mismatch raised at import
    _flash_attn_func = _flash_attn_varlen_func = None


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


# ----------------------------------------------------------------------------------------------------------------
# Document masking inside packed samples


@dataclass
class Documents:
    """The documents of packed samples, found at their end-of-document tokens.

    A token belongs to the document its eod token ends (the eod itself included), so document d of a row runs
    from just after the (d-1)-th eod to the d-th eod.
    """

    position_ids: torch.Tensor
    """(B, T) rotary positions restarting at 0 at each document's first token."""
    keep: torch.Tensor
    """(B, 1, T, T) bool: causal and within one document (the SDPA and math paths)."""
    cu_seqlens: torch.Tensor | None = None
    """(n_documents + 1,) int32 starts of the documents in the flattened B x T tokens (flash-attn's varlen);
    None when flash-attn is not used."""
    max_seqlen: int = 0
    """The longest document's length (flash-attn's varlen)."""


def find_documents(input_ids: torch.Tensor, eod_token_id: int, varlen: bool = False) -> Documents:
    """Documents, rotary positions and the block-diagonal causal mask of packed samples.

    Args:
        input_ids: (B, T) token ids; every `eod_token_id` ends a document.
        varlen: also build flash-attn's `cu_seqlens` / `max_seqlen` (one host sync for the maximum).
    """
    B, T = input_ids.shape
    is_eod = input_ids == eod_token_id  # (B, T)
    document = torch.cumsum(is_eod.to(torch.int32), dim=1) - is_eod.to(torch.int32)  # (B, T) eods strictly before
    # A new document starts at position 0 and just after each eod.
    starts = torch.zeros_like(is_eod)
    starts[:, 0] = True
    starts[:, 1:] = is_eod[:, :-1]
    index = torch.arange(T, device=input_ids.device).expand(B, T)
    start_of_own = torch.cummax(torch.where(starts, index, torch.zeros_like(index)), dim=1).values  # (B, T)
    position_ids = index - start_of_own
    causal = torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril()
    keep = (document.unsqueeze(2) == document.unsqueeze(1)) & causal  # (B, T, T)
    documents = Documents(position_ids=position_ids, keep=keep.unsqueeze(1))
    if varlen:
        flat_starts = torch.nonzero(starts.reshape(-1), as_tuple=False).squeeze(1)
        total = torch.tensor([B * T], device=input_ids.device)
        cu = torch.cat([flat_starts, total]).to(torch.int32)
        documents.cu_seqlens = cu
        documents.max_seqlen = int((cu[1:] - cu[:-1]).max())
    return documents


def document_attention(backend: str, q, k, v, documents: Documents, dropout_p: float, scale: float) -> torch.Tensor:
    """Attention of q, k, v (B, nh, T, hs) within documents only; (B, nh, T, hs).

    flash: flash-attn's varlen kernel over the flattened tokens (no T x T mask, no work across documents).
    sdpa / math: the (B, 1, T, T) block-diagonal causal mask; SDPA then runs its memory-efficient kernel
    (the flash kernel takes no mask). FlexAttention would skip the masked blocks too, but needs torch.compile
    of the attention to be fast, and no GPU was at hand to measure it against the varlen kernel.
    """
    if backend == "flash" and documents.cu_seqlens is not None and _flash_attn_varlen_func is not None:
        B, nh, T, hs = q.shape
        flat = [t.transpose(1, 2).reshape(B * T, nh, hs) for t in (q, k, v)]  # (B T, nh, hs)
        cu = documents.cu_seqlens
        out = _flash_attn_varlen_func(*flat, cu, cu, documents.max_seqlen, documents.max_seqlen,
                                      dropout_p=dropout_p, softmax_scale=scale, causal=True)
        return out.view(B, T, nh, hs).transpose(1, 2)
    kernel = sdpa_attention if backend == "flash" else KERNELS[backend]
    return kernel(q, k, v, documents.keep, dropout_p, scale)
