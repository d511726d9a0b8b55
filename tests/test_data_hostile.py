"""Hostile data inputs, run as the user runs them: tools/preprocess_data.py on bad corpora, and `python -m
phi1.train` on bad datasets. Each case runs the real command bounded in time and memory
(phi1.testing.hostile.run_bounded) and must end in exit 2 with one line naming the file (and line), no
traceback; bad lines inside a corpus are reported by file:line while the good ones are written."""

from __future__ import annotations

import gzip
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from phi1.data.indexed_dataset import HEADER_BYTES, IndexedDataset, IndexedDatasetWriter
from phi1.data.tokenizers import build_tokenizer
from phi1.testing.hostile import assert_clear_error, python, run_bounded
from phi1.testing.synthetic import write_synthetic_dataset, write_word_tokenizer

GOOD = [json.dumps({"text": "w1 w2 w3"}), json.dumps({"text": "w4 w5"})]
# preprocess_data.py imports numpy and the tokenizer libraries, not torch: 768 MiB of address space is plenty,
# and a command that tried to hold a 40 MB line or a whole huge input would be killed.
PREPROCESS_MEMORY_MB = 768
TRAIN_MEMORY_MB = 4096


@pytest.fixture(scope="module")
def word_tokenizer(tmp_path_factory) -> Path:
    return write_word_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json")


def _preprocess(input_path: Path, prefix: Path, tokenizer: Path, *extra: str, memory_mb: int = PREPROCESS_MEMORY_MB):
    return run_bounded(python("tools/preprocess_data.py", "--input", str(input_path), "--output-prefix", str(prefix),
                              "--tokenizer-model", str(tokenizer), "--append-eod", "--log-interval", "0", *extra),
                       timeout_s=120, memory_mb=memory_mb)


def _gzip_truncated(path: Path) -> Path:
    raw = gzip.compress(("\n".join(GOOD * 400) + "\n").encode())
    path.write_bytes(raw[: len(raw) // 2])
    return path


# name -> (make the input in tmp_path, extra arguments, words the message must hold besides the file name)
FATAL_CASES = {
    "empty_file": (lambda d: _write(d / "empty.jsonl", b""), [], "nothing was written"),
    "only_blank_lines": (lambda d: _write(d / "blank.jsonl", b"\n\n  \n"), [], "nothing was written"),
    "every_line_skipped": (lambda d: _write(d / "bad.jsonl", b"{bad\n[1]\n{\"x\": 1}\n"), [], "nothing was written"),
    "truncated_gzip": (lambda d: _gzip_truncated(d / "cut.jsonl.gz"), [], "last complete line"),
    "not_gzip": (lambda d: _write(d / "plain.jsonl.gz", b'{"text": "w1"}\n'), [], "not gzip"),
    "fifo_input": (lambda d: _fifo(d / "pipe.jsonl"), [], "named pipe"),
    "directory_input": (lambda d: _mkdir(d / "folder.jsonl"), [], "directory"),
    "missing_input": (lambda d: d / "absent.jsonl", [], "no such file"),
    "strict_stops_at_bad_line": (lambda d: _write(d / "strict.jsonl", (GOOD[0] + "\n{oops\n").encode()),
                                 ["--strict"], ":2: malformed JSON"),
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


@pytest.mark.parametrize("case", sorted(FATAL_CASES))
def test_preprocess_refuses_input_with_one_line(case, word_tokenizer, tmp_path) -> None:
    make, extra, words = FATAL_CASES[case]
    bad = make(tmp_path)
    outcome = _preprocess(bad, tmp_path / "out", word_tokenizer, *extra)
    assert_clear_error(outcome, names=str(bad))
    assert words in outcome.stderr
    assert not list(tmp_path.glob("out*")), "a failed run left output files behind"


def test_preprocess_dev_zero_input_does_not_hang(word_tokenizer, tmp_path) -> None:
    outcome = _preprocess(Path("/dev/zero"), tmp_path / "out", word_tokenizer)
    assert_clear_error(outcome, names="/dev/zero")


@pytest.mark.parametrize("tokenizer_case", ["garbage_model", "json_list", "missing"])
def test_preprocess_bad_tokenizer_names_it(tokenizer_case, tmp_path) -> None:
    corpus = _write(tmp_path / "c.jsonl", ("\n".join(GOOD) + "\n").encode())
    tokenizer = {"garbage_model": _write(tmp_path / "tok.model", os.urandom(2000)),
                 "json_list": _write(tmp_path / "tokenizer.json", b"[1, 2]"),
                 "missing": tmp_path / "nothing.model"}[tokenizer_case]
    outcome = _preprocess(corpus, tmp_path / "out", tokenizer)
    assert_clear_error(outcome, names=str(tokenizer))


@pytest.mark.parametrize("options, named", [
    (["--json-keys", "../outside"], "--json-keys"),
    (["--json-keys", "text", "text"], "--json-keys"),
    (["--workers", "0"], "--workers"),
    (["--workers", "100000"], "--workers"),
    (["--max-document-chars", "0"], "--max-document-chars"),
])
def test_preprocess_bad_option_names_it(options, named, word_tokenizer, tmp_path) -> None:
    corpus = _write(tmp_path / "c.jsonl", ("\n".join(GOOD) + "\n").encode())
    outcome = _preprocess(corpus, tmp_path / "sub" / "out", word_tokenizer, *options)
    assert_clear_error(outcome, names=named)
    assert not (tmp_path / "outside_document.bin").exists() and not list(tmp_path.glob("sub/*"))


# name -> (the bad line, as bytes; words of its report)
BAD_LINES = {
    "not_utf8": (b'{"text": "caf\xe9 w1"}', "not UTF-8"),
    "lone_surrogate": (b'{"text": "w1 \\ud800 w2"}', "lone surrogate"),
    "too_long": (json.dumps({"text": "w1 " * 400}).encode(), "longer than --max-document-chars"),
    "line_too_long_to_read": (json.dumps({"text": "w1 " * 40000}).encode(), "skipped unread"),
    "not_an_object": (b'["w1", "w2"]', "not an object"),
    "missing_key": (b'{"content": "w1"}', "no string field 'text'"),
    "key_not_string": (b'{"text": 7}', "holds a JSON number"),
    "key_null": (b'{"text": null}', "holds a JSON null"),
    "malformed_json": (b'{"text": "w1', "malformed JSON"),
    "deeply_nested": (b"[" * 500 + b"]" * 500, "not an object"),
    "very_deeply_nested": (b"[" * 200000 + b"]" * 200000, "malformed JSON"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
@pytest.mark.parametrize("workers", ["1", "2"])
def test_bad_line_is_reported_by_file_and_line_and_the_rest_written(case, workers, word_tokenizer, tmp_path) -> None:
    line, words = BAD_LINES[case]
    corpus = _write(tmp_path / "c.jsonl", GOOD[0].encode() + b"\n" + line + b"\n" + GOOD[1].encode() + b"\n")
    limit = ["--max-document-chars", "1000"] if case in ("too_long", "line_too_long_to_read") else []
    outcome = _preprocess(corpus, tmp_path / "out", word_tokenizer, "--workers", workers, *limit)
    assert outcome.returncode == 0 and not outcome.timed_out, outcome.describe()
    assert "Traceback" not in outcome.stderr
    report = next((text for text in outcome.stderr.splitlines() if f"{corpus}:2:" in text), None)
    assert report is not None and words in report, outcome.describe()
    assert "1 lines skipped" in outcome.stderr
    tokenizer = build_tokenizer("HuggingFaceTokenizer", word_tokenizer)
    dataset = IndexedDataset(tmp_path / "out_text_document")
    assert [dataset[i].tolist() for i in range(len(dataset))] == [
        tokenizer.encode("w1 w2 w3") + [tokenizer.eod], tokenizer.encode("w4 w5") + [tokenizer.eod]]


def test_default_document_limit_bounds_memory(word_tokenizer, tmp_path) -> None:
    """A 45 MB line is skipped unread and a document at the default limit (1M characters) is encoded, both
    inside 768 MiB of address space (which includes the libraries' own mappings)."""
    corpus = tmp_path / "c.jsonl"
    with open(corpus, "w", encoding="utf-8") as handle:
        handle.write(GOOD[0] + "\n")
        handle.write(json.dumps({"text": "w4 " * 15_000_000}) + "\n")
        handle.write(json.dumps({"text": ("w5 " * 333_333)[:1_000_000]}) + "\n")
    for workers in ("1", "2"):
        outcome = _preprocess(corpus, tmp_path / f"out{workers}", word_tokenizer, "--workers", workers)
        assert outcome.returncode == 0, outcome.describe()
        assert f"{corpus}:2: a line of 45000013 bytes" in outcome.stderr
        dataset = IndexedDataset(tmp_path / f"out{workers}_text_document")
        assert len(dataset) == 2 and len(dataset[1]) == 333_334  # 333,333 words + eod


def test_preprocess_infers_tokenizer_type_and_writes_sidecar(word_tokenizer, tmp_path) -> None:
    corpus = _write(tmp_path / "c.jsonl", ("\n".join(GOOD) + "\n").encode())
    outcome = _preprocess(corpus, tmp_path / "out", word_tokenizer)  # no --tokenizer-type
    assert outcome.returncode == 0, outcome.describe()
    sidecar = json.loads((tmp_path / "out_text_document.json").read_text())
    assert sidecar["tokenizer"]["type"] == "HuggingFaceTokenizer"
    assert sidecar["tokenizer"]["vocab_size"] == 102 and sidecar["tokenizer"]["eod"] == 0
    assert sidecar["documents"] == 2 and sidecar["tokens"] == 7 and sidecar["format_version"] == 1
    assert sidecar["command"][:2] == ["tools/preprocess_data.py", "--input"]
    import hashlib

    assert sidecar["tokenizer"]["files"] == {"tokenizer.json": hashlib.sha256(word_tokenizer.read_bytes()).hexdigest()}


# ---------------------------------------------------------------------------------------------------------------
# Training on bad datasets: `python -m phi1.train ... data.path=BAD`


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> tuple[str, str]:
    return write_synthetic_dataset(tmp_path_factory.mktemp("data"), num_documents=60)


def _train(tmp_path: Path, prefix: str, tokenizer: str):
    overrides = {
        "model.preset": "phi-1-nano", "data.path": prefix, "data.tokenizer_model": tokenizer, "data.seq_len": 32,
        "data.split": "100,0,0", "batch.global_batch_size": 4, "batch.micro_batch_size": 2,
        "schedule.train_steps": 2, "schedule.warmup_steps": 1, "checkpoint.dir": tmp_path / "run",
        "checkpoint.interval": 0, "eval.interval": 0, "logging.tensorboard_dir": "", "logging.interval": 1,
    }
    return run_bounded(python("-m", "phi1.train", *(f"{k}={v}" for k, v in overrides.items())),
                       timeout_s=240, memory_mb=TRAIN_MEMORY_MB)


def _copy_dataset(prefix: str, target: Path) -> str:
    target.parent.mkdir(parents=True, exist_ok=True)
    for suffix in (".bin", ".idx"):
        Path(f"{target}{suffix}").write_bytes(Path(f"{prefix}{suffix}").read_bytes())
    return str(target)


def _patch(path: str, offset: int, data: bytes) -> None:
    raw = bytearray(Path(path).read_bytes())
    raw[offset : offset + len(data)] = data
    Path(path).write_bytes(bytes(raw))


def _out_of_vocabulary(source: str, directory: Path) -> tuple[str, str]:
    prefix = str(directory / "oov")
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        for index in range(60):
            writer.add_document(np.arange(index, index + 30) % 100 + 2)
        writer.add_document([5, 6, 40000, 7])  # far beyond the 102-word vocabulary
    return prefix, f"{prefix}.bin"


def _absurd_documents(source: str, directory: Path) -> tuple[str, str]:
    """A header promising 2^40 documents, with the file extended (sparse) to the size that count implies."""
    prefix = _copy_dataset(source, directory / "absurd")
    sequences = len(IndexedDataset(source))
    _patch(prefix + ".idx", 26, struct.pack("<Q", 1 << 40))
    os.truncate(prefix + ".idx", HEADER_BYTES + sequences * 12 + (1 << 40) * 8)
    return prefix, prefix + ".idx"


def _absurd_sequences(source: str, directory: Path) -> tuple[str, str]:
    prefix = _copy_dataset(source, directory / "sequences")
    _patch(prefix + ".idx", 18, struct.pack("<Q", 1 << 38))
    os.truncate(prefix + ".idx", HEADER_BYTES + (1 << 38) * 12 + 61 * 8)
    return prefix, prefix + ".idx"


def _mutated(name: str, offset: int, data: bytes):
    def make(source: str, directory: Path) -> tuple[str, str]:
        prefix = _copy_dataset(source, directory / name)
        _patch(prefix + ".idx", offset, data)
        return prefix, prefix + ".idx"
    return make


def _truncated_header(source: str, directory: Path) -> tuple[str, str]:
    prefix = _copy_dataset(source, directory / "short")
    Path(prefix + ".idx").write_bytes(Path(prefix + ".idx").read_bytes()[:20])
    return prefix, prefix + ".idx"


def _fifo_files(source: str, directory: Path) -> tuple[str, str]:
    directory.mkdir(parents=True)
    prefix = str(directory / "pipes")
    os.mkfifo(prefix + ".idx")
    os.mkfifo(prefix + ".bin")
    return prefix, prefix


def _foreign_sidecar(source: str, directory: Path) -> tuple[str, str]:
    """The data says it was made with another tokenizer (different vocabulary) than training uses."""
    from phi1.data.sidecar import write_sidecar

    prefix = _copy_dataset(source, directory / "foreign")
    other = build_tokenizer("HuggingFaceTokenizer", write_word_tokenizer(directory / "other" / "tokenizer.json", 300))
    write_sidecar(prefix, other, command=["tools/preprocess_data.py"], append_eod=True)
    return prefix, prefix + ".json"


def _garbage_sidecar(source: str, directory: Path) -> tuple[str, str]:
    prefix = _copy_dataset(source, directory / "garbage")
    Path(prefix + ".json").write_bytes(b"\xff\x00 not json")
    return prefix, prefix + ".json"


# name -> make(source prefix, directory) -> (data.path, file the message must name); words it must hold
TRAIN_CASES = {
    "tokens_beyond_vocabulary": (_out_of_vocabulary, "outside the vocabulary"),
    "idx_2_to_the_40_documents": (_absurd_documents, "absurd"),
    "idx_2_to_the_38_sequences": (_absurd_sequences, "absurd"),
    "idx_wrong_magic": (_mutated("magic", 0, b"NOTANIDX\x00"), "preprocess_data.py"),
    "idx_version_2": (_mutated("version", 9, struct.pack("<Q", 2)), "preprocess_data.py"),
    "idx_truncated_header": (_truncated_header, "preprocess_data.py"),
    "prefix_files_are_fifos": (_fifo_files, "pipes"),
    "sidecar_of_another_tokenizer": (_foreign_sidecar, "another tokenizer"),
    "sidecar_not_json": (_garbage_sidecar, "sidecar"),
}


@pytest.mark.parametrize("case", sorted(TRAIN_CASES))
def test_training_refuses_bad_dataset(case, synthetic, tmp_path) -> None:
    source, tokenizer = synthetic
    make, words = TRAIN_CASES[case]
    prefix, named = make(source, tmp_path / "bad")
    outcome = _train(tmp_path, prefix, tokenizer)
    assert_clear_error(outcome, names=named)
    assert words in outcome.stderr, outcome.describe()
    assert not (tmp_path / "run" / "latest").exists()  # training did not go on


@pytest.mark.slow
def test_training_accepts_preprocessed_data_with_its_sidecar(synthetic, word_tokenizer, tmp_path) -> None:
    """The positive control: data from preprocess_data.py (with its sidecar) trains with the same tokenizer."""
    corpus = tmp_path / "c.jsonl"
    rng = np.random.default_rng(0)
    corpus.write_text("".join(json.dumps({"text": " ".join(f"w{int(w)}" for w in rng.integers(0, 100, 40))}) + "\n"
                              for _ in range(40)))
    copied = tmp_path / "tok" / "tokenizer.json"  # another path, same bytes: accepted
    copied.parent.mkdir()
    copied.write_bytes(word_tokenizer.read_bytes())
    assert _preprocess(corpus, tmp_path / "data", word_tokenizer).returncode == 0
    outcome = _train(tmp_path, str(tmp_path / "data_text_document"), str(copied))
    assert outcome.returncode == 0, outcome.describe()
    assert (tmp_path / "run" / "latest").exists()
