"""Removes training documents that overlap HumanEval (and MBPP when given), the paper's three ways.

    python tools/decontaminate.py --input data/train.jsonl --output data/train.clean.jsonl \
        --report runs/decontamination.jsonl [--mbpp data/mbpp.jsonl] [--ngram-n 13] [--tau 0.9] \
        [--embedding-model runs/phi1-tiny --embedding-threshold 0.05] [--workers 2] \
        [--index runs/decontamination_index.json]

Checks: n-gram overlap (hashed, one pass over the corpus), AST match rate of every function against each
solution (tau; the summary also counts the paper's 0.95 / 0.9 / 0.85 / 0.8), and L2 distance of mean embeddings
from a phi1 checkpoint. The report has one line per flagged (document, problem) pair with every score; the
output keeps the input's order. Non-JSON lines, records without the text key and code that does not parse are
counted and listed by file and line; --strict makes them an error (exit status 2).

--index also writes the contamination index: per benchmark problem, the best score of each check over the whole
corpus (down to AST tau 0.8, whatever --tau prunes at) and the document reaching it. `phi1-eval
--contamination-index` reads it to split pass@k into problems with and without a near match in the training
data (phi1/eval/contamination.py).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time

from phi1.cli import UserError
from phi1.quality.decontamination import (
    PAPER_TAUS,
    DecontaminationConfig,
    decontaminate_chunk,
    load_humaneval_references,
    load_mbpp_references,
)
from phi1.quality.jsonl import LineStats
from phi1.quality.shards import concatenate, default_chunk_bytes, plan_chunks, run_chunks


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="training jsonl file(s) (.gz allowed)")
    parser.add_argument("--output", required=True, help="pruned jsonl (input order kept)")
    parser.add_argument("--report", required=True, help="jsonl of flagged (document, problem) pairs")
    parser.add_argument("--summary", help="write the summary JSON here too")
    parser.add_argument("--index", help="write the contamination index (JSON) for phi1-eval --contamination-index")
    parser.add_argument("--humaneval", default=None, help="HumanEval jsonl(.gz) (default: the bundled one)")
    parser.add_argument("--no-humaneval", action="store_true", help="check against MBPP only")
    parser.add_argument("--mbpp", help="original mbpp.jsonl (task_id, text, code)")
    parser.add_argument("--text-key", default="text", help="field holding the document; prompt+solution joins fields")
    parser.add_argument("--id-key", help="record field quoted as the document's id in the report")
    parser.add_argument("--ngram-n", type=int, default=13)
    parser.add_argument("--ngram-min-shared", type=int, default=1)
    parser.add_argument("--tau", type=float, default=0.9, help="AST match threshold; 0 disables the AST check")
    parser.add_argument("--ast-min-tokens", type=int, default=16)
    parser.add_argument("--constant-values", action="store_true", help="AST match compares constant values")
    parser.add_argument("--embedding-model", help="phi1 model directory; enables the embedding check")
    parser.add_argument("--tokenizer-type")
    parser.add_argument("--tokenizer-model")
    parser.add_argument("--embedding-threshold", type=float, default=0.05)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--strict", action="store_true", help="exit 2 when any line was bad")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    references = [] if args.no_humaneval else load_humaneval_references(args.humaneval)
    if args.mbpp:
        references += load_mbpp_references(args.mbpp)
    if not references:
        raise UserError("nothing to check against: --no-humaneval without --mbpp")
    config = DecontaminationConfig(
        ngram_n=args.ngram_n, ngram_min_shared=args.ngram_min_shared, tau=args.tau, report_taus=PAPER_TAUS,
        ast_min_tokens=args.ast_min_tokens, constant_values=args.constant_values,
        embedding_model=args.embedding_model, tokenizer_type=args.tokenizer_type,
        tokenizer_model=args.tokenizer_model, embedding_threshold=args.embedding_threshold,
        text_key=args.text_key, id_key=args.id_key,
    )
    start = time.perf_counter()
    chunks = plan_chunks(args.input, default_chunk_bytes(args.input, args.workers))
    work_dir = tempfile.mkdtemp(prefix=".decontaminate-", dir=os.path.dirname(os.path.abspath(args.output)))
    worker = functools.partial(decontaminate_chunk, references, config, work_dir)
    results = run_chunks(chunks, worker, args.workers, "decontaminating", progress=not args.no_progress)
    concatenate([r.output_part for r in results], args.output)
    concatenate([r.report_part for r in results], args.report)
    os.rmdir(work_dir)
    elapsed = time.perf_counter() - start

    stats = LineStats()
    flagged_by = {"ngram": 0, "ast": 0, "embedding": 0}
    ast_at_tau = {str(t): 0 for t in PAPER_TAUS}
    for result in results:
        stats.merge(result.stats)
        for key, value in result.flagged_by.items():
            flagged_by[key] += value
        for key, value in result.ast_at_tau.items():
            ast_at_tau[key] += value
    summary = {
        "inputs": args.input, "references": len(references), "documents": stats.good,
        "kept": sum(r.kept for r in results), "pruned": sum(r.pruned for r in results),
        "flagged_by": flagged_by, "documents_with_ast_match_at_tau": ast_at_tau,
        "bad_lines": stats.to_dict(), "seconds": round(elapsed, 2),
        "documents_per_second": round(stats.good / elapsed, 1) if elapsed > 0 else None,
        "output": args.output, "report": args.report,
    }
    if args.index:
        from phi1.eval.contamination import index_from_results, write_index

        summary["index"] = str(write_index(index_from_results(references, config, results, args.input), args.index))
    print(f"{stats.good} documents checked against {len(references)} problems in {elapsed:.1f}s "
          f"({summary['documents_per_second']} documents/s): pruned {summary['pruned']} "
          f"(n-gram {flagged_by['ngram']}, AST >= {args.tau} {flagged_by['ast']}, embedding {flagged_by['embedding']}), "
          f"kept {summary['kept']}; AST matches at tau {ast_at_tau}", file=sys.stderr)
    print(f"input lines: {stats.summary()}", file=sys.stderr)
    if args.summary:
        with open(args.summary, "w", encoding="utf-8") as handle:
            json.dump(summary, handle, indent=2)
    if args.strict and (stats.bad or stats.unparsable_code):
        raise SystemExit(2)
    return summary

