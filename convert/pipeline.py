"""HF checkpoint -> lossless GGUF -> quantized GGUFs, into the store or a folder.

The intermediate GGUF keeps the checkpoint's weights exactly: BF16 for a BF16 checkpoint, F16
for an F16 one, F32 otherwise, so no quantized output depends on F16's range. The float
outputs `f16` and `bf16` are written straight from the checkpoint (or copied from the
intermediate when it already is that type); `f16` reports the weights beyond F16's range.

Every file is written under a partial name and renamed only when complete, so
an interrupted conversion leaves nothing that `llamabox list` shows; the next
write to the store removes the leftovers (see convert/store.py).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from runtime.errors import ConversionError, InvalidParameter
from runtime.quantize import QUANT_TYPES, quantize

from .checkpoint import index_tensors, read_config
from .hf_to_gguf import export_gguf
from .store import TMP_MARK, Store, check_model_id, fsync_path, model_id_for, sha256_file, source_fingerprint
from .vocab import tokenizer_model

log = logging.getLogger(__name__)

# A progress callback: (done, total) in units of tensors for the intermediate GGUF's pass.
Progress = Callable[[int, int], None]

# Output types our exporter writes itself (llama.cpp's quantizer makes the others).
FLOAT_TYPES = ("f16", "bf16")


@dataclass
class QuantReport:
    quant: str
    path: Path
    size_bytes: int
    bits_per_weight: float
    seconds: float
    f16_overflow: int = 0  # f16 only: weights beyond ±65504 in the checkpoint, written as ±65504 (see ExportReport)


def parse_quants(spec: str) -> list[str]:
    quants = [q.strip().lower() for q in spec.split(",") if q.strip()]
    if not quants:
        raise InvalidParameter("quant", "name at least one quantization type")
    known = list(QUANT_TYPES) + [t for t in FLOAT_TYPES if t not in QUANT_TYPES]
    for q in quants:
        if q not in known:
            raise InvalidParameter("quant", f"{q!r} is not one of {', '.join(known)}")
    return list(dict.fromkeys(quants))


def has_chat_template(src: Path) -> bool:
    """Whether an HF folder's tokenizer_config.json has a chat template (which the GGUF then carries)."""
    try:
        cfg = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and bool(cfg.get("chat_template"))


def _check_disk(folder: Path, n_params: int, quants: list[str], intermediate: str) -> None:
    # The intermediate (2 or 4 bytes/weight) plus each output (at most 2 bytes/weight), plus 5% slack.
    need = int(n_params * (_BYTES[intermediate] + 2 * len(quants)) * 1.05)
    free = shutil.disk_usage(folder).free
    if free < need:
        raise ConversionError(f"not enough disk in {folder}: about {need / 2**30:.1f} GiB needed, {free / 2**30:.1f} GiB free")


_BYTES = {"f32": 4, "f16": 2, "bf16": 2}


def _inspect(src: Path) -> tuple[int, str]:
    """(number of weights, lossless intermediate type) of a checkpoint, from its headers only."""
    read_config(src)  # refuse non-Llama, and tokenizers we cannot convert, before counting anything
    tokenizer_model(src)
    n, dtypes = 0, set()
    for ref in index_tensors(src).values():
        k = 1
        for d in ref.shape:
            k *= d
        n += k
        if len(ref.shape) > 1:  # norms are written as F32 whatever the checkpoint stores
            dtypes.add(ref.dtype)
    if dtypes == {"BF16"}:
        return n, "bf16"
    if dtypes == {"F16"}:
        return n, "f16"
    return n, "f32"  # F32, mixed, or PyTorch .bin files (whose dtypes the index does not say)


def checkpoint_fingerprint(src: Path) -> str:
    """A cheap fingerprint of a local HF checkpoint, so the store can tell two checkpoints apart.

    Not a full hash (that would read all 13 GB of a 7B model): the small files that define the
    model (config, tokenizer, shard index) are hashed whole; each weight file adds its name, its
    size and its first and last 64 KiB, which hold the safetensors header (every tensor's name,
    dtype, shape and offset) and real weights at both ends. Two different checkpoints differ
    there in practice; a change confined to the middle of a weight file is not seen.
    """
    h = hashlib.sha256()
    for name in _DEFINING_FILES:
        p = src / name
        if p.is_file():
            h.update(f"{name}\0{sha256_file(p)}\0".encode())
    for p in sorted(src.glob("*.safetensors")) + sorted(src.glob("pytorch_model*.bin")):
        size = p.stat().st_size
        h.update(f"{p.name}\0{size}\0".encode())
        with open(p, "rb") as f:
            h.update(f.read(_EDGE))
            f.seek(max(size - _EDGE, 0))
            h.update(f.read(_EDGE))
    return f"local:{h.hexdigest()}"


_DEFINING_FILES = ("config.json", "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "model.safetensors.index.json",
                   "pytorch_model.bin.index.json")
_EDGE = 64 * 1024


def convert(
    src: Path,
    quants: list[str],
    *,
    store: Store | None = None,
    model_id: str | None = None,
    out_dir: Path | None = None,
    source: dict[str, Any] | None = None,
    force: bool = False,
    n_threads: int = 0,
    progress: Progress | None = None,
    chat: bool | None = None,
) -> list[QuantReport]:
    """Convert `src` to every type in `quants`, into `store` (as model_id) or into `out_dir`.

    Into the store: `source` says where `src` came from (default: the folder, fingerprinted);
    a model id that holds another checkpoint is refused unless `force`, which replaces the
    whole model (see Store.writing). `chat` is recorded in the manifest: whether the model is served
    as a chat model (default: whether the checkpoint has a chat template). False keeps a base model
    whose repo ships a template anyway a base model.
    """
    if (store is None) == (out_dir is None):
        raise ValueError("give exactly one of store and out_dir")
    model_id = check_model_id(model_id) if model_id else model_id_for(src)  # also names files in out_dir
    n_params, intermediate = _inspect(src)
    if store is None:
        out_dir.mkdir(parents=True, exist_ok=True)

        def place(partial: Path, q: str) -> Path:
            final = out_dir / f"{model_id}.{q}.gguf"
            fsync_path(partial)
            os.replace(partial, final)
            fsync_path(out_dir)
            return final

        try:
            return _convert_into(src, out_dir, model_id, quants, n_params, intermediate, place, n_threads, progress)
        finally:
            for p in out_dir.glob(f"*{TMP_MARK}{os.getpid()}"):
                p.unlink(missing_ok=True)

    source = dict(source or {"path": str(src.resolve())})
    if source_fingerprint(source) is None:
        source["fingerprint"] = checkpoint_fingerprint(src)
    with store.writing(model_id, source, force=force) as w:
        w.manifest["chat"] = has_chat_template(src) if chat is None else chat
        return _convert_into(src, w.folder, model_id, quants, n_params, intermediate,
                             lambda partial, q: w.add_file(partial, q).path, n_threads, progress)


def _convert_into(src: Path, work: Path, model_id: str, quants: list[str], n_params: int, intermediate: str,
                  place: Callable[[Path, str], Path], n_threads: int, progress: Progress | None) -> list[QuantReport]:
    """Write the intermediate GGUF and each output as partials in `work`; `place` puts each finished one."""
    _check_disk(work, n_params, quants, intermediate)
    n_threads = n_threads or (os.cpu_count() or 1)
    inter = work / f".{model_id}.intermediate-{intermediate}.gguf{TMP_MARK}{os.getpid()}"
    reports: list[QuantReport] = []
    try:
        made = (0.0, 0)  # (seconds, f16 overflow) of the intermediate
        first = progress  # progress follows the first GGUF written from the checkpoint
        if any(q not in FLOAT_TYPES or q == intermediate for q in quants):
            t0 = time.monotonic()
            overflow = export_gguf(src, inter, intermediate, progress=progress).f16_overflow
            made, first = (time.monotonic() - t0, overflow), None
        for q in quants:
            t0 = time.monotonic()
            partial = work / f".{model_id}.{q}.gguf{TMP_MARK}{os.getpid()}"
            overflow = 0
            if q == intermediate:
                shutil.copyfile(inter, partial)
                seconds, overflow = made
            elif q in FLOAT_TYPES:
                overflow = export_gguf(src, partial, q, progress=first).f16_overflow
                first = None
                seconds = time.monotonic() - t0
            else:
                quantize(inter, partial, q, n_threads)
                seconds = time.monotonic() - t0
            size = partial.stat().st_size
            final = place(partial, q)
            reports.append(QuantReport(q, final, size, size * 8 / n_params, seconds, overflow))
            log.info("%s %s: %.1f MiB, %.2f bits/weight, %.1fs", model_id, q, size / 2**20, size * 8 / n_params, seconds)
    finally:
        inter.unlink(missing_ok=True)
    return reports
