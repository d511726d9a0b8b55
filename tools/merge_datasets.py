"""Merges several indexed datasets into one, in the order given (tokens copied byte for byte).

    python tools/merge_datasets.py --input data/a_text_document data/b_text_document --output-prefix data/ab
    python tools/merge_datasets.py --input-dir data/parts --output-prefix data/all   # every prefix in a folder

Datasets made with different tokenizers cannot be merged (their tokenizer sidecars, PREFIX.json, disagree).
When every input has a sidecar and all name the same tokenizer, the merged dataset gets one too; when some
input has none (made by Megatron-LM), the merged dataset has none either and this is said.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from phi1.cli import UserError, run_cli  # noqa: E402
from phi1.data.indexed_dataset import IndexedDataset, merge_datasets  # noqa: E402
from phi1.data.sidecar import read_sidecar, sidecar_path  # noqa: E402


def merged_sidecar(prefixes: list[str]) -> dict | None:
    """The sidecar record the merged dataset gets, or None when some input has no sidecar.

    Raises:
        UserError: two inputs were made with different tokenizers.
    """
    records = [read_sidecar(prefix) for prefix in prefixes]
    if any(record is None for record in records):
        missing = [prefix for prefix, record in zip(prefixes, records) if record is None]
        print(f"note: {missing[0]} has no tokenizer sidecar ({sidecar_path(missing[0])}); the merged dataset gets "
              "none, so training cannot check its tokenizer", file=sys.stderr)
        return None
    first = records[0]["tokenizer"]
    for prefix, record in zip(prefixes[1:], records[1:]):
        other = record["tokenizer"]
        same_files = sorted(other["files"].values()) == sorted(first["files"].values())
        same_ids = all(other[key] == first[key] for key in ("vocab_size", "eod", "probe_ids_sha256"))
        if not (same_files or same_ids):
            raise UserError(f"--input {prefix}: made with another tokenizer ({sidecar_path(prefix)}: {other['type']}, "
                            f"vocab {other['vocab_size']}) than {prefixes[0]} ({first['type']}, vocab "
                            f"{first['vocab_size']}); re-run tools/preprocess_data.py on one of them with the other's "
                            "tokenizer")
    merged = dict(records[0])
    merged.update(json_key=None, documents=None, tokens=None,
                  command=["tools/merge_datasets.py", "--input", *prefixes])
    return merged


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="merge_datasets.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", help="dataset prefixes (without .bin/.idx)")
    source.add_argument("--input-dir", help="merge every PREFIX.idx/.bin pair in this folder, sorted by name")
    parser.add_argument("--output-prefix", required=True)
    args = parser.parse_args(argv)
    if args.input_dir:
        if not os.path.isdir(args.input_dir):
            raise UserError(f"--input-dir {args.input_dir}: not a directory")
        prefixes = sorted(os.path.join(args.input_dir, name[:-4]) for name in os.listdir(args.input_dir)
                          if name.endswith(".idx") and os.path.isfile(os.path.join(args.input_dir, name[:-4] + ".bin")))
        if not prefixes:
            raise UserError(f"--input-dir {args.input_dir}: holds no PREFIX.idx + PREFIX.bin pair; nothing to merge")
    else:
        prefixes = args.input
    if os.path.abspath(args.output_prefix) in {os.path.abspath(prefix) for prefix in prefixes}:
        raise UserError(f"--output-prefix {args.output_prefix}: is also an input; choose another prefix")
    for prefix in prefixes:  # each input is checked (and a missing one named) before anything is written
        IndexedDataset(prefix).close()
    sidecar = merged_sidecar(prefixes)
    count = merge_datasets(prefixes, args.output_prefix)
    merged = IndexedDataset(args.output_prefix)
    if sidecar is not None:
        sidecar.update(documents=merged.num_documents, tokens=merged.num_tokens)
        with open(sidecar_path(args.output_prefix), "w", encoding="utf-8") as handle:
            json.dump(sidecar, handle, indent=1)
            handle.write("\n")
    elif os.path.exists(sidecar_path(args.output_prefix)):
        os.remove(sidecar_path(args.output_prefix))  # a stale sidecar from an earlier merge would be believed
    print(f"wrote {args.output_prefix}.bin/.idx: {count} sequences, {merged.num_tokens} tokens from {len(prefixes)} datasets")


if __name__ == "__main__":
    run_cli(main, prog="merge_datasets.py")
