"""lm_head + cross-entropy over chunks of tokens, never holding the whole batch's logits.

phi-1's vocabulary is 51,200 columns: fp32 logits for a micro-batch of 8 x 2048 tokens take 3.4 GB, plus their
bf16 copy and the softmax saved for backward. Here the tokens go through in chunks; each chunk's logits live
only while its loss and its gradients (d hidden, d weight, d bias) are computed, in the forward pass, so the
backward pass only scales the stored gradients. Peak extra memory: one chunk of logits plus an fp32 gradient
of the lm_head weight. FLOPs are the same as the plain path (no recomputation).

Used when tensor parallelism is off; with TP the vocab-parallel cross-entropy already keeps only V / tp columns.
"""

from __future__ import annotations

import torch

from phi1.parallel.cross_entropy import IGNORE_INDEX


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_size: int, ignore_index: int, grad_enabled: bool):
        # needs_input_grad says only whether inputs require grad, also under torch.no_grad(); the caller's grad
        # mode (forward itself always runs without it) decides whether the gradient matmuls are worth doing.
        needs_grad = grad_enabled and any(ctx.needs_input_grad[:3])
        n_tokens = hidden.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        if needs_grad:
            grad_hidden = torch.empty_like(hidden)
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if bias is not None else None
        for start in range(0, n_tokens, chunk_size):
            h = hidden[start : start + chunk_size]  # (c, d)
            y = labels[start : start + chunk_size]  # (c,)
            logits = torch.nn.functional.linear(h, weight, bias).float()  # (c, V)
            valid = y != ignore_index
            safe_y = y.masked_fill(~valid, 0)
            lse = torch.logsumexp(logits, dim=-1)
            target_logit = logits.gather(-1, safe_y.unsqueeze(-1)).squeeze(-1)
            total += ((lse - target_logit) * valid).sum()
            if needs_grad:
                # d(sum of losses)/d logits = softmax - onehot, zero on ignored rows; computed in place.
                grad_logits = logits.sub_(lse.unsqueeze(-1)).exp_()
                grad_logits[torch.arange(len(y), device=y.device), safe_y] -= 1.0
                grad_logits.mul_(valid.unsqueeze(-1))
                grad_logits = grad_logits.to(h.dtype)
                grad_hidden[start : start + chunk_size] = grad_logits @ weight
                grad_weight.addmm_(grad_logits.t().float(), h.float())
                if grad_bias is not None:
                    grad_bias += grad_logits.float().sum(0)
        if needs_grad:
            ctx.save_for_backward(
                grad_hidden,
                grad_weight.to(weight.dtype),
                grad_bias.to(bias.dtype) if grad_bias is not None else None,
            )
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        scale = grad_total.to(grad_hidden.dtype)
        return (
            grad_hidden * scale,
            grad_weight * scale.to(grad_weight.dtype),
            grad_bias * scale.to(grad_bias.dtype) if grad_bias is not None else None,
            None,
            None,
            None,
            None,
        )


def chunked_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    chunk_size: int = 4096,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Sum over tokens of cross_entropy(hidden @ weight.T + bias, labels), in fp32.

    Args:
        hidden: (..., d) final hidden states.
        weight: (V, d) lm_head weight; bias: (V,) or None.
        labels: (...) target ids; `ignore_index` rows add nothing.
        chunk_size: tokens per chunk (memory ~ chunk_size x V x 4 bytes).
    Returns:
        fp32 scalar: the summed loss (divide by the number of labelled tokens for the mean).
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    return _ChunkedLinearCrossEntropy.apply(flat_hidden, weight, bias, labels.reshape(-1), chunk_size, ignore_index,
                                            torch.is_grad_enabled())
