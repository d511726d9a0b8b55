"""transformers models as quality-classifier embedders: a tiny random RoBERTa encoder (mean-pooled) and a tiny
random CodeGen decoder (last-token pooled), built and saved in the test (no hub), run through
`quality_filter.py train` and `filter` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest


def _tokenizer(texts: list[str], directory: Path, **special):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=list(special.values())))
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **special)
    wrapped.save_pretrained(directory)
    return wrapped


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    import torch
    from transformers import CodeGenConfig, CodeGenForCausalLM, RobertaConfig, RobertaModel

    from phi1.quality.stdlib_functions import stdlib_functions

    texts = [f.source for f in stdlib_functions(150, seed=5)]
    work = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    encoder = work / "roberta"
    tok = _tokenizer(texts, encoder, bos_token="<s>", pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    RobertaModel(RobertaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=66, pad_token_id=tok.pad_token_id,
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)).save_pretrained(encoder)
    decoder = work / "codegen"
    tok = _tokenizer(texts, decoder, eos_token="<|endoftext|>", unk_token="<unk>")
    CodeGenForCausalLM(CodeGenConfig(vocab_size=len(tok), n_positions=64, n_ctx=64, n_embd=32, n_layer=2, n_head=2,
                                     rotary_dim=8, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                                     tie_word_embeddings=False)).save_pretrained(decoder)
    return {"roberta": encoder, "codegen": decoder}


@pytest.mark.slow
def test_embedders_pool_batch_and_cut(models) -> None:
    from phi1.quality.embeddings import TransformersEmbedder, load_embedder

    texts = ["def f(x):\n    return x\n", "", "x = 1\n" * 200, "class A:\n    pass\n"]
    encoder = load_embedder(str(models["roberta"]), device="cpu")
    assert isinstance(encoder, TransformersEmbedder) and encoder.kind == "encoder" and encoder.max_tokens == 64
    one_by_one = np.concatenate([encoder.embed([t]) for t in texts])
    batched = encoder.embed(texts)
    assert batched.shape == (4, 32) and np.allclose(batched, one_by_one, atol=1e-5)  # padding changes nothing
    decoder = load_embedder(str(models["codegen"]), pooling="last", device="cpu", batch_size=3)
    assert decoder.kind == "decoder" and decoder.max_tokens == 64
    last = decoder.embed(texts)
    assert np.allclose(last, np.concatenate([decoder.embed([t]) for t in texts]), atol=1e-5)
    assert not np.allclose(last, load_embedder(str(models["codegen"]), device="cpu").embed(texts))  # mean differs
    with pytest.raises(ValueError, match="--pooling last"):
        load_embedder(str(models["roberta"]), pooling="last", device="cpu")


@pytest.mark.slow
@pytest.mark.parametrize("name, pooling", [("roberta", "mean"), ("codegen", "last")])
def test_train_and_filter_with_a_transformers_embedder(tmp_path, models, name, pooling, capsys) -> None:
    from phi1.quality.embeddings import checkpoint_fingerprint
    from phi1.quality.filter_cli import main
    from phi1.quality.stdlib_functions import documented_labelled_set

    records = documented_labelled_set(40, seed=2)
    labelled = tmp_path / "labels.jsonl"
    labelled.write_text("".join(json.dumps(r) + "\n" for r in records))
    main(["train", "--labelled", str(labelled), "--embedding-model", str(models[name]), "--pooling", pooling,
          "--output", str(tmp_path / "cls"), "--trees", "10", "--folds", "3", "--device", "cpu"])
    report = capsys.readouterr().out
    assert "3-fold cross-validation on 40 examples" in report and "random forest" in report
    header = json.loads((tmp_path / "cls" / "classifier.json").read_text())
    embedder = header["embedder"]
    assert embedder["backend"] == "transformers" and embedder["pooling"] == pooling
    assert embedder["kind"] == ("encoder" if name == "roberta" else "decoder")
    assert embedder["fingerprint"] == checkpoint_fingerprint(models[name]) and header["n_features"] == 32
    assert len(header["cross_validation"]["auc_per_fold"]) == 3
    shard = tmp_path / "shard.jsonl"
    shard.write_text("".join(json.dumps({"text": r["text"], "n": i}) + "\n" for i, r in enumerate(records[:12])))
    summary = main(["filter", "--classifier", str(tmp_path / "cls"), "--input", str(shard), "--output-dir",
                    str(tmp_path / "out"), "--keep-all", "--no-progress", "--device", "cpu"])
    kept = [json.loads(line) for line in (tmp_path / "out" / "shard.jsonl").read_text().splitlines()]
    assert summary["kept"] == 12 and [r["n"] for r in kept] == list(range(12))
    # filter embeds the way train did: its scores equal the classifier's on train-time embeddings
    from phi1.quality.classifier import QualityClassifier
    from phi1.quality.embeddings import load_embedder

    features = load_embedder(str(models[name]), pooling=pooling, device="cpu").embed([r["text"] for r in records[:12]])
    expected = QualityClassifier.load(tmp_path / "cls").score(features)
    assert np.allclose([r["quality_score"] for r in kept], expected, atol=1e-5)


def test_fingerprint_of_a_run_directory_is_its_checkpoint(tmp_path) -> None:
    """A run directory is fingerprinted through the checkpoint `latest` names: never the hash of nothing, and a
    newer checkpoint of the same run is another embedder."""
    import hashlib
    import shutil

    from phi1.quality.embeddings import checkpoint_fingerprint
    from phi1.testing.toy_model import build_toy_model_dir

    model = build_toy_model_dir(tmp_path / "model", "phi-1-nano", max_seq_len=64)
    run = tmp_path / "run"
    for iteration in (1, 2):
        checkpoint = run / f"iter_{iteration:07d}"
        shutil.copytree(model, checkpoint)
        (checkpoint / "trainer_state.json").write_text(json.dumps({"iteration": iteration}))
    weights = next((run / "iter_0000002").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x01")  # another model's bytes
    (run / "latest").write_text("1\n")
    first = checkpoint_fingerprint(run)
    assert first == checkpoint_fingerprint(run / "iter_0000001") != hashlib.sha256().hexdigest()
    (run / "latest").write_text("2\n")
    assert checkpoint_fingerprint(run) == checkpoint_fingerprint(run / "iter_0000002") != first
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        checkpoint_fingerprint(tmp_path / "empty")
