"""Model checkpoints as one safetensors file per tensor-parallel rank, loadable at any TP size.

    model_tp00-of-02.safetensors   model_tp01-of-02.safetensors

Each file holds that TP rank's shards under the model's parameter names; its metadata records the TP size and
rank, the split dim of every tensor and the model config, so merging needs no model. A checkpoint saved at TP
size n loads into a model at TP size m by merging to whole tensors and slicing again
(`phi1.core.pretrained.load_state_dict_into`); `export_pretrained` writes a phi1 or HuggingFace directory from
shards of any TP size.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from phi1.core.config import ModelConfig
from phi1.core.pretrained import load_state_dict_into, save_pretrained
from phi1.parallel.grads import unwrap_model
from phi1.parallel.layers import tensor_parallel_dims
from phi1.parallel.state import ParallelState

SHARD_FORMAT = "phi1-tp-shard"
SHARD_FORMAT_VERSION = 1
_SHARD_NAME = re.compile(r"^model_tp(\d{2,})-of-(\d{2,})\.safetensors$")


def shard_file_name(tp_rank: int, tp_size: int) -> str:
    return f"model_tp{tp_rank:02d}-of-{tp_size:02d}.safetensors"


def _gathered_if_zero3(params: list[nn.Parameter]):
    """Under ZeRO-3 each DP rank holds a slice of every parameter: gather them for the duration of the save."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


def save_model_shard(model: nn.Module, directory: str | os.PathLike, state: ParallelState) -> Path | None:
    """Write this TP rank's parameters to `directory/model_tp{tp_rank:02d}-of-{tp_size:02d}.safetensors`.

    Call on every rank (under ZeRO-3 the parameters are gathered collectively); only DP rank 0 of each TP rank
    writes. `model` may be wrapped by DDP or DeepSpeed.

    Returns:
        The file written, or None on ranks that do not write.
    """
    inner = unwrap_model(model)
    directory = Path(directory)
    params = dict(inner.named_parameters())
    dims = tensor_parallel_dims(inner)
    path = directory / shard_file_name(state.tp_rank, state.tp_size)
    with _gathered_if_zero3(list(params.values())):
        if state.dp_rank == 0:
            directory.mkdir(parents=True, exist_ok=True)
            tensors = {name: p.detach().to("cpu", copy=True).contiguous() for name, p in params.items()}
            metadata = {
                "format": SHARD_FORMAT,
                "format_version": str(SHARD_FORMAT_VERSION),
                "tp_size": str(state.tp_size),
                "tp_rank": str(state.tp_rank),
                "partition_dims": json.dumps(dims),
                "model_config": json.dumps(inner.config.to_dict()),
            }
            tmp = path.with_suffix(".tmp")
            save_file(tensors, str(tmp), metadata=metadata)
            os.replace(tmp, path)  # a crash mid-write never leaves a truncated shard under the real name
    if dist.is_available() and dist.is_initialized() and state.world_size > 1:
        dist.barrier()  # every shard is on disk before any rank reads the directory
    return path if state.dp_rank == 0 else None


def _shard_files(directory: Path) -> tuple[int, list[Path]]:
    found: dict[int, dict[int, Path]] = {}
    for path in directory.iterdir():
        match = _SHARD_NAME.match(path.name)
        if match:
            found.setdefault(int(match.group(2)), {})[int(match.group(1))] = path
    if not found:
        raise FileNotFoundError(f"{directory}: no model_tpNN-of-NN.safetensors shards")
    if len(found) > 1:
        raise ValueError(f"{directory}: shards of several TP sizes {sorted(found)}; keep one set")
    (tp_size, by_rank), = found.items()
    missing = sorted(set(range(tp_size)) - set(by_rank))
    if missing:
        raise FileNotFoundError(f"{directory}: TP size {tp_size} but the shards of TP ranks {missing} are missing")
    return tp_size, [by_rank[r] for r in range(tp_size)]


def _open_shard(path: Path):
    """safe_open, with a damaged file reported by its name (safetensors' own errors do not name it)."""
    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # SafetensorError derives from Exception only
        raise ValueError(f"{path}: damaged or not a safetensors file ({e})") from None


def _read_shard(path: Path, tp_size: int, tp_rank: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with _open_shard(path) as f:
        meta = f.metadata() or {}
        if meta.get("format") != SHARD_FORMAT:
            raise ValueError(f"{path}: not a phi1 TP shard (metadata format {meta.get('format')!r})")
        if meta.get("format_version") != str(SHARD_FORMAT_VERSION):
            raise ValueError(
                f"{path}: shard format version {meta.get('format_version')}, this reader knows {SHARD_FORMAT_VERSION}"
            )
        if (meta.get("tp_size"), meta.get("tp_rank")) != (str(tp_size), str(tp_rank)):
            raise ValueError(f"{path}: metadata says TP rank {meta.get('tp_rank')} of {meta.get('tp_size')}, the name says {tp_rank} of {tp_size}")
        return {name: f.get_tensor(name) for name in f.keys()}, meta


def load_model_shards(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Whole tensors merged from every TP shard in `directory` (any TP size), on CPU.

    Sharded tensors are concatenated along their recorded dim; replicated ones are taken from rank 0.

    Raises:
        FileNotFoundError: no shards, or some TP rank's shard missing.
        ValueError: mixed TP sizes, foreign files, or shards that disagree on names or shapes.
    """
    directory = Path(directory)
    tp_size, paths = _shard_files(directory)
    shards, metas = zip(*(_read_shard(p, tp_size, r) for r, p in enumerate(paths)))
    dims: dict[str, int | None] = json.loads(metas[0]["partition_dims"])
    names = set(shards[0])
    for path, shard in zip(paths[1:], shards[1:]):
        if set(shard) != names:
            raise ValueError(f"{path}: holds other tensors than {paths[0].name} ({sorted(set(shard) ^ names)[:5]})")
    merged = {}
    for name in sorted(names):
        dim = dims.get(name)
        parts = [shard[name] for shard in shards]
        merged[name] = parts[0] if dim is None or tp_size == 1 else torch.cat(parts, dim=dim)
    return merged


def load_shard_config(directory: str | os.PathLike) -> ModelConfig:
    """The ModelConfig recorded in the shards of `directory`."""
    _, paths = _shard_files(Path(directory))
    with _open_shard(paths[0]) as f:
        meta = f.metadata() or {}
    if "model_config" not in meta:
        raise ValueError(f"{paths[0]}: no model_config in the metadata")
    return ModelConfig.from_dict(json.loads(meta["model_config"]))


def load_resharded(model: nn.Module, directory: str | os.PathLike) -> None:
    """Load a checkpoint saved at any TP size into `model` at its own TP size (whole tensors sliced per rank).

    Raises:
        ValueError: naming every tensor that is missing, unexpected or of the wrong shape.
    """
    load_state_dict_into(unwrap_model(model), load_model_shards(directory), source=str(directory))


def export_pretrained(shard_directory: str | os.PathLike, out_directory: str | os.PathLike, fmt: str = "hf") -> Path:
    """Merge the TP shards of `shard_directory` (any TP size) into a phi1 or HuggingFace model directory."""
    return save_pretrained(load_model_shards(shard_directory), load_shard_config(shard_directory), out_directory, fmt=fmt)
