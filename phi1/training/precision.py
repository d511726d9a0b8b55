"""Mixed precision: the autocast context of each precision and fp16's dynamic loss scaler.

Parameters, gradients and optimizer states stay fp32 (the master copy); the forward and backward run under
autocast in bf16 or fp16. bf16 has fp32's exponent range and needs no scaling. fp16 overflows above 65504 and
loses small gradients below ~6e-8, so the loss is multiplied by a scale before backward and the gradients are
divided by it before the update; a step whose gradients are not finite is skipped and the scale halved, and
after `growth_interval` clean steps the scale doubles again.

Which precisions a device runs (`precision_problem`, `resolve_precision`; checked by
phi1.training.config.validate_config before anything starts, and by `--dry-run`):

- CUDA: fp32 and fp16 everywhere; bf16 where the GPU computes it (compute capability 8.0 and later: A100,
  H100, L4, ...; `torch.cuda.is_bf16_supported()`). 'auto' is bf16 there, else fp16 with loss scaling.
- CPU: fp32, and bf16 (torch's CPU autocast runs it, under DDP and under DeepSpeed ZeRO alike, natively on
  CPUs with AVX512-BF16 / AMX). fp16 is refused: DeepSpeed stops with "Type fp16 is not supported on your
  device", and under DDP torch emulates fp16 matmuls, which is slower than fp32 and buys nothing, since loss
  scaling exists to work around GPU fp16's range. 'auto' is fp32.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
PRECISIONS = ("fp32", "bf16", "fp16")
# What a CPU rank trains in (see the module docstring for why fp16 is not among them).
CPU_PRECISIONS = ("fp32", "bf16")


def default_device_type() -> str:
    """'cuda' when this machine has a CUDA device (what phi1.parallel.state picks), else 'cpu'."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def _cuda_has_bf16() -> bool:
    """bf16 on this machine's GPU; a machine without one is planning for a current GPU, which has it."""
    if not torch.cuda.is_available():
        return True
    return bool(torch.cuda.is_bf16_supported())


def resolve_precision(precision: str, device_type: str) -> str:
    """The concrete precision 'auto' means on `device_type` ('cpu' or 'cuda'); other choices unchanged."""
    if precision != "auto":
        return precision
    if device_type == "cuda":
        return "bf16" if _cuda_has_bf16() else "fp16"
    return "fp32"


def precision_problem(precision: str, device_type: str) -> str | None:
    """Why `precision` cannot run on `device_type`, as a phrase with what to do instead; None when it can."""
    if device_type == "cpu" and precision not in CPU_PRECISIONS:
        return (f"{precision} cannot train on a CPU (DeepSpeed refuses it and torch only emulates it, slower "
                f"than fp32); use precision=auto (fp32 on CPU) or one of {CPU_PRECISIONS}")
    if device_type == "cuda" and precision == "bf16" and not _cuda_has_bf16():
        name = torch.cuda.get_device_name()
        return (f"bf16 needs a GPU of compute capability 8.0 or later, and this {name} is older; use "
                "precision=auto (fp16 with loss scaling here) or fp16")
    return None


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context for `precision` on `device` (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[precision])


@dataclass
class DynamicLossScaler:
    """Loss scale for fp16: halved on overflow (not below `min_scale`), doubled after `growth_interval` clean steps."""

    scale: float = 2.0**16
    """Current loss scale."""
    growth_interval: int = 1000
    """Clean steps before the scale doubles."""
    min_scale: float = 1.0
    """Floor of the scale."""
    clean_steps: int = 0
    """Clean steps since the last change."""
    skipped_steps: int = 0
    """Steps skipped for overflow in the whole run."""

    def update(self, overflow: bool) -> None:
        """Account for one step: `overflow` means its gradients were not finite and it was skipped."""
        if overflow:
            self.scale = max(self.min_scale, self.scale / 2.0)
            self.clean_steps = 0
            self.skipped_steps += 1
            return
        self.clean_steps += 1
        if self.clean_steps >= self.growth_interval:
            self.scale *= 2.0
            self.clean_steps = 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "growth_interval": self.growth_interval, "min_scale": self.min_scale,
                "clean_steps": self.clean_steps, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict) -> None:
        self.skipped_steps = int(state.get("skipped_steps", 0))
        if "clean_steps" not in state:
            # Saved by a run without loss scaling (fp32 or bf16, scale 1): continuing in fp16 starts from the
            # initial scale, as a new fp16 run does, rather than at 1, where small gradients underflow.
            return
        self.scale = float(state["scale"])
        self.clean_steps = int(state["clean_steps"])


class NoLossScaler:
    """fp32 and bf16: scale 1; steps with a non-finite gradient norm are still skipped and counted."""

    scale = 1.0

    def __init__(self) -> None:
        self.skipped_steps = 0

    def update(self, overflow: bool) -> None:
        self.skipped_steps += int(overflow)

    def state_dict(self) -> dict:
        return {"scale": 1.0, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict) -> None:
        self.skipped_steps = int(state.get("skipped_steps", 0))
