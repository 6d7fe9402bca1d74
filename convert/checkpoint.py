"""Reading a Hugging Face Llama checkpoint lazily, one tensor at a time.

safetensors layout: an 8-byte little-endian header length N, N bytes of JSON
({name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}),
then the tensor bytes; offsets count from the end of the header.

Nothing read from disk is trusted: header sizes, offsets, shapes, dtypes and
shard file names are all checked before a byte of tensor data is read. Tensors
are read with plain file reads (no mmap), so the process only ever holds the
tensor being converted.
"""
from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runtime.errors import ConversionError, UnsupportedArchitecture

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the largest real headers are a few MB

# safetensors dtype -> (numpy dtype of the stored bits, bytes per element)
_DTYPES = {"F32": (np.float32, 4), "F16": (np.float16, 2), "BF16": (np.uint16, 2)}

_SHARD_NAME = re.compile(r"^[A-Za-z0-9._-]+\.safetensors$")


@dataclass(frozen=True)
class TensorRef:
    name: str                 # HF name, e.g. "model.layers.0.self_attn.q_proj.weight"
    shape: tuple[int, ...]    # numpy order: (rows, cols) = (out_features, in_features)
    dtype: str                # "F32" | "F16" | "BF16"
    file: Path
    offset: int               # absolute byte offset in `file`
    nbytes: int


@dataclass(frozen=True)
class LlamaConfig:
    """The hyperparameters conversion needs, from config.json."""
    n_vocab: int              # vocab_size: rows of embed_tokens / lm_head
    n_embd: int               # hidden_size
    n_ff: int                 # intermediate_size (SwiGLU width)
    n_layer: int              # num_hidden_layers
    n_head: int               # num_attention_heads
    n_head_kv: int            # num_key_value_heads (GQA; 70B uses 8); = n_head when absent
    n_ctx_train: int          # max_position_embeddings (Llama 2: 4096)
    rms_eps: float            # rms_norm_eps (Llama 2: 1e-5)
    rope_theta: float         # rope_theta (Llama 2: 10000)
    head_dim: int             # n_embd // n_head unless config gives head_dim
    tie_embeddings: bool      # tie_word_embeddings: no lm_head tensor in the checkpoint
    torch_dtype: str | None   # what the checkpoint says it stores


def _get(cfg: dict[str, Any], key: str, typ: type, default: Any = None) -> Any:
    val = cfg.get(key, default)
    if val is None:
        raise ConversionError(f"config.json: missing {key!r}")
    if typ is float and isinstance(val, int) and not isinstance(val, bool):
        val = float(val)
    if not isinstance(val, typ) or isinstance(val, bool) and typ is not bool:
        raise ConversionError(f"config.json: {key!r} should be {typ.__name__}, got {val!r}")
    return val


def read_config(folder: Path) -> LlamaConfig:
    path = folder / "config.json"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConversionError(f"{folder} has no config.json: not a Hugging Face checkpoint") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise ConversionError(f"{path} is not a JSON object")
    archs = cfg.get("architectures") or []
    if archs != ["LlamaForCausalLM"]:
        raise UnsupportedArchitecture(
            f"{folder.name}: architecture {', '.join(map(str, archs)) or cfg.get('model_type', 'unknown')} is not supported; "
            "llamabox converts LlamaForCausalLM checkpoints (Llama 2, its fine-tunes, TinyLlama)"
        )
    scaling = cfg.get("rope_scaling")
    if scaling:
        raise UnsupportedArchitecture(f"{folder.name}: rope_scaling {scaling!r} is not supported (Llama 2 has none)")
    n_head = _get(cfg, "num_attention_heads", int)
    n_embd = _get(cfg, "hidden_size", int)
    c = LlamaConfig(
        n_vocab=_get(cfg, "vocab_size", int),
        n_embd=n_embd,
        n_ff=_get(cfg, "intermediate_size", int),
        n_layer=_get(cfg, "num_hidden_layers", int),
        n_head=n_head,
        n_head_kv=_get(cfg, "num_key_value_heads", int, n_head),
        n_ctx_train=_get(cfg, "max_position_embeddings", int),
        rms_eps=_get(cfg, "rms_norm_eps", float),
        rope_theta=_get(cfg, "rope_theta", float, 10000.0),
        head_dim=_get(cfg, "head_dim", int, n_embd // n_head if n_head else 0),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
    )
    for name in ("n_vocab", "n_embd", "n_ff", "n_layer", "n_head", "n_head_kv", "n_ctx_train", "head_dim"):
        if getattr(c, name) <= 0:
            raise ConversionError(f"config.json: {name} must be positive, got {getattr(c, name)}")
    if c.n_head % c.n_head_kv or c.head_dim * c.n_head != c.n_embd or c.head_dim % 2:
        raise ConversionError(
            f"config.json: inconsistent attention shape (hidden {c.n_embd}, heads {c.n_head}, kv heads {c.n_head_kv}, head_dim {c.head_dim})"
        )
    return c


def _read_safetensors_header(path: Path) -> list[TensorRef]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ConversionError(f"{path.name}: truncated safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise ConversionError(f"{path.name}: header length {n} is impossible for a {size}-byte file")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConversionError(f"{path.name}: safetensors header is not JSON: {e}") from e
    if not isinstance(header, dict):
        raise ConversionError(f"{path.name}: safetensors header is not an object")
    base = 8 + n
    refs = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ConversionError(f"{path.name}: malformed entry for tensor {name!r}") from None
        if dtype not in _DTYPES:
            raise ConversionError(f"{path.name}: tensor {name!r} has dtype {dtype}; llamabox reads F32, F16 and BF16")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise ConversionError(f"{path.name}: tensor {name!r} has a bad shape {shape!r}")
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end and base + end <= size):
            raise ConversionError(f"{path.name}: tensor {name!r} lies outside the file ({begin}..{end})")
        nbytes = math.prod(shape) * _DTYPES[dtype][1]
        if end - begin != nbytes:
            raise ConversionError(f"{path.name}: tensor {name!r} is {end - begin} bytes, its shape needs {nbytes}")
        refs.append(TensorRef(name, tuple(shape), dtype, path, base + begin, nbytes))
    return refs


def index_tensors(folder: Path) -> dict[str, TensorRef]:
    """Every tensor of a single-file or sharded safetensors checkpoint, by HF name."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise ConversionError(f"{index.name}: not a safetensors index ({e})") from e
        if not isinstance(weight_map, dict):
            raise ConversionError(f"{index.name}: weight_map is not an object")
        shards = sorted(set(weight_map.values()))
        for s in shards:
            if not isinstance(s, str) or not _SHARD_NAME.match(s):
                raise ConversionError(f"{index.name}: shard name {s!r} is not a plain file name")
        files = [folder / s for s in shards]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        bins = sorted(folder.glob("pytorch_model*.bin"))
        if bins:
            return _index_torch_bins(bins)
        raise ConversionError(f"{folder} has no *.safetensors weights")
    refs: dict[str, TensorRef] = {}
    for f in files:
        if not f.is_file():
            raise ConversionError(f"missing shard {f.name}")
        for r in _read_safetensors_header(f):
            if r.name in refs:
                raise ConversionError(f"tensor {r.name!r} appears in two shards")
            refs[r.name] = r
    return refs


TORCH = "TORCH"  # TensorRef.dtype of a tensor inside a PyTorch .bin (read through torch)


def _torch_load(path: Path):
    try:
        import torch
    except ImportError:
        raise ConversionError(
            f"{path.parent} holds only PyTorch .bin weights; install the extra with "
            "`pip install 'llamabox[torch]'` and convert again"
        ) from None
    try:
        # weights_only: a .bin is a pickle, and pickles from the internet must not run code.
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # torch raises many types for a bad file
        raise ConversionError(f"{path.name}: not a loadable PyTorch checkpoint ({type(e).__name__})") from None


def _index_torch_bins(files: list[Path]) -> dict[str, TensorRef]:
    refs: dict[str, TensorRef] = {}
    for f in files:
        for name, t in _torch_load(f).items():
            refs[name] = TensorRef(name, tuple(t.shape), TORCH, f, -1, t.numel() * t.element_size())
    return refs


def load_tensor(ref: TensorRef) -> np.ndarray:
    """Read one tensor from disk as float32 (BF16's 16 bits are the top half of an F32)."""
    if ref.dtype == TORCH:
        # mmap=True: only this tensor's pages are read; the state dict itself is cheap to rebuild.
        return _torch_load(ref.file)[ref.name].float().numpy().reshape(ref.shape)
    np_dtype, _ = _DTYPES[ref.dtype]
    count = ref.nbytes // np.dtype(np_dtype).itemsize
    with open(ref.file, "rb") as f:
        f.seek(ref.offset)
        data = np.fromfile(f, dtype=np_dtype, count=count)
    if data.size != count:
        raise ConversionError(f"{ref.file.name}: tensor {ref.name!r} is truncated")
    if ref.dtype == "BF16":
        data = (data.astype(np.uint32) << 16).view(np.float32)
    return data.astype(np.float32, copy=False).reshape(ref.shape)
