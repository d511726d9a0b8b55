"""Pipeline parallelism against one process: stage split, rank layouts, and 10 training steps per layout.

Each multi-process case trains the same tiny phi model (phi-1-nano with 4 blocks, dropout off, fp32) for 10
AdamW steps with global-norm clipping on the same global batches, and must give the one-process losses within
1e-5 relative, and at step 1 every parameter's gradient, gathered back from its stage and TP shards under the
full model's name.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from phi1.core.config import get_preset
from phi1.core.model import PhiForCausalLM
from phi1.core.pipeline_stage import (
    PhiPipelineStage,
    balanced_split,
    build_stages,
    layer_ranges,
    stage_loss_fn,
)
from phi1.parallel.layers import tensor_parallel_dims
from phi1.parallel.optim import param_groups
from phi1.parallel.pipeline import (
    PipelineRunner,
    build_pipeline_groups,
    check_schedule,
    groups_along,
    groups_spanning_nodes,
    rank_grid,
    stages_of_rank,
)
from phi1.planning.pipeline import bubble_fraction, in_flight_chunks, p2p_bytes_per_step, stage_memory
from phi1.testing.spawn import run_on_gloo

CONFIG = get_preset("phi-1-nano", n_layer=4)
MICRO, SEQ, GLOBAL, STEPS = 2, 16, 8, 10
LR, WEIGHT_DECAY, CLIP = 3e-3, 0.1, 0.5
LOSS_RTOL, GRAD_ATOL = 1e-5, 1e-6


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """STEPS global batches of (GLOBAL, SEQ) input ids and labels, some labels ignored.

    Tokens come from the first 32 ids only, so that 10 steps visibly lower the loss (the model learns to favour
    them) and the comparison covers a moving model, not one that stands still."""
    g = torch.Generator().manual_seed(7)
    batches = []
    for _ in range(STEPS):
        tokens = torch.randint(0, 32, (GLOBAL, SEQ + 1), generator=g)
        labels = tokens[:, 1:].clone()
        labels[0, :3] = -100
        batches.append((tokens[:, :-1].contiguous(), labels))
    return batches


def _one_process() -> tuple[list[float], dict[str, torch.Tensor], float]:
    """Losses of the STEPS steps, every gradient and the norm at step 1, with gradient accumulation over the
    same micro-batches the pipeline runs."""
    model = PhiForCausalLM(CONFIG)
    optimizer = torch.optim.AdamW(param_groups(model, WEIGHT_DECAY), lr=LR)
    losses, grads, first_norm = [], {}, 0.0
    accum = GLOBAL // MICRO
    for step, (input_ids, labels) in enumerate(_batches()):
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for micro in range(accum):
            rows = slice(micro * MICRO, (micro + 1) * MICRO)
            loss = model(input_ids[rows], labels=labels[rows]).loss
            (loss / accum).backward()
            total += loss.item()
        losses.append(total / accum)
        if step == 0:
            grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP).item()
        if step == 0:
            first_norm = norm
        optimizer.step()
    losses.append(_eval_loss(model))
    return losses, grads, first_norm


@torch.no_grad()
def _eval_loss(model: PhiForCausalLM) -> float:
    """Mean micro-batch loss on the first batch, dropout off: what validation reports."""
    model.eval()
    input_ids, labels = _batches()[0]
    accum = GLOBAL // MICRO
    return sum(model(input_ids[m * MICRO : (m + 1) * MICRO], labels=labels[m * MICRO : (m + 1) * MICRO]).loss.item()
               for m in range(accum)) / accum


def _pipeline_worker(rank: int, world_size: int, tp: int, pp: int, schedule: str, virtual: int, sp: bool,
                     zero1: bool) -> dict:
    torch.manual_seed(0)
    groups = build_pipeline_groups(tp, pp)
    chunks = build_stages(
        CONFIG, groups.pp_rank, pp, virtual, tp_group=groups.tp_group if tp > 1 else None, sequence_parallel=sp
    )
    groups_of_params = param_groups(nn.ModuleList(chunks), WEIGHT_DECAY)
    if zero1:  # ZeRO-1: AdamW states sharded over each stage's DP group (torch's ZeroRedundancyOptimizer)
        from torch.distributed.optim import ZeroRedundancyOptimizer

        optimizer = ZeroRedundancyOptimizer(groups_of_params[0]["params"], torch.optim.AdamW,
                                            process_group=groups.dp_group, lr=LR, weight_decay=WEIGHT_DECAY)
        optimizer.add_param_group({"params": groups_of_params[1]["params"], "weight_decay": 0.0})
    else:
        optimizer = torch.optim.AdamW(groups_of_params, lr=LR)
    rows = GLOBAL // groups.dp_size
    runner = PipelineRunner(
        chunks, groups, stage_loss_fn(chunks), n_microbatches=rows // MICRO, micro_batch_size=MICRO, seq_len=SEQ,
        schedule=schedule, optimizer=optimizer, grad_clip=CLIP, timed=True,
    )
    share = slice(groups.dp_rank * rows, (groups.dp_rank + 1) * rows)
    losses, grads, norms = [], {}, []
    for step, (input_ids, labels) in enumerate(_batches()):
        if step == 0:
            losses.append(runner.forward_backward(input_ids[share], labels[share]))
            for chunk in chunks:
                dims = tensor_parallel_dims(chunk)
                grads.update({name: (p.grad.clone(), -1 if dims[name] is None else dims[name]) for name, p in chunk.named_parameters()})
            norms.append(runner.clip_grad_norm_(CLIP))
            optimizer.step()
        else:
            result = runner.step(input_ids[share], labels[share])
            assert not result.skipped
            losses.append(result.loss)
            norms.append(result.grad_norm)
        in_flight = runner.last_timing.peak_in_flight
    for chunk in chunks:
        chunk.eval()
    input_ids, labels = _batches()[0]
    losses.append(runner.eval_loss(input_ids[share], labels[share]))  # validation, after the 10 steps

    # Non-finite guard: a NaN weight on the last stage makes every rank skip the same update.
    for chunk in chunks:
        chunk.train()
        if chunk.is_last:
            with torch.no_grad():
                chunk.lm_head.bias[0] = float("nan")
    before = [p.detach().clone() for p in runner.parameters()]
    guarded = runner.step(input_ids[share], labels[share])
    unchanged = all(torch.equal(a.nan_to_num(), p.detach().nan_to_num()) for a, p in zip(before, runner.parameters()))
    return {"losses": losses, "grads": grads, "norms": norms, "in_flight": in_flight,
            "skipped": guarded.skipped and unchanged, "coords": [groups.dp_rank, groups.pp_rank, groups.tp_rank]}


def _gather_full_grads(results: list[dict], tp: int) -> dict[str, torch.Tensor]:
    """Every parameter's gradient under its full name, its TP shards concatenated (taken from DP rank 0)."""
    shards: dict[str, dict[int, tuple[torch.Tensor, int]]] = {}
    for result in results:
        dp_rank, _, tp_rank = result["coords"]
        if dp_rank != 0:
            continue
        for name, (grad, dim) in result["grads"].items():
            shards.setdefault(name, {})[tp_rank] = (grad, dim)
    full = {}
    for name, by_rank in shards.items():
        dim = by_rank[0][1]
        if dim < 0:
            full[name] = by_rank[0][0]
        else:
            assert sorted(by_rank) == list(range(tp)), f"{name}: TP shards {sorted(by_rank)}"
            full[name] = torch.cat([by_rank[r][0] for r in range(tp)], dim=dim)
    return full


@pytest.fixture(scope="module")
def one_process() -> tuple[list[float], dict[str, torch.Tensor], float]:
    return _one_process()


LAYOUTS = {
    "pp2-1f1b": dict(world=2, tp=1, pp=2, schedule="1f1b", virtual=1, sp=False, zero1=False),
    "pp2-interleaved-v2": dict(world=2, tp=1, pp=2, schedule="interleaved", virtual=2, sp=False, zero1=False),
    "pp2-tp2-sp": dict(world=4, tp=2, pp=2, schedule="1f1b", virtual=1, sp=True, zero1=False),
    "pp2-dp2": dict(world=4, tp=1, pp=2, schedule="1f1b", virtual=1, sp=False, zero1=False),
    "pp4-1f1b": dict(world=4, tp=1, pp=4, schedule="1f1b", virtual=1, sp=False, zero1=False),
    "pp2-gpipe": dict(world=2, tp=1, pp=2, schedule="gpipe", virtual=1, sp=False, zero1=False),
    "pp2-dp2-zero1": dict(world=4, tp=1, pp=2, schedule="1f1b", virtual=1, sp=False, zero1=True),
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_pipeline_matches_one_process(layout, one_process):
    ref_losses, ref_grads, ref_norm = one_process
    assert ref_norm > CLIP, "clipping must be active for the test to check it"
    case = LAYOUTS[layout]
    results = run_on_gloo(
        _pipeline_worker, case["world"], case["tp"], case["pp"], case["schedule"], case["virtual"], case["sp"],
        case["zero1"], timeout_s=600,
    )
    rows = GLOBAL // (case["world"] // (case["tp"] * case["pp"]))
    for result in results:  # the last stage's loss reaches every rank
        assert result["losses"] == results[0]["losses"]
        assert result["norms"] == pytest.approx(results[0]["norms"], rel=1e-12)
        # activations held at once, as the planner predicts for this rank
        assert result["skipped"], "a non-finite gradient norm must skip the update on every rank"
        pp_rank = result["coords"][1]
        assert result["in_flight"] == in_flight_chunks(pp_rank, case["pp"], rows // MICRO, case["schedule"], case["virtual"])
    losses = results[0]["losses"]
    assert len(losses) == STEPS + 1  # 10 training steps, then a validation pass
    for step, (got, want) in enumerate(zip(losses, ref_losses)):
        what = f"step {step + 1}" if step < STEPS else "validation after the steps"
        assert abs(got - want) <= LOSS_RTOL * abs(want), f"{layout} {what}: loss {got} vs one process {want}"
    assert results[0]["norms"][0] == pytest.approx(ref_norm, rel=1e-5)
    grads = _gather_full_grads(results, case["tp"])
    assert sorted(grads) == sorted(ref_grads), "the stages together must hold exactly the model's parameters"
    for name, want in ref_grads.items():
        err = (grads[name] - want).abs().max().item()
        assert err <= GRAD_ATOL, f"{layout}: gradient of {name} off by {err:.3e}"
    assert losses[STEPS - 1] < losses[0] - 0.3, "the 10 steps must actually train"


# ----------------------------------------------------------------------------------------------------------------
# Single-process checks: the split, stage weights, layouts


def test_balanced_and_explicit_split():
    assert balanced_split(24, 4) == [6, 6, 6, 6]
    assert balanced_split(10, 4) == [2, 3, 3, 2]
    assert balanced_split(5, 2) == [2, 3]
    assert [list(r) for r in layer_ranges(5, 2, split=[4, 1])] == [[0, 1, 2, 3], [4]]
    with pytest.raises(ValueError, match="sums to 4"):
        layer_ranges(5, 2, split=[3, 1])
    with pytest.raises(ValueError, match="2 entries"):
        layer_ranges(5, 3, split=[4, 1])
    with pytest.raises(ValueError, match="at least one block"):
        balanced_split(3, 4)


def test_interleaved_assignment_is_megatrons():
    assert stages_of_rank(0, 4, 2) == [0, 4]
    assert stages_of_rank(3, 4, 2) == [3, 7]
    assert stages_of_rank(1, 2, 1) == [1]
    held = sorted(s for r in range(4) for s in stages_of_rank(r, 4, 3))
    assert held == list(range(12))


def test_stages_hold_the_full_model_weights_and_compute_its_loss():
    """Stages built from the init seed, and from a full state dict, equal the one-process model; chained, they
    give its loss."""
    model = PhiForCausalLM(CONFIG)
    full = model.state_dict()
    input_ids, labels = _batches()[0]
    want = model(input_ids[:MICRO], labels=labels[:MICRO]).loss
    for source in ("seed", "state_dict"):
        stages = [
            stage
            for rank in range(2)
            for stage in build_stages(CONFIG, rank, 2, 2, state_dict=full if source == "state_dict" else None)
        ]
        stages.sort(key=lambda s: s.stage_index)
        assert [s.layer_indices for s in stages] == [[0], [1], [2], [3]]
        assert stages[0].is_first and not hasattr(stages[1], "embed_tokens") and hasattr(stages[3], "lm_head")
        names = [name for stage in stages for name, _ in stage.named_parameters()]
        assert sorted(names) == sorted(full)
        for stage in stages:
            for name, param in stage.named_parameters():
                assert torch.equal(param.detach(), full[name]), f"{source}: {name} differs from the full model"
        h = input_ids[:MICRO]
        for stage in stages:
            h = stage(h)
        got = stages[-1].loss(h, labels[:MICRO])
        assert torch.allclose(got, want, rtol=0, atol=1e-6), f"{source}: {got.item()} vs {want.item()}"


def test_chunked_loss_on_the_last_stage_matches_plain():
    stage = PhiPipelineStage(CONFIG, 0, 1, range(CONFIG.n_layer))
    input_ids, labels = _batches()[0]
    plain = stage.loss(stage(input_ids), labels)
    stage.loss_chunk_size = 24
    chunked_out = stage(input_ids)
    assert chunked_out.shape == (GLOBAL, SEQ, CONFIG.d_model)
    assert torch.allclose(stage.loss(chunked_out, labels), plain, rtol=1e-6)


def test_stage_rejects_bad_layers_and_loss_off_the_last_stage():
    with pytest.raises(ValueError, match="contiguous"):
        PhiPipelineStage(CONFIG, 0, 2, [0, 2])
    with pytest.raises(ValueError, match="not a stage"):
        PhiPipelineStage(CONFIG, 2, 2, [0])
    stage = PhiPipelineStage(CONFIG, 0, 2, [0, 1])
    with pytest.raises(RuntimeError, match="last stage"):
        stage.loss(torch.zeros(1, SEQ, CONFIG.vocab_size), torch.zeros(1, SEQ, dtype=torch.long))


@pytest.mark.parametrize(
    ("schedule", "pp", "virtual", "micro", "message"),
    [
        ("zb", 2, 1, 4, "must be one of"),
        ("interleaved", 2, 1, 4, "virtual_stages >= 2"),
        ("1f1b", 2, 2, 4, "needs parallel.pipeline_schedule=interleaved"),
        ("1f1b", 4, 1, 2, "at least parallel.pipeline_parallel=4 micro-batches"),
        ("interleaved", 4, 2, 6, "multiple of parallel.pipeline_parallel=4"),
    ],
)
def test_schedule_checks_name_the_option(schedule, pp, virtual, micro, message):
    with pytest.raises(ValueError, match=message):
        check_schedule(schedule, pp, virtual, micro)
    check_schedule("gpipe", 4, 1, 2)  # GPipe runs any number of micro-batches


def test_rank_layout_tp_adjacent_then_pp_then_dp():
    grid = rank_grid(8, tensor_parallel=2, pipeline_parallel=2)
    assert groups_along(grid, "tp") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert groups_along(grid, "pp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert groups_along(grid, "dp") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    megatron = rank_grid(16, tensor_parallel=2, pipeline_parallel=4, order="tp-dp-pp")
    # megatron/core/parallel_state.py's docstring example: 16 GPUs, TP 2, PP 4.
    assert groups_along(megatron, "pp") == [[0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14], [3, 7, 11, 15]]
    assert groups_along(megatron, "dp") == [[0, 2], [1, 3], [4, 6], [5, 7], [8, 10], [9, 11], [12, 14], [13, 15]]
    with pytest.raises(ValueError, match="does not divide the world size 6"):
        rank_grid(6, tensor_parallel=2, pipeline_parallel=2)
    with pytest.raises(ValueError, match="rank order"):
        rank_grid(4, 2, 2, order="pp-tp-dp")


@pytest.mark.parametrize("order", ["tp-pp-dp", "tp-dp-pp"])
@pytest.mark.parametrize(
    ("nodes", "per_node", "tp", "pp"),
    [(2, 8, 8, 2), (4, 8, 4, 4), (2, 4, 2, 2), (8, 8, 8, 8), (3, 8, 2, 3)],
)
def test_every_tp_group_lives_on_one_node(order, nodes, per_node, tp, pp):
    """Simulated nodes of consecutive global ranks: no TP group ever crosses a node; every rank is in exactly one
    group of each dim."""
    world = nodes * per_node
    grid = rank_grid(world, tp, pp, order)
    assert groups_spanning_nodes(grid, "tp", per_node) == []
    for dim, size in (("tp", tp), ("pp", pp), ("dp", world // (tp * pp))):
        groups = groups_along(grid, dim)
        assert all(len(g) == size for g in groups)
        assert sorted(r for g in groups for r in g) == list(range(world))


def test_launch_orders_put_pp_or_dp_across_nodes():
    """2 simulated nodes of 8 ranks, TP 2 x PP 2 x DP 4: our order keeps each pipeline on a node and sends the
    DP all-reduce between nodes; Megatron-core's keeps each stage's DP group on a node and sends activations."""
    ours = rank_grid(16, 2, 2, "tp-pp-dp")
    assert groups_spanning_nodes(ours, "pp", 8) == []
    assert groups_spanning_nodes(ours, "dp", 8) == groups_along(ours, "dp") == [[0, 4, 8, 12], [1, 5, 9, 13],
                                                                                 [2, 6, 10, 14], [3, 7, 11, 15]]
    megatron = rank_grid(16, 2, 2, "tp-dp-pp")
    assert groups_spanning_nodes(megatron, "dp", 8) == []
    assert groups_spanning_nodes(megatron, "pp", 8) == groups_along(megatron, "pp")
    assert groups_along(megatron, "pp")[0] == [0, 8]


# ----------------------------------------------------------------------------------------------------------------
# The training config refuses what cannot run with the reason, and the dry run models the pipeline


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        (["parallel.pipeline_parallel=2", "model.n_layer=4", "batch.micro_batch_size=2", "precision=fp16"],
         "fp16 with pipeline parallelism is not supported"),
        (["parallel.pipeline_parallel=4", "model.n_layer=4", "batch.micro_batch_size=8"],
         "fewer than the 4 pipeline stages"),
        (["parallel.pipeline_parallel=2", "model.n_layer=4", "batch.micro_batch_size=2",
          "parallel.pipeline_split=[1,2]"], "parallel.pipeline_split: [1, 2] sums to 3 blocks"),
        (["parallel.pipeline_parallel=2", "parallel.zero_stage=2"], "ZeRO-2 and ZeRO-3 are incompatible"),
        (["parallel.pipeline_parallel=2", "parallel.pipeline_schedule=interleaved"], "parallel.virtual_stages: the interleaved"),
        (["parallel.pipeline_parallel=2", "parallel.pipeline_schedule=interleaved", "parallel.virtual_stages=2",
          "model.n_layer=6", "batch.global_batch_size=32"], "n_layer=6 is not divisible"),
        (["parallel.pipeline_parallel=3"], "tensor_parallel x pipeline_parallel = 1 x 3 does not divide"),
        (["parallel.pipeline_schedule=zero-bubble"], "parallel.pipeline_schedule: must be one of"),
        (["parallel.virtual_stages=2"], "parallel.virtual_stages: 2 chunks per rank need"),
        (["parallel.pipeline_parallel=2", "data.document_mask=true"], "data.document_mask: not with pipeline"),
    ],
)
def test_config_refuses_pipeline_layouts_with_the_reason(overrides, names):
    from phi1.testing.hostile import assert_clear_error, python, run_bounded

    outcome = run_bounded(
        python("-m", "phi1.train", "--config", "configs/quickstart_pretrain.yaml", "--dry-run", "--world-size", "4",
               "--device", "cpu", *overrides),
        timeout_s=120,
    )
    assert_clear_error(outcome, names=names)


def test_dry_run_models_the_pipeline():
    """A layout that runs passes validation, and --dry-run prints its stages, bubble, P2P bytes and the memory of
    every pipeline rank, the first holding P micro-batches under 1F1B."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "phi1.train", "--config", "configs/quickstart_pretrain.yaml", "--dry-run",
         "--world-size", "8", "--device", "cuda", "parallel.pipeline_parallel=4", "parallel.tensor_parallel=2",
         "model.n_layer=8", "batch.micro_batch_size=2", "batch.global_batch_size=16"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "tensor parallel 2 x pipeline parallel 4 x data parallel 1" in out
    assert "blocks per stage [2, 2, 2, 2]" in out
    assert "bubble      27.3% of each step idle, (P-1)/(m+P-1) with P=4, m=8" in out
    assert "rank 0 4 in flight" in out and "rank 3 1 in flight" in out


# ----------------------------------------------------------------------------------------------------------------
# Planner formulas


def test_bubble_fraction_formulas():
    assert bubble_fraction(2, 4) == pytest.approx(1 / 5)
    assert bubble_fraction(4, 8, "1f1b") == pytest.approx(3 / 11)
    assert bubble_fraction(4, 8, "gpipe") == pytest.approx(3 / 11)
    assert bubble_fraction(4, 8, "interleaved", virtual_stages=2) == pytest.approx(3 / 19)
    assert bubble_fraction(1, 8) == 0.0
    with pytest.raises(ValueError, match="must be one of"):
        bubble_fraction(2, 4, "zb")


def test_in_flight_activations_per_rank():
    # 1F1B: rank r holds P - r micro-batches, the first rank P, whatever m >= P.
    assert [in_flight_chunks(r, 4, 8) for r in range(4)] == [4, 3, 2, 1]
    assert [in_flight_chunks(r, 4, 8, "gpipe") for r in range(4)] == [8] * 4
    # Interleaved, Megatron's count for the first rank: V P + P - 1 chunk micro-batches of L / (P V) layers,
    # i.e. P (1 + (P - 1) / (P V)) micro-batches of the rank's L / P layers.
    assert in_flight_chunks(0, 4, 8, "interleaved", 2) == 2 * 4 + 4 - 1
    assert in_flight_chunks(3, 4, 8, "interleaved", 2) == 5
    assert in_flight_chunks(0, 4, 4, "interleaved", 2) == 8  # capped at all V m chunk micro-batches


def _planner_layout(**changes):
    from phi1.planning.memory import Layout

    return Layout(**{"micro_batch_size": 2, "seq_len": 2048, "precision": "bf16", "gpu": True, **changes})


def test_stage_memory_first_stage_holds_p_micro_batches():
    from phi1.planning.memory import saved_bytes_per_layer

    config = get_preset("phi-1")
    layout = _planner_layout()
    per_layer = saved_bytes_per_layer(config, layout)
    stages = [stage_memory(config, layout, 4, r, micro_batches=8) for r in range(4)]
    assert [s.layers for s in stages] == [6, 6, 6, 6]
    assert [s.in_flight for s in stages] == [4, 3, 2, 1]
    for rank, stage in enumerate(stages):
        assert stage.activations == pytest.approx((4 - rank) * 6 * per_layer)
    assert stages[0].logits == 0 and stages[-1].logits > 0
    assert stages[0].weights > stages[1].weights  # the embedding
    assert stages[-1].weights > stages[1].weights  # the lm_head
    # torch's receive buffers: m activations in (not on the first rank) and m gradients in (not on the last).
    message = 2 * 2048 * config.d_model * 4
    assert [s.p2p_buffers for s in stages] == [8 * message, 16 * message, 16 * message, 8 * message]
    assert stages[0].total > stages[1].total > stages[2].total
    # Activation checkpointing keeps only the block inputs.
    checkpointed = stage_memory(config, _planner_layout(activation_checkpointing=True), 4, 0, micro_batches=8)
    assert checkpointed.activations < stages[0].activations / 4
    with pytest.raises(ValueError, match="virtual_stages >= 2"):
        stage_memory(config, layout, 4, 0, micro_batches=8, schedule="interleaved")


def test_p2p_bytes_per_step():
    config = get_preset("phi-1")
    layout = _planner_layout(precision="fp32", tensor_parallel=2, sequence_parallel=True, data_parallel=2)
    traffic = p2p_bytes_per_step(config, layout, pipeline_parallel=4, micro_batches=8)
    message = 2 * (2048 / 2) * config.d_model * 4  # a sequence shard under SP, fp32
    assert traffic.message == message
    assert traffic.per_rank == 2 * 8 * message  # a middle rank: m activations forward, m gradients backward
    assert traffic.total == 2 * 3 * 8 * message * 2 * 2  # 3 boundaries, both ways, every TP and DP replica
    interleaved = p2p_bytes_per_step(config, layout, pipeline_parallel=4, micro_batches=8, virtual_stages=2)
    assert interleaved.total == 2 * 7 * 8 * message * 4  # V = 2 doubles the boundaries (7 instead of 3)
    assert p2p_bytes_per_step(config, layout, 1, 8).total == 0


def test_stage_activation_checkpointing_gives_the_same_gradients():
    """Blocks recomputed in the backward (dropout on) give the gradients of a stage that keeps its activations."""
    from phi1.parallel.random import seed_everything

    config = CONFIG.replace(embd_dropout=0.1, attn_dropout=0.1, resid_dropout=0.1)
    input_ids, labels = _batches()[0]
    grads, saved = [], []
    for checkpointing in ("none", "full", "selective"):
        stage = PhiPipelineStage(config, 0, 1, range(config.n_layer))
        stage.train()
        stage.activation_checkpointing = checkpointing
        stage.activation_checkpointing_every = 2
        seed_everything(3)
        count = [0]

        def pack(tensor, count=count):
            count[0] += 1
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = stage.loss(stage(input_ids), labels)
        loss.backward()
        grads.append({name: p.grad for name, p in stage.named_parameters()})
        saved.append(count[0])
    assert saved[1] < saved[0] and saved[2] < saved[0], f"tensors saved for backward (none, full, selective): {saved}"
    for name, grad in grads[0].items():
        for mode, other in zip(("full", "selective"), grads[1:]):
            assert torch.allclose(other[name], grad, rtol=0, atol=1e-6), f"{mode}: {name}"


# ----------------------------------------------------------------------------------------------------------------
# The layout search and the step time include pipeline parallelism


def test_layout_search_includes_pipeline_parallelism():
    from phi1.planning.hardware import cluster
    from phi1.planning.memory import estimate_memory
    from phi1.planning.pipeline import rank_memory
    from phi1.planning.search import enumerate_plans

    config = get_preset("phi-1")
    plans = enumerate_plans(config, cluster("A100-80GB", 16), 256, 2048, "bf16", 0.5)
    piped = [plan for plan in plans if plan.layout.pipeline_parallel > 1]
    assert {plan.layout.pipeline_parallel for plan in piped} == {2, 4, 8, 16}
    for plan in piped:
        lay = plan.layout
        assert lay.zero_stage <= 1, "ZeRO-2/3 never combine with pipeline stages"
        assert plan.gradient_accumulation >= lay.pipeline_parallel, "1F1B needs at least P micro-batches"
        assert lay.tensor_parallel * lay.pipeline_parallel * lay.data_parallel == 16
        assert f"PP{lay.pipeline_parallel}" in plan.describe()
        # the estimate is the busiest pipeline rank's
        assert plan.memory.total == max(total for _, total in rank_memory(config, lay))
        assert estimate_memory(config, lay).total == plan.memory.total
        # the step stretches by the bubble: compute / (1 - (P-1)/(m+P-1))
        p, m = lay.pipeline_parallel, plan.gradient_accumulation
        assert plan.time.pipeline_bubble == pytest.approx(plan.time.compute * (p - 1) / m)
        assert plan.time.pipeline_comm > 0
    # Pipelines hold 1/P of the model's states: PP4 with DDP needs less than a quarter of the whole model's states.
    pp4 = next(plan for plan in piped if plan.layout.pipeline_parallel == 4 and plan.layout.zero_stage == 0
               and plan.layout.tensor_parallel == 1)
    whole = next(plan for plan in plans if plan.layout.pipeline_parallel == 1 and plan.layout.zero_stage == 0
                 and plan.layout.tensor_parallel == 1)
    assert pp4.memory.weights < whole.memory.weights / 3


# ----------------------------------------------------------------------------------------------------------------
# The trainer's ParallelState: groups from the DeviceMesh, laid out TP, then PP, then DP


def _state_groups_worker(rank: int, world_size: int, tp: int, pp: int) -> dict:
    import torch.distributed as dist

    from phi1.parallel.state import init_distributed

    state = init_distributed(tp, pipeline_parallel_size=pp)
    return {
        "coords": [state.dp_rank, state.pp_rank, state.tp_rank],
        "sizes": [state.dp_size, state.pp_size, state.tp_size],
        "tp": dist.get_process_group_ranks(state.tp_group),
        "pp": dist.get_process_group_ranks(state.pp_group),
        "dp": dist.get_process_group_ranks(state.dp_group),
        "mesh_dims": list(state.mesh.mesh_dim_names),
    }


@pytest.mark.slow
def test_parallel_state_groups_on_simulated_nodes():
    """8 processes as 2 simulated nodes of 4 ranks, TP 2 x PP 2 x DP 2: every rank's groups are the mesh's and
    match `rank_grid`; TP groups and (in this order) pipelines stay inside a node, DP crosses nodes."""
    results = run_on_gloo(_state_groups_worker, 8, 2, 2, timeout_s=600)
    grid = rank_grid(8, tensor_parallel=2, pipeline_parallel=2)
    per_node = 4
    for rank, result in enumerate(results):
        assert result["mesh_dims"] == ["dp", "pp", "tp"]
        assert result["sizes"] == [2, 2, 2]
        dp_rank, pp_rank, tp_rank = result["coords"]
        assert grid[dp_rank, pp_rank, tp_rank].item() == rank
        for dim in ("tp", "pp", "dp"):
            assert result[dim] in groups_along(grid, dim) and rank in result[dim]
        assert len({r // per_node for r in result["tp"]}) == 1, "a TP group never crosses a node"
        assert len({r // per_node for r in result["pp"]}) == 1
        assert len({r // per_node for r in result["dp"]}) == 2
