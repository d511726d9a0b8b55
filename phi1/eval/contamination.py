"""Contamination in the eval report: pass@k split into benchmark problems with and without a near match in the
training data, at the paper's thresholds (phi-1, section 5).

A problem is *contaminated* at a threshold when some training document comes that close to it:

- `13-gram`: the document shares at least `ngram_min_shared` (1) distinct 13-word n-grams with the problem's
  prompt + solution;
- `ast>=0.95`, `ast>=0.9`, `ast>=0.85`, `ast>=0.8`: a function of the document has an AST match rate of at least
  tau with the problem's solution function;
- `embedding`: the L2 distance of unit mean embeddings is below the index's threshold (only when the index was
  built with an embedding model);
- `any`: any of the above at its loosest threshold.

The matching itself is phi1.quality.decontamination's (the same checks that prune the corpus); this module
keeps its result, per problem, in a *contamination index*, a JSON file:

    {"format": "phi1-contamination-index", "version": 1,
     "thresholds": {"ngram_n": 13, "ngram_min_shared": 1, "ast_taus": [0.95, 0.9, 0.85, 0.8], "ast_min_tokens": 16,
                    "constant_values": false, "embedding_model": null, "embedding_threshold": 0.05},
     "references": ["HumanEval/0", ...],            # the problems that were checked
     "training_data": ["data/train.jsonl"], "documents": 120000,
     "near": {"HumanEval/3": {"ngram_shared": 4, "ngram_source": "data/train.jsonl:812",
                              "ast_similarity": 0.93, "ast_source": "data/train.jsonl:77"}, ...}}

`tools/decontaminate.py --index FILE` writes it while it prunes (the recipe's decontaminate step);
`phi1-eval --training-data FILES` builds one on the fly. An index is untrusted input: it is plain JSON read
from one bounded regular file (never unpickled), it names no file that is ever opened (the `*_source` strings
are only shown), and a directory given as the index is searched for `decontamination_index.json` inside it
only. Every malformed field is one ValueError naming the file and the field.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from phi1.eval.pass_at_k import mean_pass_at_k
from phi1.eval.tasks import Problem
from phi1.loading.paths import inside, read_json_object
from phi1.quality.decontamination import (
    PAPER_TAUS,
    DecontaminationConfig,
    Reference,
    decontaminate_chunk,
    merge_near,
)

INDEX_FORMAT = "phi1-contamination-index"
INDEX_VERSION = 1
INDEX_NAME = "decontamination_index.json"
"""The index's file name when a directory is given."""
MAX_INDEX_BYTES = 64 << 20
"""A HumanEval + MBPP index is a few hundred KB; far larger is not an index."""
MAX_REFERENCES = 1_000_000
MAX_SOURCE_CHARS = 4096
NO_INDEX = "no contamination index given"


@dataclass
class ContaminationIndex:
    """What the training data holds near each benchmark problem (see the module docstring)."""

    thresholds: dict
    references: list[str]
    near: dict[str, dict] = field(default_factory=dict)
    training_data: list[str] = field(default_factory=list)
    documents: int = 0
    source: str = ""
    """Where the index came from (its path, or the training files it was built from), for the report."""

    def to_json(self) -> dict:
        return {"format": INDEX_FORMAT, "version": INDEX_VERSION, "thresholds": self.thresholds,
                "references": self.references, "training_data": self.training_data, "documents": self.documents,
                "near": self.near}

    def checks(self) -> dict[str, tuple[str, float]]:
        """{check name: (score key, threshold)} in report order; a problem is contaminated at a check when its
        best score reaches the threshold (n-grams and AST: at least; embedding distance: below)."""
        found = {"13-gram" if self.thresholds["ngram_n"] == 13 else f"{self.thresholds['ngram_n']}-gram":
                 ("ngram_shared", self.thresholds["ngram_min_shared"])}
        for tau in self.thresholds["ast_taus"]:
            found[f"ast>={tau:g}"] = ("ast_similarity", tau)
        if self.thresholds.get("embedding_model"):
            found["embedding"] = ("embedding_distance", self.thresholds["embedding_threshold"])
        return found

    def contaminated(self, task_id: str, check: str) -> bool:
        """Whether `task_id` has a near match at `check` ('any': at any check)."""
        entry = self.near.get(task_id)
        if not entry:
            return False
        checks = self.checks()
        names = list(checks) if check == "any" else [check]
        for name in names:
            key, threshold = checks[name]
            if key in entry and (entry[key] < threshold if key == "embedding_distance" else entry[key] >= threshold):
                return True
        return False


def thresholds_of(config: DecontaminationConfig) -> dict:
    """The index's record of the thresholds a DecontaminationConfig checks at."""
    # The AST index reports every match down to the lowest of tau and the reported taus (0 disables the check).
    taus = sorted({*config.report_taus, config.tau}, reverse=True) if config.tau > 0 else []
    return {"ngram_n": config.ngram_n, "ngram_min_shared": config.ngram_min_shared, "ast_taus": taus,
            "ast_min_tokens": config.ast_min_tokens, "constant_values": config.constant_values,
            "embedding_model": config.embedding_model, "embedding_threshold": config.embedding_threshold}


def index_from_results(references: list[Reference], config: DecontaminationConfig, results: list,
                       inputs: list[str]) -> ContaminationIndex:
    """The index of a decontamination run: its chunk results (phi1.quality.decontamination.ChunkResult, in
    chunk order) merged."""
    return ContaminationIndex(
        thresholds=thresholds_of(config), references=[r.task_id for r in references],
        near=merge_near([r.near for r in results]), training_data=[os.fspath(p) for p in inputs],
        documents=sum(r.stats.good for r in results), source=", ".join(os.fspath(p) for p in inputs))


def write_index(index: ContaminationIndex, path: str | os.PathLike) -> Path:
    """Write the index as JSON (a temporary file renamed into place); returns the path."""
    path = Path(path)
    if path.is_dir():
        path = path / INDEX_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(index.to_json(), indent=1) + "\n", encoding="utf-8")
    os.replace(temporary, path)
    return path


def references_of(problems: Sequence[Problem]) -> list[Reference]:
    """The problems as the decontamination checks see them: prompt + reference solution, whose functions the
    AST check compares (HumanEval's prompt + canonical solution, exactly as load_humaneval_references gives;
    MBPP's docstring prompt + code). A problem without a reference solution is checked on its prompt."""
    references = []
    for problem in problems:
        code = problem.prompt + (problem.reference or "")
        references.append(Reference(problem.task_id, code, code, problem.entry_point))
    return references


def build_index(training_data: list[str], problems: Sequence[Problem], config: DecontaminationConfig | None = None,
                workers: int = 1, progress: bool = True) -> ContaminationIndex:
    """Check every document of `training_data` (jsonl(.gz) files) against `problems` and return the index.

    Raises:
        FileNotFoundError: a training file is missing.
        ValueError: a file holds no usable document (names it and says why), or a problem's solution has no
            function to compare.
    """
    from phi1.quality.jsonl import LineStats
    from phi1.quality.shards import default_chunk_bytes, plan_chunks, run_chunks

    config = config or DecontaminationConfig(report_taus=PAPER_TAUS)
    for path in training_data:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--training-data {path}: no such file")
    references = references_of(problems)
    chunks = plan_chunks(list(training_data), default_chunk_bytes(list(training_data), workers))
    work_dir = tempfile.mkdtemp(prefix="phi1-contamination-")
    try:
        worker = functools.partial(decontaminate_chunk, references, config, work_dir)
        results = run_chunks(chunks, worker, workers, "contamination index", progress=progress)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)  # the pruned copy and pair report are not wanted here
    stats = LineStats()
    for result in results:
        stats.merge(result.stats)
    if stats.good == 0:
        raise ValueError(f"--training-data {' '.join(training_data)}: no document with a {config.text_key!r} "
                         f"string ({stats.summary()}); set --training-text-key to the field holding the text "
                         "(prompt+solution for exercises)")
    return index_from_results(references, config, results, training_data)


# -- reading an index (untrusted) --------------------------------------------------------------------------------


def _number(where: str, name: str, value, low: float, high: float, integer: bool = False):
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value) or not low <= value <= high:
        kind = "an integer" if integer else "a finite number"
        raise ValueError(f"{where}: {name} must be {kind} in [{low:g}, {high:g}], got {str(value)[:40]}")
    return value


def _string(where: str, name: str, value, limit: int = MAX_SOURCE_CHARS) -> str:
    if not isinstance(value, str) or len(value) > limit:
        raise ValueError(f"{where}: {name} must be a string of at most {limit} characters")
    return value


def load_index(path: str | os.PathLike) -> ContaminationIndex:
    """Read and check a contamination index (a JSON file, or a directory holding `decontamination_index.json`).

    Raises:
        FileNotFoundError: nothing there.
        ValueError: one line naming the file and what is wrong: not a bounded regular UTF-8 JSON file, another
            format or version, or a field of the wrong type or range.
    """
    given = Path(path)
    if given.is_dir():
        shown = f"--contamination-index {given / INDEX_NAME}"
        try:
            path = inside(given, INDEX_NAME, "contamination index")
        except ValueError as error:
            raise ValueError(f"--contamination-index {error}") from None
    else:
        shown = f"--contamination-index {given}"
    if not Path(path).exists():
        raise FileNotFoundError(f"{shown}: no such file; write one with tools/decontaminate.py --index, or pass "
                                "--training-data FILES to build one")
    record = read_json_object(path, shown, MAX_INDEX_BYTES)
    if record.get("format") != INDEX_FORMAT:
        raise ValueError(f"{shown}: not a contamination index (format is not {INDEX_FORMAT!r}); write one with "
                         "tools/decontaminate.py --index")
    if record.get("version") != INDEX_VERSION:
        raise ValueError(f"{shown}: index version {str(record.get('version'))[:20]}, this phi1 reads version "
                         f"{INDEX_VERSION}; rebuild it with tools/decontaminate.py --index")
    thresholds = record.get("thresholds")
    if not isinstance(thresholds, dict):
        raise ValueError(f"{shown}: 'thresholds' must be an object")
    checked = {
        "ngram_n": _number(shown, "thresholds.ngram_n", thresholds.get("ngram_n"), 1, 10_000, integer=True),
        "ngram_min_shared": _number(shown, "thresholds.ngram_min_shared", thresholds.get("ngram_min_shared"), 1,
                                    10**9, integer=True),
        "ast_min_tokens": _number(shown, "thresholds.ast_min_tokens", thresholds.get("ast_min_tokens", 16), 0,
                                  10**9, integer=True),
        "constant_values": bool(thresholds.get("constant_values", False)),
        "embedding_threshold": _number(shown, "thresholds.embedding_threshold",
                                       thresholds.get("embedding_threshold", 0.05), 0, 2),
    }
    taus = thresholds.get("ast_taus")
    if not isinstance(taus, list) or len(taus) > 100:
        raise ValueError(f"{shown}: thresholds.ast_taus must be a list of AST match thresholds in (0, 1]")
    checked["ast_taus"] = sorted({float(_number(shown, "thresholds.ast_taus", t, 1e-9, 1)) for t in taus},
                                 reverse=True)
    model = thresholds.get("embedding_model")
    checked["embedding_model"] = None if model is None else _string(shown, "thresholds.embedding_model", model)
    references = record.get("references")
    if not isinstance(references, list) or len(references) > MAX_REFERENCES:
        raise ValueError(f"{shown}: 'references' must be a list of the task ids that were checked")
    references = [_string(shown, "references[]", r, 200) for r in references]
    near = record.get("near")
    if not isinstance(near, dict):
        raise ValueError(f"{shown}: 'near' must be an object of task id -> best scores")
    known = set(references)
    entries = {}
    for task_id, entry in near.items():
        where = f"{shown}: near[{task_id[:80]!r}]"
        if task_id not in known:
            raise ValueError(f"{where}: the task id is not in 'references'")
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: must be an object of scores")
        kept = {}
        for key, low, high, integer in (("ngram_shared", 0, 10**12, True), ("ast_similarity", 0, 1, False),
                                        ("embedding_distance", 0, 2, False)):
            if key in entry:
                kept[key] = _number(where, key, entry[key], low, high, integer)
                source = key.split("_")[0] + "_source"
                kept[source] = _string(where, source, entry.get(source, ""))
        entries[task_id] = kept
    documents = _number(shown, "documents", record.get("documents", 0), 0, 10**15, integer=True)
    training = record.get("training_data", [])
    if not isinstance(training, list) or len(training) > 100_000:
        raise ValueError(f"{shown}: 'training_data' must be a list of file names")
    training = [_string(shown, "training_data[]", t) for t in training]
    return ContaminationIndex(thresholds=checked, references=references, near=entries, training_data=training,
                              documents=documents, source=str(given))


# -- the split ---------------------------------------------------------------------------------------------------


def _scores(rows: list[dict], ks: Sequence[int]) -> dict:
    part: dict = {"problems": len(rows)}
    if rows:
        ns, cs = [row["n"] for row in rows], [row["correct"] for row in rows]
        for k in ks:
            if k <= min(ns):
                part[f"pass@{k}"] = mean_pass_at_k(ns, cs, k)
    return part


def check_index_covers(index: ContaminationIndex, task_ids: Sequence[str]) -> None:
    """Refuse an index that checked none of the problems to be evaluated (built for another benchmark, or for
    none): called before generation, so the mismatch costs seconds, not a whole evaluation.

    Raises:
        ValueError: naming the index, a few of the task ids it knows and a few of these.
    """
    checked = set(index.references)
    if not any(task_id in checked for task_id in task_ids):
        raise ValueError(f"--contamination-index {index.source}: checked none of the evaluated problems (it knows "
                         f"{', '.join(index.references[:3]) or 'no problem'}...; these are "
                         f"{', '.join(list(task_ids)[:3])}...); build it against this benchmark")


def contamination_split(index: ContaminationIndex, per_problem: list[dict], ks: Sequence[int]) -> dict:
    """The report's `contamination` section: for each check, pass@k of the clean and the contaminated problems.

    Args:
        index: the contamination index.
        per_problem: the eval report's rows (task_id, n, correct).
        ks: the k of pass@k (those no larger than every problem's n are reported).

    Raises:
        ValueError: none of the evaluated problems was checked by the index (built for another benchmark).
    """
    check_index_covers(index, [row["task_id"] for row in per_problem])
    checked = set(index.references)
    rows = [row for row in per_problem if row["task_id"] in checked]
    unchecked = [row["task_id"] for row in per_problem if row["task_id"] not in checked]
    split = {}
    for check in [*index.checks(), "any"]:
        dirty = [row for row in rows if index.contaminated(row["task_id"], check)]
        clean = [row for row in rows if not index.contaminated(row["task_id"], check)]
        split[check] = {"clean": _scores(clean, ks),
                        "contaminated": {**_scores(dirty, ks), "task_ids": [row["task_id"] for row in dirty]}}
    return {"index": index.source, "training_data": index.training_data, "documents": index.documents,
            "thresholds": index.thresholds, "checked_problems": len(rows), "unchecked_problems": unchecked,
            "split": split}


def split_table(section: dict | str, k: str = "pass@1") -> str:
    """The split as an aligned text table (or the line saying there was no index)."""
    if isinstance(section, str):
        return f"contamination: {section}"
    lines = [f"contamination ({section['checked_problems']} problems checked against {section['index']}):",
             f"  {'check':<10} {'clean':>7} {k + ' clean':>13} {'contaminated':>13} {k + ' contam.':>15}"]
    for check, parts in section["split"].items():
        clean, dirty = parts["clean"], parts["contaminated"]

        def shown(part: dict) -> str:
            return f"{part[k]:.3f}" if k in part else "-"

        lines.append(f"  {check:<10} {clean['problems']:>7} {shown(clean):>13} {dirty['problems']:>13} "
                     f"{shown(dirty):>15}")
    if section["unchecked_problems"]:
        lines.append(f"  not in the index: {len(section['unchecked_problems'])} problems")
    return "\n".join(lines)
