"""A sweep of corrupt and hostile inputs: each must end in a clear error, never a crash, a hang or wrong data.

The inputs: mutated `.idx` / `.bin` files (truncations, header fields, inconsistent arrays, seeded random byte
flips), malformed JSONL exercises, broken tokenizer files, impossible or contradictory training configs, and
training checkpoints with wrong shapes, damaged files or a pickle payload.

"Clear" means: an exception of an expected kind (ValueError and its subclasses such as ConfigError,
OSError, pickle.UnpicklingError) whose message names the file or the option at fault. A mutated dataset that
loads without error passes only if every token and document boundary is exactly the original's.

The cases run in a child process (this file run as a script), one after the other, each under a 20 s alarm;
the parent restarts the child after a case that kills it, so a crash or a hang is recorded against its case
instead of taking the test run down.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CASE_TIMEOUT_S = 20
CLEAR_TYPES = (ValueError, OSError, pickle.UnpicklingError)
PAYLOAD_MARKER = "phi1_corrupt_input_payload_ran"


# ----------------------------------------------------------------------------------------------------------------
# Building the cases (parent)


def _dataset_digest(prefix: str) -> str:
    from phi1.data.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    digest = hashlib.sha256()
    digest.update(str(dataset.dtype).encode())
    digest.update(dataset.document_indices.tobytes())
    for index in range(len(dataset)):
        digest.update(dataset[index].astype("<i8").tobytes())
    dataset.close()
    return digest.hexdigest()


def _copy_dataset(source: str, target: Path) -> str:
    target.parent.mkdir(parents=True, exist_ok=True)
    for ext in (".idx", ".bin"):
        Path(str(target) + ext).write_bytes(Path(source + ext).read_bytes())
    return str(target)


def _patch(path: str, offset: int, data: bytes) -> None:
    raw = bytearray(Path(path).read_bytes())
    raw[offset : offset + len(data)] = data
    Path(path).write_bytes(bytes(raw))


def dataset_cases(root: Path) -> list[dict]:
    """Mutations of a valid indexed dataset; the loader reads every sequence back."""
    from phi1.data.indexed_dataset import HEADER_BYTES, IndexedDataset, IndexedDatasetWriter
    from phi1.training.synthetic import counting_documents

    source = str(root / "valid" / "corpus")
    with IndexedDatasetWriter(source, "uint16") as writer:
        for document in counting_documents(40):
            writer.add_document(document)
    digest = _dataset_digest(source)
    original = IndexedDataset(source)
    n, docs = len(original), original.num_documents + 1
    sizes_at, pointers_at = HEADER_BYTES, HEADER_BYTES + 4 * n
    documents_at = pointers_at + 8 * n
    index_bytes = Path(source + ".idx").read_bytes()
    bin_bytes = Path(source + ".bin").read_bytes()
    original.close()
    cases = []

    def case(name: str, mutate, needle_ext: str = ".idx") -> None:
        prefix = _copy_dataset(source, root / name / "corpus")
        mutate(prefix)
        cases.append({"name": f"dataset/{name}", "kind": "dataset", "path": prefix, "digest": digest,
                      "needle": "corpus" + needle_ext})

    def truncate_index(length: int):
        return lambda p: Path(p + ".idx").write_bytes(index_bytes[:length])

    for length in (0, 5, 9, 20, HEADER_BYTES - 1, HEADER_BYTES, sizes_at + 7, documents_at + 3, len(index_bytes) - 1):
        case(f"idx_truncated_{length}", truncate_index(length))
    case("idx_trailing_garbage", lambda p: Path(p + ".idx").write_bytes(index_bytes + b"\x00" * 8))
    case("idx_bad_magic", lambda p: _patch(p + ".idx", 0, b"NOTANIDX\x00"))
    case("idx_version_2", lambda p: _patch(p + ".idx", 9, struct.pack("<Q", 2)))
    case("idx_version_huge", lambda p: _patch(p + ".idx", 9, struct.pack("<Q", 2**64 - 1)))
    for code in (0, 1, 2, 4, 5, 6, 7, 9, 255):
        case(f"idx_dtype_code_{code}", lambda p, code=code: _patch(p + ".idx", 17, bytes([code])))
    for label, count in (("plus1", n + 1), ("minus1", n - 1), ("zero", 0), ("huge", 2**63)):
        case(f"idx_sequence_count_{label}", lambda p, count=count: _patch(p + ".idx", 18, struct.pack("<Q", count)))
    for label, count in (("plus1", docs + 1), ("zero", 0), ("huge", 2**64 - 1)):
        case(f"idx_document_count_{label}", lambda p, count=count: _patch(p + ".idx", 26, struct.pack("<Q", count)))
    case("idx_negative_size", lambda p: _patch(p + ".idx", sizes_at + 4 * 3, struct.pack("<i", -5)))
    case("idx_size_too_big", lambda p: _patch(p + ".idx", sizes_at + 4 * (n - 1), struct.pack("<i", 2**31 - 1)))
    case("idx_size_shifted", lambda p: _patch(p + ".idx", sizes_at + 4 * 2, struct.pack("<i", 3)))
    case("idx_pointer_shifted", lambda p: _patch(p + ".idx", pointers_at + 8 * 5, struct.pack("<q", 2)))
    case("idx_pointer_negative", lambda p: _patch(p + ".idx", pointers_at + 8 * 5, struct.pack("<q", -64)))
    case("idx_pointer_past_end", lambda p: _patch(p + ".idx", pointers_at + 8 * 5, struct.pack("<q", 2**40)))
    case("idx_documents_not_from_zero", lambda p: _patch(p + ".idx", documents_at, struct.pack("<q", 1)))
    case("idx_documents_wrong_end", lambda p: _patch(p + ".idx", documents_at + 8 * (docs - 1), struct.pack("<q", n - 1)))
    case("idx_documents_decrease", lambda p: _patch(p + ".idx", documents_at + 8 * 5, struct.pack("<q", 1)))
    case("idx_documents_past_end", lambda p: _patch(p + ".idx", documents_at + 8 * 5, struct.pack("<q", 10**9)))
    # Seeded random byte flips over the header, sizes and pointers. (A flip inside the document indices that
    # keeps them increasing is a valid, different index: without a checksum no reader can tell; the format
    # carries none, and Megatron-LM must keep reading our files.)
    rng = random.Random(1234)
    for i in range(24):
        offset = rng.randrange(0, documents_at)
        bit = 1 << rng.randrange(8)
        case(f"idx_bitflip_{i}_at_{offset}", lambda p, offset=offset, bit=bit: _patch(
            p + ".idx", offset, bytes([index_bytes[offset] ^ bit])))
    case("bin_empty", lambda p: Path(p + ".bin").write_bytes(b""), ".bin")
    case("bin_truncated_1", lambda p: Path(p + ".bin").write_bytes(bin_bytes[:-1]), ".bin")
    case("bin_truncated_half", lambda p: Path(p + ".bin").write_bytes(bin_bytes[: len(bin_bytes) // 2]), ".bin")
    case("bin_trailing_bytes", lambda p: Path(p + ".bin").write_bytes(bin_bytes + b"\x01\x00"), ".bin")
    case("bin_missing", lambda p: os.remove(p + ".bin"), ".bin")
    case("idx_missing", lambda p: os.remove(p + ".idx"), ".idx")
    case("bin_is_directory", lambda p: (os.remove(p + ".bin"), os.mkdir(p + ".bin")), ".bin")
    return cases


def jsonl_cases(root: Path) -> list[dict]:
    """Malformed CodeExercises JSONL files, read by phi1.training.finetune_data.read_exercises."""
    root.mkdir(parents=True, exist_ok=True)
    good = json.dumps({"prompt": "def f():", "solution": "    return 1"})
    contents: dict[str, bytes] = {
        "empty": b"",
        "only_blank_lines": b"\n\n  \n",
        "not_json": b"prompt: def f()\n",
        "truncated_object": (good[:-5] + "\n").encode(),
        "array_not_object": b'["def f():", "return 1"]\n',
        "number_line": b"42\n",
        "null_line": b"null\n",
        "missing_solution": b'{"prompt": "def f():"}\n',
        "solution_not_string": b'{"prompt": "def f():", "solution": 7}\n',
        "prompt_is_list": b'{"prompt": ["def"], "solution": "x"}\n',
        "bad_line_after_good": (good + "\n{oops\n").encode(),
        "invalid_utf8": b'{"prompt": "def f():", "solution": "\xff\xfe"}\n',
        "binary_garbage": bytes(random.Random(7).randrange(256) for _ in range(512)),
        "nan_constant_field": b'{"prompt": NaN, "solution": "x"}\n',
        "deep_nesting": ("[" * 100000 + "]" * 100000 + "\n").encode(),
    }
    cases = []
    for name, data in contents.items():
        path = root / f"{name}.jsonl"
        path.write_bytes(data)
        cases.append({"name": f"jsonl/{name}", "kind": "jsonl", "path": str(path), "needle": path.name})
    cases.append({"name": "jsonl/missing_file", "kind": "jsonl", "path": str(root / "absent.jsonl"),
                  "needle": "absent.jsonl"})
    return cases


def tokenizer_cases(root: Path) -> list[dict]:
    """Broken tokenizer files for each tokenizer type."""
    from phi1.training.synthetic import write_word_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    valid = write_word_tokenizer(root / "valid" / "tokenizer.json").read_text()
    cases = []

    def hf(name: str, data: bytes) -> None:
        path = root / name / "tokenizer.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        cases.append({"name": f"tokenizer/hf_{name}", "kind": "tokenizer", "type": "HuggingFaceTokenizer",
                      "path": str(path), "needle": "tokenizer.json"})

    hf("empty", b"")
    hf("truncated", valid[: len(valid) // 2].encode())
    hf("not_json", b"this is not a tokenizer\n")
    hf("json_list", b"[1, 2, 3]")
    hf("json_without_model", json.dumps({"version": "1.0"}).encode())
    hf("model_of_unknown_type", valid.replace('"WordLevel"', '"NoSuchModel"').encode())
    hf("no_eod_token", valid.replace("<|endoftext|>", "<|notend|>").encode())
    hf("binary", bytes(range(256)) * 4)
    hf("invalid_utf8", b'{"version": "\xff"}')

    def sp(name: str, data: bytes) -> None:
        path = root / name / "tokenizer.model"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        cases.append({"name": f"tokenizer/sentencepiece_{name}", "kind": "tokenizer", "type": "SentencePieceTokenizer",
                      "path": str(path), "needle": "tokenizer.model"})

    sp("empty", b"")
    sp("garbage", bytes(random.Random(3).randrange(256) for _ in range(2048)))
    sp("json_instead", valid.encode())

    gpt2 = root / "gpt2_broken"
    gpt2.mkdir(parents=True, exist_ok=True)
    (gpt2 / "vocab.json").write_text('{"a": 0, "b": ')
    (gpt2 / "merges.txt").write_text("#version: 0.2\na b\n")
    cases.append({"name": "tokenizer/gpt2_truncated_vocab", "kind": "tokenizer", "type": "GPT2BPETokenizer",
                  "path": str(gpt2), "needle": "vocab.json"})
    gpt2_merges = root / "gpt2_bad_merges"
    gpt2_merges.mkdir(parents=True, exist_ok=True)
    (gpt2_merges / "vocab.json").write_text(json.dumps({"a": 0, "b": 1, "ab": 2, "<|endoftext|>": 3}))
    (gpt2_merges / "merges.txt").write_text("#version: 0.2\na b c d\n")
    cases.append({"name": "tokenizer/gpt2_malformed_merges", "kind": "tokenizer", "type": "GPT2BPETokenizer",
                  "path": str(gpt2_merges), "needle": "merges.txt"})
    cases.append({"name": "tokenizer/hf_missing", "kind": "tokenizer", "type": "HuggingFaceTokenizer",
                  "path": str(root / "nowhere" / "tokenizer.json"), "needle": "tokenizer.json"})
    cases.append({"name": "tokenizer/sentencepiece_is_directory", "kind": "tokenizer",
                  "type": "SentencePieceTokenizer", "path": str(root), "needle": str(root.name)})
    return cases


def config_cases(root: Path, data_prefix: str, tokenizer: str) -> list[dict]:
    """Impossible or contradictory training configs: (YAML text or None, overrides, world size, needle)."""
    root.mkdir(parents=True, exist_ok=True)
    base = [f"data.path={data_prefix}", f"data.tokenizer_model={tokenizer}", "model.preset=phi-1-nano",
            "data.seq_len=32", "batch.global_batch_size=8", "batch.micro_batch_size=2"]
    override_cases = {
        "tp_not_dividing_world": (["parallel.tensor_parallel=3"], 4, "parallel.tensor_parallel"),
        "tp_zero": (["parallel.tensor_parallel=0"], 1, "parallel.tensor_parallel"),
        "tp_splits_no_heads": (["parallel.tensor_parallel=8"], 8, "parallel.tensor_parallel"),
        "sp_without_tp": (["parallel.sequence_parallel=true"], 1, "parallel.sequence_parallel"),
        "sp_with_zero2": (["parallel.tensor_parallel=2", "parallel.sequence_parallel=true", "parallel.zero_stage=2"], 2,
                          "parallel.sequence_parallel"),
        "zero_stage_4": (["parallel.zero_stage=4"], 1, "parallel.zero_stage"),
        "seq_len_beyond_model": (["data.seq_len=4096"], 1, "data.seq_len"),
        "seq_len_zero": (["data.seq_len=0"], 1, "data.seq_len"),
        "global_not_multiple": (["batch.global_batch_size=7"], 1, "batch.global_batch_size"),
        "micro_zero": (["batch.micro_batch_size=0"], 1, "batch.micro_batch_size"),
        "min_lr_above_lr": (["optim.lr=1e-4", "optim.min_lr=1e-3"], 1, "optim.min_lr"),
        "negative_lr": (["optim.lr=-1"], 1, "optim.lr"),
        "beta_one": (["optim.betas=[0.9,1.0]"], 1, "optim.betas"),
        "betas_three": (["optim.betas=[0.9,0.9,0.9]"], 1, "optim.betas"),
        "warmup_beyond_steps": (["schedule.train_steps=10", "schedule.warmup_steps=11"], 1, "schedule.warmup_steps"),
        "decay_unknown": (["schedule.decay=exponential"], 1, "schedule.decay"),
        "precision_fp8": (["precision=fp8"], 1, "precision"),
        "exit_beyond_steps": (["schedule.train_steps=10", "schedule.warmup_steps=1", "checkpoint.exit_at_iteration=11"], 1,
                              "checkpoint.exit_at_iteration"),
        "unknown_option": (["optim.learning_rate=1e-3"], 1, "optim.learning_rate"),
        "unknown_section": (["optimiser.lr=1e-3"], 1, "optimiser.lr"),
        "wrong_type_int": (["schedule.train_steps=many"], 1, "schedule.train_steps"),
        "wrong_type_bool": (["activation_checkpointing=maybe"], 1, "activation_checkpointing"),
        "override_without_equals": (["optim.lr"], 1, "optim.lr"),
        "unknown_preset": (["model.preset=phi-9"], 1, "model.preset"),
        "unknown_model_field": (["model.n_layers=2"], 1, "model.n_layers"),
        "heads_not_dividing_width": (["model.n_head=5"], 1, "n_head"),
        "odd_rotary_dim": (["model.rotary_dim=7"], 1, "rotary_dim"),
        "vocab_not_multiple_64": (["model.vocab_size=1000"], 1, "vocab_size"),
        "dropout_one": (["model.resid_dropout=1.0"], 1, "resid_dropout"),
        "missing_data": ([f"data.path={root / 'nothing'}"], 1, "data.path"),
        "missing_tokenizer": ([f"data.tokenizer_model={root / 'none.json'}"], 1, "data.tokenizer_model"),
        "missing_load": ([f"checkpoint.load={root / 'no_checkpoint'}"], 1, "checkpoint.load"),
        "grad_clip_negative": (["optim.grad_clip=-1"], 1, "optim.grad_clip"),
        "logging_interval_zero": (["logging.interval=0"], 1, "logging.interval"),
    }
    cases = [{"name": f"config/{name}", "kind": "config", "yaml": None, "overrides": base + extra, "world_size": ws,
              "needle": needle} for name, (extra, ws, needle) in override_cases.items()]
    yaml_texts = {
        "yaml_syntax_error": "optim: {lr: 1e-3\n",
        "yaml_top_level_list": "- optim\n- lr\n",
        "yaml_section_is_scalar": "optim: 3\n",
        "yaml_python_object": "optim: !!python/object/apply:os.system ['echo pwned']\n",
        "yaml_unknown_key": "optim:\n  lrate: 1.0\n",
        "yaml_tabs": "optim:\n\tlr: 1.0\n",
        "yaml_binary": "\x00\x01\x02 binary",
    }
    for name, text in yaml_texts.items():
        path = root / f"{name}.yaml"
        path.write_text(text)
        cases.append({"name": f"config/{name}", "kind": "config", "yaml": str(path), "overrides": base, "world_size": 1,
                      "needle": path.name})
    cases.append({"name": "config/yaml_missing", "kind": "config", "yaml": str(root / "absent.yaml"), "overrides": base,
                  "world_size": 1, "needle": "absent.yaml"})
    return cases


class _Payload:
    """Unpickling this runs a shell command: what a hostile checkpoint would carry."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def checkpoint_cases(root: Path) -> list[dict]:
    """A real training checkpoint of a nano model, then damaged copies of it."""
    import shutil

    import torch

    from phi1.core.config import get_preset
    from phi1.core.model import PhiForCausalLM
    from phi1.parallel.checkpoint import save_model_shard
    from phi1.parallel.state import init_distributed
    from phi1.training.checkpointing import capture_rng_states

    state = init_distributed(1)
    valid = root / "valid" / "iter_0000002"
    valid.mkdir(parents=True)
    model = PhiForCausalLM(get_preset("phi-1-nano"))
    optimizer = torch.optim.AdamW(model.parameters())
    ids = torch.randint(0, 512, (2, 8))
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    save_model_shard(model, valid, state)
    torch.save(optimizer.state_dict(), valid / "optim_tp00.pt")
    torch.save(capture_rng_states(), valid / "rng_rank00000.pt")
    (valid / "trainer_state.json").write_text(json.dumps({
        "format": "phi1-training-checkpoint", "format_version": 1, "iteration": 2, "consumed_samples": 16,
        "world_size": 1, "tensor_parallel": 1, "data_parallel": 1, "zero_stage": 0}))
    shard = "model_tp00-of-01.safetensors"
    cases = []

    def case(name: str, what: str, mutate, needle: str, model_overrides: dict | None = None) -> None:
        run = root / name
        directory = run / "iter_0000002"
        shutil.copytree(valid, directory)
        mutate(directory)
        cases.append({"name": f"checkpoint/{name}", "kind": "checkpoint", "what": what, "path": str(directory),
                      "needle": needle, "model_overrides": model_overrides or {}, "marker": str(root / PAYLOAD_MARKER)})

    shard_bytes = (valid / shard).read_bytes()
    header_length = struct.unpack("<Q", shard_bytes[:8])[0]
    case("shard_truncated", "model", lambda d: (d / shard).write_bytes(shard_bytes[: len(shard_bytes) // 2]), shard)
    case("shard_header_truncated", "model", lambda d: (d / shard).write_bytes(shard_bytes[:20]), shard)
    case("shard_empty", "model", lambda d: (d / shard).write_bytes(b""), shard)
    case("shard_garbage", "model", lambda d: (d / shard).write_bytes(os.urandom(4096)), shard)
    case("shard_huge_header_length", "model",
         lambda d: (d / shard).write_bytes(struct.pack("<Q", 2**62) + shard_bytes[8:]), shard)
    case("shard_header_not_json", "model", lambda d: (d / shard).write_bytes(
        shard_bytes[:8] + b"{" * header_length + shard_bytes[8 + header_length:]), shard)
    case("shard_missing", "model", lambda d: os.remove(d / shard), "iter_0000002")
    case("wrong_shapes_wider_model", "model", lambda d: None, "iter_0000002", {"d_model": 128})
    case("wrong_shapes_more_layers", "model", lambda d: None, "iter_0000002", {"n_layer": 3})
    case("wrong_shapes_vocab", "model", lambda d: None, "iter_0000002", {"vocab_size": 1024})
    case("optimizer_pickle_payload", "optimizer",
         lambda d: torch.save({"state": _Payload(str(root / PAYLOAD_MARKER))}, d / "optim_tp00.pt"), "optim_tp00.pt")
    case("optimizer_truncated", "optimizer", lambda d: (d / "optim_tp00.pt").write_bytes(
        (valid / "optim_tp00.pt").read_bytes()[:100]), "optim_tp00.pt")
    case("optimizer_not_a_zip", "optimizer", lambda d: (d / "optim_tp00.pt").write_bytes(b"PK\x03\x04 nope"),
         "optim_tp00.pt")
    case("optimizer_wrong_model", "optimizer", lambda d: torch.save(
        torch.optim.AdamW(PhiForCausalLM(get_preset("phi-1-nano", n_layer=1)).parameters()).state_dict(),
        d / "optim_tp00.pt"), "optim_tp00.pt")
    case("rng_pickle_payload", "rng",
         lambda d: torch.save({"python": _Payload(str(root / PAYLOAD_MARKER))}, d / "rng_rank00000.pt"),
         "rng_rank00000.pt")
    case("rng_truncated", "rng", lambda d: (d / "rng_rank00000.pt").write_bytes(b"\x80\x02"), "rng_rank00000.pt")
    case("trainer_state_not_json", "state", lambda d: (d / "trainer_state.json").write_text("{iteration: 2"),
         "trainer_state.json")
    case("trainer_state_list", "state", lambda d: (d / "trainer_state.json").write_text("[2]"), "trainer_state.json")
    return cases


# ----------------------------------------------------------------------------------------------------------------
# Running one case (child)


def _load_dataset(case: dict) -> str:
    return _dataset_digest(case["path"])


def _run_case(case: dict) -> str | None:
    """Load the input the way phi1 does. Returns None, or for datasets the digest of what was read."""
    kind = case["kind"]
    if kind == "dataset":
        return _load_dataset(case)
    if kind == "jsonl":
        from phi1.training.finetune_data import read_exercises

        read_exercises(case["path"])
        return None
    if kind == "tokenizer":
        from phi1.data.tokenizers import build_tokenizer

        tokenizer = build_tokenizer(case["type"], case["path"])
        tokenizer.encode("w1 w2 w3")
        _ = tokenizer.eod
        return None
    if kind == "config":
        from phi1.training.config import load_config, validate_config

        config = load_config(case["yaml"], case["overrides"])
        validate_config(config, case["world_size"])
        return None
    if kind == "checkpoint":
        return _load_checkpoint(case)
    raise AssertionError(f"unknown case kind {kind}")


def _load_checkpoint(case: dict) -> None:
    import torch

    from phi1.core.config import get_preset
    from phi1.core.model import PhiForCausalLM
    from phi1.parallel.state import init_distributed
    from phi1.training import checkpointing

    directory = Path(case["path"])
    state = init_distributed(1)
    what = case["what"]
    if what == "model":
        model = PhiForCausalLM(get_preset("phi-1-nano", **case["model_overrides"]))
        checkpointing.load_model_weights(model, directory)
    elif what == "optimizer":
        model = PhiForCausalLM(get_preset("phi-1-nano"))
        optimizer = torch.optim.AdamW(model.parameters())
        checkpointing.load_optimizer_state(optimizer, None, directory, state)
    elif what == "rng":
        checkpointing.load_rng_states(directory, state)
    elif what == "state":
        saved = checkpointing.read_trainer_state(directory)
        saved["iteration"]  # noqa: B018 (what the loop reads first)
    else:
        raise AssertionError(what)
    return None


def _on_alarm(signum, frame):
    raise TimeoutError(f"case took more than {CASE_TIMEOUT_S} s")


def child_main(cases_path: str, start: int) -> None:
    cases = json.loads(Path(cases_path).read_text())
    signal.signal(signal.SIGALRM, _on_alarm)
    for index in range(start, len(cases)):
        case = cases[index]
        print(f"START {index}", flush=True)
        signal.alarm(CASE_TIMEOUT_S)
        outcome: dict = {"index": index}
        try:
            digest = _run_case(case)
            outcome.update(status="accepted", same_data=(digest == case.get("digest")) if digest is not None else None)
        except TimeoutError as e:
            outcome.update(status="hang", error=str(e))
        except BaseException as e:  # noqa: BLE001 (classify everything, then report)
            message = str(e)
            clear = isinstance(e, CLEAR_TYPES) and case["needle"] in message
            outcome.update(status="clear" if clear else "unclear", error=f"{type(e).__name__}: {message[:400]}")
        finally:
            signal.alarm(0)
        if case.get("marker") and Path(case["marker"]).exists():
            outcome.update(status="payload-ran")
        print("RESULT " + json.dumps(outcome), flush=True)


# ----------------------------------------------------------------------------------------------------------------
# The test (parent)


def run_sweep(cases: list[dict], workdir: Path, timeout: float = 180) -> list[dict]:
    """Run every case in child processes; a child that dies or hangs is recorded against its case."""
    cases_path = workdir / "cases.json"
    cases_path.write_text(json.dumps(cases))
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    results: dict[int, dict] = {}
    start = 0
    deadline = time.monotonic() + timeout
    while start < len(cases):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"the sweep ran out of time at case {cases[start]['name']}")
        try:
            run = subprocess.run([sys.executable, __file__, cases_path, str(start)], cwd=REPO, env=env,
                                 capture_output=True, text=True, timeout=remaining)
            output, died = run.stdout, run.returncode != 0
        except subprocess.TimeoutExpired as e:
            output = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            died = True
        last_started = start
        for line in output.splitlines():
            if line.startswith("START "):
                last_started = int(line.split()[1])
            elif line.startswith("RESULT "):
                outcome = json.loads(line[len("RESULT "):])
                results[outcome["index"]] = outcome
        if last_started not in results:
            results[last_started] = {"index": last_started, "status": "crash" if died else "lost"}
        start = max(results) + 1
    return [dict(results[i], name=cases[i]["name"]) for i in range(len(cases))]


def test_corrupt_and_hostile_inputs_all_end_in_clear_errors(tmp_path) -> None:
    from phi1.training.synthetic import write_synthetic_dataset

    data_prefix, tokenizer = write_synthetic_dataset(tmp_path / "data")
    cases = (dataset_cases(tmp_path / "datasets") + jsonl_cases(tmp_path / "jsonl")
             + tokenizer_cases(tmp_path / "tokenizers") + config_cases(tmp_path / "configs", data_prefix, tokenizer)
             + checkpoint_cases(tmp_path / "checkpoints"))
    results = run_sweep(cases, tmp_path)
    by_status: dict[str, int] = {}
    for result in results:
        status = result["status"]
        if status == "accepted" and result.get("same_data"):
            status = "accepted-identical"
        by_status[status] = by_status.get(status, 0) + 1
        result["final"] = status
    kinds: dict[str, int] = {}
    for case in cases:
        kinds[case["kind"]] = kinds.get(case["kind"], 0) + 1
    print(f"\ncorrupt-input sweep: {len(results)} inputs {kinds}; outcomes {by_status}")
    bad = [r for r in results if r["final"] not in ("clear", "accepted-identical")]
    assert not bad, "inputs without a clear error:\n" + "\n".join(
        f"  {r['name']}: {r['final']} {r.get('error', '')}" for r in bad)
    assert not (tmp_path / "checkpoints" / PAYLOAD_MARKER).exists(), "a pickle payload ran"


if __name__ == "__main__":
    child_main(sys.argv[1], int(sys.argv[2]))
