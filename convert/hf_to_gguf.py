"""Hugging Face Llama checkpoint -> F16/F32 GGUF, streamed one tensor at a time.

The order follows gguf.GGUFWriter's states: every tensor's info is declared
from the safetensors headers first (no data read), then the header, key/values
and tensor infos are written, then each tensor is read, permuted, cast,
written and freed. Peak memory is about one tensor in float32 plus its cast.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import gguf
import numpy as np

from runtime.errors import ConversionError, UnsupportedArchitecture

from .checkpoint import LlamaConfig, TensorRef, index_tensors, load_tensor, read_config

log = logging.getLogger(__name__)

ARCH = gguf.MODEL_ARCH.LLAMA
OUT_TYPES = {"f16": (np.float16, gguf.LlamaFileType.MOSTLY_F16), "f32": (np.float32, gguf.LlamaFileType.ALL_F32)}

# Tensors HF keeps that llama.cpp recomputes.
_SKIP_SUFFIXES = (".rotary_emb.inv_freq",)


@dataclass
class ExportReport:
    path: Path
    n_tensors: int
    n_params: int
    seconds: float


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF -> llama.cpp rotary layout for q_proj / k_proj (k with n_head_kv).

    HF's rotate_half pairs dimension i with i + head_dim/2 inside each head;
    llama.cpp (like Meta's original checkpoints) pairs 2i with 2i+1. HF's own
    converter permuted Meta's weights one way; this undoes it.
    w: (n_head * head_dim, n_embd) -> same shape, rows reordered per head.
    """
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_vocab(folder: Path, n_vocab: int) -> tuple[list[bytes], list[float], list[int], dict[str, int]]:
    """tokens, scores, token types from tokenizer.model, padded to n_vocab; and its special ids."""
    from sentencepiece import SentencePieceProcessor

    path = folder / "tokenizer.model"
    if not path.is_file():
        raise UnsupportedArchitecture(f"{folder.name}: no tokenizer.model; llamabox converts Llama checkpoints with a SentencePiece tokenizer")
    sp = SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(path))
    except (OSError, RuntimeError) as e:
        raise ConversionError(f"{path} is not a SentencePiece model: {e}") from e
    if sp.vocab_size() > n_vocab:
        raise ConversionError(f"tokenizer.model has {sp.vocab_size()} pieces but config.json vocab_size is {n_vocab}")
    T = gguf.TokenType
    tokens = [f"[PAD{i}]".encode() for i in range(n_vocab)]
    scores = [-10000.0] * n_vocab
    types = [T.UNUSED] * n_vocab
    for i in range(sp.vocab_size()):
        tokens[i] = sp.IdToPiece(i).encode("utf-8")
        scores[i] = sp.GetScore(i)
        if sp.IsUnknown(i):
            types[i] = T.UNKNOWN
        elif sp.IsControl(i):
            types[i] = T.CONTROL
        elif sp.IsUnused(i):
            types[i] = T.UNUSED
        elif sp.IsByte(i):
            types[i] = T.BYTE
        else:
            types[i] = T.NORMAL
    # Tokens added on top of the SentencePiece model (HF's added_tokens_decoder).
    cfg_path = folder / "tokenizer_config.json"
    if cfg_path.is_file():
        import json

        added = json.loads(cfg_path.read_text(encoding="utf-8")).get("added_tokens_decoder", {}) or {}
        for sid, tok in added.items():
            i = int(sid)
            if not 0 <= i < n_vocab or i < sp.vocab_size():
                continue  # pieces the SentencePiece model already defines keep their own type
            tokens[i] = str(tok["content"]).encode("utf-8")
            scores[i] = -1000.0
            types[i] = T.CONTROL if tok.get("special") else T.USER_DEFINED
    specials = {"bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id(), "pad": sp.pad_id()}
    return tokens, scores, [int(t) for t in types], {k: v for k, v in specials.items() if 0 <= v < n_vocab}


def _plan(cfg: LlamaConfig, refs: dict[str, TensorRef], out_dtype) -> list[tuple[str, TensorRef, type]]:
    """(gguf name, source, numpy dtype) for every tensor, in llama.cpp's usual order."""
    names = gguf.get_tensor_name_map(ARCH, cfg.n_layer)
    plan = []
    for hf_name, ref in refs.items():
        if hf_name.endswith(_SKIP_SUFFIXES):
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ConversionError(f"tensor {hf_name!r} has no llama.cpp counterpart; is this really a plain Llama?")
        dtype = np.float32 if len(ref.shape) == 1 else out_dtype  # norms stay F32
        plan.append((name, ref, dtype))
    got = {p[0] for p in plan}
    need = {gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.TOKEN_EMBD] + ".weight", gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.OUTPUT_NORM] + ".weight"}
    if not cfg.tie_embeddings:
        need.add(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.OUTPUT] + ".weight")
    for bid in range(cfg.n_layer):
        for t in (gguf.MODEL_TENSOR.ATTN_Q, gguf.MODEL_TENSOR.ATTN_K, gguf.MODEL_TENSOR.ATTN_V, gguf.MODEL_TENSOR.ATTN_OUT,
                  gguf.MODEL_TENSOR.FFN_GATE, gguf.MODEL_TENSOR.FFN_UP, gguf.MODEL_TENSOR.FFN_DOWN,
                  gguf.MODEL_TENSOR.ATTN_NORM, gguf.MODEL_TENSOR.FFN_NORM):
            need.add(gguf.TENSOR_NAMES[t].format(bid=bid) + ".weight")
    missing = sorted(need - got)
    if missing:
        raise ConversionError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[0]}")
    order = {"token_embd": 0, "blk": 1, "output_norm": 2, "output": 3}

    def key(p):
        parts = p[0].split(".")
        return (order.get(parts[0], 4), int(parts[1]) if parts[0] == "blk" else 0, p[0])

    return sorted(plan, key=key)


def _check_shape(name: str, ref: TensorRef, cfg: LlamaConfig) -> None:
    e, kv = cfg.n_embd, cfg.n_head_kv * cfg.head_dim
    want = {
        "token_embd.weight": (cfg.n_vocab, e), "output.weight": (cfg.n_vocab, e), "output_norm.weight": (e,),
        "attn_q.weight": (e, e), "attn_k.weight": (kv, e), "attn_v.weight": (kv, e), "attn_output.weight": (e, e),
        "ffn_gate.weight": (cfg.n_ff, e), "ffn_up.weight": (cfg.n_ff, e), "ffn_down.weight": (e, cfg.n_ff),
        "attn_norm.weight": (e,), "ffn_norm.weight": (e,),
    }
    suffix = ".".join(name.split(".")[-2:]) if name.startswith("blk.") else name
    if suffix in want and ref.shape != want[suffix]:
        raise ConversionError(f"tensor {ref.name!r} has shape {list(ref.shape)}, config.json implies {list(want[suffix])}")


def export_gguf(
    src: Path,
    dst: Path,
    outtype: str = "f16",
    name: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ExportReport:
    """Write `src` (HF folder) as a GGUF at `dst`. The caller handles temp files and renames."""
    if outtype not in OUT_TYPES:
        raise ConversionError(f"outtype must be one of {', '.join(OUT_TYPES)}, got {outtype!r}")
    t0 = time.monotonic()
    cfg = read_config(src)
    tokens, scores, types, sp_specials = read_vocab(src, cfg.n_vocab)
    refs = index_tensors(src)
    out_dtype, ftype = OUT_TYPES[outtype]
    plan = _plan(cfg, refs, out_dtype)
    for gname, ref, _ in plan:
        _check_shape(gname, ref, cfg)

    w = gguf.GGUFWriter(dst, gguf.MODEL_ARCH_NAMES[ARCH])
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name or src.name)
    w.add_vocab_size(cfg.n_vocab)
    w.add_context_length(cfg.n_ctx_train)
    w.add_embedding_length(cfg.n_embd)
    w.add_feed_forward_length(cfg.n_ff)
    w.add_block_count(cfg.n_layer)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_head_kv)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_file_type(ftype)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    # bos/eos/unk/pad ids, add_bos/add_eos and the chat template, from the HF tokenizer files;
    # ids the HF files leave out come from the SentencePiece model itself.
    special = gguf.SpecialVocab(src, load_merges=False, n_vocab=len(tokens))
    for kind, tid in sp_specials.items():
        special.special_token_ids.setdefault(kind, tid)
    special.add_to_gguf(w)

    n_params = 0
    for gname, ref, dtype in plan:
        w.add_tensor_info(gname, ref.shape, np.dtype(dtype), int(np.prod(ref.shape)) * np.dtype(dtype).itemsize)
        n_params += int(np.prod(ref.shape))

    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for i, (gname, ref, dtype) in enumerate(plan):
            data = load_tensor(ref)
            if gname.endswith("attn_q.weight"):
                data = permute_qk(data, cfg.n_head)
            elif gname.endswith("attn_k.weight"):
                data = permute_qk(data, cfg.n_head_kv)
            data = data.astype(dtype, copy=False)
            if not np.isfinite(data).all():
                raise ConversionError(f"tensor {ref.name!r} has non-finite values after casting to {np.dtype(dtype).name}")
            w.write_tensor_data(data)
            del data
            if progress:
                progress(i + 1, len(plan))
        w.fout[0].flush()
        os.fsync(w.fout[0].fileno())
    finally:
        w.close()
    return ExportReport(dst, len(plan), n_params, time.monotonic() - t0)
