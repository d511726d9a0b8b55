"""Reading and writing model directories: phi1's own format and HuggingFace's.

    phi1 format:  config.json {"format": "phi1", "format_version": 1, "model": {...ModelConfig...}}
                  model.safetensors   whole (unsharded) tensors under phi1's names
    hf format:    config.json (model_type "phi"), model.safetensors | model.safetensors.index.json + shards
                  | pytorch_model.bin (read with weights_only=True)

Weights are safetensors, so loading a directory from elsewhere never runs code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from phi1.core.config import ModelConfig
from phi1.core.hf_interop import config_from_hf, config_to_hf, state_dict_from_hf, state_dict_to_hf

PHI1_FORMAT = "phi1"
HF_FORMAT = "hf"
FORMAT_VERSION = 1
FORMATS = (PHI1_FORMAT, HF_FORMAT)


def detect_format(directory: str | os.PathLike) -> str:
    """'phi1' or 'hf' from the directory's config.json. Raises FileNotFoundError / ValueError naming the file."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no config.json; is {directory} a phi1 or HuggingFace model directory?")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if config.get("format") == PHI1_FORMAT:
        return PHI1_FORMAT
    if config.get("model_type") == "phi":
        return HF_FORMAT
    raise ValueError(f"{path}: neither a phi1 config (format: phi1) nor a HuggingFace phi config (model_type: phi)")


def _read_hf_tensors(directory: Path) -> dict[str, torch.Tensor]:
    single = directory / "model.safetensors"
    index = directory / "model.safetensors.index.json"
    legacy = directory / "pytorch_model.bin"
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        tensors: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            tensors.update(load_file(str(directory / shard)))
        return tensors
    if legacy.is_file():
        return torch.load(legacy, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{directory}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def load_config_and_state_dict(directory: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The ModelConfig and whole tensors (phi1 names) of a phi1 or HF directory."""
    directory = Path(directory)
    fmt = detect_format(directory)
    raw = json.loads((directory / "config.json").read_text())
    if fmt == PHI1_FORMAT:
        if raw.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{directory / 'config.json'}: format_version {raw.get('format_version')!r}, this reader knows "
                f"{FORMAT_VERSION}; convert it with the phi1 version that wrote it"
            )
        config = ModelConfig.from_dict(raw["model"])
        weights = directory / "model.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(f"{weights}: missing")
        return config, load_file(str(weights))
    config = config_from_hf(raw)
    return config, state_dict_from_hf(_read_hf_tensors(directory), config)


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


def load_pretrained(
    directory: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    tp_group=None,
    **config_overrides,
):
    """A PhiForCausalLM with the weights of a phi1 or HF directory (sliced for `tp_group` when given)."""
    from phi1.core.model import PhiForCausalLM

    config, state = load_config_and_state_dict(directory)
    if config_overrides:
        config = config.replace(**config_overrides)
    with torch.device("meta"):
        model = PhiForCausalLM(config, tp_group=tp_group)
    model = model.to_empty(device=device)
    load_state_dict_into(model, state, source=str(directory))
    if dtype is not None:
        model = model.to(dtype)
    return model
