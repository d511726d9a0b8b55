"""The training loop: setup from a validated TrainConfig, steps with gradient accumulation, evaluation,
logging and checkpoints, and exact resume.

One step (DDP path):

    for each of `accum` micro-batches:   forward under autocast -> (loss x scale / accum).backward()
                                         (DDP all-reduces only after the last one: no_sync before)
    sequence-parallel grads all-reduced over TP -> unscale (fp16) -> global-norm clip (TP-aware)
    non-finite norm: skip the update, halve the loss scale, count it; else set the lr and step AdamW
    non-finite loss, or non-finite norm that is no fp16 overflow: skipped too, and counted by the guard, which
    stops the run with a diagnosis after guard.max_consecutive_nonfinite in a row (phi1.training.fault)

Under ZeRO the engine does the accumulation, clipping, loss scaling and update (`engine.backward`,
`engine.step`); phi1 still sets the learning rate. The logged loss is the mean of the step's micro-batch losses
averaged over the data-parallel ranks, so DP = 2 logs the same numbers as one process on the same global batch.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from phi1.core.config import PRESETS, ModelConfig
from phi1.core.model import PhiForCausalLM
from phi1.data.samplers import MicroBatchSampler
from phi1.data.tokenizers import build_tokenizer
from phi1.ops import prepare as prepare_fused_ops
from phi1.parallel.cross_entropy import IGNORE_INDEX
from phi1.parallel.data_parallel import wrap_data_parallel
from phi1.parallel.grads import allreduce_sequence_parallel_grads, clip_grad_norm_, grad_norm
from phi1.parallel.random import seed_everything
from phi1.parallel.state import ParallelState, _launch_env, destroy_distributed, init_distributed
from phi1.training import checkpointing
from phi1.training.config import ConfigError, TrainConfig, default_paths, tokenizer_type_of, validate_config
from phi1.training.fault import (
    NonFiniteGuard,
    gather_names,
    nonfinite_gradients,
    nonfinite_weights,
    weights_are_finite,
)
from phi1.training.metrics import (
    MetricsSink,
    StepProfiler,
    device_name,
    memory_stats,
    mfu,
    model_flops_per_second,
    peak_tflops,
)
from phi1.training.optimizer import build_adamw
from phi1.training.precision import DynamicLossScaler, NoLossScaler, autocast
from phi1.training.schedule import LRSchedule

logger = logging.getLogger("phi1.train")

CHECKPOINT_FORMAT = "phi1-training-checkpoint"
CHECKPOINT_FORMAT_VERSION = 1


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
# Data


def collate(items: list[dict]) -> dict[str, torch.Tensor]:
    """Stack samples into input_ids (B, T) and shifted labels (B, T) with IGNORE_INDEX where no loss is taken."""
    tokens = torch.from_numpy(np.stack([np.asarray(item["tokens"], dtype=np.int64) for item in items]))
    input_ids, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].clone()
    if "loss_mask" in items[0]:
        mask = torch.from_numpy(np.stack([np.asarray(item["loss_mask"], dtype=np.int64) for item in items]))
        labels[mask[:, 1:] == 0] = IGNORE_INDEX
    return {"input_ids": input_ids, "labels": labels}


def build_datasets(config: TrainConfig, tokenizer, state: ParallelState):
    """(train, valid) datasets sized for the whole run; valid is None when evaluation is off."""
    g = config.batch.global_batch_size
    train_samples = config.schedule.train_steps * g
    eval_on = config.eval.interval > 0 and config.eval.iters > 0
    valid_samples = config.eval.iters * config.batch.micro_batch_size * state.dp_size if eval_on else 0
    if config.finetune.data is not None:
        from phi1.training.finetune_data import build_exercise_datasets

        ft = config.finetune
        return build_exercise_datasets(
            ft.data, tokenizer, config.data.seq_len, config.data.split, (train_samples, valid_samples), config.seed,
            ft.loss_on_solution_only, ft.prompt_key, ft.solution_key,
        )
    from phi1.data.gpt_dataset import build_gpt_datasets

    train, valid, _ = build_gpt_datasets(
        config.data.path, config.data.split, config.data.seq_len, (train_samples, valid_samples, 0), config.seed,
        cache_dir=config.data.cache_dir,
        # Refuses another tokenizer's data (the PREFIX.json sidecar) and token ids beyond the vocabulary.
        tokenizer=tokenizer, tokenizer_path=config.data.tokenizer_model,
    )
    return train, valid


def micro_batches(dataset, config: TrainConfig, state: ParallelState, consumed_samples: int):
    """Iterator over this rank's micro-batches from `consumed_samples` on."""
    sampler = MicroBatchSampler(len(dataset), consumed_samples, config.batch.micro_batch_size, state.dp_rank, state.dp_size)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=config.data.num_workers, collate_fn=collate,
        pin_memory=state.device.type == "cuda",
        # Its own generator: a DataLoader iterator draws a base seed, and from the global generator that draw
        # would shift dropout masks whenever an iterator is created (after a resume, for each evaluation).
        generator=torch.Generator().manual_seed(config.seed + consumed_samples),
    )
    return iter(loader)


# ----------------------------------------------------------------------------------------------------------------
# The run


@dataclass
class RunState:
    """What changes from step to step and is saved in trainer_state.json."""

    iteration: int = 0
    consumed_samples: int = 0
    best_val_loss: float | None = None
    last_val_loss: float | None = None
    last_val_iteration: int | None = None
    losses: list[float] = field(default_factory=list)
    """Logged losses of this process's run (returned for tests and the quickstart)."""


def _dp_mean(value: torch.Tensor, state: ParallelState) -> torch.Tensor:
    if state.dp_size > 1:
        value = value.clone()
        dist.all_reduce(value, group=state.dp_group)
        value /= state.dp_size
    return value


class Trainer:
    """Holds the model, optimizer, data and sinks of one run; `run()` trains to the end (or the exit iteration)."""

    def __init__(self, config: TrainConfig, model_config: ModelConfig, state: ParallelState) -> None:
        self.config, self.model_config, self.state = config, model_config, state
        self.device = state.device
        self.world_size = state.world_size
        self.accum = config.grad_accum_steps(state.world_size)
        self.zero = config.parallel.zero_stage > 0
        seed_everything(config.seed, state.tp_rank)
        self.tokenizer = build_tokenizer(config.data.tokenizer_type, config.data.tokenizer_model)
        if self.tokenizer.vocab_size > model_config.vocab_size:
            raise ConfigError(f"model.vocab_size {model_config.vocab_size} is smaller than the tokenizer's "
                              f"{self.tokenizer.vocab_size} tokens ({config.data.tokenizer_model})")

        model = PhiForCausalLM(model_config, tp_group=state.tp_group, sequence_parallel=config.parallel.sequence_parallel,
                               init_seed=config.seed)
        model.activation_checkpointing = config.activation_checkpointing
        model.activation_checkpointing_every = config.activation_checkpointing_every
        model.loss_chunk_size = config.loss_chunk_size
        if config.data.document_mask:
            model.document_eod_token_id = self.tokenizer.eod
        model.to(self.device)
        # Built (or found cached) here, before any data is read: a failed build is a warning now, not a crash
        # mid-run ('on' makes it an error).
        model.fused_ops = prepare_fused_ops(self.device, config.fused_ops)
        if config.compile:
            model.compile_blocks()  # compiled at the first step, whose time is logged as compile time
        self.model = model
        self.guard = NonFiniteGuard(config.guard.max_consecutive_nonfinite)
        if ((config.faults.inject_nan_at or config.faults.inject_nan_weights_at)
                and config.faults.inject_nan_param not in dict(model.named_parameters())):
            raise ConfigError(f"faults.inject_nan_param: {config.faults.inject_nan_param!r} is not a parameter of the model")

        self.resume_from = self._find_resume()
        if self.resume_from is not None:
            checkpointing.load_model_weights(model, self.resume_from)
            logger.info("resuming from %s", self.resume_from)
        elif config.finetune.init_from is not None:
            self._load_pretrained(config.finetune.init_from)

        self.schedule = LRSchedule(config.optim.lr, config.optim.min_lr, config.schedule.warmup_steps,
                                   config.schedule.train_steps, config.schedule.decay)
        if self.zero:
            from phi1.parallel.zero import deepspeed_config, initialize_zero

            ds_config = deepspeed_config(
                zero_stage=config.parallel.zero_stage, micro_batch_size=config.batch.micro_batch_size,
                grad_accum_steps=self.accum, dp_size=state.dp_size, lr=config.optim.lr, betas=tuple(config.optim.betas),
                eps=config.optim.eps, weight_decay=config.optim.weight_decay, grad_clip=config.optim.grad_clip,
                precision=config.precision, loss_scale_window=config.loss_scale.growth_interval,
                initial_scale_power=int(round(math.log2(config.loss_scale.initial_scale))),
            )
            self.engine = initialize_zero(model, ds_config, state)
            self.train_model, self.optimizer, self.optimizer_kind = self.engine, None, "DeepSpeed ZeRO (torch AdamW)"
            self.scaler = NoLossScaler()
        else:
            self.engine = None
            self.train_model = wrap_data_parallel(model, state, bucket_cap_mb=config.parallel.ddp_bucket_mb)
            self.optimizer, self.optimizer_kind = build_adamw(model, config.optim, self.device)
            if config.precision == "fp16":
                ls = config.loss_scale
                self.scaler = DynamicLossScaler(scale=ls.initial_scale, growth_interval=ls.growth_interval, min_scale=ls.min_scale)
            else:
                self.scaler = NoLossScaler()

        self.run_state = RunState()
        self.last_lr: float | None = None
        """The learning rate of the last step (for the diagnosis of non-finite weights)."""
        if self.resume_from is not None:
            self._restore(self.resume_from)
        self.train_data, self.valid_data = build_datasets(config, self.tokenizer, state)

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
        self.flops_per_token = model_config.flops_per_token(config.data.seq_len)
        self.device_name = device_name(self.device)
        self.peak = peak_tflops(self.device_name, config.precision, config.logging.peak_tflops)
        if self.resume_from is not None:
            # Last: nothing after this point may draw random numbers before the first step.
            checkpointing.load_rng_states(self.resume_from, state)

    # -- setup helpers --------------------------------------------------------------------------------------------

    def _find_resume(self) -> Path | None:
        ckpt = self.config.checkpoint
        if ckpt.load is not None:
            found = self._verified_checkpoint(ckpt.load)
            if found is None:
                raise ConfigError(f"checkpoint.load: {ckpt.load} holds no complete checkpoint")
            return found
        if ckpt.resume:
            return self._verified_checkpoint(ckpt.dir)
        return None

    def _verified_checkpoint(self, path: str) -> Path | None:
        """Rank 0 verifies the checkpoint's manifest (falling back to older ones when checkpoint.fallback) and
        tells the others which one to load, or the error that stops every rank."""
        found, error = None, None
        if self.state.rank == 0:
            try:
                found = checkpointing.find_verified_checkpoint(path, self.config.checkpoint.fallback)
            except ValueError as e:
                error = e
        if self.state.world_size > 1:
            message = [str(found) if found is not None else None, str(error) if error is not None else None]
            dist.broadcast_object_list(message, src=0)
            found = Path(message[0]) if message[0] is not None else None
            if message[1] is not None and error is None:
                error = ValueError(message[1])
        if error is not None:
            raise error
        return found

    def _load_pretrained(self, path: str) -> None:
        from phi1.core.pretrained import load_state_dict_into
        from phi1.loading import load_state

        _, weights = load_state(path, what="finetune.init_from")
        load_state_dict_into(self.model, weights, source=path)
        logger.info("initialised from %s (fresh optimizer and schedule)", path)

    def _restore(self, directory: Path) -> None:
        saved = checkpointing.read_trainer_state(directory)
        if saved.get("format") != CHECKPOINT_FORMAT or saved.get("format_version") != CHECKPOINT_FORMAT_VERSION:
            raise ValueError(f"{directory}: trainer_state.json format {saved.get('format')!r} v{saved.get('format_version')}, "
                             f"this trainer reads {CHECKPOINT_FORMAT!r} v{CHECKPOINT_FORMAT_VERSION}")
        checkpointing.load_optimizer_state(self.optimizer, self.engine, directory, self.state)
        self.schedule.load_state_dict(saved["schedule"])
        self.scaler.load_state_dict(saved["loss_scaler"])
        rs = self.run_state
        rs.iteration, rs.consumed_samples = int(saved["iteration"]), int(saved["consumed_samples"])
        rs.best_val_loss = saved.get("best_val_loss")
        self.guard.load_state_dict(saved.get("nonfinite", {}))

    # -- one step -------------------------------------------------------------------------------------------------

    def _forward(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        input_ids = batch["input_ids"].to(self.device, non_blocking=True)
        labels = batch["labels"].to(self.device, non_blocking=True)
        if self.zero:  # DeepSpeed already holds the weights in bf16 / fp16
            return model(input_ids, labels=labels).loss
        with autocast(self.config.precision, self.device):
            return model(input_ids, labels=labels).loss

    def train_step(self, data) -> dict:
        """One optimizer step over `accum` micro-batches; returns loss (DP mean), lr, grad norm, skipped."""
        if self.zero:
            return self._zero_step(data)
        model, inner = self.train_model, self.model
        ddp = model is not inner
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float32)
        for micro in range(self.accum):
            batch = next(data)
            sync = model.no_sync() if ddp and micro < self.accum - 1 else contextlib.nullcontext()
            with sync:
                loss = self._forward(model, batch)
                (loss * (self.scaler.scale / self.accum)).backward()
            loss_sum += loss.detach().float()
        allreduce_sequence_parallel_grads(inner, self.state)
        grads = [p.grad for p in inner.parameters() if p.grad is not None]
        if self.scaler.scale != 1.0:
            torch._foreach_mul_(grads, 1.0 / self.scaler.scale)
        iteration = self.run_state.iteration + 1
        if iteration in self.config.faults.inject_overflow_at:
            grads[0].fill_(float("inf"))
        if iteration in self.config.faults.inject_nan_at:
            dict(inner.named_parameters())[self.config.faults.inject_nan_param].grad.fill_(float("nan"))
        clip = self.config.optim.grad_clip
        norm = clip_grad_norm_(inner, clip, self.state) if clip > 0 else grad_norm(inner, self.state)
        loss = _dp_mean(loss_sum / self.accum, self.state)
        loss_value = float(loss)  # the same on every rank (DP mean), as the norm is: every rank decides alike
        skip = not (math.isfinite(norm) and math.isfinite(loss_value))
        lr = self.schedule.next_lr()
        if skip:
            logger.warning("iteration %d: loss %s, gradient norm %s, step skipped (loss scale %g)",
                           iteration, loss_value, norm, self.scaler.scale)
        else:
            self.schedule.apply(self.optimizer)
            self.optimizer.step()
            self.schedule.step()
        if iteration in self.config.faults.inject_nan_weights_at:
            with torch.no_grad():
                dict(inner.named_parameters())[self.config.faults.inject_nan_param].view(-1)[0] = float("nan")
        self._guard(iteration, loss_value, norm, skip)
        scale_used = self.scaler.scale
        self.scaler.update(skip)
        self.optimizer.zero_grad(set_to_none=True)
        if self.guard.must_stop:
            self._stop_nonfinite()
        return {"loss": loss, "lr": lr, "grad_norm": norm, "skipped": skip, "loss_scale": scale_used}

    def _guard(self, iteration: int, loss: float, norm: float, skipped: bool) -> None:
        """Count a bad step (see phi1.training.fault); names the parameters with non-finite gradients."""
        can_back_off = self.config.precision == "fp16" and self.scaler.scale > getattr(self.scaler, "min_scale", 1.0)
        bad = skipped and NonFiniteGuard.is_bad(loss, norm, can_back_off)
        names = gather_names(nonfinite_gradients(self.train_model), self.world_size) if bad else []
        self.guard.record(iteration, bad, loss, norm, names)

    def _stop_nonfinite(self) -> None:
        """Raise the guard's error; rank 0 also writes the diagnosis beside the checkpoints. Nothing is saved."""
        latest = checkpointing.find_checkpoint(self.config.checkpoint.dir)
        error = self.guard.error(str(latest) if latest is not None else None)
        self._write_diagnosis(error)
        raise error

    def _stop_nonfinite_weights(self) -> None:
        """Raise the error of non-finite weights at a save; rank 0 writes the diagnosis. Nothing is saved."""
        names = gather_names(nonfinite_weights(self.train_model), self.world_size)
        latest = checkpointing.find_checkpoint(self.config.checkpoint.dir)
        error = self.guard.weights_error(self.run_state.iteration, names, self.last_lr,
                                         str(latest) if latest is not None else None)
        self._write_diagnosis(error)
        raise error

    def _write_diagnosis(self, error) -> None:
        """Rank 0 writes `error.diagnosis` to nonfinite_diagnosis.json in checkpoint.dir and logs where."""
        if self.state.is_main:
            import json

            path = Path(self.config.checkpoint.dir) / "nonfinite_diagnosis.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(error.diagnosis, indent=1) + "\n")
            logger.error("%s; diagnosis in %s", error, path)

    def _zero_step(self, data) -> dict:
        engine = self.engine
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float32)
        skipped_before = engine.skipped_steps
        lr = self.schedule.next_lr()
        scale_used = float(getattr(engine.optimizer, "loss_scale", 1.0) or 1.0)
        for micro in range(self.accum):
            loss = self._forward(engine, next(data))
            engine.backward(loss)
            if micro == self.accum - 1:
                for group in engine.optimizer.param_groups:
                    group["lr"] = lr
            engine.step()
            loss_sum += loss.detach().float()
        skipped = engine.skipped_steps > skipped_before
        if not skipped:
            self.schedule.step()
        self.scaler.update(skipped)
        norm = engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        loss = _dp_mean(loss_sum / self.accum, self.state)
        loss_value = float(loss)
        if not math.isfinite(loss_value) or (skipped and not math.isfinite(norm)):
            self._guard(self.run_state.iteration + 1, loss_value, norm, True)
            # DeepSpeed skips only fp16 overflows; any other non-finite step has already updated the weights,
            # so the run stops at once and the last checkpoint is what is left to resume from.
            if self.guard.must_stop or not skipped:
                self._stop_nonfinite()
        else:
            self.guard.record(self.run_state.iteration + 1, False, loss_value, norm, [])
        return {"loss": loss, "lr": lr, "grad_norm": norm, "skipped": skipped, "loss_scale": scale_used}

    # -- evaluation -----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean validation loss over `eval.iters` micro-batches per DP rank (the same samples every time)."""
        if self.valid_data is None:
            return None
        model = self.engine if self.zero else self.model
        model.eval()
        total = torch.zeros((), device=self.device, dtype=torch.float32)
        data = micro_batches(self.valid_data, self.config, self.state, 0)
        count = 0
        for _ in range(self.config.eval.iters):
            batch = next(data, None)
            if batch is None:
                break
            total += self._forward(model, batch).float()
            count += 1
        model.train()
        return float(_dp_mean(total / max(count, 1), self.state))

    # -- checkpoints ----------------------------------------------------------------------------------------------

    def trainer_state(self) -> dict:
        rs, state = self.run_state, self.state
        return {
            "format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_FORMAT_VERSION,
            "iteration": rs.iteration, "consumed_samples": rs.consumed_samples,
            "tokens": rs.consumed_samples * self.config.data.seq_len,
            "schedule": self.schedule.state_dict(), "loss_scaler": self.scaler.state_dict(),
            "val_loss": rs.last_val_loss if rs.last_val_iteration == rs.iteration else None,
            "best_val_loss": rs.best_val_loss,
            "world_size": state.world_size, "tensor_parallel": state.tp_size, "data_parallel": state.dp_size,
            "zero_stage": self.config.parallel.zero_stage, "precision": self.config.precision,
            "nonfinite": self.guard.state_dict(),
            "model_config": self.model_config.to_dict(),
        }

    def save(self) -> Path:
        """Write a checkpoint of the current state (every rank calls this).

        Raises:
            NonFiniteTrainingError: some rank's weights hold a NaN or Inf; nothing is written and `latest` keeps
                pointing at the last good checkpoint (the diagnosis is written beside the checkpoints).
        """
        rs, config = self.run_state, self.config
        if not weights_are_finite(self.train_model, self.world_size):
            self._stop_nonfinite_weights()
        val = rs.last_val_loss if rs.last_val_iteration == rs.iteration else None
        request = checkpointing.SaveRequest(
            iteration=rs.iteration,
            trainer_state=self.trainer_state(),
            config_yaml=config.to_yaml(),
            tokenizer=checkpointing.tokenizer_files(config.data.tokenizer_model, config.data.tokenizer_type),
            keep_last=config.checkpoint.keep_last,
            keep_best=config.checkpoint.keep_best,
            val_loss=val,
            kill_midway=config.faults.kill_during_save_at == rs.iteration,
        )
        start = time.perf_counter()
        path = checkpointing.save_checkpoint(config.checkpoint.dir, request, self.train_model, self.optimizer, self.engine, self.state)
        logger.info("saved checkpoint %s (%.1f s)", path, time.perf_counter() - start)
        return path

    # -- the loop -------------------------------------------------------------------------------------------------

    def run(self) -> RunState:
        config, rs, state = self.config, self.run_state, self.state
        steps = config.schedule.train_steps
        if state.is_main:
            checkpointing.remove_stale_temporaries(config.checkpoint.dir)
            logger.info("%s; optimizer %s; device %s (peak %s TFLOP/s at %s)", self._layout_line(), self.optimizer_kind,
                        self.device_name, self.peak if self.peak is not None else "unknown", config.precision)
            self._log_artefacts()
        if rs.iteration >= steps:
            logger.info("iteration %d already reaches schedule.train_steps=%d: nothing to train", rs.iteration, steps)
            return rs
        data = micro_batches(self.train_data, config, state, rs.consumed_samples)
        g, seq = config.batch.global_batch_size, config.data.seq_len
        interval_losses: list[torch.Tensor] = []
        interval_time, interval_steps, interval_skipped = 0.0, 0, 0
        compile_pending = config.compile
        while rs.iteration < steps:
            start = time.perf_counter()
            if self.profiler is not None:
                with self.profiler.step(rs.iteration + 1):
                    out = self.train_step(data)
            else:
                out = self.train_step(data)
            self.last_lr = out["lr"]
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            if compile_pending:
                # The first step compiles the blocks: its time is compile time, not step time.
                compile_pending = False
                compile_seconds = time.perf_counter() - start
                self.sink.write({"iteration": rs.iteration + 1, "compile_time_s": compile_seconds},
                                console=f"compile warm-up: the first step took {compile_seconds:.1f} s (torch.compile "
                                        "of the blocks); not counted in step time")
            else:
                interval_time += time.perf_counter() - start
                interval_steps += 1
            interval_skipped += int(out["skipped"])
            interval_losses.append(out["loss"])
            rs.iteration += 1
            rs.consumed_samples += g
            self._maybe_kill(rs.iteration)

            if rs.iteration % config.logging.interval == 0 or rs.iteration == steps:
                losses = [float(v) for v in interval_losses]
                tokens_per_second = interval_steps * g * seq / interval_time if interval_steps else 0.0
                record = {
                    "iteration": rs.iteration, "consumed_samples": rs.consumed_samples,
                    "loss": sum(losses) / len(losses), "step_losses": losses, "lr": out["lr"],
                    "grad_norm": out["grad_norm"], "loss_scale": out["loss_scale"],
                    "skipped_steps": self.scaler.skipped_steps, "skipped_in_interval": interval_skipped,
                    "nonfinite_steps": self.guard.total,
                    "step_time_s": interval_time / interval_steps if interval_steps else None,
                    "tokens_per_second": tokens_per_second,
                    "tflops_per_device": model_flops_per_second(self.flops_per_token, tokens_per_second, self.world_size) / 1e12,
                    "mfu": mfu(self.flops_per_token, tokens_per_second, self.world_size, self.peak),
                    **memory_stats(self.device),
                }
                rs.losses.extend(losses)
                self.sink.write(record, console=self._console_line(record, steps))
                interval_losses, interval_time, interval_steps, interval_skipped = [], 0.0, 0, 0

            if config.eval.interval > 0 and (rs.iteration % config.eval.interval == 0 or rs.iteration == steps):
                val = self.evaluate()
                if val is not None:
                    rs.last_val_loss, rs.last_val_iteration = val, rs.iteration
                    if rs.best_val_loss is None or val < rs.best_val_loss:
                        rs.best_val_loss = val
                    self.sink.write({"iteration": rs.iteration, "val_loss": val, "val_ppl": math.exp(min(val, 50.0))},
                                    console=f"iteration {rs.iteration:>7d} | validation loss {val:.4f} | ppl {math.exp(min(val, 50.0)):.2f}")

            exiting = config.checkpoint.exit_at_iteration == rs.iteration
            interval = config.checkpoint.interval
            if (interval > 0 and rs.iteration % interval == 0) or rs.iteration == steps or exiting:
                if self.guard.consecutive > 0 and rs.iteration != steps and not exiting:
                    # In a run of non-finite steps: keep the last good checkpoint as the newest one.
                    logger.warning("iteration %d: not saving during %d consecutive non-finite steps",
                                   rs.iteration, self.guard.consecutive)
                else:
                    self.save()
            if exiting:
                logger.info("checkpoint.exit_at_iteration=%d reached: stopping", rs.iteration)
                break
        return rs

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

    def _maybe_kill(self, iteration: int) -> None:
        """faults.kill_at_iteration: SIGKILL one rank after this step, in the first launch only (torchrun counts
        restarts in TORCHELASTIC_RESTART_COUNT), so the restarted job runs through."""
        faults = self.config.faults
        if (faults.kill_at_iteration == iteration and self.state.rank == faults.kill_rank
                and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0):
            logger.warning("faults.kill_at_iteration=%d: killing rank %d", iteration, self.state.rank)
            for handler in logging.getLogger().handlers:
                handler.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    def _layout_line(self) -> str:
        s = self.state
        return (f"{s.world_size} processes: tensor parallel {s.tp_size} x data parallel {s.dp_size}, "
                f"gradient accumulation {self.accum}, global batch {self.config.batch.global_batch_size}")

    @staticmethod
    def _console_line(r: dict, steps: int) -> str:
        parts = [
            f"iteration {r['iteration']:>7d}/{steps}", f"loss {r['loss']:.4f}", f"lr {r['lr']:.3e}",
            f"grad norm {r['grad_norm']:.3f}", f"loss scale {r['loss_scale']:g}", f"skipped {r['skipped_steps']}",
            f"{r['tokens_per_second']:,.0f} tokens/s", f"{r['tflops_per_device']:.3f} TFLOP/s/device",
            "MFU " + (f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"),
        ]
        memory = ", ".join(f"{k[4:]} {v:.2f} GiB" for k, v in r.items() if k.startswith("mem_"))
        return " | ".join(parts + [f"memory {memory}"])

    def close(self) -> None:
        if self.profiler is not None:
            self.profiler.close()
        self.sink.close()


def setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, stream=sys.stdout, force=True,
                        format=f"%(asctime)s [rank {rank}] %(message)s", datefmt="%H:%M:%S")


def train(config: TrainConfig) -> RunState:
    """Validate `config` for the launched world size, then train. Every rank calls this.

    Raises:
        ConfigError: before any process group exists, when the configuration cannot run.
    """
    world_size = launched_world_size()
    resolve_config(config, world_size)
    model_config = validate_config(config, world_size)
    if config.faults.inject_overflow_at and config.parallel.zero_stage > 0:
        raise ConfigError("faults.inject_overflow_at: only supported with parallel.zero_stage=0")
    if config.faults.inject_nan_at and config.parallel.zero_stage > 0:
        raise ConfigError("faults.inject_nan_at: only supported with parallel.zero_stage=0")
    if config.faults.inject_nan_weights_at and config.parallel.zero_stage > 0:
        raise ConfigError("faults.inject_nan_weights_at: only supported with parallel.zero_stage=0")
    if config.logging.wandb_project and config.logging.wandb_mode != "disabled":
        try:  # on every rank, before any process group exists: one clear line, not a crash on rank 0 alone
            import wandb  # noqa: F401
        except ImportError:
            raise ConfigError("logging.wandb_project: is set but wandb is not installed; pip install wandb "
                              "(or pip install 'phi1[wandb]'), or leave logging.wandb_project unset") from None
    state = init_distributed(config.parallel.tensor_parallel)
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
        return result
    finally:
        if trainer is not None:
            trainer.close()
        destroy_distributed()
