"""Synthetic textbook sections and exercises from an OpenAI-compatible endpoint, the phi-1 way.

Diversity comes from the prompt, not from sampling luck: every record draws a topic, an audience and a style
(and, for an exercise, a function name verb_noun) from lists the user can replace. Draws are balanced: within
each block of len(list) consecutive ids every entry appears once, in a random order fixed by the seed, so the
spread over topics and audiences is as configured even for small runs.

A record's id ("textbook-000042", "exercise-000042") fixes its draw, so a restarted run regenerates an
unfinished id with the same prompt and skips finished ones. Each id ends as exactly one output line:

- status "ok": the text passed validation (exercises: parses as Python, defines the drawn function with a
  docstring and a body; when it carries tests (top-level asserts or doctest examples) they pass in the sandbox)
  and is neither an exact nor a near duplicate of a kept record;
- status "rejected": every one of `max_attempts` generations failed; the line keeps the last text and the
  reasons, so the id is accounted for and the failure rate is visible (nothing is dropped silently).

Failures of the endpoint itself (connection refused, 5xx, 429, timeouts) are retried with exponential backoff
and jitter; they never mark a record rejected. When retries run out the run stops, and running it again resumes.
"""

from __future__ import annotations

import ast
import asyncio
import hashlib
import json
import os
import random
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field

from phi1.quality.dedup import NearDuplicateIndex, exact_key
from phi1.quality.endpoint import CompletionEndpoint, EndpointConfig, EndpointUnavailable, TokenBucket  # noqa: F401
from phi1.quality.jsonl import LineStats, append_line, check_record

KINDS = ("textbook", "exercise")
LIST_NAMES = ("topics", "audiences", "styles", "function_verbs", "function_nouns")


def read_list(path: str) -> list[str]:
    """Entries of a list file: one per line, blank lines and # comments ignored. Raises ValueError when empty."""
    with open(path, encoding="utf-8") as handle:
        entries = [line.strip() for line in handle if line.strip() and not line.lstrip().startswith("#")]
    if not entries:
        raise ValueError(f"{path}: no entries (one per line; # starts a comment)")
    return entries


@dataclass
class DiversityLists:
    topics: list[str]
    audiences: list[str]
    styles: list[str]
    function_verbs: list[str]
    function_nouns: list[str]

    @classmethod
    def from_directory(cls, directory: str) -> DiversityLists:
        """Read topics.txt, audiences.txt, styles.txt, function_verbs.txt, function_nouns.txt."""
        return cls(**{name: read_list(os.path.join(directory, f"{name}.txt")) for name in LIST_NAMES})

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class GeneratorConfig:
    """One generation run."""

    textbooks: int = 10
    """Textbook sections to produce (ids textbook-000000 ...)."""
    exercises: int = 10
    model: str = "phi1"
    api: str = "chat"
    """'chat' (/v1/chat/completions) or 'completions' (/v1/completions, for base models)."""
    max_tokens: int = 512
    temperature: float = 1.0
    seed: int = 0
    concurrency: int = 4
    requests_per_minute: float = 0.0
    """Token-bucket rate limit; 0 means none."""
    max_retries: int = 8
    """Endpoint failures retried per request before the run stops."""
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    max_attempts: int = 3
    """Generations per id before it is written as rejected."""
    near_duplicate_threshold: float = 0.8
    run_tests: bool = True
    test_timeout_s: float = 10.0
    min_chars: int = 20
    """Shortest acceptable text (non-space characters)."""


def _balanced(entries: list[str], seed: int, salt: str, index: int) -> str:
    block, position = divmod(index, len(entries))
    order = list(range(len(entries)))
    random.Random(f"{seed}:{salt}:{block}").shuffle(order)
    return entries[order[position]]


def draw(lists: DiversityLists, seed: int, kind: str, index: int) -> dict:
    """The draw of one id: topic, audience, style (balanced per block) and, for exercises, a function name."""
    chosen = {
        "topic": _balanced(lists.topics, seed, f"{kind}:topic", index),
        "audience": _balanced(lists.audiences, seed, f"{kind}:audience", index),
        "style": _balanced(lists.styles, seed, f"{kind}:style", index),
    }
    if kind == "exercise":
        rng = random.Random(f"{seed}:{kind}:name:{index}")
        chosen["function_name"] = f"{rng.choice(lists.function_verbs)}_{rng.choice(lists.function_nouns)}"
    return chosen


def build_prompt(kind: str, chosen: dict, api: str) -> str:
    """The request text for one draw; for the completions API it ends where the answer should start."""
    if kind == "textbook":
        text = (f"Write a section of a Python textbook about {chosen['topic']} for {chosen['audience']}, written "
                f"as {chosen['style']}. Explain the idea in clear prose and include short runnable code examples.")
        return text + ("\n\n## " + chosen["topic"].capitalize() + "\n\n" if api == "completions" else "")
    name = chosen["function_name"]
    text = (f"Write a Python exercise about {chosen['topic']} for {chosen['audience']}: a function named `{name}` "
            f"with type hints and a docstring that states the task and gives examples, then its solution. "
            f"Reply with Python code only.")
    return text + (f"\n\n```python\ndef {name}(" if api == "completions" else "")


def extract_code(answer: str) -> str:
    """The first ```python fenced block of a chat answer, else the answer."""
    if "```" in answer:
        after = answer.split("```", 1)[1]
        after = after.split("\n", 1)[1] if after.startswith(("python", "py\n", "\n")) else after
        return after.split("```", 1)[0]
    return answer


def _has_tests(tree: ast.Module, function: ast.FunctionDef) -> bool:
    docstring = ast.get_docstring(function) or ""
    return ">>>" in docstring or any(isinstance(node, ast.Assert) for node in tree.body)


def exercise_test_program(code: str, name: str) -> str:
    """The program that passes when the exercise's own tests pass: its top-level asserts run with it, and its
    doctest examples are run and must not fail."""
    return (code + "\n\nimport doctest as _doctest\n_runner = _doctest.DocTestRunner(verbose=False)\n"
            f"for _test in _doctest.DocTestFinder().find({name}, {name!r}, globs=dict(globals())):\n"
            "    _runner.run(_test)\n"
            "assert _runner.failures == 0, f'{_runner.failures} doctest examples failed'\n")


def check_exercise(code: str, name: str) -> tuple[list[str], bool]:
    """(reasons it is not a valid exercise — empty when valid, whether it carries tests)."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError) as error:
        return [f"does not parse: {error}"], False
    functions = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == name]
    if not functions:
        return [f"defines no top-level function {name!r}"], False
    function = functions[0]
    reasons = []
    if ast.get_docstring(function) is None:
        reasons.append("no docstring")
    body = function.body[1:] if ast.get_docstring(function) is not None else function.body
    if not body or all(isinstance(s, ast.Pass) or (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))
                       for s in body):
        reasons.append("no solution body")
    return reasons, _has_tests(tree, function)


@dataclass
class RunCounts:
    written: Counter = field(default_factory=Counter)
    """(kind, status) -> records written this run."""
    rejections: Counter = field(default_factory=Counter)
    """Reason (first words) -> generations rejected."""
    retries: int = 0
    skipped: int = 0
    """Ids already finished in the output."""


class SyntheticGenerator:
    """Generates every unfinished id into `output` (jsonl, appended line by line with fsync).

    Args:
        client: an `openai.AsyncOpenAI` (or anything with the same `chat.completions.create` /
            `completions.create` coroutines).
        sandbox: callable(program) -> object with `.passed` (phi1.eval.sandbox.run_program); None skips tests.
    """

    def __init__(self, client, config: GeneratorConfig, lists: DiversityLists, output: str, sandbox=None,
                 log=sys.stderr) -> None:
        self.client = client
        self.config = config
        self.lists = lists
        self.output = output
        self.sandbox = sandbox
        self.log = log
        self.counts = RunCounts()
        self.exact: set[str] = set()
        self.near = NearDuplicateIndex(threshold=config.near_duplicate_threshold)
        self.finished: set[str] = set()
        self.endpoint = CompletionEndpoint(client, EndpointConfig(
            model=config.model, api=config.api, max_tokens=config.max_tokens, temperature=config.temperature,
            concurrency=config.concurrency, requests_per_minute=config.requests_per_minute,
            max_retries=config.max_retries, backoff_s=config.backoff_s, max_backoff_s=config.max_backoff_s),
            on_retry=self._count_retry)
        self.read_stats = LineStats()

    # -- resuming ---------------------------------------------------------------------------------------------

    def _manifest(self) -> dict:
        return {"seed": self.config.seed, "lists": self.lists.digest(), "api": self.config.api,
                "model": self.config.model}

    def load_existing(self) -> None:
        """Read finished ids (and the dedup state) back from the output; a torn last line (the process was
        killed while writing it) is cut off and its id generated again. Raises ValueError when the output was
        made with another seed or other lists (its ids would mean other prompts)."""
        manifest_path = self.output + ".manifest.json"
        if os.path.exists(manifest_path):
            with open(manifest_path, encoding="utf-8") as handle:
                previous = json.load(handle)
            if previous != self._manifest():
                raise ValueError(f"{manifest_path}: the output was generated with {previous}, this run has "
                                 f"{self._manifest()}; use another --output or the same settings")
        else:
            os.makedirs(os.path.dirname(os.path.abspath(self.output)), exist_ok=True)
            with open(manifest_path, "w", encoding="utf-8") as handle:
                json.dump(self._manifest(), handle)
        if not os.path.exists(self.output):
            return
        with open(self.output, "rb+") as handle:
            data = handle.read()
            if data and not data.endswith(b"\n"):
                cut = data.rfind(b"\n") + 1
                handle.truncate(cut)
                print(f"{self.output}: cut a torn last line of {len(data) - cut} bytes (killed mid-write); "
                      "its id is generated again", file=self.log)
                data = data[:cut]
        for line_number, raw in enumerate(data.splitlines(), 1):
            record = check_record(raw, {"id": str, "status": str, "text": str}, self.output, line_number,
                                  self.read_stats)
            if record is None:
                continue
            if record["id"] in self.finished:
                raise ValueError(f"{self.output}:{line_number}: id {record['id']} appears twice")
            self.finished.add(record["id"])
            if record["status"] == "ok":
                self.exact.add(exact_key(record["text"]))
                self.near.add(record["id"], record["text"])
        if self.read_stats.bad:
            print(f"{self.output}: {self.read_stats.summary()}; those lines' ids are generated again",
                  file=self.log)

    # -- one request ------------------------------------------------------------------------------------------

    def _count_retry(self, error: BaseException) -> None:
        self.counts.retries += 1

    async def _request(self, prompt: str, sample_seed: int) -> str:
        return await self.endpoint.complete(prompt, sample_seed)

    # -- one id -----------------------------------------------------------------------------------------------

    async def _validate(self, kind: str, chosen: dict, text: str) -> tuple[list[str], bool | None]:
        if len("".join(text.split())) < self.config.min_chars:
            return [f"shorter than {self.config.min_chars} characters"], None
        tests_passed = None
        if kind == "exercise":
            reasons, has_tests = check_exercise(text, chosen["function_name"])
            if reasons:
                return reasons, None
            if has_tests and self.sandbox is not None and self.config.run_tests:
                program = exercise_test_program(text, chosen["function_name"])
                result = await asyncio.get_running_loop().run_in_executor(None, self.sandbox, program)
                tests_passed = bool(result.passed)
                if not tests_passed:
                    return [f"its tests {getattr(result, 'status', 'failed')}"], False
        if exact_key(text) in self.exact:
            return ["exact duplicate"], tests_passed
        match, score = self.near.find(text)
        if match is not None:
            return [f"near duplicate of {match} (Jaccard ~{score:.2f})"], tests_passed
        return [], tests_passed

    async def generate_one(self, kind: str, index: int, sink) -> None:
        record_id = f"{kind}-{index:06d}"
        chosen = draw(self.lists, self.config.seed, kind, index)
        prompt = build_prompt(kind, chosen, self.config.api)
        text, reasons, tests_passed = "", [], None
        for attempt in range(self.config.max_attempts):
            sample_seed = int.from_bytes(hashlib.sha256(f"{self.config.seed}:{record_id}:{attempt}".encode())
                                         .digest()[:4], "little")
            answer = await self._request(prompt, sample_seed)
            if kind == "exercise":
                text = extract_code(answer) if self.config.api == "chat" else \
                    f"def {chosen['function_name']}(" + answer.split("```", 1)[0]
            else:
                text = answer.strip()
            reasons, tests_passed = await self._validate(kind, chosen, text)
            # No await between the duplicate check above and this write: asyncio runs one task at a time,
            # so two tasks can never both keep the same text.
            if not reasons:
                break
            for reason in reasons:
                self.counts.rejections[reason.split(":")[0].split(" (")[0]] += 1
        status = "rejected" if reasons else "ok"
        record = {"id": record_id, "kind": kind, **chosen, "status": status, "text": text,
                  "attempts": attempt + 1, "model": self.config.model, "prompt": prompt}
        if kind == "exercise":
            record["tests_passed"] = tests_passed
        if reasons:
            record["reject_reasons"] = reasons
        else:
            self.exact.add(exact_key(text))
            self.near.add(record_id, text)
        append_line(sink, record, sync=True)
        self.finished.add(record_id)
        self.counts.written[(kind, status)] += 1

    # -- the run ----------------------------------------------------------------------------------------------

    def pending(self) -> list[tuple[str, int]]:
        todo = []
        for kind, count in (("textbook", self.config.textbooks), ("exercise", self.config.exercises)):
            for index in range(count):
                if f"{kind}-{index:06d}" in self.finished:
                    self.counts.skipped += 1
                else:
                    todo.append((kind, index))
        return todo

    async def run(self, progress: bool = True) -> RunCounts:
        """Generate every pending id; raises EndpointUnavailable (after writing all finished ids) when the
        endpoint stays down."""
        self.load_existing()
        todo = self.pending()
        queue: asyncio.Queue = asyncio.Queue()
        for item in todo:
            queue.put_nowait(item)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(todo), desc="generating", unit="rec", file=self.log)
        failure: list[BaseException] = []
        with open(self.output, "a", encoding="utf-8") as sink:

            async def worker() -> None:
                while not failure:
                    try:
                        kind, index = queue.get_nowait()
                    except asyncio.QueueEmpty:
                        return
                    try:
                        await self.generate_one(kind, index, sink)
                    except Exception as error:  # noqa: BLE001 - stop every worker, report once
                        failure.append(error)
                        return
                    if bar is not None:
                        bar.update(1)

            await asyncio.gather(*(worker() for _ in range(max(1, self.config.concurrency))))
        if bar is not None:
            bar.close()
        if failure:
            raise failure[0]
        return self.counts


def count_output(path: str) -> dict:
    """Counts of a finished output: records per kind and status, per topic / audience / style, duplicates."""
    stats = LineStats()
    ids: Counter = Counter()
    by = {"kind_status": Counter(), "topic": Counter(), "audience": Counter(), "style": Counter()}
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, 1):
            record = check_record(raw, {"id": str, "status": str}, path, line_number, stats)
            if record is None:
                continue
            ids[record["id"]] += 1
            by["kind_status"][f"{record.get('kind')}/{record['status']}"] += 1
            for key in ("topic", "audience", "style"):
                by[key][f"{record.get('kind')}: {record.get(key)}"] += 1
    return {"records": sum(ids.values()), "distinct_ids": len(ids),
            "duplicated_ids": sorted(i for i, c in ids.items() if c > 1),
            **{k: dict(sorted(v.items())) for k, v in by.items()}, "bad_lines": stats.to_dict()}
