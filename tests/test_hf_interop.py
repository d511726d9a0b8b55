"""phi1 <-> HuggingFace PhiForCausalLM: equal logits both ways, exact round trips (issue 2)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from phi1.core.config import get_preset  # noqa: E402
from phi1.core.hf_interop import config_from_hf, config_to_hf, state_dict_from_hf, state_dict_to_hf  # noqa: E402
from phi1.core.model import PhiForCausalLM  # noqa: E402
from phi1.core.pretrained import save_pretrained  # noqa: E402
from phi1.loading import load_pretrained, load_state  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def tiny_hf_model(seed=0):
    torch.manual_seed(seed)
    config = transformers.PhiConfig(
        vocab_size=1024,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=3,
        num_attention_heads=4,
        partial_rotary_factor=0.5,
        max_position_embeddings=256,
    )
    config._attn_implementation = "eager"
    model = transformers.PhiForCausalLM(config).eval()
    with torch.no_grad():  # random biases and norms too, so a swapped tensor cannot go unnoticed
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    return model


def test_hf_to_phi1_logits_equal():
    hf = tiny_hf_model()
    config = config_from_hf(hf.config.to_dict())
    ours = PhiForCausalLM(config).eval()
    ours.load_state_dict(state_dict_from_hf(hf.state_dict(), config))
    x = torch.randint(0, 1024, (2, 33))
    torch.testing.assert_close(ours(x).logits, hf(x).logits, atol=1e-5, rtol=1e-5)


def test_phi1_to_hf_logits_equal():
    config = get_preset("phi-1-nano", init_std=0.1)
    ours = PhiForCausalLM(config, init_seed=5).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf_config = transformers.PhiConfig(**{k: v for k, v in config_to_hf(config).items() if k != "architectures"})
    hf_config._attn_implementation = "eager"
    hf = transformers.PhiForCausalLM(hf_config).eval()
    hf.load_state_dict(state_dict_to_hf(ours.state_dict(), config))
    x = torch.randint(0, config.vocab_size, (3, 21))
    torch.testing.assert_close(hf(x).logits, ours(x).logits, atol=1e-5, rtol=1e-5)


def test_round_trip_returns_identical_tensors():
    hf = tiny_hf_model(seed=1)
    config = config_from_hf(hf.config.to_dict())
    back = state_dict_to_hf(state_dict_from_hf(hf.state_dict(), config), config)
    original = hf.state_dict()
    assert set(back) == set(original)
    for name, tensor in original.items():
        assert torch.equal(back[name], tensor), name


def test_directories_round_trip_and_transformers_loads_our_export(tmp_path):
    config = get_preset("phi-1-nano")
    ours = PhiForCausalLM(config, init_seed=2).eval()
    save_pretrained(ours.state_dict(), config, tmp_path / "hf", fmt="hf")
    hf = transformers.PhiForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    x = torch.randint(0, config.vocab_size, (2, 17))
    torch.testing.assert_close(hf(x).logits, ours(x).logits, atol=1e-5, rtol=1e-5)
    back = load_pretrained(tmp_path / "hf")
    for name, tensor in ours.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


def test_convert_checkpoint_cli_both_ways(tmp_path):
    hf = tiny_hf_model(seed=3)
    hf.save_pretrained(tmp_path / "hf_in")
    run = [sys.executable, str(ROOT / "tools" / "convert_checkpoint.py")]
    subprocess.run(
        run + ["--input", str(tmp_path / "hf_in"), "--input-format", "hf", "--output", str(tmp_path / "phi1"), "--output-format", "phi1"],
        check=True,
    )
    assert json.loads((tmp_path / "phi1" / "config.json").read_text())["format"] == "phi1"
    subprocess.run(
        run + ["--input", str(tmp_path / "phi1"), "--input-format", "phi1", "--output", str(tmp_path / "hf_out"), "--output-format", "hf"],
        check=True,
    )
    again = transformers.PhiForCausalLM.from_pretrained(tmp_path / "hf_out", attn_implementation="eager")
    for name, tensor in hf.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name
    config, state = load_state(tmp_path / "phi1")
    ours = PhiForCausalLM(config).eval()
    ours.load_state_dict(state)
    x = torch.randint(0, 1024, (1, 9))
    torch.testing.assert_close(ours(x).logits, hf.eval()(x).logits, atol=1e-5, rtol=1e-5)


def test_wrong_format_is_named(tmp_path):
    save_pretrained(PhiForCausalLM(get_preset("phi-1-nano")).state_dict(), get_preset("phi-1-nano"), tmp_path / "m")
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "convert_checkpoint.py"), "--input", str(tmp_path / "m"), "--input-format", "hf",
         "--output", str(tmp_path / "o"), "--output-format", "phi1"],
        capture_output=True, text=True,
    )
    assert result.returncode == 2 and "holds a 'phi1' model (phi1) but --input-format is 'hf'" in result.stderr
    assert "Traceback" not in result.stderr


def test_hf_config_phi1_cannot_hold_is_rejected():
    bad = config_to_hf(get_preset("phi-1-nano"))
    bad["num_key_value_heads"] = 2
    with pytest.raises(ValueError, match="num_key_value_heads"):
        config_from_hf(bad)
