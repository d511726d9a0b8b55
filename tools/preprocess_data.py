"""Tokenizes a jsonl corpus into Megatron indexed datasets: `{output_prefix}_{key}_document.bin/.idx`.

    python tools/preprocess_data.py --input data/stdlib.jsonl --output-prefix data/stdlib \\
        --tokenizer-type SentencePieceTokenizer --tokenizer-model data/tok/tokenizer.model --append-eod --workers 2

Flags follow Megatron-LM's tools/preprocess_data.py where they apply. Speed comes from doing all per-document
work in the workers, in batches: the main process reads raw lines in ~1 MiB chunks and writes the token arrays
that come back; each worker parses the JSON, encodes the whole chunk with one native batch call and returns one
numpy array per key (cheap to pickle). Chunks come back in input order, so the output is byte-identical for any
worker count. Malformed lines, lines without a key and blank lines are counted and reported as file:line
(`--strict` stops at the first); nothing is dropped silently.
"""

from __future__ import annotations

import argparse
import gzip
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import chain

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from phi1.data.indexed_dataset import IndexedDatasetWriter, token_dtype_for_vocab  # noqa: E402
from phi1.data.tokenizers import ENGINES, TOKENIZER_TYPES, Tokenizer, build_tokenizer  # noqa: E402

CHUNK_BYTES = 1 << 20
CHUNK_LINES = 2048
# Problems shown one by one before only counting them.
MAX_REPORTED = 20


@dataclass
class ChunkResult:
    """What a worker returns for one chunk of lines."""

    tokens: dict[str, np.ndarray]
    lengths: dict[str, np.ndarray]
    problems: list[tuple[int, str]] = field(default_factory=list)
    blank_lines: int = 0
    num_bytes: int = 0


class ChunkEncoder:
    """Parses and encodes chunks of raw jsonl lines (one instance per worker process)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.keys = args.json_keys
        self.append_eod = args.append_eod
        self.tokenizer = _tokenizer_from_args(args)
        self.eod = self.tokenizer.eod if args.append_eod else -1
        self.dtype = token_dtype_for_vocab(self.tokenizer.vocab_size)

    def __call__(self, chunk: tuple[int, list[bytes]]) -> ChunkResult:
        first_line, lines = chunk
        texts: dict[str, list[str]] = {key: [] for key in self.keys}
        problems: list[tuple[int, str]] = []
        blank = 0
        num_bytes = 0
        for number, line in enumerate(lines, start=first_line):
            num_bytes += len(line)
            if not line.strip():
                blank += 1
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                problems.append((number, f"malformed JSON: {error}"))
                continue
            if not isinstance(record, dict):
                problems.append((number, f"a JSON {type(record).__name__}, not an object"))
                continue
            missing = [key for key in self.keys if not isinstance(record.get(key), str)]
            if missing:
                problems.append((number, f"no string field {missing[0]!r}"))
                continue
            for key in self.keys:
                texts[key].append(record[key])
        result = ChunkResult({}, {}, problems, blank, num_bytes)
        for key in self.keys:
            encoded = self.tokenizer.encode_batch(texts[key]) if texts[key] else []
            if self.append_eod:
                for ids in encoded:
                    ids.append(self.eod)
            lengths = np.fromiter((len(ids) for ids in encoded), dtype=np.int64, count=len(encoded))
            result.lengths[key] = lengths
            result.tokens[key] = np.fromiter(chain.from_iterable(encoded), dtype=self.dtype, count=int(lengths.sum()))
        return result


_WORKER_ENCODER: ChunkEncoder | None = None


def _worker_init(args: argparse.Namespace) -> None:
    global _WORKER_ENCODER
    _WORKER_ENCODER = ChunkEncoder(args)


def _worker_encode(chunk: tuple[int, list[bytes]]) -> ChunkResult:
    return _WORKER_ENCODER(chunk)


def _tokenizer_from_args(args: argparse.Namespace) -> Tokenizer:
    return build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_file, args.merge_file,
                           engine=args.tokenizer_engine, num_threads=1)


def read_chunks(path: str) -> Iterator[tuple[int, list[bytes]]]:
    """(first line number, raw lines) in chunks of about CHUNK_BYTES; gzip when the name ends in .gz."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as handle:
        lines: list[bytes] = []
        size = 0
        first = 1
        for number, line in enumerate(handle, start=1):
            lines.append(line)
            size += len(line)
            if size >= CHUNK_BYTES or len(lines) >= CHUNK_LINES:
                yield first, lines
                lines, size, first = [], 0, number + 1
        if lines:
            yield first, lines


def output_prefix_for(output_prefix: str, key: str) -> str:
    """Megatron's naming: `{prefix}_{key}_document`."""
    return f"{output_prefix}_{key}_document"


class Progress:
    """Prints documents/s, tokens/s and MB/s every `interval` documents, and the closing summary."""

    def __init__(self, interval: int) -> None:
        self.interval = interval
        self.start = time.perf_counter()
        self.documents = self.tokens = self.bytes = 0
        self.next_report = interval

    def update(self, documents: int, tokens: int, num_bytes: int) -> None:
        self.documents += documents
        self.tokens += tokens
        self.bytes += num_bytes
        if self.interval > 0 and self.documents >= self.next_report:
            self.next_report = (self.documents // self.interval + 1) * self.interval
            print(f"processed {self.documents} documents | {self.rates()}", file=sys.stderr, flush=True)

    def rates(self) -> str:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return (f"{self.documents / elapsed:,.0f} docs/s | {self.tokens / elapsed:,.0f} tokens/s | "
                f"{self.bytes / elapsed / 1e6:.1f} MB/s | {elapsed:.1f} s")


def preprocess(args: argparse.Namespace) -> dict:
    """Runs the whole conversion; returns the summary (documents, tokens, skipped lines, seconds)."""
    if args.partitions > 1:
        print("note: --partitions is not needed here (the input is streamed in chunks); ignoring it", file=sys.stderr)
    if args.workers > 1:
        # Worker processes are the parallelism; HuggingFace's own thread pool would oversubscribe the cores.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tokenizer = _tokenizer_from_args(args)
    if args.append_eod:
        tokenizer.eod  # noqa: B018 - raises now, with the file name, if the tokenizer has no end-of-document token
    dtype = token_dtype_for_vocab(tokenizer.vocab_size)
    print(f"tokenizer {args.tokenizer_type} ({tokenizer.engine}), vocab {tokenizer.vocab_size}, token dtype {dtype}, "
          f"{args.workers} workers", file=sys.stderr)
    writers = {key: IndexedDatasetWriter(output_prefix_for(args.output_prefix, key), dtype) for key in args.json_keys}
    progress = Progress(args.log_interval)
    problems_total = blank_total = 0
    pool = None
    try:
        if args.workers > 1:
            pool = multiprocessing.get_context("fork").Pool(args.workers, initializer=_worker_init, initargs=(args,))
            results = pool.imap(_worker_encode, read_chunks(args.input))
        else:
            encoder = ChunkEncoder(args)
            results = map(encoder, read_chunks(args.input))
        for result in results:
            for number, problem in result.problems:
                problems_total += 1
                if args.strict:
                    raise SystemExit(f"{args.input}:{number}: {problem} (--strict)")
                if problems_total <= MAX_REPORTED:
                    print(f"skipped {args.input}:{number}: {problem}", file=sys.stderr)
                elif problems_total == MAX_REPORTED + 1:
                    print("further skipped lines are counted in the summary", file=sys.stderr)
            blank_total += result.blank_lines
            for key in args.json_keys:
                writers[key].add_documents(result.tokens[key], result.lengths[key])
            first_key = args.json_keys[0]
            progress.update(int(result.lengths[first_key].size), sum(int(t.size) for t in result.tokens.values()),
                            result.num_bytes)
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    finally:
        if pool is not None:
            pool.terminate()
    for writer in writers.values():
        writer.finalize()
    elapsed = time.perf_counter() - progress.start
    summary = {"documents": progress.documents, "tokens": progress.tokens, "skipped_lines": problems_total,
               "blank_lines": blank_total, "seconds": elapsed, "bytes": progress.bytes}
    print(f"done: {progress.documents} documents, {progress.tokens} tokens, {problems_total} lines skipped "
          f"(malformed or missing a key), {blank_total} blank lines | {progress.rates()}", file=sys.stderr)
    for key in args.json_keys:
        print(f"wrote {output_prefix_for(args.output_prefix, key)}.bin/.idx", file=sys.stderr)
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("input")
    group.add_argument("--input", required=True, help="jsonl file, one JSON object per line (.gz allowed)")
    group.add_argument("--json-keys", nargs="+", default=["text"], help="fields to tokenize, one dataset each")
    group.add_argument("--strict", action="store_true", help="stop at the first malformed line or missing key")
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    group.add_argument("--tokenizer-model", default=None, help=".model, tokenizer.json (or its dir), or GPT-2 dir")
    group.add_argument("--vocab-file", default=None, help="GPT2BPETokenizer vocab.json")
    group.add_argument("--merge-file", default=None, help="GPT2BPETokenizer merges.txt")
    group.add_argument("--tokenizer-engine", choices=ENGINES, default="auto",
                       help="byte-level BPE engine: auto picks tiktoken when it is exact")
    group.add_argument("--append-eod", action="store_true", help="append the end-of-document token to each document")
    group = parser.add_argument_group("output")
    group.add_argument("--output-prefix", required=True, help="writes {prefix}_{key}_document.bin/.idx")
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1, help="worker processes")
    group.add_argument("--partitions", type=int, default=1, help="accepted for Megatron compatibility; not needed")
    group.add_argument("--log-interval", type=int, default=1000, help="report progress every N documents")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.workers < 1:
        raise SystemExit("--workers must be at least 1")
    if not os.path.isfile(args.input):
        raise SystemExit(f"{args.input}: no such input file")
    return preprocess(args)


if __name__ == "__main__":
    main()
