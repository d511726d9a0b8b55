"""Export a DCP checkpoint (phi1.parallel.distributed_checkpoint, any TP x PP x DP layout) to a model directory,
or convert an existing `iter_*` shard checkpoint to DCP. CPU only: no GPU, no process group.

    python tools/export_dcp.py export RUN/iter_0001000 OUT [--format hf|phi1] [--dtype fp32|bf16|fp16]
    python tools/export_dcp.py convert RUN/iter_0001000 OUT_DCP_DIR

Both are `phi1.loading.convert` (library code); this is their command line.

`export` verifies the checkpoint's manifest, reads every model tensor whole from whatever shards were written
(DCP's reader in this one process) and writes safetensors + config with `phi1.core.pretrained.save_pretrained`
(`--format hf` loads with transformers' PhiForCausalLM).

`convert` reads today's format (model_tp*.safetensors merged by phi1.loading, optim_tp*.pt read with
weights_only=True and merged by name by `phi1.loading.optimizer_state`, trainer_state.json) and writes the same
weights, AdamW state and trainer state as a DCP checkpoint with a manifest. A ZeRO checkpoint (`zero/`) converts
its weights and trainer state only: its optimizer partitions are DeepSpeed's own format. (The trainer does not
need this to resume: it reads either format at any layout.)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from phi1.cli import run_cli  # noqa: E402
from phi1.core.pretrained import FORMATS, HF_FORMAT  # noqa: E402
from phi1.loading.convert import convert_to_dcp, export_dcp  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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
        written = export_dcp(args.checkpoint, args.out, args.format, DTYPES.get(args.dtype))
    else:
        written = convert_to_dcp(args.checkpoint, args.out)
    print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    run_cli(main, prog="export_dcp.py")
