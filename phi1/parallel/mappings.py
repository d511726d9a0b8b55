"""Autograd functions that move activations in and out of the tensor-parallel (TP) region.

Each forward collective has the adjoint collective as its backward:

    copy_to_tp         fwd: identity            bwd: all-reduce
    reduce_from_tp     fwd: all-reduce          bwd: identity
    scatter_to_tp      fwd: keep my last-dim slice    bwd: all-gather last dim
    gather_from_tp     fwd: all-gather last dim       bwd: keep my slice

and for sequence parallelism (activations split along the sequence dim outside the TP region):

    scatter_to_sequence   fwd: keep my sequence slice     bwd: all-gather sequence
    gather_from_sequence  fwd: all-gather sequence        bwd: reduce-scatter sequence
    reduce_scatter_to_sequence  fwd: reduce-scatter sequence   bwd: all-gather sequence

The process group is always passed in; `None` or a group of one rank makes every function the identity, so
the same model code runs unsharded. Tensors are batch-first (B, T, ...): the sequence dim is 1.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

SEQUENCE_DIM = 1

# torch 2.13 renamed the tensor-in / tensor-out collectives; keep working on older torch too.
_all_gather_tensor = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_tensor = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def group_size(group: ProcessGroup | None) -> int:
    """Ranks in `group`; 1 for None or when torch.distributed is not initialised."""
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def group_rank(group: ProcessGroup | None) -> int:
    """This process's rank inside `group`; 0 for None or when torch.distributed is not initialised."""
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 0
    return dist.get_rank(group)


# Counts bytes sent through each collective kind; benchmarks read it, tests reset it. Kept here because every
# TP collective of the model goes through this module.
COMM_BYTES: dict[str, int] = {"all_reduce": 0, "all_gather": 0, "reduce_scatter": 0}


def reset_comm_bytes() -> None:
    """Zero every COMM_BYTES counter."""
    for key in COMM_BYTES:
        COMM_BYTES[key] = 0


def _all_reduce(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    if group_size(group) == 1:
        return x
    x = x.contiguous()
    COMM_BYTES["all_reduce"] += x.numel() * x.element_size()
    dist.all_reduce(x, group=group)
    return x


def _split_along(x: torch.Tensor, dim: int, group: ProcessGroup | None) -> torch.Tensor:
    world = group_size(group)
    if world == 1:
        return x
    if x.shape[dim] % world != 0:
        raise ValueError(f"dim {dim} of size {x.shape[dim]} does not split evenly over {world} tensor-parallel ranks")
    return x.chunk(world, dim=dim)[group_rank(group)].contiguous()


def _gather_along(x: torch.Tensor, dim: int, group: ProcessGroup | None) -> torch.Tensor:
    world = group_size(group)
    if world == 1:
        return x
    # all_gather_into_tensor concatenates along dim 0: move `dim` there and back.
    moved = x.movedim(dim, 0).contiguous()
    out = torch.empty((world * moved.shape[0], *moved.shape[1:]), dtype=x.dtype, device=x.device)
    COMM_BYTES["all_gather"] += moved.numel() * moved.element_size()
    _all_gather_tensor(out, moved, group=group)
    return out.movedim(0, dim).contiguous()


def _reduce_scatter_along(x: torch.Tensor, dim: int, group: ProcessGroup | None) -> torch.Tensor:
    world = group_size(group)
    if world == 1:
        return x
    if x.shape[dim] % world != 0:
        raise ValueError(f"dim {dim} of size {x.shape[dim]} does not split evenly over {world} tensor-parallel ranks")
    moved = x.movedim(dim, 0).contiguous()
    out = torch.empty((moved.shape[0] // world, *moved.shape[1:]), dtype=x.dtype, device=x.device)
    COMM_BYTES["reduce_scatter"] += moved.numel() * moved.element_size()
    _reduce_scatter_tensor(out, moved, group=group)
    return out.movedim(0, dim).contiguous()


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad.clone(), ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_along(x, -1, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_along(grad, -1, ctx.group), None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_along(x, -1, group)

    @staticmethod
    def backward(ctx, grad):
        return _split_along(grad, -1, ctx.group), None


class _ScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_along(x, SEQUENCE_DIM, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_along(grad, SEQUENCE_DIM, ctx.group), None


class _GatherFromSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_along(x, SEQUENCE_DIM, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter_along(grad, SEQUENCE_DIM, ctx.group), None


class _ReduceScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter_along(x, SEQUENCE_DIM, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_along(grad, SEQUENCE_DIM, ctx.group), None


def _identity_if_single(fn):
    def apply(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
        if group_size(group) == 1:
            return x
        return fn.apply(x, group)

    apply.__name__ = fn.__name__
    return apply


copy_to_tp = _identity_if_single(_CopyToTP)
reduce_from_tp = _identity_if_single(_ReduceFromTP)
scatter_to_tp = _identity_if_single(_ScatterToTP)
gather_from_tp = _identity_if_single(_GatherFromTP)
scatter_to_sequence = _identity_if_single(_ScatterToSequence)
gather_from_sequence = _identity_if_single(_GatherFromSequence)
reduce_scatter_to_sequence = _identity_if_single(_ReduceScatterToSequence)
