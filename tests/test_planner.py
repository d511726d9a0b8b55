"""The planner: exact parameter counts per TP rank, exact saved activations of our block, ring formulas, the
layout search, and tools/plan.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from phi1.core.config import get_preset
from phi1.core.model import PhiForCausalLM
from phi1.planning.hardware import Link, cluster, gpu_kind
from phi1.planning.memory import Layout, estimate_memory, parameter_counts, saved_bytes_per_layer
from phi1.planning.search import enumerate_plans
from phi1.planning.timing import all_reduce_seconds, predict_on_cluster, reduce_scatter_seconds

REPO = Path(__file__).resolve().parents[1]


def test_parameter_counts_per_tp_rank_are_exact() -> None:
    config = get_preset("phi-1")
    whole = parameter_counts(config, 1)
    assert whole.per_rank == config.num_parameters() == 1_418_270_720
    half = parameter_counts(config, 2)
    d, L = config.d_model, config.n_layer
    # Replicated on every TP rank: the LayerNorms and the row-parallel biases (dense, fc2) of every block, the
    # final LayerNorm.
    replicated = L * (2 * d + d + d) + 2 * d
    assert half.per_rank == (whole.per_rank - replicated) // 2 + replicated
    assert whole.lm_head == config.vocab_size * (d + 1)


def _saved_activation_bytes(n_layer: int, micro_batch: int, seq: int) -> int:
    """Bytes of the distinct storages autograd saves in one forward, parameters excluded."""
    config = get_preset("phi-1-tiny", n_layer=n_layer, vocab_size=1024, max_seq_len=seq)
    model = PhiForCausalLM(config).train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    ids = torch.randint(0, 1024, (micro_batch, seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(ids, labels=ids)
    return sum(storages.values())


def test_saved_activations_per_layer_match_autograd_exactly() -> None:
    """The per-layer term of the memory model equals what autograd keeps for one more block, to the byte."""
    micro, seq = 2, 128
    per_layer = _saved_activation_bytes(2, micro, seq) - _saved_activation_bytes(1, micro, seq)
    config = get_preset("phi-1-tiny", vocab_size=1024, max_seq_len=seq)
    predicted = saved_bytes_per_layer(config, Layout(micro_batch_size=micro, seq_len=seq, precision="fp32"))
    assert per_layer == predicted


def test_ring_collective_formulas() -> None:
    link = Link("test", gbps=100, latency_us=0)
    gigabyte = 1e9
    assert all_reduce_seconds(gigabyte, 1, link) == 0
    assert all_reduce_seconds(gigabyte, 2, link) == pytest.approx(0.01)  # 2 (n-1)/n = 1
    assert all_reduce_seconds(gigabyte, 8, link) == pytest.approx(2 * 7 / 8 * 0.01)
    assert reduce_scatter_seconds(gigabyte, 8, link) == pytest.approx(7 / 8 * 0.01)


def test_memory_falls_with_zero_stage_tp_and_checkpointing() -> None:
    config = get_preset("phi-1")
    base = dict(data_parallel=8, micro_batch_size=4, seq_len=2048, precision="bf16")
    totals = [estimate_memory(config, Layout(zero_stage=z, **base)).total for z in (0, 1, 2, 3)]
    assert totals == sorted(totals, reverse=True)
    plain = estimate_memory(config, Layout(**base))
    checkpointed = estimate_memory(config, Layout(activation_checkpointing=True, **base))
    assert checkpointed.activations < plain.activations / 5
    tp2 = estimate_memory(config, Layout(tensor_parallel=2, **{**base, "data_parallel": 4}))
    assert tp2.weights == pytest.approx(plain.weights / 2, rel=0.01)


def test_phi1_on_eight_a100_predicts_the_papers_days() -> None:
    """50B tokens at 50% of the A100's 312 TFLOP/s is ~4.2 days; the paper says under 4."""
    hardware = cluster("A100-80GB", 8)
    plans = enumerate_plans(get_preset("phi-1"), hardware, 1024, 2048, "fp16", 0.5)
    best = plans[0]
    assert best.fits and best.memory.total <= 80 * 2**30
    assert 3.5 < best.time.days_for(50e9) < 5.0
    fitting = [p for p in plans if p.fits]
    assert [round(p.time.total, 3) for p in fitting] == sorted(round(p.time.total, 3) for p in fitting)
    assert all(not p.fits for p in plans[len(fitting):])
    ideal = 50e9 * get_preset("phi-1").flops_per_token(2048) / (8 * 312e12 * 0.5) / 86400
    assert best.time.days_for(50e9) == pytest.approx(ideal, rel=0.02)  # one node: communication is small


def test_slow_link_makes_data_parallel_communication_dominate() -> None:
    config = get_preset("phi-1")
    layout = Layout(data_parallel=16, micro_batch_size=8, seq_len=2048, precision="bf16")
    fast = predict_on_cluster(config, layout, 1024, cluster("H100-SXM", 16, inter="ib-ndr"), 0.4)
    slow = predict_on_cluster(config, layout, 1024, cluster("H100-SXM", 16, inter="ethernet-100g"), 0.4)
    assert slow.data_parallel_comm > 10 * fast.data_parallel_comm
    assert slow.tokens_per_second < fast.tokens_per_second


def test_unknown_names_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="unknown GPU kind 'B300'"):
        gpu_kind("B300")
    with pytest.raises(ValueError, match="unknown intra-node link"):
        cluster("A100-80GB", 8, intra="carrier-pigeon")
    with pytest.raises(ValueError, match="precision"):
        estimate_memory(get_preset("phi-1-nano"), Layout(precision="fp8"))


def test_plan_cli_prints_the_table_and_the_paper_comparison() -> None:
    result = subprocess.run([sys.executable, "tools/plan.py", "--top", "5"], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "PEAK GiB" in result.stdout and "tokens/s" in result.stdout
    assert "paper: under 4 days" in result.stdout
    bad = subprocess.run([sys.executable, "tools/plan.py", "--gpu", "Z80"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "unknown GPU kind 'Z80'" in bad.stderr
