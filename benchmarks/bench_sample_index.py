"""Time to build the GPT sample index for ~1B tokens: ours (phi1.data._helpers) vs megatron-core's helpers_cpp.

    python benchmarks/bench_sample_index.py [--tokens 1e9] [--seq-len 2048] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np

from phi1.data.helpers import build_sample_index, samples_in_stream


def best_time(function, repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=float, default=1e9)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    # code-file-like sizes: log-normal around ~1,000 tokens
    sizes = np.clip(rng.lognormal(6.5, 1.2, size=int(args.tokens / 1000 * 1.3)), 1, 2**31 - 1).astype(np.int32)
    cut = int(np.searchsorted(np.cumsum(sizes, dtype=np.int64), int(args.tokens))) + 1
    sizes = sizes[:cut]
    tokens = int(sizes.sum(dtype=np.int64))
    document_index = rng.permutation(sizes.size).astype(np.int64)
    num_samples = samples_in_stream(tokens, args.seq_len)
    print(f"{sizes.size:,} documents, {tokens:,} tokens, seq_len {args.seq_len}, {num_samples:,} samples")

    ours_seconds, ours = best_time(lambda: build_sample_index(sizes, document_index, args.seq_len, num_samples),
                                   args.repeats)
    print(f"phi1 build_sample_index:               {ours_seconds * 1e3:8.2f} ms (best of {args.repeats})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from megatron.core.datasets import helpers_cpp
    except Exception as error:  # noqa: BLE001
        print(f"megatron-core not importable ({error}); skipping the comparison")
        return
    document_index_int32 = document_index.astype(np.int32)  # Megatron takes int32 document indices
    for name in ("build_sample_idx_int32", "build_sample_idx_int64"):
        builder = getattr(helpers_cpp, name)
        seconds, theirs = best_time(
            lambda builder=builder: builder(sizes, document_index_int32, args.seq_len, 1, tokens, True, 1), args.repeats
        )
        same = np.array_equal(np.asarray(theirs, dtype=np.int64), ours)
        print(f"megatron-core helpers_cpp.{name}: {seconds * 1e3:8.2f} ms | ours / theirs = {ours_seconds / seconds:.2f}"
              f" | identical result: {same}")


if __name__ == "__main__":
    main()
