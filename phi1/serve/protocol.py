"""OpenAI-compatible request schemas, validation and response bodies for /v1/completions and /v1/chat/completions.

Requests are parsed with `parse_json_body` (UTF-8, at most `MAX_JSON_DEPTH` levels of nesting) and checked by
pydantic models in strict mode, so a client learns at once what this server does not do:
- unknown parameters are a 400 naming them;
- parameters the API has but this server does not implement (penalties, echo, logit_bias, tools, ...) are
  accepted only at their default value;
- wrong types, ranges and non-finite numbers (NaN, Infinity, 1e999) are a 400 naming the parameter;
- a prompt that does not fit the context with the requested max_tokens is a 400 saying both numbers
  (see `CompletionService.prepare` in phi1/serve/server.py).
Every error body has OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

Parameters with documented reductions:
- `seed`: any integer; it is reduced modulo 2**64 (torch's generator takes 64 bits), so equal seeds give equal
  samples and 2**70 is as good a seed as any.
- `temperature` and `top_p`: any value in range, 1e-300 included (sampling is done in float64 with the largest
  logit subtracted first; a tiny temperature samples the most likely token).
- `max_tokens` omitted: the room left in the context after the prompt, capped by the server's
  --default-max-tokens; given: it must fit (else a 400 naming max_tokens).
- `logprobs` (completions: an integer k <= 20; chat: `logprobs: true` with `top_logprobs` k <= 20): the model's
  own log-probabilities, log_softmax of the raw logits (before temperature and top-p, as OpenAI reports them),
  over the tokenizer's vocabulary. Completions return tokens, token_logprobs, top_logprobs (the k most likely
  plus the sampled token, as OpenAI's legacy API) and text_offset (where each token starts in the returned
  completion text); chat returns content: [{token, logprob, bytes, top_logprobs: [k entries]}].

Chat template (phi-1 is a base code model with no chat format of its own; this plain one is ours):

    {system message}\\n\\n            (when there is a system message)
    User: {user message}\\n
    Assistant: {assistant message}\\n
    (further turns alike)
    Assistant:

and generation stops at "\\nUser:" so that the model's answer does not run into an invented next turn.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from phi1.core.generation import SamplingParams
from phi1.serve.engine import TokenLogprob

CHAT_STOP = "\nUser:"
MAX_STOP_STRINGS = 4
MAX_CHOICES = 16
MAX_LOGPROBS = 20
MAX_JSON_DEPTH = 32
SEED_MODULUS = 2**64
# Parameters of the OpenAI API that this server accepts only at the value that means "off".
UNSUPPORTED_DEFAULTS: dict[str, tuple] = {
    "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0), "logit_bias": (None, {}),
    "best_of": (None, 1), "echo": (None, False), "suffix": (None, ""), "response_format": (None, {"type": "text"}),
    "tools": (None, []), "tool_choice": (None, "none"), "parallel_tool_calls": (None,),
    "service_tier": (None, "auto", "default"), "metadata": (None,), "store": (None, False),
}


class RequestError(Exception):
    """A request the server refuses; becomes an OpenAI-style error body with this HTTP status."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def _depth(value: Any) -> int:
    """Nesting depth of decoded JSON (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, level)
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, level + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


def parse_json_body(raw: bytes, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Decode a request body: UTF-8 JSON nested at most `max_depth` levels. Raises RequestError (400)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise RequestError(f"the body is not UTF-8 text (byte {error.start} is invalid); send UTF-8 JSON") from None
    try:
        body = json.loads(text)
    except RecursionError:  # far deeper than max_depth: the C parser gives up before we can measure
        raise RequestError(f"the JSON body is nested deeper than {max_depth} levels") from None
    except ValueError as error:  # JSONDecodeError, and integers of more than 4300 digits
        raise RequestError(f"the body is not valid JSON: {error}") from None
    if _depth(body) > max_depth:
        raise RequestError(f"the JSON body is nested deeper than {max_depth} levels")
    return body


class _Strict(BaseModel):
    # strict: "1" is no number and true is no integer; no NaN or infinities; unknown fields are errors.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None
    """Accepted for the official client's sake; this server does not pad its chunks."""


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Any
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _content(cls, value: Any) -> str | list[TextPart]:
        if isinstance(value, str):
            return value
        if isinstance(value, list):
            try:
                return [TextPart.model_validate(part) for part in value]
            except ValidationError:
                pass
        raise ValueError("must be a string or a list of text parts ({\"type\": \"text\", \"text\": \"...\"})")


def _check_stop(value: Any) -> list[str]:
    stop = [] if value is None else [value] if isinstance(value, str) else value
    if not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in stop):
        raise ValueError(f"must be a non-empty string or a list of up to {MAX_STOP_STRINGS} non-empty strings")
    return stop


class _CommonRequest(_Strict):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1, le=MAX_CHOICES)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: Any = None
    seed: int | None = None
    user: str | None = None
    # Accepted only at their defaults (checked in `validate` before these models run).
    presence_penalty: Any = None
    frequency_penalty: Any = None
    logit_bias: Any = None
    service_tier: Any = None
    metadata: Any = None
    store: Any = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: Any) -> list[str]:
        return _check_stop(value)

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed with stream=true")
        return self


class CompletionRequest(_CommonRequest):
    prompt: Any
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: Any = None
    best_of: Any = None
    suffix: Any = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: Any) -> list[str]:
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and value and all(isinstance(p, str) for p in value):
            return value
        raise ValueError("must be a string or a non-empty list of strings (token-id prompts are not supported)")


class ChatRequest(_CommonRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: Any = None
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: only allowed with logprobs=true")
        return self


@dataclass
class ParsedRequest:
    """A validated request: what to generate and how to answer."""

    kind: str
    """'completion' or 'chat'."""
    prompt_texts: list[str]
    """One per prompt (completions accept a list); each is sampled n times."""
    n: int
    params: SamplingParams
    stream: bool
    include_usage: bool
    max_tokens: int | None
    """As given; None when the client left it to the server."""
    max_tokens_field: str
    """The parameter that carried max_tokens ('max_tokens' or 'max_completion_tokens'), for error messages."""


def _type_name(value: Any) -> str:
    return "null" if value is None else {"str": "string", "dict": "object", "list": "array"}.get(
        type(value).__name__, type(value).__name__)


def _path(parts: list) -> str:
    """('messages', 0, 'content') -> messages[0].content"""
    return "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p)) for i, p in enumerate(parts))


def _shown(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _error_from(error: ValidationError) -> RequestError:
    """The first problem pydantic found, as a 400 naming the parameter."""
    first = error.errors(include_url=False)[0]
    location = [part for part in first["loc"] if part not in ("str", "list[str]")]
    message, kind, given = first["msg"].removeprefix("Value error, "), first["type"], first.get("input")
    if not location and ": " in message:  # a model-level check names its parameter itself
        name, message = message.split(": ", 1)
        return RequestError(f"'{name}' {message}", param=name)
    if kind == "extra_forbidden" and len(location) > 1:
        return RequestError(f"'{_path(location[:-1])}': unknown field '{location[-1]}'", param=str(location[0]))
    if kind == "extra_forbidden":
        unknown = sorted({str(e["loc"][0]) for e in error.errors() if e["type"] == "extra_forbidden"})
        return RequestError(f"unknown parameter(s): {', '.join(unknown)}", param=unknown[0], code="unknown_parameter")
    param, path = (str(location[0]) if location else None), _path(location)
    if kind == "missing":
        return RequestError(f"'{path}' is required", param=param)
    if kind == "float_type" and isinstance(given, int) and not isinstance(given, bool):
        message, got = "Input is too large to be a number", ""
    elif kind == "value_error":
        got = ""
    elif kind == "finite_number" or kind.startswith(("greater", "less")):
        got = f", got {_shown(given)}"
    else:
        got = f", got {_type_name(given)}"
    return RequestError(f"'{path}': {message}{got}", param=param)


def validate(body: Any, kind: str, served_model: str) -> ParsedRequest:
    """Check a decoded JSON body of a completions ('completion') or chat ('chat') request.

    Raises RequestError (400, or 404 for another model name) naming the offending parameter.
    """
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {_type_name(body)}")
    for name in sorted(set(body) & set(UNSUPPORTED_DEFAULTS)):
        if body[name] not in UNSUPPORTED_DEFAULTS[name]:
            raise RequestError(f"'{name}' is not supported by this server (only its default)", param=name,
                               code="unsupported_parameter")
    schema = CompletionRequest if kind == "completion" else ChatRequest
    try:
        request = schema.model_validate(body)
    except ValidationError as error:
        raise _error_from(error) from None
    if request.model != served_model:
        raise RequestError(f"model '{request.model}' is not served here; this server serves '{served_model}'",
                           param="model", status=404, code="model_not_found")
    n = request.n or 1
    stop = list(request.stop or [])
    max_tokens, max_tokens_field = request.max_tokens, "max_tokens"
    if isinstance(request, CompletionRequest):
        texts = request.prompt
        logprobs = request.logprobs
    else:
        texts = [render_chat(request.messages)]
        stop.append(CHAT_STOP)
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        if max_tokens is None and request.max_completion_tokens is not None:
            max_tokens, max_tokens_field = request.max_completion_tokens, "max_completion_tokens"
    if len(texts) * n > MAX_CHOICES:
        raise RequestError(f"prompts x n = {len(texts) * n} exceeds {MAX_CHOICES} choices per request", param="n")
    params = SamplingParams(
        max_new_tokens=max_tokens or 0,
        temperature=1.0 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        stop_strings=tuple(stop),
        seed=None if request.seed is None else request.seed % SEED_MODULUS,
        logprobs=logprobs,
    )
    include_usage = bool(request.stream_options and request.stream_options.include_usage)
    return ParsedRequest(kind, texts, n, params, bool(request.stream), include_usage, max_tokens, max_tokens_field)


def _content_text(content: str | list[TextPart]) -> str:
    return content if isinstance(content, str) else "".join(part.text for part in content)


def render_chat(messages: list[ChatMessage]) -> str:
    """The prompt text of a chat (see the module docstring for the template)."""
    system, turns = [], []
    for message in messages:
        text = _content_text(message.content)
        if message.role in ("system", "developer"):
            system.append(text)
        else:
            turns.append(f"{'User' if message.role == 'user' else 'Assistant'}: {text}\n")
    prefix = "\n".join(system) + "\n\n" if system else ""
    return prefix + "".join(turns) + "Assistant:"


def new_id(kind: str) -> str:
    return ("cmpl-" if kind == "completion" else "chatcmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_logprobs(tokens: list[TokenLogprob]) -> dict:
    """OpenAI's legacy completions `logprobs` object for these tokens."""
    top = []
    for token in tokens:
        alternatives: dict[str, float] = {}
        for text, logprob in [*token.top, (token.token, token.logprob)]:  # the sampled token is always listed
            alternatives.setdefault(text, logprob)  # tokens that decode alike (partial characters): the likeliest
        top.append(alternatives)
    return {"tokens": [t.token for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": top, "text_offset": [t.offset for t in tokens]}


def chat_logprobs(tokens: list[TokenLogprob]) -> dict:
    """The chat completions `logprobs` object for these tokens."""
    def entry(text: str, logprob: float) -> dict:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8", "surrogatepass"))}

    return {"content": [{**entry(t.token, t.logprob), "top_logprobs": [entry(s, v) for s, v in t.top]}
                        for t in tokens], "refusal": None}


def response_body(kind: str, request_id: str, model: str, choices: list[dict], prompt_tokens: int,
                  completion_tokens: int, with_logprobs: bool = False) -> dict:
    """A whole (non-streamed) response; `choices` hold index, text, finish_reason and logprobs (TokenLogprob)."""
    shaped = []
    for choice in choices:
        if kind == "completion":
            logprobs = completion_logprobs(choice["logprobs"]) if with_logprobs else None
            shaped.append({"index": choice["index"], "text": choice["text"], "logprobs": logprobs,
                           "finish_reason": choice["finish_reason"]})
        else:
            logprobs = chat_logprobs(choice["logprobs"]) if with_logprobs else None
            shaped.append({"index": choice["index"], "message": {"role": "assistant", "content": choice["text"]},
                           "logprobs": logprobs, "finish_reason": choice["finish_reason"]})
    obj = "text_completion" if kind == "completion" else "chat.completion"
    return {"id": request_id, "object": obj, "created": int(time.time()), "model": model, "choices": shaped,
            "usage": usage(prompt_tokens, completion_tokens)}


def chunk_body(kind: str, request_id: str, model: str, index: int, text: str | None, finish_reason: str | None,
               role: bool = False, logprobs: list[TokenLogprob] | None = None) -> dict:
    """One server-sent event of a streamed response; `logprobs` None means the request did not ask for them."""
    if kind == "completion":
        shaped = None if logprobs is None else completion_logprobs(logprobs)
        choice = {"index": index, "text": text or "", "logprobs": shaped, "finish_reason": finish_reason}
        obj = "text_completion"
    else:
        delta: dict = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        shaped = None if logprobs is None else chat_logprobs(logprobs)
        choice = {"index": index, "delta": delta, "logprobs": shaped, "finish_reason": finish_reason}
        obj = "chat.completion.chunk"
    return {"id": request_id, "object": obj, "created": int(time.time()), "model": model, "choices": [choice]}
