"""Entry point: `python -m phi1.train --config FILE.yaml [key.sub=value ...] [--dry-run]` (console script `phi1-train`).

Launch one process, or many with torchrun / mpirun / SLURM (each rank runs this same command):

    torchrun --nproc-per-node 8 -m phi1.train --config configs/pretrain_phi1.yaml
    python -m phi1.train --config configs/pretrain_phi1.yaml --dry-run --world-size 8 --device cuda
    python -m phi1.train --help-config          # every config field: type, default, one-line doc

The configuration is validated for the launched world size and this machine's device before any process group
is created or any tensor allocated; every problem is listed at once, one line each, and the command exits 2
(under torchrun only rank 0 prints them). `--dry-run` runs the same validation for the device it names (default:
the one this machine would train on) and prints the parameter count, the layout, the batch arithmetic and a
memory estimate per device. A run stopped by non-finite losses, gradients or weights exits 3 with its diagnosis.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from phi1.cli import UserError, launched_rank, run_cli
from phi1.parallel.launcher import die_with_launcher

PROG = "phi1-train"
EXIT_NON_FINITE = 3


class _ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are user errors: one line and exit 2 through phi1.cli, on rank 0 only."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message} (see {PROG} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file of TrainConfig sections (see configs/ and --help-config)")
    parser.add_argument("--dry-run", action="store_true", help="validate, print the plan of the run and exit")
    parser.add_argument("--world-size", type=int, default=None,
                        help="with --dry-run / --print-config: plan for this many processes instead of the launched ones")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="with --dry-run / --print-config: validate for this device (precision, memory); "
                             "'auto' is what this machine has, 'cuda' without a GPU here plans for a current GPU")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    parser.add_argument("--help-config", action="store_true",
                        help="list every config field (dotted name, type, default, one-line doc) and exit")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. optim.lr=3e-4 parallel.tensor_parallel=2")
    return parser


def run(argv: list[str] | None = None) -> int:
    """Parse `argv` and train, dry-run or print; user errors propagate (ValueError family), the exit status is returned.

    Raises:
        ConfigError / UserError / FileNotFoundError: a user error, printed by `main` as one line with exit 2.
    """
    args = build_parser().parse_args(argv)
    # Imported after parsing, so that --help and usage errors answer without loading torch.
    from phi1.training.config import config_reference, load_config, validate_config

    if args.help_config:
        print(config_reference(), end="")
        return 0
    planning = args.dry_run or args.print_config
    if not planning and args.world_size is not None:
        raise UserError("--world-size: only with --dry-run or --print-config; a run trains on the launched processes")
    if not planning and args.device != "auto":
        raise UserError("--device: only with --dry-run or --print-config; a run trains on the device this machine has")
    if args.world_size is not None and args.world_size < 1:
        raise UserError(f"--world-size: must be >= 1, got {args.world_size}")
    from phi1.training.fault import NonFiniteTrainingError
    from phi1.training.trainer import launched_world_size, resolve_config, train

    load_problems: list[str] = []
    config = load_config(args.config, args.overrides, problems=load_problems)
    world_size = args.world_size or launched_world_size()
    if planning or load_problems:
        # Refused keys keep their defaults, so the validation below can list the other problems with them.
        resolve_config(config, world_size)
        device = None if args.device == "auto" else args.device
        model_config = validate_config(config, world_size, check_files=not planning, device=device,
                                       prior=load_problems)
    if planning:
        from phi1.training.plan import dry_run_report

        print(config.to_yaml() if args.print_config else dry_run_report(config, model_config, world_size),
              end="" if args.print_config else "\n")
        return 0
    try:
        train(config)
    except NonFiniteTrainingError as error:
        if launched_rank() == 0:
            print(f"{PROG}: {error}", file=sys.stderr, flush=True)
        return EXIT_NON_FINITE
    return 0


def main(argv: list[str] | None = None) -> NoReturn:
    """Console-script entry: `run`, then exit with its status, or 2 with one line per problem for a user error."""
    die_with_launcher()  # a rank whose torchrun / mpirun is killed stops too (phi1/parallel/launcher.py)
    run_cli(run, prog=PROG, argv=argv)


if __name__ == "__main__":
    main()
