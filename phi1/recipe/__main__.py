"""`phi1-recipe` / `python -m phi1.recipe`: run a recipe, or say which of its steps would run and why.

    phi1-recipe run recipes/tiny_cpu.yaml [key.sub=value ...] [--until STEP] [--force STEP ...]
    phi1-recipe status recipes/tiny_cpu.yaml [key.sub=value ...]

Exit status: 0 when every step ran or was skipped; 2 for a bad recipe, and for a step whose tool refused its
input (one line naming the step, the tool's error and its log); 1 when a step's command failed otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from phi1.cli import run_cli
from phi1.recipe.runner import Runner
from phi1.recipe.spec import load_recipe
from phi1.recipe.steps import STEPS, StepFailed


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="phi1-recipe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the steps whose inputs or settings changed")
    status = commands.add_parser("status", help="which steps a run would skip (cached) or run, and why")
    for sub in (run, status):
        sub.add_argument("recipe", help="recipe YAML file (recipes/tiny_cpu.yaml, recipes/phi1.yaml)")
        sub.add_argument("overrides", nargs="*", help="key.sub=value, e.g. steps.filter.threshold=0.7")
    run.add_argument("--until", choices=list(STEPS), help="stop after this step")
    run.add_argument("--force", nargs="+", default=[], choices=list(STEPS), metavar="STEP",
                     help="run these steps even when unchanged")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    recipe = load_recipe(args.recipe, args.overrides)
    if args.command == "status":
        for name, state, why in Runner(recipe).plan():
            meta = Path(recipe.work_dir) / "steps" / name / "step.json"
            counts = json.loads(meta.read_text())["counts"] if meta.exists() and state == "cached" else None
            print(f"{name:14s} {state:7s} {why}" + (f"  {json.dumps(counts)[:160]}" if counts else ""))
        return 0
    runner = Runner(recipe, until=args.until, force=tuple(args.force))
    try:
        actions = runner.run()
    except StepFailed as error:
        print(f"phi1-recipe: error: {error}", file=sys.stderr)
        raise SystemExit(error.exit_code) from None
    ran = [name for name, action in actions.items() if action == "ran"]
    print(f"[recipe] {recipe.name}: ran {len(ran)} step(s) ({', '.join(ran) or 'none'}), "
          f"skipped {len(actions) - len(ran)}; log {Path(recipe.work_dir) / 'recipe_log.jsonl'}", file=sys.stderr)
    return 0


def cli() -> None:
    """Console-script entry point (`phi1-recipe`)."""
    run_cli(main, prog="phi1-recipe")


if __name__ == "__main__":
    run_cli(main, prog="phi1-recipe")
