"""Trains a tokenizer for code on a jsonl corpus.

    # SentencePiece BPE (byte fallback, whitespace kept, space-run tokens, <|endoftext|> as eod):
    python tools/train_tokenizer.py --input data/stdlib.jsonl --output-dir data/tok-sp8k --vocab-size 8000
    # GPT-2-style byte-level BPE with HuggingFace tokenizers (vocab.json, merges.txt, tokenizer.json):
    python tools/train_tokenizer.py --type bpe-bytelevel --input data/stdlib.jsonl --output-dir data/tok-bbpe8k

SentencePiece settings and why: identity normalisation and `remove_extra_whitespaces=False` keep code byte for
byte (`add_dummy_prefix=False`: a file's first word is not given a space it does not have); byte fallback
means no <unk>; `\\n` and runs of 2..N spaces are user-defined pieces (as codegen's added
whitespace tokens), so indentation costs one token; `split_by_whitespace=True` keeps pieces word-like (a piece
never spans two words), which trains faster and generalises like GPT-2's pre-tokenizer; `<|endoftext|>` is a
control symbol: never produced from text, used as the end-of-document id.

The logic lives in `phi1.data.tokenizer_training`; this script is its command line.
"""

import os
import sys

# Runnable from a checkout without installing phi1.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from phi1.cli import run_cli  # noqa: E402
from phi1.data.tokenizer_training import main  # noqa: E402

if __name__ == "__main__":
    run_cli(main, prog="train_tokenizer.py")
