#!/usr/bin/env python
"""Complete a prompt with a phi1 training checkpoint (its tokenizer is read from the checkpoint itself).

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

from phi1.core.generation import SamplingParams, generate  # noqa: E402
from phi1.core.model import PhiForCausalLM  # noqa: E402
from phi1.core.pretrained import load_state_dict_into  # noqa: E402
from phi1.data.tokenizers import build_tokenizer  # noqa: E402
from phi1.training.checkpointing import (  # noqa: E402
    find_checkpoint,
    load_model_from_training_checkpoint,
    tokenizer_in_checkpoint,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="run directory (its latest checkpoint) or iter_ directory")
    parser.add_argument("--prompt", required=True, help="text to complete; \\n and \\t escapes are decoded")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--temperature", type=float, default=0.0)
    args = parser.parse_args(argv)

    found = find_checkpoint(args.checkpoint)
    if found is None:
        parser.error(f"--checkpoint {args.checkpoint}: no phi1 training checkpoint there")
    tokenizer_path = tokenizer_in_checkpoint(found)
    if tokenizer_path is None:
        parser.error(f"{found}: holds no tokenizer file")
    kind = "SentencePieceTokenizer" if tokenizer_path.suffix == ".model" else "HuggingFaceTokenizer"
    tokenizer = build_tokenizer(kind, tokenizer_path)
    config, weights = load_model_from_training_checkpoint(found)
    model = PhiForCausalLM(config)
    load_state_dict_into(model, weights, source=str(found))
    model.eval()

    prompt = codecs.decode(args.prompt, "unicode_escape")
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=0,
                            eos_token_id=tokenizer.eod, stop_strings=("\ndef ", "\nclass ", "\n\n\n", "\nif __name__"))
    with torch.no_grad():
        completion = generate(model, [tokenizer.encode(prompt)], params, decode=tokenizer.decode,
                              vocab_size=tokenizer.vocab_size)[0]
    print(f"checkpoint {found} ({config.num_parameters():,} parameters)")
    print("----- prompt -----")
    print(prompt, end="")
    print("----- completion -----")
    print(completion.text)
    print(f"----- ({len(completion.token_ids)} tokens, finished by {completion.finish_reason}) -----")
    return 0


if __name__ == "__main__":
    sys.exit(main())
