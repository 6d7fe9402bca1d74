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


# The Hugging Face architectures that llama.cpp runs as its "llama" architecture and that
# llamabox converts: Llama 2 and its fine-tunes, Code Llama, TinyLlama, Mistral-7B (v0.1 has a
# sliding window, see LlamaConfig.sliding_window).
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")

# rope_scaling types that llama.cpp's llama architecture computes as transformers does.
# Others ("dynamic", "longrope", "su", "llama3", ...) are refused by name.
ROPE_SCALING_TYPES = ("linear", "yarn")


@dataclass(frozen=True)
class RopeScaling:
    """config.json's rope_scaling, for the types llama.cpp's llama architecture runs.

    linear: positions are divided by `factor` (Code Llama-style long-context fine-tunes).
    yarn: frequencies are blended between interpolated and extrapolated by a ramp over the
    rotary dimensions, set by beta_fast/beta_slow (rotations) at orig_ctx (tokens).
    The optional yarn fields are None when config.json leaves them out (llama.cpp then uses
    its defaults, which equal transformers').
    """
    kind: str                         # "linear" | "yarn"
    factor: float                     # context multiplier, > 0
    orig_ctx: int | None = None       # yarn: original_max_position_embeddings (tokens)
    ext_factor: float | None = None   # yarn: extrapolation_factor
    attn_factor: float | None = None  # yarn: attention_factor (or attn_factor)
    beta_fast: float | None = None    # yarn: rotations where extrapolation starts
    beta_slow: float | None = None    # yarn: rotations where interpolation ends


@dataclass(frozen=True)
class LlamaConfig:
    """The hyperparameters conversion needs, from config.json."""
    arch: str                 # architectures[0]: one of ARCHITECTURES
    n_vocab: int              # vocab_size: rows of embed_tokens / lm_head
    n_embd: int               # hidden_size
    n_ff: int                 # intermediate_size (SwiGLU width)
    n_layer: int              # num_hidden_layers
    n_head: int               # num_attention_heads
    n_head_kv: int            # num_key_value_heads (GQA: TinyLlama 4, Mistral 8, 70B 8); = n_head when absent
    n_ctx_train: int          # max_position_embeddings (Llama 2: 4096; Code Llama: 16384)
    rms_eps: float            # rms_norm_eps (Llama 2: 1e-5)
    rope_theta: float         # rope_theta (Llama 2: 10000, absent from its config; Code Llama: 1e6)
    head_dim: int             # n_embd // n_head unless config gives head_dim
    tie_embeddings: bool      # tie_word_embeddings: no lm_head tensor in the checkpoint
    torch_dtype: str | None   # what the checkpoint says it stores
    rope_scaling: RopeScaling | None = None
    sliding_window: int | None = None  # Mistral v0.1: 4096 (tokens); llama.cpp's llama architecture has none


def _get(cfg: dict[str, Any], key: str, typ: type, default: Any = None) -> Any:
    val = cfg.get(key)
    if val is None:  # absent or null: transformers treats both as "use the default"
        val = default
    if val is None:
        raise ConversionError(f"config.json: missing {key!r}")
    if typ is float and isinstance(val, int) and not isinstance(val, bool):
        val = float(val)
    if not isinstance(val, typ) or isinstance(val, bool) and typ is not bool:
        raise ConversionError(f"config.json: {key!r} should be {typ.__name__}, got {val!r}")
    return val


def _rope(cfg: dict[str, Any], name: str) -> tuple[float, RopeScaling | None]:
    """(rope_theta, scaling) from config.json, read as llama.cpp's reference converter reads them.

    transformers 4.x writes `rope_scaling` ({"type" or "rope_type": ..., "factor": ...}) next to
    `rope_theta`; 5.x writes `rope_parameters`, which also holds rope_theta. A missing rope_theta
    is transformers' default, 10000 (Llama 2's config.json has none).
    """
    params = cfg.get("rope_parameters", cfg.get("rope_scaling")) or {}
    if not isinstance(params, dict):
        raise ConversionError(f"config.json: rope_scaling should be an object, got {params!r}")
    if "full_attention" in params or "sliding_attention" in params:
        raise UnsupportedArchitecture(f"{name}: per-layer rope parameters {sorted(params)} are not a Llama 2 family layout")
    theta = _get({**cfg, **params}, "rope_theta", float, 10000.0)  # rope_parameters' own wins
    if theta <= 0:
        raise ConversionError(f"config.json: rope_theta must be positive, got {theta}")
    kind = params.get("rope_type", params.get("type"))
    if kind in (None, "default"):
        return theta, None
    if kind not in ROPE_SCALING_TYPES:
        raise UnsupportedArchitecture(
            f"{name}: rope_scaling type {kind!r} is not supported; llama.cpp's llama architecture runs "
            f"{' and '.join(map(repr, ROPE_SCALING_TYPES))} scaling as transformers does"
        )
    factor = _get(params, "factor", float)
    if factor <= 0:
        raise ConversionError(f"config.json: rope_scaling factor must be positive, got {factor}")
    if kind == "linear":
        return theta, RopeScaling("linear", factor)
    # yarn. llama.cpp's llama architecture reads none of the yarn_* keys the reference converter
    # writes: it always runs beta_fast 32, beta_slow 1, no extrapolation factor and an attention
    # scale of 0.1 * ln(factor) + 1, which are transformers' defaults. Values with which transformers
    # computes something else are refused; the reference writes them, and the GGUF runs another model.
    # (transformers ignores extrapolation_factor and attn_factor too, so those are harmless.)
    def opt(*keys: str) -> float | None:
        for k in keys:
            if params.get(k) is not None:
                return _get(params, k, float)
        return None

    default_scale = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    differ = [k for k in ("mscale", "mscale_all_dim") if params.get(k) is not None]
    if params.get("truncate") is False:
        differ.append("truncate false")
    if (a := opt("attention_factor")) is not None and not math.isclose(a, default_scale, rel_tol=1e-6):
        differ.append(f"attention_factor {a} (llama.cpp uses {default_scale:.6g})")
    for key, default in (("beta_fast", 32.0), ("beta_slow", 1.0)):
        if (b := opt(key)) not in (None, default):
            differ.append(f"{key} {b} (llama.cpp uses {default:g})")
    if differ:
        raise UnsupportedArchitecture(f"{name}: rope_scaling yarn with {', '.join(differ)} is not supported by llama.cpp's llama architecture")

    return theta, RopeScaling(
        "yarn", factor,
        orig_ctx=_get({**cfg, **params}, "original_max_position_embeddings", int),  # the reference reads both places
        ext_factor=opt("extrapolation_factor"),
        attn_factor=opt("attention_factor", "attn_factor"),
        beta_fast=opt("beta_fast"),
        beta_slow=opt("beta_slow"),
    )


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
    if len(archs) != 1 or archs[0] not in ARCHITECTURES:
        raise UnsupportedArchitecture(
            f"{folder.name}: architecture {', '.join(map(str, archs)) or cfg.get('model_type', 'unknown')} is not supported; "
            "llamabox converts LlamaForCausalLM checkpoints (Llama 2, its fine-tunes, Code Llama, TinyLlama) and MistralForCausalLM"
        )
    rope_theta, rope_scaling = _rope(cfg, folder.name)
    n_head = _get(cfg, "num_attention_heads", int)
    n_embd = _get(cfg, "hidden_size", int)
    sliding_window = cfg.get("sliding_window")
    if sliding_window is not None:
        sliding_window = _get(cfg, "sliding_window", int)
    c = LlamaConfig(
        arch=archs[0],
        n_vocab=_get(cfg, "vocab_size", int),
        n_embd=n_embd,
        n_ff=_get(cfg, "intermediate_size", int),
        n_layer=_get(cfg, "num_hidden_layers", int),
        n_head=n_head,
        n_head_kv=_get(cfg, "num_key_value_heads", int, n_head),
        n_ctx_train=_get(cfg, "max_position_embeddings", int),
        rms_eps=_get(cfg, "rms_norm_eps", float),
        rope_theta=rope_theta,
        head_dim=_get(cfg, "head_dim", int, n_embd // n_head if n_head else 0),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
        rope_scaling=rope_scaling,
        sliding_window=sliding_window,
    )
    for name in ("n_vocab", "n_embd", "n_ff", "n_layer", "n_head", "n_head_kv", "n_ctx_train", "head_dim"):
        if getattr(c, name) <= 0:
            raise ConversionError(f"config.json: {name} must be positive, got {getattr(c, name)}")
    if c.n_head % c.n_head_kv or c.head_dim * c.n_head != c.n_embd or c.head_dim % 2:
        raise ConversionError(
            f"config.json: inconsistent attention shape (hidden {c.n_embd}, heads {c.n_head}, kv heads {c.n_head_kv}, head_dim {c.head_dim})"
        )
    if c.sliding_window is not None and c.sliding_window <= 0:
        raise ConversionError(f"config.json: sliding_window must be positive, got {c.sliding_window}")
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
    # Shard by shard in name order, each shard's tensors in name order: the order in which
    # llama.cpp's reference converter writes them, so our GGUF lays its tensors out the same way.
    refs: dict[str, TensorRef] = {}
    for f in files:
        if not f.is_file():
            raise ConversionError(f"missing shard {f.name}")
        for r in sorted(_read_safetensors_header(f), key=lambda r: r.name):
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
