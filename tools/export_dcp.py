"""Export a DCP checkpoint (phi1.parallel.distributed_checkpoint, any TP x PP x DP layout) to a model directory,
or convert an existing `iter_*` shard checkpoint to DCP. CPU only: no GPU, no process group.

    python tools/export_dcp.py export RUN/iter_0001000 OUT [--format hf|phi1] [--dtype fp32|bf16|fp16]
    python tools/export_dcp.py convert RUN/iter_0001000 OUT_DCP_DIR

`export` verifies the checkpoint's manifest, reads every model tensor whole from whatever shards were written
(DCP's reader in this one process) and writes safetensors + config with `phi1.core.pretrained.save_pretrained`
(`--format hf` loads with transformers' PhiForCausalLM).

`convert` reads today's format (model_tp*.safetensors merged by phi1.loading, optim_tp*.pt read with
weights_only=True, trainer_state.json) and writes the same weights, AdamW state (merged across TP ranks and keyed
by parameter name) and trainer state as a DCP checkpoint with a manifest. A ZeRO checkpoint (`zero/`) converts
its weights and trainer state only: its optimizer partitions are DeepSpeed's own format.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from phi1.cli import UserError, run_cli  # noqa: E402
from phi1.core.config import ModelConfig  # noqa: E402
from phi1.core.model import PhiForCausalLM  # noqa: E402
from phi1.core.pretrained import FORMATS, HF_FORMAT, save_pretrained  # noqa: E402
from phi1.loading.checkpoints import load_checkpoint_state, read_trainer_state  # noqa: E402
from phi1.loading.manifest import verify_checkpoint, write_manifest  # noqa: E402
from phi1.parallel.distributed_checkpoint import (  # noqa: E402
    MODEL_CONFIG_FILE,
    read_format,
    read_full_state_dict,
    save_full_checkpoint,
)
from phi1.parallel.layers import tensor_parallel_dims  # noqa: E402
from phi1.parallel.optim import param_groups  # noqa: E402
from phi1.training.checkpointing import load_pt  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def export(checkpoint: Path, out: Path, fmt: str, dtype: torch.dtype | None) -> Path:
    """Write the whole model of a DCP `checkpoint` to `out` in `fmt`; returns `out`.

    Raises:
        ValueError: a damaged checkpoint (manifest), an unknown format, a file leaving the directory, a pickled
            entry, or a model config that does not fit the tensors.
    """
    if not checkpoint.is_dir():
        raise UserError(f"{checkpoint}: not a directory (give a DCP checkpoint directory, e.g. RUN/iter_0001000)")
    verify_checkpoint(checkpoint)
    read_format(checkpoint)
    config_path = checkpoint / MODEL_CONFIG_FILE
    if not config_path.is_file():
        raise UserError(f"{config_path}: missing; the checkpoint was saved without model_config, export needs it")
    try:
        config = ModelConfig.from_dict(json.loads(config_path.read_text(encoding="utf-8")), source=config_path)
    except json.JSONDecodeError as e:
        raise UserError(f"{config_path}: not JSON ({e})") from None
    with torch.device("meta"):
        expected = {name: tuple(p.shape) for name, p in PhiForCausalLM(config).named_parameters()}
    tensors = read_full_state_dict(checkpoint, expected=expected)
    return save_pretrained(tensors, config, out, fmt=fmt, dtype=dtype)


def optimizer_state_by_name(checkpoint: Path, config: ModelConfig) -> dict[str, dict[str, torch.Tensor]] | None:
    """AdamW state of an `iter_*` checkpoint, whole tensors keyed by parameter name; None when it has none.

    Each `optim_tp{r}.pt` is keyed by optimizer index over `param_groups(model)` (decay group, then no-decay
    group, each in `named_parameters` order) and holds TP rank r's shards: rebuilt on the meta device, the groups
    give the names and `partition_dims` the dim to concatenate along.
    """
    files = sorted(checkpoint.glob("optim_tp*.pt"))
    if not files:
        return None
    with torch.device("meta"):
        model = PhiForCausalLM(config)
    names_of = {id(p): name for name, p in model.named_parameters()}
    dims = tensor_parallel_dims(model)
    order = [names_of[id(p)] for group in param_groups(model, weight_decay=0.1) for p in group["params"]]
    per_rank = [load_pt(path, map_location="cpu") for path in files]
    merged: dict[str, dict[str, torch.Tensor]] = {}
    for state in per_rank:
        indices = [i for group in state.get("param_groups", []) for i in group.get("params", [])]
        if len(indices) != len(order):
            raise UserError(f"{checkpoint}: optimizer state covers {len(indices)} parameters, the model has "
                            f"{len(order)}; it was not written by phi1's trainer for this model")
    for position, name in enumerate(order):
        slots = [state["state"].get(position) for state in per_rank]
        if any(slot is None for slot in slots):
            continue
        dim = dims[name]
        entry = {}
        for key in ("exp_avg", "exp_avg_sq"):
            parts = [slot[key] for slot in slots]
            entry[key] = parts[0] if dim is None or len(parts) == 1 else torch.cat(parts, dim=dim)
        step = slots[0]["step"]
        entry["step"] = step.float() if torch.is_tensor(step) else torch.tensor(float(step))
        merged[name] = entry
    return merged


def convert(checkpoint: Path, out: Path) -> Path:
    """Convert an `iter_*` shard checkpoint to a DCP checkpoint at `out` (weights, AdamW state, trainer state)."""
    if not checkpoint.is_dir():
        raise UserError(f"{checkpoint}: not a directory (give an iter_* checkpoint directory)")
    if out.exists():
        raise UserError(f"{out}: already exists; choose a new directory for the converted checkpoint")
    verify_checkpoint(checkpoint)
    config, tensors = load_checkpoint_state(checkpoint)
    trainer_state = read_trainer_state(checkpoint)
    optimizer_state = None if (checkpoint / "zero").exists() else optimizer_state_by_name(checkpoint, config)
    return save_full_checkpoint(out, tensors, optimizer_state=optimizer_state, trainer_state=trainer_state,
                                model_config=config.to_dict(), seal=write_manifest)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="export_dcp.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    exporting = commands.add_parser("export", help="DCP checkpoint -> model directory (hf or phi1)")
    exporting.add_argument("checkpoint", type=Path)
    exporting.add_argument("out", type=Path)
    exporting.add_argument("--format", choices=FORMATS, default=HF_FORMAT)
    exporting.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    converting = commands.add_parser("convert", help="iter_* shard checkpoint -> DCP checkpoint")
    converting.add_argument("checkpoint", type=Path)
    converting.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    if args.command == "export":
        written = export(args.checkpoint, args.out, args.format, DTYPES.get(args.dtype))
    else:
        written = convert(args.checkpoint, args.out)
    print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    run_cli(main, prog="export_dcp.py")
