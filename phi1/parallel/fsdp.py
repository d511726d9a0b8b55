"""Fully sharded data parallelism with PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`) over the DP group.

Each rank keeps 1 / dp of every parameter, of its gradient and of the optimizer state (fp32 master weights); a
block's parameters are all-gathered just before the block runs (in the compute dtype of the mixed-precision
policy) and freed after it, and gradients are reduce-scattered in fp32. `shard_model` wraps each phi block, then
the root (embedding, final LayerNorm and lm_head), as torchtitan does.

With tensor parallelism (2D): phi1's TP layers hold plain local tensors and talk over explicit process groups,
so `fully_shard` on this rank's DP group shards each TP-local tensor again along dim 0 over the ranks that hold
the same TP shard (world 4, tp 2: ranks {0, 2} shard TP shard 0, ranks {1, 3} TP shard 1). The TP collectives of
the forward run on the all-gathered TP-local tensors exactly as without FSDP.

Parameters become DTensors on a one-dimensional DP mesh (placement Shard(0)) whose `to_local()` is this rank's
slice; gradients are DTensors sharded the same way. What is here besides the wrapping:

- `clip_grad_norm_` / `grad_norm`: the global norm over the sharded gradients: local squared sums, summed over
  the DP group (every parameter is sharded over DP), then over the TP group only for TP-split parameters
  (TP-replicated ones such as LayerNorm weights are identical on every TP rank and counted once).
- `allreduce_sequence_parallel_grads`: the sequence-parallel partial gradients summed over TP, on the local
  shards (the members of a TP group hold the same DP slice of a replicated parameter).

Checkpoints: `phi1.parallel.distributed_checkpoint` takes the DTensor parameters and AdamW moments as they are
(by name, each DP rank writing its rows; under TP gathered over DP to the TP shard first), so a checkpoint
written under FSDP2 loads at any TP x PP x DP layout, and the reverse.

Why our own norm: `torch.nn.utils.clip_grad_norm_` over DTensor gradients reduces over the DTensor's mesh only,
and knows nothing of phi1's TP groups (plain tensors), so it would count TP shards once per TP rank and miss the
TP sum.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import ProcessGroup
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)
from torch.distributed.tensor import DTensor

from phi1.parallel.grads import clip_to_global_norm_, sum_over_group_
from phi1.parallel.layers import tensor_parallel_dims
from phi1.parallel.mappings import group_size

if TYPE_CHECKING:  # only its attributes are read; the module itself is not imported at run time
    from phi1.parallel.state import ParallelState

COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def dp_mesh(state: ParallelState) -> DeviceMesh:
    """The one-dimensional DeviceMesh over this rank's DP group (the existing group, no new one is created)."""
    if state.dp_group is None:
        raise ValueError("FSDP2 needs a data-parallel process group (a distributed run)")
    return DeviceMesh.from_group(state.dp_group, state.device.type, mesh_dim_names=("dp",))


def mixed_precision_policy(precision: str) -> MixedPrecisionPolicy:
    """Parameters all-gathered in the run's compute dtype; fp32 master weights (the sharded parameters keep their
    dtype) and fp32 gradient reduction.

    Args:
        precision: 'fp32', 'bf16' or 'fp16' (the resolved `precision` of the run, not 'auto').
    Raises:
        ValueError: another value.
    """
    if precision not in COMPUTE_DTYPES:
        raise ValueError(f"precision must be one of {sorted(COMPUTE_DTYPES)} for FSDP2, got {precision!r}")
    dtype = COMPUTE_DTYPES[precision]
    if dtype == torch.float32:
        return MixedPrecisionPolicy(param_dtype=None, reduce_dtype=None)
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def shard_model(model: nn.Module, state: ParallelState, precision: str = "fp32", cpu_offload: bool = False,
                mesh: DeviceMesh | None = None) -> nn.Module:
    """Apply `fully_shard` to each block of `model.layers`, then to the root, over the DP group; in place.

    Args:
        model: a PhiForCausalLM (TP-local tensors under TP), on its device, with the same weights on every DP
            rank (the same init seed, or loaded): each rank keeps its slice, nothing is broadcast.
        state: the run's ParallelState.
        precision: the run's resolved precision ('fp32', 'bf16', 'fp16'); see `mixed_precision_policy`.
        cpu_offload: keep the sharded parameters, gradients and (through them) the optimizer state in CPU memory,
            copied to the device for compute (torch's CPUOffloadPolicy; the optimizer then steps on the CPU).
        mesh: the DP mesh; built from `state.dp_group` when None.
    Returns:
        `model` itself (now an FSDPModule; parameters are DTensors).
    Raises:
        ValueError: no DP group (a single-process run), or a precision FSDP2 has no policy for.
    """
    mesh = mesh if mesh is not None else dp_mesh(state)
    offload: OffloadPolicy = CPUOffloadPolicy(pin_memory=state.device.type == "cuda") if cpu_offload else OffloadPolicy()
    options = dict(mesh=mesh, mp_policy=mixed_precision_policy(precision), offload_policy=offload)
    blocks = list(model.layers)
    for index, block in enumerate(blocks):
        # The last block's parameters are needed again at once by the backward: keeping them gathered saves one
        # all-gather (torchtitan does the same).
        fully_shard(block, reshard_after_forward=index < len(blocks) - 1, **options)
    fully_shard(model, **options)
    # The root returns the logits, a view (F.linear over (B, T, d)); FSDP2 warns on every forward that an in-place
    # op on a returned view would skip its pre-backward hook. The loss is computed inside the forward, out of
    # place, and nothing writes into the returned logits, so the warning only floods the log.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    return model


def is_sharded(model: nn.Module) -> bool:
    """True when `model` was wrapped by `shard_model` (FSDP2)."""
    return isinstance(model, FSDPModule)


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Turn the gradient reduce-scatter of the coming backward on or off (off while accumulating micro-batches:
    gradients accumulate unsharded and are reduced once, after the last micro-batch)."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (its shard), or the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def local_gradients(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, this rank's shard of the gradient) for every parameter that has one."""
    return [(name, local(p.grad)) for name, p in model.named_parameters() if p.grad is not None]


def allreduce_sequence_parallel_grads(model: nn.Module, tp_group: ProcessGroup | None) -> None:
    """Sum over the TP group the local shards of the sequence-parallel parameters' gradients (LayerNorms and the
    biases after a reduce-scatter, which saw T / tp positions). A no-op at tp 1 or without sequence parallelism.
    Call after the backward (after FSDP's reduce-scatter over DP)."""
    if group_size(tp_group) == 1:
        return
    params = dict(model.named_parameters())
    grads = [local(params[name].grad) for name in model.sequence_parallel_param_names()
             if params[name].grad is not None]
    grads = [g for g in grads if g.numel() > 0]
    if not grads:
        return
    sum_over_group_(grads, tp_group)


def grad_norm(model: nn.Module, state: ParallelState) -> float:
    """Global L2 norm of the whole model's gradient from the sharded gradients, as a Python float (every rank
    gets the same value; collective over the DP and TP groups).

    Each rank sums the squares of its local gradient shards in fp64, separately for TP-split and TP-replicated
    parameters. Both sums are added over the DP group (each DP rank holds a disjoint slice of every parameter).
    The TP-split sum is then added over the TP group; the replicated one is not (every TP rank holds the same
    values, which would otherwise be counted tp times). NaN and Inf propagate.
    """
    dims = tensor_parallel_dims(model)
    device = next(local(p) for p in model.parameters()).device
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # [TP-split, TP-replicated]
    for name, param in model.named_parameters():
        if param.grad is None:
            continue
        shard = local(param.grad)
        if shard.numel() == 0:
            continue
        sums[0 if dims[name] is not None else 1] += shard.detach().double().pow(2).sum()
    sums = sums.to(state.device)  # offloaded gradients are summed on the CPU; the groups talk on the device
    if group_size(state.dp_group) > 1:
        dist.all_reduce(sums, group=state.dp_group)
    if group_size(state.tp_group) > 1:
        split = sums[:1].clone()
        dist.all_reduce(split, group=state.tp_group)
        sums[0] = split[0]
    return math.sqrt(float(sums.sum()))


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float, state: ParallelState) -> float:
    """Scale the sharded gradients in place so that their global norm (`grad_norm`) is at most `max_norm`.

    Returns:
        The norm before clipping; a non-finite norm is returned as it is and nothing is scaled (the caller skips
        the step).
    Raises:
        ValueError: max_norm <= 0.
    """
    return clip_to_global_norm_(max_norm, lambda: grad_norm(model, state),
                                lambda: [g for _, g in local_gradients(model) if g.numel() > 0])


def scale_gradients_(model: nn.Module, factor: float) -> None:
    """Multiply every local gradient shard by `factor` in place (the fp16 loss scale's unscale)."""
    shards = [g for _, g in local_gradients(model) if g.numel() > 0]
    if shards:
        torch._foreach_mul_(shards, factor)


__all__ = [
    "allreduce_sequence_parallel_grads",
    "clip_grad_norm_",
    "dp_mesh",
    "grad_norm",
    "is_sharded",
    "local",
    "local_gradients",
    "mixed_precision_policy",
    "scale_gradients_",
    "set_gradient_sync",
    "shard_model",
]
