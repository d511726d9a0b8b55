"""The OpenAI-compatible server, driven by the official `openai` client and by raw HTTP on 127.0.0.1."""

from __future__ import annotations

import json
import threading

import pytest
import torch

openai = pytest.importorskip("openai")

from phi1.core.generation import SamplingParams, generate  # noqa: E402
from phi1.loading import load_model, load_tokenizer  # noqa: E402
from phi1.serve.server import CompletionService, start_server  # noqa: E402
from phi1.testing.serving import health, request_json  # noqa: E402
from phi1.testing.toy_model import build_toy_model_dir  # noqa: E402

NAME = "toy"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model_dir = build_toy_model_dir(tmp_path_factory.mktemp("model"), "phi-1-nano", max_seq_len=256)
    model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
    # A wide batch window so that concurrent test requests surely meet in one batch.
    service = CompletionService(model, tokenizer, NAME, max_batch_size=16, batch_window_ms=200)
    server = start_server(service, "127.0.0.1", 0)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused", max_retries=0,
                           timeout=60)
    yield service, server.port, client
    server.stop()


def post(port: int, path: str, body: bytes | str | dict) -> tuple[int, dict]:
    return request_json(port, "POST", path, body)


def model_log_probs(service, prompt_ids: list[int], generated: list[int]) -> torch.Tensor:
    """(len(generated), tokenizer vocab) log-softmax of one forward pass over prompt + generated, no cache."""
    ids = torch.tensor([prompt_ids + generated])
    with torch.no_grad():
        logits = service.model(ids).logits[0, len(prompt_ids) - 1 : -1].float()
    return torch.log_softmax(logits[:, : service.tokenizer.vocab_size], dim=-1)


def test_completion_with_the_openai_client(served):
    service, _, client = served
    prompt = "def fibonacci(n):\n"
    response = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0)
    choice = response.choices[0]
    assert response.object == "text_completion" and response.model == NAME
    assert choice.finish_reason in ("stop", "length")
    ids = service.tokenizer.encode(prompt)
    expected = generate(service.model, [ids], SamplingParams(max_new_tokens=12, eos_token_id=service.tokenizer.eod),
                        decode=service.tokenizer.decode)[0]
    assert choice.text == expected.text
    assert response.usage.prompt_tokens == len(ids)
    assert response.usage.completion_tokens == len(expected.token_ids)
    assert [m.id for m in client.models.list().data] == [NAME]


def test_streamed_chat_completion_with_the_openai_client(served):
    _, _, client = served
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Add two numbers."}]
    whole = client.chat.completions.create(model=NAME, messages=messages, max_tokens=20, temperature=0)
    stream = client.chat.completions.create(model=NAME, messages=messages, max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    pieces, reasons, roles, usage = [], [], [], None
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            roles.append(choice.delta.role)
            pieces.append(choice.delta.content or "")
            reasons.append(choice.finish_reason)
    assert roles[0] == "assistant"
    assert "".join(pieces) == whole.choices[0].message.content
    assert reasons[-1] == whole.choices[0].finish_reason and all(r is None for r in reasons[:-1])
    assert usage.completion_tokens == whole.usage.completion_tokens


def test_stop_strings_cut_both_stream_and_answer(served):
    _, _, client = served
    base = client.completions.create(model=NAME, prompt="x = ", max_tokens=30, temperature=0).choices[0].text
    stop = base[5:7] if len(base) > 8 else None
    if not stop or not stop.strip():
        pytest.skip("the random model's text has no usable stop string")
    cut = client.completions.create(model=NAME, prompt="x = ", max_tokens=30, temperature=0, stop=stop).choices[0]
    assert cut.text == base[: base.find(stop)] and cut.finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=NAME, prompt="x = ", max_tokens=30, temperature=0, stop=stop, stream=True) if c.choices)
    assert streamed == cut.text


def test_concurrent_requests_are_batched_and_equal_to_alone(served):
    service, _, client = served
    prompts = ["import os\n", "def main():\n", "class Stack:\n    def push(self, item):\n", "# sort a list\n"]
    alone = [client.completions.create(model=NAME, prompt=p, max_tokens=10, temperature=0).choices[0].text
             for p in prompts]
    before = service.engine.largest_batch
    results = [None] * len(prompts)
    barrier = threading.Barrier(len(prompts))

    def ask(i):
        barrier.wait()
        results[i] = client.completions.create(model=NAME, prompt=prompts[i], max_tokens=10, temperature=0)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [r.choices[0].text for r in results] == alone
    assert service.engine.largest_batch >= 2 and service.engine.largest_batch >= before


def test_bad_requests_get_clear_4xx_errors(served):
    service, port, client = served
    status, body = post(port, "/v1/completions", b"{not json")
    assert status == 400 and "not valid JSON" in body["error"]["message"]

    with pytest.raises(openai.BadRequestError, match="unknown parameter.*frobnicate"):
        client.completions.create(model=NAME, prompt="x", max_tokens=4, extra_body={"frobnicate": 1})

    too_long = "def f():\n    return 1\n" * 200
    with pytest.raises(openai.BadRequestError, match="maximum context length is 256 tokens") as info:
        client.completions.create(model=NAME, prompt=too_long, max_tokens=4)
    assert info.value.status_code == 400 and info.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model=NAME, prompt="x", max_tokens=1000)

    status, body = post(port, "/v1/completions", {"model": NAME, "prompt": "x", "max_tokens": "ten"})
    assert status == 400 and body["error"]["param"] == "max_tokens" and "valid integer" in body["error"]["message"]
    status, body = post(port, "/v1/completions", {"model": NAME, "prompt": "x", "temperature": 7})
    assert status == 400 and body["error"]["param"] == "temperature"
    status, body = post(port, "/v1/completions", {"model": NAME, "prompt": [1, 2, 3]})
    assert status == 400 and body["error"]["param"] == "prompt"
    status, body = post(port, "/v1/completions", {"model": NAME, "prompt": "x", "presence_penalty": 0.5})
    assert status == 400 and "not supported" in body["error"]["message"]
    status, body = post(port, "/v1/chat/completions", {"model": NAME, "messages": [{"role": "wizard", "content": ""}]})
    assert status == 400 and body["error"]["param"] == "messages"
    status, body = post(port, "/v1/completions", [1, 2])
    assert status == 400 and "JSON object" in body["error"]["message"]
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=4)
    status, body = post(port, "/v1/nowhere", {})
    assert status == 404
    # The server still answers after all that.
    assert client.completions.create(model=NAME, prompt="x", max_tokens=2, temperature=0).choices[0].text is not None


def test_completion_logprobs_equal_a_direct_forward_of_the_model(served):
    service, _, client = served
    prompt = "def add(a, b):\n"
    prompt_ids = service.tokenizer.encode(prompt)
    k = 3
    response = client.completions.create(model=NAME, prompt=prompt, max_tokens=8, temperature=0, logprobs=k)
    logprobs = response.choices[0].logprobs
    generated = generate(service.model, [prompt_ids], SamplingParams(max_new_tokens=8,
                         eos_token_id=service.tokenizer.eod), decode=service.tokenizer.decode)[0].token_ids
    expected = model_log_probs(service, prompt_ids, generated)
    assert len(logprobs.tokens) == len(generated) == response.usage.completion_tokens
    assert logprobs.tokens == [service.tokenizer.decode([t]) for t in generated]
    chosen = expected.gather(-1, torch.tensor(generated)[:, None]).squeeze(-1)
    assert torch.allclose(torch.tensor(logprobs.token_logprobs), chosen, atol=1e-4)
    top_values = expected.topk(k, dim=-1).values
    for position, alternatives in enumerate(logprobs.top_logprobs):
        # The k most likely plus the sampled one (greedy: it is the most likely), keyed by decoded text.
        assert max(alternatives.values()) == pytest.approx(top_values[position, 0].item(), abs=1e-4)
        assert len(alternatives) <= k + 1
    text = response.choices[0].text
    assert logprobs.text_offset[0] == 0 and logprobs.text_offset == sorted(logprobs.text_offset)
    assert all(offset < len(text) for offset in logprobs.text_offset)

    streamed = [c.choices[0].logprobs for c in client.completions.create(
        model=NAME, prompt=prompt, max_tokens=8, temperature=0, logprobs=k, stream=True) if c.choices]
    assert [t for part in streamed for t in part.tokens] == logprobs.tokens
    assert [v for part in streamed for v in part.token_logprobs] == logprobs.token_logprobs


def test_chat_logprobs_with_the_openai_client(served):
    service, _, client = served
    messages = [{"role": "user", "content": "Sort a list."}]
    response = client.chat.completions.create(model=NAME, messages=messages, max_tokens=6, temperature=0,
                                              logprobs=True, top_logprobs=2)
    content = response.choices[0].logprobs.content
    assert len(content) == response.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 2 and entry.logprob <= 0
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-5)  # greedy took the top one
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
    stream = client.chat.completions.create(model=NAME, messages=messages, max_tokens=6, temperature=0,
                                            logprobs=True, top_logprobs=2, stream=True)
    streamed = [e.token for chunk in stream for choice in chunk.choices if choice.logprobs
                for e in choice.logprobs.content or []]
    assert streamed == [e.token for e in content]


VALID_EDGES = {
    "seed 2**70": {"seed": 2**70, "temperature": 1.0},
    "negative seed": {"seed": -5, "temperature": 1.0},
    "top_p 1e-300": {"top_p": 1e-300, "temperature": 1.0},
    "temperature 1e-300": {"temperature": 1e-300},
    "temperature 5e-324": {"temperature": 5e-324, "top_p": 5e-324},
    "n 16 with 4 stop strings": {"n": 16, "stop": ["\n\n", "def", "#", "x"], "temperature": 1.0, "seed": 3},
    "logprobs 0": {"logprobs": 0},
    "logprobs 20": {"logprobs": 20},
    "max_tokens null": {"max_tokens": None},
    "every default spelled out": {"presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}, "echo": False,
                                  "best_of": 1, "suffix": None, "user": "me", "stream": False},
}


@pytest.mark.parametrize("extra", list(VALID_EDGES.values()), ids=list(VALID_EDGES))
def test_valid_edge_parameters_are_answered(served, extra):
    _, port, _ = served
    status, body = post(port, "/v1/completions", {"model": NAME, "prompt": "def f(x):", "max_tokens": 4, **extra})
    assert status == 200, body
    assert all(isinstance(choice["text"], str) for choice in body["choices"])


def test_seeds_are_reduced_modulo_2_64(served):
    _, port, _ = served
    texts = []
    for seed in (2**70, 2**70 + 2**64, 2**70 + 1):
        status, body = post(port, "/v1/completions", {"model": NAME, "prompt": "x", "max_tokens": 12,
                                                      "temperature": 1.0, "seed": seed})
        assert status == 200
        texts.append(body["choices"][0]["text"])
    assert texts[0] == texts[1] and texts[0] != texts[2]


# raw body -> (status, the parameter named, or a phrase of the message)
INVALID = {
    "max_tokens beyond the context": ({"max_tokens": 10**9}, 400, "max_tokens"),
    "max_tokens 2**70": ({"max_tokens": 2**70}, 400, "max_tokens"),
    "max_tokens 0": ({"max_tokens": 0}, 400, "max_tokens"),
    "max_tokens float": ({"max_tokens": 1.5}, 400, "max_tokens"),
    "max_tokens bool": ({"max_tokens": True}, 400, "max_tokens"),
    "temperature string": ({"temperature": "1"}, 400, "temperature"),
    "temperature above 2": ({"temperature": 2.5}, 400, "temperature"),
    "temperature negative": ({"temperature": -1e-300}, 400, "temperature"),
    "top_p 0": ({"top_p": 0}, 400, "top_p"),
    "top_p above 1": ({"top_p": 1.0000001}, 400, "top_p"),
    "n 17": ({"n": 17}, 400, "n"),
    "n 0": ({"n": 0}, 400, "n"),
    "5 stop strings": ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    "empty stop string": ({"stop": ""}, 400, "stop"),
    "stop of numbers": ({"stop": [1, 2]}, 400, "stop"),
    "seed float": ({"seed": 1.5}, 400, "seed"),
    "seed string": ({"seed": "7"}, 400, "seed"),
    "logprobs 21": ({"logprobs": 21}, 400, "logprobs"),
    "logprobs true on completions": ({"logprobs": True}, 400, "logprobs"),
    "prompt empty list": ({"prompt": []}, 400, "prompt"),
    "prompt null": ({"prompt": None}, 400, "prompt"),
    "prompt object": ({"prompt": {"a": 1}}, 400, "prompt"),
    "model number": ({"model": 7}, 400, "model"),
    "stream string": ({"stream": "yes"}, 400, "stream"),
    "stream_options without stream": ({"stream_options": {"include_usage": True}}, 400, "stream_options"),
    "unknown stream_options": ({"stream": True, "stream_options": {"x": 1}}, 400, "stream_options"),
    "penalty not default": ({"frequency_penalty": 1.0}, 400, "frequency_penalty"),
    "unknown parameter": ({"frobnicate": 1}, 400, "frobnicate"),
}


@pytest.mark.parametrize("extra, status, param", list(INVALID.values()), ids=list(INVALID))
def test_invalid_parameters_get_400_naming_them(served, extra, status, param):
    _, port, _ = served
    got, body = post(port, "/v1/completions", {"model": NAME, "prompt": "x", "max_tokens": 4, **extra})
    assert got == status, body
    assert body["error"]["param"] == param and param in body["error"]["message"], body


RAW_BODIES = {
    "NaN temperature": (b'{"model": "toy", "prompt": "x", "temperature": NaN}', "temperature"),
    "Infinity top_p": (b'{"model": "toy", "prompt": "x", "top_p": Infinity}', "top_p"),
    "1e999 temperature": (b'{"model": "toy", "prompt": "x", "temperature": 1e999}', "temperature"),
    "seed of 5000 digits": (b'{"model": "toy", "prompt": "x", "seed": ' + b"9" * 5000 + b"}", "not valid JSON"),
    "deeply nested JSON": (b'{"model": "toy", "prompt": "x", "metadata": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                           "nested deeper"),
    "nested 40 levels": (b'{"model": "toy", "prompt": "x", "metadata": ' + b"[" * 40 + b"]" * 40 + b"}",
                         "nested deeper"),
    "not UTF-8": (b'{"model": "toy", "prompt": "\xff\xfe x"}', "not UTF-8"),
    "truncated JSON": (b'{"model": "toy", "prompt": ', "not valid JSON"),
    "empty body": (b"", "not valid JSON"),
    "an array": (b"[1, 2]", "JSON object"),
    "a string": (b'"hello"', "JSON object"),
}


@pytest.mark.parametrize("raw, phrase", list(RAW_BODIES.values()), ids=list(RAW_BODIES))
def test_hostile_bodies_get_400_not_500_or_a_dropped_connection(served, raw, phrase):
    _, port, _ = served
    status, body = post(port, "/v1/completions", raw)
    assert status == 400, body
    assert phrase == body["error"]["param"] or phrase in body["error"]["message"], body


def test_chat_edge_cases(served):
    _, port, _ = served
    ok = {"model": NAME, "max_tokens": 3, "messages": [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]}, {"role": "user", "content": "hi"}]}
    assert post(port, "/v1/chat/completions", ok)[0] == 200
    assert post(port, "/v1/chat/completions", {**ok, "max_tokens": None, "max_completion_tokens": 2})[0] == 200
    for extra, param in [({"messages": []}, "messages"), ({"messages": [{"role": "user"}]}, "messages"),
                         ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
                         ({"top_logprobs": 2}, "top_logprobs"), ({"logprobs": True, "top_logprobs": 99},
                                                                  "top_logprobs"),
                         ({"max_tokens": None, "max_completion_tokens": 10**6}, "max_completion_tokens")]:
        status, body = post(port, "/v1/chat/completions", {**ok, **extra})
        assert status == 400 and body["error"]["param"] == param, (extra, body)


def test_default_max_tokens_fits_the_context(served):
    service, port, _ = served
    # A prompt that leaves fewer tokens than --default-max-tokens (256): the default shrinks to what is left.
    prompt = "def f(x):\n    return x\n" * 10
    left = service.context - len(service.tokenizer.encode(prompt))
    assert 0 < left < service.default_max_tokens
    status, body = post(port, "/v1/completions", {"model": NAME, "prompt": prompt, "temperature": 0})
    assert status == 200 and body["usage"]["completion_tokens"] <= left
    assert body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"] <= service.context
    status, body = post(port, "/v1/completions", {"model": NAME, "prompt": prompt, "max_tokens": left + 1})
    assert status == 400 and body["error"]["param"] == "max_tokens" and f"at most {left}" in body["error"]["message"]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_clients_that_leave_free_their_slots(served, stream):
    import socket
    import time

    service, port, _ = served
    engine = service.engine
    given_up = engine.batches_stopped + engine.cancelled_skipped
    body = json.dumps({"model": NAME, "prompt": "def f(", "max_tokens": 240, "temperature": 0, "stream": stream})
    request = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n{body}").encode()
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", port)) as client:
            client.sendall(request)
            time.sleep(0.3)  # admitted and generating
    deadline = time.monotonic() + 20
    while health(port)["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert health(port)["in_flight"] == 0
    assert engine.batches_stopped + engine.cancelled_skipped > given_up  # the engine stopped work nobody awaits


def test_a_client_that_does_not_read_is_dropped_after_the_write_timeout():
    import asyncio
    import time

    from phi1.serve.server import WriteTimeout

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"x", "more_body": True})

    async def stalled_send(message):
        await asyncio.sleep(3600)  # the client's window never opens

    began = time.monotonic()
    asyncio.run(WriteTimeout(app, 0.2)({"type": "http", "client": ("127.0.0.1", 1)}, None, stalled_send))
    assert time.monotonic() - began < 2


ODD_TEXT = {
    "lone surrogate in the prompt": (b'{"model": "toy", "prompt": "\\ud800 x", "max_tokens": 3}', 200),
    "NUL prompt": (b'{"model": "toy", "prompt": "\\u0000", "max_tokens": 3}', 200),
    "empty prompt": (b'{"model": "toy", "prompt": "", "max_tokens": 3}', 200),
    "lone surrogate stop string": (b'{"model": "toy", "prompt": "x", "max_tokens": 3, "stop": "\\udc00"}', 200),
    "lone surrogate model name": (b'{"model": "\\ud800", "prompt": "x"}', 404),
    "lone surrogate unknown parameter": (b'{"model": "toy", "prompt": "x", "\\ud800": 1}', 400),
}


@pytest.mark.parametrize("raw, status", list(ODD_TEXT.values()), ids=list(ODD_TEXT))
def test_odd_text_is_answered_not_500(served, raw, status):
    _, port, _ = served
    got, body = post(port, "/v1/completions", raw)
    assert got == status, body
