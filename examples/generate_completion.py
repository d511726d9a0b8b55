#!/usr/bin/env python
"""Complete a prompt with any phi1 model path: a training run (its tokenizer is read from the checkpoint
itself), one iter_* checkpoint, or a phi1 / HuggingFace model directory.

    python examples/generate_completion.py --checkpoint runs/quickstart/finetune \\
        --prompt "def is_even(n):\\n    '''Return True if n is even.'''\\n"
"""

from __future__ import annotations

import argparse
import codecs
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from phi1.cli import run_cli  # noqa: E402
from phi1.core.generation import SamplingParams, generate  # noqa: E402
from phi1.loading import load_pretrained, load_tokenizer, resolve_model_path  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="generate_completion.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True,
                        help="run directory (its latest checkpoint), iter_* directory, or phi1 / HF model directory")
    parser.add_argument("--prompt", required=True, help="text to complete; \\n and \\t escapes are decoded")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--temperature", type=float, default=0.0)
    args = parser.parse_args(argv)

    source = resolve_model_path(args.checkpoint, what="--checkpoint")
    tokenizer = load_tokenizer(source, what="--checkpoint")
    model = load_pretrained(source, what="--checkpoint")
    model.eval()
    config = model.config
    if tokenizer.vocab_size > config.vocab_size:
        parser.error(f"--checkpoint {args.checkpoint}: its tokenizer has {tokenizer.vocab_size} tokens but the model's "
                     f"vocabulary has {config.vocab_size}")
    if args.max_new_tokens < 1:
        parser.error("--max-new-tokens must be >= 1")

    prompt = codecs.decode(args.prompt, "unicode_escape")
    prompt_ids = tokenizer.encode(prompt)
    if len(prompt_ids) + args.max_new_tokens > config.max_seq_len:
        parser.error(f"--max-new-tokens {args.max_new_tokens}: the prompt's {len(prompt_ids)} tokens plus it exceed the "
                     f"model's context of {config.max_seq_len} tokens; pass at most "
                     f"{max(config.max_seq_len - len(prompt_ids), 0)}")
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=0,
                            eos_token_id=tokenizer.eod, stop_strings=("\ndef ", "\nclass ", "\n\n\n", "\nif __name__"))
    with torch.no_grad():
        completion = generate(model, [prompt_ids], params, decode=tokenizer.decode,
                              vocab_size=tokenizer.vocab_size)[0]
    print(f"model {source.describe()} ({config.num_parameters():,} parameters)")
    print("----- prompt -----")
    print(prompt, end="")
    print("----- completion -----")
    print(completion.text)
    print(f"----- ({len(completion.token_ids)} tokens, finished by {completion.finish_reason}) -----")
    return 0


if __name__ == "__main__":
    run_cli(main, prog="generate_completion.py")
