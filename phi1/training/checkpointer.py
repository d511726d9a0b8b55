"""The checkpointer component: when to save, what the trainer state holds, which checkpoint to resume from and
how to restore it, in a pluggable on-disk format.

When (`save_action`): every checkpoint.interval iterations, at the last iteration and at
checkpoint.exit_at_iteration; not inside a run of non-finite steps (the last good checkpoint stays the newest),
except at the end or the exit, which always save. Before every save the guard checks that no rank's weights
hold a NaN or Inf (phi1.training.guard).

Resume (`find_resume`): checkpoint.load, or with checkpoint.resume the newest checkpoint of checkpoint.dir.
Rank 0 verifies its manifest (falling back to older ones with checkpoint.fallback) and broadcasts which one
to load, or the error that stops every rank. Restoring happens in three steps, at the points where the trainer
can take them: the model weights into the plain modules (`load_model`, before the strategy wraps them), the
optimizer, schedule, loss scaler, counters and guard (`restore`, after), and last the RNG states
(`load_rng_states`, once nothing else will draw a random number before the first step).

Formats (`CheckpointFormat`): what the files of one checkpoint are. `phi1` (phi1.training.checkpointing:
safetensors model shards per TP rank, the optimizer per TP rank or DeepSpeed's ZeRO files, RNG per rank) is
the only one registered here; others register in CHECKPOINT_FORMATS. A run writes the format
checkpoint.format names ('auto': dcp under pipeline parallelism or FSDP, phi1 otherwise) and resumes from a
checkpoint in whatever registered format recognises its files. Every format keeps the run-directory contract
of phi1.loading.checkpoints: `iter_NNNNNNN/` with `trainer_state.json` (written by this module's state) and
`manifest.json`, `latest` and `best`, so finding, verifying, falling back and pruning work for all of them.
"""

from __future__ import annotations

import importlib
import logging
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch.distributed as dist

from phi1.core.config import ModelConfig
from phi1.loading.checkpoints import TRAINER_STATE_FORMAT  # trainer_state.json, every disk format
from phi1.parallel.state import ParallelState
from phi1.training import checkpointing
from phi1.training.config import ConfigError, TrainConfig, checkpoint_format
from phi1.training.fault_injection import FaultHooks
from phi1.training.guard import StepGuard
from phi1.training.schedule import LRSchedule

if TYPE_CHECKING:
    from phi1.training.strategies.base import StepStrategy
    from phi1.training.trainer import RunState

logger = logging.getLogger("phi1.train")

TRAINER_STATE_VERSION = 1
RESTORED_SECTIONS = ("schedule", "loss_scaler")
"""The trainer_state.json sections a resume restores (a checkpoint read only for its weights may lack them)."""


# ----------------------------------------------------------------------------------------------------------------
# On-disk formats


class CheckpointFormat(ABC):
    """How the files of one checkpoint are written and read. Every rank calls every method (collectives)."""

    name: ClassVar[str]
    """The checkpoint.format value ('phi1', 'dcp')."""

    @classmethod
    @abstractmethod
    def recognizes(cls, directory: Path) -> bool:
        """True when `directory` (a complete iter_* checkpoint) holds this format's files."""

    @abstractmethod
    def save(self, run_dir: Path, request: checkpointing.SaveRequest, strategy: StepStrategy,
             state: ParallelState) -> Path:
        """Write the checkpoint of `request.iteration` atomically (every rank) and return its final directory:
        `iter_NNNNNNN/` with `request.trainer_state` as trainer_state.json, the config, the tokenizer and a
        manifest; then `latest`, `best` and pruning as phi1.training.checkpointing.save_checkpoint does.
        `request.kill_midway` (fault injection) must SIGKILL this process after the model files are written."""

    @abstractmethod
    def load_model(self, directory: Path, strategy: StepStrategy, state: ParallelState) -> None:
        """Load the model weights into `strategy.modules` (plain, not yet wrapped: called before setup()). A
        format that can only load into the wrapped model may do nothing here and load in load_optimizer."""

    @abstractmethod
    def load_optimizer(self, directory: Path, strategy: StepStrategy, state: ParallelState) -> None:
        """Load the optimizer state into `strategy.optimizer` / `strategy.engine` (after setup()).

        Raises:
            ValueError: naming the file, when the state does not fit this run.
        """

    def load_rng(self, directory: Path, state: ParallelState) -> bool:
        """Restore this rank's RNG states; False (with a warning) when they cannot be (another world size)."""
        return checkpointing.load_rng_states(directory, state)

    def wait(self) -> Path | None:
        """Finish a save still in flight (a format that saves in the background; collective); else nothing."""
        return None


class Phi1Format(CheckpointFormat):
    """phi1's own files (phi1.training.checkpointing): resumable at the TP size and ZeRO setting that wrote them;
    the model shards load at any TP size."""

    name = "phi1"

    @classmethod
    def recognizes(cls, directory: Path) -> bool:
        return any(Path(directory).glob("model_tp*.safetensors"))

    def save(self, run_dir, request, strategy, state):
        return checkpointing.save_checkpoint(run_dir, request, strategy.train_model, strategy.optimizer,
                                             strategy.engine, state)

    def load_model(self, directory, strategy, state):
        # any TP size; under pipeline parallelism each stage takes its own names
        checkpointing.load_weights_into_modules(strategy.modules, directory,
                                                whole_model=getattr(state, "pp_size", 1) == 1)

    def load_optimizer(self, directory, strategy, state):
        # at another TP size / layout the AdamW state is merged by name and re-sliced (not under ZeRO)
        checkpointing.load_optimizer_state(strategy.optimizer, strategy.engine, directory, state,
                                           modules=strategy.modules)


CHECKPOINT_FORMATS: dict[str, str] = {
    "phi1": "phi1.training.checkpointer:Phi1Format",
    "dcp": "phi1.training.checkpoint_dcp:DCPFormat",
}
"""Registry: checkpoint.format value -> "module:Class" of its CheckpointFormat (imported when used)."""


def format_name(config: TrainConfig) -> str:
    """The format a run writes: checkpoint.format, where 'auto' is 'dcp' under pipeline parallelism or FSDP and
    'phi1' otherwise (phi1.training.config.checkpoint_format, the one place that decides)."""
    return checkpoint_format(config)


def format_class(name: str) -> type[CheckpointFormat]:
    """The CheckpointFormat registered as `name`.

    Raises:
        ConfigError: no such format is registered (one line naming the known ones).
    """
    target = CHECKPOINT_FORMATS.get(name)
    if target is None:
        raise ConfigError(f"checkpoint.format: {name!r} is not a registered checkpoint format; known: "
                          f"{', '.join(sorted(CHECKPOINT_FORMATS))}")
    module_name, class_name = target.split(":")
    return getattr(importlib.import_module(module_name), class_name)


def format_of(directory: Path) -> CheckpointFormat:
    """The format whose files `directory` holds (phi1 when none recognises them: its reader names what is missing)."""
    for name in CHECKPOINT_FORMATS:
        if name != "phi1" and format_class(name).recognizes(directory):
            return format_class(name)()
    return Phi1Format()


# ----------------------------------------------------------------------------------------------------------------
# When to save


def save_action(iteration: int, steps: int, interval: int, exit_at: int | None, consecutive_nonfinite: int) -> str | None:
    """What the end of step `iteration` does about checkpoints.

    Returns:
        'save'; 'hold' (a save is due but the run is inside a streak of non-finite steps, so the last good
        checkpoint stays the newest); or None (no save due).
    """
    exiting = exit_at == iteration
    if not ((interval > 0 and iteration % interval == 0) or iteration == steps or exiting):
        return None
    if consecutive_nonfinite > 0 and iteration != steps and not exiting:
        return "hold"
    return "save"


# ----------------------------------------------------------------------------------------------------------------
# The component


class Checkpointer:
    """Saves and restores one run's checkpoints; every rank holds one and calls it at the same points."""

    def __init__(self, config: TrainConfig, model_config: ModelConfig, state: ParallelState, guard: StepGuard,
                 faults: FaultHooks) -> None:
        self.config, self.model_config, self.state = config, model_config, state
        self.guard, self.faults = guard, faults
        self.writer = format_class(format_name(config))()
        """The format this run writes."""

    # -- resume ---------------------------------------------------------------------------------------------------

    def find_resume(self) -> Path | None:
        """The verified checkpoint to resume from, or None for a fresh run.

        Raises:
            ConfigError: checkpoint.load holds no complete checkpoint.
            CheckpointCorruptError / ValueError: the checkpoint is damaged (and checkpoint.fallback is off).
        """
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

    def load_model(self, directory: Path, strategy: StepStrategy) -> None:
        """Load the checkpoint's weights into the strategy's plain modules (before strategy.setup())."""
        format_of(directory).load_model(directory, strategy, self.state)

    def restore(self, directory: Path, strategy: StepStrategy, schedule: LRSchedule, run_state: RunState) -> None:
        """Restore the optimizer, schedule, loss scaler, counters and guard (after strategy.setup()).

        Raises:
            ValueError: trainer_state.json is not one this trainer reads, or the optimizer state does not fit.
        """
        saved = checkpointing.read_trainer_state(directory)
        if saved.get("format") != TRAINER_STATE_FORMAT or saved.get("format_version") != TRAINER_STATE_VERSION:
            raise ValueError(f"{directory}: trainer_state.json format {saved.get('format')!r} v{saved.get('format_version')}, "
                             f"this trainer reads {TRAINER_STATE_FORMAT!r} v{TRAINER_STATE_VERSION}")
        missing = [key for key in RESTORED_SECTIONS if not isinstance(saved.get(key), dict)]
        if missing:
            raise ValueError(f"{directory / 'trainer_state.json'}: has no {' or '.join(missing)} section (a damaged "
                             "or hand-edited file); resume from another checkpoint (checkpoint.resume=PATH) or "
                             "move this one away")
        format_of(directory).load_optimizer(directory, strategy, self.state)
        schedule.load_state_dict(saved["schedule"])
        strategy.scaler.load_state_dict(saved["loss_scaler"])
        run_state.iteration, run_state.consumed_samples = int(saved["iteration"]), int(saved["consumed_samples"])
        run_state.best_val_loss = saved.get("best_val_loss")
        self.guard.load_state_dict(saved.get("nonfinite", {}))

    def load_rng_states(self, directory: Path) -> None:
        """Restore this rank's RNG states; the trainer calls it last, when nothing else will draw before step 1."""
        format_of(directory).load_rng(directory, self.state)

    # -- save -----------------------------------------------------------------------------------------------------

    def trainer_state(self, strategy: StepStrategy, schedule: LRSchedule, run_state: RunState) -> dict:
        """The JSON-ready trainer_state.json of the current step."""
        rs = run_state
        return {
            "format": TRAINER_STATE_FORMAT, "format_version": TRAINER_STATE_VERSION,
            "iteration": rs.iteration, "consumed_samples": rs.consumed_samples,
            "tokens": rs.consumed_samples * self.config.data.seq_len,
            "schedule": schedule.state_dict(), "loss_scaler": strategy.scaler.state_dict(),
            "val_loss": rs.last_val_loss if rs.last_val_iteration == rs.iteration else None,
            "best_val_loss": rs.best_val_loss,
            **strategy.layout_state(),
            "zero_stage": self.config.parallel.zero_stage, "precision": self.config.precision,
            "nonfinite": self.guard.state_dict(),
            "model_config": self.model_config.to_dict(),
        }

    def save_if_due(self, strategy: StepStrategy, schedule: LRSchedule, run_state: RunState) -> bool:
        """Save when `save_action` says so (every rank calls this after each step); True when the run must stop
        here (checkpoint.exit_at_iteration)."""
        ckpt, iteration = self.config.checkpoint, run_state.iteration
        action = save_action(iteration, self.config.schedule.train_steps, ckpt.interval, ckpt.exit_at_iteration,
                             self.guard.consecutive)
        if action == "hold":
            logger.warning("iteration %d: not saving during %d consecutive non-finite steps",
                           iteration, self.guard.consecutive)
        elif action == "save":
            self.save(strategy, schedule, run_state)
        if iteration == self.config.schedule.train_steps or ckpt.exit_at_iteration == iteration:
            self.writer.wait()  # the run ends here: a background save is finished before it does
        if ckpt.exit_at_iteration == iteration:
            logger.info("checkpoint.exit_at_iteration=%d reached: stopping", iteration)
            return True
        return False

    def save(self, strategy: StepStrategy, schedule: LRSchedule, run_state: RunState) -> Path:
        """Write a checkpoint of the current state (every rank calls this).

        Raises:
            NonFiniteTrainingError: some rank's weights hold a NaN or Inf; nothing is written and `latest` keeps
                pointing at the last good checkpoint (the diagnosis is written beside the checkpoints).
        """
        rs, config = run_state, self.config
        self.guard.check_weights(strategy.train_model, rs.iteration, rs.last_lr)
        val = rs.last_val_loss if rs.last_val_iteration == rs.iteration else None
        request = checkpointing.SaveRequest(
            iteration=rs.iteration,
            trainer_state=self.trainer_state(strategy, schedule, rs),
            config_yaml=config.to_yaml(),
            tokenizer=checkpointing.tokenizer_files(config.data.tokenizer_model, config.data.tokenizer_type),
            keep_last=config.checkpoint.keep_last,
            keep_best=config.checkpoint.keep_best,
            val_loss=val,
            kill_midway=self.faults.kill_during_save(rs.iteration),
        )
        start = time.perf_counter()
        path = self.writer.save(Path(config.checkpoint.dir), request, strategy, self.state)
        logger.info("saved checkpoint %s (%.1f s)", path, time.perf_counter() - start)
        return path


__all__ = ["CHECKPOINT_FORMATS", "CheckpointFormat", "Checkpointer", "Phi1Format", "TRAINER_STATE_FORMAT",
           "TRAINER_STATE_VERSION", "format_class", "format_name", "format_of", "save_action"]
