"""The phi model at TP = 2 against TP = 1 with the same weights, on 2 gloo processes.

Checked in one spawn: logits, loss and every parameter's gradient (fused and per-branch reductions, with and
without sequence parallelism), the global gradient norm, the bytes all-reduced by the fused block, and dropout
under activation checkpointing. Plus single-process checks of the layout validation.
"""

from __future__ import annotations

import os

import pytest
import torch

from phi1.core.config import get_preset
from phi1.core.model import PhiForCausalLM
from phi1.core.pretrained import shard_for_rank
from phi1.parallel.grads import allreduce_sequence_parallel_grads, clip_grad_norm_
from phi1.parallel.layers import tensor_parallel_dims
from phi1.parallel.mappings import COMM_BYTES, reset_comm_bytes
from phi1.parallel.optim import param_groups
from phi1.parallel.random import seed_everything
from phi1.parallel.state import init_distributed, validate_layout
from phi1.testing.spawn import run_on_gloo

TOL = 1e-5
B, T = 2, 16


def _batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    tokens = torch.randint(0, vocab, (B, T + 1), generator=g)
    labels = tokens[:, 1:].clone()
    labels[0, :3] = -100
    return tokens[:, :-1], labels


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"{tuple(a.shape)} != {tuple(b.shape)}"
    return (a - b).abs().max().item()


def _compare_with_tp1(state, config, fused: bool, sequence_parallel: bool) -> dict[str, float]:
    input_ids, labels = _batch(config.vocab_size)
    reference = PhiForCausalLM(config)
    ref_out = reference(input_ids, labels=labels)
    ref_out.loss.backward()
    ref_logits = reference(input_ids).logits.detach()
    ref_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), float("inf")).item()

    model = PhiForCausalLM(config, tp_group=state.tp_group, sequence_parallel=sequence_parallel, fused_tp_reduce=fused)
    out = model(input_ids, labels=labels)
    out.loss.backward()
    allreduce_sequence_parallel_grads(model, state)
    errors = {"loss": abs(out.loss.item() - ref_out.loss.item())}
    with torch.no_grad():
        errors["logits"] = _max_err(model(input_ids).logits, ref_logits)
    dims = tensor_parallel_dims(model)
    ref_params = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        want = shard_for_rank(ref_params[name], dims[name], state.tp_size, state.tp_rank)
        assert torch.equal(param.detach(), want.detach()), f"{name}: TP init differs from the unsharded init"
        errors[f"grad {name}"] = _max_err(param.grad, shard_for_rank(ref_params[name].grad, dims[name], state.tp_size, state.tp_rank))
    errors["grad norm"] = abs(clip_grad_norm_(model, 1e9, state) - ref_norm) / ref_norm
    return errors


def _allreduce_bytes_per_step(state, config, fused: bool) -> int:
    model = PhiForCausalLM(config, tp_group=state.tp_group, fused_tp_reduce=fused)
    input_ids, labels = _batch(config.vocab_size)
    reset_comm_bytes()
    model(input_ids, labels=labels).loss.backward()
    return COMM_BYTES["all_reduce"]


def _checkpointing_grads(state, config, checkpointing: bool) -> dict[str, torch.Tensor]:
    model = PhiForCausalLM(config, tp_group=state.tp_group, sequence_parallel=True)
    model.train()
    model.activation_checkpointing = checkpointing
    input_ids, labels = _batch(config.vocab_size)
    seed_everything(5, tp_rank=state.tp_rank)
    model(input_ids, labels=labels).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def _model_worker(rank: int, world_size: int) -> dict:
    state = init_distributed(tensor_parallel_size=world_size)
    config = get_preset("phi-1-nano")
    results: dict = {}
    for fused in (True, False):
        for sequence_parallel in (False, True):
            errors = _compare_with_tp1(state, config, fused, sequence_parallel)
            worst = max(errors, key=errors.get)
            assert errors[worst] <= TOL, f"fused={fused} sp={sequence_parallel}: {worst} off by {errors[worst]:.3e}"
            results[f"fused={fused} sp={sequence_parallel}"] = errors[worst]

    results["bytes fused"] = _allreduce_bytes_per_step(state, config, fused=True)
    results["bytes per-branch"] = _allreduce_bytes_per_step(state, config, fused=False)

    dropout_config = config.replace(embd_dropout=0.1, attn_dropout=0.2, resid_dropout=0.1)
    plain = _checkpointing_grads(state, dropout_config, checkpointing=False)
    recomputed = _checkpointing_grads(state, dropout_config, checkpointing=True)
    errors = {name: _max_err(recomputed[name], plain[name]) for name in plain}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-6, f"activation checkpointing with TP dropout: {worst} off by {errors[worst]:.3e}"
    # Dropout really was on: the gradients differ from the dropout-free model's.
    no_dropout = _checkpointing_grads(state, config, checkpointing=False)
    assert max(_max_err(plain[n], no_dropout[n]) for n in plain) > 1e-3
    return results


@pytest.mark.slow
def test_tp2_model_matches_tp1_logits_grads_and_comm():
    results = run_on_gloo(_model_worker, 2, timeout_s=150)[0]
    config = get_preset("phi-1-nano")
    activation_bytes = B * T * config.d_model * 4
    # Per block: fused = one all-reduce forward + one backward; per-branch = two of each. Plus the embedding's
    # forward all-reduce and the lm_head's backward one.
    assert results["bytes fused"] == (2 * config.n_layer + 2) * activation_bytes
    assert results["bytes per-branch"] == (4 * config.n_layer + 2) * activation_bytes


def test_validate_layout_names_the_problem():
    config = get_preset("phi-1-nano")  # 4 heads, d_mlp 256, vocab 512
    validate_layout(4, 2, config)
    with pytest.raises(ValueError, match="tensor_parallel_size=3 does not divide the world size 4"):
        validate_layout(4, 3, config)
    with pytest.raises(ValueError, match="n_head"):
        validate_layout(8, 8, config)
    with pytest.raises(ValueError, match="vocab_size"):
        validate_layout(3, 3, config.replace(n_head=3, d_model=48, rotary_dim=8, d_mlp=192, vocab_size=640))
    with pytest.raises(ValueError, match="tensor_parallel_size must be a positive integer"):
        validate_layout(4, 0)


def test_init_distributed_rejects_layout_before_process_group(monkeypatch):
    import torch.distributed as dist

    monkeypatch.setitem(os.environ, "WORLD_SIZE", "3")
    monkeypatch.setitem(os.environ, "RANK", "0")
    with pytest.raises(ValueError, match="does not divide the world size 3"):
        init_distributed(tensor_parallel_size=2)
    assert not dist.is_initialized()


def test_param_groups_skip_biases_and_layernorms():
    model = PhiForCausalLM(get_preset("phi-1-nano"))
    groups = {g["name"]: g for g in param_groups(model, 0.1)}
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = sorted(names[id(p)] for p in groups["decay"]["params"])
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0
    assert all(n.endswith("weight") and ".ln." not in n and "layernorm" not in n for n in decayed)
    assert "embed_tokens.weight" in decayed and "lm_head.weight" in decayed
    assert len(decayed) + len(groups["no_decay"]["params"]) == len(names)
