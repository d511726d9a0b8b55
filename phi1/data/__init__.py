"""Data: Megatron-compatible indexed datasets, packed GPT samples, tokenizers and the tokenizer sidecar."""

from phi1.data.sidecar import check_dataset_tokenizer
from phi1.data.tokenizers import detect_tokenizer_type

__all__ = ["check_dataset_tokenizer", "detect_tokenizer_type"]
