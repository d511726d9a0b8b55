"""The phi-1 model: attention backends, generation with the KV cache, init (issue 2)."""

import logging

import pytest
import torch

from phi1.core.attention import flash_attn_available, select_backend
from phi1.core.config import get_preset
from phi1.core.generation import SamplingParams, generate
from phi1.core.model import PhiForCausalLM
from phi1.ops.reference import apply_rotary, rotary_angles


def nano(**overrides):
    # A larger init_std than 0.02 makes the random model's greedy choices far from ties.
    return get_preset("phi-1-nano", init_std=0.3, **overrides)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return PhiForCausalLM(nano(), init_seed=7).eval()


@pytest.mark.parametrize("backend", ["sdpa", "math"] + (["flash"] if flash_attn_available() else []))
def test_attention_backends_agree(model, backend):
    other = PhiForCausalLM(nano(attention_backend=backend)).eval()
    other.load_state_dict(model.state_dict())
    x = torch.randint(0, 512, (3, 40))
    reference = model.__class__(nano(attention_backend="math")).eval()
    reference.load_state_dict(model.state_dict())
    torch.testing.assert_close(other(x).logits, reference(x).logits, atol=1e-5, rtol=1e-5)
    assert other.attention_backend == backend


def test_backends_agree_with_padding_mask(model):
    x = torch.randint(0, 512, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :5] = 0  # left padding
    outs = []
    for backend in ("sdpa", "math"):
        m = PhiForCausalLM(nano(attention_backend=backend)).eval()
        m.load_state_dict(model.state_dict())
        outs.append(m(x, attention_mask=mask).logits[:, 5:])
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)


def test_backend_choice_is_logged(caplog):
    m = PhiForCausalLM(nano()).eval()
    with caplog.at_level(logging.INFO, logger="phi1"):
        m(torch.randint(0, 512, (1, 4)))
    assert "attention backend: sdpa" in caplog.text or "attention backend: flash" in caplog.text


def test_auto_backend_falls_back_on_cpu():
    backend, reason = select_backend("auto", torch.device("cpu"), torch.float32)
    assert backend == "sdpa" and reason
    with pytest.raises(ValueError, match="attention_backend='flash'"):
        select_backend("flash", torch.device("cpu"), torch.float32)


def test_rotary_touches_only_the_first_rotary_dims():
    x = torch.randn(1, 2, 5, 16)
    cos, sin = rotary_angles(torch.arange(5).unsqueeze(0), 8, 10000.0)
    y = apply_rotary(x, cos, sin)
    torch.testing.assert_close(y[..., 8:], x[..., 8:])
    assert not torch.allclose(y[..., :8], x[..., :8])
    torch.testing.assert_close(y[..., 0, :], x[..., 0, :])  # position 0: identity rotation


PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3], [100, 200, 300, 400], [42, 43]]


def test_greedy_with_kv_cache_equals_full_recomputation(model):
    params = SamplingParams(max_new_tokens=24)
    cached = generate(model, PROMPTS, params, use_cache=True)
    recomputed = generate(model, PROMPTS, params, use_cache=False)
    assert [c.token_ids for c in cached] == [r.token_ids for r in recomputed]
    assert all(len(c.token_ids) == 24 for c in cached)


def test_batched_generation_equals_one_prompt_at_a_time(model):
    params = SamplingParams(max_new_tokens=16)
    batched = generate(model, PROMPTS, params)
    alone = [generate(model, [p], params)[0] for p in PROMPTS]
    assert [b.token_ids for b in batched] == [a.token_ids for a in alone]


def test_sampling_is_seeded_and_top_p_restricts(model):
    params = SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    first = generate(model, PROMPTS, params)
    again = generate(model, PROMPTS, params)
    assert [f.token_ids for f in first] == [a.token_ids for a in again]
    # top_p so small that only the argmax survives: sampling becomes greedy.
    tiny_p = generate(model, PROMPTS, SamplingParams(max_new_tokens=8, temperature=1.0, top_p=1e-6, seed=1))
    greedy = generate(model, PROMPTS, SamplingParams(max_new_tokens=8))
    assert [t.token_ids for t in tiny_p] == [g.token_ids for g in greedy]


def test_stop_strings_and_eos(model):
    def decode(ids):
        return " ".join(map(str, ids))

    greedy = generate(model, PROMPTS[:1], SamplingParams(max_new_tokens=10), decode=decode)[0]
    third = str(greedy.token_ids[2])
    stopped = generate(model, PROMPTS[:1], SamplingParams(max_new_tokens=10, stop_strings=(" " + third,)), decode=decode)[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == decode(greedy.token_ids[:2])
    eos = generate(model, PROMPTS[:1], SamplingParams(max_new_tokens=10, eos_token_id=greedy.token_ids[1]))[0]
    assert eos.finish_reason == "eos" and eos.token_ids == greedy.token_ids[:1]


def test_prompt_too_long_is_rejected(model):
    with pytest.raises(ValueError, match="exceeds the model's context of 128"):
        generate(model, [[1] * 120], SamplingParams(max_new_tokens=20))


def test_init_is_gpt_style():
    config = get_preset("phi-1-tiny")
    m = PhiForCausalLM(config, init_seed=0)
    assert abs(m.layers[0].mlp.fc1.weight.std().item() - 0.02) < 0.002
    expected_out = 0.02 / (2 * config.n_layer) ** 0.5
    assert abs(m.layers[0].mlp.fc2.weight.std().item() - expected_out) < 0.001
    assert torch.all(m.layers[0].attn.qkv.bias == 0)
    assert torch.all(m.layers[0].ln.weight == 1)
    same = PhiForCausalLM(config, init_seed=0)
    torch.testing.assert_close(same.lm_head.weight, m.lm_head.weight, atol=0, rtol=0)


def test_loss_ignores_masked_labels(model):
    x = torch.randint(0, 512, (2, 10))
    labels = torch.randint(0, 512, (2, 10))
    out = model(x, labels=labels)
    manual = torch.nn.functional.cross_entropy(out.logits.reshape(-1, 512), labels.reshape(-1))
    torch.testing.assert_close(out.loss, manual)
    labels[:, :5] = -100
    out = model(x, labels=labels)
    manual = torch.nn.functional.cross_entropy(out.logits[:, 5:].reshape(-1, 512), labels[:, 5:].reshape(-1))
    torch.testing.assert_close(out.loss, manual)


def test_activation_checkpointing_gives_the_same_gradients():
    m = PhiForCausalLM(nano()).train()
    x = torch.randint(0, 512, (2, 16))
    m(x, labels=x).loss.backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    m.activation_checkpointing = True
    m(x, labels=x).loss.backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], atol=1e-6, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: checks the bf16 flash path")
def test_bf16_fast_path_agrees_with_math_on_gpu():
    base = get_preset("phi-1-tiny")
    ref = PhiForCausalLM(base.replace(attention_backend="math")).cuda().eval()
    fast = PhiForCausalLM(base).cuda().to(torch.bfloat16).eval()
    fast.load_state_dict({k: v.to(torch.bfloat16) for k, v in ref.state_dict().items()})
    x = torch.randint(0, base.vocab_size, (2, 256), device="cuda")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # fails loudly if the flash kernel cannot run
        got = fast(x).logits.float()
    assert fast.attention_backend in ("flash", "sdpa")
    torch.testing.assert_close(got, ref(x).logits, atol=5e-2, rtol=5e-2)


def test_padding_ids_past_the_tokenizer_vocabulary_are_never_generated(model):
    # The nano model has 512 rows; pretend the tokenizer knows only the first 100 ids.
    unrestricted = generate(model, PROMPTS, SamplingParams(max_new_tokens=12))
    assert any(t >= 100 for c in unrestricted for t in c.token_ids)  # else the test shows nothing
    for params in (SamplingParams(max_new_tokens=12), SamplingParams(max_new_tokens=12, temperature=1.0, seed=0)):
        restricted = generate(model, PROMPTS, params, vocab_size=100)
        assert all(t < 100 for c in restricted for t in c.token_ids)
