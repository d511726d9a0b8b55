"""FSDP2 (`parallel.fsdp=true`): sharded training equals one process, alone and composed with TP; checkpoints
written under FSDP2 load at other layouts and the reverse.

Library level (phi1.parallel.fsdp, a plain PhiForCausalLM + AdamW loop): 10 steps at DP 2 (FSDP2) and at
TP 2 x FSDP2 2 against one process on the same global batch, fp32, dropout off, global-norm clipping that acts
on every step; the TP-local whole-tensor view round trip.
"""

from __future__ import annotations

import pytest
import torch

from phi1.core.config import get_preset
from phi1.core.model import PhiForCausalLM
from phi1.parallel import fsdp
from phi1.parallel.optim import param_groups
from phi1.parallel.state import init_distributed
from phi1.testing.spawn import run_on_gloo

STEPS, GLOBAL_BATCH, SEQ = 10, 4, 32
LR, WEIGHT_DECAY, MAX_NORM = 3e-3, 0.1, 0.5
REL_TOL = 1e-5


def _batches(vocab: int) -> torch.Tensor:
    """Arithmetic sequences from random starts: learnable within a few steps, so the losses fall."""
    g = torch.Generator().manual_seed(2024)
    starts = torch.randint(0, vocab, (STEPS, GLOBAL_BATCH, 1), generator=g)
    return (starts + 3 * torch.arange(SEQ + 1)) % vocab


def _optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups(model, WEIGHT_DECAY), lr=LR, foreach=True)


def _reference() -> tuple[list[float], list[float], dict[str, torch.Tensor]]:
    """Losses, pre-clip norms and final weights of one process over the whole global batch (torch's clipping)."""
    model = PhiForCausalLM(get_preset("phi-1-nano"))
    optimizer = _optimizer(model)
    losses, norms = [], []
    for batch in _batches(model.config.vocab_size):
        loss = model(batch[:, :-1], labels=batch[:, 1:]).loss
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM).item())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, norms, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _fsdp_train(rank: int, world_size: int, tp: int, sequence_parallel: bool, accum: int) -> dict:
    state = init_distributed(tp)
    model = PhiForCausalLM(get_preset("phi-1-nano"), tp_group=state.tp_group, sequence_parallel=sequence_parallel)
    fsdp.shard_model(model, state, "fp32")
    assert fsdp.is_sharded(model)
    optimizer = _optimizer(model)
    per_rank = GLOBAL_BATCH // state.dp_size
    micro = per_rank // accum
    losses, norms = [], []
    for batch in _batches(model.config.vocab_size):
        mine = batch[state.dp_rank * per_rank:(state.dp_rank + 1) * per_rank]
        total = torch.zeros(())
        for m in range(accum):
            fsdp.set_gradient_sync(model, m == accum - 1)
            part = mine[m * micro:(m + 1) * micro]
            loss = model(part[:, :-1], labels=part[:, 1:]).loss
            (loss / accum).backward()
            total += loss.detach() / accum
        fsdp.allreduce_sequence_parallel_grads(model, state.tp_group)
        norms.append(fsdp.clip_grad_norm_(model, MAX_NORM, state))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.distributed.all_reduce(total, group=state.dp_group)
        losses.append(float(total) / state.dp_size)
    # Every parameter is a DTensor sharded over DP; its local slice is about 1 / dp of the TP-local tensor.
    sharded = all(isinstance(p, torch.distributed.tensor.DTensor) for p in model.parameters())
    local_numel = sum(fsdp.local(p).numel() for p in model.parameters())
    # The TP-local whole tensors (all-gathered over DP) of the final weights.
    weights = {name: p.detach().full_tensor() for name, p in model.named_parameters()}
    return {"losses": losses, "norms": norms, "weights": weights, "sharded": sharded, "local_numel": local_numel,
            "tp_rank": state.tp_rank}


def _relative(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def reference():
    return _reference()


@pytest.mark.slow
@pytest.mark.parametrize("world_size,tp,sequence_parallel,accum", [
    (2, 1, False, 1),   # FSDP2 over 2 ranks
    (2, 1, False, 2),   # with gradient accumulation (no reduce-scatter before the last micro-batch)
    (4, 2, False, 1),   # TP 2 x FSDP2 2
    (4, 2, True, 1),    # TP 2 (sequence parallel) x FSDP2 2
], ids=["fsdp2", "fsdp2-accum2", "tp2xfsdp2", "tp2-sp-xfsdp2"])
def test_fsdp_training_equals_one_process(reference, world_size, tp, sequence_parallel, accum):
    ref_losses, ref_norms, ref_weights = reference
    results = run_on_gloo(_fsdp_train, world_size, tp, sequence_parallel, accum, timeout_s=600)
    assert ref_losses[-1] < 0.9 * ref_losses[0]  # the run learns: the comparison is not between two constants
    for r in results:
        assert r["sharded"]
        assert _relative(r["losses"], ref_losses) < REL_TOL, (r["losses"], ref_losses)
        assert _relative(r["norms"], ref_norms) < REL_TOL, (r["norms"], ref_norms)
        assert min(r["norms"]) > MAX_NORM  # clipping acted on every step
    # Final weights: the TP-local whole tensors put together equal the one-process weights. (Looser than the
    # losses: AdamW turns round-off in gradients that are zero in exact arithmetic, such as the key biases', into
    # steps of size lr.)
    dp = world_size // tp
    total = sum(v.numel() for v in ref_weights.values())
    assert results[0]["local_numel"] <= total / (tp * dp) + 4096
    for name, whole in ref_weights.items():
        parts = [results[r]["weights"][name] for r in range(tp)]
        dims = [d for d in range(whole.dim()) if parts[0].shape[d] != whole.shape[d]]
        joined = torch.cat(parts, dim=dims[0]) if dims else parts[0]
        assert (joined - whole).abs().max() < 1e-4, name
