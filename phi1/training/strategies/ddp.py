"""The DDP step strategy: one whole model per rank (its TP shard), torch DDP over the data-parallel group (or the
plain model in a single data-parallel replica), torch AdamW, fp16 dynamic loss scaling.

One step:

    for each of `accum` micro-batches:   forward under autocast -> (loss x scale / accum).backward()
                                         (DDP all-reduces only after the last one: no_sync before)
    sequence-parallel grads all-reduced over TP -> unscale (fp16) -> global-norm clip (TP-aware)
    non-finite norm or loss: skip the update (the schedule does not advance); else set the lr and step AdamW
    the guard counts bad steps (an fp16 overflow the scaler can still answer by halving the scale is not one)
    and stops the run after guard.max_consecutive_nonfinite in a row (phi1.training.guard)
    the loss scaler halves on a skipped step, doubles after loss_scale.growth_interval clean ones

The loss returned is the mean of the step's micro-batch losses averaged over the data-parallel ranks, so
DP = 2 logs the same numbers as one process on the same global batch. The gradient norm is the same number on
every rank (TP-aware, after the DP all-reduce), so every rank takes the same skip decision.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator

import torch
from torch import nn

from phi1.parallel.data_parallel import wrap_data_parallel
from phi1.parallel.grads import allreduce_sequence_parallel_grads, clip_grad_norm_, grad_norm
from phi1.training.optimizer import build_adamw
from phi1.training.precision import DynamicLossScaler, NoLossScaler, autocast
from phi1.training.strategies.base import Batch, StepResult, StepStrategy, build_model, dp_mean

logger = logging.getLogger("phi1.train")


class DDPStrategy(StepStrategy):
    """Data parallelism by torch DDP, with TP / SP inside each replica."""

    name = "ddp"

    def build_modules(self) -> list[nn.Module]:
        return [build_model(self.context)]

    @property
    def model(self) -> nn.Module:
        """The plain model (what is saved, loaded and evaluated)."""
        return self.modules[0]

    def setup(self) -> None:
        config = self.config
        self.wrapped = wrap_data_parallel(self.model, self.state, bucket_cap_mb=config.parallel.ddp_bucket_mb)
        """The DDP wrapper, or the model itself when dp_size == 1."""
        self.optimizer, self.optimizer_kind = build_adamw(self.model, config.optim, self.device)
        if config.precision == "fp16":
            ls = config.loss_scale
            self.scaler = DynamicLossScaler(scale=ls.initial_scale, growth_interval=ls.growth_interval,
                                            min_scale=ls.min_scale)
        else:
            self.scaler = NoLossScaler()

    @property
    def train_model(self) -> nn.Module:
        return self.wrapped

    def _forward(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        input_ids = batch["input_ids"].to(self.device, non_blocking=True)
        labels = batch["labels"].to(self.device, non_blocking=True)
        with autocast(self.config.precision, self.device):
            return model(input_ids, labels=labels).loss

    def train_step(self, data: Iterator[Batch], iteration: int) -> StepResult:
        context, scaler, accum = self.context, self.scaler, self.accum
        model, inner = self.wrapped, self.model
        ddp = model is not inner
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float32)
        for micro in range(accum):
            batch = next(data)
            sync = model.no_sync() if ddp and micro < accum - 1 else contextlib.nullcontext()
            with sync:
                loss = self._forward(model, batch)
                (loss * (scaler.scale / accum)).backward()
            loss_sum += loss.detach().float()
        allreduce_sequence_parallel_grads(inner, self.state)
        if scaler.scale != 1.0:
            grads = [p.grad for p in inner.parameters() if p.grad is not None]
            torch._foreach_mul_(grads, 1.0 / scaler.scale)
        context.faults.on_gradients(iteration, self.modules)
        clip = self.config.optim.grad_clip
        norm = clip_grad_norm_(inner, clip, self.state) if clip > 0 else grad_norm(inner, self.state)
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
        return self._forward(self.model, batch)


__all__ = ["DDPStrategy"]
