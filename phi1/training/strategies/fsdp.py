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

Weights are loaded into the plain model before `setup()` shards it (every DP rank then keeps its slice), the
optimizer state after; checkpoints are written in the any-layout DCP format (phi1.training.checkpoint_dcp), which
takes FSDP2's DTensor parameters and moments, so a run saved under FSDP2 resumes at any TP / PP / DP layout and
the reverse. The loss returned is the DP mean of the step's micro-batch losses, as under DDP.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator

import torch
from torch import nn

from phi1.parallel import fsdp
from phi1.training.optimizer import build_adamw
from phi1.training.precision import DynamicLossScaler, NoLossScaler, autocast
from phi1.training.strategies.base import Batch, StepResult, StepStrategy, build_model, dp_mean

logger = logging.getLogger("phi1.train")


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
        if config.precision == "fp16":
            ls = config.loss_scale
            self.scaler = DynamicLossScaler(scale=ls.initial_scale, growth_interval=ls.growth_interval,
                                            min_scale=ls.min_scale)
        else:
            self.scaler = NoLossScaler()

    def _forward(self, batch: Batch) -> torch.Tensor:
        input_ids = batch["input_ids"].to(self.device, non_blocking=True)
        labels = batch["labels"].to(self.device, non_blocking=True)
        with autocast(self.config.precision, self.device):
            return self.model(input_ids, labels=labels).loss

    def train_step(self, data: Iterator[Batch], iteration: int) -> StepResult:
        context, scaler, accum, model = self.context, self.scaler, self.accum, self.model
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float32)
        for micro in range(accum):
            batch = next(data)
            fsdp.set_gradient_sync(model, micro == accum - 1)
            loss = self._forward(batch)
            (loss * (scaler.scale / accum)).backward()
            loss_sum += loss.detach().float()
        fsdp.allreduce_sequence_parallel_grads(model, self.state.tp_group)
        if scaler.scale != 1.0:
            fsdp.scale_gradients_(model, 1.0 / scaler.scale)
        context.faults.on_gradients(iteration, self.modules)
        clip = self.config.optim.grad_clip
        norm = fsdp.clip_grad_norm_(model, clip, self.state) if clip > 0 else fsdp.grad_norm(model, self.state)
        loss = dp_mean(loss_sum / accum, self.state)
        loss_value = float(loss)  # the same on every rank (DP mean), as the norm is: every rank decides alike
        skip = not (math.isfinite(norm) and math.isfinite(loss_value))
        schedule = context.schedule
        lr = schedule.next_lr()
        if skip:
            logger.warning("iteration %d: loss %s, gradient norm %s, step skipped (loss scale %g)",
                           iteration, loss_value, norm, scaler.scale)
        else:
            schedule.apply(self.optimizer)
            self.optimizer.step()
            schedule.step()
        context.faults.on_update(iteration, self.modules)
        can_back_off = self.config.precision == "fp16" and scaler.scale > getattr(scaler, "min_scale", 1.0)
        context.guard.observe(iteration, loss_value, norm, skip, can_back_off, model)
        scale_used = scaler.scale
        scaler.update(skip)
        self.optimizer.zero_grad(set_to_none=True)
        if context.guard.must_stop:
            context.guard.stop()
        return StepResult(loss=loss, lr=lr, grad_norm=norm, skipped=skip, loss_scale=scale_used)

    def eval_loss(self, batch: Batch) -> torch.Tensor:
        return self._forward(batch)

    def layout_phrase(self) -> str:
        s = self.state
        offload = ", CPU offload" if self.config.parallel.fsdp_cpu_offload else ""
        return f"tensor parallel {s.tp_size} x data parallel {s.dp_size} (FSDP2{offload})"


__all__ = ["FSDPStrategy"]
