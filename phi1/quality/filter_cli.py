"""The paper's quality filter: LLM annotation, then a random forest on code embeddings from a phi1 checkpoint.

    # the paper's labels: ask any OpenAI-compatible endpoint for each file's educational value (0..10), resumable
    python tools/quality_filter.py annotate --input data/raw/*.jsonl --output data/quality/annotated.jsonl \
        --base-url http://127.0.0.1:8000/v1 --model gpt-4 [--prompt-file my_prompt.txt] [--concurrency 8] \
        [--requests-per-minute 500] [--label-threshold 0.5]
    # ... then `train --labelled data/quality/annotated.jsonl --label-key score` (regression on the 0..1 score)
    # or `--label-key label` (1 when score >= --label-threshold)
    # an honest labelled set computable offline: documented stdlib functions (1) vs docstring removed (0)
    python tools/quality_filter.py make-labels --output data/quality/labels.jsonl --count 1000
    # a small embedder trained briefly on stdlib code (CPU, about a minute), when no real checkpoint is at hand
    python tools/quality_filter.py demo-embedder --output-dir runs/quality/embedder
    # embeddings -> 5-fold cross-validated report (precision, recall, AUC vs the majority class) -> classifier
    python tools/quality_filter.py train --labelled data/quality/labels.jsonl \
        --embedding-model runs/quality/embedder --output runs/quality/classifier
    # score and filter shards with several workers; every kept line gets "quality_score"
    python tools/quality_filter.py filter --classifier runs/quality/classifier --input data/shards/*.jsonl \
        --output-dir data/filtered --threshold 0.5 --workers 2

--embedding-model is a phi1 checkpoint or any transformers model directory: encoders (CodeBERT-style) are
mean-pooled, decoders (CodeGen, phi) mean- or --pooling last; the classifier records the embedder (fingerprint,
backend, pooling, max tokens) and `filter` embeds the same way. Labels are 0/1 (classification) or scores (regression; the report binarises them at --threshold). Classifiers
are saved as arrays + JSON (no pickle) and record the checkpoint whose embeddings they read; `filter` refuses
another checkpoint unless --allow-other-embedder. Bad lines are counted and listed by file and line.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time

import numpy as np

from phi1.cli import UserError
from phi1.quality.jsonl import LineStats, iter_records


def make_labels(args: argparse.Namespace) -> None:
    from phi1.quality.stdlib_functions import documented_labelled_set

    records = documented_labelled_set(args.count, seed=args.seed)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    print(f"{args.output}: {len(records)} functions, {sum(r['label'] for r in records)} documented (label 1), "
          "the rest with their docstring removed (label 0)", file=sys.stderr)


def demo_embedder(args: argparse.Namespace) -> None:
    from phi1.core.config import get_preset
    from phi1.data.tokenizer_training import main as train_tokenizer
    from phi1.data.tokenizers import build_tokenizer
    from phi1.quality.stdlib_functions import stdlib_functions
    from phi1.quality.tiny_model import train_tiny_model

    # Functions from other files than make-labels draws from first (another seed): the embedder learns code,
    # not the labelled examples.
    texts = [f.source for f in stdlib_functions(args.documents, seed=args.seed + 1000)]
    work = tempfile.mkdtemp(prefix="phi1-embedder-")
    corpus = os.path.join(work, "corpus.jsonl")
    with open(corpus, "w", encoding="utf-8") as handle:
        for text in texts:
            handle.write(json.dumps({"text": text}) + "\n")
    vocab = min(get_preset(args.preset).vocab_size, 8000)
    train_tokenizer(["--input", corpus, "--output-dir", os.path.join(work, "tokenizer"), "--vocab-size", str(vocab),
                     "--threads", "1"])
    model_file = os.path.join(work, "tokenizer", "tokenizer.model")
    tokenizer = build_tokenizer("SentencePieceTokenizer", model_file)
    start = time.perf_counter()
    losses = train_tiny_model(texts, tokenizer, args.output_dir, preset=args.preset, steps=args.steps,
                              seed=args.seed, tokenizer_file=model_file)
    print(f"{args.output_dir}: {args.preset} trained {args.steps} steps on {len(texts)} stdlib functions in "
          f"{time.perf_counter() - start:.0f}s, loss {losses[0]:.2f} -> {np.mean(losses[-20:]):.2f}", file=sys.stderr)


def read_labelled(path: str, text_key: str, label_key: str) -> tuple[list[str], np.ndarray, LineStats]:
    """Texts and labels of a labelled jsonl; bad lines are counted (and printed by the caller).

    Lines `annotate` wrote as status "unparsed" (no score could be read) are skipped and counted apart.
    """
    stats = LineStats()
    texts, labels = [], []
    unparsed = 0
    for line_number, record in iter_records(path, {text_key: str}, stats):
        if record.get("status") == "unparsed":
            unparsed += 1
            continue
        label = record.get(label_key)
        if isinstance(label, bool) or not isinstance(label, (int, float)):
            stats.good -= 1
            stats.note("missing_key" if label_key not in record else "wrong_type", path, line_number,
                       f"{label_key!r} is {type(label).__name__ if label_key in record else 'missing'}, expected a number")
            continue
        texts.append(record[text_key])
        labels.append(float(label))
    if unparsed:
        print(f"{path}: {unparsed} annotations without a score (status unparsed) skipped", file=sys.stderr)
    return texts, np.array(labels), stats


def annotate(args: argparse.Namespace) -> dict:
    import asyncio

    import openai

    from phi1.quality.annotate import DEFAULT_PROMPT, AnnotateConfig, Annotator, read_prompt
    from phi1.quality.endpoint import EndpointConfig, EndpointUnavailable
    from phi1.quality.endpoint_models import list_models, refused

    if not args.base_url:
        raise UserError("--base-url (or OPENAI_BASE_URL) is needed, e.g. http://127.0.0.1:8000/v1")
    for name, value, low in (("--scale", args.scale, 1e-9), ("--max-attempts", args.max_attempts, 1),
                             ("--concurrency", args.concurrency, 1), ("--max-tokens", args.max_tokens, 1),
                             ("--max-chars", args.max_chars, 1)):
        if value < low:
            raise UserError(f"{name} {value}: must be at least {low:g}")
    if not 0 <= args.label_threshold <= 1:
        raise UserError(f"--label-threshold {args.label_threshold}: must be in [0, 1] (scores are scaled to 0..1)")
    for path in args.input:
        if not os.path.isfile(path):
            raise UserError(f"--input {path}: no such file")
    prompt = read_prompt(args.prompt_file) if args.prompt_file else DEFAULT_PROMPT
    if args.model is None:
        models = list_models(args)
        if not models:
            raise UserError(f"{args.base_url}: /models lists no model; pass --model")
        args.model = models[0].id
    endpoint = EndpointConfig(model=args.model, api=args.api, max_tokens=args.max_tokens, temperature=args.temperature,
                              concurrency=args.concurrency, requests_per_minute=args.requests_per_minute,
                              max_retries=args.max_retries, backoff_s=args.backoff, max_backoff_s=args.max_backoff)
    config = AnnotateConfig(endpoint=endpoint, prompt=prompt, scale=args.scale, label_threshold=args.label_threshold,
                            max_attempts=args.max_attempts, text_key=args.text_key, id_key=args.id_key,
                            max_chars=args.max_chars, seed=args.seed)
    # Retries are ours (backoff with jitter, counted); the client's own would hide failures.
    client = openai.AsyncOpenAI(base_url=args.base_url, api_key=args.api_key or "unused", max_retries=0,
                                timeout=args.request_timeout)
    annotator = Annotator(client, config, args.input, args.output)
    stopped = None
    try:
        asyncio.run(annotator.run(progress=not args.no_progress))
    except EndpointUnavailable as error:
        stopped = error
    except openai.APIStatusError as error:
        problem = refused(error, args.base_url, args.max_tokens)
        if problem is None:
            raise
        raise problem from None
    counts = {**annotator.counts.to_dict(), "finished": len(annotator.finished)}
    print(json.dumps({k: v for k, v in counts.items() if k != "input_lines"}), file=sys.stderr)
    if annotator.counts.input.bad:
        print(f"input lines: {annotator.counts.input.summary()}", file=sys.stderr)
    if args.counts:
        with open(args.counts, "w", encoding="utf-8") as handle:
            json.dump(counts, handle, indent=2)
    if stopped is not None:
        print(f"{args.base_url}: endpoint unavailable after {args.max_retries} retries ({stopped}); "
              f"{len(annotator.finished)} files are finished in {args.output}. Run the same command again to resume.",
              file=sys.stderr)
        raise SystemExit(3)
    return counts


def train(args: argparse.Namespace) -> dict:
    from phi1.quality.classifier import (
        ForestConfig,
        QualityClassifier,
        cross_validate,
        export_forest,
        fit_forest,
        format_report,
        is_binary,
    )
    from phi1.quality.embeddings import checkpoint_fingerprint, load_embedder

    texts, labels, stats = read_labelled(args.labelled, args.text_key, args.label_key)
    print(f"{args.labelled}: {stats.summary()}", file=sys.stderr)
    if not texts:
        raise UserError(f"{args.labelled}: no usable labelled records")
    embedder = load_embedder(args.embedding_model, args.embedder, args.pooling, args.tokenizer_type,
                             args.tokenizer_model, batch_size=args.batch_size, max_tokens=args.max_tokens,
                             device=args.device)
    start = time.perf_counter()
    features = embedder.embed(texts)
    print(f"embedded {len(texts)} texts in {time.perf_counter() - start:.1f}s ({features.shape[1]} features)",
          file=sys.stderr)
    config = ForestConfig(trees=args.trees, seed=args.seed, jobs=args.jobs, min_samples_leaf=args.min_samples_leaf)
    report = cross_validate(features, labels, config, folds=args.folds, threshold=args.threshold)
    print(format_report(report))
    forest = fit_forest(features, labels, config)
    header = {
        "kind": "classification" if is_binary(labels) else "regression",
        "n_features": int(features.shape[1]), "n_trees": config.trees, "threshold": args.threshold,
        "embedder": {"model_dir": os.path.abspath(args.embedding_model),
                     "fingerprint": checkpoint_fingerprint(args.embedding_model), **embedder.describe()},
        "trained_on": os.path.abspath(args.labelled), "cross_validation": report, "forest": config.__dict__,
    }
    QualityClassifier(export_forest(forest), header).save(args.output)
    print(f"{args.output}: classifier saved", file=sys.stderr)
    return report


def filter_shards(args: argparse.Namespace) -> dict:
    from phi1.quality.filtering import config_for_classifier, filter_chunk
    from phi1.quality.shards import concatenate, default_chunk_bytes, plan_chunks, run_chunks

    config = config_for_classifier(args.classifier, threshold=args.threshold, embedding_model=args.embedding_model,
                                   allow_other_embedder=args.allow_other_embedder,
                                   tokenizer_type=args.tokenizer_type, tokenizer_model=args.tokenizer_model,
                                   text_key=args.text_key, batch_size=args.batch_size, device=args.device,
                                   keep_all=args.keep_all)
    threshold = config.threshold
    os.makedirs(args.output_dir, exist_ok=True)
    start = time.perf_counter()
    chunks = plan_chunks(args.input, args.chunk_bytes or default_chunk_bytes(args.input, args.workers))
    work_dir = tempfile.mkdtemp(prefix=".quality-", dir=args.output_dir)
    results = run_chunks(chunks, functools.partial(filter_chunk, config, work_dir), args.workers, "scoring",
                         progress=not args.no_progress)
    for path in args.input:  # one output shard per input shard, same name
        parts = [r.output_part for r, c in zip(results, chunks) if c.path == path]
        concatenate(parts, os.path.join(args.output_dir, os.path.basename(path)))
    os.rmdir(work_dir)
    stats = LineStats()
    for result in results:
        stats.merge(result.stats)
    kept, dropped = sum(r.kept for r in results), sum(r.dropped for r in results)
    elapsed = time.perf_counter() - start
    summary = {"kept": kept, "dropped": dropped, "threshold": threshold, "seconds": round(elapsed, 2),
               "documents_per_second": round((kept + dropped) / elapsed, 1) if elapsed else None,
               "mean_score": round(sum(r.score_sum for r in results) / max(1, kept + dropped), 4),
               "bad_lines": stats.to_dict()}
    print(f"scored {kept + dropped} documents in {elapsed:.1f}s with {args.workers} workers: kept {kept} "
          f"(score >= {threshold}), dropped {dropped}", file=sys.stderr)
    print(f"input lines: {stats.summary()}", file=sys.stderr)
    if args.strict and stats.bad:
        raise SystemExit(2)
    return summary


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    labels = commands.add_parser("make-labels", help="documented vs undocumented stdlib functions")
    labels.add_argument("--output", required=True)
    labels.add_argument("--count", type=int, default=1000)
    labels.add_argument("--seed", type=int, default=0)

    demo = commands.add_parser("demo-embedder", help="train a small phi1 embedder on stdlib code (CPU)")
    demo.add_argument("--output-dir", required=True)
    demo.add_argument("--preset", default="phi-1-nano")
    demo.add_argument("--steps", type=int, default=300)
    demo.add_argument("--documents", type=int, default=1500)
    demo.add_argument("--seed", type=int, default=0)

    ask = commands.add_parser("annotate", help="LLM scores of educational value (the paper's GPT-4 labels)")
    ask.add_argument("--input", nargs="+", required=True, help="jsonl files with text (and optionally id)")
    ask.add_argument("--output", required=True, help="jsonl, appended; rerun to resume")
    ask.add_argument("--base-url", default=os.environ.get("OPENAI_BASE_URL"))
    ask.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    ask.add_argument("--model", help="model name (default: the first one the endpoint's /v1/models lists)")
    ask.add_argument("--api", choices=("chat", "completions"), default="chat")
    ask.add_argument("--prompt-file", help="prompt template with {text} (and optionally {scale}); default: the "
                     "paper's question")
    ask.add_argument("--scale", type=float, default=10.0, help="answers are 0..scale; stored divided by it")
    ask.add_argument("--label-threshold", type=float, default=0.5, help="label = score/scale >= this")
    ask.add_argument("--text-key", default="text")
    ask.add_argument("--id-key", default="id", help="records without it are keyed by their text's sha256")
    ask.add_argument("--max-chars", type=int, default=6000, help="files are cut to this many characters")
    ask.add_argument("--max-tokens", type=int, default=32)
    ask.add_argument("--temperature", type=float, default=0.0)
    ask.add_argument("--seed", type=int, default=0)
    ask.add_argument("--concurrency", type=int, default=4)
    ask.add_argument("--requests-per-minute", type=float, default=0.0, help="0: no limit")
    ask.add_argument("--max-retries", type=int, default=8)
    ask.add_argument("--backoff", type=float, default=1.0, help="first retry delay (s), doubled each time")
    ask.add_argument("--max-backoff", type=float, default=30.0)
    ask.add_argument("--request-timeout", type=float, default=120.0)
    ask.add_argument("--max-attempts", type=int, default=3, help="answers asked per file before it is unparsed")
    ask.add_argument("--counts", help="write the run's counts as JSON here")
    ask.add_argument("--no-progress", action="store_true")

    for name in ("train", "filter"):
        sub = commands.add_parser(name)
        sub.add_argument("--embedding-model", required=name == "train",
                         help="a phi1 model directory or any transformers model directory (encoder or decoder)")
        sub.add_argument("--tokenizer-type", help="phi1 embedders only: when the directory holds no tokenizer")
        sub.add_argument("--tokenizer-model")
        sub.add_argument("--device", default="auto", help="auto: cuda when there is a GPU, else cpu")
        sub.add_argument("--text-key", default="text")
        sub.add_argument("--batch-size", type=int, default=32)
        if name == "train":
            sub.add_argument("--labelled", required=True, help="jsonl with text and label (0/1 or a score)")
            sub.add_argument("--label-key", default="label")
            sub.add_argument("--embedder", choices=("auto", "phi1", "transformers"), default="auto",
                             help="auto: phi1 for phi1/phi directories, transformers for other model types")
            sub.add_argument("--pooling", choices=("mean", "last"), default="mean",
                             help="last: the last real token's state (decoders only)")
            sub.add_argument("--max-tokens", type=int, default=None, help="texts are cut to this many tokens")
            sub.add_argument("--output", required=True, help="classifier directory")
            sub.add_argument("--folds", type=int, default=5)
            sub.add_argument("--trees", type=int, default=200)
            sub.add_argument("--min-samples-leaf", type=int, default=1)
            sub.add_argument("--threshold", type=float, default=0.5, help="score at which a text counts as good")
            sub.add_argument("--jobs", type=int, default=1)
            sub.add_argument("--seed", type=int, default=0)
        else:
            sub.add_argument("--classifier", required=True)
            sub.add_argument("--input", nargs="+", required=True)
            sub.add_argument("--output-dir", required=True)
            sub.add_argument("--threshold", type=float, default=None, help="default: the classifier's")
            sub.add_argument("--keep-all", action="store_true", help="score every line, drop none")
            sub.add_argument("--workers", type=int, default=1)
            sub.add_argument("--chunk-bytes", type=int, default=None)
            sub.add_argument("--allow-other-embedder", action="store_true")
            sub.add_argument("--strict", action="store_true", help="exit 2 when any line was bad")
            sub.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None):
    args = parse_args(argv)
    command = {"make-labels": make_labels, "demo-embedder": demo_embedder, "annotate": annotate, "train": train,
               "filter": filter_shards}
    return command[args.command](args)

