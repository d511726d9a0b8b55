"""Each tensor-parallel layer against its unsharded counterpart, on 2 gloo processes (fp32, within 1e-5).

Forward outputs, input gradients and weight gradients are compared, with and without sequence parallelism;
also the vocab-parallel cross-entropy, the RNG tracker and the mapping error messages. One spawn runs all the
checks (process start-up dominates the cost).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from phi1.parallel.cross_entropy import vocab_parallel_cross_entropy
from phi1.parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from phi1.parallel.mappings import gather_from_tp, scatter_to_sequence
from phi1.parallel.random import get_rng_tracker, seed_everything
from phi1.parallel.state import init_distributed
from phi1.testing.spawn import run_on_gloo

TOL = 1e-5
B, T, D_IN, D_OUT, VOCAB = 2, 8, 12, 16, 64


def _close(name: str, got: torch.Tensor, want: torch.Tensor, errors: dict) -> None:
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = (got - want).abs().max().item()
    errors[name] = err
    assert err <= TOL, f"{name}: max abs error {err:.3e} > {TOL}"


def _check_column(tp: int, r: int, group, sequence_parallel: bool, gather_output: bool, errors: dict) -> None:
    g = torch.Generator().manual_seed(1)
    weight, bias = torch.randn(D_OUT, D_IN, generator=g), torch.randn(D_OUT, generator=g)
    x = torch.randn(B, T, D_IN, generator=g, requires_grad=True)
    upstream = torch.randn(B, T, D_OUT, generator=g)
    ref_w, ref_b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    (F.linear(x, ref_w, ref_b) * upstream).sum().backward()
    ref_y = F.linear(x, weight, bias)

    layer = ColumnParallelLinear(D_IN, D_OUT, group=group, gather_output=gather_output, sequence_parallel=sequence_parallel)
    with torch.no_grad():
        layer.weight.copy_(weight.chunk(tp, 0)[r])
        layer.bias.copy_(bias.chunk(tp, 0)[r])
    x_local = x.detach().clone()
    if sequence_parallel:
        x_local = x_local.chunk(tp, 1)[r].contiguous()
    x_local.requires_grad_()
    y = layer(x_local)
    want_y = ref_y if gather_output else ref_y.chunk(tp, -1)[r]
    want_up = upstream if gather_output else upstream.chunk(tp, -1)[r]
    (y * want_up).sum().backward()
    tag = f"column(sp={sequence_parallel}, gather={gather_output})"
    _close(f"{tag} output", y, want_y, errors)
    want_dx = x.grad.chunk(tp, 1)[r] if sequence_parallel else x.grad
    _close(f"{tag} input grad", x_local.grad, want_dx, errors)
    _close(f"{tag} weight grad", layer.weight.grad, ref_w.grad.chunk(tp, 0)[r], errors)
    _close(f"{tag} bias grad", layer.bias.grad, ref_b.grad.chunk(tp, 0)[r], errors)
    x.grad = None


def _check_row(tp: int, r: int, group, sequence_parallel: bool, errors: dict) -> None:
    g = torch.Generator().manual_seed(2)
    weight, bias = torch.randn(D_OUT, D_IN, generator=g), torch.randn(D_OUT, generator=g)
    x = torch.randn(B, T, D_IN, generator=g, requires_grad=True)
    upstream = torch.randn(B, T, D_OUT, generator=g)
    ref_w, ref_b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    ref_y = F.linear(x, ref_w, ref_b)
    (ref_y * upstream).sum().backward()

    layer = RowParallelLinear(D_IN, D_OUT, group=group, sequence_parallel=sequence_parallel)
    with torch.no_grad():
        layer.weight.copy_(weight.chunk(tp, 1)[r])
        layer.bias.copy_(bias)
    x_local = x.detach().chunk(tp, -1)[r].clone().requires_grad_()
    y = layer(x_local)
    want_y, want_up = ref_y.detach(), upstream
    if sequence_parallel:
        want_y, want_up = want_y.chunk(tp, 1)[r], upstream.chunk(tp, 1)[r]
    (y * want_up).sum().backward()
    tag = f"row(sp={sequence_parallel})"
    _close(f"{tag} output", y, want_y, errors)
    _close(f"{tag} input grad", x_local.grad, x.grad.chunk(tp, -1)[r], errors)
    _close(f"{tag} weight grad", layer.weight.grad, ref_w.grad.chunk(tp, 1)[r], errors)
    bias_grad = layer.bias.grad.clone()
    if sequence_parallel:  # each rank saw its sequence shard: the partial sums add up to the whole gradient
        dist.all_reduce(bias_grad, group=group)
    _close(f"{tag} bias grad", bias_grad, ref_b.grad, errors)


def _check_embedding(tp: int, r: int, group, sequence_parallel: bool, errors: dict) -> None:
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(VOCAB, D_OUT, generator=g)
    ids = torch.randint(0, VOCAB, (B, T), generator=g)
    ids[0, :4] = torch.tensor([0, VOCAB // tp - 1, VOCAB // tp, VOCAB - 1])  # both sides of every range edge
    upstream = torch.randn(B, T, D_OUT, generator=g)
    ref_w = weight.clone().requires_grad_()
    ref_y = F.embedding(ids, ref_w)
    (ref_y * upstream).sum().backward()

    layer = VocabParallelEmbedding(VOCAB, D_OUT, group=group, sequence_parallel=sequence_parallel)
    with torch.no_grad():
        layer.weight.copy_(weight.chunk(tp, 0)[r])
    y = layer(ids)
    want_y, want_up = ref_y.detach(), upstream
    if sequence_parallel:
        want_y, want_up = want_y.chunk(tp, 1)[r], upstream.chunk(tp, 1)[r]
    (y * want_up).sum().backward()
    tag = f"embedding(sp={sequence_parallel})"
    _close(f"{tag} output", y, want_y, errors)
    _close(f"{tag} weight grad", layer.weight.grad, ref_w.grad.chunk(tp, 0)[r], errors)


def _check_cross_entropy(tp: int, r: int, group, errors: dict) -> None:
    g = torch.Generator().manual_seed(4)
    logits = (torch.randn(B * T, VOCAB, generator=g) * 5).requires_grad_()
    targets = torch.randint(0, VOCAB, (B * T,), generator=g)
    targets[:3] = torch.tensor([-100, 0, VOCAB - 1])
    upstream = torch.rand(B * T, generator=g)
    ref = F.cross_entropy(logits, targets, reduction="none", ignore_index=-100)
    (ref * upstream).sum().backward()

    local = logits.detach().chunk(tp, -1)[r].clone().requires_grad_()
    losses = vocab_parallel_cross_entropy(local, targets, group)
    (losses * upstream).sum().backward()
    _close("cross-entropy losses", losses, ref.detach(), errors)
    _close("cross-entropy logits grad", local.grad, logits.grad.chunk(tp, -1)[r], errors)


def _check_rng_tracker(tp: int, r: int, group) -> None:
    seed_everything(7, tp_rank=r)
    ones = torch.ones(4096)
    outside = F.dropout(ones, p=0.5)
    with get_rng_tracker().fork():
        inside = F.dropout(ones, p=0.5)
    after = F.dropout(ones, p=0.5)
    gathered = [torch.empty_like(ones) for _ in range(3 * tp)]
    dist.all_gather(gathered[:tp], outside, group=group)
    dist.all_gather(gathered[tp : 2 * tp], inside, group=group)
    dist.all_gather(gathered[2 * tp :], after, group=group)
    assert torch.equal(gathered[0], gathered[1]), "dropout outside the TP region must agree across TP ranks"
    assert not torch.equal(gathered[2], gathered[3]), "dropout inside the TP region must differ per TP rank"
    # Forking must not consume the default generator: the next replicated mask still agrees.
    assert torch.equal(gathered[4], gathered[5]), "fork() disturbed the default generator"


def _layers_worker(rank: int, world_size: int) -> dict:
    state = init_distributed(tensor_parallel_size=world_size)
    tp, r, group = state.tp_size, state.tp_rank, state.tp_group
    errors: dict[str, float] = {}
    for sequence_parallel in (False, True):
        for gather_output in (False, True):
            if sequence_parallel and gather_output:
                continue
            _check_column(tp, r, group, sequence_parallel, gather_output, errors)
        _check_row(tp, r, group, sequence_parallel, errors)
        _check_embedding(tp, r, group, sequence_parallel, errors)
    _check_cross_entropy(tp, r, group, errors)
    _check_rng_tracker(tp, r, group)

    # gather_from_tp / scatter_to_sequence are adjoint pairs of the same data movement: round trip exactly.
    x = torch.arange(B * T * 4, dtype=torch.float32).view(B, T, 4)
    assert torch.equal(gather_from_tp(x.chunk(tp, -1)[r].contiguous(), group), x)
    with pytest.raises(ValueError, match="does not split evenly"):
        scatter_to_sequence(torch.zeros(B, tp + 1, 4), group)
    return errors


@pytest.mark.slow
def test_parallel_layers_match_unsharded_at_tp2():
    errors_by_rank = run_on_gloo(_layers_worker, 2, timeout_s=120)
    for errors in errors_by_rank:
        assert len(errors) == 26  # every check above ran on every rank
        assert max(errors.values()) <= TOL
