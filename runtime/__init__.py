"""llamabox runtime: loads GGUF with llama.cpp and generates. The only package that imports llama_cpp.

`runtime.errors` and `runtime.params` are plain Python; llama_cpp is imported only
when the engine is first used, so convert/ and server/ can use the errors alone.
"""
from .params import Completion, GenerationParams, Result

__all__ = ["Runtime", "RuntimeInfo", "load", "cpu_backend", "GenerationParams", "Completion", "Result"]


def cpu_backend():
    """Which CPU kernels llama.cpp chose for this process (a runtime.backends.CpuBackend)."""
    from .model import CPU_BACKEND

    return CPU_BACKEND


def __getattr__(name: str):
    if name in ("Runtime", "RuntimeInfo", "load"):
        from . import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'runtime' has no attribute {name!r}")
