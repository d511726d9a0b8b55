"""OpenAI-compatible request validation and response bodies for /v1/completions and /v1/chat/completions.

Validation is strict, so a client learns at once what this server does not do: unknown parameters are a 400
naming them; parameters the API has but this server does not implement (logprobs, penalties, echo, ...) are
accepted only at their default value; wrong types and ranges are a 400 naming the parameter; a prompt that
does not fit the context with the requested max_tokens is a 400 saying both numbers.

Chat template (phi-1 is a base code model with no chat format of its own; this plain one is ours):

    {system message}\\n\\n            (when there is a system message)
    User: {user message}\\n
    Assistant: {assistant message}\\n
    (further turns alike)
    Assistant:

and generation stops at "\\nUser:" so that the model's answer does not run into an invented next turn.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from phi1.core.generation import SamplingParams

COMMON = {"model", "max_tokens", "temperature", "top_p", "n", "stream", "stop", "seed", "user", "stream_options"}
# Parameters of the OpenAI API that this server accepts only at the value that means "off".
UNSUPPORTED_DEFAULTS = {
    "logprobs": (None, False), "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}), "best_of": (None, 1), "echo": (None, False), "suffix": (None, ""),
    "top_logprobs": (None, 0), "response_format": (None, {"type": "text"}), "tools": (None, []),
    "tool_choice": (None, "none"), "parallel_tool_calls": (None,), "service_tier": (None, "auto", "default"),
    "metadata": (None,), "store": (None, False),
}
COMPLETION_PARAMETERS = COMMON | {"prompt", "echo", "logprobs", "presence_penalty", "frequency_penalty",
                                  "logit_bias", "best_of", "suffix"}
CHAT_PARAMETERS = COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs", "presence_penalty",
                            "frequency_penalty", "logit_bias", "response_format", "tools", "tool_choice",
                            "parallel_tool_calls", "service_tier", "metadata", "store"}
CHAT_STOP = "\nUser:"
ROLES = {"system", "developer", "user", "assistant"}
MAX_STOP_STRINGS = 4
MAX_CHOICES = 16


class RequestError(Exception):
    """A request the server refuses; becomes an OpenAI-style error body with this HTTP status."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


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
    max_tokens_given: bool


def _type_name(value) -> str:
    return "null" if value is None else type(value).__name__


def _get(body: dict, name: str, types: tuple[type, ...], default):
    value = body.get(name, default)
    if value is None:
        return default
    # bool is an int in Python, but not a number in JSON terms.
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        expected = " or ".join(t.__name__ for t in types)
        raise RequestError(f"'{name}' must be {expected}, got {_type_name(value)}", param=name)
    return value


def _number_in(body: dict, name: str, low: float, high: float, default: float) -> float:
    value = float(_get(body, name, (int, float), default))
    if not low <= value <= high:
        raise RequestError(f"'{name}' must be between {low} and {high}, got {value}", param=name)
    return value


def validate(body, kind: str, served_model: str) -> ParsedRequest:
    """Check a decoded JSON body of a completions ('completion') or chat ('chat') request.

    Raises RequestError (400, or 404 for another model name) naming the offending parameter.
    """
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {_type_name(body)}")
    allowed = COMPLETION_PARAMETERS if kind == "completion" else CHAT_PARAMETERS
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise RequestError(f"unknown parameter(s): {', '.join(unknown)}", param=unknown[0], code="unknown_parameter")
    for name in sorted(set(body) & set(UNSUPPORTED_DEFAULTS)):
        if body[name] not in UNSUPPORTED_DEFAULTS[name]:
            raise RequestError(f"'{name}' is not supported by this server (only its default)", param=name,
                               code="unsupported_parameter")
    model = body.get("model")
    if not isinstance(model, str):
        raise RequestError("'model' is required and must be a string", param="model")
    if model != served_model:
        raise RequestError(f"model '{model}' is not served here; this server serves '{served_model}'",
                           param="model", status=404, code="model_not_found")
    temperature = _number_in(body, "temperature", 0.0, 2.0, 1.0)
    top_p = _number_in(body, "top_p", 0.0, 1.0, 1.0)
    if top_p == 0.0:
        raise RequestError("'top_p' must be greater than 0", param="top_p")
    n = _get(body, "n", (int,), 1)
    if not 1 <= n <= MAX_CHOICES:
        raise RequestError(f"'n' must be between 1 and {MAX_CHOICES}, got {n}", param="n")
    stream = _get(body, "stream", (bool,), False)
    stream_options = _get(body, "stream_options", (dict,), {})
    if stream_options and not stream:
        raise RequestError("'stream_options' is only allowed with stream=true", param="stream_options")
    if set(stream_options) - {"include_usage"}:
        raise RequestError(f"unknown stream_options {sorted(set(stream_options) - {'include_usage'})}",
                           param="stream_options")
    seed = _get(body, "seed", (int,), None)
    _get(body, "user", (str,), None)
    stop = _get(body, "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in stop):
        raise RequestError(f"'stop' must be a non-empty string or a list of up to {MAX_STOP_STRINGS} of them",
                           param="stop")
    token_field = "max_tokens"
    max_tokens = _get(body, "max_tokens", (int,), None)
    if kind == "chat" and max_tokens is None:
        token_field = "max_completion_tokens"
        max_tokens = _get(body, "max_completion_tokens", (int,), None)
    if max_tokens is not None and max_tokens < 1:
        raise RequestError(f"'{token_field}' must be at least 1, got {max_tokens}", param=token_field)

    if kind == "completion":
        if "prompt" not in body:
            raise RequestError("'prompt' is required", param="prompt")
        prompt = body["prompt"]
        if isinstance(prompt, str):
            texts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            texts = list(prompt)
        else:
            raise RequestError("'prompt' must be a string or a non-empty list of strings (token-id prompts are "
                               "not supported)", param="prompt")
    else:
        texts = [render_chat(body.get("messages"))]
        stop = [*stop, CHAT_STOP]
    if len(texts) * n > MAX_CHOICES:
        raise RequestError(f"prompts x n = {len(texts) * n} exceeds {MAX_CHOICES} choices per request", param="n")
    params = SamplingParams(
        max_new_tokens=max_tokens or 0, temperature=temperature, top_p=top_p, stop_strings=tuple(stop),
        seed=seed,
    )
    return ParsedRequest(kind, texts, n, params, stream, bool(stream_options.get("include_usage")),
                         max_tokens_given=max_tokens is not None)


def _content_text(content, index: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise RequestError(f"messages[{index}].content: only text parts are supported", param="messages")
            parts.append(part["text"])
        return "".join(parts)
    raise RequestError(f"messages[{index}].content must be a string or a list of text parts", param="messages")


def render_chat(messages) -> str:
    """The prompt text of a chat (see the module docstring for the template)."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' is required and must be a non-empty list", param="messages")
    system, turns = [], []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES or "content" not in message:
            raise RequestError(f"messages[{index}] must be an object with a role in {sorted(ROLES)} and content",
                               param="messages")
        unknown = set(message) - {"role", "content", "name"}
        if unknown:
            raise RequestError(f"messages[{index}]: unknown field(s) {sorted(unknown)}", param="messages")
        text = _content_text(message["content"], index)
        if message["role"] in ("system", "developer"):
            system.append(text)
        else:
            turns.append(f"{'User' if message['role'] == 'user' else 'Assistant'}: {text}\n")
    prefix = "\n".join(system) + "\n\n" if system else ""
    return prefix + "".join(turns) + "Assistant:"


def new_id(kind: str) -> str:
    return ("cmpl-" if kind == "completion" else "chatcmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def response_body(kind: str, request_id: str, model: str, choices: list[dict], prompt_tokens: int,
                  completion_tokens: int) -> dict:
    """A whole (non-streamed) response; `choices` hold index, text and finish_reason."""
    if kind == "completion":
        shaped = [{"index": c["index"], "text": c["text"], "logprobs": None, "finish_reason": c["finish_reason"]}
                  for c in choices]
        obj = "text_completion"
    else:
        shaped = [{"index": c["index"], "message": {"role": "assistant", "content": c["text"]}, "logprobs": None,
                   "finish_reason": c["finish_reason"]} for c in choices]
        obj = "chat.completion"
    return {"id": request_id, "object": obj, "created": int(time.time()), "model": model, "choices": shaped,
            "usage": usage(prompt_tokens, completion_tokens)}


def chunk_body(kind: str, request_id: str, model: str, index: int, text: str | None, finish_reason: str | None,
               role: bool = False) -> dict:
    """One server-sent event of a streamed response."""
    if kind == "completion":
        choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        obj = "text_completion"
    else:
        delta: dict = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        obj = "chat.completion.chunk"
    return {"id": request_id, "object": obj, "created": int(time.time()), "model": model, "choices": [choice]}
