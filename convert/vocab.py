"""A Llama 2 family tokenizer -> GGUF's tokenizer.* keys, as llama.cpp's reference converter writes them.

The vocabulary has config.json's vocab_size entries. Three sources fill it, a later one
overriding an earlier one for the same id (the reference converter's rules, in
convert_hf_to_gguf.py's SentencePiece path):

1. tokenizer.model (SentencePiece): each piece's text and score; its type NORMAL, UNKNOWN,
   CONTROL, UNUSED or BYTE.
2. added_tokens.json ({text: id}, older fine-tunes): USER_DEFINED, score -1000, text as written.
3. tokenizer_config.json's added_tokens_decoder ({id: {content, special, ...}}), ids inside the
   SentencePiece vocabulary included: Llama 2's lists <unk>, <s> and </s>, which so become
   CONTROL with score -1000. A token is CONTROL when marked special or when its text looks
   like a control token (looks_special); otherwise USER_DEFINED, with "▁" written as a space,
   since llama.cpp matches user-defined tokens in the raw text, where a space is still a space.

Ids none of them name are padding: "[PAD{id}]", score -10000, UNUSED. Ids of added tokens at or
beyond vocab_size have no embedding row; they are left out with a warning, as the reference does.

Special ids, add_bos/add_eos and the chat template come from gguf.SpecialVocab over
tokenizer.json, tokenizer_config.json and config.json, as the reference reads them; ids those
files leave out come from tokenizer.model (see Vocab.sp_special_ids).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from runtime.errors import ConversionError, UnsupportedArchitecture

log = logging.getLogger(__name__)

T = gguf.TokenType
ADDED_SCORE = -1000.0     # score of every added token (SentencePiece scores are log-probs or -rank)
PAD_SCORE = -10000.0      # score of padding ids beyond the tokenizer
SPIECE_SPACE = "\u2581"   # "▁": SentencePiece's space

# Code Llama's infill end token, a piece of its tokenizer.model (id 32010). The reference
# converter writes tokenizer.ggml.eot_token_id for it; llama.cpp then ends infill generation
# there. (llama.cpp finds <PRE>/<SUF>/<MID> by their text at load time.)
CODE_LLAMA_EOT = SPIECE_SPACE + "<EOT>"

PULL_GGUF_HINT = "fetch a prebuilt GGUF instead: llamabox pull NAME --gguf owner/name:file.gguf"


@dataclass
class Vocab:
    tokens: list[bytes]       # n_vocab entries, UTF-8
    scores: list[float]       # n_vocab entries
    types: list[int]          # n_vocab gguf.TokenType values
    sp_special_ids: dict[str, int]  # bos/eos/unk/pad as tokenizer.model defines them (absent ones left out)
    add_space_prefix: bool | None   # tokenizer_config.json's add_prefix_space, when it gives one


def looks_special(text: str) -> bool:
    """Added tokens some fine-tunes forget to mark special, which the reference converter makes CONTROL anyway:
    <pad> (deepseek-coder), <mask>, <2mass>, [@BOS@], <unused...> (gemma), <|...|> and <｜...｜>."""
    return (
        text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or text.startswith("<|") and text.endswith("|>")
        or text.startswith("<\uff5c") and text.endswith("\uff5c>")
        or text.startswith("<unused") and text.endswith(">")
    )


def tokenizer_model(folder: Path) -> Path:
    """The SentencePiece tokenizer.model; a checkpoint without one is refused, naming what it has instead."""
    path = folder / "tokenizer.model"
    if path.is_file():
        return path
    tj = folder / "tokenizer.json"
    if tj.is_file():
        model = _read_json(tj).get("model")
        kind = model.get("type", "unknown") if isinstance(model, dict) else "unknown"
        raise UnsupportedArchitecture(
            f"{folder.name}: its tokenizer is a {kind} tokenizer.json without a SentencePiece tokenizer.model "
            f"(Llama 3 and SmolLM ship only this, and so do some Llama 2 fine-tunes), which llamabox cannot convert; "
            f"{PULL_GGUF_HINT}"
        )
    raise UnsupportedArchitecture(
        f"{folder.name}: no tokenizer.model; llamabox converts Llama checkpoints with a SentencePiece tokenizer; {PULL_GGUF_HINT}"
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path.name} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ConversionError(f"{path.name} is not a JSON object")
    return data


def _token_id(source: str, raw: Any) -> int:
    try:
        i = int(raw)
    except (TypeError, ValueError):
        raise ConversionError(f"{source}: token id {raw!r} is not an integer") from None
    if i < 0:
        raise ConversionError(f"{source}: token id {i} is negative")
    return i


def read_vocab(folder: Path, n_vocab: int) -> Vocab:
    from sentencepiece import SentencePieceProcessor

    path = tokenizer_model(folder)
    sp = SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(path))
    except (OSError, RuntimeError) as e:
        raise ConversionError(f"{path} is not a SentencePiece model: {e}") from e
    # The reference drops pieces beyond vocab_size with a warning; they would have no embedding
    # row, and text would tokenize into ids the model cannot take, so we refuse.
    if sp.vocab_size() > n_vocab:
        raise ConversionError(f"tokenizer.model has {sp.vocab_size()} pieces but config.json vocab_size is {n_vocab}")

    tokens = [f"[PAD{i}]".encode() for i in range(n_vocab)]
    scores = [PAD_SCORE] * n_vocab
    types = [int(T.UNUSED)] * n_vocab
    for i in range(sp.vocab_size()):
        tokens[i] = sp.IdToPiece(i).encode("utf-8")
        scores[i] = sp.GetScore(i)
        types[i] = int(T.UNKNOWN if sp.IsUnknown(i) else T.CONTROL if sp.IsControl(i) else
                       T.UNUSED if sp.IsUnused(i) else T.BYTE if sp.IsByte(i) else T.NORMAL)

    def in_range(source: str, i: int, text: str) -> bool:
        if i < n_vocab:
            return True
        log.warning("%s: added token %r has id %d, beyond vocab_size %d; left out", source, text, i, n_vocab)
        return False

    added_json = folder / "added_tokens.json"
    if added_json.is_file():
        for text, raw in _read_json(added_json).items():
            i = _token_id("added_tokens.json", raw)
            if in_range("added_tokens.json", i, text):
                tokens[i], scores[i], types[i] = text.encode("utf-8"), ADDED_SCORE, int(T.USER_DEFINED)

    add_space_prefix = None
    cfg_path = folder / "tokenizer_config.json"
    if cfg_path.is_file():
        tok_cfg = _read_json(cfg_path)
        if tok_cfg.get("add_prefix_space") is not None:
            add_space_prefix = bool(tok_cfg["add_prefix_space"])
        decoder = tok_cfg.get("added_tokens_decoder") or {}
        if not isinstance(decoder, dict):
            raise ConversionError(f"tokenizer_config.json: added_tokens_decoder should be an object, got {type(decoder).__name__}")
        for raw, entry in decoder.items():
            i = _token_id("tokenizer_config.json added_tokens_decoder", raw)
            if not isinstance(entry, dict) or not isinstance(entry.get("content"), str):
                raise ConversionError(f"tokenizer_config.json: added_tokens_decoder[{raw!r}] has no string 'content'")
            text = entry["content"]
            if not in_range("tokenizer_config.json", i, text):
                continue
            if types[i] != T.UNUSED and tokens[i] != text.encode("utf-8"):
                log.warning("token %d: tokenizer_config.json replaces %r with %r", i, tokens[i].decode("utf-8", "replace"), text)
            if entry.get("special") or looks_special(text):
                types[i] = int(T.CONTROL)
            else:
                types[i] = int(T.USER_DEFINED)
                text = text.replace(SPIECE_SPACE, " ")
            tokens[i], scores[i] = text.encode("utf-8"), ADDED_SCORE

    specials = {"bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id(), "pad": sp.pad_id()}
    return Vocab(tokens, scores, types, {k: v for k, v in specials.items() if 0 <= v < n_vocab}, add_space_prefix)


def add_vocab(w: gguf.GGUFWriter, folder: Path, vocab: Vocab) -> None:
    """Write the tokenizer.* keys of `vocab` (read from `folder`) to `w`."""
    if vocab.add_space_prefix is not None:
        w.add_add_space_prefix(vocab.add_space_prefix)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(vocab.tokens)
    w.add_token_scores(vocab.scores)
    w.add_token_types(vocab.types)
    special = gguf.SpecialVocab(folder, load_merges=False, n_vocab=len(vocab.tokens))
    # Deliberately unlike the reference: ids the HF files leave out (unk, when there is no
    # tokenizer.json) come from tokenizer.model, rather than from llama.cpp's built-in guesses.
    for kind, tid in vocab.sp_special_ids.items():
        special.special_token_ids.setdefault(kind, tid)
    special.add_to_gguf(w, quiet=True)
    # The reference keys this on vocab_size == 32016 (Code Llama's) and id 32010; we key it on the
    # piece itself, which is the same on Code Llama and right on fine-tunes that add tokens to it.
    eot = CODE_LLAMA_EOT.encode("utf-8")
    if eot in vocab.tokens:
        w.add_eot_token_id(vocab.tokens.index(eot))
