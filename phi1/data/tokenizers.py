"""Tokenizers behind one interface, and an exact tiktoken fast path for byte-level BPE.

`build_tokenizer("SentencePieceTokenizer" | "HuggingFaceTokenizer" | "GPT2BPETokenizer", path)` returns an object
with `encode`, `encode_batch`, `decode`, `eod`, `vocab_size` and `padded_vocab_size`.

Byte-level BPE (GPT-2, codegen) can be run by tiktoken, several times faster than HuggingFace `tokenizers`, when
tiktoken's algorithm provably gives the same ids: tiktoken merges the adjacent pair whose concatenation has the
lowest id, HuggingFace the pair with the lowest merge rank. These agree when every multi-byte token is produced by
exactly one merge and token ids grow with merge rank, the pre-tokenizer is plain GPT-2 ByteLevel (no prefix
space, no normaliser, no dropout, no byte fallback), and added tokens are matched the same way (HuggingFace
matches them leftmost-longest before pre-tokenizing; tiktoken's special-token alternation is not longest-first,
so overlapping added tokens such as codegen's whitespace runs are split out here in Python, longest first).
`_fast_path_refusal` checks all of that; the automatic choice also compares both engines on a probe text and
falls back to HuggingFace on any difference.
"""

from __future__ import annotations

import json
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from functools import lru_cache

EOD_TOKEN = "<|endoftext|>"
# GPT-2's pre-tokenizer regex (HuggingFace ByteLevel uses the same one).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
ENGINES = ("auto", "tiktoken", "huggingface")
_PROBE_TEXT = (
    "def f(x):\n    return x ** 2  # comment\n\n\n\tif  a != b:\r\n        pass\n"
    "It's we'll they've I'M 12345 3.14 ümlaut 日本語 emoji 🤖 <|endoftext|>next  \n  \t\n"
)


class Tokenizer(ABC):
    """Common interface of all tokenizers."""

    #: which implementation encodes ("sentencepiece", "huggingface" or "tiktoken")
    engine: str = ""

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no BOS/EOS added)."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text; subclasses batch this in native code."""
        return [self.encode(text) for text in texts]

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of real tokens (ids are below this)."""

    @property
    @abstractmethod
    def eod(self) -> int:
        """End-of-document id, appended after every document when packing."""

    @property
    def source_files(self) -> list[str]:
        """The files this tokenizer was read from (hashed into dataset sidecars)."""
        return list(getattr(self, "_source_files", []))

    def padded_vocab_size(self, multiple: int = 64, tensor_parallel_size: int = 1) -> int:
        """vocab_size rounded up to a multiple of `multiple * tensor_parallel_size` (embedding shards)."""
        step = multiple * tensor_parallel_size
        return -(-self.vocab_size // step) * step


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece `.model`; `<|endoftext|>` (a control symbol) is the eod, else the model's EOS."""

    engine = "sentencepiece"

    def __init__(self, model_file: str | os.PathLike, num_threads: int = 1) -> None:
        import sentencepiece

        self.model_file = os.fspath(model_file)
        if not os.path.isfile(self.model_file):
            raise FileNotFoundError(f"{self.model_file}: no SentencePiece model; train one with tools/train_tokenizer.py")
        _refuse_oversized(self.model_file)
        try:
            self.processor = sentencepiece.SentencePieceProcessor(model_file=self.model_file)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{self.model_file}: not a readable SentencePiece model ({e})") from None
        self.num_threads = num_threads
        self._source_files = [self.model_file]
        eod = self.processor.piece_to_id(EOD_TOKEN)
        if eod == self.processor.unk_id():
            eod = self.processor.eos_id()
        self._eod = int(eod)

    def encode(self, text: str) -> list[int]:
        return self.processor.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.processor.encode(list(texts), num_threads=self.num_threads)

    def decode(self, ids: Sequence[int]) -> str:
        return self.processor.decode(list(ids))

    @property
    def vocab_size(self) -> int:
        return int(self.processor.get_piece_size())

    @property
    def eod(self) -> int:
        if self._eod < 0:
            raise ValueError(f"{self.model_file}: has neither {EOD_TOKEN} nor an EOS piece to end documents with")
        return self._eod


class HuggingFaceTokenizer(Tokenizer):
    """A HuggingFace `tokenizer.json` (or a directory holding one); never downloads.

    Args:
        path: the file or its directory.
        engine: "auto" (tiktoken when provably exact and verified, else HuggingFace), "tiktoken" (raise if not
            exact), or "huggingface".
        num_threads: threads tiktoken may use per batch.
    """

    def __init__(self, path: str | os.PathLike, engine: str = "auto", num_threads: int = 1) -> None:
        path = os.fspath(path)
        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{file}: no tokenizer.json (this loader reads local files only, it never downloads)")
        _refuse_oversized(file)
        try:
            with open(file, encoding="utf-8") as handle:
                spec = json.load(handle)
        except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise ValueError(f"{file}: not a readable tokenizer.json ({type(e).__name__}: {e})") from None
        self._init_from_spec(spec, source=file, engine=engine, num_threads=num_threads)

    def _init_from_spec(self, spec: dict, source: str, engine: str, num_threads: int) -> None:
        import tokenizers

        if engine not in ENGINES:
            raise ValueError(f"tokenizer engine {engine!r}: choose one of {ENGINES}")
        self.source = source
        self.num_threads = num_threads
        self._source_files = [source]
        if not isinstance(spec, dict):
            raise ValueError(f"{source}: a tokenizer spec is a JSON object, this file holds a {type(spec).__name__}")
        try:
            self.hf = tokenizers.Tokenizer.from_str(json.dumps(spec))
        except Exception as e:  # the tokenizers library raises plain Exception for a spec it cannot read
            raise ValueError(f"{source}: the tokenizers library cannot read this tokenizer ({e})") from None
        self._vocab_size = int(self.hf.get_vocab_size(with_added_tokens=True))
        eod = self.hf.token_to_id(EOD_TOKEN)
        self._eod = -1 if eod is None else int(eod)
        self.fast: _TiktokenBPE | None = None
        self.refusal: str | None = None
        if engine != "huggingface":
            self.refusal = _fast_path_refusal(spec)
            if self.refusal is None:
                fast = _TiktokenBPE(spec, num_threads)
                hf_ids = self.hf.encode(_PROBE_TEXT, add_special_tokens=False).ids
                if fast.encode(_PROBE_TEXT) == hf_ids:
                    self.fast = fast
                else:
                    self.refusal = "tiktoken and HuggingFace disagree on the probe text"
            if engine == "tiktoken" and self.fast is None:
                raise ValueError(f"{source}: the tiktoken fast path would not be exact: {self.refusal}")
        self.engine = "tiktoken" if self.fast is not None else "huggingface"

    def encode(self, text: str) -> list[int]:
        if self.fast is not None:
            return self.fast.encode(text)
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if self.fast is not None:
            return self.fast.encode_batch(list(texts))
        return [encoding.ids for encoding in self.hf.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod(self) -> int:
        if self._eod < 0:
            raise ValueError(f"{self.source}: has no {EOD_TOKEN} token to end documents with")
        return self._eod


class GPT2BPETokenizer(HuggingFaceTokenizer):
    """GPT-2 byte-level BPE from `vocab.json` + `merges.txt` (Megatron's --vocab-file/--merge-file)."""

    def __init__(
        self, vocab_file: str | os.PathLike, merge_file: str | os.PathLike, engine: str = "auto", num_threads: int = 1
    ) -> None:
        for file in (vocab_file, merge_file):
            if not os.path.isfile(file):
                raise FileNotFoundError(f"{file}: missing (GPT2BPETokenizer needs vocab.json and merges.txt)")
            _refuse_oversized(os.fspath(file))
        try:
            with open(vocab_file, encoding="utf-8") as handle:
                vocab = json.load(handle)
        except (ValueError, RecursionError) as e:
            raise ValueError(f"{vocab_file}: not a readable vocab.json ({type(e).__name__}: {e})") from None
        if not isinstance(vocab, dict):
            raise ValueError(f"{vocab_file}: expected a JSON object of token -> id, got a {type(vocab).__name__}")
        try:
            with open(merge_file, encoding="utf-8") as handle:
                merges = [line.rstrip("\n") for line in handle if line.strip() and not line.startswith("#version")]
        except ValueError as e:
            raise ValueError(f"{merge_file}: not readable text ({e})") from None
        malformed = next((m for m in merges if len(m.split(" ")) != 2), None)
        if malformed is not None:
            raise ValueError(f"{merge_file}: malformed merge {malformed!r}; each line must be two tokens separated by a space")
        specials = [{"id": vocab[EOD_TOKEN], "content": EOD_TOKEN, "single_word": False, "lstrip": False,
                     "rstrip": False, "normalized": False, "special": True}] if EOD_TOKEN in vocab else []
        byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
        spec = {
            "version": "1.0", "truncation": None, "padding": None, "added_tokens": specials, "normalizer": None,
            "pre_tokenizer": byte_level, "post_processor": byte_level, "decoder": byte_level,
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "vocab": vocab, "merges": merges},
        }
        self._init_from_spec(spec, source=os.fspath(vocab_file), engine=engine, num_threads=num_threads)
        self._source_files = [os.fspath(vocab_file), os.fspath(merge_file)]


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable-unicode stand-in for each byte, inverted."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {chr(code): byte for byte, code in zip(printable, codes)}


def _merges(model: dict) -> list[tuple[str, str]]:
    pairs = []
    for merge in model.get("merges", []):
        pair = tuple(merge.split(" ")) if isinstance(merge, str) else tuple(merge)
        if len(pair) != 2:
            raise ValueError(f"malformed merge {merge!r}")
        pairs.append(pair)
    return pairs


def _is_plain_byte_level(component: dict | None) -> bool:
    if component is None:
        return False
    if component.get("type") == "Sequence":
        parts = component.get("pretokenizers", [])
        return len(parts) == 1 and _is_plain_byte_level(parts[0])
    return (
        component.get("type") == "ByteLevel"
        and not component.get("add_prefix_space", False)
        and component.get("use_regex", True)
    )


def _fast_path_refusal(spec: dict) -> str | None:
    """None when tiktoken would reproduce this tokenizer exactly, else the reason it would not."""
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        return f"model type {model.get('type')} is not BPE"
    if model.get("dropout") or model.get("byte_fallback") or model.get("continuing_subword_prefix") or model.get(
        "end_of_word_suffix"
    ):
        return "BPE dropout, byte fallback or sub-word affixes"
    if spec.get("normalizer") is not None:
        return "a normaliser"
    if not _is_plain_byte_level(spec.get("pre_tokenizer")):
        return "pre-tokenizer is not plain GPT-2 ByteLevel"
    for token in spec.get("added_tokens", []):
        if token.get("lstrip") or token.get("rstrip") or token.get("single_word"):
            return f"added token {token['content']!r} has lstrip/rstrip/single_word matching"
    byte_decoder = _byte_decoder()
    vocab: dict[str, int] = model["vocab"]
    token_bytes: dict[str, bytes] = {}
    # Added tokens are matched before BPE runs (and become tiktoken specials), so BPE never makes them.
    added = {t["content"] for t in spec.get("added_tokens", [])}
    for token in vocab:
        if token in added:
            continue
        if any(char not in byte_decoder for char in token):
            return f"vocabulary entry {token!r} is not byte-level"
        token_bytes[token] = bytes(byte_decoder[char] for char in token)
    if len({token_bytes[t] for t in token_bytes if len(token_bytes[t]) == 1}) != 256:
        return "the vocabulary lacks some single bytes"
    previous = -1
    produced: set[str] = set()
    for left, right in _merges(model):
        merged = left + right
        if merged not in vocab or left not in vocab or right not in vocab:
            return f"merge {left!r} {right!r} uses or makes a token outside the vocabulary"
        if merged in produced:
            return f"token {merged!r} is produced by two merges"
        identifier = vocab[merged]
        if identifier <= previous or identifier <= vocab[left] or identifier <= vocab[right]:
            return f"token ids do not grow with merge rank at {merged!r}"
        previous = identifier
        produced.add(merged)
    unmerged = [t for t, b in token_bytes.items() if len(b) > 1 and t not in produced]
    if unmerged:
        return f"{len(unmerged)} multi-byte tokens (e.g. {unmerged[0]!r}) are made by no merge"
    if len(set(token_bytes.values())) != len(token_bytes):
        return "two vocabulary entries decode to the same bytes"
    return None


class _TiktokenBPE:
    """tiktoken running a byte-level BPE given as a HuggingFace spec (already checked by _fast_path_refusal)."""

    def __init__(self, spec: dict, num_threads: int = 1) -> None:
        import tiktoken

        byte_decoder = _byte_decoder()
        added = {t["content"]: int(t["id"]) for t in spec.get("added_tokens", [])}
        ranks = {
            bytes(byte_decoder[char] for char in token): int(identifier)
            for token, identifier in spec["model"]["vocab"].items()
            if token not in added
        }
        self.num_threads = num_threads
        self.added = added
        overlapping = any(a != b and a in b for a in added for b in added)
        # Non-overlapping added tokens can be tiktoken specials: its alternation then has one match per place.
        self.split_in_python = overlapping
        self.encoding = tiktoken.Encoding(
            name="phi1-bytelevel-bpe",
            pat_str=GPT2_PATTERN,
            mergeable_ranks=ranks,
            special_tokens={} if overlapping else added,
        )
        longest_first = sorted(added, key=len, reverse=True)
        self.added_pattern = re.compile("|".join(re.escape(t) for t in longest_first)) if added else None

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # tiktoken's *_batch calls start a thread pool each time: only worth it with several threads.
        if not self.added:
            if self.num_threads > 1:
                return self.encoding.encode_ordinary_batch(texts, num_threads=self.num_threads)
            return [self.encoding.encode_ordinary(text) for text in texts]
        if not self.split_in_python:
            if self.num_threads > 1:
                return self.encoding.encode_batch(texts, num_threads=self.num_threads, allowed_special="all")
            return [self.encoding.encode(text, allowed_special="all") for text in texts]
        return [self._encode_split(text) for text in texts]

    def _encode_split(self, text: str) -> list[int]:
        # Leftmost-longest matching of added tokens, as HuggingFace's AddedVocabulary does.
        pieces: list[str] = []
        identifiers: list[int | None] = []
        position = 0
        for match in self.added_pattern.finditer(text):
            if match.start() > position:
                pieces.append(text[position : match.start()])
                identifiers.append(None)
            identifiers.append(self.added[match.group()])
            pieces.append("")
            position = match.end()
        if position < len(text):
            pieces.append(text[position:])
            identifiers.append(None)
        # One call per piece: encode_ordinary_batch would start a thread pool per document.
        encode_ordinary = self.encoding.encode_ordinary
        result: list[int] = []
        for piece, identifier in zip(pieces, identifiers):
            if identifier is None:
                result.extend(encode_ordinary(piece))
            else:
                result.append(identifier)
        return result


TOKENIZER_TYPES = ("SentencePieceTokenizer", "HuggingFaceTokenizer", "GPT2BPETokenizer")
# The largest real tokenizer files are tens of MB (a 256k-entry tokenizer.json); parsing JSON costs ~10x its size
# in memory, so a file beyond this is refused as "not a tokenizer" before it is read.
_MAX_TOKENIZER_FILE_BYTES = 256 << 20


def _refuse_oversized(path: str) -> None:
    size = os.path.getsize(path)
    if size > _MAX_TOKENIZER_FILE_BYTES:
        raise ValueError(f"{path}: {size} bytes, larger than any tokenizer file ({_MAX_TOKENIZER_FILE_BYTES} bytes); "
                         "check the path")


def build_tokenizer(
    tokenizer_type: str,
    tokenizer_model: str | os.PathLike | None = None,
    vocab_file: str | os.PathLike | None = None,
    merge_file: str | os.PathLike | None = None,
    engine: str = "auto",
    num_threads: int = 1,
) -> Tokenizer:
    """Builds a tokenizer by Megatron's type name.

    Args:
        tokenizer_type: one of TOKENIZER_TYPES, or "auto" (decided by `detect_tokenizer_type` from the files).
        tokenizer_model: .model file (SentencePiece), tokenizer.json or its directory (HuggingFace), or a
            directory holding vocab.json and merges.txt (GPT2BPE).
        vocab_file, merge_file: GPT2BPE files when not given as a directory.
        engine: byte-level BPE engine: "auto", "tiktoken" or "huggingface".
        num_threads: native threads per batch call.
    Raises:
        ValueError: unknown type or missing argument; FileNotFoundError: missing file.
    """
    if tokenizer_type == "auto":
        if tokenizer_model is not None:
            tokenizer_type = detect_tokenizer_type(tokenizer_model)
        elif vocab_file is not None and merge_file is not None:
            tokenizer_type = "GPT2BPETokenizer"
        else:
            raise ValueError("tokenizer type 'auto' needs the tokenizer file (--tokenizer-model / data.tokenizer_model)")
    if tokenizer_type == "SentencePieceTokenizer":
        if tokenizer_model is None:
            raise ValueError("SentencePieceTokenizer needs --tokenizer-model PATH.model")
        return SentencePieceTokenizer(tokenizer_model, num_threads=num_threads)
    if tokenizer_type == "HuggingFaceTokenizer":
        if tokenizer_model is None:
            raise ValueError("HuggingFaceTokenizer needs --tokenizer-model (tokenizer.json or its directory)")
        return HuggingFaceTokenizer(tokenizer_model, engine=engine, num_threads=num_threads)
    if tokenizer_type == "GPT2BPETokenizer":
        if tokenizer_model is not None:
            vocab_file = vocab_file or os.path.join(tokenizer_model, "vocab.json")
            merge_file = merge_file or os.path.join(tokenizer_model, "merges.txt")
        if vocab_file is None or merge_file is None:
            raise ValueError("GPT2BPETokenizer needs --tokenizer-model DIR or --vocab-file and --merge-file")
        return GPT2BPETokenizer(vocab_file, merge_file, engine=engine, num_threads=num_threads)
    raise ValueError(f"unknown tokenizer type {tokenizer_type!r}; choose one of {TOKENIZER_TYPES} or 'auto'")




def describe_directory(path: str | os.PathLike, shown: int = 8) -> str:
    """What a directory holds, in words, for error messages: 'an empty directory' or 'a directory holding a, b
    and N more' (the first `shown` names, sorted)."""
    try:
        names = sorted(os.listdir(path))
    except OSError as e:
        return f"a directory that cannot be listed ({e.strerror})"
    if not names:
        return "an empty directory"
    listed = ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")
    return f"a directory holding {listed}"


def _file_kind(path: str) -> str:
    """What a non-regular path is, in words (for error messages)."""
    import stat

    mode = os.stat(path).st_mode
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device file"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _is_sentencepiece_model(path: str) -> str | None:
    """None when `path` parses as a SentencePiece model, else why it does not."""
    import sentencepiece

    try:
        processor = sentencepiece.SentencePieceProcessor(model_file=path)
    except (RuntimeError, OSError, ValueError) as e:
        return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if processor.get_piece_size() < 1:
        return "the model has no pieces"
    return None


def _is_tokenizer_json(path: str) -> str | None:
    """None when `path` is a JSON object with a tokenizer `model` (HuggingFace's tokenizer.json), else why not."""
    try:
        with open(path, encoding="utf-8") as handle:
            spec = json.load(handle)
    except UnicodeDecodeError:
        return "not UTF-8 text"
    except (ValueError, RecursionError) as e:
        return f"not valid JSON ({type(e).__name__}: {e})"
    if not isinstance(spec, dict):
        return f"JSON {type(spec).__name__}, not an object"
    if not isinstance(spec.get("model"), dict):
        return "a JSON object without a tokenizer \"model\" entry"
    return None


def detect_tokenizer_type(path: str | os.PathLike) -> str:
    """Which of TOKENIZER_TYPES reads `path`, decided from the files themselves.

    - a SentencePiece `.model` file (the protobuf must really parse) -> "SentencePieceTokenizer";
    - a HuggingFace `tokenizer.json`, or a directory holding one -> "HuggingFaceTokenizer";
    - a directory holding GPT-2's `vocab.json` and `merges.txt` -> "GPT2BPETokenizer".

    A directory holding both tokenizer.json and vocab.json + merges.txt is HuggingFace (tokenizer.json is the
    complete description). Named pipes and devices are refused without being opened, so this never blocks.

    Raises:
        ValueError: `path` is none of these; the message names the path and says what it holds.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ValueError(f"{path}: no such file or directory; give a SentencePiece .model, a tokenizer.json (or its "
                         "directory) or a directory with vocab.json and merges.txt")
    if os.path.isdir(path):
        tokenizer_json = os.path.join(path, "tokenizer.json")
        if os.path.isfile(tokenizer_json):
            _refuse_oversized(tokenizer_json)
            problem = _is_tokenizer_json(tokenizer_json)
            if problem is not None:
                raise ValueError(f"{tokenizer_json}: not a HuggingFace tokenizer.json: {problem}")
            return "HuggingFaceTokenizer"
        if os.path.isfile(os.path.join(path, "vocab.json")) and os.path.isfile(os.path.join(path, "merges.txt")):
            return "GPT2BPETokenizer"
        hint = ""
        if os.path.isfile(os.path.join(path, "tokenizer.model")):
            hint = f"; for its SentencePiece model give the file {os.path.join(path, 'tokenizer.model')}"
        raise ValueError(f"{path}: no tokenizer found: {describe_directory(path)}; expected tokenizer.json, or "
                         f"vocab.json and merges.txt{hint}")
    if not os.path.isfile(path):
        raise ValueError(f"{path}: {_file_kind(path)}, not a tokenizer file")
    size = os.path.getsize(path)
    if size == 0:
        raise ValueError(f"{path}: an empty file, not a tokenizer; train one with tools/train_tokenizer.py")
    _refuse_oversized(path)
    with open(path, "rb") as handle:
        head = handle.read(64).lstrip()
    if head.startswith(b"{") or path.endswith(".json"):
        problem = _is_tokenizer_json(path)
        if problem is None:
            return "HuggingFaceTokenizer"
        raise ValueError(f"{path}: not a HuggingFace tokenizer.json: {problem}")
    problem = _is_sentencepiece_model(path)
    if problem is None:
        return "SentencePieceTokenizer"
    raise ValueError(f"{path}: a file of {size} bytes that is neither a tokenizer.json nor a SentencePiece model "
                     f"(SentencePiece says: {problem}); train one with tools/train_tokenizer.py")
