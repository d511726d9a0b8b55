"""HumanEval generation throughput, batched against unbatched, and greedy pass@1 of the batched samples.

    # CPU, a random phi-1-tiny with a tokenizer trained on the HumanEval prompts (built under runs/):
    PYTHONPATH=. python benchmarks/bench_humaneval.py --preset phi-1-tiny --batch-sizes 1,16
    # GPU, phi-1-small (random weights unless --model names a trained directory):
    PYTHONPATH=. python benchmarks/bench_humaneval.py --preset phi-1-small --device cuda --dtype bfloat16

Generation time is measured alone (tokenize, generate, decode, stop strings; no execution); problems/s is
problems / that time. Every batch size generates the same greedy samples, so the script also reports how many
completions agree with those of the first batch size (fp reductions over differently padded batches may
flip a near-tied argmax). pass@1 comes from running the last batch size's samples in the sandbox.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

from phi1.eval.harness import GenerationConfig, generate_completions, score_samples, synchronize
from phi1.eval.sandbox import SandboxConfig
from phi1.eval.tasks import load_humaneval
from phi1.loading import check_vocab, load_model, load_tokenizer
from phi1.testing.toy_model import build_toy_model_dir


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model directory (default: a random --preset model built under runs/)")
    parser.add_argument("--preset", default="phi-1-tiny", help="preset of the random model when --model is absent")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--batch-sizes", default="1,16", help="comma-separated; 1 is the unbatched baseline")
    parser.add_argument("--limit", type=int, default=164, help="first N HumanEval problems")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-score", action="store_true", help="skip executing the samples")
    parser.add_argument("--workers", type=int, default=2, help="sandbox processes at once")
    parser.add_argument("--output", default="runs/bench_humaneval/result.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = args.model
    if model_dir is None:
        model_dir = os.path.join("runs", "bench_humaneval", args.preset)
        if not os.path.isfile(os.path.join(model_dir, "config.json")):
            print(f"building a random {args.preset} model with a trained tokenizer in {model_dir}", file=sys.stderr)
            build_toy_model_dir(model_dir, args.preset)
    model = load_model(model_dir, device=args.device, dtype=args.dtype)
    tokenizer = load_tokenizer(model_dir)
    check_vocab(model, tokenizer, model_dir)
    problems = load_humaneval()[: args.limit]
    device = torch.device(args.device)

    runs, reference = [], None
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        config = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=batch_size)
        synchronize(device)
        start = time.perf_counter()
        samples = generate_completions(model, tokenizer, problems, config, progress=False)
        synchronize(device)
        seconds = time.perf_counter() - start
        order = {p.task_id: i for i, p in enumerate(problems)}
        samples.sort(key=lambda s: order[s["task_id"]])
        texts = [s["completion"] for s in samples]
        reference = reference or texts
        tokens = sum(s["completion_tokens"] for s in samples)
        run = {"batch_size": batch_size, "seconds": round(seconds, 2),
               "problems_per_s": round(len(problems) / seconds, 3), "generated_tokens_per_s": round(tokens / seconds, 1),
               "generated_tokens": tokens, "same_as_first": sum(a == b for a, b in zip(texts, reference))}
        print(json.dumps(run), file=sys.stderr, flush=True)
        runs.append(run)

    result = {"model": model_dir, "preset": model.config.name, "parameters": sum(p.numel() for p in model.parameters()),
              "device": str(device), "dtype": args.dtype, "torch_threads": torch.get_num_threads(),
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus",
              "problems": len(problems), "max_new_tokens": args.max_new_tokens, "runs": runs}
    if len(runs) > 1:
        result["batched_speedup"] = round(runs[-1]["problems_per_s"] / runs[0]["problems_per_s"], 2)
    if not args.no_score:
        start = time.perf_counter()
        report, _ = score_samples(problems, samples, ks=(1,), sandbox=SandboxConfig(timeout_s=5.0),
                                  workers=args.workers, progress=False)
        result["pass@1"] = report.pass_at_k["pass@1"]
        result["execution_s"] = round(time.perf_counter() - start, 2)
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w") as handle:
        json.dump(result, handle, indent=2)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
