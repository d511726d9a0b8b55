"""Near-duplicate removal over sharded jsonl corpora: MinHash LSH on datatrove's pipeline (see
phi1/quality/minhash.py for the stages, the S-curve and why datatrove's).

    # remove near duplicates; --threshold picks the bands x rows (of 112 hashes) whose S-curve errs least there
    python tools/dedup.py --input data/filtered --output-dir data/dedup --work-dir runs/dedup-work \
        --threshold 0.8 --workers 4
    # or give the banding yourself (datatrove's default: 14 bands x 8 rows, 50% detection at Jaccard 0.72)
    python tools/dedup.py --input data/filtered --output-dir data/dedup --work-dir runs/dedup-work --bands 14 --rows 8
    # print the S-curve and its false-positive / false-negative areas, without running anything
    python tools/dedup.py --curve --threshold 0.8

Every *.jsonl (--glob) shard in --input is read with its "text" (--text-key) and "id" (--id-key); the output
has one shard per reading task, in input order. Rerunning with the same --work-dir resumes: tasks datatrove
marked complete are skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from phi1.cli import UserError, run_cli
from phi1.quality.minhash import (
    MinhashSettings,
    best_bands_rows,
    detection_probability,
    lsh_errors,
    run_dedup,
)

HASHES = 112


def curve(settings: MinhashSettings, threshold: float | None) -> str:
    """The S-curve as a small table, and its error areas around `threshold`."""
    lines = [f"{settings.bands} bands x {settings.rows} rows ({settings.bands * settings.rows} hashes): "
             f"50% detection at Jaccard {(1 / settings.bands) ** (1 / settings.rows):.3f}",
             "  Jaccard  P(removed)"]
    for similarity in (0.3, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95):
        lines.append(f"  {similarity:.2f}     {detection_probability(similarity, settings.bands, settings.rows):.4f}")
    if threshold is not None:
        fp, fn = lsh_errors(threshold, settings.bands, settings.rows)
        lines.append(f"  at threshold {threshold}: false-positive area {fp:.4f}, false-negative area {fn:.4f}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", help="folder of jsonl shards")
    parser.add_argument("--glob", default="*.jsonl")
    parser.add_argument("--output-dir")
    parser.add_argument("--work-dir", help="signatures, buckets, removal lists, logs; reuse it to resume")
    parser.add_argument("--threshold", type=float, default=None,
                        help="Jaccard similarity to remove at: chooses --bands/--rows (default 14 x 8)")
    parser.add_argument("--bands", type=int, default=None)
    parser.add_argument("--rows", type=int, default=None)
    parser.add_argument("--ngrams", type=int, default=5, help="words per shingle")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--tasks", type=int, default=None, help="reading tasks (default: one per shard)")
    parser.add_argument("--workers", type=int, default=1, help="processes at once")
    parser.add_argument("--text-key", default="text")
    parser.add_argument("--id-key", default="id")
    parser.add_argument("--curve", action="store_true", help="print the S-curve and exit")
    parser.add_argument("--json", help="write the counts as JSON here")
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> MinhashSettings:
    """Bands/rows from --bands/--rows, else from --threshold, else datatrove's 14 x 8. Raises UserError."""
    if args.threshold is not None and not 0 < args.threshold < 1:
        raise UserError(f"--threshold {args.threshold}: must be strictly between 0 and 1")
    if (args.bands is None) != (args.rows is None):
        raise UserError("--bands and --rows: give both or neither")
    for name in ("bands", "rows", "ngrams"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name} {value}: must be at least 1")
    if args.bands is not None:
        bands, rows = args.bands, args.rows
    elif args.threshold is not None:
        bands, rows = best_bands_rows(args.threshold, HASHES)
    else:
        bands, rows = 14, 8
    return MinhashSettings(n_grams=args.ngrams, bands=bands, rows=rows, seed=args.seed)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    settings = settings_from(args)
    print(curve(settings, args.threshold), file=sys.stderr)
    if args.curve:
        return {"bands": settings.bands, "rows": settings.rows}
    for option in ("input", "output_dir", "work_dir"):
        if not getattr(args, option):
            raise UserError(f"--{option.replace('_', '-')} is needed (or --curve)")
    if not os.path.isdir(args.input):
        raise UserError(f"--input {args.input}: not a folder of jsonl shards")
    inside = os.path.abspath(args.output_dir) + os.sep
    if inside.startswith(os.path.abspath(args.input) + os.sep) or os.path.abspath(args.input) + os.sep == inside:
        raise UserError(f"--output-dir {args.output_dir}: inside --input {args.input}; its shards would be read back")
    if args.tasks is not None and args.tasks < 1 or args.workers < 1:
        raise UserError(f"--tasks {args.tasks} / --workers {args.workers}: must be at least 1")
    counts = run_dedup(args.input, args.output_dir, args.work_dir, settings, glob=args.glob, tasks=args.tasks,
                       workers=args.workers, text_key=args.text_key, id_key=args.id_key)
    print(json.dumps(counts), file=sys.stderr)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(counts, handle, indent=2)
    return counts


if __name__ == "__main__":
    run_cli(main, prog="dedup.py")
