"""LLM annotation of code files for the quality classifier, the phi-1 way: ask a model (the paper used GPT-4) for
a file's "educational value for a student whose goal is to learn basic coding concepts", and keep its score.

Every input record is keyed by its id (the `id` field, else the sha256 of its text) and ends as exactly one
output line, appended with fsync:

- status "ok": a score was parsed from the answer; `score` is it divided by the scale (0..1) and `label` is
  1 when `score >= label_threshold`, else 0, so `quality_filter.py train` can learn either (regression on
  `score`, classification on `label`);
- status "unparsed": every one of `max_attempts` answers was unreadable; the line keeps the raw answers and no
  score. Nothing is guessed; `train` skips these lines and counts them.

Each line records the model, the prompt template (the exact prompt is the template with the text put in) and
the raw answer(s). A rerun resumes: finished ids are skipped, a torn last line is cut and its id asked again,
and a run with another model, prompt or scale into the same output is refused (its scores would mix).

Requests go through `phi1.quality.endpoint` (rate limit, concurrency, retries), as the synthetic generator's do.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import re
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from phi1.quality.endpoint import CompletionEndpoint, EndpointConfig
from phi1.quality.jsonl import LineStats, append_line, check_record, iter_records

# The paper's question (phi-1, section 2.1), with the answer format spelled out so it can be parsed.
DEFAULT_PROMPT = (
    "Here is a Python code file:\n\n```python\n{text}\n```\n\n"
    "Determine its educational value for a student whose goal is to learn basic coding concepts. "
    "Answer with a single integer from 0 (no educational value) to {scale} (very high educational value)."
)
# Added to the prompt when an answer could not be read, before asking again.
REMINDER = "\n\nReply with the number only, an integer from 0 to {scale}."

# Word answers, as a fraction of the scale. Only a whole answer, or its first word, counts as a label:
# a word inside a sentence ("not high") is too easy to misread.
WORD_SCORES = {
    "none": 0.0, "no": 0.0, "low": 0.0, "poor": 0.0, "bad": 0.0, "useless": 0.0,
    "medium": 0.5, "moderate": 0.5, "average": 0.5, "fair": 0.5, "some": 0.5,
    "yes": 1.0, "high": 1.0, "good": 1.0, "excellent": 1.0, "great": 1.0,
}
_NUMBER = r"[-+]?\d+(?:\.\d+)?"
_FRACTION = re.compile(rf"({_NUMBER})\s*(?:/|out of)\s*({_NUMBER})", re.IGNORECASE)
_KEYWORD = re.compile(rf"\b(?:score|rating|rate|rated|value|grade)\b[^0-9+-]{{0,40}}?({_NUMBER})", re.IGNORECASE)
_ONLY_NUMBER = re.compile(rf"^\s*({_NUMBER})\s*[.!]?\s*$")
_ANY_NUMBER = re.compile(rf"(?<![\w.]){_NUMBER}(?![\w.]*\w)")
_KEYWORD_WORD = re.compile(r"\b(?:score|rating|value|grade)\s*(?:is|[:=-])\s*([a-z]+)\W*$", re.IGNORECASE)
_JSON_OBJECT = re.compile(r"\{[^{}]*\}", re.DOTALL)
_JSON_KEYS = ("score", "rating", "educational_value", "value", "grade")


def parse_score(answer: str, scale: float) -> float | None:
    """The score in [0, 1] an answer gives on a 0..`scale` scale, or None when it gives none unambiguously.

    Reads, in this order: a JSON object with a score/rating/educational_value key (fenced or inline);
    a fraction "7/10" or "7 out of 10" (scaled by its own denominator); a number right after "score",
    "rating", "rate(d)", "value" or "grade"; an answer that is only a number; a word label (the whole answer,
    its first word when that is yes/no ending a clause, or the last word after "value:"/"score is": "high", "yes", "low", ...);
    a sentence with exactly one number on the scale.
    A number outside 0..scale, several conflicting numbers, or none at all gives None (the caller asks again).
    """
    text = answer.strip()
    if not text:
        return None
    for match in _JSON_OBJECT.finditer(text):
        try:
            obj = json.loads(match.group(0))
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            for key in _JSON_KEYS:
                value = obj.get(key)
                if isinstance(value, str):
                    return parse_score(value, scale)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    return _on_scale(float(value), scale)
    fraction = _FRACTION.search(text)
    if fraction:
        value, top = float(fraction.group(1)), float(fraction.group(2))
        return _on_scale(value / top * scale, scale) if top > 0 else None
    keyword = _KEYWORD.search(text)
    if keyword:
        return _on_scale(float(keyword.group(1)), scale)
    only = _ONLY_NUMBER.match(text)
    if only:
        return _on_scale(float(only.group(1)), scale)
    labelled = _KEYWORD_WORD.search(text)
    if labelled and labelled.group(1).lower() in WORD_SCORES:
        return WORD_SCORES[labelled.group(1).lower()]
    words = re.findall(r"[a-z]+", text.lower())
    if len(words) == 1 and words[0] in WORD_SCORES:
        return WORD_SCORES[words[0]]
    # "Yes, it teaches loops." counts; "no idea" does not (the word must end a clause).
    answered = re.match(r"^(yes|no)\s*(?:[.,!:;-]|$)", text, re.IGNORECASE)
    if answered:
        return WORD_SCORES[answered.group(1).lower()]
    numbers = {float(n) for n in _ANY_NUMBER.findall(text)}
    on_scale = {n for n in numbers if 0 <= n <= scale}
    if len(on_scale) == 1 and len(numbers) == 1:
        return _on_scale(on_scale.pop(), scale)
    return None


def _on_scale(value: float, scale: float) -> float | None:
    if not math.isfinite(value) or value < 0 or value > scale:
        return None
    return value / scale


def read_prompt(path: str) -> str:
    """A prompt template file; it must contain `{text}` where the file goes. Raises ValueError otherwise."""
    with open(path, encoding="utf-8") as handle:
        template = handle.read()
    if "{text}" not in template:
        raise ValueError(f"{path}: the prompt template has no {{text}} placeholder where the code file goes")
    return template


def render(template: str, text: str, scale: float) -> str:
    """The prompt for one file (plain replacement: code is full of braces, str.format would choke on them)."""
    return template.replace("{scale}", f"{scale:g}").replace("{text}", text)


def record_id(record: dict, id_key: str, text: str) -> str:
    """The record's `id_key` when it is a non-empty string or an int, else "sha256:" + the text's digest."""
    value = record.get(id_key)
    if isinstance(value, str) and value:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass
class AnnotateConfig:
    """One annotation run (the endpoint's settings are in `endpoint`)."""

    endpoint: EndpointConfig
    prompt: str = DEFAULT_PROMPT
    scale: float = 10.0
    label_threshold: float = 0.5
    """Scores (0..1) at or above it get label 1."""
    max_attempts: int = 3
    """Answers asked per file before it is written as unparsed."""
    text_key: str = "text"
    id_key: str = "id"
    max_chars: int = 6000
    """Files are cut to this many characters before they go in the prompt (the paper's files are long)."""
    seed: int = 0


@dataclass
class AnnotateCounts:
    written: Counter = field(default_factory=Counter)
    """status -> records written this run."""
    bad_answers: int = 0
    """Answers that gave no score (each was asked again while attempts were left)."""
    retries: int = 0
    """Endpoint failures retried."""
    skipped_finished: int = 0
    duplicate_ids: int = 0
    """Input records whose id was already seen in the input (annotated once)."""
    input: LineStats = field(default_factory=LineStats)

    def to_dict(self) -> dict:
        return {"written": dict(self.written), "bad_answers": self.bad_answers, "retries": self.retries,
                "skipped_finished": self.skipped_finished, "duplicate_ids": self.duplicate_ids,
                "input_lines": self.input.to_dict()}


class Annotator:
    """Annotates every unfinished input record into `output` (jsonl).

    Args:
        client: an `openai.AsyncOpenAI` or anything with the same coroutines (see CompletionEndpoint).
    """

    def __init__(self, client, config: AnnotateConfig, inputs: list[str], output: str, log=sys.stderr) -> None:
        self.config = config
        self.inputs = inputs
        self.output = output
        self.log = log
        self.counts = AnnotateCounts()
        self.endpoint = CompletionEndpoint(client, config.endpoint, on_retry=self._count_retry)
        self.finished: set[str] = set()

    def _count_retry(self, error: BaseException) -> None:
        self.counts.retries += 1

    def _manifest(self) -> dict:
        return {"model": self.config.endpoint.model, "api": self.config.endpoint.api, "prompt": self.config.prompt,
                "scale": self.config.scale, "max_chars": self.config.max_chars}

    def load_existing(self) -> None:
        """Read finished ids back; cut a torn last line. Raises ValueError when the output was made with another
        model, prompt or scale, or holds an id twice."""
        manifest_path = self.output + ".manifest.json"
        if os.path.exists(manifest_path):
            with open(manifest_path, encoding="utf-8") as handle:
                previous = json.load(handle)
            if previous != self._manifest():
                changed = sorted(k for k in set(previous) | set(self._manifest())
                                 if previous.get(k) != self._manifest().get(k))
                raise ValueError(f"{manifest_path}: the output was annotated with other settings ({', '.join(changed)} "
                                 "differ); use another --output or the same settings")
        else:
            os.makedirs(os.path.dirname(os.path.abspath(self.output)), exist_ok=True)
            with open(manifest_path, "w", encoding="utf-8") as handle:
                json.dump(self._manifest(), handle, indent=2)
        if not os.path.exists(self.output):
            return
        with open(self.output, "rb+") as handle:
            data = handle.read()
            if data and not data.endswith(b"\n"):
                cut = data.rfind(b"\n") + 1
                handle.truncate(cut)
                print(f"{self.output}: cut a torn last line of {len(data) - cut} bytes (killed mid-write); "
                      "its id is asked again", file=self.log)
                data = data[:cut]
        stats = LineStats()
        for line_number, raw in enumerate(data.splitlines(), 1):
            record = check_record(raw, {"id": str, "status": str}, self.output, line_number, stats)
            if record is None:
                continue
            if record["id"] in self.finished:
                raise ValueError(f"{self.output}:{line_number}: id {record['id']} appears twice")
            self.finished.add(record["id"])
        if stats.bad:
            print(f"{self.output}: {stats.summary()}; those lines' ids are asked again", file=self.log)

    def pending(self) -> Iterator[tuple[str, dict]]:
        """(id, record) of every input record not yet finished, in input order, each id once."""
        seen: set[str] = set()
        for path in self.inputs:
            for _, record in iter_records(path, {self.config.text_key: str}, self.counts.input):
                key = record_id(record, self.config.id_key, record[self.config.text_key])
                if key in seen:
                    self.counts.duplicate_ids += 1
                    continue
                seen.add(key)
                if key in self.finished:
                    self.counts.skipped_finished += 1
                    continue
                yield key, record

    async def annotate_one(self, key: str, record: dict, sink) -> None:
        config = self.config
        text = record[config.text_key]
        prompt = render(config.prompt, text[: config.max_chars], config.scale)
        if config.endpoint.api == "completions":
            prompt += "\n\nAnswer:"
        answers, score = [], None
        for attempt in range(config.max_attempts):
            seed = int.from_bytes(hashlib.sha256(f"{config.seed}:{key}:{attempt}".encode()).digest()[:4], "little")
            asked = prompt if attempt == 0 else prompt + render(REMINDER, "", config.scale)
            answer = await self.endpoint.complete(asked, seed)
            answers.append(answer)
            score = parse_score(answer, config.scale)
            if score is not None:
                break
            self.counts.bad_answers += 1
        out = {"id": key, "text": text, "status": "unparsed" if score is None else "ok",
               "model": config.endpoint.model, "prompt_template": config.prompt, "scale": config.scale,
               "raw_answer": answers[-1], "attempts": len(answers)}
        if len(answers) > 1:
            out["earlier_answers"] = answers[:-1]
        if score is not None:
            out["score"] = round(score, 6)
            out["label"] = int(score >= config.label_threshold)
        append_line(sink, out, sync=True)
        self.finished.add(key)
        self.counts.written[out["status"]] += 1

    async def run(self, progress: bool = True) -> AnnotateCounts:
        """Annotate every pending record with `concurrency` requests in flight; raises EndpointUnavailable
        (after writing every finished record) when the endpoint stays down."""
        self.load_existing()
        # Records are read as workers need them (one at a time, no await in between): the input is streamed,
        # never held whole in memory.
        todo = self.pending()
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(desc="annotating", unit="file", file=self.log)
        failure: list[BaseException] = []
        with open(self.output, "a", encoding="utf-8") as sink:

            async def worker() -> None:
                while not failure:
                    try:
                        key, record = next(todo)
                    except StopIteration:
                        return
                    except Exception as error:  # noqa: BLE001 - an unreadable input stops every worker
                        failure.append(error)
                        return
                    try:
                        await self.annotate_one(key, record, sink)
                    except Exception as error:  # noqa: BLE001 - stop every worker, report once
                        failure.append(error)
                        return
                    if bar is not None:
                        bar.update(1)

            await asyncio.gather(*(worker() for _ in range(max(1, self.config.endpoint.concurrency))))
        if bar is not None:
            bar.close()
        if failure:
            raise failure[0]
        return self.counts
