"""KV cache element types (--kv-type): names -> ggml type ids.

No llama_cpp import here, so server settings can check the flag without loading llama.cpp.
The names and set are those llama.cpp's own tools accept for -ctk/-ctv (common/arg.cpp);
the ids are ggml.h's enum ggml_type.

Bytes per KV cell per layer, K + V, with 128-dim heads and 32 KV heads (Llama 2 7B):
f16 16 KiB, q8_0 8.5 KiB, q4_0 4.5 KiB; so 4096 cells x 32 layers: 2 GiB, 1.06 GiB, 0.56 GiB.
"""
from __future__ import annotations

from .errors import InvalidParameter

KV_CACHE_TYPES = {"f32": 0, "f16": 1, "bf16": 30, "q8_0": 8, "q4_0": 2, "q4_1": 3, "iq4_nl": 20, "q5_0": 6, "q5_1": 7}
UNQUANTIZED = ("f32", "f16", "bf16")  # the rest need flash attention (for V) in llama.cpp


def check_kv_type(name: str) -> None:
    """Raises InvalidParameter("kv_type", ...) unless `name` is one of KV_CACHE_TYPES."""
    if name not in KV_CACHE_TYPES:
        raise InvalidParameter("kv_type", f"must be one of {', '.join(KV_CACHE_TYPES)}, got {name!r}")
