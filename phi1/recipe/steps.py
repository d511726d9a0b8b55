"""The eleven steps of the paper's data loop, each a function of a `StepContext` that writes into `ctx.out` and
returns its counts (what it kept, what it pruned and why).

Each step runs phi1's own tool for it in a subprocess (tools/*.py, `python -m phi1.train` under torchrun,
`python -m phi1.eval`): the tool is the unit users already run by hand, with its own checks, resumption and
error lines, and a subprocess keeps each step's memory and threads apart. The recipe adds only what joins them:
sampling the annotation set, choosing the labels, splitting the decontaminated data by source and packing
the pretraining mix.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from phi1.recipe.spec import Recipe


class StepFailed(RuntimeError):
    """A step's command failed, or its result cannot feed the next step; the message says what to do."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class StepContext:
    recipe: Recipe
    out: Path
    """The step's output folder (a temporary one, renamed into place when the step succeeds)."""
    upstream: Callable[[str], Path]
    """The finished output folder of an earlier step."""
    run: Callable[..., None]
    """run(argv, name): runs a command, its output appended to out/logs/name.log; StepFailed when it fails."""
    teacher: Callable[[], tuple[str, str | None]]
    """(base_url, model name or None): starts phi1-serve the first time when the recipe says serve_model."""
    tool: Callable[[str], str]
    """Path of tools/NAME."""


def _py() -> list[str]:
    return [sys.executable]


def _jsonl(path: str | os.PathLike):
    """Yield (line_number, record) of the JSON-object lines of a file; other lines are skipped (tools count them)."""
    with open(path, encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, 1):
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                yield number, record


def _write_jsonl(path: str | os.PathLike, records) -> int:
    count = 0
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count


def _lines(path: str | os.PathLike) -> int:
    with open(path, "rb") as handle:
        return sum(1 for line in handle if line.strip())


def _read_json(path: str | os.PathLike) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        return {}


def _teacher_args(ctx: StepContext, step_model: str | None) -> list[str]:
    base_url, model = ctx.teacher()
    model = step_model or model
    teacher = ctx.recipe.teacher
    args = ["--base-url", base_url, "--api", teacher.api, "--concurrency", str(teacher.concurrency),
            "--requests-per-minute", str(teacher.requests_per_minute)]
    return args + (["--model", model] if model else [])


def annotate(ctx: StepContext) -> dict:
    """A random sample of the corpus (`sample` files, fixed by `seed`), scored by the teacher."""
    config = ctx.recipe.steps.annotate
    corpus = ctx.recipe.inputs.corpus
    # Lines are counted, and only the chosen ones parsed: two cheap passes over a corpus of any size.
    total = sum(_lines(path) for path in corpus)
    chosen = set(random.Random(config.seed).sample(range(total), min(config.sample, total)))
    sample = ctx.out / "sample.jsonl"

    def sampled():
        index = 0
        for path in corpus:
            with open(path, "rb") as handle:
                for number, raw in enumerate(handle, 1):
                    if not raw.strip():
                        continue
                    if index in chosen:
                        try:
                            record = json.loads(raw)
                        except ValueError:
                            record = None
                        if isinstance(record, dict) and isinstance(record.get("text"), str):
                            yield {"id": f"{os.path.basename(path)}:{number}", "text": record["text"]}
                    index += 1

    written = _write_jsonl(sample, sampled())
    argv = [*_py(), ctx.tool("quality_filter.py"), "annotate", "--input", str(sample), "--output",
            str(ctx.out / "annotated.jsonl"), *_teacher_args(ctx, config.model), "--scale", str(config.scale),
            "--label-threshold", str(config.label_threshold), "--max-tokens", str(config.max_tokens),
            "--max-chars", str(config.max_chars), "--max-attempts", str(config.max_attempts), "--seed",
            str(config.seed), "--counts", str(ctx.out / "counts.json"), "--no-progress", *config.extra_args]
    if ctx.recipe.inputs.annotation_prompt:
        argv += ["--prompt-file", ctx.recipe.inputs.annotation_prompt]
    ctx.run(argv, "annotate")
    statuses = Counter(r.get("status") for _, r in _jsonl(ctx.out / "annotated.jsonl"))
    models = sorted({r.get("model") for _, r in _jsonl(ctx.out / "annotated.jsonl") if r.get("model")})
    tool_counts = _read_json(ctx.out / "counts.json")
    return {"corpus_documents": total, "sampled": written, "scored": statuses.get("ok", 0),
            "unparsed": statuses.get("unparsed", 0), "bad_answers": tool_counts.get("bad_answers"),
            "teacher_models": models}


def _usable_annotations(path: Path, label_key: str) -> tuple[int, set]:
    values = [r[label_key] for _, r in _jsonl(path) if r.get("status") == "ok" and isinstance(r.get(label_key), (int, float))]
    return len(values), {float(v) >= 0.5 for v in values}


def classifier(ctx: StepContext) -> dict:
    """Random forest on embeddings of the annotated files (or of the offline proxy labels, when chosen)."""
    config = ctx.recipe.steps.classifier
    annotated = ctx.upstream("annotate") / "annotated.jsonl"
    usable, classes = _usable_annotations(annotated, config.label_key)
    enough = usable >= config.min_labels and len(classes) == 2
    if config.labels == "annotations" and (usable < 2 or len(classes) < 2):
        raise StepFailed(f"{annotated}: {usable} usable annotations ({len(classes)} class(es)); a classifier needs "
                         "both good and bad examples. Annotate more files (steps.annotate.sample), use a stronger "
                         "teacher, or set steps.classifier.labels: annotations_or_proxy", exit_code=2)
    use_proxy = config.labels == "proxy" or (config.labels == "annotations_or_proxy" and not enough)
    if use_proxy:
        labelled, label_key = ctx.out / "proxy_labels.jsonl", "label"
        ctx.run([*_py(), ctx.tool("quality_filter.py"), "make-labels", "--output", str(labelled), "--count",
                 str(config.proxy_count), "--seed", str(config.seed)], "make-labels")
        source = "proxy: documented vs undocumented stdlib functions" + (
            "" if config.labels == "proxy" else f" (annotations gave {usable} usable scores, "
            f"{len(classes)} class(es); at least {config.min_labels} of both classes are needed)")
    else:
        labelled, label_key, source = annotated, config.label_key, f"annotations ({config.label_key})"
    argv = [*_py(), ctx.tool("quality_filter.py"), "train", "--labelled", str(labelled), "--label-key", label_key,
            "--embedding-model", ctx.recipe.inputs.embedding_model, "--output", str(ctx.out / "classifier"),
            "--trees", str(config.trees), "--folds", str(config.folds), "--threshold", str(config.threshold),
            "--seed", str(config.seed), "--batch-size", str(config.batch_size), *config.extra_args]
    if config.max_tokens is not None:
        argv += ["--max-tokens", str(config.max_tokens)]
    ctx.run(argv, "train")
    header = _read_json(ctx.out / "classifier" / "classifier.json")
    report = header.get("cross_validation", {})
    return {"labels": source, "usable_annotations": usable, "labelled_examples": _lines(labelled),
            "kind": header.get("kind"), "threshold": config.threshold,
            "embedder": {k: header.get("embedder", {}).get(k) for k in ("model_dir", "fingerprint", "backend", "pooling")},
            "cross_validation": {k: v for k, v in report.items() if not isinstance(v, (list, dict))}}


def filter_corpus(ctx: StepContext) -> dict:
    """Score every corpus file with the classifier; keep those at or above the threshold."""
    config = ctx.recipe.steps.filter
    corpus = ctx.recipe.inputs.corpus
    names = [os.path.basename(p) for p in corpus]
    if len(set(names)) != len(names):
        raise StepFailed(f"{ctx.recipe.source}: inputs.corpus: two shards share a file name "
                         f"({Counter(names).most_common(1)[0][0]}); filter writes one output per name", exit_code=2)
    threshold = ctx.recipe.steps.classifier.threshold if config.threshold is None else config.threshold
    output = ctx.out / "filtered"
    ctx.run([*_py(), ctx.tool("quality_filter.py"), "filter", "--classifier",
             str(ctx.upstream("classifier") / "classifier"), "--input", *corpus, "--output-dir", str(output),
             "--threshold", str(threshold), "--workers", str(config.workers), "--no-progress", *config.extra_args],
            "filter")
    documents = sum(_lines(p) for p in corpus)
    kept = sum(_lines(output / n) for n in names)
    return {"documents": documents, "kept": kept, "threshold": threshold,
            "pruned": {f"quality score below {threshold} (or an unreadable line)": documents - kept}}


def dedup(ctx: StepContext) -> dict:
    """MinHash near-duplicate removal over the filtered shards."""
    config = ctx.recipe.steps.dedup
    filtered = ctx.upstream("filter") / "filtered"
    ctx.run([*_py(), ctx.tool("dedup.py"), "--input", str(filtered), "--output-dir", str(ctx.out / "dedup"),
             "--work-dir", str(ctx.out / "work"), "--threshold", str(config.threshold), "--workers",
             str(config.workers), "--json", str(ctx.out / "counts.json"), *config.extra_args], "dedup")
    shutil.rmtree(ctx.out / "work", ignore_errors=True)  # signatures and buckets: only needed to resume
    documents = sum(_lines(p) for p in filtered.glob("*.jsonl"))
    kept = sum(_lines(p) for p in (ctx.out / "dedup").glob("*.jsonl"))
    return {"documents": documents, "kept": kept,
            "pruned": {f"near duplicate (MinHash, Jaccard >= {config.threshold})": documents - kept},
            "tool": _read_json(ctx.out / "counts.json")}


def _synthesize(ctx: StepContext, kind: str) -> dict:
    config = getattr(ctx.recipe.steps, f"{kind}s")
    output = ctx.out / f"{kind}s.jsonl"
    if config.count == 0:
        output.write_text("")
        return {"requested": 0, "ok": 0}
    argv = [*_py(), ctx.tool("generate_synthetic.py"), "--output", str(output),
            "--textbooks", str(config.count if kind == "textbook" else 0),
            "--exercises", str(config.count if kind == "exercise" else 0), *_teacher_args(ctx, config.model),
            "--max-tokens", str(config.max_tokens), "--temperature", str(config.temperature), "--seed", str(config.seed),
            "--max-attempts", str(config.max_attempts), "--counts", str(ctx.out / "counts.json"), "--no-progress",
            *config.extra_args]
    if ctx.recipe.inputs.synthetic_lists:
        argv += ["--lists", ctx.recipe.inputs.synthetic_lists]
    ctx.run(argv, f"generate_{kind}s")
    records = [r for _, r in _jsonl(output)]
    reasons = Counter(reason.split(":")[0] for r in records if r.get("status") == "rejected"
                      for reason in r.get("reject_reasons", []))
    counts = {"requested": config.count, "ok": sum(r.get("status") == "ok" for r in records),
              "pruned": {f"rejected after {config.max_attempts} attempts: {k}": v for k, v in reasons.items()},
              "rejected": sum(r.get("status") == "rejected" for r in records),
              "teacher_models": sorted({r.get("model") for r in records if r.get("model")})}
    if kind == "exercise":
        counts["pairs"] = _exercise_pairs(ctx, records)
    return counts


def _exercise_pairs(ctx: StepContext, records: list[dict]) -> int:
    """Accepted exercises -> prompt (signature + docstring) / solution (body) pairs, by tools/build_exercises.py."""
    source = ctx.out / "exercise_sources"
    source.mkdir(exist_ok=True)
    accepted = [r for r in records if r.get("status") == "ok"]
    for record in accepted:
        (source / f"{record['id']}.py").write_text(record["text"], encoding="utf-8")
    pairs = ctx.out / "exercise_pairs.jsonl"
    if not accepted:
        pairs.write_text("")
        return 0
    ctx.run([*_py(), ctx.tool("build_exercises.py"), "--root", str(source), "--output", str(pairs)], "build_exercises")
    return _lines(pairs)


def textbooks(ctx: StepContext) -> dict:
    """Synthetic textbook sections from the teacher."""
    return _synthesize(ctx, "textbook")


def exercises(ctx: StepContext) -> dict:
    """Synthetic exercises from the teacher, validated (and their tests run) by the generator."""
    return _synthesize(ctx, "exercise")


def decontaminate(ctx: StepContext) -> dict:
    """Filtered code, textbooks and exercises checked against HumanEval (and MBPP) in one pass, then split."""
    config = ctx.recipe.steps.decontaminate
    inputs = ctx.recipe.inputs
    combined = ctx.out / "combined.jsonl"

    def records():
        for path in sorted((ctx.upstream("dedup") / "dedup").glob("*.jsonl")):
            for number, record in _jsonl(path):
                if isinstance(record.get("text"), str):
                    yield {"id": f"code:{path.name}:{number}", "source": "code", "text": record["text"]}
        for _, record in _jsonl(ctx.upstream("textbooks") / "textbooks.jsonl"):
            if record.get("status") == "ok":
                yield {"id": record["id"], "source": "textbook", "text": record["text"]}
        for path in [ctx.upstream("exercises") / "exercise_pairs.jsonl", *inputs.exercises]:
            for number, record in _jsonl(path):
                if isinstance(record.get("prompt"), str) and isinstance(record.get("solution"), str):
                    yield {"id": f"exercise:{Path(path).name}:{number}", "source": "exercise",
                           "text": record["prompt"] + record["solution"], "prompt": record["prompt"],
                           "solution": record["solution"]}

    _write_jsonl(combined, records())
    before = Counter(r["source"] for _, r in _jsonl(combined))
    clean = ctx.out / "clean.jsonl"
    argv = [*_py(), ctx.tool("decontaminate.py"), "--input", str(combined), "--output", str(clean), "--report",
            str(ctx.out / "report.jsonl"), "--summary", str(ctx.out / "summary.json"), "--ngram-n", str(config.ngram_n),
            "--tau", str(config.tau), "--workers", str(config.workers), "--no-progress", *config.extra_args]
    if inputs.humaneval:
        argv += ["--humaneval", inputs.humaneval]
    if inputs.mbpp:
        argv += ["--mbpp", inputs.mbpp]
    if config.embedding:
        argv += ["--embedding-model", inputs.embedding_model]
        if config.embedding_threshold is not None:
            argv += ["--embedding-threshold", str(config.embedding_threshold)]
    ctx.run(argv, "decontaminate")
    # The contamination index describes the data as trained on, so it is built from what was kept (a second
    # pass; the first one's matches are the documents it pruned). phi1-eval splits pass@k by it.
    ctx.run([*argv[:2], "--input", str(clean), "--output", str(ctx.out / "index_pass.jsonl"), "--report",
             str(ctx.out / "index_pass_report.jsonl"), "--index", str(ctx.out / "decontamination_index.json"),
             *argv[argv.index("--ngram-n"):]], "contamination_index")
    (ctx.out / "index_pass.jsonl").unlink()
    (ctx.out / "index_pass_report.jsonl").unlink()
    # The index names the file it read (clean.jsonl, removed below); name the kept data where it will stay.
    index_path = ctx.out / "decontamination_index.json"
    index = json.loads(index_path.read_text())
    index["training_data"] = [str(ctx.upstream("decontaminate") / name)
                              for name in ("code.jsonl", "textbooks.jsonl", "exercises.jsonl")]
    index_path.write_text(json.dumps(index))
    kept = [r for _, r in _jsonl(clean)]
    _write_jsonl(ctx.out / "code.jsonl", ({"text": r["text"]} for r in kept if r["source"] == "code"))
    _write_jsonl(ctx.out / "textbooks.jsonl", ({"text": r["text"]} for r in kept if r["source"] == "textbook"))
    _write_jsonl(ctx.out / "exercises.jsonl", ({"prompt": r["prompt"], "solution": r["solution"]}
                                                for r in kept if r["source"] == "exercise"))
    after = Counter(r["source"] for r in kept)
    combined.unlink()
    clean.unlink()
    summary = _read_json(ctx.out / "summary.json")
    return {"documents": dict(before), "kept": dict(after),
            "pruned": {f"near a benchmark problem ({source}: 13-gram / AST / embedding)": before[source] - after[source]
                       for source in before},
            "flagged_by": summary.get("flagged_by"), "documents_with_ast_match_at_tau":
            summary.get("documents_with_ast_match_at_tau"), "bad_lines": summary.get("bad_lines")}


def preprocess(ctx: StepContext) -> dict:
    """CodeTextbook: decontaminated code + synthetic textbooks -> one tokenized dataset."""
    config = ctx.recipe.steps.preprocess
    clean = ctx.upstream("decontaminate")
    mix = ctx.out / "pretrain.jsonl"
    code = _lines(clean / "code.jsonl")
    books = _lines(clean / "textbooks.jsonl")
    with open(mix, "wb") as handle:
        handle.write((clean / "code.jsonl").read_bytes())
        for _ in range(config.textbook_repeats):
            handle.write((clean / "textbooks.jsonl").read_bytes())
    if code + books * config.textbook_repeats == 0:
        raise StepFailed("no pretraining document is left after filter, dedup and decontaminate; lower "
                         "steps.filter.threshold or give a larger corpus", exit_code=2)
    ctx.run([*_py(), ctx.tool("preprocess_data.py"), "--input", str(mix), "--json-keys", "text", "--append-eod",
             "--output-prefix", str(ctx.out / "pretrain"), "--tokenizer-model", ctx.recipe.inputs.tokenizer,
             "--workers", str(config.workers)], "preprocess")
    mix.unlink()
    sidecar = _read_json(ctx.out / "pretrain_text_document.json")
    itemsize = 4 if (sidecar.get("tokenizer", {}).get("vocab_size") or 0) > 65535 else 2
    tokens = (ctx.out / "pretrain_text_document.bin").stat().st_size // itemsize
    return {"documents": {"code": code, "textbooks": books * config.textbook_repeats}, "tokens": tokens}


def _overrides(overrides: dict) -> list[str]:
    def text(value) -> str:
        return value if isinstance(value, str) else json.dumps(value)  # JSON is YAML: the trainer reads it back
    return [f"{key}={text(value)}" for key, value in overrides.items()]


def _train(ctx: StepContext, name: str, data: list[str]) -> dict:
    config = getattr(ctx.recipe.steps, name)
    launcher = [*_py(), "-m", "phi1.train"] if config.nproc == 1 else \
        [*_py(), "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(config.nproc), "-m", "phi1.train"]
    run_dir = ctx.out / "run"
    ctx.run([*launcher, "--config", config.config, f"data.tokenizer_model={ctx.recipe.inputs.tokenizer}", *data,
             *_overrides(config.overrides), f"checkpoint.dir={run_dir}"], name)
    losses = []
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        for _, record in _jsonl(metrics):
            losses += [loss for loss in record.get("step_losses", []) if isinstance(loss, (int, float))]
    latest = (run_dir / "latest").read_text().strip() if (run_dir / "latest").exists() else None
    return {"steps": len(losses), "latest_iteration": latest, "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None}


def pretrain(ctx: StepContext) -> dict:
    """phi1.train on the preprocessed CodeTextbook data."""
    return _train(ctx, "pretrain", [f"data.path={ctx.upstream('preprocess') / 'pretrain_text_document'}"])


def finetune(ctx: StepContext) -> dict:
    """phi1.train from the pretrained run on the decontaminated exercises (CodeExercises)."""
    exercises_file = ctx.upstream("decontaminate") / "exercises.jsonl"
    if _lines(exercises_file) == 0:
        raise StepFailed("no exercise is left to fine-tune on: give inputs.exercises (tools/build_exercises.py) "
                         "or raise steps.exercises.count", exit_code=2)
    return _train(ctx, "finetune", [f"finetune.init_from={ctx.upstream('pretrain') / 'run'}",
                                    f"finetune.data={exercises_file}"])


def evaluate(ctx: StepContext) -> dict:
    """pass@k of the fine-tuned model in the sandbox (phi1-eval)."""
    config = ctx.recipe.steps.evaluate
    output = ctx.out / "eval"
    argv = [*_py(), "-m", "phi1.eval", "--model", str(ctx.upstream("finetune") / "run"), "--task", config.task,
            "--n-samples", str(config.n_samples), "--temperature", str(config.temperature), "--output-dir",
            str(output), "--contamination-index", str(ctx.upstream("decontaminate") / "decontamination_index.json"),
            "--quiet", *config.extra_args]
    data = config.data or (ctx.recipe.inputs.humaneval if config.task == "humaneval" else None)
    for flag, value in (("--data", data), ("--limit", config.limit), ("--max-new-tokens", config.max_new_tokens)):
        if value is not None:
            argv += [flag, str(value)]
    ctx.run(argv, "evaluate")
    summary = _read_json(output / "summary.json")
    return {key: value for key, value in summary.items()
            if not isinstance(value, (list, dict)) or key.startswith("pass") or key == "contamination"}


# name -> (function, upstream steps it reads, whether it needs the teacher)
STEPS: dict[str, tuple[Callable[[StepContext], dict], tuple[str, ...], bool]] = {
    "annotate": (annotate, (), True),
    "classifier": (classifier, ("annotate",), False),
    "filter": (filter_corpus, ("classifier",), False),
    "dedup": (dedup, ("filter",), False),
    "textbooks": (textbooks, (), True),
    "exercises": (exercises, (), True),
    "decontaminate": (decontaminate, ("dedup", "textbooks", "exercises"), False),
    "preprocess": (preprocess, ("decontaminate",), False),
    "pretrain": (pretrain, ("preprocess",), False),
    "finetune": (finetune, ("pretrain", "decontaminate"), False),
    "evaluate": (evaluate, ("finetune", "decontaminate"), False),
}
