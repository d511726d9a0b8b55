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
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import stat
import sys
import zlib
from collections.abc import Iterator

from phi1.cli import UserError

EOD_TOKEN = "<|endoftext|>"


# Problems shown one by one before only counting them.
MAX_REPORTED = 20


def iter_texts(path: str, key: str = "text", max_documents: int | None = None) -> Iterator[str]:
    """The `key` field of each jsonl line (gzip allowed).

    Lines that are not UTF-8, not a JSON object, or lack a string `key` are skipped and reported as file:line
    on stderr (the first MAX_REPORTED, then counted); blank lines are skipped silently.

    Raises:
        UserError: a truncated or corrupt gzip stream, naming the file and the last complete line.
    """
    opener = gzip.open if path.endswith(".gz") else open
    count = skipped = number = 0
    try:
        with opener(path, "rb") as handle:
            for number, raw in enumerate(handle, start=1):
                if not raw.strip():
                    continue
                try:
                    text = json.loads(raw.decode("utf-8"))[key]
                    if not isinstance(text, str):
                        raise TypeError(f"field {key!r} is not a string")
                    text.encode("utf-8")  # a lone surrogate (from a \ud800 escape) cannot be trained on
                except (ValueError, KeyError, TypeError, IndexError, RecursionError) as error:
                    skipped += 1
                    if skipped <= MAX_REPORTED:
                        reason = f"no field {key!r}" if isinstance(error, KeyError) else str(error)[:200]
                        print(f"skipped {path}:{number}: {reason}", file=sys.stderr)
                    continue
                yield text
                count += 1
                if max_documents is not None and count >= max_documents:
                    return
    except (EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise UserError(f"{path}: truncated or corrupt gzip data after line {number} (the last complete line): "
                        f"{error}; re-download or re-compress the file") from None
    if skipped:
        print(f"{path}: {skipped} lines skipped (not UTF-8, not JSON objects, or no string {key!r})", file=sys.stderr)


def whitespace_runs(longest: int) -> list[str]:
    """Runs of 2..longest spaces, longest first (matching prefers them)."""
    return [" " * n for n in range(longest, 1, -1)]


def train_sentencepiece(input_path: str, output_dir: str, vocab_size: int, max_space_run: int, max_documents: int | None,
                        threads: int) -> str:
    """Trains a SentencePiece BPE model; returns the .model path."""
    import sentencepiece

    os.makedirs(output_dir, exist_ok=True)
    prefix = os.path.join(output_dir, "tokenizer")

    input_errors: list[UserError] = []

    def sentences() -> Iterator[str]:
        # SentencePiece trains on lines; code lines are natural sentences (newlines become a piece of their own).
        try:
            for text in iter_texts(input_path, max_documents=max_documents):
                for line in text.split("\n"):
                    if line.strip():
                        yield line
        except UserError as error:
            # Raised through SentencePiece's C++ it would come back as a RuntimeError with a stack dump.
            input_errors.append(error)

    try:
        _train_sentencepiece_on(sentencepiece, sentences(), prefix, vocab_size, max_space_run, threads)
    except RuntimeError:
        if input_errors:
            raise input_errors[0] from None
        raise
    if input_errors:
        raise input_errors[0]
    return prefix + ".model"


def _train_sentencepiece_on(sentencepiece, sentences: Iterator[str], prefix: str, vocab_size: int,
                            max_space_run: int, threads: int) -> None:
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=sentences,
        model_prefix=prefix,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=1.0,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        split_by_whitespace=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        user_defined_symbols=["\n", "\t"] + whitespace_runs(max_space_run),
        # <|endoftext|> is the EOS control piece, so readers that take EOS as eod (Megatron) agree with ours.
        unk_id=0, bos_id=-1, eos_id=1, pad_id=-1, eos_piece=EOD_TOKEN,
        max_sentence_length=1 << 16,
        input_sentence_size=2_000_000,
        shuffle_input_sentence=True,
        num_threads=threads,
        minloglevel=2,
    )


def train_bytelevel_bpe(input_path: str, output_dir: str, vocab_size: int, max_space_run: int,
                        max_documents: int | None) -> str:
    """Trains a GPT-2-style byte-level BPE; writes vocab.json, merges.txt, tokenizer.json and a
    tokenizer_config.json (so transformers' AutoTokenizer, hence Megatron's HuggingFaceTokenizer, can load it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    os.makedirs(output_dir, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(iter_texts(input_path, max_documents=max_documents), trainer=trainer)
    if max_space_run > 1:
        # codegen-style whitespace-run tokens, added after training (ids after the BPE vocabulary)
        tokenizer.add_tokens(whitespace_runs(max_space_run))
    tokenizer.save(os.path.join(output_dir, "tokenizer.json"))
    tokenizer.model.save(output_dir)  # vocab.json + merges.txt
    with open(os.path.join(output_dir, "tokenizer_config.json"), "w", encoding="utf-8") as handle:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOD_TOKEN, "bos_token": EOD_TOKEN,
                   "unk_token": EOD_TOKEN, "model_max_length": 1 << 30}, handle, indent=1)
    return os.path.join(output_dir, "tokenizer.json")


def _check_input(path: str) -> None:
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise UserError(f"--input {path}: no such file") from None
    if not stat.S_ISREG(mode):
        raise UserError(f"--input {path}: not a regular file (a directory, pipe or device); give a .jsonl file")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="train_tokenizer.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="jsonl corpus with a 'text' field (.gz allowed)")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--type", choices=["sentencepiece", "bpe-bytelevel"], default="sentencepiece")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--max-space-run", type=int, default=None,
                        help="add tokens for runs of 2..N spaces; default 16 for sentencepiece, 0 (none) for bpe-bytelevel")
    parser.add_argument("--max-documents", type=int, default=None)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    _check_input(args.input)
    if not 2 <= args.vocab_size <= 1 << 22:
        raise UserError(f"--vocab-size {args.vocab_size}: must be between 2 and {1 << 22}")
    if args.max_space_run is None:
        args.max_space_run = 16 if args.type == "sentencepiece" else 0
    if not 0 <= args.max_space_run <= 256:
        raise UserError(f"--max-space-run {args.max_space_run}: must be between 0 and 256")
    if args.threads < 1 or args.threads > 4 * (os.cpu_count() or 1):
        raise UserError(f"--threads {args.threads}: must be between 1 and 4 per CPU core")
    if not any(True for _ in iter_texts(args.input, max_documents=1)):
        raise UserError(f"--input {args.input}: no documents with a string 'text' field; nothing to train on")
    try:
        if args.type == "sentencepiece":
            path = train_sentencepiece(args.input, args.output_dir, args.vocab_size, args.max_space_run,
                                       args.max_documents, args.threads)
        else:
            path = train_bytelevel_bpe(args.input, args.output_dir, args.vocab_size, args.max_space_run,
                                       args.max_documents)
    except RuntimeError as error:  # SentencePiece's trainer reports bad settings (vocab too small) this way
        raise UserError(f"--input {args.input}: the tokenizer trainer refused it: {str(error).strip()[:400]}") from None
    print(f"wrote {path}")

