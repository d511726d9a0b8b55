"""Splitting large jsonl shards into line-aligned byte ranges and running a worker over them in processes.

Workers write their output for a range into a part file; the caller concatenates the parts in order, so the
output keeps the input's order whatever the number of workers.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass


@dataclass(frozen=True)
class Chunk:
    """A line-aligned byte range of one file."""

    path: str
    start: int
    end: int
    """Exclusive; the range ends just after a newline (or at the end of the file)."""
    first_line: int
    """1-based line number of the range's first line, so reports name real lines."""
    index: int
    """Position among all chunks (order of the output)."""


def plan_chunks(paths: list[str], chunk_bytes: int = 16 << 20) -> list[Chunk]:
    """Line-aligned ranges of about `chunk_bytes` covering every file; a .gz file is one chunk (no seeking).

    Raises FileNotFoundError naming a missing file.
    """
    chunks: list[Chunk] = []
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such file")
        size = os.path.getsize(path)
        if path.endswith(".gz"):
            chunks.append(Chunk(path, 0, size, 1, len(chunks)))
            continue
        with open(path, "rb") as handle:
            start, line = 0, 1
            while start < size:
                handle.seek(min(start + chunk_bytes, size))
                if handle.tell() < size:
                    handle.readline()  # move to the end of the line the cut fell in
                end = handle.tell()
                chunks.append(Chunk(path, start, end, line, len(chunks)))
                # Counting newlines costs one read of the file; it makes every bad line reportable by number.
                handle.seek(start)
                remaining = end - start
                while remaining > 0:
                    block = handle.read(min(remaining, 8 << 20))
                    line += block.count(b"\n")
                    remaining -= len(block)
                start = end
    return chunks


def read_chunk(chunk: Chunk) -> Iterator[tuple[int, bytes]]:
    """(line number, raw line) of every line in the chunk."""
    if chunk.path.endswith(".gz"):
        import gzip

        with gzip.open(chunk.path, "rb") as handle:
            yield from enumerate(handle, 1)
        return
    with open(chunk.path, "rb") as handle:
        handle.seek(chunk.start)
        line_number = chunk.first_line
        position = chunk.start
        while position < chunk.end:
            raw = handle.readline()
            if not raw:
                break
            position += len(raw)
            yield line_number, raw
            line_number += 1


def run_chunks(chunks: list[Chunk], worker: Callable[[Chunk], dict], workers: int = 1,
               description: str = "processing", progress: bool = True) -> list[dict]:
    """`worker(chunk)` for every chunk, `workers` processes at a time, with a progress bar in bytes.

    `worker` must be a module-level function (workers are spawned, not forked: torch and threads do not
    survive a fork well). Results come back in chunk order.
    """
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(c.end - c.start for c in chunks), desc=description, unit="B", unit_scale=True,
                   file=sys.stderr)
    results: list[dict | None] = [None] * len(chunks)
    if workers == 1 or len(chunks) == 1:
        for chunk in chunks:
            results[chunk.index] = worker(chunk)
            if bar is not None:
                bar.update(chunk.end - chunk.start)
    else:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            futures = {pool.submit(worker, chunk): chunk for chunk in chunks}
            for future in as_completed(futures):
                chunk = futures[future]
                results[chunk.index] = future.result()
                if bar is not None:
                    bar.update(chunk.end - chunk.start)
    if bar is not None:
        bar.close()
    return results  # type: ignore[return-value]


def concatenate(parts: list[str], output: str) -> None:
    """Append the part files in order into `output` (created or replaced) and delete them."""
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    temporary = output + ".partial"
    with open(temporary, "wb") as sink:
        for part in parts:
            with open(part, "rb") as source:
                while block := source.read(8 << 20):
                    sink.write(block)
            os.remove(part)
    os.replace(temporary, output)


def default_chunk_bytes(paths: list[str], workers: int) -> int:
    """About 8 chunks per worker (a live progress bar, balanced load), between 1 MiB and 64 MiB each."""
    total = sum(os.path.getsize(p) for p in paths if os.path.isfile(p))
    return int(min(64 << 20, max(1 << 20, total // max(1, 8 * workers))))
