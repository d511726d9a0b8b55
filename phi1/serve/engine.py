"""The batching engine behind the server: one worker thread owns the model and runs concurrent requests as
batches through `iter_generate`.

The worker takes the first waiting request, then keeps collecting for `batch_window_ms` (or until
`max_batch_size` sequences), groups what it has by sampling parameters (one batch shares one SamplingParams)
and generates each group as one left-padded batch with the KV cache. Requests arriving while a batch runs wait
for the next one (no joining a running batch). Each sequence reports text deltas to its request; text that
might be the start of a stop string, or half of a multi-byte character, is held back until it is certain, so a
stream never shows text that the final answer cuts. With logprobs, each token's log-probabilities travel with
the delta that releases the token's text.

Requests whose client went away (`Submission.cancel`) are dropped before their batch starts, and a batch whose
requests are all cancelled stops early, so abandoned requests do not keep the model busy.

Events reach a request through `Submission.deliver`: a thread-safe queue by default, or a callback (the ASGI
server passes one that hands the event to its event loop with `call_soon_threadsafe`).

The worker is a daemon thread, and a daemon thread must not be inside a torch op when the interpreter exits:
CPython (before 3.14) ends such a thread with `pthread_exit` when the op's GIL-release guard tries to take the
GIL back, the unwind runs through that guard's destructor, and the process aborts with "terminate called without
an active exception" (pytorch/pytorch#38228; the three-line reproduction is in tests/test_exit_teardown.py).
So every engine is stopped at exit (`atexit`, before the interpreter tears down): the running batch ends at its
next token with an error event, and the worker returns.
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import astuple, dataclass, field

from phi1.core.generation import SamplingParams, iter_generate
from phi1.core.model import PhiForCausalLM

log = logging.getLogger(__name__)


@dataclass
class TokenLogprob:
    """One generated token with its log-probability and the most likely alternatives."""

    token: str
    """The token decoded alone (a token holding part of a multi-byte character decodes to U+FFFD)."""
    logprob: float
    offset: int
    """Where the token's text starts in the choice's completion text (characters)."""
    top: list[tuple[str, float]]
    """The k most likely tokens (decoded) and their log-probabilities, most likely first."""


@dataclass
class Event:
    """One message from the engine to a request: a text delta, a finished choice, or an error."""

    kind: str
    """'delta', 'finish' or 'error'."""
    choice: int = 0
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    """With SamplingParams.logprobs: the tokens whose text this event releases."""


@dataclass
class Submission:
    """A request's sequences (one per choice) and where its events go."""

    prompts: list[list[int]]
    params: SamplingParams
    on_event: Callable[[Event], None] | None = None
    """Called on the engine's thread with each event; None: events go to `events`."""
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: bool = False

    def deliver(self, event: Event) -> None:
        if self.on_event is None:
            self.events.put(event)
            return
        try:
            self.on_event(event)
        except RuntimeError:  # the receiving event loop is closed: nobody waits for this request any more
            self.cancelled = True

    def cancel(self) -> None:
        """The client went away: do not start this request, and stop its batch if nobody else needs it."""
        self.cancelled = True


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


@dataclass
class _Row:
    """Bookkeeping of one generated sequence of a batch."""

    submission: Submission
    choice: int
    sent: int = 0
    """Characters of text already delivered."""
    token_logprobs: list[TokenLogprob] = field(default_factory=list)
    token_ends: list[int] = field(default_factory=list)
    """Per token: the length of the text decoded up to and including it."""
    released: int = 0
    """Tokens whose logprobs were delivered."""


class BatchingEngine:
    """Owns the model; `submit` is thread-safe and returns the Submission that receives the events."""

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
        self.cancelled_skipped = 0
        """Requests dropped before their batch started because their client left."""
        self.batches_stopped = 0
        """Batches ended early because all their clients left."""
        self._closing = threading.Event()
        """Set by `stop`: the running batch ends at its next token and no further batch starts."""
        self._thread = threading.Thread(target=self._loop, name="phi1-batching-engine", daemon=True)
        self._thread.start()
        atexit.register(_stop_at_exit, weakref.ref(self))

    def submit(self, prompts: list[list[int]], params: SamplingParams,
               on_event: Callable[[Event], None] | None = None) -> Submission:
        submission = Submission(prompts, params, on_event)
        self.pending.put(submission)
        return submission

    def stop(self) -> None:
        """End the worker: requests still waiting, and the batch running, get an error event. Idempotent."""
        self._closing.set()
        self.pending.put(None)
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        while True:
            first = self.pending.get()
            if first is None or self._closing.is_set():
                self._refuse_waiting(first)
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
                if submission.cancelled:
                    self.cancelled_skipped += 1
                    continue
                groups.setdefault(astuple(submission.params), []).append(submission)
            for group in groups.values():
                self._run(group)

    def _refuse_waiting(self, first: Submission | None) -> None:
        """Stopping: every request not yet started gets an error event instead of waiting forever."""
        waiting = [first] if first is not None else []
        while True:
            try:
                item = self.pending.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                waiting.append(item)
        for submission in waiting:
            submission.deliver(Event("error", text="the server is shutting down"))

    def _token_logprob(self, row: _Row, token: int, logprob: float, top: list[tuple[int, float]], start: int) -> None:
        row.token_logprobs.append(TokenLogprob(self.decode([token]), logprob, start,
                                               [(self.decode([t]), value) for t, value in top]))

    def _release(self, row: _Row, upto: int) -> list[TokenLogprob]:
        """Logprobs of the tokens whose text ends within the first `upto` characters, not yet delivered."""
        start = row.released
        while row.released < len(row.token_ends) and row.token_ends[row.released] <= upto:
            row.released += 1
        return row.token_logprobs[start : row.released]

    def _run(self, group: list[Submission]) -> None:
        params = group[0].params
        rows = [_Row(submission, choice) for submission in group for choice in range(len(submission.prompts))]
        prompts = [row.submission.prompts[row.choice] for row in rows]
        self.batches_run += 1
        self.largest_batch = max(self.largest_batch, len(rows))
        try:
            for index, token, completion in iter_generate(self.model, prompts, params, self.decode,
                                                          vocab_size=self.vocab_size):
                if self._closing.is_set():
                    for submission in group:
                        submission.deliver(Event("error", text="the server is shutting down"))
                    return
                if all(submission.cancelled for submission in group):
                    log.info("batch of %d sequences stopped: all its clients went away", len(rows))
                    self.batches_stopped += 1
                    return
                row = rows[index]
                if token is not None:
                    text = self.decode(completion.token_ids)
                    if params.logprobs is not None:
                        # A token starts where the text decoded before it ends.
                        start = row.token_ends[-1] if row.token_ends else 0
                        self._token_logprob(row, token, completion.token_logprobs[-1], completion.top_logprobs[-1],
                                            start)
                        row.token_ends.append(len(text))
                    if completion.finish_reason == "stop":
                        continue  # the finish event right after carries the final text
                    safe = len(text) - _held_back(text, params.stop_strings)
                    if safe > row.sent:
                        row.submission.deliver(Event("delta", row.choice, text[row.sent : safe],
                                                     logprobs=self._release(row, safe)))
                        row.sent = safe
                    continue
                text = completion.text if completion.text is not None else self.decode(completion.token_ids)
                text = _cut_at_stop(text, params.stop_strings)
                reason = "length" if completion.finish_reason == "length" else "stop"
                rest = [t for t in row.token_logprobs[row.released :] if t.offset < len(text)]  # not past a stop string
                row.released = len(row.token_logprobs)
                row.submission.deliver(Event("finish", row.choice, text[row.sent :], reason,
                                             len(completion.token_ids), logprobs=rest))
        except Exception as error:  # the request fails, the server lives on
            log.exception("generation failed")
            for submission in group:
                submission.deliver(Event("error", text=f"generation failed: {error}"))


def _stop_at_exit(engine_ref: weakref.ref) -> None:
    """atexit hook: stop an engine that is still alive, so its worker is out of torch before teardown."""
    engine = engine_ref()
    if engine is not None and engine._thread.is_alive():
        engine.stop()
