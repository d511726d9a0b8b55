"""GPT dataset packing, seeding, caching across ranks, blending and the micro-batch sampler."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from phi1.data.blended_dataset import BlendedDataset
from phi1.data.gpt_dataset import (
    GPTDataset,
    build_gpt_datasets,
    parse_data_path,
    split_document_ranges,
)
from phi1.data.helpers import samples_in_stream
from phi1.data.indexed_dataset import IndexedDataset, IndexedDatasetWriter
from phi1.data.samplers import MicroBatchSampler

EOD = 0


def _make_corpus(prefix, num_documents: int = 120, seed: int = 0, first_token: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    documents = []
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        for number in range(num_documents):
            body = rng.integers(first_token, first_token + 20000, size=int(rng.integers(1, 90)))
            # a document's number as its first token makes order checks readable
            document = np.concatenate([[first_token + number], body, [EOD]]).astype(np.int64)
            documents.append(document)
            writer.add_document(document)
    return documents


def test_one_epoch_of_samples_is_the_document_stream(tmp_path) -> None:
    documents = _make_corpus(tmp_path / "c")
    indexed = IndexedDataset(tmp_path / "c")
    seq_len = 37
    total = sum(len(d) for d in documents)
    num_samples = samples_in_stream(total, seq_len)
    dataset = GPTDataset(indexed, np.arange(len(documents)), seq_len, num_samples, seed=3, cache_dir=tmp_path / "cache")
    assert dataset.document_index.size <= len(documents)  # one epoch is enough
    order = np.random.default_rng([3, 0]).permutation(len(documents))
    stream = np.concatenate([documents[i] for i in order])
    samples = [dataset.unshuffled_sample(i) for i in range(num_samples)]
    assert all(s.shape == (seq_len + 1,) and s.dtype == np.int64 for s in samples)
    packed = np.concatenate([s[:-1] for s in samples] + [samples[-1][-1:]])
    np.testing.assert_array_equal(packed, stream[: packed.size])
    assert packed.size == num_samples * seq_len + 1 > total - seq_len
    # the shuffled view serves every sample exactly once
    served = {tuple(dataset[i]["tokens"]) for i in range(num_samples)}
    assert served == {tuple(s) for s in samples}


def test_several_epochs_and_seeds(tmp_path) -> None:
    documents = _make_corpus(tmp_path / "c", num_documents=20)
    indexed = IndexedDataset(tmp_path / "c")
    total = sum(len(d) for d in documents)
    num_samples = 3 * total // 16
    first = GPTDataset(indexed, np.arange(20), 16, num_samples, seed=1)
    again = GPTDataset(indexed, np.arange(20), 16, num_samples, seed=1, cache_dir=tmp_path / "cache")
    other = GPTDataset(indexed, np.arange(20), 16, num_samples, seed=2)
    assert first.document_index.size > 2 * 20  # it took more than two epochs
    tokens = np.stack([first[i]["tokens"] for i in range(num_samples)])
    np.testing.assert_array_equal(tokens, np.stack([again[i]["tokens"] for i in range(num_samples)]))
    assert not np.array_equal(tokens, np.stack([other[i]["tokens"] for i in range(num_samples)]))
    # every epoch is a permutation of the split's documents
    for epoch in range(2):
        assert sorted(first.document_index[epoch * 20 : (epoch + 1) * 20].tolist()) == list(range(20))


def test_cache_is_reused(tmp_path) -> None:
    _make_corpus(tmp_path / "c")
    indexed = IndexedDataset(tmp_path / "c")
    GPTDataset(indexed, np.arange(100), 32, 50, seed=0, cache_dir=tmp_path / "cache")
    names = sorted(os.listdir(tmp_path / "cache"))
    assert len(names) == 4 and not any(name.startswith(".tmp") for name in names)
    stamps = {n: os.stat(tmp_path / "cache" / n).st_mtime_ns for n in names}
    dataset = GPTDataset(indexed, np.arange(100), 32, 50, seed=0, cache_dir=tmp_path / "cache")
    assert {n: os.stat(tmp_path / "cache" / n).st_mtime_ns for n in names} == stamps
    assert isinstance(dataset.sample_index, np.memmap)
    GPTDataset(indexed, np.arange(100), 32, 51, seed=0, cache_dir=tmp_path / "cache")
    assert len(os.listdir(tmp_path / "cache")) == 8  # a different sample count is a different key


def _tamper_shuffle_range(path) -> None:
    array = np.load(path)
    array[3] = 10**9
    np.save(path, array)


def _tamper_shape(path) -> None:
    np.save(path, np.load(path)[:-1])


def _tamper_garbage(path) -> None:
    with open(path, "wb") as handle:
        handle.write(b"\x93NUMPY garbage that is not an array")


def _tamper_sample_offsets(path) -> None:
    array = np.load(path)
    array[5, 1] = 10**6
    np.save(path, array)


@pytest.mark.parametrize("name, tamper, words", [
    ("shuffle_index", _tamper_shuffle_range, "sample numbers out of range"),
    ("shuffle_index", _tamper_shape, "shape"),
    ("document_index", _tamper_garbage, "unreadable index cache"),
    ("sample_index", _tamper_sample_offsets, "offsets beyond their documents"),
])
def test_damaged_index_cache_is_refused_naming_the_file(tmp_path, name, tamper, words) -> None:
    _make_corpus(tmp_path / "c")
    indexed = IndexedDataset(tmp_path / "c")
    GPTDataset(indexed, np.arange(100), 32, 50, seed=0, cache_dir=tmp_path / "cache")
    path = next(p for p in (tmp_path / "cache").iterdir() if p.name.endswith(f"-{name}.npy"))
    tamper(path)
    with pytest.raises(ValueError, match=words) as raised:
        GPTDataset(indexed, np.arange(100), 32, 50, seed=0, cache_dir=tmp_path / "cache")
    assert str(path) in str(raised.value)


def _rank_main(rank: int, world_size: int, prefix: str, cache_dir: str, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        train, valid, _ = build_gpt_datasets(prefix, "90,10,0", 24, (200, 20, 0), seed=7, cache_dir=cache_dir)
        tokens = np.stack([train[i]["tokens"] for i in range(len(train))] + [valid[i]["tokens"] for i in range(20)])
        np.save(os.path.join(out_dir, f"rank{rank}.npy"), tokens)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_same_samples_on_every_rank_count(tmp_path) -> None:
    _make_corpus(tmp_path / "c")
    single_train, single_valid, _ = build_gpt_datasets(
        str(tmp_path / "c"), "90,10,0", 24, (200, 20, 0), seed=7, cache_dir=tmp_path / "cache1"
    )
    expected = np.stack(
        [single_train[i]["tokens"] for i in range(200)] + [single_valid[i]["tokens"] for i in range(20)]
    )
    port = 29500 + os.getpid() % 1000
    mp.spawn(_rank_main, args=(2, str(tmp_path / "c"), str(tmp_path / "cache2"), port, str(tmp_path)), nprocs=2)
    for rank in range(2):
        np.testing.assert_array_equal(np.load(tmp_path / f"rank{rank}.npy"), expected)
    assert sorted(os.listdir(tmp_path / "cache1")) == sorted(os.listdir(tmp_path / "cache2"))


def test_split_by_documents() -> None:
    assert split_document_ranges(1000, "969,30,1") == [(0, 969), (969, 999), (999, 1000)]
    assert split_document_ranges(10, "1") == [(0, 10), (10, 10), (10, 10)]
    with pytest.raises(ValueError, match="split"):
        split_document_ranges(10, "1,-1")


def test_train_and_valid_use_disjoint_documents(tmp_path) -> None:
    _make_corpus(tmp_path / "c", num_documents=100)
    train, valid, test = build_gpt_datasets(str(tmp_path / "c"), "80,20,0", 16, (50, 10, 0), seed=0)
    assert test is None
    assert set(train.document_index.tolist()) <= set(range(80))
    assert set(valid.document_index.tolist()) <= set(range(80, 100))


def test_blended_datasets_exact_proportions(tmp_path) -> None:
    _make_corpus(tmp_path / "a", seed=1, first_token=1)
    _make_corpus(tmp_path / "b", seed=2, first_token=40000)
    prefixes, weights = parse_data_path(f"0.8 {tmp_path / 'a'} 0.2 {tmp_path / 'b'}")
    assert weights == pytest.approx([0.8, 0.2])
    train, _, _ = build_gpt_datasets(f"0.8 {tmp_path / 'a'} 0.2 {tmp_path / 'b'}", "1", 16, (500, 0, 0), seed=0)
    assert isinstance(train, BlendedDataset) and len(train) == 500
    from_b = [train[i]["tokens"].max() >= 40000 for i in range(500)]
    assert sum(from_b) == 100
    assert all(train[i]["dataset_id"] == int(from_b[i]) for i in range(500))
    for n in (10, 55, 333):
        assert abs(sum(from_b[:n]) - 0.2 * n) <= 1


def test_micro_batch_sampler_resumes() -> None:
    def batches(consumed: int, rank: int) -> list[list[int]]:
        return list(MicroBatchSampler(40, consumed, 3, rank, 2))

    assert batches(0, 0)[:2] == [[0, 1, 2], [6, 7, 8]]
    assert batches(0, 1)[:2] == [[3, 4, 5], [9, 10, 11]]
    assert batches(12, 0) == batches(0, 0)[2:]  # resuming after two global micro-batches
    assert len(batches(0, 1)) == len(MicroBatchSampler(40, 0, 3, 1, 2)) == 6
    every = sorted(i for rank in range(2) for batch in batches(0, rank) for i in batch)
    assert every == list(range(36))
    assert list(MicroBatchSampler(40, 36, 3, 0, 2, drop_last=False)) == [[36, 37, 38]]
    assert list(MicroBatchSampler(40, 36, 3, 1, 2, drop_last=False)) == [[39]]
    with pytest.raises(ValueError):
        MicroBatchSampler(40, 40, 3, 0, 2)


@pytest.mark.parametrize("split", ["nan,1,1", "inf,1", "1,,2", "a,b", "", "1,2,3,4", "0,0,0", "-1,2"])
def test_bad_split_names_the_option(split) -> None:
    from phi1.data.gpt_dataset import parse_split

    with pytest.raises(ValueError, match="data.split"):
        parse_split(split)


@pytest.mark.parametrize("path", ["nan a 1 b", "inf a 1 b", "0 a 1 b", "x a 1 b", "1 a 2"])
def test_bad_blend_weights_name_the_option(path) -> None:
    with pytest.raises(ValueError, match="data.path"):
        parse_data_path(path)


def test_huge_blend_weights_do_not_overflow() -> None:
    assert parse_data_path("1e308 a 1e308 b") == (["a", "b"], [0.5, 0.5])
