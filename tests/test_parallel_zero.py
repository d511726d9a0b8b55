"""DeepSpeed ZeRO stages 1, 2 and 3 against DDP: the same losses over 10 steps, on 2 gloo processes (DP = 2).

Both paths use AdamW with phi1's parameter groups and clip by the global gradient norm; DDP with phi1's
`clip_grad_norm_`, ZeRO with DeepSpeed's clipping configured by `deepspeed_config`. One spawn runs all four.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from phi1.core.config import get_preset
from phi1.core.model import PhiForCausalLM
from phi1.parallel.data_parallel import wrap_data_parallel
from phi1.parallel.grads import clip_grad_norm_
from phi1.parallel.optim import param_groups
from phi1.parallel.state import init_distributed
from phi1.parallel.zero import deepspeed_config
from phi1.testing.spawn import run_on_gloo

STEPS, MICRO_BATCH, SEQ = 10, 2, 32
LR, BETAS, EPS, WEIGHT_DECAY, MAX_NORM = 3e-3, (0.9, 0.95), 1e-8, 0.1, 0.5
TOL = 1e-5


def _batches(vocab: int, dp_size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(77)
    starts = torch.randint(0, vocab, (STEPS, MICRO_BATCH * dp_size, 1), generator=g)
    return (starts + 5 * torch.arange(SEQ + 1)) % vocab


def _mean_over_dp(loss: torch.Tensor, state) -> float:
    reported = loss.detach().float().clone()
    dist.all_reduce(reported, group=state.dp_group)
    return reported.item() / state.dp_size


def _train_ddp(state) -> list[float]:
    model = PhiForCausalLM(get_preset("phi-1-nano"))
    ddp_model = wrap_data_parallel(model, state)
    optimizer = torch.optim.AdamW(param_groups(model, WEIGHT_DECAY), lr=LR, betas=BETAS, eps=EPS, foreach=False)
    losses = []
    for batch in _batches(model.config.vocab_size, state.dp_size):
        rows = batch.chunk(state.dp_size)[state.dp_rank]
        loss = ddp_model(rows[:, :-1], labels=rows[:, 1:]).loss
        loss.backward()
        clip_grad_norm_(ddp_model, MAX_NORM, state)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(_mean_over_dp(loss, state))
    return losses


def _train_zero(state, stage: int) -> list[float]:
    from phi1.parallel.zero import initialize_zero

    model = PhiForCausalLM(get_preset("phi-1-nano"))
    config = deepspeed_config(
        zero_stage=stage, micro_batch_size=MICRO_BATCH, grad_accum_steps=1, dp_size=state.dp_size, lr=LR,
        betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, grad_clip=MAX_NORM, precision="fp32",
    )
    engine = initialize_zero(model, config, state)
    assert engine.zero_optimization_stage() == stage
    losses = []
    for batch in _batches(model.config.vocab_size, state.dp_size):
        rows = batch.chunk(state.dp_size)[state.dp_rank]
        loss = engine(rows[:, :-1], labels=rows[:, 1:]).loss
        engine.backward(loss)
        engine.step()
        losses.append(_mean_over_dp(loss, state))
    engine.destroy()
    return losses


def _zero_worker(rank: int, world_size: int) -> dict:
    os.environ["DS_ACCELERATOR"] = "cpu"
    state = init_distributed(tensor_parallel_size=1)
    results = {"ddp": _train_ddp(state)}
    for stage in (1, 2, 3):
        results[f"zero{stage}"] = _train_zero(state, stage)
    return results


@pytest.mark.slow
def test_zero_stages_match_ddp_losses():
    results = run_on_gloo(_zero_worker, 2, timeout_s=200)[0]
    ddp = results["ddp"]
    assert ddp[-1] < ddp[0] - 0.1  # it trained
    for stage in (1, 2, 3):
        zero = results[f"zero{stage}"]
        err = max(abs(a - b) for a, b in zip(zero, ddp))
        assert len(zero) == STEPS and err <= TOL, f"ZeRO-{stage}: max loss difference {err:.3e} from DDP\n{zero}\n{ddp}"


def test_deepspeed_config_from_our_settings():
    config = deepspeed_config(
        zero_stage=3, micro_batch_size=4, grad_accum_steps=8, dp_size=2, lr=1e-3, betas=(0.9, 0.95), eps=1e-8,
        weight_decay=0.1, grad_clip=1.0, precision="bf16",
    )
    assert config["train_batch_size"] == 64 and config["zero_optimization"]["stage"] == 3
    assert config["bf16"]["enabled"] and not config["fp16"]["enabled"] and config["gradient_clipping"] == 1.0
    with pytest.raises(ValueError, match="zero_stage must be 1, 2 or 3"):
        deepspeed_config(
            zero_stage=4, micro_batch_size=4, grad_accum_steps=1, dp_size=1, lr=1e-3, betas=(0.9, 0.95),
            eps=1e-8, weight_decay=0.1, grad_clip=1.0, precision="fp32",
        )
    with pytest.raises(ValueError, match="precision"):
        deepspeed_config(
            zero_stage=1, micro_batch_size=4, grad_accum_steps=1, dp_size=1, lr=1e-3, betas=(0.9, 0.95),
            eps=1e-8, weight_decay=0.1, grad_clip=1.0, precision="fp8",
        )
