"""Presets, parameter counts and config validation (issue 2)."""

import pytest

from phi1.core.config import ModelConfig, count_parameters_on_meta, get_preset, pad_vocab_size


def test_phi1_parameter_count_is_exact_without_allocating():
    config = get_preset("phi-1")
    assert count_parameters_on_meta(config) == 1_418_270_720
    assert config.num_parameters() == 1_418_270_720


def test_phi1_small_is_about_357m():
    config = get_preset("phi-1-small")
    n = count_parameters_on_meta(config)
    print(f"phi-1-small parameters: {n:,}")
    assert n == config.num_parameters()
    assert abs(n - 357e6) / 357e6 < 0.01


def test_phi1_flops_per_token_matches_reference():
    # performance.md: N without the input embedding = 1,313,413,120; 9.09 GFLOP per token at T = 2048.
    config = get_preset("phi-1")
    assert config.num_parameters(exclude_embedding=True) == 1_313_413_120
    assert config.flops_per_token(2048) == 6 * 1_313_413_120 + 12 * 24 * 2048 * 2048


@pytest.mark.parametrize("name", ["phi-1-tiny", "phi-1-nano"])
def test_small_presets_count_on_meta_matches_closed_form(name):
    config = get_preset(name)
    assert count_parameters_on_meta(config) == config.num_parameters()


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(n_head=3), "n_head"),  # 3 heads do not divide 64
        (dict(rotary_dim=7), "rotary_dim"),  # odd
        (dict(rotary_dim=32), "rotary_dim"),  # exceeds head dim 16
        (dict(vocab_size=1000), "vocab_size"),  # not a multiple of 64
        (dict(attention_backend="triton"), "attention_backend"),
        (dict(attn_dropout=1.5), "attn_dropout"),
        (dict(n_layer=0), "n_layer"),
    ],
)
def test_bad_config_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"ModelConfig\.{field}"):
        get_preset("phi-1-nano", **overrides)


def test_unknown_preset_is_named():
    with pytest.raises(ValueError, match="preset 'phi-2' is unknown"):
        get_preset("phi-2")


def test_unknown_field_in_dict_is_named():
    with pytest.raises(ValueError, match="unknown field"):
        ModelConfig.from_dict({**get_preset("phi-1-nano").to_dict(), "n_heads": 4})


def test_tensor_parallel_divisibility_is_checked():
    config = get_preset("phi-1-nano")  # 4 heads
    config.validate(tensor_parallel_size=2)
    with pytest.raises(ValueError, match="ModelConfig.n_head"):
        config.validate(tensor_parallel_size=8)


def test_pad_vocab_size():
    assert pad_vocab_size(50295) == 50304
    assert pad_vocab_size(50295, multiple=1024) == 51200  # what microsoft/phi-1 chose
    assert pad_vocab_size(50295, tensor_parallel_size=4) == 50432
    assert pad_vocab_size(64) == 64
