"""The ZeRO step strategy: DeepSpeed's engine (ZeRO stage 1, 2 or 3 over the data-parallel group) does the
gradient accumulation, the reduction, the clipping, the loss scaling and the update; phi1 sets the learning rate.

One step:

    lr := schedule.next_lr()
    for each of `accum` micro-batches:   loss = engine(batch) -> engine.backward(loss) -> engine.step()
                                         (the engine steps the optimizer at the last micro-batch only, with the
                                         lr phi1 wrote into its param groups just before)
    skipped := the engine's skipped-step counter moved (an fp16 overflow: DeepSpeed halves its scale)
    the schedule advances when the update was applied

DeepSpeed holds the weights in bf16 / fp16 itself, so the forward runs without autocast. DeepSpeed skips only
fp16 overflows: a step with a non-finite loss, or a non-finite norm it did not skip, has already updated the
weights, so the guard stops the run at once and the last checkpoint is what is left to resume from
(phi1.training.guard). The faults that poison gradients or weights are refused under ZeRO
(phi1.training.fault_injection.check_supported).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn

from phi1.training.precision import NoLossScaler
from phi1.training.strategies.base import Batch, StepResult, StepStrategy, build_model, dp_mean


class ZeroStrategy(StepStrategy):
    """DeepSpeed ZeRO-1/2/3 (phi1.parallel.zero) with TP / SP inside each replica."""

    name = "zero"

    def build_modules(self) -> list[nn.Module]:
        return [build_model(self.context)]

    def setup(self) -> None:
        from phi1.parallel.zero import deepspeed_config, initialize_zero

        config, state = self.config, self.state
        ds_config = deepspeed_config(
            zero_stage=config.parallel.zero_stage, micro_batch_size=config.batch.micro_batch_size,
            grad_accum_steps=self.accum, dp_size=state.dp_size, lr=config.optim.lr, betas=tuple(config.optim.betas),
            eps=config.optim.eps, weight_decay=config.optim.weight_decay, grad_clip=config.optim.grad_clip,
            precision=config.precision, loss_scale_window=config.loss_scale.growth_interval,
            initial_scale_power=int(round(math.log2(config.loss_scale.initial_scale))),
        )
        self.engine = initialize_zero(self.modules[0], ds_config, state)
        self.optimizer, self.optimizer_kind = None, "DeepSpeed ZeRO (torch AdamW)"
        # DeepSpeed scales fp16 losses itself; this one only counts the skipped steps for the metrics.
        self.scaler = NoLossScaler()

    @property
    def train_model(self) -> nn.Module:
        return self.engine

    @contextlib.contextmanager
    def evaluating(self):
        self.engine.eval()
        try:
            yield
        finally:
            self.engine.train()

    def _forward(self, batch: Batch) -> torch.Tensor:
        input_ids = batch["input_ids"].to(self.device, non_blocking=True)
        labels = batch["labels"].to(self.device, non_blocking=True)
        return self.engine(input_ids, labels=labels).loss  # DeepSpeed already holds the weights in bf16 / fp16

    def train_step(self, data: Iterator[Batch], iteration: int) -> StepResult:
        engine, context, accum = self.engine, self.context, self.accum
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float32)
        skipped_before = engine.skipped_steps
        lr = context.schedule.next_lr()
        scale_used = float(getattr(engine.optimizer, "loss_scale", 1.0) or 1.0)
        for micro in range(accum):
            loss = self._forward(next(data))
            engine.backward(loss)
            if micro == accum - 1:
                for group in engine.optimizer.param_groups:
                    group["lr"] = lr
            engine.step()
            loss_sum += loss.detach().float()
        skipped = engine.skipped_steps > skipped_before
        if not skipped:
            context.schedule.step()
        self.scaler.update(skipped)
        norm = engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        loss = dp_mean(loss_sum / accum, self.state)
        loss_value = float(loss)
        guard = context.guard
        if not math.isfinite(loss_value) or (skipped and not math.isfinite(norm)):
            # No fp16 back-off is left to phi1 here (DeepSpeed owns the scale): a non-finite step is bad.
            guard.observe(iteration, loss_value, norm, True, False, engine)
            # DeepSpeed skips only fp16 overflows; any other non-finite step has already updated the weights,
            # so the run stops at once and the last checkpoint is what is left to resume from.
            if guard.must_stop or not skipped:
                guard.stop()
        else:
            guard.record_good(iteration, loss_value, norm)
        return StepResult(loss=loss, lr=lr, grad_norm=norm, skipped=skipped, loss_scale=scale_used)

    def eval_loss(self, batch: Batch) -> torch.Tensor:
        return self._forward(batch)


__all__ = ["ZeroStrategy"]
