"""phi1's data steps as datatrove pipeline steps, run on datatrove's executors (local processes, SLURM job
arrays, Ray).

    from phi1.quality.engine import ExecutorOptions, StepOptions, run_pipeline

    result = run_pipeline(["decontaminate", "dedup", "preprocess"], "data/raw", "data/prepared",
                          StepOptions(tokenizer_model="runs/tok/tokenizer.json"),
                          ExecutorOptions(kind="local", tasks=8, workers=2))
    result.result_dir   # data/prepared/result: corpus_text_document.bin/.idx/.json

Why datatrove and not a home-made runner: it already gives sharding by task rank, a completion marker per
finished task (a rerun skips them), SLURM job arrays with dependencies between stages, and a Ray executor.
phi1 keeps its own step logic (the library functions in annotate.py, filtering.py, minhash.py,
decontamination.py, phi1.data.indexed_dataset); this module only adapts them to datatrove: which input shard a
task reads, where it writes, and how a finished output is published.

The layout of OUTPUT (every path below is fixed by the chain, never by the number of tasks):

    OUTPUT/engine.json                      the chain, its options and the input listing (a rerun must match)
    OUTPUT/steps/01-<step>/shards/X.jsonl   one output shard per input shard X, same name (.jsonl)
    OUTPUT/steps/01-<step>/...              the step's own files (decontamination reports, MinHash buckets, ...)
    OUTPUT/result/                          the last step's output, published when every stage has finished
    LOGGING_DIR/01-<step>[-stage]/          datatrove's logs, stats and completions/ markers (default OUTPUT/logs)

Determinism (the output is the same bytes for 1 task or N): a JSONL step processes whole input shards, task r
taking shards r, r+N, r+2N, ... of the sorted listing, and writes one output per input shard; its content
depends on that shard only (chunk sizes are fixed, not derived from the number of workers). MinHash dedup is
the exception to "--tasks": datatrove names a document by (task rank, index in the task), and the cluster stage
keeps the smallest name of each cluster, so which duplicate survives would depend on how shards were spread
over tasks. Its signature and filter stages therefore always run one task per input shard (rank r reads shard r,
pinned by a paths file), its bucket stage one task per band; `--workers` still bounds how many run at once.
Preprocessing tokenizes each shard to its own .bin/.idx, then one task merges them in shard order.

Resumption: datatrove skips tasks whose completion marker exists. A task killed mid-shard leaves at most
`X.jsonl.partial` (or a `.bin.tmp`): outputs are written under a temporary name and renamed into place only
when complete, a rerun writes them again from the start, and nothing reads a temporary name. A shard whose
output is already in place is skipped even inside an unfinished task. A rerun with another chain, other step
options or other inputs into the same OUTPUT is refused (completion markers would otherwise keep stale
outputs); a rerun with other --workers is fine.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import fnmatch
import gzip
import json
import os
import shutil
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

try:
    from datatrove.pipeline.base import PipelineStep
except ImportError:  # datatrove is an optional dependency (pip install -e '.[data]'); run_pipeline says so
    PipelineStep = object

STEPS = ("annotate", "filter", "dedup", "decontaminate", "preprocess")
EXECUTORS = ("local", "slurm", "ray")
# Input shards are read in line-aligned chunks of this size. Fixed (not derived from the worker count), so the
# batches a scoring step forms, and so its output, never depend on how the run was spread.
CHUNK_BYTES = 16 << 20
ENGINE_FILE = "engine.json"
ENGINE_FORMAT = 1


# -- options -------------------------------------------------------------------------------------------------


@dataclass
class StepOptions:
    """Settings of the steps (only those of the steps in the chain are used or checked)."""

    text_key: str = "text"
    """Record field holding the document."""
    id_key: str = "id"
    """Record field holding the document's id (dedup keeps it; annotate keys its journal by it)."""
    # annotate
    base_url: str | None = None
    """OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 (annotate)."""
    model: str | None = None
    """Model name sent to the endpoint (annotate)."""
    api_key: str | None = None
    """Default: $OPENAI_API_KEY in the task's environment (better: it is then never written to disk, and SLURM
    jobs get it through --export=ALL). Not part of the run's record in engine.json."""
    api: str = "chat"
    """'chat' or 'completions' (annotate)."""
    prompt_file: str | None = None
    """Prompt template with {text} (annotate; default the paper's question)."""
    scale: float = 10.0
    label_threshold: float = 0.5
    max_attempts: int = 3
    concurrency: int = 4
    """Requests in flight per task (annotate)."""
    requests_per_minute: float = 0.0
    """Per task; 0: no limit (annotate)."""
    max_tokens: int = 16
    max_retries: int = 8
    # filter
    classifier: str | None = None
    """Directory of a classifier from `tools/quality_filter.py train` (filter)."""
    threshold: float | None = None
    """Score at or above which a document is kept (filter; default the classifier's)."""
    embedding_model: str | None = None
    """Embedder directory (filter; default the one the classifier records)."""
    allow_other_embedder: bool = False
    device: str = "auto"
    batch_size: int = 32
    # dedup
    dedup_threshold: float | None = None
    """Jaccard similarity the LSH bands are tuned for (dedup; default datatrove's 14 bands x 8 rows)."""
    n_grams: int = 5
    # decontaminate
    humaneval: str | None = None
    """HumanEval jsonl(.gz) (decontaminate; default the bundled one)."""
    mbpp: str | None = None
    ngram_n: int = 13
    tau: float = 0.9
    # preprocess
    tokenizer_model: str | None = None
    """Tokenizer file or directory (preprocess)."""
    tokenizer_type: str | None = None
    """Default: detected from tokenizer_model."""
    append_eod: bool = True
    dataset_name: str = "corpus"
    """The merged dataset is result/{dataset_name}_{text_key}_document.bin/.idx/.json (preprocess)."""


@dataclass
class ExecutorOptions:
    """Where and how the stages run."""

    kind: str = "local"
    """'local' (processes on this machine), 'slurm' (job arrays) or 'ray'."""
    tasks: int = 1
    """Tasks of each JSONL step; each task takes whole input shards."""
    workers: int = 1
    """Tasks running at once (local: processes; slurm: the array's %N throttle; ray: concurrent tasks)."""
    logging_dir: str | None = None
    """datatrove's logs and completion markers (default OUTPUT/logs); shared storage on SLURM/Ray."""
    # slurm
    partition: str | None = None
    time: str = "04:00:00"
    cpus_per_task: int = 1
    mem_per_cpu_gb: int = 2
    gpus_per_task: int = 0
    qos: str | None = None
    job_name: str = "phi1-data"
    env_command: str | None = None
    """Shell line run before each task, e.g. 'source /shared/venv/bin/activate'."""
    sbatch_args: dict = field(default_factory=dict)
    """Further #SBATCH lines, e.g. {'account': 'proj'}."""
    dry_run: bool = False
    """slurm: write every stage's sbatch script (and datatrove's pickled executor) without calling sbatch."""


@dataclass
class PipelineResult:
    """What `run_pipeline` did."""

    output_dir: str
    result_dir: str
    """OUTPUT/result: the JSONL shards or the merged .bin/.idx/.json; complete only when `finished`."""
    finished: bool
    """False when the stages were only submitted (slurm, ray) or written (dry run)."""
    stages: list[dict]
    """Per stage: name, tasks, logging_dir, and (local) datatrove's stats or (slurm) the sbatch script path."""
    submissions: list[dict] = field(default_factory=list)
    """slurm: each sbatch call in order: its script path, arguments and the (dry-run: made-up) job id."""


# -- publishing outputs ------------------------------------------------------------------------------------------


def shard_output_name(name: str) -> str:
    """The output shard name of an input shard: X.jsonl, X.jsonl.gz, X.json -> X.jsonl."""
    for suffix in (".jsonl.gz", ".json.gz", ".jsonl", ".json", ".gz"):
        if name.endswith(suffix):
            return name[: -len(suffix)] + ".jsonl"
    return name + ".jsonl"


def concatenate(parts: list[str], output: str) -> None:
    """Append part files in order into `output` through `output.partial`, renamed into place at the end."""
    from phi1.quality.shards import concatenate as concatenate_parts

    concatenate_parts(parts, output)


def _write_atomically(path: str, lines: Iterator[str]) -> int:
    """Write `lines` to `path.partial`, then rename it to `path`; returns the number of lines."""
    partial = path + ".partial"
    count = 0
    with open(partial, "w", encoding="utf-8") as handle:
        for line in lines:
            handle.write(line)
            count += 1
    os.replace(partial, path)
    return count


# -- the steps -------------------------------------------------------------------------------------------------


class ShardStep(PipelineStep):
    """A step that turns each input shard into one output shard of the same name (base of the JSONL steps).

    Task `rank` of `world_size` takes shards rank, rank + world_size, ... of `shard_names` (sorted). A shard
    whose output is already in place is skipped, so a rerun of an unfinished task redoes only what is missing.
    """

    type = "phi1"

    def __init__(self, input_dir: str, step_dir: str, shard_names: list[str], options: StepOptions) -> None:
        super().__init__()
        self.input_dir = input_dir
        self.step_dir = step_dir
        self.shard_dir = os.path.join(step_dir, "shards")
        self.work_dir = os.path.join(step_dir, "work")
        self.shard_names = list(shard_names)
        self.options = options

    def output_of(self, name: str) -> str:
        """The file whose presence means input shard `name` is finished: its output shard."""
        return os.path.join(self.shard_dir, shard_output_name(name))

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        for name in self.shard_names[rank::world_size]:
            output = self.output_of(name)
            os.makedirs(os.path.dirname(output), exist_ok=True)
            if os.path.exists(output):
                self.stat_update("shards_already_done")
                continue
            work = os.path.join(self.work_dir, shard_output_name(name))
            os.makedirs(work, exist_ok=True)
            path = os.path.join(self.input_dir, name)
            with self.track_time("shard"):
                try:
                    self.process_shard(path, output, work)
                except (EOFError, zlib.error, gzip.BadGzipFile) as error:
                    raise ValueError(f"{path}: cannot be read to its end ({type(error).__name__}: {error}); a "
                                     "truncated or damaged gzip shard: replace it and rerun (finished shards are "
                                     "kept)") from None
            shutil.rmtree(work, ignore_errors=True)
            self.stat_update("shards")
        if data:
            yield from data

    @abc.abstractmethod
    def process_shard(self, path: str, output: str, work: str) -> None:
        """Read the shard at `path`, publish its output at `output` (atomically); `work` is scratch space."""

    def count_lines(self, stats) -> None:
        """Record a LineStats' counts in datatrove's stats."""
        for key in ("good", "blank", "not_json", "not_object", "missing_key", "wrong_type", "unparsable_code"):
            if getattr(stats, key):
                self.stat_update(f"lines_{key}", value=getattr(stats, key))


class AnnotateStep(ShardStep):
    """LLM annotation (phi1.quality.annotate.Annotator) of each shard.

    The annotator appends to a per-shard journal as answers arrive (resumable on its own: a killed task loses
    no finished answer); when the shard is done, its lines are written in input order as the output shard.
    """

    name = "annotate"

    def process_shard(self, path: str, output: str, work: str) -> None:
        import asyncio

        import openai

        from phi1.quality.annotate import DEFAULT_PROMPT, AnnotateConfig, Annotator, read_prompt, record_id
        from phi1.quality.endpoint import EndpointConfig
        from phi1.quality.jsonl import LineStats, iter_records

        options = self.options
        endpoint = EndpointConfig(model=options.model, api=options.api, max_tokens=options.max_tokens,
                                  concurrency=options.concurrency, requests_per_minute=options.requests_per_minute,
                                  max_retries=options.max_retries)
        config = AnnotateConfig(endpoint=endpoint,
                                prompt=read_prompt(options.prompt_file) if options.prompt_file else DEFAULT_PROMPT,
                                scale=options.scale, label_threshold=options.label_threshold,
                                max_attempts=options.max_attempts, text_key=options.text_key, id_key=options.id_key)
        # The journal lives beside the step's shards, not in `work` (which is cleared when a shard is done): it
        # must survive a killed task to be resumed.
        journal = os.path.join(self.step_dir, "journal", os.path.basename(output))
        api_key = options.api_key or os.environ.get("OPENAI_API_KEY") or "unused"
        client = openai.AsyncOpenAI(base_url=options.base_url, api_key=api_key, max_retries=0)
        annotator = Annotator(client, config, [path], journal)
        asyncio.run(annotator.run(progress=False))
        self.stat_update("written_ok", value=annotator.counts.written.get("ok", 0))
        self.stat_update("written_unparsed", value=annotator.counts.written.get("unparsed", 0))
        self.stat_update("bad_answers", value=annotator.counts.bad_answers)
        annotated: dict[str, str] = {}
        with open(journal, encoding="utf-8") as handle:
            for line in handle:
                annotated[json.loads(line)["id"]] = line
        stats = LineStats()

        def in_input_order() -> Iterator[str]:
            seen: set[str] = set()
            for _, record in iter_records(path, {options.text_key: str}, stats):
                key = record_id(record, options.id_key, record[options.text_key])
                if key not in seen:
                    seen.add(key)
                    # The record keeps its own fields (later steps and the result carry them on).
                    yield json.dumps({**record, **json.loads(annotated[key])}, ensure_ascii=False) + "\n"

        _write_atomically(output, in_input_order())
        self.count_lines(stats)


class FilterStep(ShardStep):
    """Classifier scores on embeddings, threshold (phi1.quality.filtering.filter_chunk); kept lines get
    `quality_score`."""

    name = "filter"

    def process_shard(self, path: str, output: str, work: str) -> None:
        from phi1.quality.filtering import config_for_classifier, filter_chunk
        from phi1.quality.shards import plan_chunks

        options = self.options
        config = config_for_classifier(options.classifier, threshold=options.threshold,
                                       embedding_model=options.embedding_model, text_key=options.text_key,
                                       batch_size=options.batch_size, device=options.device,
                                       allow_other_embedder=options.allow_other_embedder)
        results = [filter_chunk(config, work, chunk) for chunk in plan_chunks([path], CHUNK_BYTES)]
        concatenate([r.output_part for r in results], output)
        self.stat_update("kept", value=sum(r.kept for r in results))
        self.stat_update("dropped", value=sum(r.dropped for r in results))
        for result in results:
            self.count_lines(result.stats)


class DecontaminateStep(ShardStep):
    """The paper's n-gram and AST checks against HumanEval (and MBPP) (phi1.quality.decontamination); flagged
    (document, problem) pairs go to `reports/X.jsonl` beside the step's shards."""

    name = "decontaminate"

    def process_shard(self, path: str, output: str, work: str) -> None:
        from phi1.quality.decontamination import decontaminate_chunk
        from phi1.quality.shards import plan_chunks

        references, config = decontamination_setup(self.options)
        results = [decontaminate_chunk(references, config, work, chunk) for chunk in plan_chunks([path], CHUNK_BYTES)]
        reports = os.path.join(self.step_dir, "reports")
        os.makedirs(reports, exist_ok=True)
        # The report first: a shard whose output is in place is finished, report included.
        concatenate([r.report_part for r in results], os.path.join(reports, os.path.basename(output)))
        concatenate([r.output_part for r in results], output)
        self.stat_update("kept", value=sum(r.kept for r in results))
        self.stat_update("pruned", value=sum(r.pruned for r in results))
        for check in ("ngram", "ast", "embedding"):
            self.stat_update(f"flagged_by_{check}", value=sum(r.flagged_by[check] for r in results))
        for result in results:
            self.count_lines(result.stats)


def decontamination_setup(options: StepOptions):
    """(references, DecontaminationConfig) of the options: HumanEval (bundled or `humaneval`) plus `mbpp`."""
    from phi1.quality.decontamination import (
        PAPER_TAUS,
        DecontaminationConfig,
        load_humaneval_references,
        load_mbpp_references,
    )

    references = load_humaneval_references(options.humaneval)
    if options.mbpp:
        references += load_mbpp_references(options.mbpp)
    config = DecontaminationConfig(ngram_n=options.ngram_n, tau=options.tau, report_taus=PAPER_TAUS,
                                   text_key=options.text_key, id_key=options.id_key)
    return references, config


class TokenizeStep(ShardStep):
    """Tokenize each shard into its own Megatron dataset `parts/X_{key}_document.bin/.idx` (preprocess, stage 1)."""

    name = "tokenize"

    def output_of(self, name: str) -> str:
        # IndexedDatasetWriter writes under .tmp names and renames .bin, then .idx, into place at finalize.
        return part_prefix(self.step_dir, name, self.options.text_key) + ".idx"

    def process_shard(self, path: str, output: str, work: str) -> None:
        self.tokenize(path, output[: -len(".idx")])

    def tokenize(self, path: str, prefix: str) -> None:
        import numpy as np

        from phi1.data.indexed_dataset import IndexedDatasetWriter, token_dtype_for_vocab
        from phi1.quality.jsonl import LineStats, iter_records

        tokenizer = build_step_tokenizer(self.options)
        eod = [tokenizer.eod] if self.options.append_eod else []
        stats = LineStats()
        tokens = 0
        with IndexedDatasetWriter(prefix, token_dtype_for_vocab(tokenizer.vocab_size)) as writer:
            batch: list[str] = []

            def flush() -> int:
                encoded = [ids + eod for ids in tokenizer.encode_batch(batch)]
                lengths = np.array([len(ids) for ids in encoded], dtype=np.int64)
                writer.add_documents(np.fromiter((t for ids in encoded for t in ids), dtype=np.int64,
                                                 count=int(lengths.sum())), lengths)
                batch.clear()
                return int(lengths.sum())

            for _, record in iter_records(path, {self.options.text_key: str}, stats):
                batch.append(record[self.options.text_key])
                if len(batch) >= 256:
                    tokens += flush()
            if batch:
                tokens += flush()
        self.stat_update("documents", value=stats.good)
        self.stat_update("tokens", value=tokens)
        self.count_lines(stats)


class MergeStep(PipelineStep):
    """One task: merge the per-shard datasets in shard order into `merged/NAME_{key}_document` with a tokenizer
    sidecar (preprocess, stage 2)."""

    name = "merge"
    type = "phi1"

    def __init__(self, step_dir: str, shard_names: list[str], options: StepOptions) -> None:
        super().__init__()
        self.step_dir = step_dir
        self.shard_names = list(shard_names)
        self.options = options

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        from phi1.data.indexed_dataset import IndexedDataset, merge_datasets
        from phi1.data.sidecar import write_sidecar

        key = self.options.text_key
        prefixes = [part_prefix(self.step_dir, name, key) for name in self.shard_names]
        non_empty = []
        for prefix in prefixes:
            dataset = IndexedDataset(prefix)
            if dataset.num_documents:
                non_empty.append(prefix)
            dataset.close()
        if not non_empty:
            raise ValueError(f"{self.step_dir}: no documents are left to tokenize in any shard")
        merged_dir = os.path.join(self.step_dir, "merged")
        output = os.path.join(merged_dir, f"{self.options.dataset_name}_{key}_document")
        count = merge_datasets(non_empty, output)
        merged = IndexedDataset(output)
        write_sidecar(output, build_step_tokenizer(self.options),
                      command=["tools/data_pipeline.py", "preprocess", *self.shard_names],
                      append_eod=self.options.append_eod, json_key=key, documents=merged.num_documents,
                      tokens=merged.num_tokens)
        merged.close()
        self.stat_update("sequences", value=count)
        if data:
            yield from data


def part_prefix(step_dir: str, shard_name: str, key: str) -> str:
    """Prefix of the per-shard dataset of one input shard: parts/X_{key}_document."""
    return os.path.join(step_dir, "parts", f"{shard_output_name(shard_name)[:-len('.jsonl')]}_{key}_document")


def build_step_tokenizer(options: StepOptions):
    from phi1.data.tokenizers import build_tokenizer, detect_tokenizer_type

    kind = options.tokenizer_type or detect_tokenizer_type(options.tokenizer_model)
    return build_tokenizer(kind, options.tokenizer_model, num_threads=1)


class ShardWriter(PipelineStep):
    """Writes datatrove's documents of task `rank` as the output shard of input shard `rank` (dedup's last
    stage runs one task per shard), the input records' own fields at the top level, via a `.partial` file."""

    name = "shard writer"
    type = "phi1"

    def __init__(self, shard_dir: str, shard_names: list[str], options: StepOptions) -> None:
        super().__init__()
        self.shard_dir = shard_dir
        self.shard_names = list(shard_names)
        self.options = options

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        from phi1.quality.minhash import RecordAdapter

        adapter = RecordAdapter(self.options.text_key, self.options.id_key)
        os.makedirs(self.shard_dir, exist_ok=True)
        output = os.path.join(self.shard_dir, shard_output_name(self.shard_names[rank]))
        kept = _write_atomically(output, (json.dumps(adapter(self, document), ensure_ascii=False) + "\n"
                                          for document in (data or ())))
        self.stat_update("kept", value=kept)
        return
        yield  # a generator, as datatrove expects of a step


class PublishStep(PipelineStep):
    """One task: link (or copy) the final files into OUTPUT/result, through OUTPUT/result.partial."""

    name = "publish"
    type = "phi1"

    def __init__(self, source_dir: str, result_dir: str, pattern: str) -> None:
        super().__init__()
        self.source_dir = source_dir
        self.result_dir = result_dir
        self.pattern = pattern

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        partial = self.result_dir + ".partial"
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
        for name in sorted(os.listdir(self.source_dir)):
            if fnmatch.fnmatch(name, self.pattern):
                source = os.path.join(self.source_dir, name)
                try:
                    os.link(source, os.path.join(partial, name))
                except OSError:  # another file system: copy
                    shutil.copy2(source, os.path.join(partial, name))
                self.stat_update("files")
        shutil.rmtree(self.result_dir, ignore_errors=True)
        os.replace(partial, self.result_dir)
        if data:
            yield from data


# -- building the stages ---------------------------------------------------------------------------------------


@dataclass
class Stage:
    """One executor's worth of work: a pipeline run as `tasks` tasks."""

    name: str
    pipeline: list
    tasks: int
    logging_name: str


def input_shards(input_dir: str, glob: str = "*.jsonl") -> list[str]:
    """Sorted names of the files in `input_dir` matching `glob` (not recursive).

    Raises:
        ValueError: not a directory, no matching file, two inputs with the same output name, or a shard whose
            first line is not a JSON object.
    """
    if not os.path.isdir(input_dir):
        raise ValueError(f"--input-dir {input_dir}: not a directory; give the folder holding the JSONL shards")
    names = sorted(n for n in os.listdir(input_dir)
                   if fnmatch.fnmatch(n, glob) and os.path.isfile(os.path.join(input_dir, n)))
    if not names:
        raise ValueError(f"--input-dir {input_dir}: no file matches {glob!r}; give JSONL shards or --glob")
    outputs: dict[str, str] = {}
    for name in names:
        other = outputs.setdefault(shard_output_name(name), name)
        if other != name:
            raise ValueError(f"--input-dir {input_dir}: {other} and {name} would both become "
                             f"{shard_output_name(name)}; keep one")
    return names


def check_gzip_shards(input_dir: str, names: list[str]) -> None:
    """Read every gzip shard to its end (decompression only, nothing kept), so that a truncated or damaged one is
    refused before any task starts rather than failing a task midway.

    Raises:
        ValueError: naming the shard.
    """
    for name in names:
        if not name.endswith(".gz"):
            continue
        path = os.path.join(input_dir, name)
        try:
            with gzip.open(path, "rb") as handle:
                while handle.read(1 << 22):
                    pass
        except (OSError, EOFError, zlib.error) as error:
            raise ValueError(f"{path}: cannot be read to its end as gzip ({type(error).__name__}: {error}); a "
                             "truncated or damaged shard: replace it") from None


def check_first_lines(input_dir: str, names: list[str], text_key: str) -> None:
    """Refuse shards that are not JSONL at all: the first non-blank line must be a JSON object with a string
    `text_key`. (Later bad lines are counted and reported by the steps, as the single-machine tools do.)

    Raises:
        ValueError: naming the file and line.
    """
    for name in names:
        path = os.path.join(input_dir, name)
        opener = gzip.open if name.endswith(".gz") else open
        first = None
        try:
            with opener(path, "rb") as handle:
                first = next(((n, raw) for n, raw in enumerate(handle, 1) if raw.strip()), None)
        except (OSError, EOFError) as error:
            raise ValueError(f"{path}: cannot be read as {'gzip ' if name.endswith('.gz') else ''}JSONL "
                             f"({error})") from None
        if first is None:
            continue  # an empty shard is allowed: it yields an empty output shard
        number, raw = first
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"{path}:{number}: not JSON; each line of a shard must be one JSON object") from None
        if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
            raise ValueError(f"{path}:{number}: not a JSON object with a string {text_key!r} field; "
                             "fix the shard or pass --text-key") from None


def check_chain(chain: list[str], options: StepOptions) -> None:
    """Refuse an empty or unknown chain, preprocess before its end, and a step missing what it needs.

    Raises:
        ValueError: naming the step and the option.
    """
    if not chain:
        raise ValueError(f"--steps: give at least one of {', '.join(STEPS)}")
    for step in chain:
        if step not in STEPS:
            raise ValueError(f"--steps {step!r}: unknown step; choose from {', '.join(STEPS)}")
    if len(set(chain)) != len(chain):
        raise ValueError(f"--steps {','.join(chain)}: a step is given twice")
    if "preprocess" in chain and chain[-1] != "preprocess":
        raise ValueError("--steps: preprocess must come last (its output is tokens, not JSONL)")
    if "annotate" in chain and not options.base_url:
        raise ValueError("--base-url: the annotate step needs an OpenAI-compatible endpoint")
    if "annotate" in chain and not options.model:
        raise ValueError("--model: the annotate step needs the model name the endpoint serves")
    if "annotate" in chain and options.prompt_file:
        from phi1.quality.annotate import read_prompt

        read_prompt(options.prompt_file)
    if "filter" in chain:
        if not options.classifier:
            raise ValueError("--classifier: the filter step needs a classifier from tools/quality_filter.py train")
        from phi1.quality.filtering import config_for_classifier

        config_for_classifier(options.classifier, threshold=options.threshold,
                              embedding_model=options.embedding_model,
                              allow_other_embedder=options.allow_other_embedder)
    if "dedup" in chain and options.dedup_threshold is not None and not 0 < options.dedup_threshold < 1:
        raise ValueError(f"--dedup-threshold {options.dedup_threshold}: must be strictly between 0 and 1")
    if "decontaminate" in chain:
        for name, path in (("--humaneval", options.humaneval), ("--mbpp", options.mbpp)):
            if path and not os.path.isfile(path):
                raise ValueError(f"{name} {path}: no such file")
    if "preprocess" in chain:
        if not options.tokenizer_model:
            raise ValueError("--tokenizer-model: the preprocess step needs a tokenizer file or directory")
        if not os.path.exists(options.tokenizer_model):
            raise ValueError(f"--tokenizer-model {options.tokenizer_model}: no such file or directory")
        tokenizer = build_step_tokenizer(options)
        if options.append_eod:
            tokenizer.eod  # noqa: B018 - raises now, naming the file, when there is no end-of-document token


def build_stages(chain: list[str], input_dir: str, output_dir: str, shard_names: list[str], options: StepOptions,
                 tasks: int) -> tuple[list[Stage], str, str]:
    """The chain as executor stages, in order; returns (stages, the last step's output folder, its file pattern)."""
    stages: list[Stage] = []
    source = input_dir
    names = list(shard_names)
    for number, step in enumerate(chain, 1):
        label = f"{number:02d}-{step}"
        step_dir = os.path.join(output_dir, "steps", label)
        if step == "dedup":
            stages += _dedup_stages(label, source, step_dir, names, options)
        elif step == "preprocess":
            stages.append(Stage(f"{step}: tokenize", [TokenizeStep(source, step_dir, names, options)], tasks,
                                f"{label}-tokenize"))
            stages.append(Stage(f"{step}: merge", [MergeStep(step_dir, names, options)], 1, f"{label}-merge"))
            return stages, os.path.join(step_dir, "merged"), f"{options.dataset_name}_*"
        else:
            kind = {"annotate": AnnotateStep, "filter": FilterStep, "decontaminate": DecontaminateStep}[step]
            stages.append(Stage(step, [kind(source, step_dir, names, options)], tasks, label))
        source = os.path.join(step_dir, "shards")
        names = [shard_output_name(n) for n in names]
    return stages, source, "*.jsonl"


def _dedup_stages(label: str, source: str, step_dir: str, names: list[str], options: StepOptions) -> list[Stage]:
    from datatrove.pipeline.dedup.minhash import (
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.readers import JsonlReader

    from phi1.quality.minhash import CodeWordTokenizer, MinhashSettings, best_bands_rows

    settings = MinhashSettings(n_grams=options.n_grams)
    if options.dedup_threshold is not None:
        settings.bands, settings.rows = best_bands_rows(options.dedup_threshold)
    config = settings.datatrove_config()
    # Rank r reads exactly shard r: a paths file pins the mapping (see the module docstring).
    paths_file = os.path.join(step_dir, "shards.txt")
    os.makedirs(step_dir, exist_ok=True)
    with open(paths_file, "w", encoding="utf-8") as handle:
        handle.write("".join(name + "\n" for name in names))

    def reader():
        return JsonlReader(source, paths_file=paths_file, text_key=options.text_key, id_key=options.id_key,
                           shuffle_files=False)

    folders = {name: os.path.join(step_dir, name) for name in ("signatures", "buckets", "remove")}
    return [
        Stage("dedup: signatures", [reader(), MinhashDedupSignature(folders["signatures"], config=config,
                                                                    language=CodeWordTokenizer())],
              len(names), f"{label}-signatures"),
        Stage("dedup: buckets", [MinhashDedupBuckets(folders["signatures"], folders["buckets"], config=config)],
              settings.bands, f"{label}-buckets"),
        Stage("dedup: cluster", [MinhashDedupCluster(folders["buckets"], folders["remove"], config=config)], 1,
              f"{label}-cluster"),
        Stage("dedup: filter", [reader(), MinhashDedupFilter(folders["remove"]),
                                ShardWriter(os.path.join(step_dir, "shards"), names, options)],
              len(names), f"{label}-filter"),
    ]


# -- running -----------------------------------------------------------------------------------------------------


def _engine_record(chain: list[str], input_dir: str, shard_names: list[str], options: StepOptions,
                   tasks: int) -> dict:
    """What a rerun into the same output must repeat: chain, options, task count and the inputs' sizes."""
    inputs = {name: os.path.getsize(os.path.join(input_dir, name)) for name in shard_names}
    settings = {k: v for k, v in dataclasses.asdict(options).items() if k != "api_key"}  # no secret on disk
    return {"format": ENGINE_FORMAT, "chain": chain, "input_dir": os.path.abspath(input_dir), "inputs": inputs,
            "tasks": tasks, "options": settings}


def _check_rerun(output_dir: str, record: dict) -> None:
    path = os.path.join(output_dir, ENGINE_FILE)
    if os.path.lexists(path):
        try:
            if os.path.islink(path) or not os.path.isfile(path) or os.path.getsize(path) > 16 << 20:
                raise ValueError("not a regular file of at most 16 MiB")
            with open(path, encoding="utf-8") as handle:
                previous = json.load(handle)
            if not isinstance(previous, dict) or not isinstance(previous.get("options", {}), dict):
                raise ValueError("not the JSON object phi1 writes")
        except (ValueError, RecursionError) as error:
            raise ValueError(f"{path}: unreadable record of an earlier run ({error}); it was edited or damaged, so "
                             "what the earlier run finished cannot be trusted: use another --output-dir, or delete "
                             f"{output_dir} to start over") from None
        if previous != record:
            changed = sorted(k for k in set(previous) | set(record) if previous.get(k) != record.get(k))
            if "options" in changed:
                changed += sorted(f"options.{k}" for k in record["options"]
                                  if previous.get("options", {}).get(k) != record["options"][k])
            raise ValueError(f"--output-dir {output_dir}: holds a run with other settings ({', '.join(changed)} "
                             f"differ, see {path}); finished tasks would be kept. Use another --output-dir or the "
                             "same settings")
    else:
        os.makedirs(output_dir, exist_ok=True)
        # Written whole or not at all: a run killed here leaves no half-written record to trip the next one.
        partial = path + ".partial"
        with open(partial, "w", encoding="utf-8") as handle:
            json.dump(record, handle, indent=2)
        os.replace(partial, path)


def _make_executor(options: ExecutorOptions, stage: Stage, logging_dir: str, previous):
    workers = max(1, min(options.workers, stage.tasks))
    if options.kind == "local":
        from datatrove.executor import LocalPipelineExecutor

        return LocalPipelineExecutor(stage.pipeline, tasks=stage.tasks, workers=workers, logging_dir=logging_dir)
    if options.kind == "slurm":
        from datatrove.executor import SlurmPipelineExecutor

        return SlurmPipelineExecutor(
            stage.pipeline, tasks=stage.tasks, workers=options.workers, time=options.time,
            partition=options.partition, cpus_per_task=options.cpus_per_task, mem_per_cpu_gb=options.mem_per_cpu_gb,
            gpus_per_task=options.gpus_per_task, qos=options.qos, job_name=f"{options.job_name}-{stage.logging_name}",
            env_command=options.env_command, sbatch_args=dict(options.sbatch_args), logging_dir=logging_dir,
            depends=previous, slurm_logs_folder=os.path.join(logging_dir, "slurm_logs"), mail_user=None)
    from datatrove.executor.ray import RayPipelineExecutor

    return RayPipelineExecutor(stage.pipeline, tasks=stage.tasks, workers=options.workers, logging_dir=logging_dir,
                               depends=previous, cpus_per_task=options.cpus_per_task,
                               mem_per_cpu_gb=options.mem_per_cpu_gb, gpus_per_task=options.gpus_per_task)


@contextlib.contextmanager
def _sbatch_recorded(submissions: list[dict], directory: str):
    """Within: datatrove's sbatch call writes the script and records the call instead of submitting it."""
    import datatrove.executor.slurm as slurm

    original = slurm.launch_slurm_job

    def record(contents: str, job_id_retriever, *args) -> str:
        job_id = str(1000 + len(submissions))
        path = os.path.join(directory, f"sbatch-{len(submissions):02d}.sh")
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(contents)
        name = next((line.split("=", 1)[1] for line in contents.splitlines()
                     if line.startswith("#SBATCH --job-name=")), "")
        # datatrove follows each stage's array job with a one-task job merging its stats.
        kind = "merge_stats" if "\nmerge_stats " in contents else "stage"
        submissions.append({"script": path, "args": list(args), "job_id": job_id, "job_name": name, "kind": kind})
        return job_id

    slurm.launch_slurm_job = record
    try:
        yield
    finally:
        slurm.launch_slurm_job = original


def check_executor(options: ExecutorOptions) -> None:
    """Raises ValueError naming the option when the executor settings cannot work."""
    if options.kind not in EXECUTORS:
        raise ValueError(f"--executor {options.kind!r}: choose from {', '.join(EXECUTORS)}")
    for name, value in (("--tasks", options.tasks), ("--workers", options.workers),
                        ("--cpus-per-task", options.cpus_per_task), ("--mem-per-cpu-gb", options.mem_per_cpu_gb)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} {value!r}: must be a whole number of at least 1")
    if options.kind == "slurm" and not options.partition:
        raise ValueError("--partition: the slurm executor needs the partition to submit to")
    if options.dry_run and options.kind != "slurm":
        raise ValueError("--dry-run: only the slurm executor has a dry run (it writes the sbatch scripts)")
    if options.kind == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            raise ValueError("--executor ray: ray is not installed (pip install 'ray[default]')") from None


def run_pipeline(chain: list[str], input_dir: str, output_dir: str, options: StepOptions | None = None,
                 executor: ExecutorOptions | None = None, glob: str = "*.jsonl") -> PipelineResult:
    """Run a chain of phi1 data steps over the JSONL shards of `input_dir` into `output_dir`.

    Args:
        chain: step names in order, from STEPS: annotate, filter, dedup, decontaminate, preprocess (last).
            Each JSONL step reads the previous step's shards; preprocess turns them into one Megatron dataset.
        input_dir: folder of JSONL shards (.jsonl, .jsonl.gz); the files matching `glob` are read.
        output_dir: see the module docstring for its layout; the outcome is `output_dir/result`.
        options: the steps' settings (what each step needs is checked before anything runs).
        executor: local (default; runs to the end here), slurm (submits job arrays with dependencies, one per
            stage, and returns; with dry_run writes the sbatch scripts only) or ray.
    Returns:
        PipelineResult; `finished` is True when the result is complete (local runs).
    Raises:
        ValueError: bad input, options or executor settings, named in the message; a rerun into `output_dir`
            with another chain, options, inputs or task count. Errors inside a task propagate (datatrove logs
            them under the stage's logging dir); rerunning resumes from the finished tasks.
    """
    options = options or StepOptions()
    executor = executor or ExecutorOptions()
    check_executor(executor)
    try:
        import orjson  # noqa: F401  (datatrove's JsonlReader needs it and says so only inside a running task)
        from datatrove.executor import LocalPipelineExecutor  # noqa: F401
    except ImportError as error:
        raise ValueError(f"the data engine needs datatrove and orjson (pip install -e '.[data]'): {error}") from None
    shard_names = input_shards(input_dir, glob)
    check_first_lines(input_dir, shard_names, options.text_key)
    check_chain(chain, options)
    if executor.tasks > len(shard_names):
        # Each task takes whole shards: the extra tasks would only be started (and, for a huge number, never end).
        raise ValueError(f"--tasks {executor.tasks}: more than the {len(shard_names)} input shard(s) in --input-dir; "
                         f"each task takes whole shards, give --tasks {len(shard_names)} or fewer (or split the input)")
    input_dir, output_dir = os.path.abspath(input_dir), os.path.abspath(output_dir)
    logging_root = os.path.abspath(executor.logging_dir or os.path.join(output_dir, "logs"))
    # Compared with links resolved: a link must not hide that the folders overlap.
    real_input, real_output = os.path.realpath(input_dir), os.path.realpath(output_dir)
    if real_output == real_input or real_output.startswith(real_input + os.sep):
        raise ValueError(f"--output-dir {output_dir}: inside --input-dir; its files would be read as input")
    for written in (os.path.join(real_output, "steps"), os.path.join(real_output, "result"),
                    os.path.realpath(logging_root)):
        if real_input == written or real_input.startswith(written + os.sep):
            raise ValueError(f"--input-dir {input_dir}: inside {written}, which this run writes (replaces); copy the "
                             "shards elsewhere, or choose another --output-dir")
    if executor.kind == "local":  # the tasks run here and now: a damaged gzip shard is named before any starts
        check_gzip_shards(input_dir, shard_names)
    _check_rerun(output_dir, _engine_record(chain, input_dir, shard_names, options, executor.tasks))
    stages, final_dir, pattern = build_stages(chain, input_dir, output_dir, shard_names, options, executor.tasks)
    result_dir = os.path.join(output_dir, "result")
    stages.append(Stage("publish", [PublishStep(final_dir, result_dir, pattern)], 1,
                        f"{len(chain) + 1:02d}-publish"))

    summaries: list[dict] = []
    submissions: list[dict] = []
    previous = None
    executors = []
    for stage in stages:
        logging_dir = os.path.join(logging_root, stage.logging_name)
        built = _make_executor(executor, stage, logging_dir, previous)
        executors.append(built)
        summaries.append({"name": stage.name, "tasks": stage.tasks, "logging_dir": logging_dir})
        if executor.kind == "local":
            stats = built.run()
            summaries[-1]["stats"] = _stats_summary(stats)
        previous = built
    if executor.kind == "slurm":
        scripts = os.path.join(logging_root, "sbatch")
        os.makedirs(scripts, exist_ok=True)
        recorder = _sbatch_recorded(submissions, scripts) if executor.dry_run else contextlib.nullcontext()
        with recorder:
            executors[-1].run()  # launches every stage it depends on first, each with afterok on the one before
        for summary, built in zip(summaries, executors):
            summary["script"] = os.path.join(summary["logging_dir"], "launch_script.slurm")
            summary["job_id"] = built.job_id
    elif executor.kind == "ray":
        # Ray's worker processes did not find an editable install of phi1 here ("No module named 'phi1'", the
        # run then waits forever); a local cluster started by this process inherits its environment, so the
        # package's root goes on PYTHONPATH. (On an existing cluster, install phi1 on every node.)
        import phi1

        package_root = os.path.dirname(os.path.dirname(os.path.abspath(phi1.__file__)))
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
        executors[-1].run()
    finished = executor.kind != "slurm" and os.path.isdir(result_dir)
    return PipelineResult(output_dir, result_dir, finished, summaries, submissions)


def _stats_summary(stats) -> dict:
    """datatrove's PipelineStats as {step name: {stat: total}} (None when every task was already complete)."""
    if stats is None:
        return {}
    summary = {}
    for step in stats.stats:
        values = {name: metric.total for name, metric in step.stats.items() if hasattr(metric, "total")}
        if values:
            summary[step.name] = values
    return summary
