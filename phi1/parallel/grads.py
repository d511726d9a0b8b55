"""Gradient reductions that tensor and sequence parallelism add to data parallelism, and global-norm clipping.

Order in a training step (DDP): backward (DDP averages over DP) -> `allreduce_sequence_parallel_grads` ->
`clip_grad_norm_` -> optimizer step. Under ZeRO, DeepSpeed clips (see `phi1.parallel.zero`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from phi1.parallel.layers import tensor_parallel_dims
from phi1.parallel.mappings import group_size

if TYPE_CHECKING:
    # Annotations only: phi1.parallel.state imports phi1.parallel.pipeline, which imports this module.
    from phi1.parallel.state import ParallelState


def unwrap_model(model: nn.Module) -> nn.Module:
    """The phi model inside DDP / DeepSpeed wrappers (both keep it as `.module`).

    Unwrapped by the `.module` attribute itself: a DeepSpeed engine forwards unknown attributes to its module,
    so asking the wrapper for a model method would wrongly answer yes.
    """
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def allreduce_sequence_parallel_grads(model: nn.Module, state: ParallelState) -> None:
    """Sum over the TP group the gradients of parameters that saw only a sequence shard.

    Under sequence parallelism the LayerNorms and the biases added after a reduce-scatter run on T / tp
    positions per rank, so each rank's gradient is a partial sum over its positions. One flattened all-reduce
    for all of them. A no-op without sequence parallelism or with tp_size 1.
    """
    inner = unwrap_model(model)
    if group_size(state.tp_group) == 1:
        return
    params = dict(inner.named_parameters())
    grads = [params[name].grad for name in inner.sequence_parallel_param_names() if params[name].grad is not None]
    if not grads:
        return
    sum_over_group_(grads, state.tp_group)


def sum_over_group_(tensors: list[torch.Tensor], group: dist.ProcessGroup | None) -> None:
    """Replace each of `tensors` by its sum over `group`, in place, with one all-reduce of them flattened together
    (one message instead of one per tensor: sequence-parallel gradients are many small LayerNorm and bias
    tensors). The tensors must share a dtype and device."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def grad_norm(model: nn.Module, state: ParallelState) -> float:
    """Global L2 norm of the gradients of the whole (unsharded) model, as a Python float.

    Sharded parameters' squared norms are summed over the TP group; replicated ones (identical on every TP rank
    once the sequence-parallel gradients are reduced) are counted once. DP replicas hold the same averaged
    gradients after DDP, so no DP reduction is needed.
    """
    inner = unwrap_model(model)
    device = next(inner.parameters()).device
    return math.sqrt(squared_grad_sum([inner], state.tp_group, device).item())


def squared_grad_sum(modules: Iterable[nn.Module], tp_group: dist.ProcessGroup | None,
                     device: torch.device) -> torch.Tensor:
    """Sum of the squared gradients of `modules` as the unsharded model has them, in float64.

    The squares of tensor-parallel-sharded parameters (`tensor_parallel_dims` not None) are summed over
    `tp_group`; replicated ones are counted once. A collective over `tp_group` when it has more than one rank:
    call it on every rank of the group. Used by `grad_norm` (one model) and by the pipeline runner (this rank's
    stage chunks, whose totals it then sums over the pipeline group).

    Args:
        modules: the modules whose parameters' `.grad` are counted (a parameter without one is skipped).
        tp_group: the tensor-parallel group; None or a one-rank group means no reduction.
        device: where the accumulators live (the gradients' device, which the collective needs).
    Returns:
        A 0-dim float64 tensor on `device`, the same on every TP rank.
    """
    sharded_sq = torch.zeros((), dtype=torch.float64, device=device)
    replicated_sq = torch.zeros((), dtype=torch.float64, device=device)
    for module in modules:
        dims = tensor_parallel_dims(module)
        for name, param in module.named_parameters():
            if param.grad is None:
                continue
            sq = param.grad.detach().double().pow(2).sum()
            if dims[name] is None:
                replicated_sq += sq
            else:
                sharded_sq += sq
    if group_size(tp_group) > 1:
        dist.all_reduce(sharded_sq, group=tp_group)
    return sharded_sq + replicated_sq


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float, state: ParallelState) -> float:
    """Scale the gradients in place so that their global norm (see `grad_norm`) is at most `max_norm`.

    Returns:
        The norm before clipping. A non-finite norm is returned as it is and nothing is scaled, so the caller
        can skip the step.
    Raises:
        ValueError: max_norm <= 0.
    """
    return clip_to_global_norm_(
        max_norm, lambda: grad_norm(model, state),
        lambda: [p.grad for p in unwrap_model(model).parameters() if p.grad is not None])


@torch.no_grad()
def clip_to_global_norm_(max_norm: float, global_norm: Callable[[], float],
                         gradients: Callable[[], list[torch.Tensor]]) -> float:
    """The clipping rule of `clip_grad_norm_` here, of FSDP2's (phi1.parallel.fsdp) and of the pipeline runner
    (phi1.parallel.pipeline), over the norm and the gradient tensors each of them knows how to find: scale by
    max_norm / (norm + 1e-6) when that is below 1.

    Args:
        max_norm: the largest global norm allowed (optim.grad_clip).
        global_norm: computes the global norm (a collective where the gradients are split: called once, on every
            rank, after max_norm is checked).
        gradients: the tensors to scale in place (this rank's gradients or gradient shards); called only when
            they are scaled.
    Returns:
        The norm before clipping; a non-finite norm is returned as it is and nothing is scaled.
    Raises:
        ValueError: max_norm <= 0.
    """
    if max_norm <= 0:
        raise ValueError(f"max_norm (grad_clip) must be > 0, got {max_norm}")
    norm = global_norm()
    if not math.isfinite(norm):
        return norm
    scale = max_norm / (norm + 1e-6)
    if scale < 1.0:
        torch._foreach_mul_(gradients(), scale)
    return norm
