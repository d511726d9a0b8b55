"""Hashed word n-grams of code and an index of a benchmark's n-grams, queried without pairwise comparison.

Each token gets a stable 64-bit hash (blake2b, the same on every machine and run, unlike Python's `hash`);
an n-gram's hash is a polynomial of its tokens' hashes mod 2^64, computed for a whole document at once with
NumPy. A document is checked against every benchmark problem by one sorted-array lookup of its n-gram hashes.
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict

import numpy as np

# Words: identifiers (keywords included) and numbers; punctuation is not a token. With punctuation counted,
# 13 tokens span only a few words and common idioms ("if len(x) > 0:") match unrelated library code.
TOKEN_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|\d+(?:\.\d+)?")
# Odd 64-bit multiplier of the polynomial hash (any odd constant with mixed bits would do).
_BASE = np.uint64(0x9E3779B97F4A7C15)


def tokenize(text: str) -> list[str]:
    """Word tokens of code or prose: identifiers, keywords and numbers."""
    return TOKEN_PATTERN.findall(text)


class TokenHasher:
    """Stable 64-bit token hashes, cached (a corpus has far fewer distinct tokens than tokens)."""

    def __init__(self) -> None:
        self._cache: dict[str, int] = {}

    def __call__(self, tokens: list[str]) -> np.ndarray:
        cache = self._cache
        values = []
        for token in tokens:
            value = cache.get(token)
            if value is None:
                value = int.from_bytes(hashlib.blake2b(token.encode(), digest_size=8).digest(), "little")
                if len(cache) < 4_000_000:  # bounded: an adversarial corpus cannot exhaust memory
                    cache[token] = value
            values.append(value)
        return np.array(values, dtype=np.uint64)


def ngram_hashes(token_hashes: np.ndarray, n: int) -> np.ndarray:
    """(L - n + 1,) uint64 hashes of the n-grams of a (L,) token-hash array (empty when L < n)."""
    count = len(token_hashes) - n + 1
    if count <= 0:
        return np.empty(0, dtype=np.uint64)
    result = np.zeros(count, dtype=np.uint64)
    with np.errstate(over="ignore"):  # wrapping mod 2^64 is the point
        for offset in range(n):
            result = result * _BASE + token_hashes[offset: offset + count]
    return result


class NGramIndex:
    """The distinct n-grams of a set of reference texts (benchmark problems), by hash.

    Args:
        n: n-gram length in tokens (the paper uses 13).
    """

    def __init__(self, n: int = 13) -> None:
        if n < 1:
            raise ValueError(f"n-gram length must be >= 1, got {n}")
        self.n = n
        self.hasher = TokenHasher()
        self.names: list[str] = []
        self.sizes: list[int] = []
        """Distinct n-grams of each reference text."""
        self._owners: dict[int, list[int]] = defaultdict(list)
        self._keys: np.ndarray | None = None

    def hashes(self, text: str) -> np.ndarray:
        """Distinct n-gram hashes of `text` (sorted)."""
        return np.unique(ngram_hashes(self.hasher(tokenize(text)), self.n))

    def add(self, name: str, text: str) -> None:
        """Index the n-grams of one reference text under `name`."""
        index = len(self.names)
        distinct = self.hashes(text)
        self.names.append(name)
        self.sizes.append(len(distinct))
        for value in distinct.tolist():
            self._owners[value].append(index)
        self._keys = None  # rebuilt on the next query

    def _sorted_keys(self) -> np.ndarray:
        if self._keys is None:
            self._keys = np.array(sorted(self._owners), dtype=np.uint64)
        return self._keys

    def query(self, text: str) -> dict[int, int]:
        """{reference index: number of distinct n-grams it shares with `text`}; empty when none."""
        keys = self._sorted_keys()
        if len(keys) == 0:
            return {}
        found = self.hashes(text)
        if len(found) == 0:
            return {}
        positions = np.searchsorted(keys, found)
        positions[positions == len(keys)] = 0
        shared = found[keys[positions] == found]
        counts: dict[int, int] = defaultdict(int)
        for value in shared.tolist():
            for owner in self._owners[value]:
                counts[owner] += 1
        return dict(counts)
