"""The encoding that carries values across the sandbox boundary: types kept, exact round trips, strict decoding."""

from __future__ import annotations

import math
import re

import pytest

from phi1.eval import plain_data


@pytest.mark.parametrize("value", [
    None, True, False, 0, 1, -(2**200), 1.5, -0.0, float("inf"), 1e-300, 2 + 3j, "", "caf\u00e9 \ud800", b"\x00\xff",
    [], (), [1, (2, [3.0])], (1,), {1: "a", (1, 2): [None]}, set(), {1, 2.5, "x"}, frozenset({(1, 2)}),
    {True: 1, 1.5: {"nested": frozenset()}}, int, str, type(None),
])
def test_round_trip_keeps_value_and_type(value):
    back = plain_data.loads(plain_data.dumps(value))
    assert back == value and type(back) is type(value)
    assert repr(back) == repr(value)  # 1 vs 1.0 vs True, list vs tuple, -0.0


def test_nan_round_trips():
    assert math.isnan(plain_data.loads(plain_data.dumps(float("nan"))))


@pytest.mark.parametrize("value", [object(), lambda: 1, re.compile("a"), [1, object()], {"k": print}])
def test_strict_encode_refuses_what_is_not_plain(value):
    with pytest.raises(plain_data.PlainDataError, match="not plain data"):
        plain_data.encode(value)


def test_lenient_encode_strips_subclasses_and_wraps_other_objects():
    class AlwaysEqualInt(int):
        def __eq__(self, other):
            return True

        __hash__ = int.__hash__

    class OddStr(str):
        def __eq__(self, other):
            return True

        __hash__ = str.__hash__

    value = plain_data.decode(plain_data.encode_lenient([AlwaysEqualInt(3), OddStr("a")]))
    assert type(value[0]) is int and value[0] == 3 and value[0] != 4
    assert type(value[1]) is str and value[1] != "b"
    match = plain_data.decode(plain_data.encode_lenient(re.search("a", "a")))
    assert isinstance(match, plain_data.Opaque) and bool(match) is True
    assert match != True and match != match.__class__("re.Match", True)  # noqa: E712 - equal only to itself
    with pytest.raises(plain_data.PlainDataError):
        plain_data.encode(match)  # an opaque stand-in is never sent back as an argument
    numpy = pytest.importorskip("numpy")
    scalar = plain_data.decode(plain_data.encode_lenient(numpy.int64(7)))
    assert type(scalar) is int and scalar == 7


@pytest.mark.parametrize("data", [
    ["i", "0xzz"], ["i", 5], ["f", "nonsense"], ["s"], ["s", 1], ["b", "!!"], ["l", "x"], ["S", [["l", []]]],
    ["d", [[["l", []], None]]], ["d", [[1]]], ["T", "object"], ["o", "x", 1], ["q", []], [], 3, "text", {"a": 1},
])
def test_decode_refuses_malformed(data):
    with pytest.raises(plain_data.PlainDataError):
        plain_data.decode(data)


def test_depth_and_size_are_bounded():
    deep = None
    for _ in range(plain_data.MAX_DEPTH + 2):
        deep = ["l", [deep]]
    with pytest.raises(plain_data.PlainDataError, match="deeper"):
        plain_data.decode(deep)
    with pytest.raises(plain_data.PlainDataError):
        plain_data.loads("[" * 100_000 + "]" * 100_000)
    with pytest.raises(plain_data.PlainDataError, match="longer"):
        plain_data.loads_json(" " * (plain_data.MAX_TEXT_BYTES + 1))


def test_close_enough_follows_assert_allclose():
    assert plain_data.close_enough(1.0 + 1e-7, 1.0, atol=1e-6)
    assert not plain_data.close_enough(1.001, 1.0, atol=1e-6)
    assert plain_data.close_enough([1.0, float("nan")], [1.0, float("nan")], atol=1e-6)
    assert not plain_data.close_enough([1.0], [1.0, 2.0], atol=1e-6)
    assert not plain_data.close_enough(float("inf"), 1e308, atol=1e-6)
    assert not plain_data.close_enough(10**400, 1.0, atol=1e-6)  # beyond float range: exact comparison
    assert plain_data.is_float_like([1.0, 2.0]) and not plain_data.is_float_like([1, 2.0])
