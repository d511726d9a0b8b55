#!/usr/bin/env python
"""Training throughput of one device: tokens/s, TFLOP/s, MFU, peak memory, attention kernel.

    python benchmarks/train_throughput.py --preset phi-1 --micro-batch 8 --seq-len 2048 --precision bf16 \
        --steps 20 --compare-hf
    python benchmarks/train_throughput.py --activation-checkpointing selective --compile --document-mask
    torchrun --nproc-per-node 2 benchmarks/train_throughput.py --fsdp     # FSDP2 over 2 processes (DDP without --fsdp)

Times N training steps (forward, backward, fused AdamW step) after warm-up. With --compare-hf it also runs
HuggingFace `PhiForCausalLM` (SDPA attention, the same weights, batch, precision and optimizer) in the same
process and prints both rows and the ratio. MFU counts model FLOPs as `6 N + 12 L d T` per token
(`ModelConfig.flops_per_token`; recomputation not counted) over the device's peak, looked up by its name.
`--activation-checkpointing none|full|selective` (with `--activation-checkpointing-every K` under full),
`--compile` (regional: each block; the first warm-up step's time is reported as compile time, apart from the
step time) and `--document-mask` (an end-of-document token every `--document-length` tokens, attention kept
inside each document) measure the issue-16 levers in one run each.
Under torchrun (N processes: gloo on CPU, NCCL on GPUs) the model is data parallel over them: torch DDP, or with
`--fsdp` FSDP2 (`phi1.parallel.fsdp`: fully_shard per block then the root, parameters gathered in the
--precision dtype, fp32 master weights and gradient reduction). Rank 0 prints one row: tokens/s of all ranks
together (each rank runs --micro-batch sequences per step) and the largest peak memory of any rank.
Runs on CPU too (small presets), so CI exercises it; CPU rows have no MFU (no peak is known for a CPU).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from phi1.core.config import PRESETS, get_preset  # noqa: E402
from phi1.core.model import PhiForCausalLM  # noqa: E402
from phi1.ops import MODES as FUSED_OPS_MODES  # noqa: E402
from phi1.ops import prepare as prepare_fused_ops  # noqa: E402
from phi1.training.metrics import device_name, mfu, peak_tflops  # noqa: E402
from phi1.training.precision import autocast  # noqa: E402

EOD_TOKEN_ID = 0
"""The end-of-document token of --document-mask's synthetic batches."""


@dataclass
class Row:
    system: str
    preset: str
    micro_batch: int
    seq_len: int
    precision: str
    activation_checkpointing: str
    """'none', 'full', 'full/K' (every K-th block) or 'selective'."""
    compile: bool
    compile_s: float | None
    """The first warm-up step's time with --compile (compiles the blocks); None without."""
    document_mask: bool
    fused_ops: bool
    """Whether csrc/fused_ops (bias + gelu, rotary on q/k/v) ran; False for HuggingFace."""
    attention: str
    tokens_per_second: float
    tflops_per_second: float
    mfu: float | None
    peak_memory_gib: float | None
    """CUDA: max allocated during the row's steps. CPU: growth of the peak resident set over the process's
    resident set before the model was built, only when the process runs one row (rows in one process cannot be
    told apart: their resident sets overlap); None otherwise."""
    step_ms: float
    data_parallel: str = "1 process"
    """'1 process', or 'DDP xN' / 'FSDP2 xN' under torchrun (tokens/s then counts every rank's tokens)."""


def attention_kernel_name(model: PhiForCausalLM, device: torch.device, dtype: torch.dtype) -> str:
    """Our backend, and for SDPA on CUDA whether its flash kernel accepts these shapes (checked by running it)."""
    backend = model.attention_backend or "?"
    if backend != "sdpa" or device.type != "cuda":
        return backend
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1, model.config.n_head, 128, model.config.head_dim, device=device, dtype=dtype)
    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
        return "sdpa (flash kernel)"
    except RuntimeError:
        return "sdpa (flash kernel unavailable: efficient/math)"


def _reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def resident_gib() -> float:
    """This process's resident set now (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def peak_resident_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _peak(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def time_steps(model, step_fn, optimizer, batches, args, device) -> tuple[float, float]:
    """(seconds per step averaged over args.steps after args.warmup untimed steps, seconds of the first
    warm-up step: the compile time under --compile)."""

    def one(tokens):
        optimizer.zero_grad(set_to_none=True)
        with autocast(args.precision, device):
            loss = step_fn(tokens)
        loss.backward()
        optimizer.step()

    first = 0.0
    for i in range(args.warmup):
        start = time.perf_counter()
        one(batches[i % len(batches)])
        if i == 0:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            first = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for i in range(args.steps):
        one(batches[i % len(batches)])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / args.steps, first


def make_optimizer(model, device):
    return torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-7, weight_decay=0.1,
                             fused=device.type == "cuda")


def run_ours(config, args, device, batches, state=None) -> tuple[Row, dict]:
    """Our model; with `state` (a ParallelState of N > 1 processes) wrapped in DDP, or sharded by FSDP2 (--fsdp)."""
    _reset_peak(device)
    model = PhiForCausalLM(config, init_seed=0).to(device)
    model.activation_checkpointing = args.activation_checkpointing
    model.activation_checkpointing_every = args.activation_checkpointing_every
    model.loss_chunk_size = args.loss_chunk_size
    if args.document_mask:
        model.document_eod_token_id = EOD_TOKEN_ID
    # Under torch.compile the kernels stand aside (phi1.ops.fused) and the compiler fuses the references itself.
    model.fused_ops = prepare_fused_ops(device, args.fused_ops) and not args.compile
    model.train()
    block_forward = None
    if args.compile:
        model.compile_blocks()
        block_forward = "compiled blocks"
    trained = model
    if state is not None and args.fsdp:
        from phi1.parallel.fsdp import shard_model

        shard_model(model, state, args.precision)
    elif state is not None:
        from phi1.parallel.data_parallel import wrap_data_parallel

        trained = wrap_data_parallel(model, state)
    optimizer = make_optimizer(model, device)

    def step(tokens):
        return trained(tokens[:, :-1], labels=tokens[:, 1:]).loss

    seconds, first = time_steps(model, step, optimizer, batches, args, device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision, torch.float32)
    attention = attention_kernel_name(model, device, dtype) + (f", {block_forward}" if block_forward else "")
    row = _row("phi1", config, args, device, seconds, _peak(device), attention, model.fused_ops)
    row.compile_s = first if args.compile else None
    if state is not None:
        row.data_parallel = f"{'FSDP2' if args.fsdp else 'DDP'} x{state.world_size}"
        row.tokens_per_second *= state.world_size
        row.tflops_per_second *= state.world_size
        return row, {}
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return row, weights


def run_hf(config, args, device, batches, phi1_state) -> Row:
    import transformers

    from phi1.core.hf_interop import config_to_hf, state_dict_to_hf

    _reset_peak(device)
    hf_values = {k: v for k, v in config_to_hf(config).items() if k not in ("architectures", "torch_dtype")}
    hf_config = transformers.PhiConfig(**hf_values)
    hf_config._attn_implementation = "sdpa"
    model = transformers.PhiForCausalLM(hf_config)
    model.load_state_dict(state_dict_to_hf(phi1_state, config))
    del phi1_state  # with --hf-only, the last reference: our weights leave before HF's memory is measured
    model = model.to(device).train()
    if args.activation_checkpointing != "none":  # HF has whole-layer checkpointing only
        model.gradient_checkpointing_enable()
    optimizer = make_optimizer(model, device)

    def step(tokens):
        # HF shifts labels inside; give it the same T input positions as ours.
        return model(input_ids=tokens[:, :-1], labels=tokens[:, :-1]).loss

    seconds, _ = time_steps(model, step, optimizer, batches, args, device)
    return _row("HF PhiForCausalLM", config, args, device, seconds, _peak(device), "sdpa (transformers)", False)


def _row(system, config, args, device, seconds, peak_gib, attention, fused_ops) -> Row:
    tokens_per_second = args.micro_batch * args.seq_len / seconds
    flops_per_token = config.flops_per_token(args.seq_len)
    peak = peak_tflops(device_name(device), args.precision)
    return Row(
        system=system,
        preset=config.name,
        micro_batch=args.micro_batch,
        seq_len=args.seq_len,
        precision=args.precision,
        activation_checkpointing=(f"full/{args.activation_checkpointing_every}"
                                  if args.activation_checkpointing == "full" and args.activation_checkpointing_every > 1
                                  else args.activation_checkpointing),
        compile=args.compile,
        compile_s=None,
        document_mask=args.document_mask,
        fused_ops=fused_ops,
        attention=attention,
        tokens_per_second=tokens_per_second,
        tflops_per_second=flops_per_token * tokens_per_second / 1e12,
        mfu=mfu(flops_per_token, tokens_per_second, 1, peak),
        peak_memory_gib=peak_gib,
        step_ms=seconds * 1e3,
    )


def print_table(rows: list[Row], device: torch.device) -> None:
    print(f"device: {device_name(device)}")
    header = (f"{'system':<20} {'parallel':<10} {'preset':<12} {'mb':>3} {'seq':>5} {'prec':>5} {'ckpt':>9} {'fused':>5} {'docs':>5} "
              f"{'tokens/s':>11} {'TFLOP/s':>8} {'MFU':>7} {'peak GiB':>9} {'step ms':>9} {'compile s':>9}  attention")
    print(header)
    for r in rows:
        m = f"{100 * r.mfu:.1f}%" if r.mfu is not None else "n/a"
        mem = f"{r.peak_memory_gib:.2f}" if r.peak_memory_gib is not None else "n/a"
        compiled = f"{r.compile_s:.1f}" if r.compile_s is not None else "-"
        print(f"{r.system:<20} {r.data_parallel:<10} {r.preset:<12} {r.micro_batch:>3} {r.seq_len:>5} {r.precision:>5} {r.activation_checkpointing:>9} "
              f"{str(r.fused_ops):>5} {str(r.document_mask):>5} {r.tokens_per_second:>11.1f} {r.tflops_per_second:>8.2f} "
              f"{m:>7} {mem:>9} {r.step_ms:>9.1f} {compiled:>9}  {r.attention}")
    if len(rows) == 2:
        print(f"ratio phi1 / HF tokens/s: {rows[0].tokens_per_second / rows[1].tokens_per_second:.2f}x")


def _max_over_ranks(value: float | None, device: torch.device) -> float | None:
    """The largest of every rank's `value` (a collective: every rank calls it)."""
    import torch.distributed as dist

    if value is None:
        return None
    tensor = torch.tensor(value, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="phi-1-tiny", choices=sorted(PRESETS))
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=None, help="default: the preset's max_seq_len")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=None,
                        help="autocast precision over fp32 weights (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--attention-backend", default="auto", choices=("auto", "flash", "sdpa", "math"))
    parser.add_argument("--activation-checkpointing", nargs="?", const="full", default="none",
                        choices=("none", "full", "selective"),
                        help="none, full (the flag alone) or selective (matmul and attention outputs kept)")
    parser.add_argument("--activation-checkpointing-every", type=int, default=1,
                        help="under full: checkpoint every K-th block only")
    parser.add_argument("--document-mask", action="store_true",
                        help="an end-of-document token every --document-length tokens; attention inside documents")
    parser.add_argument("--document-length", type=int, default=None, help="default: a quarter of --seq-len")
    parser.add_argument("--loss-chunk-size", type=int, default=0, help="chunked lm_head + loss (0: off)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile each block; the first warm-up step is reported as compile time")
    parser.add_argument("--fused-ops", choices=FUSED_OPS_MODES, default="auto",
                        help="csrc/fused_ops: auto = on CUDA when they build (see python -m phi1.ops)")
    parser.add_argument("--compare-hf", action="store_true", help="also run HuggingFace PhiForCausalLM")
    parser.add_argument("--hf-only", action="store_true", help="run only HuggingFace PhiForCausalLM (its memory alone)")
    parser.add_argument("--memory-limit-gib", type=float, default=None,
                        help="CUDA: cap this process's memory (torch.cuda.set_per_process_memory_fraction), e.g. 80 "
                             "to measure an 80 GB GPU's fit on a larger one")
    parser.add_argument("--json-out", type=Path, default=None, help="write the rows as JSON here")
    parser.add_argument("--fsdp", action="store_true",
                        help="under torchrun: shard with FSDP2 over the processes instead of DDP")
    args = parser.parse_args(argv)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if args.fsdp and world_size < 2:
        parser.error("--fsdp shards over data-parallel processes: launch with torchrun --nproc-per-node N (N >= 2)")
    if world_size > 1 and (args.compare_hf or args.hf_only):
        parser.error("--compare-hf / --hf-only run in one process; launch without torchrun")

    state = None
    if world_size > 1:
        from phi1.parallel.state import init_distributed

        state = init_distributed(1)
        device = state.device
    else:
        device = torch.device(args.device)
    args.precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    config = get_preset(args.preset, attention_backend=args.attention_backend)
    args.seq_len = args.seq_len or config.max_seq_len
    if args.seq_len > config.max_seq_len:
        parser.error(f"--seq-len {args.seq_len} exceeds the preset's max_seq_len {config.max_seq_len}")
    if args.activation_checkpointing_every < 1:
        parser.error(f"--activation-checkpointing-every must be at least 1, got {args.activation_checkpointing_every}")
    if args.compile and args.activation_checkpointing == "selective":
        parser.error("--compile with --activation-checkpointing selective is not supported (see validate_config)")
    if args.compile and args.warmup < 1:
        parser.error("--compile needs --warmup >= 1: the first warm-up step compiles")
    generator = torch.Generator().manual_seed(state.rank if state is not None else 0)
    # Ids from 1 up: 0 is the end-of-document token of --document-mask, placed only where documents end.
    batches = [torch.randint(1, config.vocab_size, (args.micro_batch, args.seq_len + 1), generator=generator).to(device)
               for _ in range(2)]
    if args.document_mask:
        length = args.document_length or max(2, args.seq_len // 4)
        if not 1 <= length <= args.seq_len:
            parser.error(f"--document-length must be between 1 and --seq-len {args.seq_len}, got {length}")
        for tokens in batches:
            tokens[:, length - 1 :: length] = EOD_TOKEN_ID

    if args.memory_limit_gib is not None and device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_limit_gib * 2**30 / total), device)
    if args.hf_only or args.compare_hf:
        import transformers  # noqa: F401  (imported before the baseline below: its import is not HF's memory)
    resident_before = resident_gib() if device.type == "cpu" and sys.platform == "linux" else None
    rows = []
    if args.hf_only:
        # The weights come from our init and are handed over without a name here, so run_hf can free them
        # before it measures HF's memory.
        rows.append(run_hf(config, args, device, batches, PhiForCausalLM(config, init_seed=0).state_dict()))
    else:
        ours, weights = run_ours(config, args, device, batches, state)
        rows.append(ours)
        if args.compare_hf:
            rows.append(run_hf(config, args, device, batches, weights))
    if resident_before is not None and len(rows) == 1:
        rows[0].peak_memory_gib = peak_resident_gib() - resident_before
    if state is not None:
        from phi1.parallel.state import destroy_distributed

        rows[0].peak_memory_gib = _max_over_ranks(rows[0].peak_memory_gib, device)
        destroy_distributed()
        if state.rank != 0:
            return 0
    print_table(rows, device)
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps({"device": device_name(device), "rows": [asdict(r) for r in rows]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
