"""The compiled index builders equal their NumPy references, including past 2^31."""

from __future__ import annotations

import numpy as np
import pytest

from phi1.data import helpers


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("add_extra_token", [True, False])
def test_sample_index_matches_reference(seed: int, add_extra_token: bool) -> None:
    rng = np.random.default_rng(seed)
    sizes = rng.integers(0, 60, size=int(rng.integers(1, 400))).astype(np.int32)  # empty documents included
    document_index = np.concatenate([rng.permutation(sizes.size) for _ in range(3)]).astype(np.int64)
    seq_len = int(rng.integers(1, 100))
    total = int(sizes.sum()) * 3
    num_samples = helpers.samples_in_stream(total, seq_len, add_extra_token)
    compiled = helpers.build_sample_index(sizes, document_index, seq_len, num_samples, add_extra_token)
    reference = helpers.build_sample_index_reference(sizes, document_index, seq_len, num_samples, add_extra_token)
    assert compiled.dtype == np.int64 and compiled.shape == (num_samples + 1, 2)
    np.testing.assert_array_equal(compiled, reference)


def test_sample_index_token_offsets_past_int32() -> None:
    # 40 documents of ~2^31 tokens: stream offsets reach ~8.6e10 without allocating a token.
    rng = np.random.default_rng(0)
    sizes = rng.integers(2**30, 2**31 - 1, size=40).astype(np.int32)
    document_index = rng.permutation(np.repeat(np.arange(40), 2)).astype(np.int64)
    seq_len = 2**22 + 7
    total = int(sizes[document_index].astype(np.int64).sum())
    num_samples = helpers.samples_in_stream(total, seq_len)
    assert total > 2**36
    compiled = helpers.build_sample_index(sizes, document_index, seq_len, num_samples)
    np.testing.assert_array_equal(compiled, helpers.build_sample_index_reference(sizes, document_index, seq_len, num_samples))
    assert compiled[:, 1].max() < 2**31 and int(compiled[-1, 0]) <= document_index.size - 1


def test_sample_counts_past_int32() -> None:
    # 2^31 samples cannot be allocated here; the counting that sizes every array is checked in int64 instead.
    sizes = np.full(8, 2**31 - 1, dtype=np.int32)
    total = int(sizes.astype(np.int64).sum())
    assert helpers.samples_in_stream(total, 1) == total - 1 > 2**33
    assert helpers.epochs_needed(total, 4, 2**33) == 3


def test_sample_index_too_short_raises() -> None:
    with pytest.raises(ValueError):
        helpers.build_sample_index(np.array([5], np.int32), np.array([0]), 4, 2)
    with pytest.raises(ValueError):
        helpers.build_sample_index_reference(np.array([5], np.int32), np.array([0]), 4, 2)


@pytest.mark.parametrize("seed", range(6))
def test_blending_matches_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    weights = rng.random(int(rng.integers(1, 7)))
    weights /= weights.sum()
    size = int(rng.integers(0, 3000))
    dataset_index, sample_index = helpers.build_blending_indices(weights, size)
    reference_index, reference_samples = helpers.build_blending_indices_reference(weights, size)
    np.testing.assert_array_equal(dataset_index, reference_index)
    np.testing.assert_array_equal(sample_index, reference_samples)
    assert dataset_index.dtype == np.int16 and sample_index.dtype == np.int64
    # exact proportions: every prefix is within one sample of its share
    for n in (size // 3, size):
        counts = np.bincount(dataset_index[:n], minlength=weights.size)
        assert np.all(np.abs(counts - weights * n) <= 1.0)


def test_blending_exact_counts() -> None:
    # Dyadic weights: the counts are exactly weight * size.
    weights = np.array([0.5, 0.25, 0.25])
    dataset_index, sample_index = helpers.build_blending_indices(weights, 4000)
    assert sample_index.dtype == np.int64
    np.testing.assert_array_equal(np.bincount(dataset_index), [2000, 1000, 1000])


def test_missing_extension_names_the_build_command(monkeypatch) -> None:
    monkeypatch.setattr(helpers, "_compiled", None)
    with pytest.raises(ImportError, match="pip install -e ."):
        helpers.build_sample_index(np.array([5], np.int32), np.array([0]), 2, 1)
    with pytest.warns(UserWarning, match="setup.py build_ext --inplace"):
        helpers.build_sample_index(np.array([5], np.int32), np.array([0]), 2, 1, allow_reference=True)
