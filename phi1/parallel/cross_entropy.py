"""Cross-entropy over logits whose vocabulary is split across the tensor-parallel group.

The full-vocabulary logits are never gathered: each rank holds (N, V / tp) columns and the softmax
normaliser, the max and the target logit are combined with three all-reduces of N numbers each.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed import ProcessGroup

from phi1.parallel.mappings import group_rank, group_size

IGNORE_INDEX = -100


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, group: ProcessGroup, ignore_index: int):
        logits = logits.float()
        local_vocab = logits.shape[-1]
        vocab_start = group_rank(group) * local_vocab

        logits_max = logits.max(dim=-1).values
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - logits_max.unsqueeze(-1)  # (N, V/tp), <= 0: exp cannot overflow

        ignored = targets == ignore_index
        local_targets = targets - vocab_start
        outside = (local_targets < 0) | (local_targets >= local_vocab) | ignored
        safe_targets = local_targets.masked_fill(outside, 0)
        target_logit = shifted.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        dist.all_reduce(target_logit, group=group)

        exp_logits = shifted.exp()
        sum_exp = exp_logits.sum(dim=-1)
        dist.all_reduce(sum_exp, group=group)

        loss = (sum_exp.log() - target_logit).masked_fill(ignored, 0.0)
        softmax = exp_logits.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, safe_targets, outside, ignored)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        softmax, safe_targets, outside, ignored = ctx.saved_tensors
        grad = softmax  # d loss / d logits = softmax - onehot(target); reuse the saved buffer
        hit = (~outside).float()
        grad.scatter_add_(-1, safe_targets.unsqueeze(-1), -hit.unsqueeze(-1))
        grad.mul_(grad_loss.masked_fill(ignored, 0.0).unsqueeze(-1))
        return grad, None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    group: ProcessGroup | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Per-token losses, computed in fp32.

    Args:
        logits: (..., V / tp) this rank's slice of the vocabulary (the whole vocabulary when tp = 1).
        targets: (...) token ids in the full vocabulary; `ignore_index` marks tokens without loss (loss 0).
    Returns:
        (...) fp32 losses.
    """
    shape = targets.shape
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_targets = targets.reshape(-1)
    if group_size(group) == 1:
        loss = F.cross_entropy(flat_logits.float(), flat_targets, reduction="none", ignore_index=ignore_index)
    else:
        loss = _VocabParallelCrossEntropy.apply(flat_logits, flat_targets, group, ignore_index)
    return loss.view(shape)
