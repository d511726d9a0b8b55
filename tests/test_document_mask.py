"""Document masking inside packed samples (issue 16): a packed sample of 3 documents gives the logits and loss
of the 3 documents run alone, on every attention backend that runs here; generation ignores the option."""

import pytest
import torch

from phi1.core.attention import find_documents, flash_attn_available
from phi1.core.config import get_preset
from phi1.core.model import PhiForCausalLM
from phi1.parallel.cross_entropy import IGNORE_INDEX

EOD = 0
BACKENDS = ["sdpa", "math"] + (["flash"] if flash_attn_available() and torch.cuda.is_available() else [])


def _documents(generator):
    # Lengths chosen so that no document is a multiple of another (positions would hide a wrong restart).
    return [torch.cat([torch.randint(1, 512, (n,), generator=generator), torch.tensor([EOD])]) for n in (6, 10, 4)]


def _model(backend):
    config = get_preset("phi-1-nano", init_std=0.3, attention_backend=backend)
    return PhiForCausalLM(config, init_seed=3).eval()


def test_find_documents_positions_and_mask():
    ids = torch.tensor([[5, 6, EOD, 7, EOD, 8, 9]])
    docs = find_documents(ids, EOD, varlen=True)
    assert docs.position_ids.tolist() == [[0, 1, 2, 0, 1, 0, 1]]
    keep = docs.keep[0, 0]
    assert keep[3].tolist() == [False, False, False, True, False, False, False]  # the second document's first token
    assert keep[6].tolist() == [False, False, False, False, False, True, True]
    assert docs.cu_seqlens.tolist() == [0, 3, 5, 7] and docs.max_seqlen == 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_sample_equals_documents_run_alone(backend):
    generator = torch.Generator().manual_seed(0)
    docs = _documents(generator)
    packed = torch.cat(docs).unsqueeze(0)  # (1, 23)
    labels = torch.cat([packed[:, 1:], torch.full((1, 1), IGNORE_INDEX)], dim=1)
    model = _model(backend)
    device = "cuda" if backend == "flash" else "cpu"
    dtype = torch.bfloat16 if backend == "flash" else torch.float32
    model = model.to(device, dtype)
    packed, labels = packed.to(device), labels.to(device)

    model.document_eod_token_id = EOD
    out = model(packed, labels=labels)
    packed_logits = model(packed).logits[0]
    model.document_eod_token_id = None

    alone_logits, loss_sum, n_tokens = [], 0.0, 0
    for doc in docs:
        ids = doc.unsqueeze(0).to(device)
        doc_labels = torch.cat([ids[:, 1:], torch.full((1, 1), IGNORE_INDEX, device=device)], dim=1)
        alone = model(ids, labels=doc_labels)
        alone_logits.append(model(ids).logits[0])
        n = int((doc_labels != IGNORE_INDEX).sum())
        loss_sum, n_tokens = loss_sum + alone.loss.double() * n, n_tokens + n
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed_logits, torch.cat(alone_logits), **tol)
    # The packed loss counts every in-document prediction and none across a boundary (2 of the 22 labels).
    assert n_tokens == 20
    torch.testing.assert_close(out.loss.double(), loss_sum / n_tokens, **tol)
    # Without the option the packed sample is one long sequence: different logits after the first document.
    assert not torch.allclose(model(packed).logits[0, 7:], packed_logits[7:], atol=1e-3)


def test_chunked_loss_masks_the_boundary_too():
    generator = torch.Generator().manual_seed(1)
    packed = torch.cat(_documents(generator)).unsqueeze(0)
    labels = torch.cat([packed[:, 1:], torch.full((1, 1), IGNORE_INDEX)], dim=1)
    model = _model("sdpa")
    model.document_eod_token_id = EOD
    plain = model(packed, labels=labels).loss
    model.loss_chunk_size = 5
    torch.testing.assert_close(model(packed, labels=labels).loss, plain, atol=1e-5, rtol=1e-5)


def test_gradients_flow_under_document_masking_with_checkpointing():
    generator = torch.Generator().manual_seed(2)
    packed = torch.cat(_documents(generator)).unsqueeze(0).repeat(2, 1)
    labels = torch.cat([packed[:, 1:], torch.full((2, 1), IGNORE_INDEX)], dim=1)
    grads = {}
    for mode in ("none", "full", "selective"):
        model = _model("sdpa").train()
        model.document_eod_token_id = EOD
        model.activation_checkpointing = mode
        model(packed, labels=labels).loss.backward()
        grads[mode] = {n: p.grad for n, p in model.named_parameters()}
    for mode in ("full", "selective"):
        for name, grad in grads[mode].items():
            torch.testing.assert_close(grad, grads["none"][name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("use_cache", [True, False])
def test_generation_ignores_the_option(use_cache):
    from phi1.core.generation import SamplingParams, generate

    model = _model("sdpa")
    prompts = [[5, 6, EOD, 7, 8], [9, EOD, 10]]
    params = SamplingParams(max_new_tokens=6, temperature=0.0)
    before = [c.token_ids for c in generate(model, prompts, params, use_cache=use_cache)]
    model.document_eod_token_id = EOD
    after = [c.token_ids for c in generate(model, prompts, params, use_cache=use_cache)]
    assert before == after and all(len(t) == 6 for t in before)


def _overrides(data_dir, run_dir, **extra) -> list[str]:
    values = {
        "model.preset": "phi-1-nano", "data.path": data_dir / "counting_text_document",
        "data.tokenizer_model": data_dir / "tokenizer.json", "data.seq_len": 64, "data.split": "90,10,0",
        "batch.global_batch_size": 4, "batch.micro_batch_size": 2, "schedule.train_steps": 4,
        "schedule.warmup_steps": 1, "checkpoint.dir": run_dir, "checkpoint.interval": 0, "logging.interval": 1,
        "eval.interval": 0, "logging.tensorboard_dir": "",
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def test_training_with_document_mask_runs_and_records_it(tmp_path):
    import math

    import yaml

    from phi1.testing.synthetic import write_synthetic_dataset
    from phi1.training.checkpointing import CONFIG_FILE, find_checkpoint
    from phi1.training.config import load_config
    from phi1.training.trainer import train

    write_synthetic_dataset(tmp_path / "data", num_documents=200)
    masked = train(load_config(None, _overrides(tmp_path / "data", tmp_path / "masked", **{"data.document_mask": "true"})))
    plain = train(load_config(None, _overrides(tmp_path / "data", tmp_path / "plain")))
    assert len(masked.losses) == 4 and all(math.isfinite(v) for v in masked.losses)
    # 64-token samples hold several counting documents: masking changes what the model sees and is scored on.
    assert masked.losses != plain.losses
    saved = yaml.safe_load((find_checkpoint(tmp_path / "masked") / CONFIG_FILE).read_text())
    assert saved["data"]["document_mask"] is True
    assert yaml.safe_load((find_checkpoint(tmp_path / "plain") / CONFIG_FILE).read_text())["data"]["document_mask"] is False
