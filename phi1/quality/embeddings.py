"""Code embeddings for the quality classifier: from a phi1 checkpoint, or from any `transformers` model directory.

- phi1 (and HuggingFace phi) directories: phi1's own model, final LayerNorm states.
- Other transformers directories (config.json with a `model_type`): `AutoModel`, last hidden states.
  Encoders (BERT/RoBERTa-style, CodeBERT, StarEncoder) and the encoder half of encoder-decoders (T5/CodeT5)
  are mean-pooled over real tokens; decoders (CodeGen, GPT-2, phi: the paper's choice) are mean- or
  last-token-pooled. Weights are read with `trust_remote_code=False` and `local_files_only=True`: a model
  directory never runs code and never reaches the hub.

`load_embedder` picks the backend; every embedder has `embed(texts) -> (N, d) float32`, batched by similar
length (little padding), on the GPU when there is one.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch


def checkpoint_fingerprint(model_dir: str | os.PathLike) -> str:
    """sha256 over the config and weight files of the model `model_dir` names: a classifier records which embedder
    it needs.

    A training run directory (or its `latest`) is resolved to the checkpoint it points at first, so two runs, or
    one run at two checkpoints, never share a fingerprint.

    Raises:
        ValueError: the path is no model, or its directory holds no config or weight file to hash.
    """
    from phi1.loading import resolve_model_path

    directory = Path(model_dir)
    if not (directory / "config.json").is_file():  # a run or iter_* directory: the checkpoint it names
        directory = resolve_model_path(model_dir, what="--embedding-model", verify=False).directory
    digest = hashlib.sha256()
    names = sorted(n for n in os.listdir(directory)
                   if n.endswith((".json", ".safetensors", ".model", ".txt", ".bin", ".distcp", ".metadata"))
                   and os.path.isfile(os.path.join(directory, n)))
    if not any(n.endswith((".safetensors", ".bin", ".distcp")) for n in names):
        raise ValueError(f"--embedding-model {model_dir}: {directory} holds no weight file to fingerprint")
    for name in names:
        digest.update(name.encode())
        with open(os.path.join(directory, name), "rb") as handle:
            while block := handle.read(8 << 20):
                digest.update(block)
    return digest.hexdigest()


BACKENDS = ("auto", "phi1", "transformers")
POOLINGS = ("mean", "last")


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'; anything else unchanged."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def detect_backend(model_dir: str | os.PathLike) -> str:
    """'phi1' for phi1-format directories, HF phi directories and training runs; 'transformers' for any other
    directory whose config.json names a `model_type`."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        return "phi1"  # a training run or checkpoint directory: phi1's loader knows them
    try:
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not readable JSON ({error})") from None
    if not isinstance(config, dict) or config.get("format") == "phi1" or config.get("model_type") in (None, "phi"):
        return "phi1"
    return "transformers"


def _mean_or_last(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, d) pooled states of right-padded (B, T, d) `hidden` with (B, T) `mask`."""
    if pooling == "last":
        last = mask.sum(dim=1) - 1  # right padding: the last real token
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last.to(hidden.device)]
    weights = mask.to(hidden.device, hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1)


def _batched(token_lists: list[list[int]], batch_size: int, pad_id: int, dim: int, forward, pooling: str) -> np.ndarray:
    """Pool `forward(input_ids, mask) -> (B, T, d)` over batches of similar length, in the input order."""
    result = np.zeros((len(token_lists), dim), dtype=np.float32)
    # Similar lengths share a batch: little padding, so little wasted compute.
    order = sorted(range(len(token_lists)), key=lambda i: len(token_lists[i]))
    for begin in range(0, len(order), batch_size):
        rows = order[begin: begin + batch_size]
        longest = max(len(token_lists[i]) for i in rows)
        input_ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for slot, i in enumerate(rows):
            ids = token_lists[i]
            input_ids[slot, : len(ids)] = torch.tensor(ids)
            mask[slot, : len(ids)] = 1
        hidden = forward(input_ids, mask)
        result[rows] = _mean_or_last(hidden, mask.to(hidden.device), pooling).float().cpu().numpy()
    return result


def _normalised(result: np.ndarray) -> np.ndarray:
    return result / np.maximum(np.linalg.norm(result, axis=1, keepdims=True), 1e-12)


def load_embedder(model_dir: str | os.PathLike, backend: str = "auto", pooling: str = "mean",
                  tokenizer_type: str | None = None, tokenizer_model: str | None = None, batch_size: int = 16,
                  max_tokens: int | None = None, device: str = "auto", threads: int | None = None):
    """A CodeEmbedder (phi1) or TransformersEmbedder for `model_dir`.

    Raises:
        ValueError: an unknown backend or pooling, last-token pooling of an encoder, or an unreadable directory.
    """
    if backend not in BACKENDS:
        raise ValueError(f"--embedder {backend!r}: choose one of {', '.join(BACKENDS)}")
    if pooling not in POOLINGS:
        raise ValueError(f"--pooling {pooling!r}: choose one of {', '.join(POOLINGS)}")
    if not os.path.isdir(model_dir):
        raise ValueError(f"--embedding-model {model_dir}: not a directory")
    if backend == "auto":
        backend = detect_backend(model_dir)
    if backend == "phi1":
        return CodeEmbedder(model_dir, tokenizer_type, tokenizer_model, batch_size=batch_size, max_tokens=max_tokens,
                            device=resolve_device(device), threads=threads, pooling=pooling)
    if tokenizer_type or tokenizer_model:
        raise ValueError(f"--tokenizer-type/--tokenizer-model: a transformers embedder ({model_dir}) uses the "
                         "tokenizer saved in its directory; leave them out")
    return TransformersEmbedder(model_dir, pooling=pooling, batch_size=batch_size, max_tokens=max_tokens,
                                device=resolve_device(device), threads=threads)


class TransformersEmbedder:
    """Batched pooled last hidden states of a `transformers` model directory (AutoModel + AutoTokenizer).

    Args:
        model_dir: a directory saved with `save_pretrained` (config.json, weights, tokenizer files).
        pooling: 'mean' over real tokens, or 'last' (the last real token; decoders only, where it has seen
            the whole text).
        max_tokens: texts are cut to this many tokens (default and cap: the model's position limit).
    Raises:
        ValueError: the directory cannot be read as a transformers model with a tokenizer, or 'last' pooling
            was asked of an encoder.
    """

    backend = "transformers"

    def __init__(self, model_dir: str | os.PathLike, pooling: str = "mean", batch_size: int = 16,
                 max_tokens: int | None = None, device: str = "cpu", threads: int | None = None) -> None:
        import transformers
        from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

        if threads is not None:
            torch.set_num_threads(threads)
        self.model_dir = os.fspath(model_dir)
        options = {"local_files_only": True, "trust_remote_code": False}
        try:
            config = transformers.AutoConfig.from_pretrained(self.model_dir, **options)
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(self.model_dir, **options)
            model = transformers.AutoModel.from_pretrained(self.model_dir, dtype=torch.float32, **options)
        except (OSError, ValueError, KeyError) as error:
            first = " ".join(str(error).split())[:300]
            raise ValueError(f"{self.model_dir}: not a transformers model directory with its tokenizer ({first})") \
                from None
        if config.is_encoder_decoder:
            self.kind, model = "encoder", model.get_encoder()  # T5/CodeT5: embed with the encoder half
        else:
            self.kind = "encoder" if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES else "decoder"
        if pooling == "last" and self.kind == "encoder":
            raise ValueError(f"--pooling last: {self.model_dir} is an encoder ({config.model_type}), whose tokens all "
                             "see the whole text; use --pooling mean")
        self.architecture = config.model_type
        self.model = model.to(device).eval()
        self.pooling = pooling
        self.batch_size = batch_size
        self.device = device
        self.max_tokens = min(max_tokens or 512, self._position_limit(config))
        self.dim = int(config.hidden_size if hasattr(config, "hidden_size") else config.d_model)
        self.pad_id = next((i for i in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id) if i is not None), 0)

    def _position_limit(self, config) -> int:
        limits = [v for v in (getattr(config, name, None) for name in ("max_position_embeddings", "n_positions"))
                  if isinstance(v, int) and v > 0]
        if "roberta" in config.model_type and limits:
            # RoBERTa positions start after the padding index: pad_token_id + 1 slots are never used by text.
            limits = [limits[0] - (config.pad_token_id or 0) - 1]
        model_max = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(model_max, int) and 0 < model_max < 1_000_000:
            limits.append(model_max)
        return min(limits) if limits else 512

    def describe(self) -> dict:
        """What the classifier header records about this embedder."""
        return {"backend": self.backend, "architecture": self.architecture, "kind": self.kind,
                "pooling": self.pooling, "max_tokens": self.max_tokens}

    @torch.no_grad()
    def embed(self, texts: list[str], normalise: bool = False) -> np.ndarray:
        """(len(texts), d) float32 pooled states; rows of unit length when `normalise`.

        An empty text is embedded from the end-of-sequence (or padding) token alone.
        """
        encoded = self.tokenizer(list(texts), truncation=True, max_length=self.max_tokens)["input_ids"]
        token_lists = [ids or [self.pad_id] for ids in encoded]

        def forward(input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            output = self.model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device))
            return output.last_hidden_state

        result = _batched(token_lists, self.batch_size, self.pad_id, self.dim, forward, self.pooling)
        return _normalised(result) if normalise else result


class CodeEmbedder:
    """Batched pooled final-LayerNorm states of a phi1 (or HF phi) model directory.

    Args:
        model_dir: any model path `phi1.loading` accepts (phi1 / HF directory, training run, iter_* checkpoint).
        tokenizer_type, tokenizer_model: the tokenizer, when the directory does not hold one.
        batch_size: texts per forward pass.
        max_tokens: texts are cut to this many tokens (default: the model's max_seq_len).
        threads: torch intra-op threads (1 in worker processes so workers do not fight over cores).
        pooling: 'mean' over real tokens or 'last' (the last real token, which has seen the whole text).
    """

    backend = "phi1"

    def __init__(self, model_dir: str | os.PathLike, tokenizer_type: str | None = None,
                 tokenizer_model: str | None = None, batch_size: int = 16, max_tokens: int | None = None,
                 device: str = "cpu", threads: int | None = None, pooling: str = "mean") -> None:
        from phi1.loading import check_vocab, load_model, load_tokenizer

        if threads is not None:
            torch.set_num_threads(threads)
        self.model_dir = os.fspath(model_dir)
        self.model = load_model(model_dir, device=device)
        self.tokenizer = load_tokenizer(model_dir, tokenizer_type, tokenizer_model)
        check_vocab(self.model, self.tokenizer, model_dir)
        self.batch_size = batch_size
        self.max_tokens = min(max_tokens or self.model.config.max_seq_len, self.model.config.max_seq_len)
        self.device = device
        self.pooling = pooling

    @property
    def dim(self) -> int:
        return self.model.config.d_model

    def describe(self) -> dict:
        """What the classifier header records about this embedder."""
        return {"backend": self.backend, "architecture": "phi1", "kind": "decoder", "pooling": self.pooling,
                "max_tokens": self.max_tokens}

    @torch.no_grad()
    def embed(self, texts: list[str], normalise: bool = False) -> np.ndarray:
        """(len(texts), d) float32 mean hidden states; rows of unit length when `normalise`.

        An empty text (no tokens) is embedded from the end-of-document token alone.
        """
        token_lists = []
        for text in texts:
            ids = self.tokenizer.encode(text)[: self.max_tokens]
            token_lists.append(ids or [self.tokenizer.eod])

        def forward(input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            # Right padding: causal attention means real tokens never see the pads after them.
            return self.model.hidden_states(input_ids.to(self.device), attention_mask=mask.to(self.device))

        result = _batched(token_lists, self.batch_size, 0, self.dim, forward, self.pooling)
        return _normalised(result) if normalise else result
