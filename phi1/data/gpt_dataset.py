"""Packed GPT samples over an indexed dataset, with the three index arrays cached on disk.

Documents (each ending in the end-of-document token that `tools/preprocess_data.py --append-eod` wrote) are
concatenated in a seeded, per-epoch shuffled order, for as many epochs as the requested sample count needs,
and cut into samples of `seq_len + 1` tokens; consecutive samples share one token so that
`input = tokens[:-1]`, `labels = tokens[1:]` loses no prediction. A seeded permutation then shuffles the samples.

The arrays depend only on the split's document sizes, seq_len, sample count and seed, so they are cached under a
hash of those: a restart memory-maps them instead of rebuilding. One process per node builds (LOCAL_RANK 0, or
global rank 0 without LOCAL_RANK) while the others wait at a barrier; files are written under a temporary name
and renamed, so no rank can ever read a half-written file, and a rank that still finds them missing after the
barrier (a node without the shared file system) builds its own copy.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from phi1.data.blended_dataset import BlendedDataset
from phi1.data.helpers import build_sample_index, epochs_needed
from phi1.data.indexed_dataset import IndexedDataset
from phi1.data.sidecar import check_dataset_tokenizer
from phi1.data.tokenizers import Tokenizer

# Bump when the way the index arrays are built changes: old caches then stop matching.
INDEX_ALGORITHM_VERSION = 1
_INDEX_NAMES = ("document_index", "sample_index", "shuffle_index")


def parse_split(split: str | Sequence[float]) -> list[float]:
    """'969,30,1' (or '98/2/0', or a sequence) -> normalised [train, valid, test] fractions.

    Raises:
        ValueError: negative parts, more than three, or all zero.
    """
    try:
        parts = [float(p) for p in split.replace("/", ",").split(",")] if isinstance(split, str) else [float(p) for p in split]
    except (TypeError, ValueError):
        parts = []
    if not parts or len(parts) > 3 or not all(math.isfinite(p) and p >= 0 for p in parts) or sum(parts) <= 0:
        raise ValueError(f"data.split {split!r}: need up to three non-negative numbers, not all zero, e.g. '969,30,1'")
    parts += [0.0] * (3 - len(parts))
    total = sum(parts)
    return [p / total for p in parts]


def split_document_ranges(num_documents: int, split: str | Sequence[float]) -> list[tuple[int, int]]:
    """Contiguous [start, end) document ranges of train, valid and test."""
    fractions = parse_split(split)
    bounds = [0]
    for fraction in np.cumsum(fractions):
        bounds.append(min(num_documents, int(round(float(fraction) * num_documents))))
    bounds[-1] = num_documents
    return [(bounds[i], bounds[i + 1]) for i in range(3)]


def _builds_on_this_node() -> bool:
    """True for the one process per node (or per job) that builds cache files."""
    if "LOCAL_RANK" in os.environ:
        return int(os.environ["LOCAL_RANK"]) == 0
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return True


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _save_atomically(path: str, array: np.ndarray) -> None:
    directory = os.path.dirname(path)
    descriptor, temporary = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".npy")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            np.save(handle, array, allow_pickle=False)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


@dataclass(frozen=True)
class SampleIndices:
    """The three arrays that define a GPTDataset's samples.

    document_index: int64 (num_epochs * num_documents,), document ids in stream order.
    sample_index: int64 (num_samples + 1, 2), (position in document_index, offset) where sample i starts.
    shuffle_index: int64 (num_samples,), the sample served at each dataset index.
    """

    document_index: np.ndarray
    sample_index: np.ndarray
    shuffle_index: np.ndarray


def build_sample_indices(
    sizes: np.ndarray, document_ids: np.ndarray, seq_len: int, num_samples: int, seed: int
) -> SampleIndices:
    """Builds the three arrays in memory (no cache).

    Args:
        sizes: int32 (all documents,), tokens per document of the whole indexed dataset.
        document_ids: int64 (n,), the documents of this split.
        seq_len: tokens per sample, plus the one shared with the next.
        num_samples: samples wanted.
        seed: seeds the per-epoch document shuffles and the sample shuffle.
    Raises:
        ValueError: when the split holds no tokens.
    """
    document_ids = np.asarray(document_ids, dtype=np.int64)
    tokens_per_epoch = int(sizes[document_ids].sum(dtype=np.int64)) if document_ids.size else 0
    num_epochs = epochs_needed(tokens_per_epoch, seq_len, num_samples)
    # One generator per epoch: epoch e's order does not depend on how many epochs are built.
    document_index = np.concatenate(
        [np.random.default_rng([seed, epoch]).permutation(document_ids) for epoch in range(num_epochs)]
    ).astype(np.int64)
    sample_index = build_sample_index(sizes, document_index, seq_len, num_samples)
    # Sample positions only need to cover the samples used; the tail of the last epoch stays unread.
    last_position = int(sample_index[-1, 0]) + 1
    document_index = document_index[:last_position]
    shuffle_index = np.random.default_rng([seed, 1 << 20]).permutation(num_samples).astype(np.int64)
    return SampleIndices(document_index, sample_index, shuffle_index)


def cache_key(sizes: np.ndarray, document_ids: np.ndarray, seq_len: int, num_samples: int, seed: int) -> str:
    """Hash of everything the index arrays depend on (the document sizes, not the path: moved data still hits)."""
    document_ids = np.ascontiguousarray(document_ids, dtype=np.int64)
    digest = hashlib.sha256()
    digest.update(json.dumps([INDEX_ALGORITHM_VERSION, int(seq_len), int(num_samples), int(seed)]).encode())
    digest.update(document_ids.tobytes())
    digest.update(np.ascontiguousarray(sizes[document_ids], dtype=np.int32).tobytes())
    return digest.hexdigest()[:32]


def load_or_build_sample_indices(
    sizes: np.ndarray,
    document_ids: np.ndarray,
    seq_len: int,
    num_samples: int,
    seed: int,
    cache_dir: str | os.PathLike,
    description: dict | None = None,
) -> SampleIndices:
    """Cached `build_sample_indices`: built by one process per node, memory-mapped by all.

    Every process must call this (it holds a barrier when torch.distributed is initialized).
    """
    cache_dir = os.fspath(cache_dir)
    key = cache_key(sizes, document_ids, seq_len, num_samples, seed)
    paths = {name: os.path.join(cache_dir, f"{key}-{name}.npy") for name in _INDEX_NAMES}

    def build_and_save() -> None:
        os.makedirs(cache_dir, exist_ok=True)
        indices = build_sample_indices(sizes, document_ids, seq_len, num_samples, seed)
        for name in _INDEX_NAMES:
            _save_atomically(paths[name], getattr(indices, name))
        info = dict(description or {}, seq_len=seq_len, num_samples=num_samples, seed=seed,
                    algorithm_version=INDEX_ALGORITHM_VERSION)
        with open(os.path.join(cache_dir, f"{key}-description.json"), "w", encoding="utf-8") as handle:
            json.dump(info, handle, indent=1)

    def complete() -> bool:
        return all(os.path.isfile(path) for path in paths.values())

    if _builds_on_this_node() and not complete():
        build_and_save()
    _barrier()
    if not complete():  # the builder wrote to a file system this node does not see
        build_and_save()
    loaded = {}
    for name in _INDEX_NAMES:
        try:
            loaded[name] = np.load(paths[name], mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise ValueError(f"{paths[name]}: unreadable index cache ({e}); delete it to have it rebuilt") from None
    indices = SampleIndices(*(loaded[name] for name in _INDEX_NAMES))
    _check_cached_indices(indices, paths, sizes, document_ids, num_samples)
    return indices


def _check_cached_indices(indices: SampleIndices, paths: dict[str, str], sizes: np.ndarray, document_ids: np.ndarray,
                          num_samples: int) -> None:
    """Refuses cache files that do not describe this split (damaged, edited, or from another dataset).

    Every sample read goes through these arrays, so a wrong value would read other tokens or out of bounds.
    The checks are vectorised over arrays the size of the run.
    """
    document_index, sample_index, shuffle_index = indices.document_index, indices.sample_index, indices.shuffle_index
    problem = None
    if document_index.dtype != np.int64 or document_index.ndim != 1 or document_index.size == 0:
        problem = ("document_index", f"dtype {document_index.dtype}, shape {document_index.shape}")
    elif sample_index.dtype != np.int64 or sample_index.shape != (num_samples + 1, 2):
        problem = ("sample_index", f"dtype {sample_index.dtype}, shape {sample_index.shape}, expected "
                                   f"({num_samples + 1}, 2) int64")
    elif shuffle_index.dtype != np.int64 or shuffle_index.shape != (num_samples,):
        problem = ("shuffle_index", f"dtype {shuffle_index.dtype}, shape {shuffle_index.shape}")
    elif document_ids.size and (int(document_index.min()) < int(document_ids.min())
                                or int(document_index.max()) > int(document_ids.max())):
        problem = ("document_index", "documents outside this split")
    elif num_samples and (int(shuffle_index.min()) < 0 or int(shuffle_index.max()) >= num_samples):
        problem = ("shuffle_index", "sample numbers out of range")
    else:
        positions, offsets = sample_index[:, 0], sample_index[:, 1]
        if int(positions.min()) < 0 or int(positions.max()) >= document_index.size or int(offsets.min()) < 0:
            problem = ("sample_index", "positions out of range")
        elif np.any(offsets > sizes[document_index[positions]]):
            problem = ("sample_index", "offsets beyond their documents")
    if problem is not None:
        name, what = problem
        raise ValueError(f"{paths[name]}: index cache does not match its dataset ({what}); it is damaged or was "
                         "edited: delete it (or the whole index-cache directory) to have it rebuilt")


# Beyond these the index arrays would take minutes to build or more memory than a node has: a run asking for
# that many passes over its data is misconfigured (a paper-length schedule on a toy corpus), not a workload.
MAX_EPOCHS = 100_000
MAX_DOCUMENT_INDEX_ENTRIES = 1 << 32


def _check_epochs(indexed: IndexedDataset, document_ids: np.ndarray, seq_len: int, num_samples: int, name: str) -> None:
    tokens = int(indexed.sizes[document_ids].sum(dtype=np.int64)) if document_ids.size else 0
    if tokens <= 0:
        raise ValueError(f"{indexed.prefix}: the {name} split holds no tokens; check data.split or the dataset")
    epochs = epochs_needed(tokens, seq_len, num_samples)
    if epochs > MAX_EPOCHS or epochs * document_ids.size > MAX_DOCUMENT_INDEX_ENTRIES:
        raise ValueError(
            f"{indexed.prefix}: the {name} split holds {tokens} tokens; {num_samples} samples of {seq_len} tokens "
            f"need {epochs} passes over it (at most {MAX_EPOCHS}); use more data, or fewer schedule.train_steps / "
            "eval.iters"
        )


class GPTDataset(torch.utils.data.Dataset):
    """Packed samples of `seq_len + 1` tokens from a range of documents of an indexed dataset.

    Args:
        indexed: the token data.
        document_ids: int64 (n,), the documents of this split.
        seq_len: model sequence length.
        num_samples: samples this dataset serves (as many epochs as needed).
        seed: shuffle seed.
        cache_dir: where the index arrays are cached; None builds them in memory.
        name: used in the cache description ("train", "valid", ...).
        vocab_size: when given, every sample served is checked to hold ids below it (the open-time check of
            `IndexedDataset.check_token_range` reads a bounded part of a very large .bin; this catches the rest,
            at the cost of one max over seq_len + 1 ids).
    Raises:
        ValueError (from __getitem__): a sample holds an id outside [0, vocab_size); the message names the .bin.
    """

    def __init__(
        self,
        indexed: IndexedDataset,
        document_ids: np.ndarray,
        seq_len: int,
        num_samples: int,
        seed: int,
        cache_dir: str | os.PathLike | None = None,
        name: str = "train",
        vocab_size: int | None = None,
    ) -> None:
        self.indexed = indexed
        self.vocab_size = vocab_size
        self.seq_len = int(seq_len)
        self.num_samples = int(num_samples)
        self.name = name
        sizes = indexed.sizes
        _check_epochs(indexed, np.asarray(document_ids, dtype=np.int64), seq_len, num_samples, name)
        if cache_dir is None:
            indices = build_sample_indices(sizes, document_ids, seq_len, num_samples, seed)
        else:
            indices = load_or_build_sample_indices(
                sizes, document_ids, seq_len, num_samples, seed, cache_dir,
                description={"prefix": indexed.prefix, "split": name},
            )
        self.document_index = indices.document_index
        self.sample_index = indices.sample_index
        self.shuffle_index = indices.shuffle_index

    def __len__(self) -> int:
        return self.num_samples

    def unshuffled_sample(self, sample: int) -> np.ndarray:
        """Tokens of sample `sample` in stream order: int64 (seq_len + 1,)."""
        first_position, first_offset = (int(v) for v in self.sample_index[sample])
        last_position, last_offset = (int(v) for v in self.sample_index[sample + 1])
        if first_position == last_position:
            return self.indexed.get(int(self.document_index[first_position]), first_offset,
                                    last_offset - first_offset + 1).astype(np.int64)
        pieces = [self.indexed.get(int(self.document_index[first_position]), first_offset)]
        for position in range(first_position + 1, last_position):
            pieces.append(self.indexed.get(int(self.document_index[position])))
        pieces.append(self.indexed.get(int(self.document_index[last_position]), 0, last_offset + 1))
        return np.concatenate(pieces).astype(np.int64)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        """{"tokens": int64 (seq_len + 1,)}; callers use tokens[:-1] as input and tokens[1:] as labels."""
        if not 0 <= index < self.num_samples:
            raise IndexError(f"{self.name}: sample {index} out of range ({self.num_samples})")
        sample = int(self.shuffle_index[index])
        tokens = self.unshuffled_sample(sample)
        if self.vocab_size is not None and tokens.size and (int(tokens.max()) >= self.vocab_size or int(tokens.min()) < 0):
            bad = int(tokens[(tokens >= self.vocab_size) | (tokens < 0)][0])
            raise ValueError(
                f"{self.indexed.prefix}.bin: token id {bad} in {self.name} sample {sample} is outside the "
                f"tokenizer's vocabulary ({self.vocab_size} ids); the data was made with another tokenizer: re-run "
                "tools/preprocess_data.py with this one"
            )
        return {"tokens": tokens}


def parse_data_path(prefixes_and_weights: str | Sequence) -> tuple[list[str], list[float]]:
    """Megatron's --data-path: 'PREFIX', or '0.8 PREFIX_A 0.2 PREFIX_B' (a string or a list of tokens).

    Returns:
        prefixes and weights normalised to sum 1.
    Raises:
        ValueError: an odd number of tokens, or a weight that is not a positive number.
    """
    tokens = prefixes_and_weights.split() if isinstance(prefixes_and_weights, str) else [str(t) for t in prefixes_and_weights]
    if len(tokens) == 1:
        return tokens, [1.0]
    if len(tokens) % 2:
        raise ValueError(f"data.path {prefixes_and_weights!r}: expected 'WEIGHT PREFIX WEIGHT PREFIX ...'")
    weights, prefixes = [], []
    for weight, prefix in zip(tokens[0::2], tokens[1::2]):
        try:
            weights.append(float(weight))
        except ValueError:
            raise ValueError(f"data.path: weight {weight!r} before {prefix!r} is not a number") from None
        if not math.isfinite(weights[-1]) or weights[-1] <= 0:
            raise ValueError(f"data.path: weight {weight} of {prefix!r} must be a positive, finite number")
        prefixes.append(prefix)
    if not math.isfinite(sum(weights)):  # huge weights that add up to infinity: scale them first
        weights = [w / max(weights) for w in weights]
    total = sum(weights)
    return prefixes, [w / total for w in weights]


def build_gpt_datasets(
    prefixes_and_weights: str | Sequence,
    split: str | Sequence[float],
    seq_len: int,
    num_samples: Sequence[int | None],
    seed: int,
    cache_dir: str | os.PathLike | None = None,
    tokenizer: Tokenizer | None = None,
    tokenizer_path: str | os.PathLike | None = None,
) -> tuple[torch.utils.data.Dataset | None, ...]:
    """Train, valid and test datasets (None where a split is empty or asks for no samples).

    Args:
        prefixes_and_weights: 'PREFIX' or '0.8 PREFIX_A 0.2 PREFIX_B' (blended by weight, exact proportions).
        split: document split, e.g. '969,30,1'.
        seq_len: model sequence length.
        num_samples: (train, valid, test) sample counts.
        seed: shuffle seed.
        cache_dir: index cache; default `<prefix dir>/index-cache` beside each prefix.
        tokenizer: the tokenizer training uses; when given, each prefix's sidecar (`PREFIX.json`, see
            phi1.data.sidecar) must name the same tokenizer, and token ids must lie below its vocabulary size
            (checked at open time on a bounded part of each .bin, and on every sample served).
        tokenizer_path: the tokenizer's file or directory, for messages.
    Raises:
        ValueError: a malformed data path or split, damaged files, another tokenizer's data, ids out of range.
    """
    prefixes, weights = parse_data_path(prefixes_and_weights)
    results: list[torch.utils.data.Dataset | None] = []
    indexed = [IndexedDataset(prefix) for prefix in prefixes]
    vocab_size = None
    if tokenizer is not None:
        vocab_size = int(tokenizer.vocab_size)
        name = os.fspath(tokenizer_path) if tokenizer_path is not None else ", ".join(tokenizer.source_files)
        for prefix, data in zip(prefixes, indexed):
            check_dataset_tokenizer(prefix, tokenizer, tokenizer_path)
            data.check_token_range(vocab_size, tokenizer_name=name)
    for split_number, (name, wanted) in enumerate(zip(("train", "valid", "test"), num_samples)):
        if not wanted:
            results.append(None)
            continue
        if len(prefixes) == 1:
            results.append(_split_dataset(indexed[0], split, split_number, name, seq_len, wanted, seed, cache_dir,
                                          vocab_size))
            continue
        # Each part gets exactly the samples the blend will draw from it.
        blend = BlendedDataset.plan(weights, wanted)
        parts = [
            _split_dataset(data, split, split_number, name, seq_len, count, seed, cache_dir, vocab_size) if count
            else None
            for data, count in zip(indexed, blend.samples_per_dataset)
        ]
        results.append(BlendedDataset(parts, weights, wanted))
    return tuple(results)


def _split_dataset(
    indexed: IndexedDataset, split, split_number: int, name: str, seq_len: int, wanted: int, seed: int, cache_dir,
    vocab_size: int | None = None,
) -> GPTDataset | None:
    start, end = split_document_ranges(indexed.num_documents, split)[split_number]
    if end <= start:
        raise ValueError(f"{indexed.prefix}: split {split!r} leaves no documents for {name}, which asks for {wanted} samples")
    # Documents are ranges of sequences; preprocess_data writes one sequence per document.
    first, last = int(indexed.document_indices[start]), int(indexed.document_indices[end])
    directory = cache_dir if cache_dir is not None else os.path.join(os.path.dirname(os.path.abspath(indexed.prefix)), "index-cache")
    return GPTDataset(indexed, np.arange(first, last, dtype=np.int64), seq_len, wanted, seed, directory, name,
                      vocab_size)
