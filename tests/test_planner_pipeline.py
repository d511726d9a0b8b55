"""The planner's per-stage memory follows what each schedule keeps alive (phi1.planning.pipeline.stage_memory):
1F1B's steady state holds its P - r micro-batches beside every gradient; GPipe holds all m before its first
backward, when no gradient exists yet (the runner sets them to None before each step). The measured side is
tests/test_train_pipeline.py::test_stage_memory_matches_the_measured_peak and benchmarks/bench_pipeline_memory.py."""

from __future__ import annotations

import pytest

from phi1.core.config import get_preset
from phi1.planning.memory import make_layout, saved_bytes_per_layer
from phi1.planning.pipeline import stage_memory

CONFIG = get_preset("phi-1-tiny", n_layer=4, d_model=512, n_head=8, d_mlp=2048, vocab_size=8192, max_seq_len=256)


def _layout(data_parallel: int = 1, micro_batches: int = 4, gpu: bool = False):
    return make_layout(CONFIG, tensor_parallel=1, data_parallel=data_parallel, zero_stage=0, micro_batch_size=4,
                       gradient_accumulation=micro_batches, seq_len=256, precision="fp32",
                       activation_checkpointing=False, sequence_parallel=False, loss_chunk_size=0, gpu=gpu)


def test_gpipe_peaks_before_the_gradients_exist() -> None:
    layout = _layout()
    gpipe = stage_memory(CONFIG, layout, 2, 0, 4, "gpipe")
    one_f_one_b = stage_memory(CONFIG, layout, 2, 0, 4, "1f1b")
    assert (gpipe.in_flight, one_f_one_b.in_flight) == (4, 2)
    assert gpipe.peak_moment == "first backward"
    assert one_f_one_b.peak_moment == "steady state (gradients allocated)"
    # 1F1B: states, its 2 micro-batches of 2 blocks, the gradients and one block's working set, all at once
    static = one_f_one_b.weights + one_f_one_b.optimizer + one_f_one_b.p2p_buffers
    assert one_f_one_b.total == pytest.approx(static + one_f_one_b.activations + one_f_one_b.gradients
                                              + one_f_one_b.working)
    # GPipe: all 4 micro-batches' activations, but not the gradients beside them
    assert gpipe.total == pytest.approx(static + gpipe.activations + gpipe.working)
    assert gpipe.activations == pytest.approx(4 * 2 * saved_bytes_per_layer(CONFIG, layout))
    # the last rank's first backward holds the head's gradients and the logits of all 4 micro-batches
    last = stage_memory(CONFIG, layout, 2, 1, 4, "gpipe")
    assert last.peak_moment == "first backward" and last.total < last.weights + last.optimizer + last.p2p_buffers \
        + last.activations + last.logits + last.gradients + last.working


def test_ddp_buckets_are_counted_beside_the_gradients_on_a_gpu() -> None:
    """The runner's DDP (no gradient_as_bucket_view) allocates buckets as large as the gradients for the whole
    run: device memory on a GPU; on a CPU their pages are written only at the last micro-batch's backward, after
    the peak (measured: pp2-dp2-m4 in benchmarks/bench_pipeline_memory.py)."""
    alone = stage_memory(CONFIG, _layout(gpu=True), 2, 0, 4)
    replicated = stage_memory(CONFIG, _layout(data_parallel=2, gpu=True), 2, 0, 4)
    assert replicated.total - alone.total == pytest.approx(alone.gradients)
    assert stage_memory(CONFIG, _layout(data_parallel=2), 2, 0, 4).total == stage_memory(CONFIG, _layout(), 2, 0, 4).total
