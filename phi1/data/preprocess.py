"""Tokenizes a jsonl corpus into Megatron indexed datasets: `{output_prefix}_{key}_document.bin/.idx/.json`.

    python tools/preprocess_data.py --input data/stdlib.jsonl --output-prefix data/stdlib \\
        --tokenizer-model data/tok/tokenizer.model --append-eod --workers 2

Flags follow Megatron-LM's tools/preprocess_data.py where they apply; `--tokenizer-type` is inferred from the
tokenizer file when not given (phi1.data.tokenizers.detect_tokenizer_type). Beside each `.bin`/`.idx` a sidecar
`.json` records the tokenizer (type, file hashes, vocabulary size, eod id) and the command, and training refuses
data made with another tokenizer (phi1.data.sidecar); the `.bin`/`.idx` format is Megatron's, unchanged.

Speed comes from doing all per-document work in the workers, in batches: the main process reads raw lines in
~1 MiB chunks and writes the token arrays that come back; each worker parses the JSON, encodes the whole chunk
with one native batch call and returns one numpy array per key (cheap to pickle). Chunks come back in input
order, so the output is byte-identical for any worker count, and at most a few chunks per worker are in flight,
so memory does not grow with the input.

Bad lines never stop the run and are never dropped silently: each is reported as file:line with the reason,
and counted by reason in the summary (`--strict` stops at the first):
blank lines; lines that are not UTF-8, not JSON, not a JSON object, or lack a string field; documents longer
than `--max-document-chars` (lines longer than 12 bytes per allowed character are skipped before parsing, so
one huge line costs no memory); text the tokenizer cannot encode (lone surrogates from `\\ud800` escapes).
A truncated or corrupt `.gz` stops the run naming the file and the last complete line; an input that yields
no document stops it with exit status 2 and writes nothing.
"""

from __future__ import annotations

import argparse
import gzip
import json
import multiprocessing
import os
import stat
import sys
import time
import zlib
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import chain

import numpy as np

from phi1.cli import UserError
from phi1.data.indexed_dataset import IndexedDatasetWriter, token_dtype_for_vocab
from phi1.data.sidecar import write_sidecar
from phi1.data.tokenizers import ENGINES, TOKENIZER_TYPES, Tokenizer, build_tokenizer, detect_tokenizer_type

CHUNK_BYTES = 1 << 20
CHUNK_LINES = 2048
# Problems shown one by one before only counting them.
MAX_REPORTED = 20
# The Stack drops files over 1 MB; a longer "document" is generated or minified data. With it a worker holds at
# most ~1 MiB of lines plus one 12 MiB line, its parsed text (<= 4 MiB) and ids (~40 MiB as Python ints).
DEFAULT_MAX_DOCUMENT_CHARS = 1_000_000
# Chunks submitted to the pool and not yet written, per worker: enough to keep workers busy, bounded memory.
CHUNKS_IN_FLIGHT_PER_WORKER = 4
# Lines longer than this per allowed character cannot hold a short enough document (a JSON-escaped astral
# character is 12 bytes, "\\ud83e\\udd16"); they are skipped unread.
BYTES_PER_CHAR_LIMIT = 12
_OVERSIZE = "longer than --max-document-chars"


@dataclass
class ChunkResult:
    """What a worker returns for one chunk of lines."""

    tokens: dict[str, np.ndarray]
    lengths: dict[str, np.ndarray]
    problems: list[tuple[int, str, str]] = field(default_factory=list)
    """(line number, reason kind, message) of each skipped line."""
    blank_lines: int = 0
    num_bytes: int = 0


@dataclass
class Chunk:
    """Raw lines read by the main process; `oversized` lines were too long to read and are only numbered."""

    first_line: int
    lines: list[bytes]
    oversized: dict[int, int] = field(default_factory=dict)
    """line number -> its length in bytes, for lines skipped unread."""


def _json_type(value: object) -> str:
    """The JSON name of a parsed value's type (for messages)."""
    names = {type(None): "null", bool: "boolean", int: "number", float: "number", str: "string", list: "array",
             dict: "object"}
    return names.get(type(value), type(value).__name__)


def _unencodable(text: str) -> str | None:
    """Why `text` cannot be stored as UTF-8 (a lone surrogate), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        code = ord(text[error.start])
        return f"unencodable character U+{code:04X} at character {error.start} (a lone surrogate)"
    return None


class ChunkEncoder:
    """Parses and encodes chunks of raw jsonl lines (one instance per worker process)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.keys = args.json_keys
        self.append_eod = args.append_eod
        self.max_chars = args.max_document_chars
        self.tokenizer = _tokenizer_from_args(args)
        self.eod = self.tokenizer.eod if args.append_eod else -1
        self.dtype = token_dtype_for_vocab(self.tokenizer.vocab_size)

    def _parse(self, line: bytes) -> tuple[str, str] | list[str]:
        """The texts of one line, or (reason kind, message) when it is skipped."""
        try:
            decoded = line.decode("utf-8")
        except UnicodeDecodeError as error:
            return "not_utf8", f"not UTF-8: byte 0x{line[error.start]:02x} at byte {error.start + 1} of the line"
        try:
            record = json.loads(decoded)
        except json.JSONDecodeError as error:
            return "malformed", f"malformed JSON: {error}"
        except RecursionError:
            return "malformed", "malformed JSON: nested too deeply"
        if not isinstance(record, dict):
            return "not_object", f"a JSON {_json_type(record)}, not an object"
        texts = []
        for key in self.keys:
            value = record.get(key)
            if value is None and key not in record:
                present = ", ".join(repr(k) for k in list(record)[:5]) or "none"
                return "missing_key", f"no string field {key!r} (the line has {present}; choose with --json-keys)"
            if not isinstance(value, str):
                return "missing_key", f"no string field {key!r}: it holds a JSON {_json_type(value)}"
            if len(value) > self.max_chars:
                return "too_long", (f"field {key!r} has {len(value)} characters, {_OVERSIZE} "
                                    f"({self.max_chars}); raise the limit to keep it")
            problem = _unencodable(value)
            if problem is not None:
                return "unencodable", f"field {key!r}: {problem}"
            texts.append(value)
        return texts

    def _encode(self, texts: list[str], numbers: list[int], problems: list[tuple[int, str, str]]) -> list[list[int]] | None:
        """Ids of each text; a text the tokenizer refuses is reported and its position gets None."""
        try:
            return self.tokenizer.encode_batch(texts)
        except Exception:  # noqa: BLE001 - tokenizer libraries raise many types; the culprit is found below
            pass
        encoded: list = []
        for text, number in zip(texts, numbers):
            try:
                encoded.append(self.tokenizer.encode(text))
            except Exception as error:  # noqa: BLE001 - reported per line, as any other bad line
                problems.append((number, "unencodable", f"the tokenizer cannot encode it ({type(error).__name__}: "
                                 f"{str(error)[:200]})"))
                encoded.append(None)
        return encoded

    def __call__(self, chunk: Chunk) -> ChunkResult:
        texts: dict[str, list[str]] = {key: [] for key in self.keys}
        numbers: list[int] = []
        problems: list[tuple[int, str, str]] = []
        blank = 0
        num_bytes = sum(chunk.oversized.values())
        for number, length in chunk.oversized.items():
            problems.append((number, "too_long", f"a line of {length} bytes, {_OVERSIZE} "
                             f"({self.max_chars} characters); skipped unread"))
        for number, line in enumerate(chunk.lines, start=chunk.first_line):
            if number in chunk.oversized:
                continue
            num_bytes += len(line)
            if not line.strip():
                blank += 1
                continue
            if number == 1 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]  # a UTF-8 byte-order mark, as some editors write, is not part of the JSON
            parsed = self._parse(line)
            if isinstance(parsed, tuple):
                problems.append((number, *parsed))
                continue
            numbers.append(number)
            for key, text in zip(self.keys, parsed):
                texts[key].append(text)
        encoded = {key: self._encode(texts[key], numbers, problems) if numbers else [] for key in self.keys}
        # A line whose any field failed to encode is dropped from every key's dataset, keeping them aligned.
        failed = {i for ids in encoded.values() for i, one in enumerate(ids) if one is None}
        problems.sort()
        result = ChunkResult({}, {}, problems, blank, num_bytes)
        for key in self.keys:
            kept = [ids for i, ids in enumerate(encoded[key]) if i not in failed]
            if self.append_eod:
                for ids in kept:
                    ids.append(self.eod)
            lengths = np.fromiter((len(ids) for ids in kept), dtype=np.int64, count=len(kept))
            result.lengths[key] = lengths
            result.tokens[key] = np.fromiter(chain.from_iterable(kept), dtype=self.dtype, count=int(lengths.sum()))
        return result


_WORKER_ENCODER: ChunkEncoder | None = None


def _worker_init(args: argparse.Namespace) -> None:
    global _WORKER_ENCODER
    _WORKER_ENCODER = ChunkEncoder(args)


def _worker_encode(chunk: Chunk) -> ChunkResult:
    return _WORKER_ENCODER(chunk)


def _tokenizer_from_args(args: argparse.Namespace) -> Tokenizer:
    return build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_file, args.merge_file,
                           engine=args.tokenizer_engine, num_threads=1)


def read_chunks(path: str, max_line_bytes: int | None = None) -> Iterator[Chunk]:
    """Chunks of about CHUNK_BYTES raw lines; gzip when the name ends in .gz.

    Lines longer than `max_line_bytes` are read past in bounded pieces and numbered in `Chunk.oversized`.

    Raises:
        ValueError: a truncated or corrupt gzip stream, naming the file and the last complete line.
    """
    opener = gzip.open if path.endswith(".gz") else open
    number = 0
    try:
        with opener(path, "rb") as handle:
            chunk = Chunk(1, [])
            size = 0
            while True:
                line = handle.readline(max_line_bytes + 1) if max_line_bytes else handle.readline()
                if not line:
                    break
                number += 1
                if max_line_bytes and len(line) > max_line_bytes:
                    length = len(line)
                    while not line.endswith(b"\n"):
                        line = handle.readline(1 << 20)
                        if not line:
                            break
                        length += len(line)
                    chunk.oversized[number] = length
                    chunk.lines.append(b"")
                else:
                    chunk.lines.append(line)
                    size += len(line)
                if size >= CHUNK_BYTES or len(chunk.lines) >= CHUNK_LINES:
                    yield chunk
                    chunk, size = Chunk(number + 1, []), 0
            if chunk.lines:
                yield chunk
    except gzip.BadGzipFile as error:
        raise UserError(f"{path}: not gzip data ({error}), yet the name ends in .gz; rename or re-compress it; "
                        "nothing was written") from None
    except (EOFError, zlib.error) as error:
        raise UserError(f"{path}: truncated or corrupt gzip data after line {number} (the last complete line): "
                        f"{error}; nothing was written. Re-download or re-compress the file") from None


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


REASONS = {
    "malformed": "malformed JSON",
    "not_object": "not a JSON object",
    "missing_key": "missing or non-string key",
    "not_utf8": "not UTF-8",
    "too_long": "longer than --max-document-chars",
    "unencodable": "unencodable text",
}


def _describe_reasons(counts: Counter) -> str:
    return ", ".join(f"{counts[kind]} {REASONS[kind]}" for kind in REASONS if counts[kind]) or "none"


def _ordered_results(args: argparse.Namespace, chunks: Iterator[Chunk]) -> Iterator[ChunkResult]:
    """Encoded chunks in input order, with at most CHUNKS_IN_FLIGHT_PER_WORKER per worker pending."""
    if args.workers == 1:
        encoder = ChunkEncoder(args)
        yield from map(encoder, chunks)
        return
    # Worker processes are the parallelism; HuggingFace's own thread pool would oversubscribe the cores.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    pool = multiprocessing.get_context("fork").Pool(args.workers, initializer=_worker_init, initargs=(args,))
    pending: deque = deque()
    try:
        # Pool.imap would read the whole input ahead into memory; apply_async with a bounded queue does not.
        for chunk in chunks:
            pending.append(pool.apply_async(_worker_encode, (chunk,)))
            if len(pending) >= CHUNKS_IN_FLIGHT_PER_WORKER * args.workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
    finally:
        pool.terminate()
        pool.join()


def preprocess(args: argparse.Namespace, command: list[str] | None = None) -> dict:
    """Runs the whole conversion; returns the summary (documents, tokens, skipped lines by reason, seconds).

    Raises:
        UserError: a truncated gzip, a bad line under --strict, or no document at all (nothing is written then).
    """
    if args.partitions > 1:
        print("note: --partitions is not needed here (the input is streamed in chunks); ignoring it", file=sys.stderr)
    tokenizer = _tokenizer_from_args(args)
    if args.append_eod:
        tokenizer.eod  # noqa: B018 - raises now, with the file name, if the tokenizer has no end-of-document token
    dtype = token_dtype_for_vocab(tokenizer.vocab_size)
    print(f"tokenizer {args.tokenizer_type} ({tokenizer.engine}), vocab {tokenizer.vocab_size}, token dtype {dtype}, "
          f"{args.workers} workers", file=sys.stderr)
    max_line_bytes = BYTES_PER_CHAR_LIMIT * args.max_document_chars * len(args.json_keys) + (1 << 16)
    try:
        writers = {key: IndexedDatasetWriter(output_prefix_for(args.output_prefix, key), dtype) for key in args.json_keys}
    except OSError as error:
        raise UserError(f"--output-prefix {args.output_prefix}: cannot write there ({error})") from None
    progress = Progress(args.log_interval)
    reasons: Counter = Counter()
    blank_total = 0
    tokens_by_key = dict.fromkeys(args.json_keys, 0)
    try:
        for result in _ordered_results(args, read_chunks(args.input, max_line_bytes)):
            for number, kind, problem in result.problems:
                reasons[kind] += 1
                if args.strict:
                    raise UserError(f"{args.input}:{number}: {problem} (--strict); nothing was written")
                skipped = sum(reasons.values())
                if skipped <= MAX_REPORTED:
                    print(f"skipped {args.input}:{number}: {problem}", file=sys.stderr)
                elif skipped == MAX_REPORTED + 1:
                    print("further skipped lines are counted in the summary", file=sys.stderr)
            blank_total += result.blank_lines
            for key in args.json_keys:
                writers[key].add_documents(result.tokens[key], result.lengths[key])
                tokens_by_key[key] += int(result.tokens[key].size)
            first_key = args.json_keys[0]
            progress.update(int(result.lengths[first_key].size), sum(int(t.size) for t in result.tokens.values()),
                            result.num_bytes)
        if progress.documents == 0:
            raise UserError(
                f"{args.input}: no documents ({sum(reasons.values())} lines skipped: {_describe_reasons(reasons)}; "
                f"{blank_total} blank lines); nothing was written")
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    elapsed = time.perf_counter() - progress.start
    problems_total = sum(reasons.values())
    summary = {"documents": progress.documents, "tokens": progress.tokens, "skipped_lines": problems_total,
               "skipped_by_reason": dict(reasons), "blank_lines": blank_total, "seconds": elapsed,
               "bytes": progress.bytes}
    for key in args.json_keys:
        writers[key].finalize()
        prefix = output_prefix_for(args.output_prefix, key)
        write_sidecar(prefix, tokenizer, command=command or [sys.argv[0], *sys.argv[1:]],
                      append_eod=args.append_eod, json_key=key, documents=progress.documents,
                      tokens=tokens_by_key[key])
    print(f"done: {progress.documents} documents, {progress.tokens} tokens, {problems_total} lines skipped "
          f"({_describe_reasons(reasons)}), {blank_total} blank lines | {progress.rates()}", file=sys.stderr)
    for key in args.json_keys:
        print(f"wrote {output_prefix_for(args.output_prefix, key)}.bin/.idx/.json", file=sys.stderr)
    return summary


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="preprocess_data.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("input")
    group.add_argument("--input", required=True, help="jsonl file, one JSON object per line (.gz allowed)")
    group.add_argument("--json-keys", nargs="+", default=["text"], help="fields to tokenize, one dataset each")
    group.add_argument("--strict", action="store_true", help="stop at the first bad line (nothing is written)")
    group.add_argument("--max-document-chars", type=_positive_int, default=DEFAULT_MAX_DOCUMENT_CHARS,
                       help="skip (and report) documents longer than this many characters; bounds worker memory "
                            "(default %(default)s: a few hundred MB per worker at most)")
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", default=None, choices=TOKENIZER_TYPES,
                       help="default: inferred from --tokenizer-model (or GPT2BPETokenizer with --vocab-file)")
    group.add_argument("--tokenizer-model", default=None, help=".model, tokenizer.json (or its dir), or GPT-2 dir")
    group.add_argument("--vocab-file", default=None, help="GPT2BPETokenizer vocab.json")
    group.add_argument("--merge-file", default=None, help="GPT2BPETokenizer merges.txt")
    group.add_argument("--tokenizer-engine", choices=ENGINES, default="auto",
                       help="byte-level BPE engine: auto picks tiktoken when it is exact")
    group.add_argument("--append-eod", action="store_true", help="append the end-of-document token to each document")
    group = parser.add_argument_group("output")
    group.add_argument("--output-prefix", required=True, help="writes {prefix}_{key}_document.bin/.idx/.json")
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=_positive_int, default=1, help="worker processes")
    group.add_argument("--partitions", type=int, default=1, help="accepted for Megatron compatibility; not needed")
    group.add_argument("--log-interval", type=int, default=1000, help="report progress every N documents (0: never)")
    return parser


def _check_input(path: str) -> None:
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise UserError(f"--input {path}: no such file") from None
    except OSError as error:
        raise UserError(f"--input {path}: cannot be read ({error.strerror})") from None
    if not stat.S_ISREG(mode):
        kind = ("a directory" if stat.S_ISDIR(mode) else "a named pipe (FIFO)" if stat.S_ISFIFO(mode)
                else "a device file" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")
        raise UserError(f"--input {path}: {kind}; give a .jsonl or .jsonl.gz file")


def resolve_tokenizer_type(args: argparse.Namespace) -> str:
    """--tokenizer-type, or the type detected from --tokenizer-model (GPT2BPETokenizer for --vocab-file)."""
    if args.tokenizer_type is not None:
        return args.tokenizer_type
    if args.tokenizer_model is not None:
        return detect_tokenizer_type(args.tokenizer_model)
    if args.vocab_file is not None or args.merge_file is not None:
        return "GPT2BPETokenizer"
    raise UserError("--tokenizer-model: required (a SentencePiece .model, a tokenizer.json or its directory, or a "
                    "directory with vocab.json and merges.txt)")


def main(argv: list[str] | None = None) -> dict:
    arguments = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(arguments)
    max_workers = 4 * (os.cpu_count() or 1)
    if args.workers > max_workers:
        raise UserError(f"--workers {args.workers}: more than 4 per CPU core ({max_workers}); use at most the "
                        "number of cores")
    _check_input(args.input)
    for key in args.json_keys:
        # The key becomes part of the output file names: it must not lead out of the output directory.
        if not key or key in (".", "..") or any(char in key for char in "/\\\x00") or len(key) > 100:
            raise UserError(f"--json-keys {key!r}: a key names the output files ({{prefix}}_{{key}}_document.bin); "
                            "use a plain field name without '/', '\\' or NUL, at most 100 characters")
    if len(set(args.json_keys)) != len(args.json_keys):
        raise UserError(f"--json-keys {' '.join(args.json_keys)}: a key is given twice")
    args.tokenizer_type = resolve_tokenizer_type(args)
    return preprocess(args, command=["tools/preprocess_data.py", *arguments])

