"""Synthetic textbook sections and exercises from any OpenAI-compatible endpoint (the paper's GPT-3.5 data).

    python tools/generate_synthetic.py --output data/synthetic/run1.jsonl --textbooks 1000 --exercises 1000 \
        --base-url http://127.0.0.1:8000/v1 --model phi1 [--api chat|completions] [--lists configs/synthetic] \
        [--concurrency 8] [--requests-per-minute 600] [--max-attempts 3]

--base-url and --api-key default to OPENAI_BASE_URL and OPENAI_API_KEY. --max-tokens defaults to what fits the
teacher's context when its /v1/models says it (`max_model_len`, as phi1-serve and vLLM report; 512 at most, room
kept for the prompt), else 512; a request the endpoint refuses (a context too small, a wrong model name) ends
the run with one line saying what to change. Each record draws a topic, an audience
and a style (and an exercise a function name) from the lists in --lists (replace the .txt files to change them).
Output lines are appended with fsync; rerunning the same command resumes: finished ids are skipped, a torn last
line is cut. Every id ends as one line with status "ok" or "rejected" (see phi1/quality/synthetic.py). The run
ends with counts per kind/status, topic and audience; --counts writes them as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

from phi1.cli import UserError
from phi1.quality.endpoint_models import (
    DEFAULT_MAX_TOKENS,
    choose_max_tokens,
    list_models,
    refused,
    stated_context,
)
from phi1.quality.synthetic import (
    DiversityLists,
    EndpointUnavailable,
    GeneratorConfig,
    SyntheticGenerator,
    count_output,
)

# The diversity lists shipped in the checkout (configs/synthetic, beside phi1/).
DEFAULT_LISTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "configs", "synthetic")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True)
    parser.add_argument("--textbooks", type=int, default=10)
    parser.add_argument("--exercises", type=int, default=10)
    parser.add_argument("--base-url", default=os.environ.get("OPENAI_BASE_URL"))
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    parser.add_argument("--model", help="model name (default: the first one the endpoint's /v1/models lists)")
    parser.add_argument("--api", choices=("chat", "completions"), default="chat")
    parser.add_argument("--lists", default=DEFAULT_LISTS, help="folder with topics.txt, audiences.txt, ...")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help=f"tokens per generation (default: {DEFAULT_MAX_TOKENS}, or less when the endpoint's context "
                        "is smaller)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--requests-per-minute", type=float, default=0.0, help="0: no limit")
    parser.add_argument("--max-retries", type=int, default=8)
    parser.add_argument("--backoff", type=float, default=1.0, help="first retry delay (s), doubled each time")
    parser.add_argument("--max-backoff", type=float, default=30.0)
    parser.add_argument("--request-timeout", type=float, default=120.0)
    parser.add_argument("--max-attempts", type=int, default=3)
    parser.add_argument("--near-duplicate-threshold", type=float, default=0.8)
    parser.add_argument("--no-tests", action="store_true", help="do not run exercises' tests in the sandbox")
    parser.add_argument("--counts", help="write the final counts as JSON here")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if not args.base_url:
        parser.error("--base-url (or OPENAI_BASE_URL) is needed, e.g. http://127.0.0.1:8000/v1")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import openai

    from phi1.eval.sandbox import SandboxConfig, run_program

    models = list_models(args)
    if args.model is None:
        if not models:
            raise UserError(f"{args.base_url}: /models lists no model; pass --model")
        args.model = models[0].id
    entry = next((m for m in models if m.id == args.model), None)
    args.max_tokens = choose_max_tokens(args.max_tokens, stated_context(entry) if entry else None, args.base_url)
    config = GeneratorConfig(
        textbooks=args.textbooks, exercises=args.exercises, model=args.model, api=args.api,
        max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed, concurrency=args.concurrency,
        requests_per_minute=args.requests_per_minute, max_retries=args.max_retries, backoff_s=args.backoff,
        max_backoff_s=args.max_backoff, max_attempts=args.max_attempts,
        near_duplicate_threshold=args.near_duplicate_threshold, run_tests=not args.no_tests,
    )
    lists = DiversityLists.from_directory(args.lists)
    # Retries are ours (backoff with jitter, counted); the client's own would hide failures.
    client = openai.AsyncOpenAI(base_url=args.base_url, api_key=args.api_key or "unused", max_retries=0,
                                timeout=args.request_timeout)
    sandbox_config = SandboxConfig(timeout_s=config.test_timeout_s)
    generator = SyntheticGenerator(client, config, lists, args.output,
                                   sandbox=lambda program: run_program(program, sandbox_config))
    stopped = None
    try:
        asyncio.run(generator.run(progress=not args.no_progress))
    except EndpointUnavailable as error:
        stopped = error
    except openai.APIStatusError as error:
        problem = refused(error, args.base_url, args.max_tokens)
        if problem is None:
            raise
        raise problem from None
    counts = count_output(args.output)
    run = generator.counts
    counts["this_run"] = {"written": {f"{k}/{s}": n for (k, s), n in sorted(run.written.items())},
                          "skipped_finished": run.skipped, "retries": run.retries,
                          "rejected_generations": dict(run.rejections)}
    print(json.dumps(counts, indent=2), file=sys.stderr)
    if args.counts:
        with open(args.counts, "w", encoding="utf-8") as handle:
            json.dump(counts, handle, indent=2)
    if stopped is not None:
        print(f"{args.base_url}: endpoint unavailable after {args.max_retries} retries ({stopped}); "
              f"{len(generator.finished)} ids are finished in {args.output}. Run the same command again to resume.",
              file=sys.stderr)
        raise SystemExit(3)
    return counts

