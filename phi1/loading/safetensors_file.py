"""Safetensors files checked before the safetensors library sees them.

The format: 8 bytes little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets}, optional
"__metadata__": {str: str}}, then the data buffer. `read_header` checks every claim of the header against the
file itself (header length capped and within the file, known dtypes, shapes of non-negative integers whose
element count times the dtype's size equals the byte range, ranges inside the buffer, contiguous and not
overlapping) and only then may `load_tensors` hand the file to `safetensors`. A file that lies therefore gets
one message naming the file and the tensor, never a library panic, a huge allocation or a read past the end.

Written here rather than relying on the library's own checks because its errors do not name the file or the
tensor, and because we want the header limit and the dtype/shape checks against a model config before any data
is touched.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from phi1.loading.paths import regular_file

# Real headers hold ~120 bytes per tensor: phi-1's 294 tensors take ~35 KB, a 10,000-tensor model ~1.2 MB.
MAX_HEADER_BYTES = 16 << 20
MAX_RANK = 8

DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8), "I32": (torch.int32, 4), "I16": (torch.int16, 2), "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1),
    "F8_E4M3": (torch.float8_e4m3fn, 1), "F8_E5M2": (torch.float8_e5m2, 1),
}
WEIGHT_DTYPES = ("F32", "F16", "BF16")
"""Dtypes a model weight may have (anything else is refused for a model)."""


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as the header describes it (already checked against the file)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype][0]


@dataclass(frozen=True)
class SafetensorsHeader:
    """A checked header: its tensors by name and its metadata."""

    path: Path
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]


def read_header(path: str | os.PathLike, shown: str | os.PathLike | None = None) -> SafetensorsHeader:
    """Read and check the header of a safetensors file against the file's size.

    Args:
        path: the file (already known to be inside its directory).
        shown: how to name it in messages (default: `path`).

    Raises:
        FileNotFoundError: it does not exist.
        ValueError: not a regular file, truncated, header over MAX_HEADER_BYTES, not JSON, or any tensor entry
            that lies (the message names the file and the tensor).
    """
    shown = str(shown if shown is not None else path)
    size = regular_file(path, shown)
    if size < 8:
        raise ValueError(f"{shown}: {size} bytes, too short for a safetensors file (truncated?)")
    with open(path, "rb") as handle:
        (header_bytes,) = struct.unpack("<Q", handle.read(8))
        if header_bytes > MAX_HEADER_BYTES:
            raise ValueError(f"{shown}: header of {header_bytes} bytes, over the {MAX_HEADER_BYTES}-byte limit; "
                             "not a safetensors file phi1 reads")
        if 8 + header_bytes > size:
            raise ValueError(f"{shown}: header of {header_bytes} bytes but the file has {size}; truncated or not a "
                             "safetensors file")
        raw = handle.read(header_bytes)
    try:
        header = json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise ValueError(f"{shown}: header JSON nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{shown}: header is not valid JSON ({type(e).__name__}); not a safetensors file") from None
    if not isinstance(header, dict):
        raise ValueError(f"{shown}: header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError(f"{shown}: __metadata__ must map strings to strings")
    buffer_bytes = size - 8 - header_bytes
    tensors = {name: _check_entry(shown, name, entry, buffer_bytes) for name, entry in header.items()}
    # The buffer must be covered exactly, in order: no overlaps, no gaps, nothing after the last tensor.
    position = 0
    for entry in sorted(tensors.values(), key=lambda e: (e.begin, e.end)):
        if entry.begin != position:
            how = "overlaps the tensor before it" if entry.begin < position else "leaves a gap before it"
            raise ValueError(f"{shown}: tensor {entry.name!r}: data_offsets [{entry.begin}, {entry.end}] {how}")
        position = entry.end
    if position != buffer_bytes:
        raise ValueError(f"{shown}: tensors cover {position} of the {buffer_bytes} data bytes (truncated, or bytes "
                         "no tensor owns)")
    return SafetensorsHeader(Path(path), tensors, metadata)


def _check_entry(shown: str, name: str, entry: object, buffer_bytes: int) -> TensorEntry:
    where = f"{shown}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPES:
        raise ValueError(f"{where}: unknown dtype {dtype!r}; known: {', '.join(DTYPES)}")
    if (not isinstance(shape, list) or len(shape) > MAX_RANK
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise ValueError(f"{where}: shape {shape!r} is not a list of at most {MAX_RANK} non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
        raise ValueError(f"{where}: data_offsets {offsets!r} is not a pair of integers")
    begin, end = offsets
    if not 0 <= begin <= end <= buffer_bytes:
        raise ValueError(f"{where}: data_offsets [{begin}, {end}] outside the file's {buffer_bytes} data bytes "
                         "(truncated file, or a header that lies)")
    nbytes = math.prod(shape) * DTYPES[dtype][1]  # Python integers: no overflow, however large the shape
    if nbytes != end - begin:
        raise ValueError(f"{where}: shape {shape} of {dtype} needs {nbytes} bytes but data_offsets span {end - begin}")
    return TensorEntry(name, dtype, tuple(shape), begin, end)


def check_weight_dtypes(header: SafetensorsHeader, shown: str | os.PathLike | None = None) -> None:
    """Refuse tensors whose dtype no model weight has (integers, booleans, fp8).

    Raises:
        ValueError: naming the file and the first such tensor.
    """
    for entry in header.tensors.values():
        if entry.dtype not in WEIGHT_DTYPES:
            raise ValueError(f"{shown or header.path}: tensor {entry.name!r} has dtype {entry.dtype}; model weights are "
                             f"{', '.join(WEIGHT_DTYPES)}")


def load_tensors(header: SafetensorsHeader, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a file whose header `read_header` checked (all, or `names`), on CPU.

    Raises:
        ValueError: the file changed since its header was read and the library refuses it (named).
    """
    from safetensors import safe_open

    wanted = list(header.tensors) if names is None else names
    try:
        with safe_open(str(header.path), framework="pt") as handle:
            return {name: handle.get_tensor(name) for name in wanted}
    except Exception as e:  # SafetensorError derives from Exception only; the file changed under us
        raise ValueError(f"{header.path}: unreadable safetensors file ({e})") from None
