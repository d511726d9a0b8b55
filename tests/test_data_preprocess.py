"""tools/preprocess_data.py (phi1.data.preprocess): worker-count independence, problem lines, --strict, gzip, round trip."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

import phi1.data.preprocess as preprocess_data
from phi1.data.indexed_dataset import IndexedDataset
from phi1.data.tokenizers import build_tokenizer

DOCUMENTS = [
    "def add(a, b):\n    return a + b\n",
    "",
    "class Point:\n    x: int = 0\n\n    def norm(self):\n        return abs(self.x)\n",
    "print('héllo wörld 🤖')\n\t\tindent\n",
] * 700


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    from phi1.data.tokenizer_training import main as train

    directory = tmp_path_factory.mktemp("tok")
    corpus = directory / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCUMENTS[:40]), encoding="utf-8")
    train(["--type", "bpe-bytelevel", "--input", str(corpus), "--output-dir", str(directory), "--vocab-size", "400"])
    return directory


def _write_corpus(path: Path, lines: list[str]) -> None:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as handle:
        handle.write("".join(line + "\n" for line in lines))


def _run(tokenizer_dir: Path, input_path: Path, prefix: Path, *extra: str) -> dict:
    return preprocess_data.main([
        "--input", str(input_path), "--output-prefix", str(prefix), "--tokenizer-type", "HuggingFaceTokenizer",
        "--tokenizer-model", str(tokenizer_dir), "--append-eod", "--log-interval", "0", *extra,
    ])


def test_same_bytes_for_any_worker_count_and_round_trip(tokenizer_dir, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(preprocess_data, "CHUNK_LINES", 97)  # many chunks, so ordering is exercised
    _write_corpus(tmp_path / "c.jsonl", [json.dumps({"text": d, "path": str(i)}) for i, d in enumerate(DOCUMENTS)])
    one = _run(tokenizer_dir, tmp_path / "c.jsonl", tmp_path / "w1", "--workers", "1")
    two = _run(tokenizer_dir, tmp_path / "c.jsonl", tmp_path / "w2", "--workers", "2")
    assert one["documents"] == two["documents"] == len(DOCUMENTS) and one["tokens"] == two["tokens"]
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"w1_text_document{suffix}").read_bytes() == (tmp_path / f"w2_text_document{suffix}").read_bytes()
    tokenizer = build_tokenizer("HuggingFaceTokenizer", tokenizer_dir, engine="huggingface")
    dataset = IndexedDataset(tmp_path / "w1_text_document")
    assert dataset.dtype == np.uint16 and len(dataset) == len(DOCUMENTS)
    for i in (0, 1, 2, 3, 2799):
        assert dataset[i].tolist() == tokenizer.encode(DOCUMENTS[i]) + [tokenizer.eod]


def test_problem_lines_are_reported_with_line_numbers(tokenizer_dir, tmp_path, capsys) -> None:
    lines = [json.dumps({"text": "a = 1"}), "{not json", json.dumps({"path": "x.py"}), "",
             json.dumps({"text": 5}), "[1, 2]", json.dumps({"text": "b = 2"})]
    _write_corpus(tmp_path / "bad.jsonl", lines)
    summary = _run(tokenizer_dir, tmp_path / "bad.jsonl", tmp_path / "out")
    assert summary["documents"] == 2 and summary["skipped_lines"] == 4 and summary["blank_lines"] == 1
    errors = capsys.readouterr().err
    for number, text in [(2, "malformed JSON"), (3, "no string field 'text'"), (5, "no string field"), (6, "a JSON array, not an object")]:
        assert f"bad.jsonl:{number}: {text}" in errors
    assert "4 lines skipped" in errors
    with pytest.raises(ValueError, match=r"bad.jsonl:2: malformed JSON.*--strict"):
        _run(tokenizer_dir, tmp_path / "bad.jsonl", tmp_path / "strict", "--strict")
    assert not list(tmp_path.glob("strict*"))  # nothing half-written is left behind


def test_gzip_input_and_several_keys(tokenizer_dir, tmp_path) -> None:
    lines = [json.dumps({"text": d, "path": f"file{i}.py"}) for i, d in enumerate(DOCUMENTS[:50])]
    _write_corpus(tmp_path / "c.jsonl", lines)
    _write_corpus(tmp_path / "c.jsonl.gz", lines)
    _run(tokenizer_dir, tmp_path / "c.jsonl", tmp_path / "plain", "--json-keys", "text", "path")
    _run(tokenizer_dir, tmp_path / "c.jsonl.gz", tmp_path / "zipped", "--json-keys", "text", "path", "--workers", "2")
    for name in ("text", "path"):
        for suffix in (".bin", ".idx"):
            plain = (tmp_path / f"plain_{name}_document{suffix}").read_bytes()
            assert plain == (tmp_path / f"zipped_{name}_document{suffix}").read_bytes()
    assert len(IndexedDataset(tmp_path / "zipped_path_document")) == 50


def test_sentencepiece_workers_identical(tmp_path) -> None:
    from phi1.data.tokenizer_training import main as train

    corpus = tmp_path / "c.jsonl"
    _write_corpus(corpus, [json.dumps({"text": d}) for d in DOCUMENTS[:400]])
    train(["--input", str(corpus), "--output-dir", str(tmp_path / "sp"), "--vocab-size", "300", "--max-space-run", "4"])
    common = ["--input", str(corpus), "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
              str(tmp_path / "sp" / "tokenizer.model"), "--append-eod", "--log-interval", "0"]
    preprocess_data.main(common + ["--output-prefix", str(tmp_path / "a"), "--workers", "1"])
    preprocess_data.main(common + ["--output-prefix", str(tmp_path / "b"), "--workers", "2"])
    assert (tmp_path / "a_text_document.bin").read_bytes() == (tmp_path / "b_text_document.bin").read_bytes()
    assert IndexedDataset(tmp_path / "b_text_document")[0][-1] == 1  # <|endoftext|> is id 1


def test_byte_order_mark_on_the_first_line_is_accepted(tokenizer_dir, tmp_path) -> None:
    corpus = tmp_path / "bom.jsonl"
    corpus.write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": DOCUMENTS[0]}).encode() + b"\n"
                       + json.dumps({"text": DOCUMENTS[2]}).encode() + b"\n")
    summary = _run(tokenizer_dir, corpus, tmp_path / "out")
    assert summary["documents"] == 2 and summary["skipped_lines"] == 0
