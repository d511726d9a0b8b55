"""Merges several indexed datasets into one, in the order given (tokens copied byte for byte).

    python tools/merge_datasets.py --input data/a_text_document data/b_text_document --output-prefix data/ab
    python tools/merge_datasets.py --input-dir data/parts --output-prefix data/all   # every prefix in a folder
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from phi1.data.indexed_dataset import IndexedDataset, merge_datasets  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", help="dataset prefixes (without .bin/.idx)")
    source.add_argument("--input-dir", help="merge every PREFIX.idx/.bin pair in this folder, sorted by name")
    parser.add_argument("--output-prefix", required=True)
    args = parser.parse_args(argv)
    if args.input_dir:
        prefixes = sorted(os.path.join(args.input_dir, name[:-4]) for name in os.listdir(args.input_dir)
                          if name.endswith(".idx") and os.path.isfile(os.path.join(args.input_dir, name[:-4] + ".bin")))
    else:
        prefixes = args.input
    count = merge_datasets(prefixes, args.output_prefix)
    merged = IndexedDataset(args.output_prefix)
    print(f"wrote {args.output_prefix}.bin/.idx: {count} sequences, {merged.num_tokens} tokens from {len(prefixes)} datasets")


if __name__ == "__main__":
    main()
