"""The OpenAI-compatible server, driven by the official `openai` client and by raw HTTP on 127.0.0.1."""

from __future__ import annotations

import http.client
import json
import threading

import pytest

openai = pytest.importorskip("openai")

from phi1.core.generation import SamplingParams, generate  # noqa: E402
from phi1.eval.loading import load_model, load_tokenizer  # noqa: E402
from phi1.eval.toy_model import build_toy_model_dir  # noqa: E402
from phi1.serve.server import CompletionService, start_server  # noqa: E402

NAME = "toy"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model_dir = build_toy_model_dir(tmp_path_factory.mktemp("model"), "phi-1-nano", max_seq_len=256)
    model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
    # A wide batch window so that concurrent test requests surely meet in one batch.
    service = CompletionService(model, tokenizer, NAME, max_batch_size=16, batch_window_ms=200)
    server, _ = start_server(service, "127.0.0.1", 0)
    port = server.server_address[1]
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
    yield service, port, client
    server.shutdown()
    server.server_close()
    service.engine.stop()


def post(port: int, path: str, body: bytes | str | dict) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else (body if isinstance(body, str) else json.dumps(body)).encode()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request("POST", path, body=data, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    payload = json.loads(response.read())
    connection.close()
    return response.status, payload


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
    assert status == 400 and body["error"]["param"] == "max_tokens" and "must be int" in body["error"]["message"]
    status, body = post(port, "/v1/completions", {"model": NAME, "prompt": "x", "temperature": 7})
    assert status == 400 and body["error"]["param"] == "temperature"
    status, body = post(port, "/v1/completions", {"model": NAME, "prompt": [1, 2, 3]})
    assert status == 400 and body["error"]["param"] == "prompt"
    status, body = post(port, "/v1/completions", {"model": NAME, "prompt": "x", "logprobs": 5})
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
