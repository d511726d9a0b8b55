"""DeepSpeed ZeRO (stages 1, 2, 3) over the DP group, configured from phi1's own settings.

`deepspeed_config` builds DeepSpeed's config dict from typed arguments (no hand-kept JSON); `initialize_zero`
hands the model, phi1's parameter groups and a torch AdamW factory to `deepspeed.initialize` on the process
groups phi1 already built. Under ZeRO the optimizer step, gradient clipping and loss scaling are DeepSpeed's:
the training loop calls `engine.backward(loss)` and `engine.step()`.

On CPU set `DS_ACCELERATOR=cpu` before deepspeed is first imported. torch's AdamW is used rather than
DeepSpeed's fused CPU/GPU Adam so that nothing has to be compiled.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from phi1.parallel.layers import tensor_parallel_dims
from phi1.parallel.optim import param_groups
from phi1.parallel.state import ParallelState

PRECISIONS = ("fp32", "bf16", "fp16")


def deepspeed_config(
    *,
    zero_stage: int,
    micro_batch_size: int,
    grad_accum_steps: int,
    dp_size: int,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    grad_clip: float,
    precision: str,
    loss_scale_window: int = 1000,
    initial_scale_power: int = 16,
) -> dict:
    """DeepSpeed's config dict for ZeRO `zero_stage`.

    The optimizer itself is passed to `deepspeed.initialize` by `initialize_zero`; lr, betas, eps and
    weight_decay are recorded here under "optimizer" only so that the dict saved beside a checkpoint describes
    the run, and are read back by `initialize_zero`. grad_clip 0 disables clipping. fp16 uses dynamic loss
    scaling starting at 2**initial_scale_power, halved on overflow and doubled after `loss_scale_window` clean
    steps.

    Raises:
        ValueError: naming the argument that is out of range.
    """
    if zero_stage not in (1, 2, 3):
        raise ValueError(f"zero_stage must be 1, 2 or 3, got {zero_stage!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    for name, value in (("micro_batch_size", micro_batch_size), ("grad_accum_steps", grad_accum_steps), ("dp_size", dp_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if lr <= 0 or eps <= 0 or weight_decay < 0 or grad_clip < 0:
        raise ValueError(f"need lr > 0, eps > 0, weight_decay >= 0, grad_clip >= 0; got {lr=}, {eps=}, {weight_decay=}, {grad_clip=}")
    zero: dict[str, Any] = {
        "stage": zero_stage,
        "overlap_comm": False,  # the overlap path relies on accelerator streams; on CPU it only adds copies
        "contiguous_gradients": True,
        "reduce_bucket_size": 50_000_000,
    }
    if zero_stage == 3:
        # Tiny models: gather every layer on use rather than prefetching by size thresholds tuned for GPUs.
        zero.update({"stage3_param_persistence_threshold": 0, "stage3_prefetch_bucket_size": 0})
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        "train_batch_size": micro_batch_size * grad_accum_steps * dp_size,
        "gradient_clipping": float(grad_clip),
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # torch AdamW, see the module docstring
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": lr, "betas": list(betas), "eps": eps, "weight_decay": weight_decay},
        },
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {
            "enabled": precision == "fp16",
            "loss_scale": 0,  # 0 = dynamic
            "loss_scale_window": loss_scale_window,
            "initial_scale_power": initial_scale_power,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


class _ModelParallelUnit:
    """The `mpu` object DeepSpeed asks for the TP ("model parallel") and DP groups of a ParallelState."""

    def __init__(self, state: ParallelState) -> None:
        self.state = state

    def get_model_parallel_group(self):
        return self.state.tp_group

    def get_model_parallel_rank(self) -> int:
        return self.state.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.state.tp_size

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.state.rank - self.state.tp_rank  # TP ranks are adjacent

    def get_data_parallel_group(self):
        return self.state.dp_group

    def get_data_parallel_rank(self) -> int:
        return self.state.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.state.dp_size

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(range(self.state.tp_rank, self.state.world_size, self.state.tp_size))


def _skip_shared_memory_allreduce_build(deepspeed) -> None:
    """Keep DeepSpeed's CPU backend from JIT-compiling its shared-memory all-reduce.

    That op serves only DeepSpeed's inference all-reduce; ZeRO training communicates through torch.distributed.
    On a machine without a warm torch-extensions cache the build costs minutes of g++ on every rank (measured:
    2.5 min on a 2-core machine), so it is marked incompatible before the comm backend is created.
    """
    compatible = getattr(deepspeed.ops, "__compatible_ops__", None)
    if isinstance(compatible, dict):
        compatible["deepspeed_shm_comm"] = False


def _reduce_sequence_parallel_grads_in_backward(model: nn.Module, state: ParallelState) -> None:
    """Hook each sequence-parallel parameter so that its gradient is summed over the TP group as it is produced,
    before DeepSpeed's own gradient hooks (which run after accumulation) reduce it over DP."""
    if not getattr(model, "sequence_parallel", False) or state.tp_size == 1:
        return
    params = dict(model.named_parameters())

    def all_reduce_over_tp(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, group=state.tp_group)
        return grad

    for name in model.sequence_parallel_param_names():
        params[name].register_hook(all_reduce_over_tp)


def initialize_zero(model: nn.Module, ds_config: dict, state: ParallelState):
    """Wrap `model` in a DeepSpeed engine running ZeRO over `state.dp_group`.

    torch.distributed must already be initialised (by `init_distributed`); DeepSpeed is told not to initialise
    it again. Tensor-parallel shards are tagged `tensor_model_parallel` so that DeepSpeed's clipping counts
    them on every TP rank and replicated parameters once. Under sequence parallelism the TP all-reduce of the
    sequence-parallel gradients runs inside the backward (ZeRO reduces and partitions gradients there, before
    the loop could call `allreduce_sequence_parallel_grads`; do not call it with ZeRO).

    Args:
        model: the PhiForCausalLM (not DDP-wrapped), on `state.device`.
        ds_config: from `deepspeed_config`.
        state: from `init_distributed`.
    Returns:
        The DeepSpeedEngine; `.module` is the model.
    Raises:
        ValueError: a config without "optimizer" params.
    """
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if state.device.type == "cuda" else "cpu")
    import deepspeed  # imported here: it is heavy and only ZeRO runs need it

    if state.device.type == "cpu":
        _skip_shared_memory_allreduce_build(deepspeed)

    _reduce_sequence_parallel_grads_in_backward(model, state)
    try:
        opt = ds_config["optimizer"]["params"]
    except KeyError:
        raise ValueError("ds_config has no optimizer params; build it with phi1.parallel.zero.deepspeed_config") from None
    dims = tensor_parallel_dims(model)
    for name, param in model.named_parameters():
        param.tensor_model_parallel = dims[name] is not None and state.tp_size > 1
    groups = param_groups(model, opt["weight_decay"])
    for group in groups:
        group.pop("name")  # DeepSpeed's ZeRO copies group keys into its own groups; keep only optimizer keys
    config = {k: v for k, v in ds_config.items() if k != "optimizer"}

    def make_optimizer(params) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=opt["lr"], betas=tuple(opt["betas"]), eps=opt["eps"], foreach=False)

    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=groups,
        optimizer=make_optimizer,
        config=config,
        mpu=_ModelParallelUnit(state) if state.tp_size > 1 else None,
        dist_init_required=False,
    )
    return engine
