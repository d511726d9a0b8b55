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
- `full_tensor_view` / `load_full_tensor_view`: the TP-local whole tensors of the parameters and their AdamW
  state as a plain module and optimizer, the shape `phi1.parallel.distributed_checkpoint` saves and loads by
  name; so a checkpoint written under FSDP2 loads at any TP x PP x DP layout, and the reverse. (The view holds
  one TP-local copy of the model and its optimizer state on each rank while a checkpoint is written or read.)

Why our own norm: `torch.nn.utils.clip_grad_norm_` over DTensor gradients reduces over the DTensor's mesh only,
and knows nothing of phi1's TP groups (plain tensors), so it would count TP shards once per TP rank and miss the
TP sum.
"""

from __future__ import annotations

import math
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
from torch.distributed.tensor import DTensor, distribute_tensor

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
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=tp_group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


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
    if max_norm <= 0:
        raise ValueError(f"max_norm (grad_clip) must be > 0, got {max_norm}")
    norm = grad_norm(model, state)
    if not math.isfinite(norm):
        return norm
    scale = max_norm / (norm + 1e-6)
    if scale < 1.0:
        shards = [g for _, g in local_gradients(model) if g.numel() > 0]
        torch._foreach_mul_(shards, scale)
    return norm


def scale_gradients_(model: nn.Module, factor: float) -> None:
    """Multiply every local gradient shard by `factor` in place (the fp16 loss scale's unscale)."""
    shards = [g for _, g in local_gradients(model) if g.numel() > 0]
    if shards:
        torch._foreach_mul_(shards, factor)


# ----------------------------------------------------------------------------------------------------------------
# TP-local whole tensors, for the any-layout checkpoint


def _holder_class(cls: type) -> type:
    """A bare nn.Module class that declares the same `partition_dims` as `cls` (for `tensor_parallel_dims`)."""
    return type(f"{cls.__name__}Tensors", (nn.Module,), {"partition_dims": dict(getattr(cls, "partition_dims", {}))})


def _mirror(model: nn.Module, device: torch.device, dtype_of) -> tuple[nn.Module, dict[str, nn.Parameter]]:
    """A module tree with the same parameter names and TP split dims as `model`, whose parameters are fresh,
    uninitialised plain tensors of each parameter's TP-local whole shape (`dtype_of(param)` gives the dtype)."""
    holders: dict[str, nn.Module] = {}
    params: dict[str, nn.Parameter] = {}
    root = _holder_class(type(model))()
    holders[""] = root
    for module_name, module in model.named_modules():
        if module_name == "":
            continue
        parent_name, _, leaf = module_name.rpartition(".")
        holder = _holder_class(type(module))()
        holders[parent_name].add_module(leaf, holder)
        holders[module_name] = holder
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            shape = param.shape  # a DTensor's shape is the whole (TP-local) shape
            tensor = nn.Parameter(torch.empty(shape, dtype=dtype_of(param), device=device), requires_grad=False)
            holders[module_name].register_parameter(param_name, tensor)
            params[f"{module_name}.{param_name}" if module_name else param_name] = tensor
    return root, params


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (all-gathered over its mesh: collective), or the tensor itself."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


@torch.no_grad()
def full_tensor_view(model: nn.Module, optimizer: torch.optim.Optimizer | None,
                     device: torch.device | str = "cpu") -> tuple[nn.Module, torch.optim.Optimizer | None]:
    """The TP-local whole parameters of an FSDP2 model and their AdamW state, as a plain module and optimizer.

    Collective over the DP group (every rank calls it, in the same order). The module has the model's parameter
    names and TP split dims (`tensor_parallel_dims` reads them), the optimizer holds, per parameter, the whole
    `exp_avg`, `exp_avg_sq` and `step`, and the same parameter groups: what `distributed_checkpoint.save_checkpoint`
    takes. Pass both to `load_full_tensor_view` after they were filled by a load.

    Args:
        model: the FSDP2-wrapped model (or any model: plain parameters are copied as they are).
        optimizer: its AdamW (state keyed by the DTensor parameters), or None.
        device: where the view lives (CPU by default: it is a staging copy).
    """
    named = dict(model.named_parameters())
    view, params = _mirror(model, torch.device(device), lambda p: p.dtype)
    for name, param in named.items():
        params[name].copy_(_full(param.detach()))
    if optimizer is None:
        return view, None
    view_optimizer = _view_optimizer(optimizer, named, params)
    for name, param in named.items():
        slot = optimizer.state.get(param)
        if not slot:
            continue
        view_slot = {}
        for key, value in slot.items():
            if torch.is_tensor(value) and value.dim() > 0:
                view_slot[key] = _full(value.detach()).to(device).clone()
            elif torch.is_tensor(value):
                view_slot[key] = _full(value.detach()).cpu().clone()  # `step`: a 0-d tensor
            else:
                view_slot[key] = value
        view_optimizer.state[params[name]] = view_slot
    return view, view_optimizer


def _view_optimizer(optimizer: torch.optim.Optimizer, named: dict[str, nn.Parameter],
                    params: dict[str, nn.Parameter]) -> torch.optim.Optimizer:
    """An AdamW over the view's parameters with the same groups (and group options) as `optimizer`."""
    name_of = {id(p): n for n, p in named.items()}
    groups = []
    for group in optimizer.param_groups:
        options = {k: v for k, v in group.items() if k not in ("params", "fused", "foreach", "capturable")}
        groups.append({**options, "params": [params[name_of[id(p)]] for p in group["params"]]})
    return torch.optim.AdamW(groups, lr=optimizer.param_groups[0]["lr"])


def empty_full_tensor_view(model: nn.Module, optimizer: torch.optim.Optimizer | None,
                           device: torch.device | str = "cpu") -> tuple[nn.Module, torch.optim.Optimizer | None]:
    """Like `full_tensor_view`, but uninitialised and without communication: the target a checkpoint is loaded
    into (`distributed_checkpoint.load_checkpoint(dir, [view], view_optimizer, mesh)`), then copied into the
    FSDP2 model with `load_full_tensor_view`."""
    named = dict(model.named_parameters())
    view, params = _mirror(model, torch.device(device), lambda p: p.dtype)
    if optimizer is None:
        return view, None
    return view, _view_optimizer(optimizer, named, params)


@torch.no_grad()
def load_full_tensor_view(model: nn.Module, optimizer: torch.optim.Optimizer | None, view: nn.Module,
                          view_optimizer: torch.optim.Optimizer | None) -> None:
    """Copy TP-local whole tensors (and AdamW state, when the view's optimizer has any) into the FSDP2 model's
    shards and its optimizer. Each rank keeps its own slice; no communication.

    Raises:
        ValueError: the view lacks one of the model's parameters or has another shape.
    """
    named = dict(model.named_parameters())
    view_params = dict(view.named_parameters())
    for name, param in named.items():
        if name not in view_params or tuple(view_params[name].shape) != tuple(param.shape):
            raise ValueError(f"checkpoint tensors for {name} missing or of another shape than the model's "
                             f"{tuple(param.shape)}")
        _copy_into(param, view_params[name])
    if optimizer is None or view_optimizer is None:
        return
    for name, param in named.items():
        saved = view_optimizer.state.get(view_params[name])
        if not saved:
            continue
        slot = {}
        for key, value in saved.items():
            if torch.is_tensor(value) and value.dim() > 0:
                target = torch.empty_like(param.detach())
                _copy_into(target, value)
                slot[key] = target
            else:
                step = value.clone() if torch.is_tensor(value) else torch.tensor(float(value))
                group = next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))
                device = local(param).device
                slot[key] = step.to(device) if group.get("capturable") or group.get("fused") else step
        optimizer.state[param] = slot


def _copy_into(target: torch.Tensor, whole: torch.Tensor) -> None:
    """Copy this rank's slice of `whole` (a plain TP-local tensor) into `target` (a DTensor shard, or plain)."""
    if isinstance(target, DTensor):
        piece = distribute_tensor(whole.to(target.device, target.dtype), target.device_mesh, target.placements,
                                  src_data_rank=None)  # every rank has `whole`: each keeps its slice, no collective
        target.to_local().copy_(piece.to_local())
    else:
        target.copy_(whole.to(target.device, target.dtype))


__all__ = [
    "allreduce_sequence_parallel_grads",
    "clip_grad_norm_",
    "dp_mesh",
    "empty_full_tensor_view",
    "full_tensor_view",
    "grad_norm",
    "is_sharded",
    "load_full_tensor_view",
    "local",
    "local_gradients",
    "mixed_precision_policy",
    "scale_gradients_",
    "set_gradient_sync",
    "shard_model",
]
