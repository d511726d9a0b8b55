"""Exact and near-duplicate detection for generated text: content hashes and MinHash with LSH banding."""

from __future__ import annotations

import hashlib
import re

import numpy as np

_WORDS = re.compile(r"\w+")
_PRIME = (1 << 61) - 1


def exact_key(text: str) -> str:
    """Hash of the text with whitespace runs collapsed and case folded (layout-only changes collide)."""
    return hashlib.sha256(" ".join(text.split()).casefold().encode()).hexdigest()


def shingles(text: str, size: int = 5) -> set[int]:
    """Stable 64-bit hashes of the word `size`-grams of `text` (the whole text when it is shorter)."""
    words = _WORDS.findall(text.casefold())
    grams = [" ".join(words[i: i + size]) for i in range(max(1, len(words) - size + 1))]
    return {int.from_bytes(hashlib.blake2b(g.encode(), digest_size=8).digest(), "little") >> 3 for g in grams}


class NearDuplicateIndex:
    """MinHash signatures in LSH bands: `add` texts, ask `find` for one whose Jaccard similarity of word
    shingles is estimated at or above `threshold`.

    Args:
        threshold: estimated Jaccard similarity at which a text is a near duplicate.
        permutations: MinHash length (bands x rows).
        bands: LSH bands; two texts become candidates when one band of their signatures is equal.
    """

    def __init__(self, threshold: float = 0.8, permutations: int = 64, bands: int = 16, seed: int = 0) -> None:
        if permutations % bands:
            raise ValueError(f"permutations ({permutations}) must be a multiple of bands ({bands})")
        rng = np.random.default_rng(seed)
        self.threshold = threshold
        self.rows = permutations // bands
        self.bands = bands
        self._a = rng.integers(1, _PRIME, size=permutations, dtype=np.uint64).astype(object)
        self._b = rng.integers(0, _PRIME, size=permutations, dtype=np.uint64).astype(object)
        self._buckets: list[dict[tuple, list[str]]] = [{} for _ in range(bands)]
        self._signatures: dict[str, np.ndarray] = {}

    def signature(self, text: str) -> np.ndarray:
        """(permutations,) MinHash of the text's shingles (exact integer arithmetic mod 2^61 - 1)."""
        values = np.array(sorted(shingles(text)), dtype=object)
        hashed = (np.outer(self._a, values) + self._b[:, None]) % _PRIME  # (permutations, shingles)
        return hashed.min(axis=1).astype(np.uint64)

    def find(self, text: str) -> tuple[str | None, float]:
        """(key of the most similar indexed text at or above the threshold, its estimated similarity)."""
        signature = self.signature(text)
        best, best_score = None, 0.0
        seen: set[str] = set()
        for band in range(self.bands):
            piece = tuple(signature[band * self.rows: (band + 1) * self.rows].tolist())
            for key in self._buckets[band].get(piece, ()):
                if key in seen:
                    continue
                seen.add(key)
                score = float((self._signatures[key] == signature).mean())
                if score >= self.threshold and score > best_score:
                    best, best_score = key, score
        return best, best_score

    def add(self, key: str, text: str) -> None:
        """Index `text` under `key`."""
        signature = self.signature(text)
        self._signatures[key] = signature
        for band in range(self.bands):
            piece = tuple(signature[band * self.rows: (band + 1) * self.rows].tolist())
            self._buckets[band].setdefault(piece, []).append(key)
