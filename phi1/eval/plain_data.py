"""Plain data across the sandbox boundary: Python values as typed JSON, decoded strictly on the trusted side.

Values that cross between the process running model code and the processes that judge it are only these
types, nested at most `MAX_DEPTH` deep: None, bool, int, float, complex, str, bytes, list, tuple, set,
frozenset and dict. Each keeps its type (True is not 1, (1, 2) is not [1, 2], 1.0 is not 1), floats keep their
exact bits (float.hex: inf, nan and -0.0 too) and ints of any size round-trip (hex, free of Python's
4300-digit str limit).

    ["i", "0x1f"]  int             ["f", "0x1.8p+1"]  float     ["c", "0x0p+0", "0x1p+0"]  complex
    ["s", "text"]  str             ["b", "AAE="]      bytes     ["l", [...]] list   ["t", [...]] tuple
    ["S", [...]]   set             ["F", [...]]       frozenset ["d", [[key, value], ...]] dict
    ["T", "int"]   one of the plain types itself (MBPP/533 passes `int` as an argument)
    ["o", "re.Match", true]        any other object, as an `Opaque` stand-in: its type name and truth value
    null, true, false              None, True, False

A return value of another type (a `re.Match` that MBPP/737's test only checks for truth) arrives as an
`Opaque`: true or false as the original was, equal only to itself, with no other behaviour. It cannot pass any
test that a plain True or False could not pass.

`decode` is the trusted side's only way in: it builds objects of exactly those types from a bounded JSON text,
so no object made by model code (an `__eq__` that is always true, a str subclass, a proxy) can reach a
comparison. `encode` is strict too (exact types only); `encode_lenient` is what the sandboxed side uses for the
model's return values: it first turns subclasses of the plain types into their base values and NumPy scalars
into Python scalars, which is harmless because whatever it produces is decoded strictly again.

Written here rather than taken from a library: pickle and marshal run code or accept object graphs, json loses
types (tuples, sets, int vs float keys, nan), and none of them bounds depth and size.

This module is stdlib-only and imports nothing from phi1: the sandbox runner loads it by path.
"""

from __future__ import annotations

import base64
import json
import math

MAX_DEPTH = 64
"""Deepest nesting accepted (a list in a list ... counts one per level)."""
MAX_NODES = 2_000_000
"""Most values in one message."""
MAX_TEXT_BYTES = 64 * 2**20
"""Longest encoded message accepted by `loads`."""


class PlainDataError(ValueError):
    """A value that is not plain data, or a message that is not a valid encoding of one."""


class Opaque:
    """Stand-in for a returned object that is not plain data: only its type name and truth value came across."""

    __slots__ = ("type_name", "truth")

    def __init__(self, type_name: str, truth: bool) -> None:
        self.type_name, self.truth = type_name, truth

    def __bool__(self) -> bool:
        return self.truth

    def __repr__(self) -> str:
        return f"<{self.type_name} object ({'true' if self.truth else 'false'})>"


_SEQUENCE_TAGS = {"l": list, "t": tuple, "S": set, "F": frozenset}
_TAG_OF_SEQUENCE = {list: "l", tuple: "t", set: "S", frozenset: "F"}
_TYPES = {kind.__name__: kind for kind in (bool, int, float, complex, str, bytes, list, tuple, set, frozenset, dict,
                                           type(None))}


def encode(value, _depth: int = 0):
    """The JSON-ready encoding of `value`; raises PlainDataError for any type that is not exactly a plain one."""
    if _depth > MAX_DEPTH:
        raise PlainDataError(f"nested deeper than {MAX_DEPTH}")
    kind = type(value)
    if value is None or kind is bool:
        return value
    if kind is int:
        return ["i", hex(value)]
    if kind is float:
        return ["f", value.hex()]
    if kind is complex:
        return ["c", value.real.hex(), value.imag.hex()]
    if kind is str:
        return ["s", value]
    if kind is bytes:
        return ["b", base64.b64encode(value).decode("ascii")]
    if kind in _TAG_OF_SEQUENCE:
        return [_TAG_OF_SEQUENCE[kind], [encode(item, _depth + 1) for item in value]]
    if kind is dict:
        return ["d", [[encode(key, _depth + 1), encode(item, _depth + 1)] for key, item in value.items()]]
    if kind is type and _TYPES.get(value.__name__) is value:
        return ["T", value.__name__]
    raise PlainDataError(f"a {kind.__module__}.{kind.__qualname__} is not plain data")


def _to_plain(value, depth: int):
    """Best-effort conversion of look-alike values to exact plain types (runs on the untrusted side only)."""
    if depth > MAX_DEPTH:
        raise PlainDataError(f"nested deeper than {MAX_DEPTH}")
    kind = type(value)
    if value is None or kind in (bool, int, float, complex, str, bytes):
        return value
    if kind is type and _TYPES.get(value.__name__) is value:
        return value
    if kind in _TAG_OF_SEQUENCE:
        return kind(_to_plain(item, depth + 1) for item in value)
    if kind is dict:
        return {_to_plain(key, depth + 1): _to_plain(item, depth + 1) for key, item in value.items()}
    if kind.__module__ == "numpy" and hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        return _to_plain(value.item(), depth + 1)
    # Subclasses keep their base value, never their own methods: an int subclass whose __eq__ is always true
    # arrives as the int it holds.
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, complex):
        return complex(float.__float__(value.real), float.__float__(value.imag))
    if isinstance(value, str):
        return str.__getitem__(value, slice(None))
    if isinstance(value, bytes):
        return bytes.__getitem__(value, slice(None))
    for base in (list, tuple, set, frozenset):
        if isinstance(value, base):
            return base(_to_plain(item, depth + 1) for item in base.__iter__(value))
    if isinstance(value, dict):
        return {_to_plain(k, depth + 1): _to_plain(v, depth + 1) for k, v in dict.items(value)}
    raise PlainDataError(f"a {kind.__module__}.{kind.__qualname__} is not plain data")


def encode_lenient(value):
    """`encode` after turning subclasses of plain types and NumPy scalars into plain values; a top-level value
    of any other type becomes an opaque record (type name and truth value)."""
    try:
        return encode(_to_plain(value, 0))
    except PlainDataError:
        kind = type(value)
        if isinstance(value, (int, float, complex, str, bytes, list, tuple, set, frozenset, dict)):
            raise  # a plain value nested too deep, or holding something that is not plain
        return ["o", f"{kind.__module__}.{kind.__qualname__}"[:200], bool(value)]


def _float(text) -> float:
    if not isinstance(text, str) or len(text) > 64:
        raise PlainDataError(f"bad float {text!r}")
    try:
        return float.fromhex(text)
    except (ValueError, OverflowError):
        raise PlainDataError(f"bad float {text!r}") from None


class _Decoder:
    def __init__(self) -> None:
        self.nodes = 0

    def value(self, data, depth: int):
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise PlainDataError(f"more than {MAX_NODES} values")
        if depth > MAX_DEPTH:
            raise PlainDataError(f"nested deeper than {MAX_DEPTH}")
        if data is None or data is True or data is False:
            return data
        if type(data) is not list or not data or type(data[0]) is not str:
            raise PlainDataError(f"not an encoded value: {str(data)[:80]}")
        tag = data[0]
        if tag == "i" and len(data) == 2 and type(data[1]) is str:
            text = data[1]
            if len(text) > 10_000_000:
                raise PlainDataError("int too long")
            try:
                return int(text, 16)
            except ValueError:
                raise PlainDataError(f"bad int {text[:80]!r}") from None
        if tag == "f" and len(data) == 2:
            return _float(data[1])
        if tag == "c" and len(data) == 3:
            return complex(_float(data[1]), _float(data[2]))
        if tag == "s" and len(data) == 2 and type(data[1]) is str:
            return data[1]
        if tag == "b" and len(data) == 2 and type(data[1]) is str:
            try:
                return base64.b64decode(data[1].encode("ascii"), validate=True)
            except (ValueError, UnicodeEncodeError):
                raise PlainDataError("bad bytes") from None
        if tag in _SEQUENCE_TAGS and len(data) == 2 and type(data[1]) is list:
            items = [self.value(item, depth + 1) for item in data[1]]
            try:
                return _SEQUENCE_TAGS[tag](items)
            except TypeError as error:  # an unhashable member of a set
                raise PlainDataError(f"bad {_SEQUENCE_TAGS[tag].__name__}: {error}") from None
        if tag == "o" and len(data) == 3 and type(data[1]) is str and type(data[2]) is bool:
            return Opaque(data[1][:200], data[2])
        if tag == "T" and len(data) == 2 and type(data[1]) is str and data[1] in _TYPES:
            return _TYPES[data[1]]
        if tag == "d" and len(data) == 2 and type(data[1]) is list:
            result = {}
            for pair in data[1]:
                if type(pair) is not list or len(pair) != 2:
                    raise PlainDataError("bad dict entry")
                key = self.value(pair[0], depth + 1)
                try:
                    result[key] = self.value(pair[1], depth + 1)
                except TypeError as error:
                    raise PlainDataError(f"bad dict key: {error}") from None
            return result
        raise PlainDataError(f"unknown or malformed tag {tag[:20]!r}")


def decode(data):
    """The value an `encode` result stands for; raises PlainDataError for anything else."""
    return _Decoder().value(data, 0)


def dumps(value) -> str:
    """`encode` as one line of JSON text."""
    return json.dumps(encode(value), separators=(",", ":"))


def loads_json(text: str | bytes):
    """Bounded `json.loads` of a message (any JSON, not yet decoded); raises PlainDataError."""
    if len(text) > MAX_TEXT_BYTES:
        raise PlainDataError(f"message longer than {MAX_TEXT_BYTES} bytes")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as error:
        raise PlainDataError(f"not JSON: {str(error)[:120]}") from None


def loads(text: str | bytes):
    """The value a `dumps` line stands for; raises PlainDataError."""
    return decode(loads_json(text))


def values_equal(left, right) -> bool:
    """`left == right` of two decoded values (plain types only, so this runs no foreign code)."""
    try:
        return bool(left == right)
    except RecursionError:
        return False


def is_float_like(value) -> bool:
    """A float, or a non-empty list or tuple of floats (EvalPlus's rule for applying a default tolerance)."""
    if type(value) is float:
        return True
    return type(value) in (list, tuple) and all(type(item) is float for item in value)


def close_enough(actual, expected, atol: float, rtol: float = 1e-7) -> bool:
    """Whether two (nested) numeric values agree within `atol` + `rtol` * |expected|, element by element, like
    numpy.testing.assert_allclose: same shape, nan equal to nan, infinities equal only to themselves."""
    numeric = (int, float)
    if type(actual) in numeric and type(expected) in numeric:
        try:
            if math.isnan(actual) or math.isnan(expected):
                return math.isnan(actual) and math.isnan(expected)
            if math.isinf(actual) or math.isinf(expected):
                return actual == expected
            return abs(actual - expected) <= atol + rtol * abs(expected)
        except OverflowError:  # ints beyond float range
            return actual == expected
    if type(actual) in (list, tuple) and type(expected) in (list, tuple):
        return len(actual) == len(expected) and all(
            close_enough(a, e, atol, rtol) for a, e in zip(actual, expected))
    return values_equal(actual, expected)
