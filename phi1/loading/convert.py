"""Conversions between the two training-checkpoint formats and to a model directory, on the CPU alone.

- `convert_to_dcp(iter_dir, out)`: today's TP-shard format (`model_tp*.safetensors` merged by
  `phi1.loading.checkpoints`, `optim_tp*.pt` merged by name by `phi1.loading.optimizer_state`,
  `trainer_state.json`) written as an any-layout DCP checkpoint (`phi1.parallel.distributed_checkpoint`) with a
  manifest. A ZeRO checkpoint (`zero/`) converts its weights and trainer state only: its optimizer partitions
  are DeepSpeed's own format.
- `export_dcp(checkpoint, out, fmt, dtype)`: the whole model of a DCP checkpoint of any TP x PP x DP (or FSDP)
  layout, read in this one process, written as a phi1 or HuggingFace model directory.

`tools/export_dcp.py` is the command line over both. No process group and no GPU are needed.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from phi1.core.config import ModelConfig
from phi1.core.pretrained import save_pretrained
from phi1.loading.checkpoints import load_checkpoint_state, read_trainer_state
from phi1.loading.manifest import verify_checkpoint, write_manifest
from phi1.loading.optimizer_state import optimizer_state_by_name
from phi1.loading.paths import check_output_directory, inside, read_json_object


def convert_to_dcp(checkpoint: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Convert an `iter_*` TP-shard checkpoint to a DCP checkpoint at `out` (weights, AdamW state by name,
    trainer state, model config, manifest); returns `out`.

    Raises:
        ValueError: `checkpoint` is not a directory, `out` exists, the manifest does not verify
            (CheckpointCorruptError), or the shards / optimizer files do not describe one model.
    """
    from phi1.parallel.distributed_checkpoint import save_full_checkpoint

    checkpoint, out = Path(checkpoint), Path(out)
    if not checkpoint.is_dir():
        raise ValueError(f"{checkpoint}: not a directory (give an iter_* checkpoint directory)")
    if out.exists():
        raise ValueError(f"{out}: already exists; choose a new directory for the converted checkpoint")
    verify_checkpoint(checkpoint)
    config, tensors = load_checkpoint_state(checkpoint)
    trainer_state = read_trainer_state(checkpoint)
    optimizer_state = None if (checkpoint / "zero").exists() else optimizer_state_by_name(checkpoint, config)
    return save_full_checkpoint(out, tensors, optimizer_state=optimizer_state, trainer_state=trainer_state,
                                model_config=config.to_dict(), seal=write_manifest)


def export_dcp(checkpoint: str | os.PathLike, out: str | os.PathLike, fmt: str = "hf",
               dtype: torch.dtype | None = None) -> Path:
    """Write the whole model of a DCP `checkpoint` to `out` in `fmt` ('hf' or 'phi1'); returns `out`.

    Raises:
        ValueError: `out` is, holds or lies inside the checkpoint, or is a training run; a damaged checkpoint
            (manifest), an unknown format, a file leaving the directory, a pickled entry, or a model config that
            does not fit the tensors.
    """
    from phi1.core.model import PhiForCausalLM
    from phi1.parallel.distributed_checkpoint import MODEL_CONFIG_FILE, read_format, read_full_state_dict

    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise ValueError(f"{checkpoint}: not a directory (give a DCP checkpoint directory, e.g. RUN/iter_0001000)")
    check_output_directory(out, [checkpoint], "OUT")
    verify_checkpoint(checkpoint)
    read_format(checkpoint)
    config_path = checkpoint / MODEL_CONFIG_FILE
    if not config_path.is_file():
        raise ValueError(f"{config_path}: missing; the checkpoint was saved without model_config, export needs it")
    inside(checkpoint, MODEL_CONFIG_FILE, "file")
    config = ModelConfig.from_dict(read_json_object(config_path), source=config_path)
    with torch.device("meta"):
        expected = {name: tuple(p.shape) for name, p in PhiForCausalLM(config).named_parameters()}
    tensors = read_full_state_dict(checkpoint, expected=expected)
    return save_pretrained(tensors, config, out, fmt=fmt, dtype=dtype)


__all__ = ["convert_to_dcp", "export_dcp"]
