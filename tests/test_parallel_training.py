"""10 training steps at TP = 2 x DP = 2 (4 gloo processes) against one process with the same global batch, and
the TP-resharding round trip TP 2 -> 1 -> 4 (with an HF export), in one spawn. The TP x DP runs: DDP, DDP with
sequence parallelism, ZeRO-1, and ZeRO-3 with sequence parallelism.

The reference runs in the test process: plain model, torch's own `clip_grad_norm_`, AdamW with the same
parameter groups. The parallel run uses DDP over the DP group, the sequence-parallel gradient all-reduce and
phi1's global-norm clipping. Clipping is set low enough to act on every step.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from phi1.core.config import get_preset
from phi1.core.model import PhiForCausalLM
from phi1.loading import export_pretrained, load_model_shards, load_pretrained, load_resharded
from phi1.parallel.checkpoint import save_model_shard
from phi1.parallel.data_parallel import wrap_data_parallel
from phi1.parallel.grads import allreduce_sequence_parallel_grads, clip_grad_norm_
from phi1.parallel.optim import param_groups
from phi1.parallel.state import ParallelState, init_distributed
from phi1.testing.runs import counting_batches, one_process_reference
from phi1.testing.spawn import run_on_gloo

STEPS, GLOBAL_BATCH, SEQ = 10, 4, 32
LR, WEIGHT_DECAY, MAX_NORM = 3e-3, 0.1, 0.5
# AdamW divides each gradient by its own running RMS plus eps: with torch's eps of 1e-8, round-off in a gradient that
# is (almost) zero in exact arithmetic, such as an embedding row's at a step where its token barely counts, becomes
# a step of up to lr, so the final weights of two reduction orders differed by up to 2e-5 in a fresh environment.
# eps = 1e-6 damps that round-off 100 times and leaves real gradients (1e-4 and up) as they were.
EPS = 1e-6
TOL = 1e-5


def _batches(vocab: int) -> torch.Tensor:
    return counting_batches(vocab, STEPS, GLOBAL_BATCH, SEQ)


def _optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups(model, WEIGHT_DECAY), lr=LR, eps=EPS, foreach=False)


def reference_losses() -> tuple[list[float], list[float]]:
    """Losses and pre-clip gradient norms of one process over the whole global batch."""
    losses, norms, _ = one_process_reference(_optimizer, MAX_NORM, steps=STEPS, global_batch=GLOBAL_BATCH,
                                             seq_len=SEQ)
    return losses, norms


def _train(state: ParallelState, sequence_parallel: bool) -> tuple[list[float], list[float], torch.nn.Module]:
    model = PhiForCausalLM(get_preset("phi-1-nano"), tp_group=state.tp_group, sequence_parallel=sequence_parallel)
    ddp_model = wrap_data_parallel(model, state, bucket_cap_mb=0.05)  # several buckets even for this model
    optimizer = _optimizer(model)
    micro = GLOBAL_BATCH // state.dp_size
    losses, norms = [], []
    for batch in _batches(model.config.vocab_size):
        rows = batch[state.dp_rank * micro : (state.dp_rank + 1) * micro]
        loss = ddp_model(rows[:, :-1], labels=rows[:, 1:]).loss
        loss.backward()
        allreduce_sequence_parallel_grads(ddp_model, state)
        norms.append(clip_grad_norm_(ddp_model, MAX_NORM, state))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        reported = loss.detach().clone()
        dist.all_reduce(reported, group=state.dp_group)  # equal token counts per replica: mean of means
        losses.append(reported.item() / state.dp_size)
    return losses, norms, model


def _train_zero(state: ParallelState, stage: int, sequence_parallel: bool, save_to: Path | None = None) -> list[float]:
    from phi1.parallel.zero import deepspeed_config, initialize_zero

    model = PhiForCausalLM(get_preset("phi-1-nano"), tp_group=state.tp_group, sequence_parallel=sequence_parallel)
    micro = GLOBAL_BATCH // state.dp_size
    config = deepspeed_config(
        zero_stage=stage, micro_batch_size=micro, grad_accum_steps=1, dp_size=state.dp_size, lr=LR,
        betas=(0.9, 0.999), eps=EPS, weight_decay=WEIGHT_DECAY, grad_clip=MAX_NORM, precision="fp32",
    )
    engine = initialize_zero(model, config, state)
    losses = []
    for batch in _batches(model.config.vocab_size):
        rows = batch[state.dp_rank * micro : (state.dp_rank + 1) * micro]
        loss = engine(rows[:, :-1], labels=rows[:, 1:]).loss
        engine.backward(loss)
        engine.step()
        reported = loss.detach().clone()
        dist.all_reduce(reported, group=state.dp_group)
        losses.append(reported.item() / state.dp_size)
    if save_to is not None:
        save_model_shard(engine, save_to, state)  # under ZeRO-3 the DP slices are gathered for the save
    engine.destroy()
    return losses


def _reshard_round_trip(state: ParallelState, model: PhiForCausalLM, root: Path) -> dict:
    """TP 2 -> 1 -> 4 through shard files; returns how the merged tensors and logits compare."""
    config = model.config
    save_model_shard(model, root / "tp2", state)
    if state.rank == 0:
        single = ParallelState(0, 1, 0, 1, 0, 1, 0, None, None, torch.device("cpu"))
        tp1_model = PhiForCausalLM(config, init_seed=999)  # other weights, so loading must overwrite them all
        load_resharded(tp1_model, root / "tp2")
        save_model_shard(tp1_model, root / "tp1", single)
    dist.barrier()

    world = dist.new_group(list(range(state.world_size)))
    tp4_model = PhiForCausalLM(config, tp_group=world, init_seed=999)
    load_resharded(tp4_model, root / "tp1")
    rank = dist.get_rank()
    tp4_state = ParallelState(rank, state.world_size, rank, state.world_size, rank, 1, 0, world, None, state.device)
    save_model_shard(tp4_model, root / "tp4", tp4_state)
    ids = _batches(config.vocab_size)[0, :, :-1]
    with torch.no_grad():
        tp4_logits = tp4_model(ids).logits

    result: dict = {}
    if state.rank == 0:
        merged = {size: load_model_shards(root / size) for size in ("tp2", "tp1", "tp4")}
        result["identical"] = all(
            merged["tp2"].keys() == other.keys() and all(torch.equal(merged["tp2"][k], other[k]) for k in other)
            for other in (merged["tp1"], merged["tp4"])
        )
        result["n_tensors"] = len(merged["tp4"])
        zero3 = load_model_shards(root / "zero3")  # trained by ZeRO-3 on the same batches as the DDP model
        result["zero3_weights_err"] = max((zero3[k] - merged["tp2"][k]).abs().max().item() for k in zero3)
        export_pretrained(root / "tp4", root / "hf", fmt="hf")
        hf_model = load_pretrained(root / "hf")
        result["hf_identical"] = all(torch.equal(p, merged["tp2"][n]) for n, p in hf_model.named_parameters())
        with torch.no_grad():
            result["tp4_logits_err"] = (tp4_logits - hf_model(ids).logits).abs().max().item()
    dist.barrier()
    return result


def _training_worker(rank: int, world_size: int, root: str) -> dict:
    state = init_distributed(tensor_parallel_size=2)
    assert (state.tp_size, state.dp_size) == (2, 2)
    losses, norms, model = _train(state, sequence_parallel=False)
    sp_losses, sp_norms, _ = _train(state, sequence_parallel=True)
    zero1_losses = _train_zero(state, stage=1, sequence_parallel=False)
    zero3_sp_losses = _train_zero(state, stage=3, sequence_parallel=True, save_to=Path(root) / "zero3")
    reshard = _reshard_round_trip(state, model, Path(root))
    return {
        "losses": losses, "norms": norms, "sp_losses": sp_losses, "sp_norms": sp_norms,
        "zero1_losses": zero1_losses, "zero3_sp_losses": zero3_sp_losses, **reshard,
    }


@pytest.mark.slow
def test_tp2_dp2_training_matches_one_process_and_reshards():
    ref_losses, ref_norms = reference_losses()
    assert min(ref_norms) > MAX_NORM  # clipping acted on every step
    with tempfile.TemporaryDirectory(prefix="phi1-reshard-") as root:
        results = run_on_gloo(_training_worker, 4, root, timeout_s=180)
    for rank, result in enumerate(results):
        for key, want in (
            ("losses", ref_losses), ("sp_losses", ref_losses), ("norms", ref_norms), ("sp_norms", ref_norms),
            ("zero1_losses", ref_losses), ("zero3_sp_losses", ref_losses),
        ):
            err = max(abs(a - b) for a, b in zip(result[key], want))
            assert err <= TOL, f"rank {rank} {key}: max difference {err:.3e} from one process ({result[key]} vs {want})"
    assert ref_losses[-1] < ref_losses[0]  # it trained
    main = results[0]
    assert main["n_tensors"] == len(dict(PhiForCausalLM(get_preset("phi-1-nano")).named_parameters()))
    assert main["identical"], "TP 2 -> 1 -> 4 resharding changed some tensor"
    assert main["hf_identical"], "the HF export of the TP=4 shards does not load back to the same tensors"
    assert main["tp4_logits_err"] <= TOL
    assert main["zero3_weights_err"] <= TOL, "ZeRO-3 checkpoint differs from the DDP-trained weights"
