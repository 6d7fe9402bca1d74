"""llamabox runtime: loads GGUF with llama.cpp and generates. The only package that imports llama_cpp."""
from .engine import Runtime, RuntimeInfo, load
from .params import Completion, GenerationParams, Result

__all__ = ["Runtime", "RuntimeInfo", "load", "GenerationParams", "Completion", "Result"]
