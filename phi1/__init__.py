"""phi1: Megatron-style distributed training that reproduces Microsoft's phi-1."""

__version__ = "0.1.0"
