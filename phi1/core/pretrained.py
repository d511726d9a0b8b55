"""Writing model directories (phi1's own format and HuggingFace's) and copying whole tensors into a model.

    phi1 format:  config.json {"format": "phi1", "format_version": 1, "model": {...ModelConfig...}}
                  model.safetensors   whole (unsharded) tensors under phi1's names
    hf format:    config.json (model_type "phi"), model.safetensors | model.safetensors.index.json + shards
                  | pytorch_model.bin (read with weights_only=True)

Weights are safetensors. Reading any model path (these directories, training runs, `iter_*` checkpoints) is
`phi1.loading`'s job: it checks every file before a tensor is read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from phi1.core.config import ModelConfig
from phi1.core.hf_interop import config_to_hf, state_dict_to_hf

PHI1_FORMAT = "phi1"
HF_FORMAT = "hf"
FORMAT_VERSION = 1
FORMATS = (PHI1_FORMAT, HF_FORMAT)


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Whole-tensor shapes (phi1 names) of a PhiForCausalLM with `config`, without building it.

    Loaders compare a file's header with these before reading any tensor data.
    """
    d, f, v = config.d_model, config.d_mlp, config.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"embed_tokens.weight": (v, d)}
    for i in range(config.n_layer):
        layer = f"layers.{i}."
        shapes.update({
            layer + "ln.weight": (d,), layer + "ln.bias": (d,),
            layer + "attn.qkv.weight": (3 * d, d), layer + "attn.qkv.bias": (3 * d,),
            layer + "attn.dense.weight": (d, d), layer + "attn.dense.bias": (d,),
            layer + "mlp.fc1.weight": (f, d), layer + "mlp.fc1.bias": (f,),
            layer + "mlp.fc2.weight": (d, f), layer + "mlp.fc2.bias": (d,),
        })
    shapes.update({"final_layernorm.weight": (d,), "final_layernorm.bias": (d,),
                   "lm_head.weight": (v, d), "lm_head.bias": (v,)})
    return shapes


def save_pretrained(
    state_dict: dict[str, torch.Tensor],
    config: ModelConfig,
    directory: str | os.PathLike,
    fmt: str = PHI1_FORMAT,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write whole tensors (phi1 names) and the config to `directory` in `fmt` ('phi1' or 'hf')."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {FORMATS}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", dtype=dtype or v.dtype).contiguous() for k, v in state_dict.items()}
    if fmt == HF_FORMAT:
        tensors = state_dict_to_hf(tensors, config)
        meta = config_to_hf(config)
        if dtype is not None:
            meta["torch_dtype"] = str(dtype).removeprefix("torch.")
    else:
        meta = {"format": PHI1_FORMAT, "format_version": FORMAT_VERSION, "model": config.to_dict()}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    return directory


def shard_for_rank(full: torch.Tensor, dim: int | None, tp_size: int, tp_rank: int) -> torch.Tensor:
    """This rank's slice of a whole tensor split along `dim` (None: replicated, returned whole)."""
    if dim is None or tp_size == 1:
        return full
    return full.chunk(tp_size, dim=dim)[tp_rank]


def load_state_dict_into(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Copy whole tensors into a (possibly tensor-parallel) model, slicing each to this rank's shard.

    Raises ValueError naming every missing, unexpected or mis-shaped tensor.
    """
    from phi1.parallel.layers import tensor_parallel_dims
    from phi1.parallel.mappings import group_rank, group_size

    group = getattr(model, "tp_group", None)
    tp_size, tp_rank = group_size(group), group_rank(group)
    params = dict(model.named_parameters())
    dims = tensor_parallel_dims(model)
    missing = sorted(set(params) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(params))
    problems = []
    if missing:
        problems.append(f"missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    shards = {}
    for name, param in params.items():
        if name not in state_dict:
            continue
        full = state_dict[name]
        dim = dims[name]
        expected = list(param.shape)
        if dim is not None:
            expected[dim] *= tp_size
        if list(full.shape) != expected:
            problems.append(f"{name}: shape {tuple(full.shape)} but the model needs {tuple(expected)}")
            continue
        shards[name] = shard_for_rank(full, dim, tp_size, tp_rank)
    if problems:
        raise ValueError(f"{source}: does not fit the model: " + "; ".join(problems))
    with torch.no_grad():
        for name, shard in shards.items():
            params[name].copy_(shard)
