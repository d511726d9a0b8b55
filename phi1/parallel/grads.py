"""Gradient reductions that tensor and sequence parallelism add to data parallelism, and global-norm clipping.

Order in a training step (DDP): backward (DDP averages over DP) -> `allreduce_sequence_parallel_grads` ->
`clip_grad_norm_` -> optimizer step. Under ZeRO, DeepSpeed clips (see `phi1.parallel.zero`).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from phi1.parallel.layers import tensor_parallel_dims
from phi1.parallel.mappings import group_size
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
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=state.tp_group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def grad_norm(model: nn.Module, state: ParallelState) -> float:
    """Global L2 norm of the gradients of the whole (unsharded) model, as a Python float.

    Sharded parameters' squared norms are summed over the TP group; replicated ones (identical on every TP rank
    once the sequence-parallel gradients are reduced) are counted once. DP replicas hold the same averaged
    gradients after DDP, so no DP reduction is needed.
    """
    inner = unwrap_model(model)
    dims = tensor_parallel_dims(inner)
    device = next(inner.parameters()).device
    sharded_sq = torch.zeros((), dtype=torch.float64, device=device)
    replicated_sq = torch.zeros((), dtype=torch.float64, device=device)
    for name, param in inner.named_parameters():
        if param.grad is None:
            continue
        sq = param.grad.detach().double().pow(2).sum()
        if dims[name] is None:
            replicated_sq += sq
        else:
            sharded_sq += sq
    if group_size(state.tp_group) > 1:
        dist.all_reduce(sharded_sq, group=state.tp_group)
    return math.sqrt((sharded_sq + replicated_sq).item())


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float, state: ParallelState) -> float:
    """Scale the gradients in place so that their global norm (see `grad_norm`) is at most `max_norm`.

    Returns:
        The norm before clipping. A non-finite norm is returned as it is and nothing is scaled, so the caller
        can skip the step.
    Raises:
        ValueError: max_norm <= 0.
    """
    if max_norm <= 0:
        raise ValueError(f"max_norm (grad_clip) must be > 0, got {max_norm}")
    norm = grad_norm(model, state)
    if not math.isfinite(norm):
        return norm
    scale = max_norm / (norm + 1e-6)
    if scale < 1.0:
        grads = [p.grad for p in unwrap_model(model).parameters() if p.grad is not None]
        torch._foreach_mul_(grads, scale)
    return norm
