"""llama.cpp's quantizer (llama_model_quantize), wrapped for convert/.

Kept in runtime/ because runtime/ is the only package that imports llama_cpp.
"""
from __future__ import annotations

import ctypes
import logging
from pathlib import Path

import llama_cpp

from . import model as _model  # noqa: F401  (routes llama.cpp's log into logging, initialises the backend)
from .errors import QuantizeError

log = logging.getLogger(__name__)

# User-facing name -> llama.cpp file type. The names match llama-quantize's.
QUANT_TYPES: dict[str, int] = {
    "q2_k": llama_cpp.LLAMA_FTYPE_MOSTLY_Q2_K,
    "q3_k_s": llama_cpp.LLAMA_FTYPE_MOSTLY_Q3_K_S,
    "q3_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q3_K_M,
    "q3_k_l": llama_cpp.LLAMA_FTYPE_MOSTLY_Q3_K_L,
    "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0,
    "q4_1": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1,
    "q4_k_s": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_S,
    "q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
    "q5_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_0,
    "q5_1": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_1,
    "q5_k_s": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_S,
    "q5_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M,
    "q6_k": llama_cpp.LLAMA_FTYPE_MOSTLY_Q6_K,
    "q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
    "f16": llama_cpp.LLAMA_FTYPE_MOSTLY_F16,
}


def quantize(src: Path, dst: Path, qtype: str, n_threads: int) -> None:
    """Quantize GGUF `src` into `dst` as `qtype` (a QUANT_TYPES key). `dst` is overwritten."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = n_threads
    params.ftype = QUANT_TYPES[qtype]
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise QuantizeError(f"llama.cpp failed to quantize {src.name} to {qtype} (code {rc}); see the log")
