"""The chunked lm_head + cross-entropy equals the plain path in loss and every gradient (issue 8)."""

import pytest
import torch

from phi1.core.chunked_cross_entropy import chunked_linear_cross_entropy
from phi1.core.config import get_preset
from phi1.core.model import PhiForCausalLM


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 10_000])
def test_equals_plain_cross_entropy(chunk_size):
    torch.manual_seed(0)
    hidden = torch.randn(3, 11, 16, requires_grad=True)
    weight = torch.randn(128, 16, requires_grad=True)
    bias = torch.randn(128, requires_grad=True)
    labels = torch.randint(0, 128, (3, 11))
    labels[0, :4] = -100
    got = chunked_linear_cross_entropy(hidden, weight, bias, labels, chunk_size)
    (got * 0.5).backward()
    grads = [t.grad.clone() for t in (hidden, weight, bias)]
    for t in (hidden, weight, bias):
        t.grad = None
    logits = torch.nn.functional.linear(hidden, weight, bias)
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 128), labels.reshape(-1), reduction="sum")
    (expected * 0.5).backward()
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)
    for g, t in zip(grads, (hidden, weight, bias)):
        torch.testing.assert_close(g, t.grad, atol=1e-5, rtol=1e-5)


def test_model_loss_and_grads_equal_with_chunking():
    config = get_preset("phi-1-nano")
    plain = PhiForCausalLM(config, init_seed=1).train()
    chunked = PhiForCausalLM(config, init_seed=1).train()
    chunked.loss_chunk_size = 5
    x = torch.randint(0, config.vocab_size, (2, 24))
    y = torch.randint(0, config.vocab_size, (2, 24))
    a, b = plain(x, labels=y), chunked(x, labels=y)
    assert b.logits is None
    torch.testing.assert_close(a.loss, b.loss, atol=1e-6, rtol=1e-6)
    a.loss.backward()
    b.loss.backward()
    for (name, p), q in zip(plain.named_parameters(), chunked.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_no_gradient_work_under_no_grad():
    config = get_preset("phi-1-nano")
    m = PhiForCausalLM(config).eval()
    m.loss_chunk_size = 8
    x = torch.randint(0, config.vocab_size, (1, 16))
    with torch.no_grad():
        loss = m(x, labels=x).loss
    m.loss_chunk_size = 0
    with torch.no_grad():
        torch.testing.assert_close(loss, m(x, labels=x).loss)


def test_training_config_validates_loss_chunk_size():
    from phi1.training.config import ConfigError, TrainConfig, validate_config

    config = TrainConfig()
    config.loss_chunk_size = 1024
    config.parallel.zero_stage = 3
    with pytest.raises(ConfigError, match="loss_chunk_size"):
        validate_config(config, world_size=1, check_files=False)
