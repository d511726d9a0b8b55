"""What an OpenAI-compatible endpoint says about its models, for the command lines that talk to one
(`tools/generate_synthetic.py`, `tools/quality_filter.py annotate`): the /v1/models list, the context a model
states, the generation length that fits it, and a refused request as one line naming what to change.
"""

from __future__ import annotations

import argparse

from phi1.cli import UserError

DEFAULT_MAX_TOKENS = 512
# Room kept for the prompt: the generator's prompts are one or two sentences (under 100 tokens in any common
# tokenizer), plus a chat template's few tokens.
PROMPT_ALLOWANCE_TOKENS = 128
MIN_GENERATION_TOKENS = 32
# Where OpenAI-compatible servers state a model's context in /v1/models (vLLM and phi1-serve: max_model_len).
CONTEXT_FIELDS = ("max_model_len", "context_length", "max_context_length")



def stated_context(model_entry) -> int | None:
    """The context length a /v1/models entry states, or None (the official OpenAI API states none)."""
    extra = getattr(model_entry, "model_extra", None) or {}
    for name in CONTEXT_FIELDS:
        value = extra.get(name, getattr(model_entry, name, None))
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def choose_max_tokens(requested: int | None, context: int | None, where: str) -> int:
    """Tokens per generation: `requested`, or the default that fits `context` (None: unknown, 512).

    Raises:
        UserError: the context is too small for any useful generation, or `requested` cannot fit in it.
    """
    if requested is not None and requested < 1:
        raise UserError(f"--max-tokens {requested}: must be at least 1")
    if context is None:
        return DEFAULT_MAX_TOKENS if requested is None else requested
    room = context - PROMPT_ALLOWANCE_TOKENS
    if requested is None:
        if room < MIN_GENERATION_TOKENS:
            raise UserError(f"{where}: the model's context is {context} tokens, too small for textbook sections after "
                            f"a prompt of up to {PROMPT_ALLOWANCE_TOKENS} tokens; serve a model with a longer context, "
                            "or pass --max-tokens to try anyway")
        return min(DEFAULT_MAX_TOKENS, room)
    if requested >= context:
        raise UserError(f"--max-tokens {requested}: the model at {where} has a context of {context} tokens, prompt "
                        f"included; pass at most {max(1, room)} or leave --max-tokens out")
    return requested


def refused(error: BaseException, base_url: str, max_tokens: int) -> UserError | None:
    """A one-line UserError for a request the endpoint refused as wrong (4xx other than rate limits), else None."""
    import openai

    if not isinstance(error, openai.APIStatusError) or error.status_code in (408, 409, 429) or error.status_code >= 500:
        return None
    body = error.body if isinstance(error.body, dict) else {}
    detail = body.get("message") or (body.get("error") or {}).get("message") if body else None
    message = " ".join(str(detail or error.message).split())
    hint = ""
    if "context" in message.lower() or (body.get("code") or (body.get("error") or {}).get("code")) == \
            "context_length_exceeded":
        hint = f"; pass a smaller --max-tokens (this run asked for {max_tokens})"
    elif error.status_code in (401, 403):
        hint = "; check --api-key (or OPENAI_API_KEY)"
    elif error.status_code == 404:
        hint = "; check --model and --base-url (it should end in /v1)"
    return UserError(f"{base_url}: the endpoint refused the request ({error.status_code}): {message}{hint}")


def list_models(args: argparse.Namespace) -> list:
    """The endpoint's /v1/models entries; [] when it has no such route and --model was given."""
    import openai

    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key or "unused", max_retries=args.max_retries,
                           timeout=args.request_timeout)
    try:
        return list(client.models.list().data)
    except openai.APIConnectionError as error:
        raise UserError(f"--base-url {args.base_url}: cannot connect ({error}); is the server running?") from None
    except openai.APIStatusError as error:
        problem = refused(error, args.base_url, args.max_tokens or DEFAULT_MAX_TOKENS)
        if problem is None or args.model is None:
            raise problem or error from None
        return []
