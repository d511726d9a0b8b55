#!/usr/bin/env python
"""Convert model weights between phi1 and HuggingFace directories.

    python tools/convert_checkpoint.py --input PATH --output DIR --output-format {hf,phi1} [--input-format {hf,phi1}]

`--input` is any model path phi1 loads (`phi1.loading`): a phi1 model directory, a HuggingFace phi directory
(`microsoft/phi-1` when on disk), a training run directory (its `latest` checkpoint, verified by its manifest)
or one `iter_*` checkpoint; tensor-parallel shards are merged whatever TP size saved them. `--input-format`, when
given, must match what the path holds (`phi1` covers runs and checkpoints). Every file is checked before a
tensor is read: wrong dtypes, shapes or tensor names are refused, as eval refuses them.

A HuggingFace output loads with `transformers.PhiForCausalLM.from_pretrained(DIR)`, and its tokenizer with
`transformers.AutoTokenizer.from_pretrained(DIR)`, with the same ids as phi1's tokenizer (a SentencePiece model
is converted to tokenizer.json; a HuggingFace tokenizer is passed through). Only safetensors (or `weights_only`
torch files) are read: no code runs.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from phi1.cli import UserError, run_cli  # noqa: E402
from phi1.core.pretrained import FORMATS, HF_FORMAT, PHI1_FORMAT, save_pretrained  # noqa: E402
from phi1.loading import load_state, resolve_model_path, tokenizer_files  # noqa: E402
from phi1.loading.paths import check_output_directory  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="convert_checkpoint.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, type=Path,
                        help="phi1 or HuggingFace model directory, training run directory, or iter_* checkpoint")
    parser.add_argument("--input-format", choices=FORMATS, default=None,
                        help="what --input must hold (default: whatever it holds)")
    parser.add_argument("--output", required=True, type=Path, help="directory to write (created)")
    parser.add_argument("--output-format", required=True, choices=FORMATS)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast weights (default: keep)")
    args = parser.parse_args(argv)

    source = resolve_model_path(args.input, what="--input")
    held = HF_FORMAT if source.kind == HF_FORMAT else PHI1_FORMAT
    if args.input_format is not None and args.input_format != held:
        raise UserError(f"--input {args.input}: holds a {held!r} model ({source.kind}) but --input-format is "
                        f"{args.input_format!r}; drop --input-format or pass {held}")
    if args.output.resolve() == args.input.resolve() or args.output.resolve() == source.directory.resolve():
        raise UserError("--output must differ from --input")
    check_output_directory(args.output, [args.input, source.directory], "--output")
    tokenizer = tokenizer_files(source.directory)
    config, state = load_state(source, what="--input")
    out = save_pretrained(state, config, args.output, fmt=args.output_format, dtype=DTYPES.get(args.dtype))
    if args.output_format == HF_FORMAT:
        from phi1.data.hf_tokenizer import write_hf_tokenizer

        copied = write_hf_tokenizer(tokenizer, out, model_max_length=config.max_seq_len)
    else:
        copied = []
        for name, path in tokenizer.items():  # keep the tokenizer beside the weights
            shutil.copyfile(path, out / name)
            copied.append(name)
    n_params = sum(t.numel() for t in state.values())
    print(
        f"converted {source.describe()} -> {out} ({args.output_format}): "
        f"{len(state)} tensors, {n_params:,} parameters, preset {config.name!r}"
        + (f", tokenizer files {copied}" if copied else "")
    )
    return 0


if __name__ == "__main__":
    run_cli(main, prog="convert_checkpoint.py")
