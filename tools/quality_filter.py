"""The paper's quality filter: LLM annotation, then a random forest on code embeddings from a phi1 checkpoint.

    # the paper's labels: ask any OpenAI-compatible endpoint for each file's educational value (0..10), resumable
    python tools/quality_filter.py annotate --input data/raw/*.jsonl --output data/quality/annotated.jsonl \
        --base-url http://127.0.0.1:8000/v1 --model gpt-4 [--prompt-file my_prompt.txt] [--concurrency 8] \
        [--requests-per-minute 500] [--label-threshold 0.5]
    # ... then `train --labelled data/quality/annotated.jsonl --label-key score` (regression on the 0..1 score)
    # or `--label-key label` (1 when score >= --label-threshold)
    # an honest labelled set computable offline: documented stdlib functions (1) vs docstring removed (0)
    python tools/quality_filter.py make-labels --output data/quality/labels.jsonl --count 1000
    # a small embedder trained briefly on stdlib code (CPU, about a minute), when no real checkpoint is at hand
    python tools/quality_filter.py demo-embedder --output-dir runs/quality/embedder
    # embeddings -> 5-fold cross-validated report (precision, recall, AUC vs the majority class) -> classifier
    python tools/quality_filter.py train --labelled data/quality/labels.jsonl \
        --embedding-model runs/quality/embedder --output runs/quality/classifier
    # score and filter shards with several workers; every kept line gets "quality_score"
    python tools/quality_filter.py filter --classifier runs/quality/classifier --input data/shards/*.jsonl \
        --output-dir data/filtered --threshold 0.5 --workers 2

--embedding-model is a phi1 checkpoint or any transformers model directory: encoders (CodeBERT-style) are
mean-pooled, decoders (CodeGen, phi) mean- or --pooling last; the classifier records the embedder (fingerprint,
backend, pooling, max tokens) and `filter` embeds the same way. Labels are 0/1 (classification) or scores (regression; the report binarises them at --threshold). Classifiers
are saved as arrays + JSON (no pickle) and record the checkpoint whose embeddings they read; `filter` refuses
another checkpoint unless --allow-other-embedder. Bad lines are counted and listed by file and line.

The logic lives in `phi1.quality.filter_cli`; this script is its command line.
"""

from phi1.cli import run_cli
from phi1.quality.filter_cli import main

if __name__ == "__main__":
    run_cli(main, prog="quality_filter.py")
