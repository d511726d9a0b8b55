"""The tokenizer sidecar (PREFIX.json) and the out-of-vocabulary checks, in process: what is accepted (same
tokenizer, same ids from other files, Megatron data without a sidecar), what is refused, and that the bounded
open-time scan plus the per-sample check leave no out-of-vocabulary id unseen."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import numpy as np
import pytest

from phi1.data import check_dataset_tokenizer
from phi1.data.gpt_dataset import build_gpt_datasets
from phi1.data.indexed_dataset import IndexedDataset, IndexedDatasetWriter
from phi1.data.sidecar import read_sidecar, write_sidecar
from phi1.data.tokenizers import build_tokenizer
from phi1.testing.synthetic import write_word_tokenizer


def _dataset(prefix: Path, documents: list[list[int]], dtype=np.uint16) -> str:
    with IndexedDatasetWriter(prefix, dtype) as writer:
        for document in documents:
            writer.add_document(document)
    return str(prefix)


def _counting(count: int = 40) -> list[list[int]]:
    return [[(start + i) % 100 + 2 for i in range(20)] + [0] for start in range(count)]


@pytest.fixture()
def words(tmp_path) -> tuple:
    path = write_word_tokenizer(tmp_path / "words" / "tokenizer.json")
    return path, build_tokenizer("HuggingFaceTokenizer", path)


def test_same_tokenizer_accepted_and_other_refused(words, tmp_path) -> None:
    path, tokenizer = words
    prefix = _dataset(tmp_path / "data", _counting())
    assert check_dataset_tokenizer(prefix, tokenizer, path) is None  # no sidecar: Megatron data, accepted
    write_sidecar(prefix, tokenizer, command=["tools/preprocess_data.py"], append_eod=True)
    assert check_dataset_tokenizer(prefix, tokenizer, path)["tokenizer"]["vocab_size"] == 102
    other_path = write_word_tokenizer(tmp_path / "other" / "tokenizer.json", 300)
    other = build_tokenizer("HuggingFaceTokenizer", other_path)
    with pytest.raises(ValueError) as raised:
        check_dataset_tokenizer(prefix, other, other_path)
    message = str(raised.value)
    assert f"{prefix}.json" in message and str(other_path) in message and str(path) in message
    assert "vocabulary size 102 vs 302" in message


def test_same_vocabulary_size_but_other_ids_refused(tmp_path) -> None:
    """A re-trained tokenizer of the same size gives other ids: the probe text tells them apart."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    def word_level(path: Path, order: list[str]) -> Path:
        vocab = {"<|endoftext|>": 0, "[UNK]": 1, **{word: i + 2 for i, word in enumerate(order)}}
        tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
        tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        path.parent.mkdir(parents=True)
        tokenizer.save(str(path))
        return path

    letters = ["def", "return", "if", "pass", "x"]
    first = build_tokenizer("HuggingFaceTokenizer", word_level(tmp_path / "a" / "tokenizer.json", letters))
    second_path = word_level(tmp_path / "b" / "tokenizer.json", letters[::-1])
    second = build_tokenizer("HuggingFaceTokenizer", second_path)
    prefix = _dataset(tmp_path / "data", [[2, 3, 4, 0]])
    write_sidecar(prefix, first, command=["x"], append_eod=True)
    with pytest.raises(ValueError, match="different ids for the same text"):
        check_dataset_tokenizer(prefix, second, second_path)


def test_other_files_with_identical_ids_accepted(tmp_path) -> None:
    """codegen-style: the same BPE as tokenizer.json and as vocab.json + merges.txt hashes differently, same ids."""
    from phi1.data.tokenizer_training import main as train

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i}\n"}) + "\n" for i in range(200)))
    train(["--type", "bpe-bytelevel", "--input", str(corpus), "--output-dir", str(tmp_path / "bbpe"),
           "--vocab-size", "400"])
    from_json = build_tokenizer("HuggingFaceTokenizer", tmp_path / "bbpe")
    from_files = build_tokenizer("GPT2BPETokenizer", tmp_path / "bbpe")
    prefix = _dataset(tmp_path / "data", [[1, 2, 3]])
    write_sidecar(prefix, from_json, command=["x"], append_eod=True)
    assert check_dataset_tokenizer(prefix, from_files, tmp_path / "bbpe") is not None


@pytest.mark.parametrize("content, words", [
    (b"\xff not json", "not a readable tokenizer sidecar"),
    (b'{"format": "something-else"}', "not a phi1 tokenizer sidecar"),
    (b'{"format": "phi1-dataset-tokenizer", "format_version": 9}', "format_version 9"),
    (b'{"format": "phi1-dataset-tokenizer", "format_version": 1, "tokenizer": {"type": 3}}', "lacks"),
    (b"[" * 100000 + b"]" * 100000, "not a readable tokenizer sidecar"),
])
def test_malformed_sidecar_named(content, words, tmp_path) -> None:
    prefix = _dataset(tmp_path / "data", [[1, 2]])
    Path(prefix + ".json").write_bytes(content)
    with pytest.raises(ValueError, match=words) as raised:
        read_sidecar(prefix)
    assert f"{prefix}.json" in str(raised.value)


def test_bounded_scan_and_per_sample_check(words, tmp_path) -> None:
    path, tokenizer = words
    documents = _counting(2000)
    documents[1500][3] = 777  # beyond the 102-word vocabulary, late in the file
    prefix = _dataset(tmp_path / "data", documents)
    dataset = IndexedDataset(prefix)
    with pytest.raises(ValueError, match=r"data\.bin: token id 777 in sequence 1500 .* outside the vocabulary"):
        dataset.check_token_range(tokenizer.vocab_size, str(path))
    # With a budget of two 64-byte chunks only the first and last chunk are read: the id is not seen there...
    report = dataset.check_token_range(tokenizer.vocab_size, str(path), scan_bytes=128, chunk_bytes=64)
    assert 64 < report["bytes_checked"] <= 128 and not report["whole_file"] and report["max_id"] < 102
    # ...but the sample that holds it refuses to be served, naming the file.
    from phi1.data.gpt_dataset import GPTDataset

    samples = GPTDataset(dataset, np.arange(len(dataset)), 32, 1300, seed=0, vocab_size=tokenizer.vocab_size)
    with pytest.raises(ValueError, match=r"data\.bin: token id 777"):
        for index in range(len(samples)):
            samples[index]


def test_signed_dtype_negative_ids_refused(tmp_path) -> None:
    prefix = _dataset(tmp_path / "data", [[1, 2, -5, 3]], dtype=np.int32)
    with pytest.raises(ValueError, match="token id -5"):
        IndexedDataset(prefix).check_token_range(100)


def test_build_gpt_datasets_checks_with_the_tokenizer(words, tmp_path) -> None:
    path, tokenizer = words
    good = _dataset(tmp_path / "good", _counting())
    write_sidecar(good, tokenizer, command=["x"], append_eod=True)
    train, _, _ = build_gpt_datasets(good, "100,0,0", 16, (10, 0, 0), 0, tmp_path / "cache", tokenizer, path)
    assert max(int(train[i]["tokens"].max()) for i in range(10)) < 102
    bad = _dataset(tmp_path / "bad", _counting() + [[4, 500]])
    with pytest.raises(ValueError, match="bad.bin: token id 500"):
        build_gpt_datasets(bad, "100,0,0", 16, (10, 0, 0), 0, tmp_path / "cache", tokenizer, path)


def test_absurd_counts_refused_before_mapping(tmp_path) -> None:
    import os

    prefix = _dataset(tmp_path / "data", _counting(10))
    raw = bytearray(Path(prefix + ".idx").read_bytes())
    raw[26:34] = struct.pack("<Q", 1 << 40)
    Path(prefix + ".idx").write_bytes(bytes(raw))
    os.truncate(prefix + ".idx", 34 + 10 * 12 + (1 << 40) * 8)  # sparse: consistent size, nothing stored
    started = time.perf_counter()
    with pytest.raises(ValueError, match=r"1099511627776 document indices, absurd for .*data\.bin with 210 tokens"):
        IndexedDataset(prefix)
    assert time.perf_counter() - started < 5


def test_empty_sequences_within_allowance_still_load(tmp_path) -> None:
    """Empty documents (written without --append-eod) are legal: a dataset of mostly empty ones still opens."""
    prefix = _dataset(tmp_path / "data", [[]] * 5000 + [[3, 4]])
    dataset = IndexedDataset(prefix)
    assert len(dataset) == 5001 and dataset.num_tokens == 2


def test_absurd_epoch_count_refused_at_once(tmp_path) -> None:
    """A paper-length schedule on a 3-token corpus would build billions of permutations; it is refused at once."""
    from phi1.data.gpt_dataset import GPTDataset

    dataset = IndexedDataset(_dataset(tmp_path / "tiny", [[1, 2, 3]]))
    started = time.perf_counter()
    with pytest.raises(ValueError, match=r"tiny: the train split holds 3 tokens; .* need 682666667 passes"):
        GPTDataset(dataset, np.arange(1), 2048, 1_000_000, seed=0)
    assert time.perf_counter() - started < 1
