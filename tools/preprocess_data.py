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

The logic lives in `phi1.data.preprocess`; this script is its command line.
"""

import os
import sys

# Runnable from a checkout without installing phi1.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from phi1.cli import run_cli  # noqa: E402
from phi1.data.preprocess import main  # noqa: E402

if __name__ == "__main__":
    run_cli(main, prog="preprocess_data.py")
