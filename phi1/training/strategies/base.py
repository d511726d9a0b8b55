"""The step-strategy interface: how one rank holds its model(s) and takes one optimizer step.

A strategy is the one place where the ways of stepping differ (DDP, DeepSpeed ZeRO, pipeline stages, FSDP2).
The trainer (phi1.training.trainer) never branches on the layout: it asks `build_strategy(context)` (in
`strategies/__init__.py`) for the strategy the config selects and calls it at fixed points:

    strategy = build_strategy(context)      # __init__: build the plain model(s) of this rank (`modules`)
    ...                                      # the checkpointer loads weights into `modules` (resume / init_from)
    strategy.setup()                         # wrap for training, build the optimizer / engine and loss scaler
    ...                                      # the checkpointer restores optimizer state (`optimizer`, `engine`)
    result = strategy.train_step(data, iteration)     # each step: accumulate, sync, clip, decide, update
    with strategy.evaluating():                        # the validator
        loss = strategy.eval_loss(batch)

What a step does is described in each strategy's module docstring; every strategy returns the same StepResult,
so the metrics, validation, checkpoints and the non-finite guard work alike for each of them. The few pieces that
are the same code in several strategies live here, each named for what it does: `micro_batch_loss` (a forward
under autocast), `update_or_skip` (the end of a step with a torch optimizer: skip decision, update, guard, loss
scaler) and `build_loss_scaler`; what differs (wrapping, the micro-batch loop, gradient reduction, the norm)
stays in each strategy's file.
"""

from __future__ import annotations

import contextlib
import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from phi1.training.precision import DynamicLossScaler, NoLossScaler, autocast

if TYPE_CHECKING:
    from phi1.core.config import ModelConfig
    from phi1.parallel.state import ParallelState
    from phi1.training.config import TrainConfig
    from phi1.training.fault_injection import FaultHooks
    from phi1.training.guard import StepGuard
    from phi1.training.schedule import LRSchedule

logger = logging.getLogger("phi1.train")

Batch = dict[str, torch.Tensor]
"""One micro-batch: input_ids (B, T) and labels (B, T) on the CPU (phi1.training.data_loading.collate)."""


@dataclass
class StrategyContext:
    """Everything a strategy is built from; the trainer makes one per run."""

    config: TrainConfig
    """The validated, resolved run config."""
    model_config: ModelConfig
    """The exact architecture (config.model built)."""
    state: ParallelState
    """This rank's place in the layout and its process groups."""
    tokenizer: object
    """The run's tokenizer (its `eod` id marks documents under data.document_mask)."""
    schedule: LRSchedule
    """The learning-rate schedule: `next_lr()` before an update, `step()` after an applied one."""
    guard: StepGuard
    """The non-finite guard component: a strategy reports every step's loss and norm to it."""
    faults: FaultHooks
    """Fault-injection hooks (faults.*); a strategy calls them at the named points of its step."""


@dataclass
class StepResult:
    """What one optimizer step reports; the same numbers on every rank (every rank decides alike)."""

    loss: torch.Tensor
    """Mean loss of the step's micro-batches, averaged over the data-parallel ranks (a 0-dim float32 tensor;
    the trainer converts it to a float only when it logs, so steps do not wait on the device)."""
    lr: float
    """The learning rate of this update (the one it would have had, when skipped)."""
    grad_norm: float
    """Global gradient norm before clipping, over every parameter of the model (all ranks); NaN/Inf when bad."""
    skipped: bool
    """True when no update was applied (non-finite loss or gradients, an fp16 overflow)."""
    loss_scale: float
    """The loss scale the step's backward used (1.0 without fp16 loss scaling)."""


class StepStrategy(ABC):
    """One way of holding the model and stepping it. Subclasses set `name` and register in strategies/__init__.py.

    Attributes the trainer and its components read:
        modules: the plain (unwrapped) models this rank holds: one model for DDP / ZeRO / FSDP, the stage chunks
            under pipeline parallelism. Weights are loaded into them before `setup()`.
        optimizer: the torch optimizer after `setup()`; None where an engine owns it (ZeRO).
        engine: the DeepSpeed engine under ZeRO, else None.
        scaler: the loss scaler (`scale`, `skipped_steps`, `update(skipped)`, `state_dict()`); saved in
            trainer_state.json as "loss_scaler".
        optimizer_kind: one phrase for the start-up line ("torch AdamW (fused)").
    """

    name: ClassVar[str]
    """The registry key ('ddp', 'zero', 'pipeline', 'fsdp')."""

    def __init__(self, context: StrategyContext) -> None:
        """Keep the context and build `modules` (no wrapping, no optimizer yet: weights are loaded first)."""
        self.context = context
        self.config = context.config
        self.state = context.state
        self.device = context.state.device
        self.accum = context.config.grad_accum_steps(context.state.world_size)
        """Micro-batches per optimizer step on this rank."""
        self.modules: list[nn.Module] = self.build_modules()
        self.optimizer: torch.optim.Optimizer | None = None
        self.engine = None
        self.scaler = None
        self.optimizer_kind = ""

    @abstractmethod
    def build_modules(self) -> list[nn.Module]:
        """Build this rank's plain model(s) on `self.device`, configured by `configure_model`."""

    @abstractmethod
    def setup(self) -> None:
        """Wrap `modules` for training and build `optimizer` / `engine` and `scaler` (after weights are loaded)."""

    @abstractmethod
    def train_step(self, data: Iterator[Batch], iteration: int) -> StepResult:
        """One optimizer step over `self.accum` micro-batches drawn from `data`.

        Args:
            data: this rank's micro-batch iterator (phi1.training.data_loading.micro_batches).
            iteration: the 1-based number of this step (the run's iteration after it).

        Raises:
            NonFiniteTrainingError: through `context.guard.stop()`, when the guard says the run must stop.
        """

    @abstractmethod
    def eval_loss(self, batch: Batch) -> torch.Tensor:
        """This rank's loss on one validation micro-batch (not yet averaged over data-parallel ranks), called
        under `evaluating()` and torch.no_grad()."""

    def micro_batch_loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """`model`'s loss on one micro-batch, moved to this rank's device, under the run's autocast (a 0-dim tensor)."""
        input_ids = batch["input_ids"].to(self.device, non_blocking=True)
        labels = batch["labels"].to(self.device, non_blocking=True)
        with autocast(self.config.precision, self.device):
            return model(input_ids, labels=labels).loss

    def update_or_skip(self, iteration: int, loss: torch.Tensor, loss_value: float, norm: float) -> StepResult:
        """The end of a step taken with a torch optimizer (DDP, FSDP2, pipeline), once the gradients are reduced,
        unscaled and clipped and `faults.on_gradients` has run.

        A non-finite loss or norm skips the update (logged; the schedule does not advance), else the learning
        rate is set and the optimizer steps. Then, in this order: `faults.on_update`, the guard observes the step
        (an fp16 overflow the loss scaler can still answer by halving is not a bad step), the loss scaler
        updates, the gradients are zeroed, and the guard stops the run when it must.

        Args:
            iteration: the 1-based number of this step.
            loss: the step's loss as the StepResult reports it (a 0-dim float32 tensor).
            loss_value: the same loss as a Python float; with `norm`, the same on every rank, so every rank
                takes the same decision.
            norm: the global gradient norm before clipping.
        Returns:
            The step's StepResult (with the loss scale this step's backward used).
        Raises:
            NonFiniteTrainingError: through `context.guard.stop()`.
        """
        context, scaler, schedule = self.context, self.scaler, self.context.schedule
        skip = not (math.isfinite(norm) and math.isfinite(loss_value))
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
        context.guard.observe(iteration, loss_value, norm, skip, can_back_off, self.train_model)
        scale_used = scaler.scale
        scaler.update(skip)
        self.optimizer.zero_grad(set_to_none=True)
        if context.guard.must_stop:
            context.guard.stop()
        return StepResult(loss=loss, lr=lr, grad_norm=norm, skipped=skip, loss_scale=scale_used)

    @property
    def train_model(self) -> nn.Module:
        """The module whose parameters this rank saves and checks (`weights_are_finite`, the phi1 checkpoint
        writer): the DDP / DeepSpeed wrapper where there is one (looked through by `.module`), else the model.
        Strategies with several chunks override the users of this (checkpoint format, guard) instead."""
        return self.modules[0]

    @contextlib.contextmanager
    def evaluating(self):
        """Context of a validation pass: modules in eval mode (dropout off), back to train mode after."""
        for module in self.modules:
            module.eval()
        try:
            yield
        finally:
            for module in self.modules:
                module.train()

    def load_model_state(self, weights: dict[str, torch.Tensor], source: str) -> None:
        """Load full (unsharded) weights by phi1 parameter name into `modules` (finetune.init_from); strategies
        whose modules hold a part of the model (pipeline stages) override it to take their part."""
        from phi1.core.pretrained import load_state_dict_into

        for module in self.modules:
            load_state_dict_into(module, weights, source=source)

    def layout_state(self) -> dict:
        """The layout keys of trainer_state.json (the phi1 format resumes only at the TP size that wrote it)."""
        s = self.state
        return {"world_size": s.world_size, "tensor_parallel": s.tp_size, "data_parallel": s.dp_size}

    def layout_phrase(self) -> str:
        """The layout part of the start-up line."""
        s = self.state
        return f"tensor parallel {s.tp_size} x data parallel {s.dp_size}"


def build_model(context: StrategyContext) -> nn.Module:
    """The whole PhiForCausalLM of this TP rank, initialised from config.seed and configured (`configure_model`)."""
    from phi1.core.model import PhiForCausalLM

    config, state = context.config, context.state
    model = PhiForCausalLM(context.model_config, tp_group=state.tp_group,
                           sequence_parallel=config.parallel.sequence_parallel, init_seed=config.seed)
    return configure_model(model, context)


def configure_model(model: nn.Module, context: StrategyContext) -> nn.Module:
    """Apply the run's model options to a freshly built PhiForCausalLM (or stage chunk) and move it to the device.

    Activation checkpointing, the chunked loss, the document mask, the fused kernels (built or found cached now,
    before any data is read: a failed build is a warning at start-up, not a crash mid-run) and torch.compile of
    the blocks (compiled at the first step, whose time the trainer logs as compile time).
    """
    from phi1.ops import prepare as prepare_fused_ops

    config = context.config
    model.activation_checkpointing = config.activation_checkpointing
    model.activation_checkpointing_every = config.activation_checkpointing_every
    model.loss_chunk_size = config.loss_chunk_size
    if config.data.document_mask:
        model.document_eod_token_id = context.tokenizer.eod
    model.to(context.state.device)
    model.fused_ops = prepare_fused_ops(context.state.device, config.fused_ops)
    if config.compile:
        model.compile_blocks()
    return model


def build_loss_scaler(config: TrainConfig) -> DynamicLossScaler | NoLossScaler:
    """fp16: the dynamic loss scaler loss_scale.* configures; otherwise the scale-1 one that only counts skips."""
    if config.precision == "fp16":
        ls = config.loss_scale
        return DynamicLossScaler(scale=ls.initial_scale, growth_interval=ls.growth_interval, min_scale=ls.min_scale)
    return NoLossScaler()


def dp_mean(value: torch.Tensor, state: ParallelState) -> torch.Tensor:
    """`value` averaged over the data-parallel group (a copy; `value` itself when dp_size == 1)."""
    import torch.distributed as dist

    if state.dp_size > 1:
        value = value.clone()
        dist.all_reduce(value, group=state.dp_group)
        value /= state.dp_size
    return value


__all__ = ["Batch", "StepResult", "StepStrategy", "StrategyContext", "build_loss_scaler", "build_model",
           "configure_model", "dp_mean"]
