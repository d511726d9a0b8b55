"""The trainer: a run assembled from components, each owning one concern, and `train(config)`, its entry.

    strategy        phi1.training.strategies     the model(s) of this rank, the optimizer and one step (DDP,
                                                 ZeRO, pipeline, ...), chosen from the config by the registry
    data            phi1.training.data_loading   datasets, each rank's micro-batch iterator
    checkpointer    phi1.training.checkpointer   when to save, the trainer state, resume and restore
    metrics         phi1.training.metrics        interval records and console lines, sinks, profiler
    validator       phi1.training.validator      the validation loss, last and best
    guard           phi1.training.guard          non-finite steps and weights: count, diagnose, stop
    faults          phi1.training.fault_injection  the faults.* hooks (tests of the recovery paths)

The trainer only calls them, in this order. Setup: seed, tokenizer, strategy (builds the plain model), resume
weights (or finetune.init_from) into it, strategy.setup() (wrap, optimizer), restore of the optimizer and
counters, datasets, sinks, and last the RNG states, so that nothing draws a random number between the restore
and the first step (a resumed run is bit-identical to an uninterrupted one). Each step:

    result = strategy.train_step(data, iteration)    (accumulate, sync, clip, skip or update, guard)
    faults.after_step -> metrics (every logging.interval) -> validator (every eval.interval)
    -> checkpointer.save_if_due (every checkpoint.interval, the end, checkpoint.exit_at_iteration)
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from phi1.core.config import PRESETS, ModelConfig
from phi1.data.tokenizers import build_tokenizer
from phi1.parallel.random import seed_everything
from phi1.parallel.state import ParallelState, _launch_env, destroy_distributed, init_distributed
from phi1.training import checkpointing
from phi1.training.checkpoint_selection import select_after_training
from phi1.training.checkpointer import Checkpointer
from phi1.training.config import ConfigError, TrainConfig, default_paths, tokenizer_type_of, validate_config
from phi1.training.data_loading import build_datasets, micro_batches
from phi1.training.fault_injection import build_fault_hooks, check_supported
from phi1.training.guard import StepGuard
from phi1.training.metrics import MetricsProcessor, MetricsSink, StepProfiler, device_name, peak_tflops
from phi1.training.schedule import LRSchedule
from phi1.training.strategies import StrategyContext, build_strategy
from phi1.training.validator import Validator

logger = logging.getLogger("phi1.train")


def launched_world_size() -> int:
    """Processes of this job according to the launcher (torchrun, mpirun, PMI); 1 for a plain python run."""
    launch = _launch_env()
    return launch[1] if launch is not None else 1


# ----------------------------------------------------------------------------------------------------------------
# Resolving the model before validation


def pretrained_model_config(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of any model path `phi1.loading` accepts (phi1 / HuggingFace directory, run directory,
    iter_* checkpoint)."""
    from phi1.loading import load_config

    return load_config(path, what="finetune.init_from")


def resolve_config(config: TrainConfig, world_size: int) -> None:
    """Fill what the config leaves to be derived, in place, so the saved YAML is the exact run:

    - finetune.init_from: the architecture is the pretrained model's (model.* fields given still override
      regularisation settings such as dropout);
    - model.vocab_size, when not given: the tokenizer's size padded to 64 x tensor_parallel.
    """
    model = config.model
    if config.finetune.init_from is not None and Path(config.finetune.init_from).exists():
        pretrained = pretrained_model_config(config.finetune.init_from)
        user = dict(model.overrides)
        values = {k: v for k, v in pretrained.to_dict().items() if k != "name"}
        model.preset = pretrained.name if pretrained.name in PRESETS else model.preset
        model.overrides = {**values, **user}
    tokenizer_path = config.data.tokenizer_model
    tokenizer_type = tokenizer_type_of(config.data)  # None: validate_config says what is wrong with the pair
    if "vocab_size" not in model.overrides and tokenizer_type is not None:
        tokenizer = build_tokenizer(tokenizer_type, tokenizer_path)
        model.overrides["vocab_size"] = tokenizer.padded_vocab_size(64, config.parallel.tensor_parallel)


# ----------------------------------------------------------------------------------------------------------------
# The run


@dataclass
class RunState:
    """What changes from step to step; the counters and validation losses are saved in trainer_state.json."""

    iteration: int = 0
    consumed_samples: int = 0
    best_val_loss: float | None = None
    last_val_loss: float | None = None
    last_val_iteration: int | None = None
    losses: list[float] = field(default_factory=list)
    """Logged losses of this process's run (returned for tests and the quickstart)."""
    last_lr: float | None = None
    """The learning rate of the last step (for the diagnosis of non-finite weights; not saved)."""


class Trainer:
    """One run assembled from its components; `run()` trains to the end (or the exit iteration)."""

    def __init__(self, config: TrainConfig, model_config: ModelConfig, state: ParallelState) -> None:
        self.config, self.model_config, self.state = config, model_config, state
        self.device = state.device
        seed_everything(config.seed, state.tp_rank)
        self.tokenizer = build_tokenizer(config.data.tokenizer_type, config.data.tokenizer_model)
        if self.tokenizer.vocab_size > model_config.vocab_size:
            raise ConfigError(f"model.vocab_size {model_config.vocab_size} is smaller than the tokenizer's "
                              f"{self.tokenizer.vocab_size} tokens ({config.data.tokenizer_model})")

        self.guard = StepGuard(config.guard.max_consecutive_nonfinite, config.checkpoint.dir, state.world_size,
                               state.is_main)
        self.faults = build_fault_hooks(config, state.rank)
        self.schedule = LRSchedule(config.optim.lr, config.optim.min_lr, config.schedule.warmup_steps,
                                   config.schedule.train_steps, config.schedule.decay)
        self.strategy = build_strategy(StrategyContext(
            config=config, model_config=model_config, state=state, tokenizer=self.tokenizer,
            schedule=self.schedule, guard=self.guard, faults=self.faults,
        ))
        self.faults.check_model(self.strategy.modules)

        self.checkpointer = Checkpointer(config, model_config, state, self.guard, self.faults)
        self.resume_from = self.checkpointer.find_resume()
        if self.resume_from is not None:
            self.checkpointer.load_model(self.resume_from, self.strategy)
            logger.info("resuming from %s", self.resume_from)
        elif config.finetune.init_from is not None:
            self._load_pretrained(config.finetune.init_from)
        self.strategy.setup()

        self.run_state = RunState()
        if self.resume_from is not None:
            self.checkpointer.restore(self.resume_from, self.strategy, self.schedule, self.run_state)
        self.train_data, self.valid_data = build_datasets(config, self.tokenizer, state)
        self.validator = Validator(config, state, self.strategy, self.valid_data)

        tb_dir, jsonl = default_paths(config)
        log = config.logging
        self.sink = MetricsSink(
            state.is_main, tb_dir, jsonl, wandb_project=log.wandb_project, wandb_mode=log.wandb_mode,
            wandb_run_name=log.wandb_run_name or Path(config.checkpoint.dir).name, wandb_dir=config.checkpoint.dir,
            wandb_config=config.to_dict(),
        )
        self.tb_dir, self.jsonl_path = tb_dir, jsonl
        self.profiler = None
        if config.profiling.steps and state.is_main:
            prof = config.profiling
            self.profiler = StepProfiler(
                prof.steps[0], prof.steps[-1], prof.dir or os.path.join(config.checkpoint.dir, "profile"), state.rank,
                self.device, record_shapes=prof.record_shapes, profile_memory=prof.profile_memory,
            )
        self.device_name = device_name(self.device)
        self.peak = peak_tflops(self.device_name, config.precision, config.logging.peak_tflops)
        self.metrics = MetricsProcessor(
            self.sink, train_steps=config.schedule.train_steps, global_batch_size=config.batch.global_batch_size,
            seq_len=config.data.seq_len, flops_per_token=model_config.flops_per_token(config.data.seq_len),
            world_size=state.world_size, peak=self.peak, device=self.device, log_interval=config.logging.interval,
            compile_first_step=config.compile,
        )
        if self.resume_from is not None:
            # Last: nothing after this point may draw random numbers before the first step.
            self.checkpointer.load_rng_states(self.resume_from)

    def _load_pretrained(self, path: str) -> None:
        from phi1.loading import load_state

        _, weights = load_state(path, what="finetune.init_from")
        self.strategy.load_model_state(weights, source=path)
        logger.info("initialised from %s (fresh optimizer and schedule)", path)

    # -- the loop -------------------------------------------------------------------------------------------------

    def run(self) -> RunState:
        config, rs, state, strategy = self.config, self.run_state, self.state, self.strategy
        steps = config.schedule.train_steps
        if state.is_main:
            checkpointing.remove_stale_temporaries(config.checkpoint.dir)
            logger.info("%s; optimizer %s; device %s (peak %s TFLOP/s at %s)", self._layout_line(),
                        strategy.optimizer_kind, self.device_name, self.peak if self.peak is not None else "unknown",
                        config.precision)
            self._log_artefacts()
        if rs.iteration >= steps:
            logger.info("iteration %d already reaches schedule.train_steps=%d: nothing to train", rs.iteration, steps)
            return rs
        data = micro_batches(self.train_data, config, state, rs.consumed_samples)
        while rs.iteration < steps:
            iteration = rs.iteration + 1
            start = time.perf_counter()
            if self.profiler is not None:
                with self.profiler.step(iteration):
                    result = strategy.train_step(data, iteration)
            else:
                result = strategy.train_step(data, iteration)
            rs.last_lr = result.lr
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.metrics.step_done(iteration, result.loss, result.skipped, time.perf_counter() - start)
            rs.iteration = iteration
            rs.consumed_samples += config.batch.global_batch_size
            self.faults.after_step(iteration)

            if self.metrics.due(iteration):
                rs.losses.extend(self.metrics.log_interval(
                    iteration, rs.consumed_samples, result.lr, result.grad_norm, result.loss_scale,
                    strategy.scaler.skipped_steps, self.guard.total))
            if self.validator.due(iteration):
                val = self.validator.validate(rs)
                if val is not None:
                    self.metrics.log_validation(iteration, val)
            if self.checkpointer.save_if_due(strategy, self.schedule, rs):
                break
        return rs

    def save(self) -> Path:
        """Write a checkpoint of the current state now (every rank calls this)."""
        return self.checkpointer.save(self.strategy, self.schedule, self.run_state)

    def _log_artefacts(self) -> None:
        """Say where this run's metrics, events, W&B files and traces go, once, at the start (rank 0)."""
        parts = [f"checkpoints {self.config.checkpoint.dir}"]
        if self.jsonl_path:
            parts.append(f"metrics {self.jsonl_path}")
        if self.sink.writer is not None:
            parts.append(f"TensorBoard {self.tb_dir} (tensorboard --logdir {self.tb_dir})")
        if self.sink.wandb_path is not None:
            mode = self.config.logging.wandb_mode
            parts.append(f"W&B {mode} run {self.sink.wandb_path}"
                         + (f" (upload with: wandb sync {self.sink.wandb_path})" if mode == "offline" else ""))
        if self.profiler is not None:
            parts.append(f"profiler trace {self.profiler.path}")
        logger.info("artefacts: %s", "; ".join(parts))

    def _layout_line(self) -> str:
        return (f"{self.state.world_size} processes: {self.strategy.layout_phrase()}, gradient accumulation "
                f"{self.strategy.accum}, global batch {self.config.batch.global_batch_size}")

    def close(self) -> None:
        if self.profiler is not None:
            self.profiler.close()
        self.sink.close()


def setup_logging(rank: int) -> None:
    """Log lines with time and rank to stdout: INFO on rank 0, warnings and errors only on the others."""
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, stream=sys.stdout, force=True,
                        format=f"%(asctime)s [rank {rank}] %(message)s", datefmt="%H:%M:%S")


def train(config: TrainConfig) -> RunState:
    """Validate `config` for the launched world size, then train. Every rank calls this.

    Raises:
        ConfigError: before any process group exists, when the configuration cannot run.
        NonFiniteTrainingError: the guard stopped the run (non-finite steps or weights); nothing was saved.
    """
    world_size = launched_world_size()
    resolve_config(config, world_size)
    model_config = validate_config(config, world_size)
    check_supported(config)
    if config.logging.wandb_project and config.logging.wandb_mode != "disabled":
        try:  # on every rank, before any process group exists: one clear line, not a crash on rank 0 alone
            import wandb  # noqa: F401
        except ImportError:
            raise ConfigError("logging.wandb_project: is set but wandb is not installed; pip install wandb "
                              "(or pip install 'phi1[wandb]'), or leave logging.wandb_project unset") from None
    state = init_distributed(config.parallel.tensor_parallel, pipeline_parallel_size=config.parallel.pipeline_parallel)
    setup_logging(state.rank)
    trainer = None
    try:
        trainer = Trainer(config, model_config, state)
        result = trainer.run()
        if state.is_main:
            latest = checkpointing.find_checkpoint(config.checkpoint.dir)
            extras = [f"metrics {trainer.jsonl_path}" if trainer.jsonl_path else "",
                      f"TensorBoard {trainer.tb_dir}" if trainer.sink.writer is not None else "",
                      f"W&B {trainer.sink.wandb_path}" if trainer.sink.wandb_path is not None else "",
                      f"profiler trace {trainer.profiler.path}" if trainer.profiler is not None else ""]
            logger.info("done: iteration %d, %d samples; checkpoint %s%s", result.iteration, result.consumed_samples,
                        latest, "".join(f"; {extra}" for extra in extras if extra))
            if result.iteration >= config.schedule.train_steps:  # finetune.select_by (not after exit_at_iteration)
                select_after_training(config, str(trainer.device))
        return result
    finally:
        if trainer is not None:
            trainer.close()
        destroy_distributed()


__all__ = ["RunState", "Trainer", "launched_world_size", "pretrained_model_config", "resolve_config",
           "setup_logging", "train"]
