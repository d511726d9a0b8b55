"""Planning a run before renting the GPUs: memory per GPU, step time, and the best parallel layouts.

- `memory`: the one memory model (weights, gradients, optimizer states, activations, logits, buffers), used by
  `tools/plan.py` and by `python -m phi1.train --dry-run`;
- `hardware`: device peaks (PEAK_TFLOPS, also used for MFU in training), GPU kinds (memory, HBM bandwidth)
  and links;
- `timing`: step time from compute at a stated MFU plus ring-collective communication;
- `search`: every layout choice for a model, a GPU kind and count, best first.
"""
