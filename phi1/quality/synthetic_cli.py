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
from phi1.quality.synthetic import (
    DiversityLists,
    EndpointUnavailable,
    GeneratorConfig,
    SyntheticGenerator,
    count_output,
)

# The diversity lists shipped in the checkout (configs/synthetic, beside phi1/).
DEFAULT_LISTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "configs", "synthetic")
DEFAULT_MAX_TOKENS = 512
# Room kept for the prompt: the generator's prompts are one or two sentences (under 100 tokens in any common
# tokenizer), plus a chat template's few tokens.
PROMPT_ALLOWANCE_TOKENS = 128
MIN_GENERATION_TOKENS = 32
# Where OpenAI-compatible servers state a model's context in /v1/models (vLLM and phi1-serve: max_model_len).
CONTEXT_FIELDS = ("max_model_len", "context_length", "max_context_length")


def stated_context(model_entry) -> int | None:
    """The context length a /v1/models entry states, or None (the official OpenAI API states none)."""
    extra = getattr(model_entry, "model_extra", None) or {}
    for name in CONTEXT_FIELDS:
        value = extra.get(name, getattr(model_entry, name, None))
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def choose_max_tokens(requested: int | None, context: int | None, where: str) -> int:
    """Tokens per generation: `requested`, or the default that fits `context` (None: unknown, 512).

    Raises:
        UserError: the context is too small for any useful generation, or `requested` cannot fit in it.
    """
    if requested is not None and requested < 1:
        raise UserError(f"--max-tokens {requested}: must be at least 1")
    if context is None:
        return DEFAULT_MAX_TOKENS if requested is None else requested
    room = context - PROMPT_ALLOWANCE_TOKENS
    if requested is None:
        if room < MIN_GENERATION_TOKENS:
            raise UserError(f"{where}: the model's context is {context} tokens, too small for textbook sections after "
                            f"a prompt of up to {PROMPT_ALLOWANCE_TOKENS} tokens; serve a model with a longer context, "
                            "or pass --max-tokens to try anyway")
        return min(DEFAULT_MAX_TOKENS, room)
    if requested >= context:
        raise UserError(f"--max-tokens {requested}: the model at {where} has a context of {context} tokens, prompt "
                        f"included; pass at most {max(1, room)} or leave --max-tokens out")
    return requested


def refused(error: BaseException, base_url: str, max_tokens: int) -> UserError | None:
    """A one-line UserError for a request the endpoint refused as wrong (4xx other than rate limits), else None."""
    import openai

    if not isinstance(error, openai.APIStatusError) or error.status_code in (408, 409, 429) or error.status_code >= 500:
        return None
    body = error.body if isinstance(error.body, dict) else {}
    detail = body.get("message") or (body.get("error") or {}).get("message") if body else None
    message = " ".join(str(detail or error.message).split())
    hint = ""
    if "context" in message.lower() or (body.get("code") or (body.get("error") or {}).get("code")) == \
            "context_length_exceeded":
        hint = f"; pass a smaller --max-tokens (this run asked for {max_tokens})"
    elif error.status_code in (401, 403):
        hint = "; check --api-key (or OPENAI_API_KEY)"
    elif error.status_code == 404:
        hint = "; check --model and --base-url (it should end in /v1)"
    return UserError(f"{base_url}: the endpoint refused the request ({error.status_code}): {message}{hint}")


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


def list_models(args: argparse.Namespace) -> list:
    """The endpoint's /v1/models entries; [] when it has no such route and --model was given."""
    import openai

    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key or "unused", max_retries=args.max_retries,
                           timeout=args.request_timeout)
    try:
        return list(client.models.list().data)
    except openai.APIConnectionError as error:
        raise UserError(f"--base-url {args.base_url}: cannot connect ({error}); is the server running?") from None
    except openai.APIStatusError as error:
        problem = refused(error, args.base_url, args.max_tokens or DEFAULT_MAX_TOKENS)
        if problem is None or args.model is None:
            raise problem or error from None
        return []


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

