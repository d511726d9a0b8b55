"""Index builders: the compiled `phi1.data._helpers` routines and their NumPy references.

The compiled module is built by `pip install -e .` (or `python setup.py build_ext --inplace`). If it is missing,
the first call says so with that command instead of failing deep inside a training run; the NumPy references
are the specification the C++ is tested against, and can stand in with `allow_reference=True`.
"""

from __future__ import annotations

import warnings
from types import ModuleType

import numpy as np

BUILD_COMMAND = "pip install -e .  (or: python setup.py build_ext --inplace)"

try:
    from phi1.data import _helpers as _compiled
    _IMPORT_ERROR: ImportError | None = None
except ImportError as error:  # the extension was not built
    _compiled = None
    _IMPORT_ERROR = error


def compiled_helpers() -> ModuleType:
    """The compiled extension.

    Raises:
        ImportError: with the command that builds it, when it is missing.
    """
    if _compiled is None:
        raise ImportError(
            f"phi1.data._helpers (csrc/helpers.cpp) is not built: {_IMPORT_ERROR}. Build it with: {BUILD_COMMAND}"
        )
    return _compiled


def _use_compiled(allow_reference: bool) -> bool:
    if _compiled is not None:
        return True
    if not allow_reference:
        compiled_helpers()  # raises with the build command
    warnings.warn(
        f"phi1.data._helpers is not built; using the slower NumPy reference. Build it with: {BUILD_COMMAND}",
        stacklevel=3,
    )
    return False


def build_sample_index(
    sizes: np.ndarray,
    document_index: np.ndarray,
    seq_len: int,
    num_samples: int,
    add_extra_token: bool = True,
    allow_reference: bool = False,
) -> np.ndarray:
    """Where each packed sample starts (C++; see `build_sample_index_reference` for the definition).

    Args:
        sizes: int32 (num_documents,), tokens per document.
        document_index: int64 (n,), the order documents are concatenated in (ids into `sizes`, repeats allowed).
        seq_len: tokens per sample, not counting the extra token shared with the next sample.
        num_samples: samples to index.
        add_extra_token: samples hold seq_len + 1 tokens (the default, for input/label shift).
        allow_reference: fall back to NumPy (with a warning) if the extension is missing.
    Returns:
        int64 (num_samples + 1, 2): row i = (position in document_index, token offset) of token i * seq_len.
    Raises:
        ValueError: the documents hold too few tokens; ImportError: the extension is not built.
    """
    sizes = np.ascontiguousarray(sizes, dtype=np.int32)
    document_index = np.ascontiguousarray(document_index, dtype=np.int64)
    if not _use_compiled(allow_reference):
        return build_sample_index_reference(sizes, document_index, seq_len, num_samples, add_extra_token)
    return _compiled.build_sample_index(sizes, document_index, int(seq_len), int(num_samples), int(add_extra_token))


def build_sample_index_reference(
    sizes: np.ndarray, document_index: np.ndarray, seq_len: int, num_samples: int, add_extra_token: bool = True
) -> np.ndarray:
    """NumPy definition of `build_sample_index`: a binary search of each sample start in the stream's
    cumulative document ends. Same arguments and result; uses O(len(document_index)) memory."""
    lengths = np.asarray(sizes, dtype=np.int64)[np.asarray(document_index, dtype=np.int64)]
    ends = np.cumsum(lengths)
    total = int(ends[-1]) if ends.size else 0
    needed = num_samples * seq_len + int(add_extra_token)
    if total < needed or (ends.size == 0):
        raise ValueError(f"the documents hold {total} tokens, {needed} are needed")
    targets = np.arange(num_samples + 1, dtype=np.int64) * seq_len
    # The first document whose end lies past the target holds it (empty documents are skipped this way).
    positions = np.minimum(np.searchsorted(ends, targets, side="right"), ends.size - 1)
    starts = ends - lengths
    return np.stack([positions, targets - starts[positions]], axis=1).astype(np.int64)


def build_blending_indices(
    weights: np.ndarray, size: int, allow_reference: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Which dataset, and which of its samples, each blended sample comes from (C++).

    Args:
        weights: float64 (num_datasets,), normalised to sum 1.
        size: number of blended samples.
        allow_reference: fall back to NumPy (with a warning) if the extension is missing.
    Returns:
        dataset_index int16 (size,) and dataset_sample_index int64 (size,).
    """
    weights = np.ascontiguousarray(weights, dtype=np.float64)
    if not _use_compiled(allow_reference):
        return build_blending_indices_reference(weights, size)
    return _compiled.build_blending_indices(weights, int(size))


def build_blending_indices_reference(weights: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """NumPy definition of `build_blending_indices`: sample i goes to the dataset with the largest deficit
    weights[d] * (i + 1) - count[d], the lowest index on ties (np.argmax returns the first maximum)."""
    weights = np.asarray(weights, dtype=np.float64)
    counts = np.zeros(weights.size, dtype=np.int64)
    dataset_index = np.empty(size, dtype=np.int16)
    dataset_sample_index = np.empty(size, dtype=np.int64)
    for i in range(size):
        best = int(np.argmax(weights * float(i + 1) - counts))
        dataset_index[i] = best
        dataset_sample_index[i] = counts[best]
        counts[best] += 1
    return dataset_index, dataset_sample_index


def samples_in_stream(total_tokens: int, seq_len: int, add_extra_token: bool = True) -> int:
    """How many samples of seq_len (+1) tokens a stream of `total_tokens` holds (Python ints: no overflow)."""
    return max(0, (int(total_tokens) - int(add_extra_token)) // int(seq_len))


def epochs_needed(tokens_per_epoch: int, seq_len: int, num_samples: int, add_extra_token: bool = True) -> int:
    """Smallest number of epochs whose concatenation holds `num_samples` samples.

    Raises:
        ValueError: when an epoch holds no tokens.
    """
    if tokens_per_epoch <= 0:
        raise ValueError("the split holds no tokens")
    needed = int(num_samples) * int(seq_len) + int(add_extra_token)
    return max(1, -(-needed // int(tokens_per_epoch)))
