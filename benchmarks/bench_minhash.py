"""Near-dedup throughput: datatrove's MinHash pipeline (what phi1 uses, `phi1.quality.minhash`) against a
straightforward numpy implementation of the same four stages, on the same generated corpus, in one run.

    python benchmarks/bench_minhash.py --documents 100000 --shards 4 --workers 2 [--json out.json]

Both use the same shingles (datatrove's normalisation, whitespace words, 5-grams, xxhash64), the same 14 x 8
bands and the same hash parameters, so they find the same candidate pairs; the benchmark checks that they
remove the same number of documents. The numpy version keeps every signature in memory (bands x rows x 8 bytes
per document: 0.9 GB per million documents) and runs on one machine only; datatrove's writes sorted signature
files per band and runs each stage as local, SLURM or Ray tasks. It also prints the agreement with exact
Jaccard clustering on a sample (--sample documents) at --threshold.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from multiprocessing import get_context

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from phi1.quality.minhash import (  # noqa: E402
    MinhashSettings,
    duplicate_agreement,
    exact_duplicate_clusters,
    mutated_corpus,
    removed_ids,
    run_dedup,
    write_shards,
)

MERSENNE = np.uint64((1 << 61) - 1)


def _signatures(args: tuple[str, MinhashSettings]) -> np.ndarray:
    """(documents, bands * rows) uint64 MinHash signatures of one shard (documents without shingles: max)."""
    from datatrove.pipeline.dedup.minhash import MinhashDedupSignature

    from phi1.quality.minhash import CodeWordTokenizer

    path, settings = args
    step = MinhashDedupSignature(os.devnull, config=settings.datatrove_config(), language=CodeWordTokenizer())
    a, b = step.parameters
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            shingles = step.get_shingles(json.loads(line)["text"])
            if shingles.size == 0:
                rows.append(np.full(a.shape[1], np.iinfo(np.uint64).max, dtype=np.uint64))
            else:
                rows.append(np.min((shingles * a + b) % MERSENNE, axis=0))
    return np.stack(rows)


def numpy_dedup(paths: list[str], output_dir: str, settings: MinhashSettings, workers: int) -> int:
    """Signature (a process per shard) -> buckets (per band: sort, equal runs) -> cluster (union-find) ->
    filter. Returns the number of documents removed."""
    with get_context("spawn").Pool(workers) as pool:
        per_shard = pool.map(_signatures, [(p, settings) for p in paths])
    signatures = np.concatenate(per_shard)
    owners = np.concatenate([np.stack([np.full(len(s), i), np.arange(len(s))], 1) for i, s in enumerate(per_shard)])
    parent = np.arange(len(signatures))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for band in range(settings.bands):
        block = np.ascontiguousarray(signatures[:, band * settings.rows:(band + 1) * settings.rows])
        keys = block.view(np.dtype((np.void, block.dtype.itemsize * settings.rows))).ravel()
        order = np.argsort(keys, kind="stable")
        same = keys[order[1:]] == keys[order[:-1]]
        for left, right in zip(order[:-1][same], order[1:][same]):
            root_a, root_b = find(int(left)), find(int(right))
            if root_a != root_b:
                parent[max(root_a, root_b)] = min(root_a, root_b)  # the earliest document is kept
    roots = np.array([find(i) for i in range(len(parent))])
    removed = roots != np.arange(len(roots))
    os.makedirs(output_dir, exist_ok=True)
    start = 0
    for shard, path in enumerate(paths):
        count = len(per_shard[shard])
        drop = removed[start:start + count]
        with open(path, encoding="utf-8") as source, \
                open(os.path.join(output_dir, os.path.basename(path)), "w", encoding="utf-8") as sink:
            for index, line in enumerate(source):
                if not drop[index]:
                    sink.write(line)
        start += count
    assert len(owners) == len(removed)
    return int(removed.sum())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=100_000)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--sample", type=int, default=2000, help="documents for the exact-Jaccard agreement")
    parser.add_argument("--threshold", type=float, default=0.8)
    parser.add_argument("--bands", type=int, default=14)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--work-dir", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    settings = MinhashSettings(bands=args.bands, rows=args.rows)
    work = args.work_dir or tempfile.mkdtemp(prefix="bench-minhash-")
    result: dict = {"documents": args.documents, "shards": args.shards, "workers": args.workers,
                    "bands": args.bands, "rows": args.rows, "cpus": os.cpu_count()}
    start = time.perf_counter()
    texts = mutated_corpus(args.documents, seed=0)
    paths = write_shards(texts, os.path.join(work, "corpus"), args.shards)
    result["corpus_mb"] = round(sum(os.path.getsize(p) for p in paths) / 2**20, 1)
    result["generate_s"] = round(time.perf_counter() - start, 1)

    start = time.perf_counter()
    counts = run_dedup(os.path.join(work, "corpus"), os.path.join(work, "datatrove-out"),
                       os.path.join(work, "datatrove-work"), settings, tasks=args.shards, workers=args.workers)
    result["datatrove_s"] = round(time.perf_counter() - start, 1)
    result["datatrove_removed"] = counts["removed"]

    start = time.perf_counter()
    result["numpy_removed"] = numpy_dedup(paths, os.path.join(work, "numpy-out"), settings, args.workers)
    result["numpy_s"] = round(time.perf_counter() - start, 1)
    for name in ("datatrove", "numpy"):
        result[f"{name}_docs_per_s"] = round(args.documents / result[f"{name}_s"])

    sample = texts[: args.sample]
    sample_paths = write_shards(sample, os.path.join(work, "sample"), 2)
    run_dedup(os.path.join(work, "sample"), os.path.join(work, "sample-out"), os.path.join(work, "sample-work"),
              settings, workers=args.workers)
    removed = {int(i.split("-")[1]) for i in removed_ids(sample_paths, os.path.join(work, "sample-out"))}
    clusters = exact_duplicate_clusters(sample, args.threshold, settings)
    result["agreement"] = {"threshold": args.threshold, "sample": len(sample),
                           **duplicate_agreement(removed, clusters)}
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    return result


if __name__ == "__main__":
    main()
