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

The micro-batch loop and the gradient work are here; from the skip decision on, the step ends as the FSDP2 and
pipeline steps do, in `StepStrategy.update_or_skip` (strategies/base.py).

The loss returned is the mean of the step's micro-batch losses averaged over the data-parallel ranks, so
DP = 2 logs the same numbers as one process on the same global batch. The gradient norm is the same number on
every rank (TP-aware, after the DP all-reduce), so every rank takes the same skip decision.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from phi1.parallel.data_parallel import wrap_data_parallel
from phi1.parallel.grads import allreduce_sequence_parallel_grads, clip_grad_norm_, grad_norm
from phi1.training.optimizer import build_adamw
from phi1.training.strategies.base import (
    Batch,
    StepResult,
    StepStrategy,
    build_loss_scaler,
    build_model,
    dp_mean,
)


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
        self.scaler = build_loss_scaler(config)

    @property
    def train_model(self) -> nn.Module:
        return self.wrapped

    def train_step(self, data: Iterator[Batch], iteration: int) -> StepResult:
        scaler, accum = self.scaler, self.accum
        model, inner = self.wrapped, self.model
        ddp = model is not inner
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float32)
        for micro in range(accum):
            batch = next(data)
            # DDP all-reduces the gradients in the backward of the last micro-batch only.
            sync = model.no_sync() if ddp and micro < accum - 1 else contextlib.nullcontext()
            with sync:
                loss = self.micro_batch_loss(model, batch)
                (loss * (scaler.scale / accum)).backward()
            loss_sum += loss.detach().float()
        allreduce_sequence_parallel_grads(inner, self.state)
        if scaler.scale != 1.0:
            grads = [p.grad for p in inner.parameters() if p.grad is not None]
            torch._foreach_mul_(grads, 1.0 / scaler.scale)
        self.context.faults.on_gradients(iteration, self.modules)
        clip = self.config.optim.grad_clip
        norm = clip_grad_norm_(inner, clip, self.state) if clip > 0 else grad_norm(inner, self.state)
        loss = dp_mean(loss_sum / accum, self.state)
        loss_value = float(loss)  # the same on every rank (DP mean), as the norm is: every rank decides alike
        return self.update_or_skip(iteration, loss, loss_value, norm)

    def eval_loss(self, batch: Batch) -> torch.Tensor:
        return self.micro_batch_loss(self.model, batch)


__all__ = ["DDPStrategy"]
