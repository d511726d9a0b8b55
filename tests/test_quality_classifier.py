"""Quality classifier: the NumPy tree walker equals sklearn, safe save/load, the multi-worker shard filter."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from phi1.quality.classifier import (
    ForestConfig,
    QualityClassifier,
    cross_validate,
    export_forest,
    fit_forest,
    forest_scores,
)


def _data(seed: int = 0, rows: int = 300, columns: int = 12):
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(rows, columns))
    labels = (features[:, 0] + features[:, 1] * features[:, 2] > 0).astype(np.int64)
    return features, labels


@pytest.mark.parametrize("regression", [False, True])
def test_walker_equals_sklearn_and_round_trips_without_pickle(tmp_path, regression) -> None:
    features, labels = _data()
    target = features[:, 0] * 0.3 + 0.5 if regression else labels
    forest = fit_forest(features, target, ForestConfig(trees=30, seed=1))
    classifier = QualityClassifier(export_forest(forest), {"n_features": 12})
    classifier.save(tmp_path / "cls")
    loaded = QualityClassifier.load(tmp_path / "cls")
    probe = np.random.default_rng(5).normal(size=(500, 12))
    np.testing.assert_allclose(loaded.score(probe), forest_scores(forest, probe), rtol=0, atol=1e-12)
    with np.load(tmp_path / "cls" / "forest.npz", allow_pickle=False) as stored:
        assert all(stored[name].dtype != object for name in stored.files)
    with pytest.raises(ValueError, match=r"expects \(N, 12\)"):
        loaded.score(probe[:, :5])


def test_corrupted_or_foreign_classifiers_are_refused(tmp_path) -> None:
    features, labels = _data()
    classifier = QualityClassifier(export_forest(fit_forest(features, labels, ForestConfig(trees=3))), {"n_features": 12})
    classifier.save(tmp_path / "ok")
    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "ok", bad)
    arrays = dict(np.load(bad / "forest.npz"))
    arrays["left"][arrays["left"] > 0] = 0  # a child pointing back to the root would loop forever
    np.savez(bad / "forest.npz", **arrays)
    with pytest.raises(ValueError, match="corrupted"):
        QualityClassifier.load(bad)
    header = json.loads((tmp_path / "ok" / "classifier.json").read_text())
    header["format_version"] = 99
    (bad / "classifier.json").write_text(json.dumps(header))
    with pytest.raises(ValueError, match="version 99"):
        QualityClassifier.load(bad)
    np.save(tmp_path / "pickled.npy", np.array([{"x": 1}], dtype=object))
    with pytest.raises(ValueError):  # what np.load(allow_pickle=False) does with object arrays
        np.load(tmp_path / "pickled.npy", allow_pickle=False)


def test_cross_validation_report_beats_the_majority_class() -> None:
    features, labels = _data(rows=400)
    report = cross_validate(features, labels, ForestConfig(trees=40), folds=4)
    assert report["auc"] > 0.8 and report["accuracy"] > report["majority_accuracy"] + 0.2
    assert 0 <= report["precision"] <= 1 and 0 <= report["recall"] <= 1 and len(report["auc_per_fold"]) == 4


@pytest.fixture(scope="module")
def nano_dir(tmp_path_factory) -> Path:
    from phi1.core.config import get_preset
    from phi1.core.model import PhiForCausalLM
    from phi1.core.pretrained import save_pretrained
    from phi1.data.tokenizer_training import main as train_tokenizer
    from phi1.quality.stdlib_functions import stdlib_functions

    work = tmp_path_factory.mktemp("nano")
    corpus = work / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f.source}) + "\n" for f in stdlib_functions(300, seed=3)))
    train_tokenizer(["--input", str(corpus), "--output-dir", str(work / "tok"), "--vocab-size", "512", "--threads", "1"])
    config = get_preset("phi-1-nano")
    save_pretrained(PhiForCausalLM(config, init_seed=0).state_dict(), config, work / "model")
    shutil.copyfile(work / "tok" / "tokenizer.model", work / "model" / "tokenizer.model")
    return work / "model"


@pytest.mark.slow
def test_train_then_filter_shards_with_two_workers(tmp_path, nano_dir, capsys) -> None:
    from phi1.quality.filter_cli import main
    from phi1.quality.stdlib_functions import documented_labelled_set

    labelled = tmp_path / "labels.jsonl"
    records = documented_labelled_set(60, seed=2)
    labelled.write_text("".join(json.dumps(r) + "\n" for r in records) + "{broken\n")
    main(["train", "--labelled", str(labelled), "--embedding-model", str(nano_dir), "--output", str(tmp_path / "cls"),
          "--trees", "20", "--folds", "3"])
    out = capsys.readouterr()
    assert "precision" in out.out and "majority" in out.out and f"{labelled}:61: not JSON" in out.err
    shards = []
    for number in range(2):
        shard = tmp_path / f"shard{number}.jsonl"
        lines = [json.dumps({"text": r["text"], "n": i}) for i, r in enumerate(records[number * 30:(number + 1) * 30])]
        lines[3] = json.dumps({"no_text": 1})
        shard.write_text("\n".join(lines) + "\nnot json\n")
        shards.append(str(shard))
    summary = main(["filter", "--classifier", str(tmp_path / "cls"), "--input", *shards, "--output-dir",
                    str(tmp_path / "out"), "--threshold", "0", "--workers", "2", "--chunk-bytes", "2000",
                    "--no-progress"])
    assert summary["kept"] == 58 and summary["dropped"] == 0
    assert summary["bad_lines"]["missing_key"] == 2 and summary["bad_lines"]["not_json"] == 2
    for shard in shards:
        kept = [json.loads(line) for line in (tmp_path / "out" / Path(shard).name).read_text().splitlines()]
        assert [r["n"] for r in kept] == [i for i in range(30) if i != 3]  # input order, across chunks
        assert all(0.0 <= r["quality_score"] <= 1.0 for r in kept)
    other = tmp_path / "other"
    shutil.copytree(nano_dir, other)
    (other / "config.json").write_text((other / "config.json").read_text() + " ")
    with pytest.raises(ValueError, match="not the checkpoint"):  # a UserError: run_cli prints it, exit 2
        main(["filter", "--classifier", str(tmp_path / "cls"), "--input", *shards, "--output-dir",
              str(tmp_path / "out2"), "--embedding-model", str(other)])
