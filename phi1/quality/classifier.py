"""A random forest over code embeddings, saved as plain arrays so loading one never runs code.

sklearn trains the forest; its trees are exported to a `.npz` of integer/float arrays (children, split feature,
threshold, leaf value) plus a JSON header (format version, feature count, the checkpoint whose embeddings it
reads, the cross-validation report). `QualityClassifier` predicts with a NumPy tree walker equal to sklearn's
`predict_proba` (classification) or `predict` (score regression). `np.load(allow_pickle=False)`: a tampered
file can give wrong scores, never execute anything.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

FORMAT = "phi1-quality-forest"
FORMAT_VERSION = 1
ARRAY_FILE, HEADER_FILE = "forest.npz", "classifier.json"
ARRAY_NAMES = ("left", "right", "feature", "threshold", "leaf_value", "tree_roots")


@dataclass
class ForestConfig:
    """Random forest hyper-parameters."""

    trees: int = 200
    """Number of trees."""
    max_depth: int | None = None
    min_samples_leaf: int = 1
    max_features: str = "sqrt"
    seed: int = 0
    jobs: int = 1
    """Threads sklearn uses while fitting."""


def is_binary(labels: np.ndarray) -> bool:
    """Whether labels are all 0 or 1 (classification); otherwise they are scores (regression)."""
    return bool(np.isin(labels, (0, 1)).all())


def fit_forest(features: np.ndarray, labels: np.ndarray, config: ForestConfig):
    """A fitted RandomForestClassifier (0/1 labels) or RandomForestRegressor (scores)."""
    from sklearn.ensemble import RandomForestClassifier, RandomForestRegressor

    kind = RandomForestClassifier if is_binary(labels) else RandomForestRegressor
    forest = kind(n_estimators=config.trees, max_depth=config.max_depth, min_samples_leaf=config.min_samples_leaf,
                  max_features=config.max_features, random_state=config.seed, n_jobs=config.jobs)
    return forest.fit(features, labels.astype(np.int64) if kind is RandomForestClassifier else labels)


def forest_scores(forest, features: np.ndarray) -> np.ndarray:
    """sklearn's own score: P(label 1) for a classifier, the predicted score for a regressor."""
    if hasattr(forest, "predict_proba"):
        classes = list(forest.classes_)
        probabilities = forest.predict_proba(features)
        return probabilities[:, classes.index(1)] if 1 in classes else np.zeros(len(features))
    return forest.predict(features)


def cross_validate(features: np.ndarray, labels: np.ndarray, config: ForestConfig, folds: int = 5,
                   threshold: float = 0.5) -> dict:
    """Stratified k-fold report: precision, recall, AUC and accuracy of the forest and of the majority class.

    Scores (regression labels) are made binary at `threshold` for the metrics.
    Raises ValueError when a class has fewer examples than folds.
    """
    from sklearn.metrics import accuracy_score, precision_score, recall_score, roc_auc_score
    from sklearn.model_selection import KFold, StratifiedKFold

    positive = (labels >= threshold).astype(np.int64)
    counts = np.bincount(positive, minlength=2)
    if counts.min() < folds:
        raise ValueError(f"labels: {counts[0]} negatives and {counts[1]} positives; need >= {folds} of each for "
                         f"{folds}-fold cross-validation")
    splitter = StratifiedKFold(folds, shuffle=True, random_state=config.seed) if is_binary(labels) \
        else KFold(folds, shuffle=True, random_state=config.seed)
    predicted = np.zeros(len(labels))
    per_fold = []
    for train, test in splitter.split(features, positive):
        forest = fit_forest(features[train], labels[train], config)
        predicted[test] = forest_scores(forest, features[test])
        per_fold.append(float(roc_auc_score(positive[test], predicted[test])))
    decided = (predicted >= threshold).astype(np.int64)
    majority = int(counts.argmax())
    return {
        "examples": int(len(labels)), "positives": int(counts[1]), "negatives": int(counts[0]), "folds": folds,
        "precision": float(precision_score(positive, decided, zero_division=0)),
        "recall": float(recall_score(positive, decided, zero_division=0)),
        "auc": float(roc_auc_score(positive, predicted)),
        "auc_per_fold": per_fold,
        "accuracy": float(accuracy_score(positive, decided)),
        "majority_class": majority,
        "majority_accuracy": float(counts[majority] / counts.sum()),
        # The majority baseline predicts one class for all: its AUC is 0.5 and, for the positive class,
        # its precision/recall are those of "everything is positive" (or zero when negatives are the majority).
        "majority_precision": float(counts[1] / counts.sum()) if majority == 1 else 0.0,
        "majority_recall": 1.0 if majority == 1 else 0.0,
        "majority_auc": 0.5,
    }


def format_report(report: dict) -> str:
    """The cross-validation report as a small table."""
    return (
        f"{report['folds']}-fold cross-validation on {report['examples']} examples "
        f"({report['positives']} positive, {report['negatives']} negative)\n"
        f"                 precision  recall   AUC     accuracy\n"
        f"  random forest  {report['precision']:.3f}      {report['recall']:.3f}    {report['auc']:.3f}   "
        f"{report['accuracy']:.3f}\n"
        f"  majority ({report['majority_class']})   {report['majority_precision']:.3f}      "
        f"{report['majority_recall']:.3f}    {report['majority_auc']:.3f}   {report['majority_accuracy']:.3f}\n"
        f"  AUC per fold: {', '.join(f'{a:.3f}' for a in report['auc_per_fold'])}"
    )


def export_forest(forest) -> dict[str, np.ndarray]:
    """The trees of a fitted sklearn forest as flat arrays (children indices made global; leaves have -1)."""
    left, right, feature, threshold, leaf_value, roots = [], [], [], [], [], []
    offset = 0
    classifier = hasattr(forest, "predict_proba")
    positive_column = list(forest.classes_).index(1) if classifier and 1 in forest.classes_ else None
    for estimator in forest.estimators_:
        tree = estimator.tree_
        n = tree.node_count
        is_leaf = tree.children_left == -1
        left.append(np.where(is_leaf, -1, tree.children_left + offset))
        right.append(np.where(is_leaf, -1, tree.children_right + offset))
        feature.append(np.where(is_leaf, 0, tree.feature))
        threshold.append(tree.threshold)
        values = tree.value[:, 0, :]  # (n_nodes, n_classes) or (n_nodes, 1)
        if classifier:
            fractions = values / np.maximum(values.sum(axis=1, keepdims=True), 1e-300)
            leaf_value.append(fractions[:, positive_column] if positive_column is not None else np.zeros(n))
        else:
            leaf_value.append(values[:, 0])
        roots.append(offset)
        offset += n
    return {
        "left": np.concatenate(left).astype(np.int64), "right": np.concatenate(right).astype(np.int64),
        "feature": np.concatenate(feature).astype(np.int64), "threshold": np.concatenate(threshold).astype(np.float64),
        "leaf_value": np.concatenate(leaf_value).astype(np.float64), "tree_roots": np.array(roots, dtype=np.int64),
    }


class QualityClassifier:
    """A saved forest: `score(features)` gives P(good) (or the predicted score) for each row.

    Args:
        arrays: what export_forest returns.
        header: n_features, kind ('classification' or 'regression'), embedder, report, ...
    """

    def __init__(self, arrays: dict[str, np.ndarray], header: dict) -> None:
        self.arrays = arrays
        self.header = header
        self.n_features = int(header["n_features"])

    def score(self, features: np.ndarray) -> np.ndarray:
        """(N,) scores of a (N, n_features) matrix. Raises ValueError on a wrong feature count."""
        features = np.asarray(features)
        if features.ndim != 2 or features.shape[1] != self.n_features:
            raise ValueError(f"classifier expects (N, {self.n_features}) features, got {features.shape}; "
                             f"embed with the checkpoint it was trained on ({self.header.get('embedder')})")
        # sklearn compares float32 features with float64 thresholds; doing the same gives identical splits.
        values = features.astype(np.float32).astype(np.float64)
        a = self.arrays
        nodes = np.broadcast_to(a["tree_roots"], (len(values), len(a["tree_roots"]))).copy()  # (N, trees)
        rows = np.arange(len(values))[:, None]
        while True:
            inner = a["left"][nodes] != -1
            if not inner.any():
                break
            go_left = values[rows, a["feature"][nodes]] <= a["threshold"][nodes]
            nodes = np.where(inner, np.where(go_left, a["left"][nodes], a["right"][nodes]), nodes)
        return a["leaf_value"][nodes].mean(axis=1)

    def save(self, directory: str | os.PathLike) -> None:
        """Write forest.npz and classifier.json into `directory`."""
        os.makedirs(directory, exist_ok=True)
        np.savez_compressed(os.path.join(directory, ARRAY_FILE), **self.arrays)
        header = {"format": FORMAT, "format_version": FORMAT_VERSION, **self.header}
        with open(os.path.join(directory, HEADER_FILE), "w", encoding="utf-8") as handle:
            json.dump(header, handle, indent=2)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> QualityClassifier:
        """Read a saved classifier; raises ValueError naming the file when it is not one this code wrote."""
        header_path = os.path.join(directory, HEADER_FILE)
        array_path = os.path.join(directory, ARRAY_FILE)
        for path in (header_path, array_path):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: missing; train one with `tools/quality_filter.py train`")
        with open(header_path, encoding="utf-8") as handle:
            header = json.load(handle)
        if header.get("format") != FORMAT or header.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{header_path}: format {header.get('format')!r} version {header.get('format_version')}, "
                             f"this reader knows {FORMAT!r} version {FORMAT_VERSION}; retrain with "
                             "`tools/quality_filter.py train`")
        with np.load(array_path, allow_pickle=False) as stored:
            missing = [n for n in ARRAY_NAMES if n not in stored.files]
            if missing:
                raise ValueError(f"{array_path}: arrays {missing} missing")
            arrays = {n: stored[n] for n in ARRAY_NAMES}
        nodes = len(arrays["left"])
        if any(len(arrays[n]) != nodes for n in ("right", "feature", "threshold", "leaf_value")):
            raise ValueError(f"{array_path}: node arrays of different lengths")
        children = np.concatenate([arrays["left"], arrays["right"]])
        if children.min(initial=-1) < -1 or children.max(initial=-1) >= nodes \
                or arrays["feature"].min(initial=0) < 0 or arrays["feature"].max(initial=0) >= int(header["n_features"]) \
                or arrays["tree_roots"].min(initial=0) < 0 or arrays["tree_roots"].max(initial=0) >= max(nodes, 1):
            raise ValueError(f"{array_path}: child, feature or root index out of range: corrupted file")
        # Leaves must be reachable in finite steps: every child index is larger than its parent's (sklearn's
        # depth-first numbering), so the walk cannot loop.
        index = np.arange(nodes)
        inner = arrays["left"] != -1
        if (arrays["left"][inner] <= index[inner]).any() or (arrays["right"][inner] <= index[inner]).any():
            raise ValueError(f"{array_path}: a child precedes its parent: corrupted file")
        return cls(arrays, header)
