"""HuggingFace tokenizer files for an export, so `transformers.AutoTokenizer.from_pretrained(DIR)` gives the ids
phi1's own tokenizer gives.

    write_hf_tokenizer({"tokenizer.model": path}, export_dir, model_max_length=2048)

- A SentencePiece BPE model (what `tools/train_tokenizer.py` makes) is converted into a `tokenizers` BPE model:
  the same vocabulary and ids; merges derived from the pieces (every split of a piece into two pieces, ranked
  by the piece's score, which is the order SentencePiece merges in); spaces replaced by "▁" as SentencePiece's
  normaliser does (plus its dummy prefix when the model has one); user-defined pieces as added tokens matched on
  the normalised text (as SentencePiece matches them); byte fallback; a decoder that undoes "▁" and fuses byte
  pieces. `tokenizer.json`, `tokenizer_config.json` (PreTrainedTokenizerFast, no BOS/EOS added, no clean-up of
  spaces) and `special_tokens_map.json` are written; `tokenizer.model` is kept beside them.
- A HuggingFace `tokenizer.json` (codegen-style byte-level BPE) is passed through, with a `tokenizer_config.json`
  written when it has none; GPT-2 `vocab.json` + `merges.txt` get the `tokenizer.json` phi1 itself builds from
  them.

One known difference: SentencePiece never makes a control piece (`<|endoftext|>`) from text, while
transformers matches special tokens in text; text that contains the literal string `<|endoftext|>` encodes
differently. Written here rather than with `transformers.convert_slow_tokenizer` because its SentencePiece
converters assume Llama-style settings (a dummy prefix, whitespace splitting) that phi1's code tokenizer turns
off, and give other ids for indentation.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

EOD_TOKEN = "<|endoftext|>"
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_SP_BPE = 2


def sentencepiece_to_tokenizers(model_file: str | os.PathLike):
    """A `tokenizers.Tokenizer` that encodes and decodes like the SentencePiece BPE model in `model_file`.

    Raises:
        ValueError: the file is not a SentencePiece model, or uses settings this converter does not reproduce
            exactly (a unigram model, remove_extra_whitespaces, a non-identity normaliser without a charsmap).
    """
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(Path(model_file).read_bytes())
    except Exception as e:  # google.protobuf.message.DecodeError
        raise ValueError(f"{model_file}: not a SentencePiece model ({type(e).__name__})") from None
    if proto.trainer_spec.model_type != _SP_BPE:
        raise ValueError(f"{model_file}: a SentencePiece model of type {proto.trainer_spec.model_type}; only BPE models "
                         "(tools/train_tokenizer.py's) are exported with identical ids")
    spec = proto.normalizer_spec
    if spec.remove_extra_whitespaces:
        raise ValueError(f"{model_file}: remove_extra_whitespaces=true changes code; retrain with tools/train_tokenizer.py")
    pieces = [(p.piece, p.type) for p in proto.pieces]
    vocab = {piece: index for index, (piece, _) in enumerate(pieces)}
    mergeable = {piece for piece, kind in pieces if kind in (_NORMAL, _USER_DEFINED, _UNUSED)}
    merges = []
    for piece, kind in pieces:  # ids follow the score: the first piece merges first
        if kind != _NORMAL or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                merges.append((left, right))
    unk = next((piece for piece, kind in pieces if kind == _UNKNOWN), None)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True,
                                     byte_fallback=bool(proto.trainer_spec.byte_fallback)))
    steps = []
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    elif spec.name not in ("identity", ""):
        raise ValueError(f"{model_file}: normaliser {spec.name!r} without a charsmap cannot be reproduced")
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    if spec.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "▁"))
    if steps:
        tokenizer.normalizer = normalizers.Sequence(steps)
    # SentencePiece matches user-defined pieces against the normalised text without normalising the pieces, so a
    # piece the normaliser would change (runs of spaces, once spaces are "▁") never matches: leave those out.
    live = [piece for piece, kind in pieces if kind == _USER_DEFINED
            and not (spec.escape_whitespaces and " " in piece)]
    tokenizer.add_tokens([AddedToken(piece, normalized=True, special=False) for piece in live])
    tokenizer.add_special_tokens([AddedToken(piece, normalized=False, special=True)
                                  for piece, kind in pieces if kind in (_UNKNOWN, _CONTROL)])
    decode_steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if spec.add_dummy_prefix:
        decode_steps.append(decoders.Strip(" ", 1, 0))
    tokenizer.decoder = decoders.Sequence(decode_steps)
    return tokenizer


def _tokenizer_config(model_max_length: int, eos: str | None, unk: str | None) -> dict:
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
              "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False}
    if eos is not None:
        config["eos_token"] = eos
    if unk is not None:
        config["unk_token"] = unk
    return config


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def write_hf_tokenizer(files: dict[str, str | os.PathLike], out_dir: str | os.PathLike,
                       model_max_length: int) -> list[str]:
    """Write the HuggingFace tokenizer files of an export into `out_dir`.

    Args:
        files: {name: path} of the source tokenizer files (tokenizer.model, tokenizer.json, tokenizer_config.json,
            vocab.json, merges.txt, ...), already checked to be regular files inside their directory.
        out_dir: the export directory (exists).
        model_max_length: the model's context length, for tokenizer_config.json.

    Returns:
        The names written into `out_dir`.

    Raises:
        ValueError: a tokenizer that cannot be exported with identical ids (the message names the file).
    """
    out_dir = Path(out_dir)
    written: list[str] = []

    def copy(name: str) -> None:
        shutil.copyfile(files[name], out_dir / name)
        written.append(name)

    if "tokenizer.model" in files:
        tokenizer = sentencepiece_to_tokenizers(files["tokenizer.model"])
        tokenizer.save(str(out_dir / "tokenizer.json"))
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        eos = EOD_TOKEN if EOD_TOKEN in vocab else None
        unk = "<unk>" if "<unk>" in vocab else None
        _write_json(out_dir / "tokenizer_config.json", _tokenizer_config(model_max_length, eos, unk))
        _write_json(out_dir / "special_tokens_map.json", {k: v for k, v in (("eos_token", eos), ("unk_token", unk)) if v})
        copy("tokenizer.model")
        return ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", *written]
    if "tokenizer.json" in files:
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                     "vocab.json", "merges.txt"):
            if name in files:
                copy(name)
    elif "vocab.json" in files and "merges.txt" in files:
        from phi1.data.tokenizers import GPT2BPETokenizer

        gpt2 = GPT2BPETokenizer(files["vocab.json"], files["merges.txt"], engine="huggingface")
        gpt2.hf.save(str(out_dir / "tokenizer.json"))
        written.append("tokenizer.json")
        for name in ("vocab.json", "merges.txt"):
            copy(name)
    else:
        return written
    if "tokenizer_config.json" not in written:
        import tokenizers

        vocab = tokenizers.Tokenizer.from_file(str(out_dir / "tokenizer.json")).get_vocab(with_added_tokens=True)
        eos = EOD_TOKEN if EOD_TOKEN in vocab else None
        _write_json(out_dir / "tokenizer_config.json", _tokenizer_config(model_max_length, eos, None))
        written.append("tokenizer_config.json")
    return written
