"""Batched generation with a KV cache: greedy, temperature and top-p sampling, stop strings, EOS.

Prompts of different lengths are left-padded so every sequence's last prompt token sits in the same column;
rotary positions count real tokens only, so a padded prompt generates exactly what it would alone. Sequences
that finish leave the batch (their cache rows are dropped), so one long answer does not keep short ones busy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from phi1.core.model import PhiForCausalLM


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    """Most tokens generated per prompt."""
    temperature: float = 0.0
    """0 means greedy (argmax); otherwise logits are divided by it before sampling."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    stop_strings: tuple[str, ...] = ()
    """Generation of a sequence ends once its decoded continuation contains one of these; the text is cut there."""
    eos_token_id: int | None = None
    """Generation of a sequence ends at this token (not included in the result)."""
    seed: int | None = None
    """Seed of the sampling generator, for reproducible samples."""
    logprobs: int | None = None
    """When set, record each generated token's log-probability and the `logprobs` most likely alternatives: the
    model's own log-softmax (before temperature and top-p, as OpenAI reports them), padding ids excluded."""

    def validate(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"SamplingParams.max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"SamplingParams.logprobs must be >= 0, got {self.logprobs}")


@dataclass
class Completion:
    token_ids: list[int] = field(default_factory=list)
    """Generated tokens (the EOS token excluded; tokens after a stop string are not generated)."""
    text: str | None = None
    """Decoded continuation cut before the first stop string (None without a decode function)."""
    finish_reason: str = "length"
    """'stop' (stop string), 'eos', or 'length' (max_new_tokens reached)."""
    token_logprobs: list[float] = field(default_factory=list)
    """With SamplingParams.logprobs: the log-probability of each of token_ids."""
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    """With SamplingParams.logprobs = k: per token, the k most likely (id, log-probability), most likely first."""


def _mask_padding(logits: torch.Tensor, vocab_size: int | None) -> torch.Tensor:
    if vocab_size is not None and vocab_size < logits.shape[-1]:
        logits = logits.clone()
        logits[:, vocab_size:] = float("-inf")  # padding rows of the embedding are no tokens
    return logits


def _sample(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None, vocab_size: int | None
) -> torch.Tensor:
    """Next tokens (B,) from last-position logits (B, V)."""
    logits = _mask_padding(logits, vocab_size)
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    # float64, and the maximum subtracted before dividing: any temperature > 0 (1e-300 included) and any top_p > 0
    # stay finite; the largest logit maps to exactly 0, so a tiny temperature samples the argmax, never NaN.
    logits = logits.double()
    probs = torch.softmax((logits - logits.max(dim=-1, keepdim=True).values) / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Drop a token when the mass before it already reaches top_p (the first token always stays).
        drop = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= params.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _find_stop(text: str, stop_strings: tuple[str, ...]) -> int | None:
    positions = [text.find(s) for s in stop_strings if s and s in text]
    return min(positions) if positions else None


def iter_generate(
    model: PhiForCausalLM,
    prompts: list[list[int]],
    params: SamplingParams,
    decode: Callable[[list[int]], str] | None = None,
    use_cache: bool = True,
    vocab_size: int | None = None,
) -> Iterator[tuple[int, int | None, Completion]]:
    """Yield (prompt index, new token or None, its Completion so far) as tokens are made; a final yield per
    prompt with token None marks it finished. The Completion objects are updated in place.

    `vocab_size` is the tokenizer's real vocabulary: the model's rows past it are padding (to a multiple of
    64), and an untrained or lightly trained model may still put mass there, so those ids are never produced.

    Raises ValueError for an empty prompt or one that leaves no room in ModelConfig.max_seq_len.
    """
    params.validate()
    if params.stop_strings and decode is None:
        raise ValueError("stop_strings need a decode function to read the generated text")
    max_len = model.config.max_seq_len
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty; give at least one token (e.g. the end-of-document id)")
        if len(p) + params.max_new_tokens > max_len:
            raise ValueError(
                f"prompt {i} has {len(p)} tokens; with max_new_tokens={params.max_new_tokens} that exceeds the "
                f"model's context of {max_len}"
            )
    results = [Completion() for _ in prompts]
    if params.max_new_tokens == 0 or not prompts:
        for i, r in enumerate(results):
            r.text = "" if decode else None
            yield i, None, r
        return

    device = model.lm_head.weight.device
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)

    batch, width = len(prompts), max(len(p) for p in prompts)
    total = width + params.max_new_tokens
    tokens = torch.zeros(batch, total, dtype=torch.long, device=device)
    mask = torch.zeros(batch, total, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p) : width] = torch.tensor(p, dtype=torch.long, device=device)
        mask[i, width - len(p) : width] = 1
    active = torch.arange(batch, device=device)  # rows of the original batch still generating
    cache = model.new_kv_cache(batch, total) if use_cache else None

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for step in range(params.max_new_tokens):
                end = width + step
                if cache is not None:
                    start = 0 if step == 0 else end - 1
                    ids = tokens[active, start:end]
                    positions = (mask[active, :end].cumsum(-1) - 1).clamp(min=0)[:, start:end]
                    logits = model(ids, attention_mask=mask[active, :end], position_ids=positions, kv_cache=cache).logits
                else:
                    ids = tokens[active, :end]
                    positions = (mask[active, :end].cumsum(-1) - 1).clamp(min=0)
                    logits = model(ids, attention_mask=mask[active, :end], position_ids=positions).logits
                next_tokens = _sample(logits[:, -1, :], params, generator, vocab_size)
                if params.logprobs is not None:
                    log_probs = torch.log_softmax(_mask_padding(logits[:, -1, :], vocab_size).float(), dim=-1)
                    chosen = log_probs.gather(-1, next_tokens[:, None]).squeeze(-1).tolist()
                    top_values, top_ids = log_probs.topk(min(params.logprobs, log_probs.shape[-1]), dim=-1)
                    top_values, top_ids = top_values.tolist(), top_ids.tolist()
                tokens[active, end] = next_tokens
                mask[active, end] = 1

                keep = []
                for row, (index, token) in enumerate(zip(active.tolist(), next_tokens.tolist())):
                    result = results[index]
                    if params.eos_token_id is not None and token == params.eos_token_id:
                        result.finish_reason = "eos"
                        yield index, None, result
                        continue
                    result.token_ids.append(token)
                    if params.logprobs is not None:
                        result.token_logprobs.append(chosen[row])
                        result.top_logprobs.append(list(zip(top_ids[row], top_values[row])))
                    if params.stop_strings:
                        result.text = decode(result.token_ids)
                        cut = _find_stop(result.text, params.stop_strings)
                        if cut is not None:
                            result.text = result.text[:cut]
                            result.finish_reason = "stop"
                            yield index, token, result
                            yield index, None, result
                            continue
                    yield index, token, result
                    keep.append(row)
                if len(keep) < len(active):
                    keep_rows = torch.tensor(keep, dtype=torch.long, device=device)
                    active = active[keep_rows]
                    if cache is not None:
                        cache.select(keep_rows)
                if len(active) == 0:
                    break
            for index in active.tolist():
                yield index, None, results[index]  # ran out of max_new_tokens
    finally:
        model.train(was_training)


def generate(
    model: PhiForCausalLM,
    prompts: list[list[int]],
    params: SamplingParams | None = None,
    decode: Callable[[list[int]], str] | None = None,
    use_cache: bool = True,
    vocab_size: int | None = None,
) -> list[Completion]:
    """Complete each prompt (a list of token ids). See `iter_generate` for the semantics."""
    params = params or SamplingParams()
    results: list[Completion | None] = [None] * len(prompts)
    for index, token, result in iter_generate(model, prompts, params, decode, use_cache, vocab_size):
        if token is None:
            results[index] = result
    for result in results:
        if decode is not None and result.text is None:
            result.text = decode(result.token_ids)
    return results
