"""Scoring and filtering jsonl shards with a saved quality classifier, one worker per chunk of lines."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from phi1.quality.jsonl import LineStats, check_record
from phi1.quality.shards import Chunk, read_chunk


@dataclass
class FilterConfig:
    """What a filter worker needs (picklable: it is sent to spawned workers)."""

    classifier_dir: str
    embedding_model: str
    tokenizer_type: str | None = None
    tokenizer_model: str | None = None
    threshold: float = 0.5
    """Lines scoring at or above it are kept."""
    text_key: str = "text"
    score_key: str = "quality_score"
    """Field added to every kept line."""
    batch_size: int = 32
    backend: str = "phi1"
    """'phi1' or 'transformers' (what the classifier's header says it was trained with)."""
    pooling: str = "mean"
    max_tokens: int | None = None
    device: str = "auto"
    keep_all: bool = False
    """Keep every line (scored) instead of filtering."""


@dataclass
class FilterResult:
    stats: LineStats = field(default_factory=LineStats)
    kept: int = 0
    dropped: int = 0
    score_sum: float = 0.0
    output_part: str = ""


_loaded: tuple[str, object, object] | None = None


def _models(config: FilterConfig):
    global _loaded
    from phi1.quality.classifier import QualityClassifier
    from phi1.quality.embeddings import load_embedder

    key = json.dumps(config.__dict__, sort_keys=True)
    if _loaded is None or _loaded[0] != key:
        embedder = load_embedder(config.embedding_model, config.backend, config.pooling, config.tokenizer_type,
                                 config.tokenizer_model, batch_size=config.batch_size, max_tokens=config.max_tokens,
                                 device=config.device, threads=1)
        _loaded = (key, embedder, QualityClassifier.load(config.classifier_dir))
    return _loaded[1], _loaded[2]


def filter_chunk(config: FilterConfig, work_dir: str, chunk: Chunk) -> FilterResult:
    """Score every record of `chunk`; write those kept, with their score, to a part file under `work_dir`."""
    embedder, classifier = _models(config)
    result = FilterResult(output_part=os.path.join(work_dir, f"part.{chunk.index:06d}"))
    with open(result.output_part, "w", encoding="utf-8") as sink:
        batch: list[dict] = []

        def flush() -> None:
            scores = classifier.score(embedder.embed([r[config.text_key] for r in batch]))
            for record, score in zip(batch, scores.tolist()):
                result.score_sum += score
                if config.keep_all or score >= config.threshold:
                    record[config.score_key] = round(score, 6)
                    sink.write(json.dumps(record, ensure_ascii=False) + "\n")
                    result.kept += 1
                else:
                    result.dropped += 1
            batch.clear()

        for line_number, raw in read_chunk(chunk):
            record = check_record(raw, {config.text_key: str}, chunk.path, line_number, result.stats)
            if record is not None:
                batch.append(record)
                if len(batch) >= 4 * config.batch_size:
                    flush()
        if batch:
            flush()
    return result


def config_for_classifier(classifier_dir: str, threshold: float | None = None, embedding_model: str | None = None,
                          allow_other_embedder: bool = False, **settings) -> FilterConfig:
    """The FilterConfig that embeds the way `classifier_dir` was trained: its recorded embedder (or
    `embedding_model`), backend, pooling and max tokens; `threshold` defaults to the classifier's own.

    Args:
        settings: further FilterConfig fields (text_key, batch_size, device, keep_all, tokenizer_*).
    Raises:
        ValueError: the embedder is not a directory, or is another checkpoint than the one the classifier was
            trained on (unless `allow_other_embedder`); FileNotFoundError: not a saved classifier.
    """
    from phi1.quality.classifier import QualityClassifier
    from phi1.quality.embeddings import checkpoint_fingerprint

    header = QualityClassifier.load(classifier_dir).header
    embedder = header.get("embedder", {})
    model_dir = embedding_model or embedder.get("model_dir")
    if not model_dir or not os.path.isdir(model_dir):
        raise ValueError(f"{classifier_dir}: its embedder {model_dir!r} is not a directory; pass --embedding-model")
    if checkpoint_fingerprint(model_dir) != embedder.get("fingerprint") and not allow_other_embedder:
        raise ValueError(f"{model_dir}: not the checkpoint {classifier_dir} was trained on (fingerprints differ); "
                         "its scores would mean nothing. Pass --allow-other-embedder to force it")
    # Classifiers from before transformers embedders were phi1's, mean-pooled.
    pooling = embedder.get("pooling") if embedder.get("pooling") in ("mean", "last") else "mean"
    return FilterConfig(classifier_dir=classifier_dir, embedding_model=model_dir,
                        threshold=header.get("threshold", 0.5) if threshold is None else threshold,
                        backend=embedder.get("backend", "phi1"), pooling=pooling,
                        max_tokens=embedder.get("max_tokens"), **settings)
