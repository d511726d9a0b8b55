"""AST match rate: how alike two functions' syntax trees are once names, docstrings and formatting are gone.

A function becomes the pre-order sequence of its tree's nodes (`ast` class names), where each variable,
argument and function name is replaced by a placeholder numbered by first appearance (v0, v1, ...), so
renaming changes nothing; comments and formatting are not in the tree; docstrings are dropped. Built-in names
(`len`, `range`) and attribute names (`.append`) are kept: renaming a copy does not touch them and they tell
unrelated functions apart. Similarity is 1 - edit distance / length of the longer sequence, the pre-order
approximation of a normalised tree edit distance (the paper's "AST match rate").

Comparing every function of a large corpus with every benchmark solution is made cheap by two exact upper
bounds on the similarity, checked with NumPy before any edit distance: the length ratio, and the overlap of
hashed token histograms (an edit turns one token into one other, so the multiset difference of any
projection of the tokens bounds the distance from below).
"""

from __future__ import annotations

import ast
import builtins
import re
import zlib
from dataclasses import dataclass

import numpy as np

BUILTIN_NAMES = frozenset(dir(builtins))
_FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)
_CONTEXTS = frozenset((ast.Load, ast.Store, ast.Del))
_NAME_FIELDS = frozenset(("name", "id", "arg", "attr", "asname", "type_comment"))
_NAME_AND_ANNOTATION_FIELDS = _NAME_FIELDS | {"returns", "annotation", "type_params"}
# ```python ... ``` blocks of a markdown document (synthetic textbooks hold code this way).
_FENCED = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)


@dataclass(frozen=True)
class NormaliseOptions:
    """What survives normalisation."""

    constant_values: bool = False
    """Keep constants' values ('c:int:3'); by default only their type ('c:int') so changed literals still match."""
    annotations: bool = False
    """Keep type annotations; by default dropped (adding or removing hints does not make new code)."""


@dataclass
class FunctionSequence:
    """One function's normalised pre-order sequence."""

    name: str
    line: int
    tokens: list[str]


def _docstring_free(body: list[ast.stmt]) -> list[ast.stmt]:
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        return body[1:]
    return body


class _Normaliser:
    def __init__(self, options: NormaliseOptions) -> None:
        self.options = options
        self.names: dict[str, str] = {}
        self.tokens: list[str] = []
        self.functions: list[tuple[str, int, int, int]] = []
        """(name, line, start, end) of each function's span in `tokens`."""

    def name(self, identifier: str | None) -> str:
        if identifier is None:
            return "_"
        if identifier in BUILTIN_NAMES:
            return identifier
        placeholder = self.names.get(identifier)
        if placeholder is None:
            placeholder = self.names[identifier] = f"v{len(self.names)}"
        return placeholder

    def visit(self, node: ast.AST) -> None:
        kind = type(node)
        if kind in _CONTEXTS:
            return
        out = self.tokens
        start = len(out)
        out.append(kind.__name__)
        if kind is ast.Name:
            out.append(self.name(node.id))
            return
        if kind is ast.Constant:
            value_kind = type(node.value).__name__
            out.append(f"c:{value_kind}:{node.value!r}" if self.options.constant_values else f"c:{value_kind}")
            return
        if kind is ast.Attribute:
            self.visit(node.value)
            out.append("." + node.attr)
            return
        if kind is ast.arg:
            out.append(self.name(node.arg))
            if self.options.annotations and node.annotation is not None:
                self.visit(node.annotation)
            return
        is_function = kind in _FUNCTIONS
        if is_function or kind is ast.ClassDef:
            out.append(self.name(node.name))
        elif kind is ast.keyword:
            out.append(f"kw:{node.arg}")
        elif kind is ast.alias:
            out.append(node.name)
            if node.asname:
                out.append(self.name(node.asname))
            return
        elif kind is ast.Global or kind is ast.Nonlocal:
            out.extend(self.name(n) for n in node.names)
            return
        elif kind is ast.ExceptHandler and node.name:
            out.append(self.name(node.name))
        skipped = _NAME_FIELDS if self.options.annotations else _NAME_AND_ANNOTATION_FIELDS
        for field_name in node._fields:
            if field_name in skipped:
                continue
            value = getattr(node, field_name, None)
            if type(value) is list:
                if field_name == "body" and (is_function or kind is ast.ClassDef or kind is ast.Module):
                    value = _docstring_free(value)
                for item in value:
                    if isinstance(item, ast.AST):
                        self.visit(item)
            elif isinstance(value, ast.AST):
                self.visit(value)
        if is_function:
            self.functions.append((node.name, node.lineno, start, len(out)))


def _renumbered(tokens: list[str]) -> list[str]:
    """Placeholders numbered again from v0 by first appearance within `tokens` (a function's own span)."""
    mapping: dict[str, str] = {}
    result = []
    for token in tokens:
        if token[0] == "v" and token[1:].isdigit():
            token = mapping.setdefault(token, f"v{len(mapping)}")
        result.append(token)
    return result


def normalise(node: ast.AST, options: NormaliseOptions | None = None) -> list[str]:
    """The normalised pre-order token sequence of a syntax tree (names numbered from v0 within it)."""
    normaliser = _Normaliser(options or NormaliseOptions())
    normaliser.visit(node)
    return normaliser.tokens


def parse_code(text: str) -> list[ast.Module]:
    """The modules in `text`: the whole of it when it parses, else each fenced ```python block that parses.

    Raises SyntaxError when nothing in it parses (the caller counts the document as unparsable).
    """
    try:
        return [ast.parse(text)]
    except (SyntaxError, ValueError) as error:  # ValueError: NUL bytes in the source
        first_error = error
    modules = []
    for block in _FENCED.findall(text):
        try:
            modules.append(ast.parse(block))
        except (SyntaxError, ValueError):
            continue
    if not modules:
        raise SyntaxError(f"no Python in it parses ({first_error})")
    return modules


def function_sequences(text: str, options: NormaliseOptions | None = None) -> list[FunctionSequence]:
    """The normalised sequence of every function (methods and nested functions included) in `text`.

    Raises SyntaxError when no part of `text` parses.
    """
    sequences = []
    for module in parse_code(text):
        # One pass over the module; each function's span is cut out and its names renumbered from v0, which
        # is what normalising the function alone gives (nested functions included).
        normaliser = _Normaliser(options or NormaliseOptions())
        normaliser.visit(module)
        for name, line, start, end in sorted(normaliser.functions, key=lambda f: f[2]):
            sequences.append(FunctionSequence(name, line, _renumbered(normaliser.tokens[start:end])))
    return sequences


def levenshtein(a: list, b: list) -> int:
    """Edit distance (insert, delete, substitute; each costs 1) between two sequences of hashables.

    Myers' bit-parallel algorithm (Hyyrö's formulation) with Python integers as bit vectors as long as `a`:
    O(len(b)) big-integer operations instead of a len(a) x len(b) table.
    """
    if len(a) < len(b):
        a, b = b, a  # the shorter one is the text: fewer iterations
    m = len(a)
    if m == 0:
        return len(b)
    if not b:
        return m
    match_masks: dict = {}
    for position, item in enumerate(a):
        match_masks[item] = match_masks.get(item, 0) | (1 << position)
    all_ones = (1 << m) - 1
    top = 1 << (m - 1)
    plus, minus, distance = all_ones, 0, m
    for item in b:
        equal = match_masks.get(item, 0)
        vertical = equal | minus
        horizontal = (((equal & plus) + plus) ^ plus) | equal
        horizontal_plus = minus | ~(horizontal | plus)
        horizontal_minus = plus & horizontal
        if horizontal_plus & top:
            distance += 1
        elif horizontal_minus & top:
            distance -= 1
        horizontal_plus = (horizontal_plus << 1) | 1
        horizontal_minus <<= 1
        plus = (horizontal_minus | ~(vertical | horizontal_plus)) & all_ones
        minus = horizontal_plus & vertical & all_ones
    return distance


def similarity(a: list, b: list) -> float:
    """1 - edit distance / longer length, in [0, 1]; 1.0 for two empty sequences."""
    longer = max(len(a), len(b))
    return 1.0 if longer == 0 else 1.0 - levenshtein(a, b) / longer


def _bucket(token: str, buckets: int) -> int:
    return zlib.crc32(token.encode()) % buckets


class ASTIndex:
    """Normalised reference functions (benchmark solutions) and their histograms for the prefilter.

    Args:
        tau: lowest similarity that `query` reports.
        min_tokens: a pair where either function is shorter than this counts only when the two sequences
            are identical: one edit in a one-liner (`return len(x)` vs `return len(x.data)`) is still
            "90% similar", and such near misses match unrelated library code.
        buckets: histogram width of the prefilter.
    """

    def __init__(self, tau: float = 0.8, min_tokens: int = 16, buckets: int = 256) -> None:
        if not 0.0 < tau <= 1.0:
            raise ValueError(f"AST match threshold tau must be in (0, 1], got {tau}")
        self.tau = tau
        self.min_tokens = min_tokens
        self.buckets = buckets
        self.names: list[str] = []
        self.sequences: list[list[str]] = []
        self._bucket_cache: dict[str, int] = {}
        self._histograms = np.zeros((0, buckets), dtype=np.int32)
        self._lengths = np.zeros(0, dtype=np.int64)

    def histogram(self, tokens: list[str]) -> np.ndarray:
        """(buckets,) counts of the tokens' hash buckets."""
        cache = self._bucket_cache
        indices = []
        for token in tokens:
            bucket = cache.get(token)
            if bucket is None:
                bucket = cache[token] = _bucket(token, self.buckets)
            indices.append(bucket)
        return np.bincount(np.array(indices, dtype=np.int64), minlength=self.buckets).astype(np.int32)

    def add(self, name: str, tokens: list[str]) -> None:
        """Index one reference function's normalised sequence under `name`."""
        self.names.append(name)
        self.sequences.append(tokens)
        self._histograms = np.vstack([self._histograms, self.histogram(tokens)[None, :]])
        self._lengths = np.append(self._lengths, len(tokens))

    def candidates(self, tokens: list[str]) -> np.ndarray:
        """Indices of references whose similarity with `tokens` can reach tau (the exact bounds only)."""
        if not self.names:
            return np.empty(0, dtype=np.int64)
        length = len(tokens)
        longer = np.maximum(self._lengths, length)
        possible = np.minimum(self._lengths, length) >= self.tau * longer
        if not possible.any():
            return np.empty(0, dtype=np.int64)
        rows = np.flatnonzero(possible)
        common = np.minimum(self._histograms[rows], self.histogram(tokens)[None, :]).sum(axis=1)
        return rows[common >= self.tau * longer[rows]]

    def query(self, functions: list[FunctionSequence]) -> dict[int, tuple[float, FunctionSequence]]:
        """{reference index: (best similarity, the function reaching it)} over `functions`, for those >= tau."""
        best: dict[int, tuple[float, FunctionSequence]] = {}
        for function in functions:
            for reference in self.candidates(function.tokens).tolist():
                other = self.sequences[reference]
                score = similarity(function.tokens, other)
                if min(len(other), len(function.tokens)) < self.min_tokens and score < 1.0:
                    continue
                if score >= self.tau and (reference not in best or score > best[reference][0]):
                    best[reference] = (score, function)
        return best
