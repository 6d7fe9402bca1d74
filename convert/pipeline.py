"""HF checkpoint -> F16 GGUF -> quantized GGUFs, into the store or a folder.

Every file is written under a partial name and renamed only when complete, so
an interrupted conversion leaves nothing that `llamabox list` shows; a rerun
removes the leftovers and starts that file again.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from runtime.errors import ConversionError, InvalidParameter
from runtime.quantize import QUANT_TYPES, quantize

from .checkpoint import index_tensors, read_config
from .hf_to_gguf import export_gguf
from .store import TMP_MARK, ModelFile, Store, check_model_id

log = logging.getLogger(__name__)

# A progress callback: (done, total) in units of tensors for the F16 pass.
Progress = Callable[[int, int], None]


@dataclass
class QuantReport:
    quant: str
    path: Path
    size_bytes: int
    bits_per_weight: float
    seconds: float


def parse_quants(spec: str) -> list[str]:
    quants = [q.strip().lower() for q in spec.split(",") if q.strip()]
    if not quants:
        raise InvalidParameter("quant", "name at least one quantization type")
    for q in quants:
        if q not in QUANT_TYPES:
            raise InvalidParameter("quant", f"{q!r} is not one of {', '.join(QUANT_TYPES)}")
    return list(dict.fromkeys(quants))


def model_id_for(src: Path) -> str:
    """A store id from a folder name: 'Llama-2-7b-chat-hf' -> 'llama-2-7b-chat-hf'."""
    return check_model_id(re.sub(r"[^a-z0-9._-]+", "-", src.name.lower()).strip("-._")[:64] or "model")


def _check_disk(folder: Path, n_params: int, quants: list[str]) -> None:
    # F16 intermediate (2 bytes/weight) plus each output (at most 2 bytes/weight), plus 5% slack.
    need = int(n_params * 2 * (1 + len(quants)) * 1.05)
    free = shutil.disk_usage(folder).free
    if free < need:
        raise ConversionError(f"not enough disk in {folder}: about {need / 2**30:.1f} GiB needed, {free / 2**30:.1f} GiB free")


def _count_params(src: Path) -> int:
    read_config(src)  # refuse non-Llama before counting anything
    n = 0
    for ref in index_tensors(src).values():
        k = 1
        for d in ref.shape:
            k *= d
        n += k
    return n


def convert(
    src: Path,
    quants: list[str],
    *,
    store: Store | None = None,
    model_id: str | None = None,
    out_dir: Path | None = None,
    source: dict[str, Any] | None = None,
    n_threads: int = 0,
    progress: Progress | None = None,
) -> list[QuantReport]:
    """Convert `src` to every type in `quants`, into `store` (as model_id) or into `out_dir`."""
    if (store is None) == (out_dir is None):
        raise ValueError("give exactly one of store and out_dir")
    model_id = check_model_id(model_id) if model_id else model_id_for(src)  # also names files in out_dir
    n_params = _count_params(src)
    if store is not None:
        store.clean_partials(model_id)
        work = store.models_dir / model_id
    else:
        work = out_dir
    work.mkdir(parents=True, exist_ok=True)
    _check_disk(work, n_params, quants)
    n_threads = n_threads or (os.cpu_count() or 1)

    f16 = work / f".{model_id}.intermediate-f16.gguf{TMP_MARK}{os.getpid()}"
    reports: list[QuantReport] = []
    try:
        t0 = time.monotonic()
        export_gguf(src, f16, "f16", name=model_id, progress=progress)
        f16_seconds = time.monotonic() - t0
        for q in quants:
            t0 = time.monotonic()
            partial = work / f".{model_id}.{q}.gguf{TMP_MARK}{os.getpid()}"
            if q == "f16":
                shutil.copyfile(f16, partial)
                seconds = f16_seconds
            else:
                quantize(f16, partial, q, n_threads)
                seconds = time.monotonic() - t0
            size = partial.stat().st_size
            if store is not None:
                mf: ModelFile = store.add_file(model_id, partial, q, source or {"path": str(src)})
                final = mf.path
            else:
                final = work / f"{model_id}.{q}.gguf"
                os.replace(partial, final)
            reports.append(QuantReport(q, final, size, size * 8 / n_params, seconds))
            log.info("%s %s: %.1f MiB, %.2f bits/weight, %.1fs", model_id, q, size / 2**20, size * 8 / n_params, seconds)
    finally:
        for p in work.glob(f"*{TMP_MARK}{os.getpid()}"):
            p.unlink(missing_ok=True)
    return reports
