"""Mixed precision: the autocast context of each precision and fp16's dynamic loss scaler.

Parameters, gradients and optimizer states stay fp32 (the master copy); the forward and backward run under
autocast in bf16 or fp16. bf16 has fp32's exponent range and needs no scaling. fp16 overflows above 65504 and
loses small gradients below ~6e-8, so the loss is multiplied by a scale before backward and the gradients are
divided by it before the update; a step whose gradients are not finite is skipped and the scale halved, and
after `growth_interval` clean steps the scale doubles again.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


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
        self.scale = float(state["scale"])
        self.clean_steps = int(state["clean_steps"])
        self.skipped_steps = int(state["skipped_steps"])


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
        self.skipped_steps = int(state["skipped_steps"])
