"""Training checkpoints that load at any layout: the run directory of `phi1.training.checkpointing`, with each
checkpoint in torch's `torch.distributed.checkpoint` (DCP) format (`phi1.parallel.distributed_checkpoint`).

    iter_0001000/
        .metadata  __0_0.distcp ...        DCP: every parameter and AdamW moment by NAME, each rank writing its own
                                           TP shard / pipeline stage in parallel (a DP replica's copy once)
        rank_state/rank00000.json|.safetensors   every rank's RNG states (python, numpy, torch, TP tracker)
        format.json                        {"format": "phi1-dcp", "layout": {"dp", "pp", "tp"}}
        model_config.json                  the ModelConfig (export needs no model)
        trainer_state.json                 iteration, consumed samples, schedule, loss scaler, validation loss...
        config.yaml                        the resolved TrainConfig
        tokenizer.json | tokenizer.model   a copy of the tokenizer
        manifest.json                      every other file's size and SHA-256
    latest, best                           as for the phi1 format

The run-directory rules are the phi1 format's, shared code: everything is written into `iter_NNNNNNN.tmp/`
and renamed by rank 0 once every rank's files are on disk, then `latest` is replaced atomically, `best` updated
and old checkpoints pruned (`checkpointing.publish`); a save killed at any moment leaves the old `latest` and its
complete directory; `remove_stale_temporaries` deletes what a crash left; rank 0 verifies the manifest before a
resume and falls back to an older checkpoint with `checkpoint.fallback` (`find_verified_checkpoint`).

What carries over a layout change (TP x PP x DP, one process):
- weights and AdamW state (exp_avg, exp_avg_sq, step), identical whole tensors: DCP reads from whatever chunks
  were written exactly the slice each rank now holds, so training continues with its optimizer;
- the data position: `consumed_samples`. `phi1.data.samplers.MicroBatchSampler` gives global step k the sample
  indices [k G, (k+1) G) (G the global batch) whatever the DP size (each micro-step takes M x D consecutive
  indices, rank r the r-th slice of M; G = M x D x accumulation), so a resumed run at another DP size, micro-batch
  size or accumulation continues at the next unseen sample: none skipped or repeated;
- the schedule, loss scaler and non-finite guard state (trainer_state.json).

What does not: each rank's RNG states are restored only when the layout (dp, pp, tp) is identical (then the
resume is bit-exact, dropout included). At another layout rank r's generators belonged to another place in the
layout, so the run keeps the generators seeded at start-up and says so in a warning: with dropout on, the masks
differ from an uninterrupted run; with dropout off nothing in a step draws random numbers, so the continued
losses equal the uninterrupted run's (within floating-point reordering).

An asynchronous save (`checkpoint.async_save`) copies the tensors to CPU memory (DCP's staging), returns, and
writes the files in a background thread over its own gloo group while the next steps run; `PendingCheckpoint.wait()`
(every rank; before the next save and at the end of the run) then renames the directory and moves `latest`.

Reading: a resume takes whichever format the checkpoint it finds has (`is_dcp_checkpoint`): this module's
`load_weights` / `load_optimizer` / `load_rng_states` read both, the phi1 format at any TP size or pipeline
layout too (weights merged and re-sliced by `phi1.loading`, AdamW state merged by name by
`phi1.loading.optimizer_state`).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from phi1.loading.checkpoints import is_dcp_checkpoint, iteration_dir, read_trainer_state
from phi1.loading.manifest import write_manifest
from phi1.parallel import distributed_checkpoint as dck
from phi1.parallel.state import ParallelState
from phi1.training import checkpointing
from phi1.training.checkpointer import CheckpointFormat
from phi1.training.checkpointing import CONFIG_FILE, SaveRequest, capture_rng_states, restore_rng_states

logger = logging.getLogger("phi1.train")

FORMATS = ("phi1", "dcp")
"""The formats a checkpoint can have on disk (`checkpoint.format` adds 'auto')."""


def format_of(directory: str | os.PathLike) -> str:
    """'dcp' or 'phi1': the format of a checkpoint directory."""
    return "dcp" if is_dcp_checkpoint(directory) else "phi1"


def layout_of(state: ParallelState) -> dict[str, int]:
    """This run's (dp, pp, tp) sizes, as format.json records them."""
    return {"dp": state.dp_size, "pp": getattr(state, "pp_size", 1), "tp": state.tp_size}


def mesh_of(state: ParallelState):
    """The (dp, pp, tp) DeviceMesh the checkpoint is written over; None in one process."""
    if state.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return None
    mesh = getattr(state, "mesh", None)
    if mesh is None:
        from phi1.parallel.pipeline import rank_grid

        mesh = dck.checkpoint_mesh(rank_grid(state.world_size, state.tp_size, getattr(state, "pp_size", 1)),
                                   device_type=state.device.type)
    return mesh


# ----------------------------------------------------------------------------------------------------------------
# Saving


class PendingCheckpoint:
    """A save in flight. `wait()` (collective: every rank calls it) finishes it: once every rank's tensor files
    are written, rank 0 copies the tokenizer and config.yaml in, writes the manifest and renames the directory,
    then moves `latest`, updates `best` and prunes. Returns the final checkpoint directory."""

    def __init__(self, run_dir: Path, request: SaveRequest, pending: dck.PendingSave) -> None:
        self.run_dir, self.request, self._pending = run_dir, request, pending
        self._result: Path | None = None

    @property
    def iteration(self) -> int:
        return self.request.iteration

    def wait(self) -> Path:
        if self._result is not None:
            return self._result
        self._pending.written()
        if self.request.kill_midway:
            logger.warning("faults.kill_during_save_at=%d: killing this process mid-checkpoint", self.request.iteration)
            for handler in logging.getLogger().handlers:
                handler.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        final = self._pending.wait()  # rank 0 seals (tokenizer, config.yaml, manifest) and renames
        if _rank() == 0:
            checkpointing.publish(self.run_dir, self.request)
        _barrier()
        self._result = final
        return final


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _sealer(request: SaveRequest):
    """Rank 0's last writes into the temporary directory before its rename: the files only rank 0 writes, then
    the manifest of everything."""

    def seal(tmp: Path) -> None:
        for name, source in request.tokenizer.items():
            shutil.copy2(source, tmp / name)
        (tmp / CONFIG_FILE).write_text(request.config_yaml)
        write_manifest(tmp)

    return seal


def save(run_dir: str | os.PathLike, request: SaveRequest, modules: Sequence[nn.Module],
         optimizer: torch.optim.Optimizer | None, state: ParallelState, *, model_config: dict | None = None,
         asynchronous: bool = False, async_group: dist.ProcessGroup | None = None) -> PendingCheckpoint:
    """Start writing a DCP checkpoint of this rank's modules and AdamW state (collective: every rank calls it).

    Args:
        run_dir: the run directory (checkpoint.dir); the checkpoint goes to iter_NNNNNNN inside it.
        request: iteration, trainer state, config YAML, tokenizer files, retention, fault injection.
        modules: the plain modules this rank holds (`[model]`, or its pipeline stages; full-model names).
        optimizer: their AdamW (or a ZeroRedundancyOptimizer over one), or None.
        state: this rank's layout.
        model_config: the ModelConfig as a dict (default: trainer_state["model_config"]).
        asynchronous: write in the background (needs `async_group` when distributed).
        async_group: a gloo group made once for the background writes (see `async_group_for`).
    Returns:
        The save in flight; call `.wait()` on every rank (a synchronous save only renames and publishes then).
    """
    run_dir = Path(run_dir)
    if _rank() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    config = model_config if model_config is not None else request.trainer_state.get("model_config")
    trainer_state = {**request.trainer_state, "pipeline_parallel": getattr(state, "pp_size", 1)}
    pending = dck.save_checkpoint(
        iteration_dir(run_dir, request.iteration), modules, optimizer, mesh_of(state),
        trainer_state=trainer_state, model_config=config, rank_state={"rng": capture_rng_states()},
        seal=_sealer(request), asynchronous=asynchronous, async_group=async_group)
    return PendingCheckpoint(run_dir, request, pending)


def async_group_for(state: ParallelState) -> dist.ProcessGroup | None:
    """The gloo group background saves coordinate over (collective: every rank calls it once, at start-up), so
    their collectives never interleave with the training step's on the default group; None in one process."""
    if state.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return None
    return dist.new_group(backend="gloo")


# ----------------------------------------------------------------------------------------------------------------
# Loading (either format)


def load_weights(directory: str | os.PathLike, modules: Sequence[nn.Module], state: ParallelState) -> None:
    """Load a checkpoint's weights, written at any layout in either format, into this rank's modules
    (collective for the dcp format). Call before the modules are wrapped for training.

    Raises:
        ValueError: tensors that do not fit the model, or a damaged / hostile checkpoint (naming it).
    """
    directory = Path(directory)
    if format_of(directory) == "dcp":
        dck.load_checkpoint(directory, modules, None, mesh_of(state))
        return
    checkpointing.load_weights_into_modules(modules, directory, whole_model=getattr(state, "pp_size", 1) == 1)


def load_optimizer(directory: str | os.PathLike, modules: Sequence[nn.Module], optimizer: torch.optim.Optimizer | None,
                   engine, state: ParallelState) -> None:
    """Restore the optimizer from a checkpoint written at any layout in either format (collective for dcp).

    A dcp checkpoint saved before any update holds no optimizer state: the optimizer is left as it is.

    Raises:
        ValueError: a dcp checkpoint for a DeepSpeed engine (ZeRO keeps its own format: resume with
            checkpoint.format=phi1), or state that does not fit (naming the checkpoint).
    """
    directory = Path(directory)
    if format_of(directory) == "phi1":
        checkpointing.load_optimizer_state(optimizer, engine, directory, state, modules=modules)
        return
    if engine is not None:
        raise ValueError(f"{directory}: a dcp checkpoint holds a torch AdamW, not DeepSpeed ZeRO's optimizer; resume "
                         "it with parallel.zero_stage=0 (or pipeline parallelism)")
    if optimizer is not None:
        dck.load_checkpoint(directory, modules, optimizer, mesh_of(state), weights=False)


def load_rng_states(directory: str | os.PathLike, state: ParallelState) -> bool:
    """Restore this rank's RNG states when the checkpoint was written at this very layout; else log why not and
    return False (see the module docstring for what that means for the run).

    Raises:
        ValueError: the rank state files are damaged or not what phi1 saves.
    """
    directory = Path(directory)
    if format_of(directory) == "phi1":
        return checkpointing.load_rng_states(directory, state)
    saved_layout = dck.read_format(directory).get("layout")
    if saved_layout != layout_of(state):
        if state.rank == 0:  # the same for every rank: said once
            logger.warning("%s: written at layout %s, this run is %s: RNG states not restored (the run goes on with the "
                           "generators seeded at start-up; with dropout on the masks differ from an uninterrupted run)",
                           directory, saved_layout, layout_of(state))
        return False
    saved = dck.read_rank_state(directory, state.rank)
    if not isinstance(saved, dict) or "rng" not in saved:
        raise ValueError(f"{directory}: no RNG states of rank {state.rank} (rank_state/rank{state.rank:05d}.json)")
    try:
        restore_rng_states(saved["rng"])
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError, AttributeError) as e:
        raise ValueError(f"{directory}: rank {state.rank}'s RNG states are not what phi1 saves "
                         f"({type(e).__name__}: {e})") from None
    return True


def read_state(directory: str | os.PathLike) -> dict:
    """The trainer_state.json of a checkpoint in either format."""
    return read_trainer_state(directory)


# ----------------------------------------------------------------------------------------------------------------
# The trainer's format plug-in (phi1.training.checkpointer.CHECKPOINT_FORMATS["dcp"])


class DCPFormat(CheckpointFormat):
    """The any-layout format for the trainer's Checkpointer. With `checkpoint.async_save` a save returns once
    the tensors are staged in CPU memory; the files are finished (renamed, `latest` moved) by `wait()`, which
    the next save calls first and the Checkpointer calls at the end of the run."""

    name = "dcp"

    def __init__(self) -> None:
        self._pending: PendingCheckpoint | None = None
        self._async_group: dist.ProcessGroup | None = None
        self._async_group_made = False

    @classmethod
    def recognizes(cls, directory: Path) -> bool:
        return is_dcp_checkpoint(directory)

    def save(self, run_dir: Path, request: SaveRequest, strategy, state: ParallelState) -> Path:
        self.wait()  # one save in flight at a time: the previous one is finished (and published) first
        asynchronous = bool(getattr(strategy.config.checkpoint, "async_save", False))
        if asynchronous and not self._async_group_made:
            self._async_group, self._async_group_made = async_group_for(state), True  # collective, once
        pending = save(run_dir, request, strategy.modules, strategy.optimizer, state,
                       asynchronous=asynchronous, async_group=self._async_group)
        if asynchronous and state.world_size > 1:
            self._pending = pending
            logger.info("writing checkpoint %s in the background", iteration_dir(run_dir, request.iteration))
            return iteration_dir(run_dir, request.iteration)
        return pending.wait()

    def wait(self) -> Path | None:
        """Finish the save in flight, if any (collective); returns its directory."""
        pending, self._pending = self._pending, None
        return pending.wait() if pending is not None else None

    def load_model(self, directory: Path, strategy, state: ParallelState) -> None:
        load_weights(directory, strategy.modules, state)

    def load_optimizer(self, directory: Path, strategy, state: ParallelState) -> None:
        load_optimizer(directory, strategy.modules, strategy.optimizer, strategy.engine, state)

    def load_rng(self, directory: Path, state: ParallelState) -> bool:
        return load_rng_states(directory, state)


__all__ = [
    "DCPFormat",
    "FORMATS",
    "PendingCheckpoint",
    "async_group_for",
    "format_of",
    "layout_of",
    "load_optimizer",
    "load_rng_states",
    "load_weights",
    "mesh_of",
    "read_state",
    "save",
]
