"""Megatron-compatible indexed datasets: a `.bin` of raw tokens and an `.idx` describing it.

Layout (see /work/shared/reference/formats.md): the `.idx` holds a 9-byte magic, a uint64 version (1), a uint8
dtype code, uint64 sequence and document counts, then int32 sizes, int64 byte pointers and int64 document
indices. Megatron-LM reads what we write and we read what it writes.

Everything that can exceed 2^31 (pointers, token counts, document indices) is int64 here; only the per-sequence
size is int32, because the format fixes it.

Opening checks the header before anything is mapped: counts that the `.bin` cannot hold (2^40 documents in a
sparse `.idx` of the "right" size) are refused with a message, never met as `OSError: Cannot allocate memory`;
FIFOs and devices given as dataset files are refused without being opened. `check_token_range` finds ids beyond
a tokenizer's vocabulary in bounded time. Beside `PREFIX.bin/.idx` phi1 writes a tokenizer sidecar `PREFIX.json`
(phi1.data.sidecar); the `.bin`/`.idx` bytes stay exactly Megatron's.
"""

from __future__ import annotations

import os
import shutil
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
# magic, version (uint64), dtype code (uint8), sequence count (uint64), document count (uint64)
_HEADER = struct.Struct("<9sQBQQ")
HEADER_BYTES = _HEADER.size  # 34

DTYPE_BY_CODE: dict[int, type[np.generic]] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
CODE_BY_DTYPE: dict[np.dtype, int] = {np.dtype(dtype): code for code, dtype in DTYPE_BY_CODE.items()}

_RERUN = "re-run tools/preprocess_data.py"
# The out-of-vocabulary check reads at most this much of a .bin (whole files below it), in chunks of this size.
TOKEN_SCAN_BYTES = 2 << 30
TOKEN_CHUNK_BYTES = 1 << 22
# Checks over per-sequence arrays go in slices so that a billion-document index is not copied at once.
_CHECK_CHUNK = 1 << 24


def token_dtype_for_vocab(vocab_size: int) -> np.dtype:
    """The token dtype Megatron uses: uint16 below 65,500 entries, int32 otherwise."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


# Sequences may be empty (an empty document written without --append-eod) and documents may hold no sequence
# (Megatron's preprocess_data.py with an empty document), so counts may exceed the tokens of the .bin; but more
# empty ones than tokens, beyond this allowance, is a damaged or forged header, refused before anything is
# mapped (a sparse 8 TB .idx promising 2^40 documents would otherwise be mapped and walked).
_EMPTY_ALLOWANCE = 1 << 20


def require_regular_file(path: str) -> None:
    """Raises a clear error unless `path` is a regular file (a FIFO or device would block or never end).

    Raises:
        FileNotFoundError: nothing at `path`; ValueError: a directory, pipe, device or socket.
    """
    import stat

    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file; build it with tools/preprocess_data.py") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot be read ({e.strerror})") from None
    if stat.S_ISREG(mode):
        return
    kind = ("a directory" if stat.S_ISDIR(mode) else "a named pipe (FIFO)" if stat.S_ISFIFO(mode)
            else "a device file" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "not a regular file")
    raise ValueError(f"{path}: {kind}, not a dataset file; give the prefix of files made by tools/preprocess_data.py")


def _check_counts_plausible(index_path: str, data_path: str, dtype: np.dtype, sequence_count: int,
                            document_count: int) -> None:
    data_tokens = os.path.getsize(data_path) // dtype.itemsize
    most_sequences = data_tokens + max(data_tokens, _EMPTY_ALLOWANCE)
    most_documents = sequence_count + 1 + max(sequence_count, _EMPTY_ALLOWANCE)
    if sequence_count > most_sequences or document_count > most_documents:
        raise ValueError(
            f"{index_path}: header promises {sequence_count} sequences and {document_count} document indices, "
            f"absurd for {data_path} with {data_tokens} tokens (at most {most_sequences} sequences, and "
            f"{most_documents} document indices for {sequence_count} sequences, are plausible); the header is "
            f"damaged or the files do not belong together; {_RERUN}"
        )


def _memory_map(path: str) -> np.ndarray:
    """Read-only uint8 map of `path`; a map the system refuses (address-space limit) is a clear error."""
    try:
        return np.memmap(path, mode="r", dtype=np.uint8)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot be memory-mapped ({os.path.getsize(path)} bytes: {e}); check the file "
                         f"or the process's memory limit (ulimit -v)") from None


def data_file_path(prefix: str | os.PathLike) -> str:
    """`PREFIX.bin`."""
    return f"{os.fspath(prefix)}.bin"


def index_file_path(prefix: str | os.PathLike) -> str:
    """`PREFIX.idx`."""
    return f"{os.fspath(prefix)}.idx"


def dataset_exists(prefix: str | os.PathLike) -> bool:
    """True when both `PREFIX.bin` and `PREFIX.idx` exist."""
    return os.path.isfile(data_file_path(prefix)) and os.path.isfile(index_file_path(prefix))


class IndexedDatasetWriter:
    """Writes `PREFIX.bin` and `PREFIX.idx`.

    Files are written under temporary names and renamed by `finalize()`, so a crashed run never leaves a
    dataset that looks complete. Use as a context manager, or call `finalize()` yourself.

    Args:
        prefix: output path without extension.
        dtype: token dtype (see `token_dtype_for_vocab`).
    """

    def __init__(self, prefix: str | os.PathLike, dtype: np.dtype | type = np.uint16) -> None:
        self.prefix = os.fspath(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_BY_DTYPE:
            raise ValueError(f"{self.prefix}: token dtype {self.dtype} has no code in the .idx format")
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        self._bin_tmp = data_file_path(self.prefix) + ".tmp"
        self._bin = open(self._bin_tmp, "wb", buffering=1 << 22)
        # Sizes are collected as numpy chunks: a Python list of ints costs ~30x the memory on big corpora.
        self._size_chunks: list[np.ndarray] = []
        self._document_starts: list[np.ndarray] = [np.zeros(1, dtype=np.int64)]
        self._sequence_count = 0
        self._finalized = False

    def add_document(self, tokens: Sequence[int] | np.ndarray, sequence_lengths: Sequence[int] | None = None) -> None:
        """Appends one document.

        Args:
            tokens: the document's tokens, shape (n,).
            sequence_lengths: split of the document into sequences (sentences); default one sequence.
        Raises:
            ValueError: when the lengths do not add up to the token count.
        """
        array = np.asarray(tokens, dtype=self.dtype)
        lengths = np.asarray([array.size] if sequence_lengths is None else sequence_lengths, dtype=np.int64)
        if int(lengths.sum()) != array.size:
            raise ValueError(f"sequence lengths add up to {int(lengths.sum())}, the document has {array.size} tokens")
        self._write(array, lengths)
        self._document_starts.append(np.asarray([self._sequence_count], dtype=np.int64))

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Appends many documents at once (one sequence each): the fast path of preprocessing.

        Args:
            tokens: all documents' tokens concatenated, shape (sum(lengths),).
            lengths: tokens per document, shape (num_documents,).
        """
        tokens = np.asarray(tokens, dtype=self.dtype)
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != tokens.size:
            raise ValueError(f"lengths add up to {int(lengths.sum())}, got {tokens.size} tokens")
        first = self._sequence_count
        self._write(tokens, lengths)
        self._document_starts.append(np.arange(first + 1, first + 1 + lengths.size, dtype=np.int64))

    def _write(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        if lengths.size and int(lengths.max()) > np.iinfo(np.int32).max:
            raise ValueError(f"{self.prefix}: a sequence of {int(lengths.max())} tokens does not fit the int32 size field")
        self._bin.write(tokens.tobytes(order="C"))
        self._size_chunks.append(lengths.astype(np.int32))
        self._sequence_count += lengths.size

    def add_index(self, prefix: str | os.PathLike) -> None:
        """Appends a whole existing dataset (same dtype): its tokens are copied byte for byte.

        Raises:
            ValueError: when the dtypes differ or the dataset is invalid.
        """
        other = IndexedDataset(prefix)
        if other.dtype != self.dtype:
            raise ValueError(f"{index_file_path(prefix)}: dtype {other.dtype}, the output has {self.dtype}")
        first = self._sequence_count
        self._bin.flush()
        with open(data_file_path(prefix), "rb") as source:
            shutil.copyfileobj(source, self._bin, length=1 << 24)
        self._size_chunks.append(np.array(other.sizes, dtype=np.int32))
        self._document_starts.append(np.asarray(other.document_indices[1:], dtype=np.int64) + first)
        self._sequence_count += len(other)
        other.close()

    def finalize(self) -> None:
        """Writes the `.idx` and renames both files into place."""
        if self._finalized:
            return
        self._bin.close()
        sizes = np.concatenate(self._size_chunks) if self._size_chunks else np.zeros(0, dtype=np.int32)
        document_indices = np.concatenate(self._document_starts)
        if document_indices[-1] != self._sequence_count:
            # The last document must end at the sequence count; sequences after it would be orphans.
            document_indices = np.append(document_indices, self._sequence_count)
        pointers = np.zeros(sizes.size, dtype=np.int64)
        if sizes.size > 1:
            np.cumsum(sizes[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        index_tmp = index_file_path(self.prefix) + ".tmp"
        with open(index_tmp, "wb") as index_file:
            index_file.write(
                _HEADER.pack(INDEX_MAGIC, INDEX_VERSION, CODE_BY_DTYPE[self.dtype], sizes.size, document_indices.size)
            )
            index_file.write(sizes.astype("<i4").tobytes())
            index_file.write(pointers.astype("<i8").tobytes())
            index_file.write(document_indices.astype("<i8").tobytes())
        os.replace(self._bin_tmp, data_file_path(self.prefix))
        os.replace(index_tmp, index_file_path(self.prefix))
        self._finalized = True

    def abort(self) -> None:
        """Closes and deletes the partial output (nothing under the final names is touched)."""
        if not self._bin.closed:
            self._bin.close()
        if not self._finalized and os.path.exists(self._bin_tmp):
            os.remove(self._bin_tmp)

    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.abort()


class IndexedDataset:
    """Memory-mapped reader of `PREFIX.bin` / `PREFIX.idx`.

    Everything the index promises is checked at open time (magic, version, dtype code, array lengths, pointers
    and sizes within the `.bin`), so a damaged file fails here with its name, not later inside numpy.

    Attributes:
        sizes: int32 (num_sequences,), tokens per sequence.
        pointers: int64 (num_sequences,), byte offset of each sequence in the `.bin`.
        document_indices: int64 (num_documents + 1,), first sequence of each document.
        dtype: token dtype.

    Raises:
        FileNotFoundError: a file is missing.
        ValueError: the files are inconsistent; the message names the file and the problem.
    """

    def __init__(self, prefix: str | os.PathLike) -> None:
        self.prefix = os.fspath(prefix)
        index_path, data_path = index_file_path(self.prefix), data_file_path(self.prefix)
        for path in (index_path, data_path):
            require_regular_file(path)
        index_bytes = os.path.getsize(index_path)
        if index_bytes < HEADER_BYTES:
            raise ValueError(f"{index_path}: {index_bytes} bytes, shorter than the {HEADER_BYTES}-byte header; {_RERUN}")
        with open(index_path, "rb") as index_file:
            magic, version, dtype_code, sequence_count, document_count = _HEADER.unpack(index_file.read(HEADER_BYTES))
        if magic != INDEX_MAGIC:
            raise ValueError(f"{index_path}: magic {magic!r} is not {INDEX_MAGIC!r}, not an indexed-dataset index; {_RERUN}")
        if version != INDEX_VERSION:
            raise ValueError(f"{index_path}: header says version {version}, this reader knows version {INDEX_VERSION}; {_RERUN}")
        if dtype_code not in DTYPE_BY_CODE:
            raise ValueError(
                f"{index_path}: dtype code {dtype_code} is not one of {sorted(DTYPE_BY_CODE)}; {_RERUN}"
            )
        self.dtype = np.dtype(DTYPE_BY_CODE[dtype_code])
        _check_counts_plausible(index_path, data_path, self.dtype, sequence_count, document_count)
        expected_bytes = HEADER_BYTES + sequence_count * (4 + 8) + document_count * 8
        if index_bytes != expected_bytes:
            problem = "truncated" if index_bytes < expected_bytes else "has trailing bytes"
            raise ValueError(
                f"{index_path}: {problem}: header promises {sequence_count} sequences and {document_count} document "
                f"indices ({expected_bytes} bytes), the file has {index_bytes}; {_RERUN}"
            )
        if document_count < 1:
            raise ValueError(f"{index_path}: document count is 0, it must be at least 1 (a leading 0); {_RERUN}")
        self._index_map = _memory_map(index_path)
        offset = HEADER_BYTES
        self.sizes = np.frombuffer(self._index_map, dtype="<i4", count=sequence_count, offset=offset)
        offset += self.sizes.nbytes
        self.pointers = np.frombuffer(self._index_map, dtype="<i8", count=sequence_count, offset=offset)
        offset += self.pointers.nbytes
        self.document_indices = np.frombuffer(self._index_map, dtype="<i8", count=document_count, offset=offset)
        self._check_against_data(index_path, data_path)
        data_bytes = os.path.getsize(data_path)
        # An empty .bin cannot be memory-mapped; there is nothing to read from it anyway.
        self._data_map = _memory_map(data_path) if data_bytes else np.zeros(0, dtype=np.uint8)

    def _check_against_data(self, index_path: str, data_path: str) -> None:
        document_indices = self.document_indices
        if document_indices[0] != 0 or document_indices[-1] != self.sizes.size:
            raise ValueError(
                f"{index_path}: document indices run from {document_indices[0]} to {document_indices[-1]}, "
                f"they must run from 0 to the sequence count {self.sizes.size}; {_RERUN}"
            )
        if document_indices.size > 1 and np.any(np.diff(document_indices) < 0):
            raise ValueError(f"{index_path}: document indices decrease; {_RERUN}")
        data_bytes = os.path.getsize(data_path)
        itemsize = self.dtype.itemsize
        # Writers (ours and Megatron-LM's) lay sequences end to end: each pointer is the previous one plus the
        # previous size. Checking it catches a damaged size, pointer or dtype code that would otherwise read
        # other tokens than were written, without an error.
        expected_next = 0
        for start in range(0, self.sizes.size, _CHECK_CHUNK):
            sizes = self.sizes[start : start + _CHECK_CHUNK].astype(np.int64)
            pointers = self.pointers[start : start + _CHECK_CHUNK]
            if sizes.min() < 0 or pointers.min() < 0:
                raise ValueError(f"{index_path}: negative sizes or pointers near sequence {start}; {_RERUN}")
            ends = pointers + sizes * itemsize
            last = int(np.argmax(ends))
            if int(ends[last]) > data_bytes:
                sequence = start + last
                raise ValueError(
                    f"{data_path}: truncated or wrong index: sequence {sequence} ends at byte {int(ends[last])}, "
                    f"the file has {data_bytes} bytes (index {index_path}); {_RERUN}"
                )
            steps = np.concatenate(([expected_next], pointers[:-1] + sizes[:-1] * itemsize))
            mismatch = np.flatnonzero(pointers != steps)
            if mismatch.size:
                sequence = start + int(mismatch[0])
                raise ValueError(
                    f"{index_path}: sequence {sequence} starts at byte {int(self.pointers[sequence])}, the sizes before "
                    f"it (dtype {self.dtype}) put it at byte {int(steps[mismatch[0]])}; the index is damaged; {_RERUN}"
                )
            expected_next = int(pointers[-1] + sizes[-1] * itemsize)
        if data_bytes != expected_next:
            raise ValueError(
                f"{data_path}: {data_bytes} bytes, the index {index_path} describes {expected_next} (trailing bytes "
                f"or a wrong dtype code); {_RERUN}"
            )

    def __len__(self) -> int:
        return int(self.sizes.size)

    @property
    def num_documents(self) -> int:
        """Number of documents (one less than the document-index length)."""
        return int(self.document_indices.size - 1)

    @property
    def num_tokens(self) -> int:
        """Total tokens over all sequences (int64 sum)."""
        return int(self.sizes.sum(dtype=np.int64))

    def get(self, index: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens of sequence `index` from `offset`, `length` of them (default: to the end).

        Returns:
            a read-only view of shape (length,) in the file's dtype.
        Raises:
            IndexError: `index`, `offset` or `length` out of range.
        """
        size = int(self.sizes[index])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"{self.prefix}: tokens [{offset}, {offset + length}) of sequence {index} of size {size}")
        start = int(self.pointers[index]) + offset * self.dtype.itemsize
        return np.frombuffer(self._data_map, dtype=self.dtype, count=length, offset=start) if length else np.zeros(
            0, dtype=self.dtype
        )

    def __getitem__(self, index: int) -> np.ndarray:
        if not isinstance(index, (int, np.integer)):
            raise TypeError(f"index must be an integer, got {type(index).__name__}")
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"{self.prefix}: sequence {index} out of range ({len(self)} sequences)")
        return self.get(int(index))

    def check_token_range(self, vocab_size: int, tokenizer_name: str = "the tokenizer",
                          scan_bytes: int = TOKEN_SCAN_BYTES, chunk_bytes: int = TOKEN_CHUNK_BYTES) -> dict:
        """Refuses token ids outside [0, vocab_size): a .bin made with another (larger) tokenizer.

        A `.bin` of up to `scan_bytes` is scanned whole, one vectorised max (and min, for signed dtypes) per
        chunk of `chunk_bytes`; a larger one is checked on `scan_bytes // chunk_bytes` chunks spread evenly
        over the file, first and last included, so the time is bounded whatever the file size (GPTDataset
        checks every sample it serves as well, so an id the sample missed still never reaches the model).

        Args:
            vocab_size: ids must be below this (the tokenizer's real vocabulary, not the padded embedding).
            tokenizer_name: the tokenizer's file, for the message.
            scan_bytes: most bytes read.
            chunk_bytes: bytes per chunk.
        Returns:
            {"bytes_checked", "bytes_total", "whole_file", "max_id"}.
        Raises:
            ValueError: a float dtype, or an id out of range; the message names the .bin, the id, the sequence.
        """
        data_path = data_file_path(self.prefix)
        if self.dtype.kind not in "iu":
            raise ValueError(f"{data_path}: holds {self.dtype} values, not integer token ids; {_RERUN}")
        tokens = np.frombuffer(self._data_map, dtype=self.dtype) if len(self._data_map) else np.zeros(0, self.dtype)
        chunk_tokens = max(1, chunk_bytes // self.dtype.itemsize)
        num_chunks = -(-tokens.size // chunk_tokens)
        budget_chunks = max(2, scan_bytes // max(1, chunk_bytes))
        if num_chunks <= budget_chunks:
            chunks = np.arange(num_chunks)
        else:
            chunks = np.unique(np.linspace(0, num_chunks - 1, budget_chunks).round().astype(np.int64))
        signed = self.dtype.kind == "i"
        max_id = -1
        checked = 0
        for chunk in chunks:
            view = tokens[int(chunk) * chunk_tokens : (int(chunk) + 1) * chunk_tokens]
            checked += view.nbytes
            highest = int(view.max())
            max_id = max(max_id, highest)
            if highest >= vocab_size or (signed and int(view.min()) < 0):
                bad = int(np.flatnonzero((view >= vocab_size) | (view < 0))[0])
                position = int(chunk) * chunk_tokens + bad
                sequence = int(np.searchsorted(self.pointers, position * self.dtype.itemsize, side="right")) - 1
                raise ValueError(
                    f"{data_path}: token id {int(view[bad])} in sequence {sequence} (token {position}) is outside "
                    f"the vocabulary of {tokenizer_name} ({vocab_size} ids); the data was made with another "
                    f"tokenizer: re-run tools/preprocess_data.py with this one, or train with the data's tokenizer"
                )
        return {"bytes_checked": checked, "bytes_total": tokens.nbytes, "whole_file": len(chunks) == num_chunks,
                "max_id": max_id}

    def close(self) -> None:
        """Drops the memory maps (the arrays handed out keep theirs alive)."""
        self._index_map = None
        self._data_map = None


def merge_datasets(input_prefixes: Iterable[str | os.PathLike], output_prefix: str | os.PathLike) -> int:
    """Concatenates several datasets into one, in the order given.

    Returns:
        the number of sequences written.
    Raises:
        ValueError: when the inputs have different dtypes or one is invalid.
    """
    input_prefixes = [os.fspath(prefix) for prefix in input_prefixes]
    if not input_prefixes:
        raise ValueError("merge_datasets: no input prefixes")
    dtype = IndexedDataset(input_prefixes[0]).dtype
    with IndexedDatasetWriter(output_prefix, dtype) as writer:
        for prefix in input_prefixes:
            writer.add_index(prefix)
        count = writer._sequence_count
    return count
