"""Training checkpoints that a crash cannot corrupt, and exact resume.

A run directory holds:

    iter_0001000/
        model_tp00-of-02.safetensors ...   model shards (phi1.parallel.checkpoint writes, phi1.loading reads, any TP size)
        optim_tp00.pt ...                  AdamW state of each TP rank (DDP: one copy, written by DP rank 0)
        zero/                              DeepSpeed's ZeRO optimizer partitions instead, under ZeRO
        rng_rank00000.pt ...               every rank's RNG states (python, numpy, torch CPU/CUDA, TP tracker)
        trainer_state.json                 iteration, consumed samples, schedule, loss scaler, validation loss
        config.yaml                        the resolved TrainConfig (model section = the exact ModelConfig)
        tokenizer.model | tokenizer.json   a copy of the tokenizer, so the checkpoint generates on its own
        manifest.json                      every other file's size and SHA-256 (phi1.training.fault)
    latest                                 text: the iteration of the newest complete checkpoint
    best                                   text: the iteration with the lowest validation loss

Everything is written into `iter_NNNNNNN.tmp/`; once every rank has finished, rank 0 renames it to
`iter_NNNNNNN/` and then replaces `latest` (write to a temporary file, `os.replace`). A process killed at any
moment leaves either the old `latest` with its complete directory, or the new one: never a half-written
checkpoint under a real name. Every `.pt` file is read with `torch.load(..., weights_only=True)`.

A file damaged after the save (a bad disk, a partial copy) is caught by the manifest: resuming verifies the
checkpoint first and names the damaged files; with `checkpoint.fallback` it resumes from the previous complete
checkpoint that verifies instead.

The model config is in `config.yaml` (section `model`, preset plus every field) and in each shard's
safetensors metadata; `load_model_from_training_checkpoint` returns both config and merged weights.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from phi1.core.config import ModelConfig
from phi1.loading.checkpoints import (
    TRAINER_STATE,
    complete_iterations,
    find_checkpoint,
    iteration_dir,
    load_checkpoint_state,
    load_resharded,
    read_trainer_state,
)
from phi1.loading.manifest import CheckpointCorruptError, verify_checkpoint, write_manifest
from phi1.loading.optimizer_state import load_pt  # noqa: F401  (re-exported: the trainer's callers read .pt files with it)
from phi1.loading.paths import inside, regular_file
from phi1.parallel.checkpoint import save_model_shard
from phi1.parallel.random import get_rng_tracker
from phi1.parallel.state import ParallelState

logger = logging.getLogger("phi1.train")

CONFIG_FILE = "config.yaml"
TOKENIZER_NAMES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json")


def _barrier(state: ParallelState) -> None:
    if state.world_size > 1 and dist.is_initialized():
        dist.barrier()


def _write_text_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------------
# RNG states


def capture_rng_states() -> dict:
    """This process's generators, as tensors and plain values (loadable with weights_only=True)."""
    version, mt_state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    states = {
        "python": [version, list(mt_state), gauss],
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch_cpu": torch.get_rng_state(),
        "tracker": get_rng_tracker().get_states(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["torch_cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict) -> None:
    version, mt_state, gauss = states["python"]
    random.setstate((version, tuple(mt_state), gauss))
    numpy_state = states["numpy"]
    np.random.set_state((numpy_state["name"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(states["torch_cpu"])
    if "torch_cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["torch_cuda"])
    get_rng_tracker().set_states(states["tracker"])


# ----------------------------------------------------------------------------------------------------------------
# Finding checkpoints


# complete_iterations, find_checkpoint, read_trainer_state and iteration_dir live in phi1.loading.checkpoints
# (every name read from a run directory stays inside it); imported above and re-exported for the trainer.


def find_verified_checkpoint(run_dir: str | os.PathLike, fallback: bool) -> Path | None:
    """The checkpoint to resume from (as `find_checkpoint`), verified against its manifest.

    With `fallback`, a checkpoint that fails verification is logged with its damaged files and the next older
    complete checkpoint is tried, and a `latest` that cannot be followed (not an iteration number, a symlink or
    an entry pointing out) is logged and passed over for the newest complete checkpoint. None when there is no
    checkpoint at all.

    Raises:
        CheckpointCorruptError: the checkpoint is damaged and `fallback` is off, or every one is damaged.
    """
    try:
        first = find_checkpoint(run_dir)
    except ValueError as e:  # `latest` (or the entry it names) is not to be followed
        if not fallback:
            raise
        logger.error("%s; checkpoint.fallback: taking the newest complete checkpoint instead", e)
        iterations = complete_iterations(run_dir)
        first = iteration_dir(run_dir, iterations[-1]) if iterations else None
    if first is None:
        return None
    candidates = [first]
    if first.parent == Path(run_dir):
        older = [iteration_dir(run_dir, i) for i in reversed(complete_iterations(run_dir))]
        candidates += [c for c in older if c != first]
    damaged: CheckpointCorruptError | None = None
    for candidate in candidates:
        try:
            verify_checkpoint(candidate)
            if damaged is not None:
                logger.warning("falling back to %s, the newest checkpoint that verifies", candidate)
            return candidate
        except CheckpointCorruptError as e:
            if not fallback:
                raise
            logger.error("%s", e)
            damaged = damaged or e
    raise CheckpointCorruptError(Path(run_dir), [f"no checkpoint verifies; the newest: {'; '.join(damaged.damaged)}"])


def load_model_from_training_checkpoint(directory: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(ModelConfig, whole CPU tensors) of a training checkpoint or of a run directory's latest checkpoint.

    Raises:
        FileNotFoundError: no complete checkpoint at `directory`.
        ValueError: a pointer or file that leaves the directory, or shards that do not match their config.
    """
    found = find_checkpoint(directory)
    if found is None:
        raise FileNotFoundError(f"{directory}: no phi1 training checkpoint (no trainer_state.json, no `latest`)")
    return load_checkpoint_state(found)


def tokenizer_files(tokenizer_model: str | None, tokenizer_type: str) -> dict[str, Path]:
    """{name in the checkpoint: source file} for the tokenizer of a run."""
    if tokenizer_model is None:
        return {}
    source = Path(tokenizer_model)
    if source.is_dir():
        return {name: source / name for name in TOKENIZER_NAMES if (source / name).is_file()}
    if tokenizer_type == "SentencePieceTokenizer":
        return {"tokenizer.model": source}
    return {"tokenizer.json" if source.suffix == ".json" else source.name: source}


# ----------------------------------------------------------------------------------------------------------------
# Saving


@dataclass
class SaveRequest:
    """What a checkpoint holds besides the model and optimizer."""

    iteration: int
    trainer_state: dict
    """JSON-ready: iteration, consumed samples, schedule, scaler, validation loss, ..."""
    config_yaml: str
    """The resolved TrainConfig as YAML."""
    tokenizer: dict[str, Path]
    """Files to copy, by their name in the checkpoint."""
    keep_last: int
    keep_best: bool
    val_loss: float | None
    """Validation loss at this iteration (for `best`), or None when not evaluated."""
    kill_midway: bool = False
    """Fault injection: SIGKILL after the model shards are written, before the rename."""


def save_checkpoint(run_dir: str | os.PathLike, request: SaveRequest, model, optimizer, engine, state: ParallelState) -> Path:
    """Write a checkpoint collectively (every rank calls this); return its final directory.

    Args:
        run_dir: the run directory (checkpoint.dir).
        request: iteration, trainer state, config and retention.
        model: the model, possibly DDP-wrapped (ignored when `engine` is given).
        optimizer: the torch optimizer of the DDP path, or None under ZeRO.
        engine: the DeepSpeed engine under ZeRO, else None.
        state: the parallel layout.
    """
    run_dir = Path(run_dir)
    final = iteration_dir(run_dir, request.iteration)
    tmp = final.with_name(final.name + ".tmp")
    if state.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # a crash left it; its contents are not trusted
        tmp.mkdir()
    _barrier(state)

    save_model_shard(engine.module if engine is not None else model, tmp, state)
    if request.kill_midway:
        logger.warning("faults.kill_during_save_at=%d: killing this process mid-checkpoint", request.iteration)
        os.kill(os.getpid(), signal.SIGKILL)
    if engine is not None:
        engine.save_checkpoint(str(tmp), tag="zero", save_latest=False)
    elif state.dp_rank == 0:
        torch.save(optimizer.state_dict(), tmp / f"optim_tp{state.tp_rank:02d}.pt")
    torch.save(capture_rng_states(), tmp / f"rng_rank{state.rank:05d}.pt")
    if state.rank == 0:
        for name, source in request.tokenizer.items():
            shutil.copy2(source, tmp / name)
        (tmp / CONFIG_FILE).write_text(request.config_yaml)
        # Written last: a directory with trainer_state.json is complete (complete_iterations relies on it).
        _write_text_atomically(tmp / TRAINER_STATE, json.dumps(request.trainer_state, indent=1) + "\n")
    _barrier(state)

    if state.rank == 0:
        write_manifest(tmp)  # every rank's files are in place (barrier above); last before the rename
        if final.exists():  # saving the same iteration again (e.g. after a resume): replace it
            old = final.with_name(final.name + ".old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        publish(run_dir, request)
    _barrier(state)
    return final


def publish(run_dir: str | os.PathLike, request: SaveRequest) -> None:
    """Rank 0, once a checkpoint directory is complete under its final name (in either format): point `latest`
    at it, update `best`, and delete checkpoints beyond `keep_last` (sparing the best one)."""
    run_dir = Path(run_dir)
    _write_text_atomically(run_dir / "latest", f"{request.iteration}\n")
    _update_best(run_dir, request)
    _prune(run_dir, request)


def _update_best(run_dir: Path, request: SaveRequest) -> None:
    if request.val_loss is None:
        return
    pointer = run_dir / "best"
    best_loss = None
    if pointer.is_file():
        try:
            best_iteration = int(pointer.read_text().split()[0])
            best_loss = read_trainer_state(iteration_dir(run_dir, best_iteration)).get("val_loss")
        except (ValueError, FileNotFoundError, IndexError):
            best_loss = None
    if best_loss is None or request.val_loss < best_loss:
        _write_text_atomically(pointer, f"{request.iteration} {request.val_loss!r}\n")


def best_iteration(run_dir: str | os.PathLike) -> int | None:
    pointer = Path(run_dir) / "best"
    if not pointer.is_file():
        return None
    try:
        return int(pointer.read_text().split()[0])
    except (ValueError, IndexError):
        return None


def _prune(run_dir: Path, request: SaveRequest) -> None:
    """Delete checkpoints beyond the last `keep_last`, sparing the best one when `keep_best`."""
    if request.keep_last <= 0:
        return
    iterations = complete_iterations(run_dir)
    keep = set(iterations[-request.keep_last:]) | {request.iteration}
    best = best_iteration(run_dir)
    if request.keep_best and best is not None:
        keep.add(best)
    for iteration in iterations:
        if iteration not in keep:
            shutil.rmtree(iteration_dir(run_dir, iteration), ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------
# Loading


def load_model_weights(model, checkpoint_dir: str | os.PathLike) -> None:
    """Load a checkpoint's model shards (saved at any TP size) into `model` at its own TP size."""
    load_resharded(model, checkpoint_dir)


def load_weights_into_modules(modules, checkpoint_dir: str | os.PathLike, whole_model: bool = True) -> None:
    """Load a phi1-format checkpoint's weights (saved at any TP size) into this rank's modules: `[model]`, or
    pipeline stages (full-model parameter names), each taking its own names and its TP shard of them.

    Args:
        whole_model: the modules together hold the whole model (no pipeline), so a tensor of the checkpoint
            that none of them has is an error too.
    Raises:
        ValueError: naming the checkpoint and the tensors that are missing, unexpected or mis-shaped.
    """
    from phi1.core.pretrained import load_state_dict_into

    _, weights = load_checkpoint_state(checkpoint_dir)
    held = set()
    for module in modules:
        inner = getattr(module, "module", module)
        names = {name for name, _ in inner.named_parameters()}
        held |= names
        load_state_dict_into(inner, {k: v for k, v in weights.items() if k in names}, source=str(checkpoint_dir))
    extra = sorted(set(weights) - held)
    if whole_model and extra:
        raise ValueError(f"{checkpoint_dir}: does not fit the model: unexpected tensors {extra[:5]}")


# The only classes DeepSpeed's ZeRO files pickle (deepspeed 0.19: stages 1 to 3), besides what torch's
# weights_only loader allows anyway.
ZERO_PICKLE_GLOBALS = frozenset({
    "deepspeed.utils.tensor_fragment.fragment_address",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
})


def check_zero_files(checkpoint_dir: str | os.PathLike) -> None:
    """Refuse ZeRO files that could run code: DeepSpeed unpickles them with weights_only off, so
    before it does, every file under `zero/` must be a regular file inside the checkpoint whose pickle names no
    callable beyond torch's weights-only allowlist and ZERO_PICKLE_GLOBALS (read from the pickle's opcodes:
    no tensor data is loaded, nothing is executed).

    Raises:
        ValueError: naming the file and the first foreign global, or a file that leaves the directory.
    """
    checkpoint_dir = Path(checkpoint_dir)
    zero = inside(checkpoint_dir, "zero", "directory")
    for path in sorted(zero.rglob("*")):
        shown = checkpoint_dir / path.relative_to(zero.parent)
        inside(checkpoint_dir, path.relative_to(zero.parent), "ZeRO file")
        if path.is_dir():
            continue
        regular_file(path, shown)
        try:
            found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception as e:  # not a zip, a damaged archive, a malformed pickle
            raise ValueError(f"{shown}: damaged or not a torch file ({type(e).__name__})") from None
        foreign = sorted(set(found) - ZERO_PICKLE_GLOBALS)
        if foreign:
            raise ValueError(f"{shown}: its pickle names {foreign[:3]}, which DeepSpeed's ZeRO files never hold; refused "
                             "(DeepSpeed would load it with weights_only=False and run that code)")


def load_optimizer_state(optimizer, engine, checkpoint_dir: str | os.PathLike, state: ParallelState,
                         modules=None) -> None:
    """Restore the optimizer of the DDP path (or DeepSpeed's under ZeRO) from a phi1-format checkpoint.

    At the layout that wrote it, the optimizer's own `state_dict` is loaded as it is (bit-exact). At another
    layout (another TP size, pipeline stages) and given `modules`, the AdamW state is merged across the saved TP
    ranks by parameter NAME (`phi1.loading.optimizer_state`) and each of this rank's parameters takes its TP
    slice: training continues with its optimizer.

    Args:
        modules: the plain modules this rank holds (`[model]`, or its pipeline stages with full-model names);
            needed to reshard.
    Raises:
        ValueError: ZeRO state at another TP size or with(out) ZeRO (DeepSpeed's partitions only resume at
            the layout that wrote them), or files that do not describe this model's AdamW.
    """
    checkpoint_dir = Path(checkpoint_dir)
    saved = read_trainer_state(checkpoint_dir)
    same_tp = saved.get("tensor_parallel") == state.tp_size and getattr(state, "pp_size", 1) == 1
    if engine is not None:
        if not same_tp:
            raise ValueError(
                f"{checkpoint_dir}: ZeRO optimizer state written at tensor_parallel={saved.get('tensor_parallel')}, "
                f"this run has {state.tp_size}; DeepSpeed's partitions resume only at their own layout (resume with "
                "the same parallel.tensor_parallel, or start fresh from the weights with finetune.init_from)")
        if not (checkpoint_dir / "zero").is_dir():
            raise ValueError(f"{checkpoint_dir}: no ZeRO optimizer state (written with parallel.zero_stage=0)")
        check_zero_files(checkpoint_dir)
        engine.load_checkpoint(str(checkpoint_dir), tag="zero", load_optimizer_states=True,
                               load_lr_scheduler_states=False, load_module_only=False)
        return
    if (checkpoint_dir / "zero").is_dir() and not (checkpoint_dir / f"optim_tp{0:02d}.pt").is_file():
        raise ValueError(f"{checkpoint_dir}: its optimizer state is DeepSpeed ZeRO's (written with parallel.zero_stage"
                         " > 0); resume with the same parallel.zero_stage")
    if not same_tp:
        if modules is None:
            raise ValueError(
                f"{checkpoint_dir}: optimizer state written at tensor_parallel={saved.get('tensor_parallel')}, this "
                f"run has {state.tp_size}; resume with the same parallel.tensor_parallel (or start fresh from the "
                "weights with finetune.init_from)")
        load_optimizer_by_name(optimizer, modules, checkpoint_dir)
        return
    path = checkpoint_dir / f"optim_tp{state.tp_rank:02d}.pt"
    if not path.is_file():
        raise ValueError(f"{path}: missing (written under ZeRO? resume with the same parallel.zero_stage)")
    try:
        optimizer.load_state_dict(load_pt(path, map_location=state.device))
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: not an AdamW state of this model ({type(e).__name__}: {e})") from None
    except ValueError as e:
        if str(path) in str(e):
            raise
        raise ValueError(f"{path}: does not fit this model's optimizer ({e})") from None


def load_optimizer_by_name(optimizer, modules, checkpoint_dir: str | os.PathLike) -> int:
    """Give each parameter of `modules` its AdamW state from a phi1-format checkpoint written at any TP size,
    merged by name and sliced to this rank's TP shard; returns how many parameters got state (0: the checkpoint
    was written before any update).

    Raises:
        ValueError: the optimizer files do not describe this model's AdamW (naming the checkpoint).
    """
    from phi1.core.pretrained import shard_for_rank
    from phi1.loading.checkpoints import load_shard_config
    from phi1.loading.optimizer_state import optimizer_state_by_name
    from phi1.parallel.distributed_checkpoint import set_adamw_state
    from phi1.parallel.layers import tensor_parallel_dims
    from phi1.parallel.mappings import group_rank, group_size

    checkpoint_dir = Path(checkpoint_dir)
    merged = optimizer_state_by_name(checkpoint_dir, load_shard_config(checkpoint_dir))
    if merged is None:
        raise ValueError(f"{checkpoint_dir}: no optim_tpNN.pt files; the optimizer state is missing")
    count = 0
    for module in modules:
        inner = getattr(module, "module", module)
        group = getattr(inner, "tp_group", None)
        tp_size, tp_rank = group_size(group), group_rank(group)
        dims = tensor_parallel_dims(inner)
        for name, param in inner.named_parameters():
            slot = merged.get(name)
            if slot is None:
                continue
            exp_avg, exp_avg_sq = (shard_for_rank(slot[key], dims[name], tp_size, tp_rank) for key in ("exp_avg", "exp_avg_sq"))
            try:
                set_adamw_state(optimizer, param, exp_avg, exp_avg_sq, slot["step"])
            except ValueError as e:
                raise ValueError(f"{checkpoint_dir}: AdamW state of {name}: {e}") from None
            count += 1
    return count


def load_rng_states(checkpoint_dir: str | os.PathLike, state: ParallelState) -> bool:
    """Restore this rank's RNG states; False (and a warning) when the checkpoint had another layout (world size,
    TP or PP size): rank r's generators then belong to another place in the layout, so the run goes on with the
    generators seeded at start-up (dropout masks differ from an uninterrupted run; with dropout off, nothing
    else draws random numbers in a step)."""
    path = Path(checkpoint_dir) / f"rng_rank{state.rank:05d}.pt"
    saved = read_trainer_state(checkpoint_dir)
    layout = (saved.get("world_size"), saved.get("tensor_parallel"), saved.get("pipeline_parallel", 1))
    if layout != (state.world_size, state.tp_size, getattr(state, "pp_size", 1)) or not path.is_file():
        logger.warning("%s: written by %s processes (tensor parallel %s, pipeline parallel %s), this run has %d (%d, "
                       "%d): RNG states not restored (resume is not bit-exact with dropout on)", checkpoint_dir,
                       *layout, state.world_size, state.tp_size, getattr(state, "pp_size", 1))
        return False
    states = load_pt(path)
    try:
        restore_rng_states(states)
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
        raise ValueError(f"{path}: not the RNG states phi1 saves ({type(e).__name__}: {e})") from None
    return True


def remove_stale_temporaries(run_dir: str | os.PathLike) -> list[Path]:
    """Delete `iter_*.tmp` directories left by a crash during a save (rank 0 only); return them."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    stale = [p for p in run_dir.iterdir() if p.is_dir() and p.name.startswith("iter_") and p.name.endswith((".tmp", ".old"))]
    for path in stale:
        logger.warning("removing %s, left by an interrupted checkpoint save", path)
        shutil.rmtree(path, ignore_errors=True)
    return stale
