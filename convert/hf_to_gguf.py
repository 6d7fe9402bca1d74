"""Hugging Face Llama 2 family checkpoint -> F32/F16/BF16 GGUF, streamed one tensor at a time.

The GGUF's keys and values are those llama.cpp's reference converter (convert_hf_to_gguf.py,
with transformers' config defaults) writes for the same checkpoint; tests/test_convert_golden.py
diffs them against its recorded output and lists where we differ on purpose.

The order follows gguf.GGUFWriter's states: every tensor's info is declared from the
safetensors headers first (no data read), then the header, key/values and tensor infos are
written, then each tensor is read, permuted, cast, written and freed. Peak memory is about one
tensor in float32 plus its cast.
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

from runtime.errors import ConversionError

from .checkpoint import LlamaConfig, TensorRef, index_tensors, load_tensor, read_config
from .vocab import add_vocab, read_vocab

log = logging.getLogger(__name__)

ARCH = gguf.MODEL_ARCH.LLAMA
Q = gguf.GGMLQuantizationType
# outtype -> (GGML type of weight matrices, general.file_type). Norms (1-D) are always F32.
OUT_TYPES = {
    "f32": (Q.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
}
F16_MAX = float(np.finfo(np.float16).max)  # 65504

# Tensors HF keeps that llama.cpp recomputes.
_SKIP_SUFFIXES = (".rotary_emb.inv_freq",)


@dataclass
class ExportReport:
    path: Path
    n_tensors: int
    n_params: int
    seconds: float
    # F16 output only: weights whose magnitude is beyond F16's largest value (65504), written as
    # ±65504. Only BF16 or F32 sources can have them; `bf16` (or `f32`) keeps them exactly.
    f16_overflow: int = 0


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF -> llama.cpp rotary layout for q_proj / k_proj (k with n_head_kv).

    HF's rotate_half pairs dimension i with i + head_dim/2 inside each head;
    llama.cpp (like Meta's original checkpoints) pairs 2i with 2i+1. HF's own
    converter permuted Meta's weights one way; this undoes it.
    w: (n_head * head_dim, n_embd) -> same shape, rows reordered per head.
    """
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _plan(cfg: LlamaConfig, refs: dict[str, TensorRef], out_type: Q) -> list[tuple[str, TensorRef, Q]]:
    """(gguf name, source, GGML type) for every tensor, in `refs`' order (the reference converter's)."""
    names = gguf.get_tensor_name_map(ARCH, cfg.n_layer)
    plan = []
    for hf_name, ref in refs.items():
        if hf_name.endswith(_SKIP_SUFFIXES):
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ConversionError(f"tensor {hf_name!r} has no llama.cpp counterpart; is this really a plain Llama?")
        plan.append((name, ref, Q.F32 if len(ref.shape) == 1 else out_type))  # norms stay F32
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
    return plan


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


def _add_hparams(w: gguf.GGUFWriter, cfg: LlamaConfig) -> None:
    """llama.* keys. transformers' LlamaConfig fills head_dim, num_key_value_heads and rope_theta when
    config.json leaves them out, and the reference converter writes what it fills, so we write them always."""
    w.add_vocab_size(cfg.n_vocab)
    w.add_block_count(cfg.n_layer)
    w.add_context_length(cfg.n_ctx_train)
    w.add_embedding_length(cfg.n_embd)
    w.add_feed_forward_length(cfg.n_ff)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_head_kv)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_eps)
    s = cfg.rope_scaling
    if s is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR if s.kind == "linear" else gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(s.factor)
        if s.kind == "yarn":
            w.add_rope_scaling_orig_ctx_len(s.orig_ctx)
            for value, add in ((s.ext_factor, w.add_rope_scaling_yarn_ext_factor), (s.attn_factor, w.add_rope_scaling_yarn_attn_factor),
                               (s.beta_fast, w.add_rope_scaling_yarn_beta_fast), (s.beta_slow, w.add_rope_scaling_yarn_beta_slow)):
                if value is not None:
                    add(value)
    if cfg.sliding_window is not None and cfg.sliding_window < cfg.n_ctx_train:
        # As the reference converter does: llama.cpp's llama architecture has no sliding window.
        log.warning("%s: sliding_window %d is not kept; llama.cpp attends over the whole context, so outputs "
                    "match the checkpoint's for up to %d tokens and may differ beyond", cfg.arch, cfg.sliding_window, cfg.sliding_window)


def _add_general(w: gguf.GGUFWriter, src: Path, name: str | None) -> None:
    """general.* keys from the model card, config.json, generation_config.json and the folder name, through
    gguf.Metadata as the reference converter does; `name` overrides general.name (its --model-name).
    Call after every tensor info is added: the size label counts their parameters."""
    import yaml  # gguf's own dependency, for the model card's front matter

    total, shared, expert, n_expert = w.get_total_parameter_count()
    try:
        meta = gguf.Metadata.load(None, src, name, total)
    except yaml.YAMLError as e:
        raise ConversionError(f"README.md: the model card's front matter is not valid YAML ({e}); fix or remove README.md") from None
    if meta.name is None:
        meta.name = src.name
    if meta.size_label is None and total > 0:
        meta.size_label = gguf.size_label(total, shared, expert, n_expert)
    if meta.sampling_penalty_repeat is None:
        # gguf 0.19.0 on PyPI does not read transformers' name for it; the reference's newer gguf-py does.
        rp = gguf.Metadata.load_generation_config(src).get("repetition_penalty")
        if isinstance(rp, (int, float)) and not isinstance(rp, bool):
            meta.sampling_penalty_repeat = float(rp)
    meta.set_gguf_meta_model(w)


def _cast(data: np.ndarray, qtype: Q, ref: TensorRef) -> tuple[np.ndarray, int]:
    """float32 `data` as `qtype`'s bytes (numpy dtype), and how many weights overflowed F16 and were clamped to ±65504."""
    if not np.isfinite(data).all():
        raise ConversionError(f"tensor {ref.name!r} holds non-finite values (NaN or inf) in the checkpoint")
    overflow = 0
    if qtype == Q.F16:
        with np.errstate(over="ignore"):  # the overflow is what we count
            as_f16 = data.astype(np.float16)
        overflow = int(np.count_nonzero(np.isinf(as_f16)))  # 65504 < |x| < 65520 rounds down to 65504, no overflow
        del as_f16
        if overflow:
            data = np.clip(data, -F16_MAX, F16_MAX)
    return gguf.quants.quantize(data, qtype), overflow  # F16/F32: numpy casts; BF16: round to nearest even


def export_gguf(
    src: Path,
    dst: Path,
    outtype: str = "f16",
    name: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ExportReport:
    """Write `src` (HF folder) as a GGUF at `dst`. The caller handles temp files and renames.

    `name`: general.name (default: the reference converter's, from the model card or folder name)."""
    if outtype not in OUT_TYPES:
        raise ConversionError(f"outtype must be one of {', '.join(OUT_TYPES)}, got {outtype!r}")
    t0 = time.monotonic()
    cfg = read_config(src)
    vocab = read_vocab(src, cfg.n_vocab)
    refs = index_tensors(src)
    out_type, ftype = OUT_TYPES[outtype]
    plan = _plan(cfg, refs, out_type)
    for gname, ref, _ in plan:
        _check_shape(gname, ref, cfg)
    if out_type == Q.BF16 and any(r.dtype == "F16" for _, r, q in plan if q == Q.BF16):
        # F16 has 10 mantissa bits, BF16 7: the F16 weights lose 3 bits each (their range is safe).
        log.warning("%s stores F16 weights; bf16 keeps 3 fewer mantissa bits of them: f16 is the lossless choice",
                    src.name)

    w = gguf.GGUFWriter(dst, gguf.MODEL_ARCH_NAMES[ARCH])
    n_params = 0
    for gname, ref, qtype in plan:
        n = int(np.prod(ref.shape))
        # Element shape in numpy order; F32/F16 by numpy dtype, BF16 by raw_dtype (2 bytes per weight).
        if qtype == Q.BF16:
            w.add_tensor_info(gname, ref.shape, np.dtype(np.uint16), n * 2, raw_dtype=Q.BF16)
        else:
            dtype = np.dtype(np.float32 if qtype == Q.F32 else np.float16)
            w.add_tensor_info(gname, ref.shape, dtype, n * dtype.itemsize)
        n_params += n
    w.add_type(gguf.GGUFType.MODEL)
    _add_general(w, src, name)
    _add_hparams(w, cfg)
    w.add_file_type(ftype)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_vocab(w, src, vocab)

    overflow = 0
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for i, (gname, ref, qtype) in enumerate(plan):
            data = load_tensor(ref)
            if gname.endswith("attn_q.weight"):
                data = permute_qk(data, cfg.n_head)
            elif gname.endswith("attn_k.weight"):
                data = permute_qk(data, cfg.n_head_kv)
            data, n_over = _cast(data, qtype, ref)
            if n_over:
                log.warning("%s: %d weights beyond ±%g written as ±%g", ref.name, n_over, F16_MAX, F16_MAX)
                overflow += n_over
            w.write_tensor_data(data)
            del data
            if progress:
                progress(i + 1, len(plan))
        w.fout[0].flush()
        os.fsync(w.fout[0].fileno())
    finally:
        w.close()
    if overflow:
        log.warning("%s: %d weights overflow F16 and were clamped to ±%g; convert with --quant bf16 to keep them",
                    src.name, overflow, F16_MAX)
    return ExportReport(dst, len(plan), n_params, time.monotonic() - t0, overflow)
