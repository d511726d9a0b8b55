"""The paper's Figure 2.1 experiment: the same model, trained on the same number of tokens, on several data
mixes (raw code / filtered code / filtered code + synthetic textbooks), each evaluated the same way.

    python tools/ablate.py --output-dir runs/ablation --tokenizer data/tok/tokenizer.model \
        --config configs/quickstart_pretrain.yaml --steps 150 \
        --mix raw=data/stdlib.jsonl \
        --mix filtered=runs/recipe-tiny/steps/filter/filtered/stdlib.jsonl \
        --mix filtered+synthetic=runs/recipe-tiny/steps/filter/filtered/stdlib.jsonl,runs/recipe-tiny/steps/textbooks/textbooks.jsonl \
        --heldout data/exercises.jsonl --eval-limit 164 --seeds 1 2

Each mix (jsonl files with "text"; records with a "status" other than "ok", as the synthetic generator writes
for rejected ones, are left out) is tokenized with tools/preprocess_data.py and trained with `python -m phi1.train`
from the same config and number of steps, so every model sees the same number of tokens (a small mix is
repeated for more epochs, as in the paper), once per --seeds value. Each model is then scored the same way:

- held-out loss: mean next-token loss on the solutions of --heldout exercises ({"prompt", "solution"}) given
  their prompts, the CodeExercises-shaped task HumanEval measures, and a figure that moves at sizes where
  pass@1 is still zero;
- HumanEval pass@1 (greedy, phi1-eval in the sandbox) on the first --eval-limit problems.

The table (markdown; means over seeds with their min-max) and every number (JSON) go to --output-dir; the runs
are kept there (OUTPUT/MIX/seed-S/). Rerunning the same command skips runs whose results.json exists.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from phi1.cli import UserError, run_cli  # noqa: E402


def parse_mix(text: str) -> tuple[str, list[str]]:
    name, sep, files = text.partition("=")
    if not sep or not name or not files:
        raise UserError(f"--mix {text!r}: expected NAME=FILE[,FILE...], e.g. filtered=data/filtered.jsonl")
    if not name.replace("+", "").replace("-", "").replace("_", "").isalnum():
        raise UserError(f"--mix {text!r}: the name may hold letters, digits, + - _ only (it names a folder)")
    paths = files.split(",")
    for path in paths:
        if not os.path.isfile(path):
            raise UserError(f"--mix {name}: {path}: no such file")
    return name, paths


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ablate.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mix", action="append", required=True, help="NAME=FILE[,FILE...] (jsonl with text)")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--tokenizer", required=True, help="tokenizer file (as for preprocess_data.py)")
    parser.add_argument("--config", required=True, help="training config YAML (same for every mix)")
    parser.add_argument("--steps", type=int, required=True, help="training steps, the same for every mix")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1234],
                        help="one model per mix per seed (the table gives means and min-max)")
    parser.add_argument("--nproc", type=int, default=1, help="processes per training run (torchrun when > 1)")
    parser.add_argument("--heldout", required=True, help="exercises jsonl (prompt, solution) for the held-out loss")
    parser.add_argument("--heldout-limit", type=int, default=500, help="exercises scored (the first N)")
    parser.add_argument("--eval-limit", type=int, default=164, help="HumanEval problems (0: skip pass@1)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--workers", type=int, default=1, help="preprocessing workers")
    parser.add_argument("overrides", nargs="*", help="training config overrides, key.sub=value, for every mix")
    args = parser.parse_args(argv)
    args.mixes = [parse_mix(m) for m in args.mix]
    names = [name for name, _ in args.mixes]
    if len(set(names)) != len(names):
        raise UserError(f"--mix: the name {max(names, key=names.count)!r} is given twice")
    for flag, value, low in (("--steps", args.steps, 1), ("--nproc", args.nproc, 1), ("--heldout-limit", args.heldout_limit, 1),
                             ("--eval-limit", args.eval_limit, 0), ("--max-new-tokens", args.max_new_tokens, 1)):
        if value < low:
            raise UserError(f"{flag} {value}: must be at least {low}")
    for flag, path in (("--tokenizer", args.tokenizer), ("--config", args.config), ("--heldout", args.heldout)):
        if not os.path.exists(path):
            raise UserError(f"{flag} {path}: no such file")
    for override in args.overrides:
        if "=" not in override:
            raise UserError(f"override {override!r}: expected key.sub=value")
        if override.split("=")[0] in ("schedule.train_steps", "data.path", "checkpoint.dir", "seed"):
            raise UserError(f"override {override!r}: set by ablate.py (--steps, --seeds); the same for every mix")
    if len(set(args.seeds)) != len(args.seeds):
        raise UserError(f"--seeds {' '.join(map(str, args.seeds))}: a seed is given twice")
    return args


def _env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": str(ROOT) + (os.pathsep + path if path else "")}


def _run(argv: list[str], log: Path) -> None:
    with open(log, "a", encoding="utf-8") as handle:
        handle.write(f"$ {' '.join(argv)}\n")
        handle.flush()
        done = subprocess.run(argv, env=_env(), stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        raise UserError(f"{argv[1] if argv[1] != '-m' else argv[2]} failed (exit {done.returncode}): "
                        f"{lines[-1] if lines else 'no output'}; log: {log}")


def write_mix(paths: list[str], output: Path) -> int:
    """Concatenate the texts of `paths` into one jsonl; returns the documents written."""
    count = 0
    with open(output, "w", encoding="utf-8") as out:
        for path in paths:
            with open(path, encoding="utf-8") as handle:
                for line in handle:
                    try:
                        record = json.loads(line)
                    except ValueError:
                        continue
                    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                        continue
                    if record.get("status", "ok") != "ok":
                        continue
                    out.write(json.dumps({"text": record["text"]}) + "\n")
                    count += 1
    if count == 0:
        raise UserError(f"--mix {output.parent.name}: no record with a \"text\" in {', '.join(paths)}")
    return count


def heldout_loss(run_dir: Path, exercises: str, limit: int) -> dict:
    """Mean next-token loss (nats) over the solution tokens of the first `limit` exercises, given their prompts."""
    import torch

    from phi1.loading.model_path import load_pretrained, load_tokenizer

    model = load_pretrained(run_dir).eval()
    tokenizer = load_tokenizer(run_dir)
    context = model.config.max_seq_len
    total, tokens, scored = 0.0, 0, 0
    with open(exercises, encoding="utf-8") as handle, torch.no_grad():
        for line in handle:
            if scored >= limit:
                break
            record = json.loads(line)
            prompt, solution = tokenizer.encode(record["prompt"]), tokenizer.encode(record["solution"])
            ids = (prompt + solution + [tokenizer.eod])[-(context + 1):]
            n_solution = min(len(solution) + 1, len(ids) - 1)
            inputs = torch.tensor([ids[:-1]])
            labels = torch.tensor([[-100] * (len(ids) - 1 - n_solution) + ids[-n_solution:]])
            loss = model(inputs, labels=labels).loss
            total += float(loss) * n_solution
            tokens += n_solution
            scored += 1
    return {"heldout_loss": round(total / tokens, 4), "heldout_exercises": scored, "heldout_tokens": tokens}


def prepare_mix(args: argparse.Namespace, name: str, paths: list[str], out: Path) -> dict:
    """Tokenize a mix once (every seed trains on the same dataset); returns its sizes."""
    out.mkdir(parents=True, exist_ok=True)
    sizes = out / "mix.json"
    if sizes.exists() and (out / "mix_text_document.bin").exists():
        return json.loads(sizes.read_text())
    documents = write_mix(paths, out / "mix.jsonl")
    _run([sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--input", str(out / "mix.jsonl"), "--json-keys",
          "text", "--append-eod", "--output-prefix", str(out / "mix"), "--tokenizer-model", args.tokenizer,
          "--workers", str(args.workers)], out / "log.txt")
    (out / "mix.jsonl").unlink()
    itemsize = 4 if json.loads((out / "mix_text_document.json").read_text()).get("tokenizer", {}).get(
        "vocab_size", 0) > 65535 else 2
    result = {"mix": name, "files": paths, "documents": documents,
              "data_tokens": (out / "mix_text_document.bin").stat().st_size // itemsize}
    sizes.write_text(json.dumps(result))
    return result


def train_and_score(args: argparse.Namespace, mix: dict, data_prefix: Path, seed: int, out: Path) -> dict:
    """Train one model on a prepared mix with `seed`; score it. Writes out/results.json."""
    from phi1.loading.checkpoints import find_checkpoint, read_trainer_state

    out.mkdir(parents=True, exist_ok=True)
    log = out / "log.txt"
    launcher = [sys.executable, "-m", "phi1.train"] if args.nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc), "-m", "phi1.train"]
    run_dir = out / "run"
    start = time.perf_counter()
    _run([*launcher, "--config", args.config, f"data.path={data_prefix}", f"data.tokenizer_model={args.tokenizer}",
          f"schedule.train_steps={args.steps}", f"checkpoint.dir={run_dir}", f"checkpoint.interval={args.steps}",
          f"seed={seed}", *args.overrides], log)
    train_seconds = time.perf_counter() - start
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [loss for r in records for loss in r.get("step_losses", [])]
    trained_tokens = read_trainer_state(find_checkpoint(run_dir)).get("tokens")
    result = {**mix, "seed": seed, "trained_tokens": trained_tokens,
              "epochs": round(trained_tokens / mix["data_tokens"], 3) if trained_tokens else None,
              "train_seconds": round(train_seconds, 1),
              "final_train_loss": round(sum(losses[-10:]) / len(losses[-10:]), 4) if losses else None}
    result.update(heldout_loss(run_dir, args.heldout, args.heldout_limit))
    if args.eval_limit:
        _run([sys.executable, "-m", "phi1.eval", "--model", str(run_dir), "--task", "humaneval", "--limit",
              str(args.eval_limit), "--max-new-tokens", str(args.max_new_tokens), "--output-dir", str(out / "eval"),
              "--quiet"], log)
        summary = json.loads((out / "eval" / "summary.json").read_text())
        pass_at = summary.get("pass_at_k", {})
        result["humaneval_pass@1"] = pass_at.get("pass@1", pass_at.get("1"))
        result["humaneval_problems"] = args.eval_limit
        result["humaneval_passed"] = sum(
            json.loads(line).get("passed") is True for line in (out / "eval" / "results.jsonl").read_text().splitlines()
            if line.strip())
    (out / "results.json").write_text(json.dumps(result, indent=1))
    return result


def _spread(values: list[float], digits: int) -> str:
    mean = sum(values) / len(values)
    if len(values) == 1 or min(values) == max(values):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def table(results: list[dict]) -> str:
    """One row per mix: means over seeds, (min-max) when there are several."""
    lines = ["| mix | documents | tokens in data | tokens trained (epochs) | seeds | final train loss | held-out loss | "
             "HumanEval pass@1 (passed) |", "|---|---|---|---|---|---|---|---|"]
    for name in dict.fromkeys(r["mix"] for r in results):
        runs = [r for r in results if r["mix"] == name]
        first = runs[0]
        if runs[0].get("humaneval_problems"):
            passed = (f"{_spread([r['humaneval_pass@1'] for r in runs], 3)} "
                      f"({'+'.join(str(r['humaneval_passed']) for r in runs)} of {first['humaneval_problems']} each)")
        else:
            passed = "not run"
        lines.append(f"| {name} | {first['documents']:,} | {first['data_tokens']:,} | {first['trained_tokens']:,} "
                     f"({first['epochs']}) | {len(runs)} | {_spread([r['final_train_loss'] for r in runs], 3)} | "
                     f"{_spread([r['heldout_loss'] for r in runs], 3)} | {passed} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    results = []
    for name, paths in args.mixes:
        mix = prepare_mix(args, name, paths, output / name)
        for seed in args.seeds:
            done = output / name / f"seed-{seed}" / "results.json"
            if done.exists():
                results.append(json.loads(done.read_text()))
                print(f"{name} seed {seed}: results.json exists, skipped", file=sys.stderr)
                continue
            print(f"{name} seed {seed}: training {args.steps} steps on {', '.join(paths)}", file=sys.stderr)
            results.append(train_and_score(args, mix, output / name / "mix_text_document", seed,
                                           output / name / f"seed-{seed}"))
            print(json.dumps(results[-1]), file=sys.stderr)
    text = table(results)
    (output / "table.md").write_text(text + "\n")
    (output / "results.json").write_text(json.dumps(results, indent=1))
    print(text)
    if any(math.isnan(r["heldout_loss"]) for r in results):
        raise UserError("a held-out loss is NaN: training diverged (see the runs' logs)")
    return results


if __name__ == "__main__":
    run_cli(main, prog="ablate.py")
