"""Learning-rate schedule: linear warmup to the peak, then linear (or cosine) decay to a floor.

Steps are counted in applied optimizer updates, 1-based: update `s` uses `lr_at(s)`. Warmup reaches the peak
at update `warmup_steps`; the decay reaches `min_lr` at update `train_steps`. An fp16 step skipped for overflow
does not advance the schedule (as in Megatron-LM), so the peak and the floor are hit after the same number of
real updates whatever the overflows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class LRSchedule:
    """The closed form of the schedule, and the count of updates applied so far."""

    lr: float
    """Peak learning rate."""
    min_lr: float
    """Floor at the end of the decay."""
    warmup_steps: int
    """Updates of linear warmup from 0."""
    train_steps: int
    """Update at which the decay reaches min_lr."""
    decay: str = "linear"
    """'linear', 'cosine' or 'constant' (stay at the peak after warmup)."""
    num_updates: int = 0
    """Updates applied so far (saved in checkpoints)."""

    def lr_at(self, step: int) -> float:
        """Learning rate of the `step`-th update (1-based)."""
        if self.warmup_steps > 0 and step <= self.warmup_steps:
            return self.lr * step / self.warmup_steps
        if self.decay == "constant" or self.train_steps <= self.warmup_steps:
            return self.lr
        progress = min(1.0, (step - self.warmup_steps) / (self.train_steps - self.warmup_steps))
        if self.decay == "linear":
            return self.min_lr + (self.lr - self.min_lr) * (1.0 - progress)
        if self.decay == "cosine":
            return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
        raise ValueError(f"schedule.decay: unknown decay {self.decay!r}")

    def next_lr(self) -> float:
        """The learning rate the coming update will use."""
        return self.lr_at(self.num_updates + 1)

    def apply(self, optimizer: torch.optim.Optimizer) -> float:
        """Write the coming update's learning rate into every parameter group; return it."""
        lr = self.next_lr()
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    def step(self) -> None:
        """Record one applied update."""
        self.num_updates += 1

    def state_dict(self) -> dict:
        return {"num_updates": self.num_updates, "lr": self.lr, "min_lr": self.min_lr,
                "warmup_steps": self.warmup_steps, "train_steps": self.train_steps, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        """Restore the update count; the shape of the schedule comes from the current config."""
        self.num_updates = int(state["num_updates"])
