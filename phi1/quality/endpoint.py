"""One request to an OpenAI-compatible endpoint, rate-limited and retried: shared by the synthetic generator and
the LLM annotator.

Failures of the endpoint itself (connection refused, timeouts, 408/409/429, 5xx) are retried with exponential
backoff and jitter (tenacity does the retrying); every retry is counted. When retries run out,
`EndpointUnavailable` is raised and the caller stops, so a rerun resumes. Any other error (a 4xx saying the
request is wrong) is raised at once: retrying it would only hide it.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass


class TokenBucket:
    """At most `per_minute` acquisitions per minute on average, bursts up to `burst` (asyncio)."""

    def __init__(self, per_minute: float, burst: int = 1) -> None:
        self.rate = per_minute / 60.0
        self.capacity = float(burst)
        self.tokens = float(burst)
        self.updated = time.monotonic()
        self.lock = asyncio.Lock()

    async def acquire(self) -> None:
        if self.rate <= 0:
            return
        async with self.lock:
            while True:
                now = time.monotonic()
                self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
                self.updated = now
                if self.tokens >= 1.0:
                    self.tokens -= 1.0
                    return
                await asyncio.sleep((1.0 - self.tokens) / self.rate)


class EndpointUnavailable(RuntimeError):
    """The endpoint kept failing after every retry; the run stops and can be resumed."""


def retryable(error: BaseException) -> bool:
    """Whether `error` is the endpoint failing (worth retrying) rather than the request being wrong."""
    import openai

    if isinstance(error, (openai.APIConnectionError, openai.APITimeoutError, openai.RateLimitError,
                          openai.InternalServerError)):
        return True
    return isinstance(error, openai.APIStatusError) and error.status_code in (408, 409, 429) or \
        isinstance(error, (ConnectionError, asyncio.TimeoutError))


@dataclass
class EndpointConfig:
    """How requests are made."""

    model: str = "phi1"
    api: str = "chat"
    """'chat' (/v1/chat/completions) or 'completions' (/v1/completions, for base models)."""
    max_tokens: int = 512
    temperature: float = 1.0
    concurrency: int = 4
    """Requests in flight at once (also the rate limiter's burst)."""
    requests_per_minute: float = 0.0
    """Token-bucket rate limit; 0 means none."""
    max_retries: int = 8
    """Endpoint failures retried per request before EndpointUnavailable."""
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0


class CompletionEndpoint:
    """`await endpoint.complete(prompt, seed)` -> the answer text, through the rate limiter and retries.

    Args:
        client: an `openai.AsyncOpenAI` (or anything with the same `chat.completions.create` /
            `completions.create` coroutines).
        on_retry: called once per retried failure (for counts).
    """

    def __init__(self, client, config: EndpointConfig, on_retry: Callable[[BaseException], None] | None = None) -> None:
        self.client = client
        self.config = config
        self.bucket = TokenBucket(config.requests_per_minute, burst=max(1, config.concurrency))
        self.on_retry = on_retry
        self.retries = 0

    def _wait(self, state) -> float:
        # Exponential backoff with jitter in [0.5, 1] of the step, so retrying clients do not move in lockstep.
        step = self.config.backoff_s * 2 ** (state.attempt_number - 1)
        return min(self.config.max_backoff_s, step) * (0.5 + random.random() / 2)

    def _count(self, state) -> None:
        self.retries += 1
        if self.on_retry is not None:
            self.on_retry(state.outcome.exception())

    async def _call(self, prompt: str, seed: int) -> str:
        config = self.config
        if config.api == "chat":
            response = await self.client.chat.completions.create(
                model=config.model, messages=[{"role": "user", "content": prompt}],
                max_tokens=config.max_tokens, temperature=config.temperature, seed=seed)
            return response.choices[0].message.content or ""
        response = await self.client.completions.create(
            model=config.model, prompt=prompt, max_tokens=config.max_tokens, temperature=config.temperature,
            seed=seed)
        return response.choices[0].text or ""

    async def complete(self, prompt: str, seed: int) -> str:
        """The endpoint's answer to `prompt` (sampling seed `seed`).

        Raises:
            EndpointUnavailable: the endpoint failed max_retries + 1 times in a row.
            Exception: a non-retryable error (e.g. openai.BadRequestError) as raised by the client.
        """
        from tenacity import AsyncRetrying, RetryError, retry_if_exception, stop_after_attempt

        retrying = AsyncRetrying(stop=stop_after_attempt(self.config.max_retries + 1), wait=self._wait,
                                 retry=retry_if_exception(retryable), before_sleep=self._count)
        try:
            async for attempt in retrying:
                with attempt:
                    await self.bucket.acquire()
                    return await self._call(prompt, seed)
        except RetryError as error:
            last = error.last_attempt.exception()
            raise EndpointUnavailable(f"{type(last).__name__}: {last}") from last
        raise AssertionError("tenacity returned without an attempt")
