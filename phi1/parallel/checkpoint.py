"""Writing model checkpoints as one safetensors file per tensor-parallel rank, loadable at any TP size.

    model_tp00-of-02.safetensors   model_tp01-of-02.safetensors

Each file holds that TP rank's shards under the model's parameter names; its metadata records the TP size and
rank, the split dim of every tensor and the model config, so merging needs no model. Reading them (checked
headers, merged to whole tensors on CPU, sliced again for any TP size) is `phi1.loading.checkpoints`'
job: `load_model_shards`, `load_resharded`, `export_pretrained`.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

from phi1.parallel.grads import unwrap_model
from phi1.parallel.layers import tensor_parallel_dims
from phi1.parallel.state import ParallelState

SHARD_FORMAT = "phi1-tp-shard"
SHARD_FORMAT_VERSION = 1


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
