"""Conversions between phi1 and HuggingFace `PhiForCausalLM` (model_type "phi"): configs and state dicts.

Pure functions over whole (unsharded) tensors; writing directories is in `phi1.core.pretrained`, reading any
model path in `phi1.loading`.
The one layout difference: phi1 keeps q, k, v in one projection whose rows are grouped by head, (nh, 3, hs),
so that a tensor-parallel split of the rows hands each rank whole heads; HF keeps three projections.
"""

from __future__ import annotations

import math

import torch

from phi1.core.config import ModelConfig

HF_PREFIX = "model."


def config_to_hf(config: ModelConfig) -> dict:
    """A HuggingFace `config.json` dict for `PhiForCausalLM`.

    Rotary settings are written both the transformers 5 way (`rope_parameters`) and the 4.x way (top-level
    `rope_theta`, `partial_rotary_factor`) so either version loads the directory.
    """
    partial = config.rotary_dim / config.head_dim
    return {
        "architectures": ["PhiForCausalLM"],
        "model_type": "phi",
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.d_mlp,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_head,
        "hidden_act": "gelu_new",
        "max_position_embeddings": config.max_seq_len,
        "layer_norm_eps": config.layer_norm_eps,
        "initializer_range": config.init_std,
        "resid_pdrop": config.resid_dropout,
        "embd_pdrop": config.embd_dropout,
        "attention_dropout": config.attn_dropout,
        "rope_theta": config.rotary_base,
        "partial_rotary_factor": partial,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rotary_base, "partial_rotary_factor": partial},
        "qk_layernorm": False,
        "tie_word_embeddings": False,
        "use_cache": True,
        "torch_dtype": "float32",
    }


_HF_INT_FIELDS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "vocab_size")


def config_from_hf(hf: dict, **overrides) -> ModelConfig:
    """A ModelConfig from a HuggingFace phi `config.json` dict.

    Raises:
        ValueError: naming the field, for a missing or mistyped field and for what phi1 cannot hold; the numbers
            themselves are then checked by `ModelConfig.validate`.
    """
    if hf.get("model_type") != "phi":
        raise ValueError(f"config.json: model_type is {hf.get('model_type')!r}; phi1 imports model_type 'phi' only")
    for name in _HF_INT_FIELDS:
        value = hf.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"config.json: {name} must be a positive integer, got {value!r}")
    if hf.get("qk_layernorm"):
        raise ValueError("config.json: qk_layernorm=true is not part of phi-1; phi1 cannot import it")
    heads = hf["num_attention_heads"]
    if hf.get("num_key_value_heads", heads) != heads:
        raise ValueError("config.json: grouped-query attention (num_key_value_heads != num_attention_heads) is not phi-1")
    if hf.get("hidden_act", "gelu_new") != "gelu_new":
        raise ValueError(f"config.json: hidden_act {hf['hidden_act']!r}; phi1 implements gelu_new")
    if hf.get("tie_word_embeddings", False):
        raise ValueError("config.json: tie_word_embeddings=true; phi-1 has an untied lm_head")
    rope = hf.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise ValueError(f"config.json: rope_parameters must be an object, got {type(rope).__name__}")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.5))
    numbers = {"rope_theta": theta, "partial_rotary_factor": partial}
    for name in ("rope_theta", "partial_rotary_factor"):  # written both ways: both must be numbers and agree
        if name in hf:
            numbers[name] = hf[name]
        if name in rope:
            numbers[f"rope_parameters.{name}"] = rope[name]
    for name in ("layer_norm_eps", "initializer_range", "resid_pdrop", "embd_pdrop", "attention_dropout"):
        if name in hf:
            numbers[name] = hf[name]
    for name, value in numbers.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise ValueError(f"config.json: {name} must be a finite number, got {value!r}")
    for name in ("rope_theta", "partial_rotary_factor"):
        if name in hf and name in rope and hf[name] != rope[name]:
            raise ValueError(f"config.json: {name} {hf[name]!r} and rope_parameters.{name} {rope[name]!r} disagree")
    if not 0.0 <= partial <= 1.0:
        raise ValueError(f"config.json: partial_rotary_factor must be in [0, 1], got {partial!r}")
    max_positions = hf.get("max_position_embeddings", 2048)
    if not isinstance(max_positions, int) or isinstance(max_positions, bool) or max_positions <= 0:
        raise ValueError(f"config.json: max_position_embeddings must be a positive integer, got {max_positions!r}")
    head_dim = hf["hidden_size"] // heads
    name = hf.get("_name_or_path")
    values = dict(
        n_layer=hf["num_hidden_layers"],
        d_model=hf["hidden_size"],
        n_head=heads,
        d_mlp=hf["intermediate_size"],
        vocab_size=hf["vocab_size"],
        rotary_dim=int(head_dim * partial),
        rotary_base=float(theta),
        max_seq_len=max_positions,
        layer_norm_eps=float(numbers.get("layer_norm_eps", 1e-5)),
        init_std=float(numbers.get("initializer_range", 0.02)),
        resid_dropout=float(numbers.get("resid_pdrop", 0.0)),
        embd_dropout=float(numbers.get("embd_pdrop", 0.0)),
        attn_dropout=float(numbers.get("attention_dropout", 0.0)),
        name=name if isinstance(name, str) and name else "hf-import",
    )
    values.update(overrides)
    try:
        return ModelConfig(**values)
    except (TypeError, ValueError) as e:
        raise ValueError(f"config.json: {e}") from None


def hf_tensor_names(config: ModelConfig) -> dict[str, str]:
    """{HuggingFace tensor name: the phi1 tensor it becomes} (q, k and v all map to the fused qkv)."""
    names = {HF_PREFIX + "embed_tokens.weight": "embed_tokens.weight"}
    for i in range(config.n_layer):
        src, dst = f"{HF_PREFIX}layers.{i}.", f"layers.{i}."
        for kind in ("weight", "bias"):
            names[src + f"input_layernorm.{kind}"] = dst + f"ln.{kind}"
            for p in "qkv":
                names[src + f"self_attn.{p}_proj.{kind}"] = dst + f"attn.qkv.{kind}"
            names[src + f"self_attn.dense.{kind}"] = dst + f"attn.dense.{kind}"
            names[src + f"mlp.fc1.{kind}"] = dst + f"mlp.fc1.{kind}"
            names[src + f"mlp.fc2.{kind}"] = dst + f"mlp.fc2.{kind}"
    for kind in ("weight", "bias"):
        names[f"{HF_PREFIX}final_layernorm.{kind}"] = f"final_layernorm.{kind}"
        names[f"lm_head.{kind}"] = f"lm_head.{kind}"
    return names


def hf_expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of a HuggingFace PhiForCausalLM's tensors for `config`, without building it."""
    from phi1.core.pretrained import expected_shapes

    phi1_shapes = expected_shapes(config)
    shapes = {}
    for hf_name, name in hf_tensor_names(config).items():
        shape = phi1_shapes[name]
        if ".self_attn." in hf_name and "_proj." in hf_name:  # one third of the fused qkv rows
            shape = (shape[0] // 3, *shape[1:])
        shapes[hf_name] = shape
    return shapes


def _fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_head: int) -> torch.Tensor:
    # (nh*hs, ...) x3 -> (nh, 3, hs, ...) -> (nh*3*hs, ...)
    per_head = [t.reshape(n_head, -1, *t.shape[1:]) for t in (q, k, v)]
    return torch.stack(per_head, dim=1).reshape(-1, *q.shape[1:])


def _split_qkv(qkv: torch.Tensor, n_head: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grouped = qkv.reshape(n_head, 3, -1, *qkv.shape[1:])  # (nh, 3, hs, ...)
    return tuple(grouped[:, i].reshape(-1, *qkv.shape[1:]).clone() for i in range(3))


def state_dict_from_hf(hf_state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """HF `PhiForCausalLM` tensors -> phi1 `PhiForCausalLM` tensors (unsharded). Raises KeyError naming a
    missing tensor and ValueError for tensors phi1 would not use."""
    hf = dict(hf_state)
    out: dict[str, torch.Tensor] = {}

    def take(name: str) -> torch.Tensor:
        if name not in hf:
            raise KeyError(f"HuggingFace checkpoint lacks tensor {name!r}")
        return hf.pop(name)

    out["embed_tokens.weight"] = take(HF_PREFIX + "embed_tokens.weight")
    for i in range(config.n_layer):
        src, dst = f"{HF_PREFIX}layers.{i}.", f"layers.{i}."
        for kind in ("weight", "bias"):
            out[dst + f"ln.{kind}"] = take(src + f"input_layernorm.{kind}")
            q, k, v = (take(src + f"self_attn.{p}_proj.{kind}") for p in "qkv")
            out[dst + f"attn.qkv.{kind}"] = _fuse_qkv(q, k, v, config.n_head)
            out[dst + f"attn.dense.{kind}"] = take(src + f"self_attn.dense.{kind}")
            out[dst + f"mlp.fc1.{kind}"] = take(src + f"mlp.fc1.{kind}")
            out[dst + f"mlp.fc2.{kind}"] = take(src + f"mlp.fc2.{kind}")
    for kind in ("weight", "bias"):
        out[f"final_layernorm.{kind}"] = take(f"{HF_PREFIX}final_layernorm.{kind}")
        out[f"lm_head.{kind}"] = take(f"lm_head.{kind}")
    leftover = [k for k in hf if "rotary_emb" not in k]  # old exports carry an inv_freq buffer
    if leftover:
        raise ValueError(f"HuggingFace checkpoint has tensors phi1 does not know: {leftover[:5]}")
    return out


def state_dict_to_hf(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """phi1 tensors (unsharded) -> HF `PhiForCausalLM` tensors."""
    out: dict[str, torch.Tensor] = {HF_PREFIX + "embed_tokens.weight": state["embed_tokens.weight"]}
    for i in range(config.n_layer):
        src, dst = f"layers.{i}.", f"{HF_PREFIX}layers.{i}."
        for kind in ("weight", "bias"):
            out[dst + f"input_layernorm.{kind}"] = state[src + f"ln.{kind}"]
            q, k, v = _split_qkv(state[src + f"attn.qkv.{kind}"], config.n_head)
            out[dst + f"self_attn.q_proj.{kind}"] = q
            out[dst + f"self_attn.k_proj.{kind}"] = k
            out[dst + f"self_attn.v_proj.{kind}"] = v
            out[dst + f"self_attn.dense.{kind}"] = state[src + f"attn.dense.{kind}"]
            out[dst + f"mlp.fc1.{kind}"] = state[src + f"mlp.fc1.{kind}"]
            out[dst + f"mlp.fc2.{kind}"] = state[src + f"mlp.fc2.{kind}"]
    for kind in ("weight", "bias"):
        out[f"{HF_PREFIX}final_layernorm.{kind}"] = state[f"final_layernorm.{kind}"]
        out[f"lm_head.{kind}"] = state[f"lm_head.{kind}"]
    return {k: v.contiguous() for k, v in out.items()}
