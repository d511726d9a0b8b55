"""Reading training checkpoints: finding one in a run directory, and merging its TP shards to whole tensors.

    run/latest                               text: the iteration of the newest complete checkpoint
    run/iter_0001000/trainer_state.json      present once the checkpoint is complete
    run/iter_0001000/model_tp00-of-02.safetensors ...   one file per TP rank (phi1.parallel.checkpoint writes them)

Every name comes from the run directory and is kept inside it (`phi1.loading.paths.inside`): a `latest` that is
a symlink, FIFO or anything but a short integer, an `iter_*` entry that is a symlink pointing out, or a shard that
is one, is refused with a message naming the run directory and the entry. Shard headers are checked
(`phi1.loading.safetensors_file`) and compared with the config in their metadata before any tensor is read.

A checkpoint in the `torch.distributed.checkpoint` format (`format.json` + `.metadata` + `*.distcp`, written at
any TP x PP x DP layout by `phi1.parallel.distributed_checkpoint`) is read through that module's checked reader,
after its metadata's names, shapes and dtypes are compared with its `model_config.json`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path

import torch

from phi1.core.config import ModelConfig
from phi1.core.pretrained import expected_shapes, load_state_dict_into, save_pretrained
from phi1.loading.paths import MAX_POINTER_BYTES, inside, read_bounded_text, read_json_object
from phi1.loading.safetensors_file import SafetensorsHeader, check_weight_dtypes, load_tensors, read_header
from phi1.parallel.checkpoint import SHARD_FORMAT, SHARD_FORMAT_VERSION

logger = logging.getLogger("phi1.loading")

ITER_DIR = re.compile(r"^iter_(\d{7,})$")
TRAINER_STATE = "trainer_state.json"
SELECTED = "selected"
"""The run directory's pointer to the checkpoint `finetune.select_by` chose (as `latest` names the newest)."""
_SHARD_NAME = re.compile(r"^model_tp(\d{2,})-of-(\d{2,})\.safetensors$")
MAX_TP_SIZE = 4096


def iteration_dir(run_dir: str | os.PathLike, iteration: int) -> Path:
    return Path(run_dir) / f"iter_{iteration:07d}"


def is_checkpoint(path: str | os.PathLike) -> bool:
    """True when `path` is a complete checkpoint directory (it holds trainer_state.json)."""
    return os.path.lexists(Path(path) / TRAINER_STATE)


def complete_iterations(run_dir: str | os.PathLike) -> list[int]:
    """Iterations with a complete (renamed) checkpoint directory inside `run_dir`, ascending.

    An `iter_*` entry that leaves the run directory (a symlink pointing out) is skipped with a warning.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for path in run_dir.iterdir():
        match = ITER_DIR.match(path.name)
        if not match:
            continue
        try:
            resolved = inside(run_dir, path.name, "entry")
        except ValueError as e:
            logger.warning("%s", e)
            continue
        if resolved.is_dir() and is_checkpoint(resolved):
            found.append(int(match.group(1)))
    return sorted(found)


def _read_pointer(run_dir: Path, name: str, remedy: str) -> int:
    """The iteration the pointer file `run_dir/name` (`latest`, `selected`) names.

    Raises:
        ValueError: the pointer leaves the directory, is not a small regular file, or holds anything but an
            iteration number (`remedy` says what to do).
    """
    inside(run_dir, name, "pointer")
    text = read_bounded_text(run_dir / name, run_dir / name, MAX_POINTER_BYTES)
    value = text.strip()
    if not value.isascii() or not value.isdigit():
        raise ValueError(f"{run_dir / name}: holds {len(text)} characters that are not an iteration number; it "
                         f"must name the iteration of a complete iter_* checkpoint ({remedy})")
    return int(value)


def _read_latest(run_dir: Path) -> int:
    """The iteration `run_dir/latest` names (ValueError as `_read_pointer`)."""
    return _read_pointer(run_dir, "latest", "delete it to use the newest one")


def find_selected(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint `run_dir/selected` names (written by `finetune.select_by`, phi1.training.checkpoint_selection),
    or None when the run has no `selected`.

    Raises:
        ValueError: `selected` leaves the run directory, is not a small regular file holding an iteration
            number, or names no complete checkpoint (pruned or deleted since the selection): a choice that can
            no longer be honoured is reported, never replaced by another checkpoint in silence.
    """
    run_dir = Path(run_dir)
    if not os.path.lexists(run_dir / SELECTED):
        return None
    remedy = (f"delete it to use latest, or choose again with python -m phi1.training.checkpoint_selection {run_dir}")
    iteration = _read_pointer(run_dir, SELECTED, remedy)
    candidate = iteration_dir(run_dir, iteration)
    inside(run_dir, candidate.name, "entry named by selected")
    if not (candidate.is_dir() and is_checkpoint(candidate)):
        raise ValueError(f"{run_dir / SELECTED}: names iteration {iteration}, which has no complete checkpoint in "
                         f"{run_dir} (pruned or deleted since the selection); {remedy}, or pass an iter_* directory")
    return candidate


def find_checkpoint(path: str | os.PathLike) -> Path | None:
    """The checkpoint directory a path stands for: `path` itself when it is one, else the run directory's
    `latest`; when `latest` is missing or names a directory that is gone, the newest complete checkpoint.
    (Resuming training continues from here; loading a model for inference prefers `selected`, see
    `phi1.loading.model_path.resolve_model_path`.)

    Returns:
        The checkpoint directory (inside `path`), or None when the run directory holds none.

    Raises:
        ValueError: `latest` or the `iter_*` entry it names leaves the run directory, or `latest` is not a small
            regular file holding an iteration number.
    """
    path = Path(path)
    if is_checkpoint(path):
        return path
    if os.path.lexists(path / "latest"):
        candidate = iteration_dir(path, _read_latest(path))
        inside(path, candidate.name, "entry named by latest")
        if candidate.is_dir() and is_checkpoint(candidate):
            return candidate
        logger.warning("%s names no complete checkpoint; taking the newest complete one", path / "latest")
    iterations = complete_iterations(path)
    return iteration_dir(path, iterations[-1]) if iterations else None


def read_trainer_state(checkpoint_dir: str | os.PathLike) -> dict:
    """The checkpoint's trainer_state.json (a bounded regular file inside the checkpoint).

    Raises:
        ValueError: it leaves the directory, is not a regular file, or is not a JSON object (names the file).
    """
    checkpoint_dir = Path(checkpoint_dir)
    inside(checkpoint_dir, TRAINER_STATE, "file")
    state = read_json_object(checkpoint_dir / TRAINER_STATE)
    _check_trainer_state(checkpoint_dir, state)
    return state


TRAINER_STATE_FORMAT = "phi1-training-checkpoint"
_MAX_COUNT = 1 << 62


def _check_trainer_state(checkpoint_dir: Path, state: dict) -> None:
    """Refuse a trainer_state.json whose fields a resume would read as something else: counters that are not
    whole numbers >= 0, an iteration other than the directory's, and (in the trainer's own format) a schedule or
    loss-scaler state that is not an object holding the numbers the trainer restores. Fields a file lacks
    altogether are left to its reader.

    Raises:
        ValueError: naming the file and the field.
    """
    path = checkpoint_dir / TRAINER_STATE

    def count(where: str, value) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < _MAX_COUNT:
            raise ValueError(f"{path}: {where} is {str(value)[:40]!r}, not a whole number >= 0; a damaged or edited "
                             "checkpoint: load an older one")

    def number(where: str, value, positive: bool = False) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (
                positive and value <= 0):
            raise ValueError(f"{path}: {where} is {str(value)[:40]!r}, not a finite number{' > 0' if positive else ''}; "
                             "a damaged or edited checkpoint: load an older one")

    for key in ("iteration", "consumed_samples", "tokens"):
        if key in state:
            count(key, state[key])
    match = ITER_DIR.match(checkpoint_dir.name)
    if match and "iteration" in state and state["iteration"] != int(match.group(1)):
        raise ValueError(f"{path}: says iteration {state['iteration']}, but the directory is {checkpoint_dir.name}; a "
                         "damaged or edited checkpoint: load an older one")
    for key in ("val_loss", "best_val_loss"):  # NaN is allowed: a validation loss can be one
        value = state.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"{path}: {key} is {str(value)[:40]!r}, not a number or null; a damaged or edited "
                             "checkpoint: load an older one")
    if state.get("format") != TRAINER_STATE_FORMAT:
        return
    for key, required in (("schedule", ("num_updates",)), ("loss_scaler", ("scale", "skipped_steps")),
                          ("nonfinite", ())):
        if key not in state:
            continue
        section = state[key]
        if not isinstance(section, dict) or any(name not in section for name in required):
            raise ValueError(f"{path}: {key!r} must be an object with {', '.join(required) or 'counts'}; a damaged or "
                             "edited checkpoint: load an older one")
        for name, value in section.items():
            if name in ("num_updates", "skipped_steps", "clean_steps", "growth_interval", "total"):
                count(f"{key}.{name}", value)
            elif name in ("scale", "min_scale"):
                number(f"{key}.{name}", value, positive=True)


def shard_files(directory: str | os.PathLike) -> tuple[int, list[Path]]:
    """(TP size, the shard of each TP rank in order) of a checkpoint directory.

    Raises:
        FileNotFoundError: no shards, or some TP rank's shard missing.
        ValueError: shards of several TP sizes, or a shard that leaves the directory.
    """
    directory = Path(directory)
    found: dict[int, dict[int, Path]] = {}
    for path in directory.iterdir():
        match = _SHARD_NAME.match(path.name)
        if match:
            inside(directory, path.name, "shard")
            found.setdefault(int(match.group(2)), {})[int(match.group(1))] = directory / path.name
    if not found:
        raise FileNotFoundError(f"{directory}: no model_tpNN-of-NN.safetensors shards")
    if len(found) > 1:
        raise ValueError(f"{directory}: shards of several TP sizes {sorted(found)}; keep one set")
    (tp_size, by_rank), = found.items()
    if not 1 <= tp_size <= MAX_TP_SIZE:
        raise ValueError(f"{directory}: shard names say TP size {tp_size}; expected 1 to {MAX_TP_SIZE}")
    missing = sorted(set(range(tp_size)) - set(by_rank))
    if missing:
        raise FileNotFoundError(f"{directory}: TP size {tp_size} but the shards of TP ranks {missing[:8]} are missing")
    extra = sorted(set(by_rank) - set(range(tp_size)))
    if extra:
        raise ValueError(f"{directory}: shards of TP ranks {extra[:8]} beyond TP size {tp_size}")
    return tp_size, [by_rank[r] for r in range(tp_size)]


def _shard_metadata(header: SafetensorsHeader, tp_size: int, tp_rank: int) -> tuple[dict, ModelConfig]:
    path, meta = header.path, header.metadata
    if meta.get("format") != SHARD_FORMAT:
        raise ValueError(f"{path}: not a phi1 TP shard (metadata format {meta.get('format')!r})")
    if meta.get("format_version") != str(SHARD_FORMAT_VERSION):
        raise ValueError(f"{path}: shard format version {meta.get('format_version')}, this reader knows {SHARD_FORMAT_VERSION}")
    if (meta.get("tp_size"), meta.get("tp_rank")) != (str(tp_size), str(tp_rank)):
        raise ValueError(f"{path}: metadata says TP rank {meta.get('tp_rank')} of {meta.get('tp_size')}, the name says "
                         f"{tp_rank} of {tp_size}")
    try:
        dims = json.loads(meta["partition_dims"])
        values = json.loads(meta["model_config"])
    except (KeyError, ValueError, RecursionError) as e:
        raise ValueError(f"{path}: metadata lacks readable partition_dims / model_config ({type(e).__name__})") from None
    if not isinstance(dims, dict) or not all(d is None or (isinstance(d, int) and not isinstance(d, bool)) for d in dims.values()):
        raise ValueError(f"{path}: metadata partition_dims must map tensor names to a dim or null")
    if not isinstance(values, dict):
        raise ValueError(f"{path}: metadata model_config is not an object")
    try:
        config = ModelConfig.from_dict(values)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: metadata model_config: {e}") from None
    return dims, config


def read_shard_headers(directory: str | os.PathLike) -> tuple[ModelConfig, dict, list[SafetensorsHeader]]:
    """The config, partition dims and checked headers of every shard, each tensor compared with the config.

    Raises:
        ValueError: naming the shard file and the tensor for any header that lies, a tensor of the wrong dtype,
            shape (for its TP rank) or name, and any missing tensor.
    """
    tp_size, paths = shard_files(directory)
    headers = [read_header(p) for p in paths]
    dims, config = _shard_metadata(headers[0], tp_size, 0)
    for rank, header in enumerate(headers[1:], start=1):
        other_dims, other_config = _shard_metadata(header, tp_size, rank)
        if other_config != config or other_dims != dims:
            raise ValueError(f"{header.path}: metadata (model config or partition dims) differs from {paths[0].name}'s")
    expected = expected_tensor_shapes(config, len(headers[0].tensors), paths[0], f"{paths[0].name}'s model_config")
    for header in headers:
        check_weight_dtypes(header)
        shard_expected = {}
        for name, shape in expected.items():
            dim = dims.get(name)
            if dim is not None:
                if not 0 <= dim < len(shape) or shape[dim] % tp_size:
                    raise ValueError(f"{header.path}: tensor {name!r}: partition dim {dim} cannot split shape "
                                     f"{shape} into {tp_size} parts")
                shape = tuple(s // tp_size if i == dim else s for i, s in enumerate(shape))
            shard_expected[name] = shape
        compare_tensors(header, shard_expected, f"the model config in {paths[0].name}'s metadata")
    return config, dims, headers


def expected_tensor_shapes(config: ModelConfig, tensors_in_files: int, weights: Path, config_source: str,
                           shapes_of=expected_shapes) -> dict[str, tuple[int, ...]]:
    """`shapes_of(config)`, after refusing a config with more layers than the weights hold tensors (every layer
    has at least 10), so an absurd n_layer is named instead of enumerated.

    Raises:
        ValueError: naming the weights, the config's layer count and the tensor count.
    """
    if config.n_layer > tensors_in_files:
        raise ValueError(f"{weights}: holds {tensors_in_files} tensors, but {config_source} says "
                         f"n_layer={config.n_layer}, which needs at least {10 * config.n_layer + 5}")
    return shapes_of(config)


def compare_tensors(header: SafetensorsHeader, expected: dict[str, tuple[int, ...]], against: str,
                    ignore=lambda name: False) -> None:
    """Raise ValueError naming the file and tensors whose names or shapes differ from `expected`."""
    problems = []
    for name, entry in header.tensors.items():
        if ignore(name):
            continue
        if name not in expected:
            problems.append(f"tensor {name!r} is not part of the model")
        elif entry.shape != expected[name]:
            problems.append(f"tensor {name!r} has shape {list(entry.shape)}, {against} needs {list(expected[name])}")
    missing = sorted(set(expected) - set(header.tensors))
    if missing:
        problems.append(f"tensors missing: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if problems:
        more = f" (and {len(problems) - 4} more)" if len(problems) > 4 else ""
        raise ValueError(f"{header.path}: {'; '.join(problems[:4])}{more}")


def is_dcp_checkpoint(directory: str | os.PathLike) -> bool:
    """True for a checkpoint in the `torch.distributed.checkpoint` format (phi1.parallel.distributed_checkpoint),
    which loads at any TP x PP x DP layout; False for one holding TP shards."""
    from phi1.parallel.distributed_checkpoint import FORMAT_FILE

    return os.path.lexists(Path(directory) / FORMAT_FILE)


def _dcp_config(directory: Path) -> ModelConfig:
    from phi1.parallel.distributed_checkpoint import MODEL_CONFIG_FILE, read_format

    read_format(directory)
    inside(directory, MODEL_CONFIG_FILE, "file")
    values = read_json_object(directory / MODEL_CONFIG_FILE)
    try:
        return ModelConfig.from_dict(values)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{directory / MODEL_CONFIG_FILE}: {e}") from None


def _load_dcp(directory: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Whole tensors of a DCP checkpoint of any layout, after its metadata (names, shapes, dtypes) is compared
    with its model config."""
    from phi1.parallel.distributed_checkpoint import (
        MODEL_CONFIG_FILE,
        MODEL_PREFIX,
        read_full_state_dict,
        read_metadata,
    )

    config = _dcp_config(directory)
    entries = {key[len(MODEL_PREFIX):]: entry for key, entry in read_metadata(directory).state_dict_metadata.items()
               if key.startswith(MODEL_PREFIX)}
    expected = expected_tensor_shapes(config, len(entries), directory / ".metadata", MODEL_CONFIG_FILE)
    for name, entry in entries.items():
        dtype = getattr(getattr(entry, "properties", None), "dtype", None)
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"{directory / '.metadata'}: tensor {name!r} has dtype {dtype}; model weights are "
                             "float32, float16 or bfloat16")
    return config, read_full_state_dict(directory, expected=expected)


def load_shard_config(directory: str | os.PathLike) -> ModelConfig:
    """The ModelConfig recorded in a checkpoint directory (its TP shards' metadata, or a DCP checkpoint's
    model_config.json)."""
    if is_dcp_checkpoint(directory):
        return _dcp_config(Path(directory))
    return read_shard_headers(directory)[0]


def load_model_shards(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Whole tensors merged from every TP shard in `directory` (any TP size), on CPU, after every header has
    been checked against the config.

    Sharded tensors are concatenated along their recorded dim; replicated ones are taken from rank 0.
    """
    return load_checkpoint_state(directory)[1]


def load_checkpoint_state(directory: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(ModelConfig, whole CPU tensors) of one checkpoint directory: TP shards of any TP size merged, or a DCP
    checkpoint of any layout read in this process."""
    if is_dcp_checkpoint(directory):
        return _load_dcp(Path(directory))
    config, dims, headers = read_shard_headers(directory)
    shards = [load_tensors(header) for header in headers]
    merged = {}
    for name in sorted(shards[0]):
        dim = dims.get(name)
        parts = [shard[name] for shard in shards]
        merged[name] = parts[0] if dim is None or len(parts) == 1 else torch.cat(parts, dim=dim)
    return config, merged


def load_resharded(model: torch.nn.Module, directory: str | os.PathLike) -> None:
    """Load a checkpoint saved at any TP size into `model` at its own TP size (whole tensors sliced per rank).

    Raises:
        ValueError: naming every tensor that is missing, unexpected or of the wrong shape.
    """
    inner = getattr(model, "module", model)
    load_state_dict_into(inner, load_model_shards(directory), source=str(directory))


def export_pretrained(shard_directory: str | os.PathLike, out_directory: str | os.PathLike, fmt: str = "hf") -> Path:
    """Merge the TP shards of `shard_directory` (any TP size) into a phi1 or HuggingFace model directory."""
    config, state = load_checkpoint_state(shard_directory)
    return save_pretrained(state, config, out_directory, fmt=fmt)
