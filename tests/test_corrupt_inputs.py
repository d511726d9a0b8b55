"""Corrupt and hostile inputs, one parametrised case each: each must end in a clear error, never a crash, a hang
or wrong data.

The inputs: mutated `.idx` / `.bin` files (truncations, header fields, inconsistent arrays, seeded random byte
flips), malformed JSONL exercises, broken tokenizer files, and training checkpoints with wrong shapes, damaged
files or a pickle payload. (Training configs have their own cases in tests/test_config_validation.py.)

Each case writes its input under its own tmp_path, from base artefacts built once per module, then loads it the
way phi1 does in a child process (this file run as a script, through phi1.cli.run_cli) bounded by
phi1.testing.hostile.run_bounded: a time limit and an address-space cap, so a hang or runaway memory is a failed
case, not a stuck test run. "Clear" is the project's rule for user errors (assert_clear_error): exit status 2,
one line naming the file, no traceback. A mutated dataset that loads without error passes only if every token
and document boundary is exactly the original's (the child prints the digest of what it read).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from phi1.testing.hostile import assert_clear_error, python, run_bounded

CASE_TIMEOUT_S = 60
CASE_MEMORY_MB = 4096
PAYLOAD_MARKER = "phi1_corrupt_input_payload_ran"


@dataclass(frozen=True)
class Case:
    """One hostile input: `build(base, directory)` writes it and returns the case for the child."""

    name: str
    build: Callable[[dict, Path], dict]


# ----------------------------------------------------------------------------------------------------------------
# Base artefacts (built once per module)


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


def _base_dataset(root: Path) -> dict:
    from phi1.data.indexed_dataset import HEADER_BYTES, IndexedDataset, IndexedDatasetWriter
    from phi1.testing.synthetic import counting_documents

    source = str(root / "valid" / "corpus")
    Path(source).parent.mkdir(parents=True)
    with IndexedDatasetWriter(source, "uint16") as writer:
        for document in counting_documents(40):
            writer.add_document(document)
    original = IndexedDataset(source)
    n, docs = len(original), original.num_documents + 1
    original.close()
    return {"source": source, "digest": _dataset_digest(source), "n": n, "docs": docs,
            "sizes_at": HEADER_BYTES, "pointers_at": HEADER_BYTES + 4 * n, "documents_at": HEADER_BYTES + 12 * n,
            "header_bytes": HEADER_BYTES, "index_bytes": Path(source + ".idx").read_bytes(),
            "bin_bytes": Path(source + ".bin").read_bytes()}


class _Payload:
    """Unpickling this runs a shell command: what a hostile checkpoint would carry."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _base_checkpoint(root: Path) -> Path:
    """A real training checkpoint of a nano model (weights, optimizer, RNG, trainer state)."""
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
    return valid


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict:
    """The valid dataset, tokenizer and checkpoint every case mutates a copy of."""
    from phi1.testing.synthetic import write_word_tokenizer

    root = tmp_path_factory.mktemp("base")
    values = {"dataset": _base_dataset(root / "dataset")}
    values["tokenizer_json"] = write_word_tokenizer(root / "tokenizer" / "tokenizer.json").read_text()
    return values


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory) -> Path:
    return _base_checkpoint(tmp_path_factory.mktemp("checkpoint"))


# ----------------------------------------------------------------------------------------------------------------
# The cases


def _patch(path: str, offset: int, data: bytes) -> None:
    raw = bytearray(Path(path).read_bytes())
    raw[offset : offset + len(data)] = data
    Path(path).write_bytes(bytes(raw))


def _dataset_case(name: str, mutate: Callable[[str, dict], object], needle_ext: str = ".idx") -> Case:
    def build(base: dict, directory: Path) -> dict:
        info = base["dataset"]
        prefix = str(directory / "corpus")
        for ext in (".idx", ".bin"):
            Path(prefix + ext).write_bytes(Path(info["source"] + ext).read_bytes())
        mutate(prefix, info)
        return {"kind": "dataset", "path": prefix, "digest": info["digest"], "needle": "corpus" + needle_ext}

    return Case(f"dataset/{name}", build)


def dataset_cases() -> list[Case]:
    """Mutations of a valid indexed dataset; the loader reads every sequence back."""
    cases = []

    def truncate_index(length: Callable[[dict], int]):
        return lambda p, i: Path(p + ".idx").write_bytes(i["index_bytes"][: length(i)])

    lengths = {"0": lambda i: 0, "5": lambda i: 5, "9": lambda i: 9, "20": lambda i: 20,
               "header_minus_1": lambda i: i["header_bytes"] - 1, "header": lambda i: i["header_bytes"],
               "in_sizes": lambda i: i["sizes_at"] + 7, "in_documents": lambda i: i["documents_at"] + 3,
               "last_byte": lambda i: len(i["index_bytes"]) - 1}
    for label, length in lengths.items():
        cases.append(_dataset_case(f"idx_truncated_{label}", truncate_index(length)))
    cases += [
        _dataset_case("idx_trailing_garbage", lambda p, i: Path(p + ".idx").write_bytes(i["index_bytes"] + b"\x00" * 8)),
        _dataset_case("idx_bad_magic", lambda p, i: _patch(p + ".idx", 0, b"NOTANIDX\x00")),
        _dataset_case("idx_version_2", lambda p, i: _patch(p + ".idx", 9, struct.pack("<Q", 2))),
        _dataset_case("idx_version_huge", lambda p, i: _patch(p + ".idx", 9, struct.pack("<Q", 2**64 - 1))),
    ]
    for code in (0, 1, 2, 4, 5, 6, 7, 9, 255):
        cases.append(_dataset_case(f"idx_dtype_code_{code}", lambda p, i, code=code: _patch(p + ".idx", 17, bytes([code]))))
    for label, count in (("plus1", lambda i: i["n"] + 1), ("minus1", lambda i: i["n"] - 1), ("zero", lambda i: 0),
                         ("huge", lambda i: 2**63)):
        cases.append(_dataset_case(f"idx_sequence_count_{label}",
                                   lambda p, i, count=count: _patch(p + ".idx", 18, struct.pack("<Q", count(i)))))
    for label, count in (("plus1", lambda i: i["docs"] + 1), ("zero", lambda i: 0), ("huge", lambda i: 2**64 - 1)):
        cases.append(_dataset_case(f"idx_document_count_{label}",
                                   lambda p, i, count=count: _patch(p + ".idx", 26, struct.pack("<Q", count(i)))))
    cases += [
        _dataset_case("idx_negative_size", lambda p, i: _patch(p + ".idx", i["sizes_at"] + 4 * 3, struct.pack("<i", -5))),
        _dataset_case("idx_size_too_big", lambda p, i: _patch(p + ".idx", i["sizes_at"] + 4 * (i["n"] - 1),
                                                              struct.pack("<i", 2**31 - 1))),
        _dataset_case("idx_size_shifted", lambda p, i: _patch(p + ".idx", i["sizes_at"] + 4 * 2, struct.pack("<i", 3))),
        _dataset_case("idx_pointer_shifted", lambda p, i: _patch(p + ".idx", i["pointers_at"] + 8 * 5, struct.pack("<q", 2))),
        _dataset_case("idx_pointer_negative", lambda p, i: _patch(p + ".idx", i["pointers_at"] + 8 * 5,
                                                                  struct.pack("<q", -64))),
        _dataset_case("idx_pointer_past_end", lambda p, i: _patch(p + ".idx", i["pointers_at"] + 8 * 5,
                                                                  struct.pack("<q", 2**40))),
        _dataset_case("idx_documents_not_from_zero", lambda p, i: _patch(p + ".idx", i["documents_at"],
                                                                         struct.pack("<q", 1))),
        _dataset_case("idx_documents_wrong_end", lambda p, i: _patch(p + ".idx", i["documents_at"] + 8 * (i["docs"] - 1),
                                                                     struct.pack("<q", i["n"] - 1))),
        _dataset_case("idx_documents_decrease", lambda p, i: _patch(p + ".idx", i["documents_at"] + 8 * 5,
                                                                    struct.pack("<q", 1))),
        _dataset_case("idx_documents_past_end", lambda p, i: _patch(p + ".idx", i["documents_at"] + 8 * 5,
                                                                    struct.pack("<q", 10**9))),
    ]
    # Seeded random byte flips over the header, sizes and pointers. (A flip inside the document indices that
    # keeps them increasing is a valid, different index: without a checksum no reader can tell; the format
    # carries none, and Megatron-LM must keep reading our files.)
    rng = random.Random(1234)
    for index in range(24):
        fraction, bit = rng.random(), 1 << rng.randrange(8)

        def flip(p: str, i: dict, fraction=fraction, bit=bit) -> None:
            offset = int(fraction * i["documents_at"])
            _patch(p + ".idx", offset, bytes([i["index_bytes"][offset] ^ bit]))

        cases.append(_dataset_case(f"idx_bitflip_{index}", flip))
    cases += [
        _dataset_case("bin_empty", lambda p, i: Path(p + ".bin").write_bytes(b""), ".bin"),
        _dataset_case("bin_truncated_1", lambda p, i: Path(p + ".bin").write_bytes(i["bin_bytes"][:-1]), ".bin"),
        _dataset_case("bin_truncated_half", lambda p, i: Path(p + ".bin").write_bytes(
            i["bin_bytes"][: len(i["bin_bytes"]) // 2]), ".bin"),
        _dataset_case("bin_trailing_bytes", lambda p, i: Path(p + ".bin").write_bytes(i["bin_bytes"] + b"\x01\x00"),
                      ".bin"),
        _dataset_case("bin_missing", lambda p, i: os.remove(p + ".bin"), ".bin"),
        _dataset_case("idx_missing", lambda p, i: os.remove(p + ".idx"), ".idx"),
        _dataset_case("bin_is_directory", lambda p, i: (os.remove(p + ".bin"), os.mkdir(p + ".bin")), ".bin"),
    ]
    return cases


def jsonl_cases() -> list[Case]:
    """Malformed CodeExercises JSONL files, read by phi1.training.finetune_data.read_exercises."""
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

    def case(name: str, data: bytes | None) -> Case:
        def build(base: dict, directory: Path) -> dict:
            path = directory / (f"{name}.jsonl" if data is not None else "absent.jsonl")
            if data is not None:
                path.write_bytes(data)
            return {"kind": "jsonl", "path": str(path), "needle": path.name}

        return Case(f"jsonl/{name}", build)

    return [case(name, data) for name, data in contents.items()] + [case("missing_file", None)]


def tokenizer_cases() -> list[Case]:
    """Broken tokenizer files for each tokenizer type."""

    def file_case(name: str, kind: str, file_name: str, content: Callable[[str], bytes]) -> Case:
        def build(base: dict, directory: Path) -> dict:
            path = directory / file_name
            path.write_bytes(content(base["tokenizer_json"]))
            return {"kind": "tokenizer", "type": kind, "path": str(path), "needle": file_name}

        return Case(f"tokenizer/{name}", build)

    hf = {
        "empty": lambda v: b"",
        "truncated": lambda v: v[: len(v) // 2].encode(),
        "not_json": lambda v: b"this is not a tokenizer\n",
        "json_list": lambda v: b"[1, 2, 3]",
        "json_without_model": lambda v: json.dumps({"version": "1.0"}).encode(),
        "model_of_unknown_type": lambda v: v.replace('"WordLevel"', '"NoSuchModel"').encode(),
        "no_eod_token": lambda v: v.replace("<|endoftext|>", "<|notend|>").encode(),
        "binary": lambda v: bytes(range(256)) * 4,
        "invalid_utf8": lambda v: b'{"version": "\xff"}',
    }
    cases = [file_case(f"hf_{name}", "HuggingFaceTokenizer", "tokenizer.json", content) for name, content in hf.items()]
    sentencepiece = {
        "empty": lambda v: b"",
        "garbage": lambda v: bytes(random.Random(3).randrange(256) for _ in range(2048)),
        "json_instead": lambda v: v.encode(),
    }
    cases += [file_case(f"sentencepiece_{name}", "SentencePieceTokenizer", "tokenizer.model", content)
              for name, content in sentencepiece.items()]

    def gpt2(name: str, vocab: str, merges: str, needle: str) -> Case:
        def build(base: dict, directory: Path) -> dict:
            (directory / "vocab.json").write_text(vocab)
            (directory / "merges.txt").write_text(merges)
            return {"kind": "tokenizer", "type": "GPT2BPETokenizer", "path": str(directory), "needle": needle}

        return Case(f"tokenizer/{name}", build)

    cases += [
        gpt2("gpt2_truncated_vocab", '{"a": 0, "b": ', "#version: 0.2\na b\n", "vocab.json"),
        gpt2("gpt2_malformed_merges", json.dumps({"a": 0, "b": 1, "ab": 2, "<|endoftext|>": 3}),
             "#version: 0.2\na b c d\n", "merges.txt"),
        Case("tokenizer/hf_missing", lambda base, d: {"kind": "tokenizer", "type": "HuggingFaceTokenizer",
                                                       "path": str(d / "nowhere" / "tokenizer.json"),
                                                       "needle": "tokenizer.json"}),
        Case("tokenizer/sentencepiece_is_directory", lambda base, d: {"kind": "tokenizer",
                                                                      "type": "SentencePieceTokenizer",
                                                                      "path": str(d), "needle": d.name}),
    ]
    return cases


def checkpoint_cases() -> list[Case]:
    """Damaged copies of a real training checkpoint of a nano model."""
    shard = "model_tp00-of-01.safetensors"

    def case(name: str, what: str, mutate: Callable[[Path, Path], object], needle: str,
             model_overrides: dict | None = None) -> Case:
        def build(base: dict, directory: Path) -> dict:
            valid = base["checkpoint"]
            target = directory / "run" / "iter_0000002"
            shutil.copytree(valid, target)
            mutate(target, valid)
            return {"kind": "checkpoint", "what": what, "path": str(target), "needle": needle,
                    "model_overrides": model_overrides or {}, "marker": str(directory / PAYLOAD_MARKER)}

        return Case(f"checkpoint/{name}", build)

    def shard_bytes(valid: Path) -> bytes:
        return (valid / shard).read_bytes()

    def header_not_json(target: Path, valid: Path) -> None:
        raw = shard_bytes(valid)
        length = struct.unpack("<Q", raw[:8])[0]
        (target / shard).write_bytes(raw[:8] + b"{" * length + raw[8 + length:])

    def payload(target: Path, file_name: str, key: str) -> None:
        import torch

        torch.save({key: _Payload(str(target.parents[1] / PAYLOAD_MARKER))}, target / file_name)

    def optimizer_of_another_model(target: Path, valid: Path) -> None:
        import torch

        from phi1.core.config import get_preset
        from phi1.core.model import PhiForCausalLM

        torch.save(torch.optim.AdamW(PhiForCausalLM(get_preset("phi-1-nano", n_layer=1)).parameters()).state_dict(),
                   target / "optim_tp00.pt")

    return [
        case("shard_truncated", "model", lambda t, v: (t / shard).write_bytes(shard_bytes(v)[: len(shard_bytes(v)) // 2]),
             shard),
        case("shard_header_truncated", "model", lambda t, v: (t / shard).write_bytes(shard_bytes(v)[:20]), shard),
        case("shard_empty", "model", lambda t, v: (t / shard).write_bytes(b""), shard),
        case("shard_garbage", "model", lambda t, v: (t / shard).write_bytes(random.Random(5).randbytes(4096)), shard),
        case("shard_huge_header_length", "model",
             lambda t, v: (t / shard).write_bytes(struct.pack("<Q", 2**62) + shard_bytes(v)[8:]), shard),
        case("shard_header_not_json", "model", header_not_json, shard),
        case("shard_missing", "model", lambda t, v: os.remove(t / shard), "iter_0000002"),
        case("wrong_shapes_wider_model", "model", lambda t, v: None, "iter_0000002", {"d_model": 128}),
        case("wrong_shapes_more_layers", "model", lambda t, v: None, "iter_0000002", {"n_layer": 3}),
        case("wrong_shapes_vocab", "model", lambda t, v: None, "iter_0000002", {"vocab_size": 1024}),
        case("optimizer_pickle_payload", "optimizer", lambda t, v: payload(t, "optim_tp00.pt", "state"), "optim_tp00.pt"),
        case("optimizer_truncated", "optimizer", lambda t, v: (t / "optim_tp00.pt").write_bytes(
            (v / "optim_tp00.pt").read_bytes()[:100]), "optim_tp00.pt"),
        case("optimizer_not_a_zip", "optimizer", lambda t, v: (t / "optim_tp00.pt").write_bytes(b"PK\x03\x04 nope"),
             "optim_tp00.pt"),
        case("optimizer_wrong_model", "optimizer", optimizer_of_another_model, "optim_tp00.pt"),
        case("rng_pickle_payload", "rng", lambda t, v: payload(t, "rng_rank00000.pt", "python"), "rng_rank00000.pt"),
        case("rng_truncated", "rng", lambda t, v: (t / "rng_rank00000.pt").write_bytes(b"\x80\x02"), "rng_rank00000.pt"),
        case("trainer_state_not_json", "state", lambda t, v: (t / "trainer_state.json").write_text("{iteration: 2"),
             "trainer_state.json"),
        case("trainer_state_list", "state", lambda t, v: (t / "trainer_state.json").write_text("[2]"),
             "trainer_state.json"),
    ]


CASES = dataset_cases() + jsonl_cases() + tokenizer_cases() + checkpoint_cases()


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_corrupt_input_ends_in_a_clear_error(case: Case, base: dict, request, tmp_path) -> None:
    if case.name.startswith("checkpoint/"):
        base = {**base, "checkpoint": request.getfixturevalue("base_checkpoint")}
    spec = case.build(base, tmp_path)
    spec_path = tmp_path / "case.json"
    spec_path.write_text(json.dumps(spec))
    outcome = run_bounded(python(__file__, str(spec_path)), timeout_s=CASE_TIMEOUT_S, memory_mb=CASE_MEMORY_MB,
                          env={"CUDA_VISIBLE_DEVICES": ""})
    assert not (tmp_path / PAYLOAD_MARKER).exists(), "a pickle payload ran"
    if outcome.returncode == 0 and spec["kind"] == "dataset":
        # Loaded without error: only acceptable when what was read is exactly the original.
        assert outcome.stdout.strip() == f"digest {spec['digest']}", f"read different data\n{outcome.describe()}"
        return
    assert_clear_error(outcome, names=spec["needle"])


def test_the_sweep_covers_every_kind() -> None:
    kinds: dict[str, int] = {}
    for case in CASES:
        kinds[case.name.split("/")[0]] = kinds.get(case.name.split("/")[0], 0) + 1
    assert kinds == {"dataset": 70, "jsonl": 16, "tokenizer": 16, "checkpoint": 18}, kinds
    assert len({case.name for case in CASES}) == len(CASES)


# ----------------------------------------------------------------------------------------------------------------
# Loading one input the way phi1 does (the child process)


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


def load_case(argv: list[str]) -> int:
    """Load the input described in the JSON file `argv[0]`; print the digest of a dataset that loads."""
    case = json.loads(Path(argv[0]).read_text())
    kind = case["kind"]
    if kind == "dataset":
        print(f"digest {_dataset_digest(case['path'])}")
    elif kind == "jsonl":
        from phi1.training.finetune_data import read_exercises

        read_exercises(case["path"])
    elif kind == "tokenizer":
        from phi1.data.tokenizers import build_tokenizer

        tokenizer = build_tokenizer(case["type"], case["path"])
        tokenizer.encode("w1 w2 w3")
        _ = tokenizer.eod
    elif kind == "checkpoint":
        _load_checkpoint(case)
    else:
        raise AssertionError(f"unknown case kind {kind}")
    return 0


if __name__ == "__main__":
    from phi1.cli import run_cli

    run_cli(load_case, prog="load_case", argv=sys.argv[1:2])
