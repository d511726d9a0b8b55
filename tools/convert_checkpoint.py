#!/usr/bin/env python
"""Convert model weights between phi1 and HuggingFace directories.

    python tools/convert_checkpoint.py --input DIR --input-format {hf,phi1} --output DIR --output-format {hf,phi1}

`--input-format phi1` also takes a training checkpoint (`checkpoints/run/iter_0001000`, or the run directory,
whose `latest` pointer is followed): its tensor-parallel shards are merged, whatever TP size saved them.
A HuggingFace output loads with `transformers.PhiForCausalLM.from_pretrained(DIR)`; `microsoft/phi-1`, when on
disk, comes in with `--input-format hf`. Only safetensors (or `weights_only` torch files) are read: no code runs.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from phi1.core.pretrained import FORMATS, detect_format, load_config_and_state_dict, save_pretrained  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json")


def load_any(directory: Path, fmt: str):
    """(ModelConfig, whole state dict, the directory holding its tokenizer files) from a model directory or a
    phi1 training checkpoint (an iter_* directory, or a run directory whose `latest` is followed)."""
    if (directory / "config.json").is_file():
        found = detect_format(directory)
        if found != fmt:
            raise SystemExit(f"error: {directory} holds a {found!r} model but --input-format is {fmt!r}")
        return (*load_config_and_state_dict(directory), directory)
    if fmt != "phi1":
        raise SystemExit(f"error: {directory}: no config.json; a HuggingFace model directory needs one")
    from phi1.training.checkpointing import find_checkpoint, load_model_from_training_checkpoint

    checkpoint = find_checkpoint(directory)
    if checkpoint is None:
        raise SystemExit(f"error: {directory}: neither a model directory (config.json) nor a phi1 training checkpoint")
    return (*load_model_from_training_checkpoint(checkpoint), checkpoint)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, type=Path, help="model directory or phi1 training checkpoint")
    parser.add_argument("--input-format", required=True, choices=FORMATS)
    parser.add_argument("--output", required=True, type=Path, help="directory to write (created)")
    parser.add_argument("--output-format", required=True, choices=FORMATS)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast weights (default: keep)")
    args = parser.parse_args(argv)

    if not args.input.exists():
        parser.error(f"--input {args.input}: no such directory")
    if args.output.resolve() == args.input.resolve():
        parser.error("--output must differ from --input")
    config, state, source_dir = load_any(args.input, args.input_format)
    out = save_pretrained(state, config, args.output, fmt=args.output_format, dtype=DTYPES.get(args.dtype))
    copied = []
    for name in TOKENIZER_FILES:  # keep the tokenizer beside the weights
        src = source_dir / name
        if src.is_file():
            shutil.copy2(src, out / name)
            copied.append(name)
    n_params = sum(t.numel() for t in state.values())
    print(
        f"converted {args.input} ({args.input_format}) -> {out} ({args.output_format}): "
        f"{len(state)} tensors, {n_params:,} parameters, preset {config.name!r}"
        + (f", tokenizer files {copied}" if copied else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
