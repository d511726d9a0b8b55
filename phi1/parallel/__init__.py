"""Parallelism for phi1, one idea per module.

- `state`: process groups (TP ranks adjacent) and the `ParallelState` passed to everything below.
- `mappings`, `layers`, `cross_entropy`, `random`: tensor / sequence parallelism inside the model.
- `data_parallel`, `zero`: DDP and DeepSpeed ZeRO 1/2/3 over the DP group.
- `grads`, `optim`: sequence-parallel gradient reduction, global-norm clipping, weight-decay groups.
- `checkpoint`: one safetensors file per TP rank, loadable and exportable at any TP size.
- `distributed_checkpoint`: torch DCP checkpoints over a (dp, pp, tp) DeviceMesh, loadable at any layout.
- `spawn`: run a function on N local gloo processes (tests, benchmarks).
"""
