"""Indexed dataset: round trip, Megatron interop, errors at open time, merging."""

from __future__ import annotations

import struct
import warnings

import numpy as np
import pytest

from phi1.data.indexed_dataset import (
    HEADER_BYTES,
    IndexedDataset,
    IndexedDatasetWriter,
    merge_datasets,
)


def _random_documents(count: int, seed: int = 0, vocab: int = 50000) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=int(rng.integers(0, 300))).astype(np.int64) for _ in range(count)]


def _write(prefix, documents, dtype=np.uint16) -> None:
    with IndexedDatasetWriter(prefix, dtype) as writer:
        for document in documents:
            writer.add_document(document)


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_round_trip(tmp_path, dtype) -> None:
    documents = _random_documents(200)
    prefix = tmp_path / "corpus"
    _write(prefix, documents, dtype)
    dataset = IndexedDataset(prefix)
    assert len(dataset) == len(documents) == dataset.num_documents
    assert dataset.dtype == np.dtype(dtype)
    for i, document in enumerate(documents):
        np.testing.assert_array_equal(dataset[i], document)
    assert dataset.num_tokens == sum(len(d) for d in documents)
    np.testing.assert_array_equal(dataset.get(3, 2, 5), documents[3][2:7])


def test_bulk_add_matches_one_by_one(tmp_path) -> None:
    documents = _random_documents(50, seed=1)
    _write(tmp_path / "one", documents)
    with IndexedDatasetWriter(tmp_path / "bulk", np.uint16) as writer:
        writer.add_documents(np.concatenate(documents[:20]), [len(d) for d in documents[:20]])
        writer.add_documents(np.concatenate(documents[20:]), [len(d) for d in documents[20:]])
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"one{suffix}").read_bytes() == (tmp_path / f"bulk{suffix}").read_bytes()


def test_multi_sequence_documents(tmp_path) -> None:
    prefix = tmp_path / "sentences"
    with IndexedDatasetWriter(prefix, np.int32) as writer:
        writer.add_document([1, 2, 3, 4, 5], sequence_lengths=[2, 3])
        writer.add_document([6], sequence_lengths=[1])
    dataset = IndexedDataset(prefix)
    assert len(dataset) == 3 and dataset.num_documents == 2
    np.testing.assert_array_equal(dataset.document_indices, [0, 2, 3])
    np.testing.assert_array_equal(dataset[1], [3, 4, 5])


def test_merge(tmp_path) -> None:
    first, second = _random_documents(30, seed=2), _random_documents(20, seed=3)
    _write(tmp_path / "a", first)
    _write(tmp_path / "b", second)
    _write(tmp_path / "all", first + second)
    merge_datasets([tmp_path / "a", tmp_path / "b"], tmp_path / "merged")
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"merged{suffix}").read_bytes() == (tmp_path / f"all{suffix}").read_bytes()


def _megatron():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            from megatron.core.datasets import indexed_dataset as megatron_indexed
        except Exception as error:  # noqa: BLE001 - any import failure means "not available here"
            pytest.skip(f"megatron-core is not importable: {error}")
    return megatron_indexed


def test_megatron_reads_ours(tmp_path) -> None:
    megatron_indexed = _megatron()
    documents = _random_documents(100, seed=4)
    _write(tmp_path / "ours", documents)
    theirs = megatron_indexed.IndexedDataset(str(tmp_path / "ours"))
    assert len(theirs) == len(documents)
    for i, document in enumerate(documents):
        np.testing.assert_array_equal(theirs[i], document)


def test_we_read_megatrons(tmp_path) -> None:
    megatron_indexed = _megatron()
    documents = _random_documents(100, seed=5)
    prefix = str(tmp_path / "theirs")
    builder = megatron_indexed.IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for document in documents:
        builder.add_document(document, [len(document)])
    builder.finalize(prefix + ".idx")
    ours = IndexedDataset(prefix)
    for i, document in enumerate(documents):
        np.testing.assert_array_equal(ours[i], document)
    _write(tmp_path / "ours", documents)
    assert (tmp_path / "ours.idx").read_bytes() == (tmp_path / "theirs.idx").read_bytes()
    assert (tmp_path / "ours.bin").read_bytes() == (tmp_path / "theirs.bin").read_bytes()


def _patch(path, offset: int, data: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(data)] = data
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    "damage, message",
    [
        ("truncate_bin", "corpus.bin: truncated"),
        ("magic", "corpus.idx: magic"),
        ("version", "corpus.idx: header says version 2, this reader knows version 1; re-run tools/preprocess_data.py"),
        ("dtype", "corpus.idx: dtype code 42"),
        ("size_past_end", "corpus.bin: truncated or wrong index: sequence 9"),
        ("pointer_past_end", "corpus.bin: truncated or wrong index: sequence 0"),
        ("truncate_idx", "corpus.idx: truncated"),
    ],
)
def test_damaged_files_fail_at_open(tmp_path, damage, message) -> None:
    prefix = tmp_path / "corpus"
    _write(prefix, [np.arange(10 + i) for i in range(10)])
    bin_path, idx_path = tmp_path / "corpus.bin", tmp_path / "corpus.idx"
    if damage == "truncate_bin":
        bin_path.write_bytes(bin_path.read_bytes()[:-7])
    elif damage == "magic":
        _patch(idx_path, 0, b"NOTMAGIC\x00")
    elif damage == "version":
        _patch(idx_path, 9, struct.pack("<Q", 2))
    elif damage == "dtype":
        _patch(idx_path, 17, bytes([42]))
    elif damage == "size_past_end":
        _patch(idx_path, HEADER_BYTES + 9 * 4, struct.pack("<i", 10_000))
    elif damage == "pointer_past_end":
        _patch(idx_path, HEADER_BYTES + 10 * 4, struct.pack("<q", 1 << 40))
    elif damage == "truncate_idx":
        idx_path.write_bytes(idx_path.read_bytes()[:-3])
    with pytest.raises(ValueError) as error:
        IndexedDataset(prefix)
    assert message in str(error.value)


def test_missing_file_names_it(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="nothing.idx"):
        IndexedDataset(tmp_path / "nothing")
