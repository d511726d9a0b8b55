"""The FSDP2 step strategy (`parallel.fsdp=true`): PyTorch's `fully_shard` over the data-parallel group, each
block and then the root (phi1.parallel.fsdp), composed with tensor parallelism; torch AdamW over the sharded
parameters (fp32 master weights), fp16 dynamic loss scaling when precision is fp16.

One step:

    for each of `accum` micro-batches:   forward (blocks all-gathered in the compute dtype just in time)
                                         -> (loss x scale / accum).backward()
                                         (gradients reduce-scattered in fp32 after the last micro-batch only)
    sequence-parallel grads all-reduced over TP (on the local shards) -> unscale (fp16)
    global-norm clip over the sharded gradients (summed over DP and, for TP-split parameters, over TP)
    non-finite norm or loss: skip the update; else set the lr and step AdamW on the shards
    the guard counts bad steps and stops the run after guard.max_consecutive_nonfinite in a row
    (from the skip decision on: `StepStrategy.update_or_skip` in strategies/base.py, as under DDP)

Weights are loaded into the plain model before `setup()` shards it (every DP rank then keeps its slice), the
optimizer state after; checkpoints are written in the any-layout DCP format (phi1.training.checkpoint_dcp), which
takes FSDP2's DTensor parameters and moments, so a run saved under FSDP2 resumes at any TP / PP / DP layout and
the reverse. The loss returned is the DP mean of the step's micro-batch losses, as under DDP.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from phi1.parallel import fsdp
from phi1.training.optimizer import build_adamw
from phi1.training.strategies.base import (
    Batch,
    StepResult,
    StepStrategy,
    build_loss_scaler,
    build_model,
    dp_mean,
)


class FSDPStrategy(StepStrategy):
    """Fully sharded data parallelism (FSDP2) over the DP group, with TP / SP inside each TP group."""

    name = "fsdp"

    def build_modules(self) -> list[nn.Module]:
        return [build_model(self.context)]

    @property
    def model(self) -> nn.Module:
        """The model: plain until `setup()`, then the FSDP2 module itself (fully_shard works in place)."""
        return self.modules[0]

    def setup(self) -> None:
        config = self.config
        offload = bool(config.parallel.fsdp_cpu_offload)
        fsdp.shard_model(self.model, self.state, config.precision, cpu_offload=offload)
        # Offloaded shards (and so the optimizer state) live in CPU memory: the optimizer steps there.
        self.optimizer, kind = build_adamw(self.model, config.optim, torch.device("cpu") if offload else self.device)
        self.optimizer_kind = f"{kind} over FSDP2 shards" + (" (CPU offload)" if offload else "")
        self.scaler = build_loss_scaler(config)

    def train_step(self, data: Iterator[Batch], iteration: int) -> StepResult:
        scaler, accum, model = self.scaler, self.accum, self.model
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float32)
        for micro in range(accum):
            batch = next(data)
            # Gradients are reduce-scattered over DP in the backward of the last micro-batch only.
            fsdp.set_gradient_sync(model, micro == accum - 1)
            loss = self.micro_batch_loss(model, batch)
            (loss * (scaler.scale / accum)).backward()
            loss_sum += loss.detach().float()
        fsdp.allreduce_sequence_parallel_grads(model, self.state.tp_group)
        if scaler.scale != 1.0:
            fsdp.scale_gradients_(model, 1.0 / scaler.scale)
        self.context.faults.on_gradients(iteration, self.modules)
        clip = self.config.optim.grad_clip
        norm = fsdp.clip_grad_norm_(model, clip, self.state) if clip > 0 else fsdp.grad_norm(model, self.state)
        loss = dp_mean(loss_sum / accum, self.state)
        loss_value = float(loss)  # the same on every rank (DP mean), as the norm is: every rank decides alike
        return self.update_or_skip(iteration, loss, loss_value, norm)

    def eval_loss(self, batch: Batch) -> torch.Tensor:
        return self.micro_batch_loss(self.model, batch)

    def layout_phrase(self) -> str:
        s = self.state
        offload = ", CPU offload" if self.config.parallel.fsdp_cpu_offload else ""
        return f"tensor parallel {s.tp_size} x data parallel {s.dp_size} (FSDP2{offload})"


__all__ = ["FSDPStrategy"]
