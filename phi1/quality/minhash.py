"""Corpus-scale near-duplicate removal: datatrove's MinHash LSH pipeline, configured for code.

Four stages over sharded jsonl, each a datatrove pipeline on its executor (local multiprocess here; the same
steps run as SLURM job arrays with datatrove's SlurmPipelineExecutor):

1. signature: each document's 5-gram shingles -> `bands x rows` MinHash values, per band one sorted file;
2. buckets:   per band, documents with an equal band are candidate pairs (one task per band);
3. cluster:   union-find over the pairs; all but one document per cluster are marked for removal;
4. filter:    each shard is rewritten without the removed documents, in input order.

The output is deterministic (fixed hash seeds, sorted signature files, a sorted union-find walk), and a
rerun skips every task datatrove has marked complete in the work folder's logs, so a killed run resumes.

Why datatrove's, measured: `benchmarks/bench_minhash.py --documents 100000 --shards 4 --workers 2` on the 2-core
development machine (shared with other jobs), 100,000 generated documents (stdlib functions with mutations,
122 MB), identical shingles and 14 x 8 bands, in one run:

    datatrove (4 stages, 4 + 14 + 1 + 4 tasks, 2 workers)   74.5 s   1,342 docs/s   50,638 removed
    numpy, same stages in memory (2 signature processes)     54.7 s   1,828 docs/s   50,638 removed

The numpy version was 1.36x faster here (datatrove pays a few seconds of start-up per stage, and writes, sorts
and verifies signature files on disk), and both remove exactly the same documents. It is not kept as phi1's
implementation: it holds every signature in memory (0.9 GB per million documents), runs on one machine only,
and cannot resume; making it corpus-scale means writing datatrove's disk-sorted, sharded stages and SLURM/Ray
executors again. The numpy version lives only in the benchmark, as the yardstick.

Code, not prose: datatrove's text normalisation (lower case, digits -> 0, punctuation removed) is kept, and
words are split on whitespace (`CodeWordTokenizer`) instead of its English spaCy tokenizer, which would need
spaCy and knows nothing of code.

The S-curve: a pair of documents whose shingle sets have Jaccard similarity s becomes a candidate with
probability P(s) = 1 - (1 - s^rows)^bands. `lsh_errors` integrates P below the threshold (false-positive
area) and 1 - P above it (false-negative area), as datasketch does; `best_bands_rows` picks the split of a
number of hashes that minimises their sum. For 14 bands x 8 rows (datatrove's default, 112 hashes):
P(0.5) = 0.053, P(0.7) = 0.56, P(0.8) = 0.92, P(0.9) = 0.9996; the 50% point is (1/14)^(1/8) = 0.72: many
pairs between 0.6 and 0.8 go too (measured precision 0.49, recall 0.99 against exact Jaccard >= 0.8 on 2,000
documents). `--threshold 0.8` picks 9 x 12 instead (P(0.7) = 0.12, P(0.8) = 0.47, P(0.9) = 0.95; measured
precision 0.74, recall 0.82). LSH candidates are not verified against the exact Jaccard (datatrove's stages
do not), so the S-curve is the whole story.
"""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass

import numpy as np

try:
    from datatrove.utils.word_tokenizers import WordTokenizer
except ImportError:  # datatrove is an optional dependency; the stages say so when used without it
    WordTokenizer = object

class CodeWordTokenizer(WordTokenizer):
    """Whitespace words of datatrove-normalised text (punctuation already removed)."""

    def __init__(self) -> None:
        self.language = "code"

    def word_tokenize(self, text: str) -> list[str]:
        return text.split()

    def sent_tokenize(self, text: str) -> list[str]:
        return text.splitlines()

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return [match.span() for match in re.finditer(r"\S+", text)]


@dataclass
class MinhashSettings:
    """Shingles and LSH banding."""

    n_grams: int = 5
    """Words per shingle."""
    bands: int = 14
    rows: int = 8
    """Hashes per band; bands x rows hashes per document."""
    seed: int = 1

    def datatrove_config(self):
        from datatrove.pipeline.dedup.minhash import MinhashConfig
        from datatrove.utils.hashing import HashConfig

        return MinhashConfig(n_grams=self.n_grams, num_buckets=self.bands, hashes_per_bucket=self.rows,
                             seed=self.seed, hash_config=HashConfig(precision=64, hash_fc="xxhash"))


def detection_probability(similarity: float, bands: int, rows: int) -> float:
    """P(candidate) of a pair with Jaccard `similarity`: 1 - (1 - s^rows)^bands."""
    return 1.0 - (1.0 - similarity ** rows) ** bands


def lsh_errors(threshold: float, bands: int, rows: int, steps: int = 2000) -> tuple[float, float]:
    """(false-positive area, false-negative area): the integral of P(s) over [0, threshold] and of 1 - P(s)
    over [threshold, 1] (uniformly weighted similarities)."""
    below = np.linspace(0.0, threshold, steps)
    above = np.linspace(threshold, 1.0, steps)
    fp = np.trapezoid(1.0 - (1.0 - below ** rows) ** bands, below)
    fn = np.trapezoid((1.0 - above ** rows) ** bands, above)
    return float(fp), float(fn)


def best_bands_rows(threshold: float, hashes: int = 112) -> tuple[int, int]:
    """The (bands, rows) with bands x rows <= `hashes` minimising the false-positive plus false-negative area."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"--threshold {threshold}: must be strictly between 0 and 1")
    best = None
    for bands in range(1, hashes + 1):
        rows = hashes // bands
        if rows < 1:
            break
        error = sum(lsh_errors(threshold, bands, rows, steps=400))
        if best is None or error < best[0]:
            best = (error, bands, rows)
    return best[1], best[2]


# -- the pipeline --------------------------------------------------------------------------------------------


class RecordAdapter:
    """Writes a datatrove Document back as the input record: id and text under their keys, the other fields at
    the top level (datatrove keeps them in `metadata`), without the `file_path` the reader adds."""

    def __init__(self, text_key: str, id_key: str) -> None:
        self.text_key = text_key
        self.id_key = id_key

    def __call__(self, writer, document) -> dict:
        extra = {k: v for k, v in (document.metadata or {}).items() if k != "file_path"}
        return {self.id_key: document.id, self.text_key: document.text, **extra}


def _reader(input_dir: str, glob: str, text_key: str, id_key: str):
    from datatrove.pipeline.readers import JsonlReader

    # No shuffling and sorted file lists: each task reads the same files in the same order every run.
    return JsonlReader(input_dir, glob_pattern=glob, text_key=text_key, id_key=id_key, shuffle_files=False)


def run_dedup(input_dir: str, output_dir: str, work_dir: str, settings: MinhashSettings | None = None,
              glob: str = "*.jsonl", tasks: int | None = None, workers: int = 1, text_key: str = "text",
              id_key: str = "id") -> dict:
    """Remove near duplicates from the jsonl shards matching `glob` in `input_dir` into `output_dir`.

    Args:
        work_dir: signatures, buckets, removal lists and datatrove's logs/completion markers; rerunning with
            the same work_dir resumes.
        tasks: shard-reading tasks (default: one per input file; more tasks than files leave some idle).
        workers: processes running at once.
    Returns counts: documents read, removed and kept.
    Raises:
        ValueError: no input file matches `glob`, or datatrove or orjson is not installed.
    """
    try:
        import orjson  # noqa: F401  (datatrove's JsonlReader needs it and says so only inside a running task)
        from datatrove.executor import LocalPipelineExecutor
        from datatrove.pipeline.dedup.minhash import (
            MinhashDedupBuckets,
            MinhashDedupCluster,
            MinhashDedupFilter,
            MinhashDedupSignature,
        )
        from datatrove.pipeline.writers import JsonlWriter
    except ImportError as error:
        raise ValueError(f"near-dedup needs datatrove and orjson (pip install -e '.[data]'): {error}") from None
    import fnmatch

    files = sorted(n for n in os.listdir(input_dir) if fnmatch.fnmatch(n, glob)) if os.path.isdir(input_dir) else []
    if not files:
        raise ValueError(f"--input {input_dir}: no files matching {glob!r}")
    settings = settings or MinhashSettings()
    config = settings.datatrove_config()
    tasks = tasks or len(files)
    folders = {name: os.path.join(work_dir, name) for name in ("signatures", "buckets", "remove", "logs")}
    stages = [
        ([_reader(input_dir, glob, text_key, id_key),
          MinhashDedupSignature(folders["signatures"], config=config, language=CodeWordTokenizer())], tasks),
        ([MinhashDedupBuckets(folders["signatures"], folders["buckets"], config=config)], settings.bands),
        ([MinhashDedupCluster(folders["buckets"], folders["remove"], config=config)], 1),
        ([_reader(input_dir, glob, text_key, id_key), MinhashDedupFilter(folders["remove"]),
          JsonlWriter(output_dir, output_filename="${rank}.jsonl", compression=None,
                      adapter=RecordAdapter(text_key, id_key))], tasks),
    ]
    stats = []
    for number, (pipeline, stage_tasks) in enumerate(stages, 1):
        executor = LocalPipelineExecutor(pipeline, tasks=stage_tasks, workers=min(workers, stage_tasks),
                                         logging_dir=os.path.join(folders["logs"], f"stage{number}"))
        stats.append(executor.run())
    read = kept = 0
    for name in sorted(os.listdir(output_dir)):
        if name.endswith(".jsonl"):
            with open(os.path.join(output_dir, name), "rb") as handle:
                kept += sum(1 for _ in handle)
    for name in files:
        with open(os.path.join(input_dir, name), "rb") as handle:
            read += sum(1 for line in handle if line.strip())
    return {"documents": read, "kept": kept, "removed": read - kept, "tasks": tasks, "bands": settings.bands,
            "rows": settings.rows, "n_grams": settings.n_grams}


# -- the reference: exact Jaccard on a sample ---------------------------------------------------------------


def shingle_sets(texts: list[str], settings: MinhashSettings) -> list[np.ndarray]:
    """The shingle hashes datatrove's signature stage computes, per text (sorted, unique)."""
    from datatrove.pipeline.dedup.minhash import MinhashDedupSignature

    step = MinhashDedupSignature(os.devnull, config=settings.datatrove_config(), language=CodeWordTokenizer())
    return [np.unique(step.get_shingles(text).ravel()) for text in texts]


def exact_duplicate_clusters(texts: list[str], threshold: float, settings: MinhashSettings) -> list[int]:
    """Cluster id of every text: connected components of the pairs whose exact shingle Jaccard is >= threshold
    (texts without shingles are their own cluster). Exact and quadratic: for samples of a few thousand."""
    from scipy import sparse

    sets = shingle_sets(texts, settings)
    vocabulary, inverse = np.unique(np.concatenate(sets) if sets else np.array([], np.uint64), return_inverse=True)
    rows = np.repeat(np.arange(len(sets)), [len(s) for s in sets])
    incidence = sparse.csr_matrix((np.ones(len(rows), np.float32), (rows, inverse)),
                                  shape=(len(sets), len(vocabulary)))
    shared = sparse.triu(incidence @ incidence.T, k=1).tocoo()  # (i < j) -> |A & B|
    sizes = np.array([len(s) for s in sets], dtype=np.float64)
    jaccard = shared.data / (sizes[shared.row] + sizes[shared.col] - shared.data)
    keep = jaccard >= threshold
    graph = sparse.coo_matrix((np.ones(keep.sum()), (shared.row[keep], shared.col[keep])), shape=(len(sets),) * 2)
    _, labels = sparse.csgraph.connected_components(graph, directed=False)
    return labels.tolist()


def duplicate_agreement(minhash_removed: set[int], clusters: list[int]) -> dict:
    """Precision and recall of the documents MinHash removed against exact Jaccard clustering.

    Exact clustering removes all but one document of each cluster; which one is kept is arbitrary, so a removed
    document counts as correct when it is in a cluster of two or more and, per cluster, at most size - 1 are
    counted (removing the whole cluster would be one too many).
    """
    sizes: dict[int, int] = {}
    for label in clusters:
        sizes[label] = sizes.get(label, 0) + 1
    exact_removed = sum(size - 1 for size in sizes.values())
    correct_per_cluster: dict[int, int] = {}
    for index in minhash_removed:
        label = clusters[index]
        correct_per_cluster[label] = min(correct_per_cluster.get(label, 0) + 1, sizes[label] - 1)
    correct = sum(correct_per_cluster.values())
    return {"minhash_removed": len(minhash_removed), "exact_removed": exact_removed, "correct": correct,
            "precision": correct / len(minhash_removed) if minhash_removed else 1.0,
            "recall": correct / exact_removed if exact_removed else 1.0}


# -- a corpus with known near duplicates --------------------------------------------------------------------


def mutated_corpus(count: int, seed: int = 0, duplicate_fraction: float = 0.3) -> list[str]:
    """`count` code documents: fresh ones join two random stdlib functions; a `duplicate_fraction` of them copy
    an earlier document with 1 to 12 line edits (deleted lines, added comments, a renamed identifier), so their
    similarity to it spreads across the threshold. Deterministic for a seed."""
    from phi1.quality.stdlib_functions import stdlib_functions

    rng = random.Random(seed)
    base = [f.source for f in stdlib_functions(2000, seed=seed)]
    words = [w for source in base[:200] for w in re.findall(r"[a-z]{4,}", source)][:2000]
    documents: list[str] = []
    for index in range(count):
        if documents and rng.random() < duplicate_fraction:
            lines = rng.choice(documents).splitlines()
            for _ in range(rng.randint(1, 12)):
                edit = rng.random()
                position = rng.randrange(len(lines) + 1)
                if edit < 0.4 and len(lines) > 3:
                    del lines[min(position, len(lines) - 1)]
                elif edit < 0.8:
                    lines.insert(position, f"# {rng.choice(words)} {rng.choice(words)} {rng.choice(words)}")
                else:
                    names = sorted(set(re.findall(r"\b[a-z_]{3,}\b", "\n".join(lines))))
                    if names:
                        old = rng.choice(names)
                        lines = [re.sub(rf"\b{old}\b", f"{old}_{rng.choice(words)}", line) for line in lines]
            documents.append("\n".join(lines))
        else:
            documents.append(f"# {index}\n" + "\n\n".join(rng.sample(base, 2)))
    return documents


def write_shards(texts: list[str], directory: str, shards: int) -> list[str]:
    """Write texts round-robin into `shards` jsonl files ({"id": "doc-N", "text": ...}); returns their paths."""
    import json

    os.makedirs(directory, exist_ok=True)
    paths = [os.path.join(directory, f"shard-{number:03d}.jsonl") for number in range(shards)]
    handles = [open(path, "w", encoding="utf-8") for path in paths]
    try:
        for index, text in enumerate(texts):
            handles[index % shards].write(json.dumps({"id": f"doc-{index}", "text": text}) + "\n")
    finally:
        for handle in handles:
            handle.close()
    return paths


def removed_ids(input_paths: list[str], output_dir: str) -> set[str]:
    """Ids present in the inputs and absent from the dedup output."""
    import json

    def ids(path: str) -> set[str]:
        with open(path, encoding="utf-8") as handle:
            return {json.loads(line)["id"] for line in handle if line.strip()}

    before = set().union(*(ids(p) for p in input_paths))
    after = set().union(*(ids(os.path.join(output_dir, n)) for n in os.listdir(output_dir) if n.endswith(".jsonl")))
    return before - after

