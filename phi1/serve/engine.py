"""The batching engine behind the server: one worker thread owns the model and runs concurrent requests as
batches through `iter_generate`.

The worker takes the first waiting request, then keeps collecting for `batch_window_ms` (or until
`max_batch_size` sequences), groups what it has by sampling parameters (one batch shares one SamplingParams)
and generates each group as one left-padded batch with the KV cache. Requests arriving while a batch runs wait
for the next one (no joining a running batch). Each sequence reports text deltas on its request's queue;
text that might be the start of a stop string, or half of a multi-byte character, is held back until it is
certain, so a stream never shows text that the final answer cuts.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import astuple, dataclass, field

from phi1.core.generation import SamplingParams, iter_generate
from phi1.core.model import PhiForCausalLM

log = logging.getLogger(__name__)


@dataclass
class Event:
    """One message from the engine to a request: a text delta, a finished choice, or an error."""

    kind: str
    """'delta', 'finish' or 'error'."""
    choice: int = 0
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0


@dataclass
class Submission:
    """A request's sequences (one per choice) and the queue its events arrive on."""

    prompts: list[list[int]]
    params: SamplingParams
    events: queue.Queue = field(default_factory=queue.Queue)


def _held_back(text: str, stop_strings: tuple[str, ...]) -> int:
    """Characters at the end of `text` that may still turn out to be part of a stop string or of a character
    whose bytes are not all generated yet."""
    hold = 0
    for stop in stop_strings:
        for length in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:length]):
                hold = max(hold, length)
                break
    if text.endswith("\ufffd"):
        hold = max(hold, len(text) - len(text.rstrip("\ufffd")))
    return hold


def _cut_at_stop(text: str, stop_strings: tuple[str, ...]) -> str:
    positions = [text.find(s) for s in stop_strings if s and s in text]
    return text[: min(positions)] if positions else text


class BatchingEngine:
    """Owns the model; `submit` is thread-safe and returns the Submission whose queue gets the events."""

    def __init__(
        self,
        model: PhiForCausalLM,
        decode: Callable[[list[int]], str],
        max_batch_size: int = 32,
        batch_window_ms: float = 5.0,
        vocab_size: int | None = None,
    ) -> None:
        self.model = model
        self.decode = decode
        self.vocab_size = vocab_size  # the tokenizer's: ids past it are embedding padding, never sampled
        self.max_batch_size = max_batch_size
        self.batch_window_s = batch_window_ms / 1000
        self.pending: queue.Queue[Submission | None] = queue.Queue()
        self.batches_run = 0
        self.largest_batch = 0
        self._thread = threading.Thread(target=self._loop, name="phi1-batching-engine", daemon=True)
        self._thread.start()

    def submit(self, prompts: list[list[int]], params: SamplingParams) -> Submission:
        submission = Submission(prompts, params)
        self.pending.put(submission)
        return submission

    def stop(self) -> None:
        self.pending.put(None)
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        while True:
            first = self.pending.get()
            if first is None:
                return
            collected = [first]
            sequences = len(first.prompts)
            deadline = time.monotonic() + self.batch_window_s
            while sequences < self.max_batch_size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    item = self.pending.get(timeout=remaining)
                except queue.Empty:
                    break
                if item is None:
                    self.pending.put(None)  # stop after this batch
                    break
                collected.append(item)
                sequences += len(item.prompts)
            groups: dict[tuple, list[Submission]] = {}
            for submission in collected:
                groups.setdefault(astuple(submission.params), []).append(submission)
            for group in groups.values():
                self._run(group)

    def _run(self, group: list[Submission]) -> None:
        params = group[0].params
        rows = [(submission, choice) for submission in group for choice in range(len(submission.prompts))]
        prompts = [submission.prompts[choice] for submission, choice in rows]
        sent = [0] * len(rows)
        self.batches_run += 1
        self.largest_batch = max(self.largest_batch, len(rows))
        try:
            for index, token, completion in iter_generate(self.model, prompts, params, self.decode, vocab_size=self.vocab_size):
                submission, choice = rows[index]
                if token is not None:
                    if completion.finish_reason == "stop":
                        continue  # the finish event right after carries the final text
                    text = self.decode(completion.token_ids)
                    safe = len(text) - _held_back(text, params.stop_strings)
                    if safe > sent[index]:
                        submission.events.put(Event("delta", choice, text[sent[index] : safe]))
                        sent[index] = safe
                    continue
                text = completion.text if completion.text is not None else self.decode(completion.token_ids)
                text = _cut_at_stop(text, params.stop_strings)
                reason = "length" if completion.finish_reason == "length" else "stop"
                submission.events.put(Event("finish", choice, text[sent[index] :], reason, len(completion.token_ids)))
        except Exception as error:  # the request fails, the server lives on
            log.exception("generation failed")
            for submission in group:
                submission.events.put(Event("error", text=f"generation failed: {error}"))
