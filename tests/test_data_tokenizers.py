"""Tokenizers: interface, the exact tiktoken fast path, SentencePiece training settings for code."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest

from phi1.data.tokenizers import _fast_path_refusal, build_tokenizer

TRICKY = [
    "",
    "def f(x):\n    return x  # two  spaces\n\n\n",
    "\t\tmixed \t tabs\r\n   \n" + " " * 41 + "deep",
    "<|endoftext|>literal special<|endoftext|>",
    "ünïcödé 日本語 🤖 emoji \u200b zero-width",
    "it's we'll I'M they've 1234567 3.14e-10",
]


def _stdlib_sample(count: int = 60) -> list[str]:
    import phi1.data.corpus as build_corpus

    files = build_corpus.iter_python_files(sysconfig.get_paths()["stdlib"])[::40][:count]
    texts = []
    for path in files:
        try:
            texts.append(Path(path).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    return texts


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    with open(path, "w", encoding="utf-8") as handle:
        for text in _stdlib_sample():
            handle.write(json.dumps({"text": text}) + "\n")
    return path


def _train(corpus: Path, output: Path, *extra: str) -> Path:
    from phi1.data.tokenizer_training import main

    main(["--input", str(corpus), "--output-dir", str(output), *extra])
    return output


@pytest.mark.parametrize("space_runs", ["0", "24"])
def test_tiktoken_matches_huggingface_on_stdlib(corpus, tmp_path, space_runs) -> None:
    directory = _train(corpus, tmp_path / "bbpe", "--type", "bpe-bytelevel", "--vocab-size", "1200",
                       "--max-space-run", space_runs)
    fast = build_tokenizer("HuggingFaceTokenizer", directory)
    reference = build_tokenizer("HuggingFaceTokenizer", directory / "tokenizer.json", engine="huggingface")
    assert fast.engine == "tiktoken", fast.refusal
    assert reference.engine == "huggingface"
    texts = _stdlib_sample() + TRICKY
    assert fast.encode_batch(texts) == reference.encode_batch(texts)
    assert [fast.encode(t) for t in TRICKY] == [reference.encode(t) for t in TRICKY]
    assert fast.encode("<|endoftext|>") == [fast.eod]
    assert fast.decode(fast.encode(TRICKY[2])) == TRICKY[2]
    if space_runs == "24":
        assert fast.vocab_size == reference.vocab_size > 1200
        assert len(fast.encode(" " * 24)) == 1


def test_gpt2_bpe_files_match_tokenizer_json(corpus, tmp_path) -> None:
    directory = _train(corpus, tmp_path / "bbpe", "--type", "bpe-bytelevel", "--vocab-size", "1000")
    from_files = build_tokenizer("GPT2BPETokenizer", vocab_file=directory / "vocab.json",
                                 merge_file=directory / "merges.txt")
    from_directory = build_tokenizer("GPT2BPETokenizer", directory, engine="huggingface")
    from_json = build_tokenizer("HuggingFaceTokenizer", directory, engine="huggingface")
    texts = _stdlib_sample(20) + TRICKY
    assert from_files.engine == "tiktoken"
    assert from_files.encode_batch(texts) == from_directory.encode_batch(texts) == from_json.encode_batch(texts)
    assert from_files.eod == from_json.eod


def test_fast_path_refuses_what_it_cannot_reproduce(corpus, tmp_path) -> None:
    directory = _train(corpus, tmp_path / "bbpe", "--type", "bpe-bytelevel", "--vocab-size", "600")
    spec = json.loads((directory / "tokenizer.json").read_text())
    assert _fast_path_refusal(spec) is None
    prefixed = json.loads(json.dumps(spec))
    prefixed["pre_tokenizer"]["add_prefix_space"] = True
    assert "ByteLevel" in _fast_path_refusal(prefixed)
    reordered = json.loads(json.dumps(spec))
    reordered["model"]["merges"] = reordered["model"]["merges"][::-1]
    assert "merge rank" in _fast_path_refusal(reordered)
    (tmp_path / "bad.json").write_text(json.dumps(prefixed))
    assert build_tokenizer("HuggingFaceTokenizer", tmp_path / "bad.json").engine == "huggingface"
    with pytest.raises(ValueError, match="would not be exact"):
        build_tokenizer("HuggingFaceTokenizer", tmp_path / "bad.json", engine="tiktoken")


def test_sentencepiece_for_code(corpus, tmp_path) -> None:
    directory = _train(corpus, tmp_path / "sp", "--vocab-size", "1000", "--max-space-run", "8")
    tokenizer = build_tokenizer("SentencePieceTokenizer", directory / "tokenizer.model")
    assert tokenizer.vocab_size == 1000 and tokenizer.padded_vocab_size(64, 2) == 1024
    assert tokenizer.processor.id_to_piece(tokenizer.eod) == "<|endoftext|>"
    for text in TRICKY[1:3] + TRICKY[4:]:
        assert tokenizer.decode(tokenizer.encode(text)) == text  # whitespace and bytes survive
    assert tokenizer.eod not in tokenizer.encode("<|endoftext|>")  # a control symbol never comes from text
    pieces = [tokenizer.processor.id_to_piece(i) for i in tokenizer.encode("\n        x")]
    assert pieces[:2] == ["\n", "▁" * 8]
    assert tokenizer.encode_batch(TRICKY) == [tokenizer.encode(t) for t in TRICKY]


def test_factory_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown tokenizer type"):
        build_tokenizer("Nope", "x")
    with pytest.raises(FileNotFoundError, match="never downloads"):
        build_tokenizer("HuggingFaceTokenizer", tmp_path)
    with pytest.raises(ValueError, match="--vocab-file"):
        build_tokenizer("GPT2BPETokenizer")


def test_detect_tokenizer_type(corpus, tmp_path) -> None:
    import os

    from phi1.data.tokenizers import detect_tokenizer_type

    sp = _train(corpus, tmp_path / "sp", "--vocab-size", "1000")
    bbpe = _train(corpus, tmp_path / "bbpe", "--type", "bpe-bytelevel", "--vocab-size", "400")
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    for name in ("vocab.json", "merges.txt"):
        (gpt2 / name).write_bytes((bbpe / name).read_bytes())
    assert detect_tokenizer_type(sp / "tokenizer.model") == "SentencePieceTokenizer"
    assert detect_tokenizer_type(bbpe) == "HuggingFaceTokenizer"
    assert detect_tokenizer_type(str(bbpe / "tokenizer.json")) == "HuggingFaceTokenizer"
    assert detect_tokenizer_type(gpt2) == "GPT2BPETokenizer"
    # Each detected type really loads with its path, giving the same ids as the tokenizer that was trained.
    assert build_tokenizer(detect_tokenizer_type(gpt2), gpt2).encode("def f(x):") == build_tokenizer(
        "HuggingFaceTokenizer", bbpe).encode("def f(x):")

    (tmp_path / "random.model").write_bytes(os.urandom(3000))
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "empty.model").write_bytes(b"")
    os.mkfifo(tmp_path / "pipe")
    with open(tmp_path / "huge.json", "wb") as handle:
        handle.truncate(300 << 20)  # sparse: refused by its size, never read
    bad = {
        tmp_path / "random.model": "neither a tokenizer.json nor a SentencePiece model",
        tmp_path / "list.json": "not an object",
        tmp_path / "empty.model": "empty file",
        tmp_path / "pipe": "named pipe",  # refused without opening: opening a FIFO would block
        tmp_path / "missing": "no such file",
        sp: "tokenizer.model",  # a SentencePiece directory: the message names the file to give instead
        Path("/dev/zero"): "device file",
        corpus: "not valid JSON",
        tmp_path / "huge.json": "larger than any tokenizer file",
    }
    for path, words in bad.items():
        with pytest.raises(ValueError, match=words) as raised:
            detect_tokenizer_type(path)
        assert str(path) in str(raised.value)
