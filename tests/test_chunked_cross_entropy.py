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


def _loss_flops(requires_grad: bool) -> int:
    """Matmul FLOPs of one chunked loss call on (12, 16) hidden states and a (128, 16) head."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    hidden = torch.randn(12, 16, requires_grad=requires_grad)
    weight = torch.randn(128, 16, requires_grad=requires_grad)
    labels = torch.randint(0, 128, (12,))
    counter = FlopCounterMode(display=False)
    with counter:
        loss = chunked_linear_cross_entropy(hidden, weight, None, labels, chunk_size=5)
    assert loss.requires_grad == (requires_grad and torch.is_grad_enabled())
    return counter.get_total_flops()


def test_no_gradient_work_under_no_grad():
    # The chunked loss computes its gradients inside the forward pass (two extra matmuls per chunk). Under
    # no_grad (evaluation, generation) it must run only the logits matmul: 2 x tokens x d x V FLOPs. (It did
    # the gradient work there too until the caller's grad mode was passed in: needs_input_grad ignores no_grad.)
    logits_only = 2 * 12 * 16 * 128
    with torch.no_grad():
        assert _loss_flops(requires_grad=True) == logits_only
    assert _loss_flops(requires_grad=False) == logits_only
    # With gradients needed the same call also runs the gradient matmuls: the counter sees the difference.
    assert _loss_flops(requires_grad=True) >= 2 * logits_only

    config = get_preset("phi-1-nano")
    m = PhiForCausalLM(config).eval()
    m.loss_chunk_size = 8
    x = torch.randint(0, config.vocab_size, (1, 16))
    with torch.no_grad():
        loss = m(x, labels=x).loss
    assert loss.grad_fn is None and not loss.requires_grad
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
