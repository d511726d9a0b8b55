"""tools/preprocess_data.py side by side with Megatron-LM's (tag core_v0.16.1) on the standard-library corpus.

    python benchmarks/bench_preprocess.py --megatron-tree /tmp/megatron-lm [--workers 2] [--work-dir runs/bench]

Get Megatron-LM's tree with: git --git-dir=<Megatron-LM mirror> archive core_v0.16.1 tools megatron | tar -x -C DIR
(it needs `six nltk triton` importable). Without the tree, Megatron's runs are skipped with a message.
For each tokenizer (SentencePiece BPE 8k and byte-level BPE 8k, both trained by tools/train_tokenizer.py) it
reports documents/s and MB/s of whole runs (start-up included, for both), the tokenizer's own batch encoding
on `--workers` threads (the limit), whether our output equals Megatron's byte for byte, and, for byte-level
BPE, whether our ids equal the HuggingFace tokenizer's on every document.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from phi1.data.indexed_dataset import IndexedDataset  # noqa: E402
from phi1.data.tokenizers import build_tokenizer  # noqa: E402


def run(command: list[str], env: dict | None = None) -> float:
    start = time.perf_counter()
    completed = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{completed.stderr[-3000:]}")
    return seconds


def same_files(prefix_a: str, prefix_b: str) -> bool:
    return all(Path(prefix_a + s).read_bytes() == Path(prefix_b + s).read_bytes() for s in (".bin", ".idx"))


def line(name: str, seconds: float, documents: int, megabytes: float) -> str:
    return f"  {name:<44} {seconds:7.2f} s {documents / seconds:8.0f} docs/s {megabytes / seconds:6.2f} MB/s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megatron-tree", default="/tmp/megatron-lm", help="Megatron-LM source tree (tools/, megatron/)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--work-dir", default=str(ROOT / "runs" / "bench_preprocess"))
    parser.add_argument("--max-files", type=int, default=2000)
    parser.add_argument("--tokenizers", default="sentencepiece,bpe-bytelevel")
    args = parser.parse_args()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "stdlib.jsonl"
    if not corpus.exists():
        subprocess.run([sys.executable, str(ROOT / "tools/build_corpus.py"), "--output", str(corpus),
                        "--max-files", str(args.max_files)], check=True, stderr=subprocess.DEVNULL)
    texts = [json.loads(l)["text"] for l in corpus.open(encoding="utf-8")]
    megabytes = corpus.stat().st_size / 1e6
    print(f"corpus {corpus}: {len(texts)} documents, {megabytes:.1f} MB; {args.workers} workers; {os.cpu_count()} cores")
    megatron = Path(args.megatron_tree) / "tools" / "preprocess_data.py"
    if not megatron.exists():
        print(f"Megatron-LM tree not found at {args.megatron_tree}: skipping Megatron's runs "
              "(pass --megatron-tree; see this script's docstring)")
    megatron_env = dict(os.environ, PYTHONPATH=str(Path(args.megatron_tree).resolve()))

    for kind in args.tokenizers.split(","):
        directory = work / f"tok-{kind}-8k"
        if kind == "sentencepiece":
            model, tokenizer_args = directory / "tokenizer.model", ["--tokenizer-type", "SentencePieceTokenizer"]
            tokenizer_args += ["--tokenizer-model", str(directory / "tokenizer.model")]
        else:
            model, tokenizer_args = directory / "tokenizer.json", ["--tokenizer-type", "HuggingFaceTokenizer"]
            tokenizer_args += ["--tokenizer-model", str(directory)]
        if not model.exists():
            subprocess.run([sys.executable, str(ROOT / "tools/train_tokenizer.py"), "--type", kind, "--input",
                            str(corpus), "--output-dir", str(directory), "--vocab-size", "8000"], check=True)
        print(f"\n{kind} 8k:")
        common = ["--input", str(corpus), *tokenizer_args, "--append-eod", "--workers", str(args.workers),
                  "--log-interval", "100000"]
        ours_prefix, theirs_prefix = str(work / f"ours_{kind}"), str(work / f"megatron_{kind}")
        ours = run([sys.executable, str(ROOT / "tools/preprocess_data.py"), *common, "--output-prefix", ours_prefix])
        print(line("phi1 tools/preprocess_data.py", ours, len(texts), megabytes))
        if megatron.exists():
            theirs = run([sys.executable, str(megatron), *common, "--output-prefix", theirs_prefix], env=megatron_env)
            print(line("Megatron-LM tools/preprocess_data.py", theirs, len(texts), megabytes)
                  + f"   phi1 is {theirs / ours:.2f}x faster")
            print(f"  output identical to Megatron's: "
                  f"{same_files(ours_prefix + '_text_document', theirs_prefix + '_text_document')}")
        if kind == "sentencepiece":
            tokenizer = build_tokenizer("SentencePieceTokenizer", model, num_threads=args.workers)
            start = time.perf_counter()
            tokenizer.encode_batch(texts)
            limit = time.perf_counter() - start
            print(line(f"limit: sentencepiece batch encode, {args.workers} threads", limit, len(texts), megabytes)
                  + f"   phi1 / limit = {ours / limit:.2f}x the time")
        else:
            reference = build_tokenizer("HuggingFaceTokenizer", directory, engine="huggingface")
            start = time.perf_counter()
            expected = reference.encode_batch(texts)
            hf_seconds = time.perf_counter() - start
            print(line("HuggingFace tokenizers encode_batch (own threads)", hf_seconds, len(texts), megabytes))
            dataset = IndexedDataset(ours_prefix + "_text_document")
            mismatches = sum(
                not np.array_equal(dataset[i], ids + [reference.eod]) for i, ids in enumerate(expected)
            )
            print(f"  engine: {build_tokenizer('HuggingFaceTokenizer', directory).engine}; documents whose ids differ "
                  f"from HuggingFace's: {mismatches} of {len(expected)}")


if __name__ == "__main__":
    main()
