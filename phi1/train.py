"""Entry point: `python -m phi1.train --config FILE.yaml [key.sub=value ...] [--dry-run]` (console script `phi1-train`).

Launch one process, or many with torchrun / mpirun / SLURM (each rank runs this same command):

    torchrun --nproc-per-node 8 -m phi1.train --config configs/pretrain_phi1.yaml
    python -m phi1.train --config configs/pretrain_phi1.yaml --dry-run --world-size 8

The configuration is validated for the launched world size before any process group is created; `--dry-run`
prints the parameter count, the layout, the batch arithmetic and a memory estimate per device, then exits.
"""

from __future__ import annotations

import argparse
import sys

from phi1.parallel.launcher import die_with_launcher
from phi1.training.config import ConfigError, load_config, validate_config
from phi1.training.fault import CheckpointCorruptError, NonFiniteTrainingError
from phi1.training.loop import launched_world_size, resolve_config, train
from phi1.training.plan import dry_run_report


def main(argv: list[str] | None = None) -> int:
    die_with_launcher()  # a rank whose torchrun / mpirun is killed stops too (phi1/parallel/launcher.py)
    parser = argparse.ArgumentParser(
        prog="phi1-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="YAML file of TrainConfig sections (see configs/)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan of the run and exit")
    parser.add_argument("--world-size", type=int, default=None,
                        help="with --dry-run: plan for this many processes instead of the launched ones")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. optim.lr=3e-4 parallel.tensor_parallel=2")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        world_size = args.world_size or launched_world_size()
        if args.dry_run or args.print_config:
            resolve_config(config, world_size)
            model_config = validate_config(config, world_size, check_files=False)
            if args.print_config:
                print(config.to_yaml(), end="")
            else:
                print(dry_run_report(config, model_config, world_size))
            return 0
        train(config)
    except (ConfigError, FileNotFoundError, CheckpointCorruptError) as e:
        print(f"phi1-train: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteTrainingError as e:
        print(f"phi1-train: {e}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
