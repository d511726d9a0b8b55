"""HF export with a tokenizer that `transformers.AutoTokenizer` loads with the ids phi1 gives (issue 14, break 5).

A SentencePiece BPE tokenizer and a byte-level BPE tokenizer are trained with `tools/train_tokenizer.py` on 200
files of this Python's standard library; a phi1 model directory holding each is exported with
`tools/convert_checkpoint.py --output-format hf`; `AutoTokenizer.from_pretrained(export)` must give the very ids
of phi1's own tokenizer on every file, and decode them back to the file's text.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from phi1.core.config import get_preset
from phi1.core.model import PhiForCausalLM
from phi1.core.pretrained import save_pretrained
from phi1.data.tokenizers import build_tokenizer
from phi1.testing.hostile import python, run_bounded

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
N_FILES = 200


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[str]]:
    """200 standard-library files: a jsonl for training and their texts."""
    stdlib = Path(os.path.dirname(os.__file__))
    files = sorted(p for p in stdlib.rglob("*.py") if "site-packages" not in p.parts)[:N_FILES]
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in files]
    path = tmp_path_factory.mktemp("corpus") / "stdlib.jsonl"
    with open(path, "w", encoding="utf-8") as handle:
        for text in texts:
            handle.write(json.dumps({"text": text}) + "\n")
    assert len(texts) == N_FILES
    return path, texts


def export(tmp_path: Path, tokenizer_files: list[Path]) -> Path:
    """A phi1 model directory holding the tokenizer, converted to HF by the real tool; the export directory."""
    config = get_preset("phi-1-nano", vocab_size=1024)
    model_dir = save_pretrained(PhiForCausalLM(config).state_dict(), config, tmp_path / "phi1")
    for file in tokenizer_files:
        shutil.copyfile(file, model_dir / file.name)
    out = tmp_path / "hf"
    outcome = run_bounded(python(str(ROOT / "tools" / "convert_checkpoint.py"), "--input", str(model_dir),
                                 "--output", str(out), "--output-format", "hf"), timeout_s=300)
    assert outcome.returncode == 0, outcome.describe()
    return out


def assert_same_ids(ours, export_dir: Path, texts: list[str]) -> None:
    theirs = transformers.AutoTokenizer.from_pretrained(str(export_dir))
    assert len(theirs) == ours.vocab_size
    assert theirs.eos_token == "<|endoftext|>" and theirs.convert_tokens_to_ids("<|endoftext|>") == ours.eod
    mismatched = [i for i, text in enumerate(texts) if theirs.encode(text, add_special_tokens=False) != ours.encode(text)]
    assert mismatched == [], f"{len(mismatched)} of {len(texts)} files get other ids, the first: {mismatched[:5]}"
    undecoded = [i for i, text in enumerate(texts) if theirs.decode(ours.encode(text)) != text]
    assert undecoded == [], f"{len(undecoded)} files do not decode back to their text: {undecoded[:5]}"
    tokens = sum(len(ours.encode(text)) for text in texts)
    assert tokens > 100_000  # the comparison covered a real corpus


def test_sentencepiece_export_gives_identical_ids(corpus, tmp_path) -> None:
    path, texts = corpus
    outcome = run_bounded(python(str(ROOT / "tools" / "train_tokenizer.py"), "--input", str(path), "--output-dir",
                                 str(tmp_path / "tok"), "--vocab-size", "1000", "--threads", "2"), timeout_s=300)
    assert outcome.returncode == 0, outcome.describe()
    out = export(tmp_path, [tmp_path / "tok" / "tokenizer.model"])
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model"} <= set(os.listdir(out))
    assert_same_ids(build_tokenizer("SentencePieceTokenizer", tmp_path / "tok" / "tokenizer.model"), out, texts)
    # indentation and unknown characters (byte fallback) too
    ours = build_tokenizer("SentencePieceTokenizer", tmp_path / "tok" / "tokenizer.model")
    theirs = transformers.AutoTokenizer.from_pretrained(str(out))
    odd = "def f():\n\t    return  '日本語 🤖 ü'  \r\n" + " " * 37 + "x\n"
    assert theirs.encode(odd, add_special_tokens=False) == ours.encode(odd)
    assert theirs.decode(ours.encode(odd)) == odd


def test_bytelevel_bpe_export_is_passed_through(corpus, tmp_path) -> None:
    path, texts = corpus
    outcome = run_bounded(python(str(ROOT / "tools" / "train_tokenizer.py"), "--type", "bpe-bytelevel", "--input",
                                 str(path), "--output-dir", str(tmp_path / "tok"), "--vocab-size", "1000",
                                 "--max-space-run", "8"), timeout_s=300)
    assert outcome.returncode == 0, outcome.describe()
    files = [tmp_path / "tok" / name for name in ("tokenizer.json", "tokenizer_config.json")]
    out = export(tmp_path, files)
    assert (out / "tokenizer.json").read_bytes() == files[0].read_bytes()
    assert_same_ids(build_tokenizer("HuggingFaceTokenizer", tmp_path / "tok" / "tokenizer.json"), out, texts[:50])


def test_gpt2_vocab_and_merges_export(corpus, tmp_path) -> None:
    """vocab.json + merges.txt alone get the tokenizer.json phi1 builds from them."""
    path, texts = corpus
    outcome = run_bounded(python(str(ROOT / "tools" / "train_tokenizer.py"), "--type", "bpe-bytelevel", "--input",
                                 str(path), "--output-dir", str(tmp_path / "tok"), "--vocab-size", "1000"), timeout_s=300)
    assert outcome.returncode == 0, outcome.describe()
    out = export(tmp_path, [tmp_path / "tok" / "vocab.json", tmp_path / "tok" / "merges.txt"])
    assert_same_ids(build_tokenizer("GPT2BPETokenizer", tmp_path / "tok"), out, texts[:50])
