"""Corpus near-dedup on datatrove's MinHash stages: the S-curve arithmetic, agreement with exact Jaccard
clustering on 2,000 documents, deterministic output, resuming from datatrove's completion markers, and the CLI's
clear errors."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from phi1.quality.minhash import (
    MinhashSettings,
    best_bands_rows,
    detection_probability,
    duplicate_agreement,
    exact_duplicate_clusters,
    lsh_errors,
    mutated_corpus,
    removed_ids,
    run_dedup,
    write_shards,
)
from phi1.testing.hostile import assert_clear_error, python, run_bounded

ROOT = Path(__file__).resolve().parents[1]
TOOL = str(ROOT / "tools" / "dedup.py")


def test_s_curve_numbers() -> None:
    assert detection_probability(0.8, 14, 8) == pytest.approx(0.9235, abs=1e-4)
    assert detection_probability(0.5, 14, 8) == pytest.approx(0.0533, abs=1e-4)
    assert best_bands_rows(0.8, 112) == (9, 12)
    assert best_bands_rows(0.7, 112) == (12, 9)
    fp, fn = lsh_errors(0.8, 9, 12)
    assert fp == pytest.approx(0.0332, abs=1e-3) and fn == pytest.approx(0.0272, abs=1e-3)
    assert lsh_errors(0.8, 14, 8)[0] > fp  # datatrove's default removes more below 0.8


def test_agreement_counts_one_kept_per_cluster() -> None:
    clusters = [0, 0, 0, 1, 2, 2]  # exact: remove 2 of cluster 0 and 1 of cluster 2
    result = duplicate_agreement({0, 1, 2, 3}, clusters)  # all of cluster 0 (one too many) and a singleton
    assert result["exact_removed"] == 3 and result["correct"] == 2
    assert result["precision"] == 0.5 and result["recall"] == pytest.approx(2 / 3)


@pytest.fixture(scope="module")
def sample() -> list[str]:
    return mutated_corpus(2000, seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("bands, rows, precision, recall", [(9, 12, 0.70, 0.78), (14, 8, 0.45, 0.95)])
def test_agreement_with_exact_jaccard_on_2000_documents(tmp_path, sample, bands, rows, precision, recall) -> None:
    paths = write_shards(sample, str(tmp_path / "in"), 3)
    counts = run_dedup(str(tmp_path / "in"), str(tmp_path / "out"), str(tmp_path / "work"),
                       MinhashSettings(bands=bands, rows=rows), workers=2)
    removed = {int(i.split("-")[1]) for i in removed_ids(paths, str(tmp_path / "out"))}
    assert counts["documents"] == 2000 and counts["removed"] == len(removed) > 0
    agreement = duplicate_agreement(removed, exact_duplicate_clusters(sample, 0.8, MinhashSettings()))
    print(bands, rows, agreement)
    assert agreement["precision"] >= precision and agreement["recall"] >= recall


@pytest.mark.slow
def test_deterministic_and_resumes_from_completion_markers(tmp_path, sample) -> None:
    write_shards(sample[:300], str(tmp_path / "in"), 2)
    with open(tmp_path / "in" / "shard-000.jsonl", "a") as handle:  # other fields come back as they were
        handle.write('{"id": "extra", "text": "a text of its own with seven words", "score": 0.5}\n')
    first = run_dedup(str(tmp_path / "in"), str(tmp_path / "out1"), str(tmp_path / "work1"), workers=2)
    run_dedup(str(tmp_path / "in"), str(tmp_path / "out2"), str(tmp_path / "work2"), workers=1)

    def read(folder: str) -> dict[str, bytes]:
        return {n: (tmp_path / folder / n).read_bytes() for n in sorted(os.listdir(tmp_path / folder))}

    assert read("out1") == read("out2") and first["removed"] > 0
    records = [json.loads(line) for line in read("out1")["00000.jsonl"].decode().splitlines()]
    assert {"id": "extra", "text": "a text of its own with seven words", "score": 0.5} in records
    assert all(set(r) == {"id", "text"} for r in records if r["id"] != "extra")
    # A task killed before finishing: its output and completion marker are gone; the rerun redoes only it.
    os.remove(tmp_path / "out1" / "00000.jsonl")
    os.remove(tmp_path / "work1" / "logs" / "stage4" / "completions" / "00000")
    shutil.rmtree(tmp_path / "work1" / "buckets")  # completed stages are not run again: their data is not read
    run_dedup(str(tmp_path / "in"), str(tmp_path / "out1"), str(tmp_path / "work1"), workers=2)
    assert read("out1") == read("out2")


@pytest.mark.parametrize("case", ["missing_input", "threshold", "half_banding", "output_inside_input", "no_output"])
def test_dedup_cli_bad_input_is_one_clear_line(tmp_path, case) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text('{"id": "a", "text": "x"}\n')
    base = ["--input", str(tmp_path / "in"), "--output-dir", str(tmp_path / "out"), "--work-dir", str(tmp_path / "w")]
    argv, names = {
        "missing_input": (["--input", str(tmp_path / "nope"), *base[2:]], "nope"),
        "threshold": ([*base, "--threshold", "1.5"], "--threshold"),
        "half_banding": ([*base, "--bands", "4"], "--bands"),
        "output_inside_input": ([*base[:2], "--output-dir", str(tmp_path / "in" / "o"), *base[4:]], "--output-dir"),
        "no_output": (base[:2], "--output-dir"),
    }[case]
    assert_clear_error(run_bounded(python(TOOL, *argv), timeout_s=120), names=names)
