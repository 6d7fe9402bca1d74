"""The scalar metadata of a GGUF file, read from its header without loading it.

gguf-py's GGUFReader maps the whole file and builds numpy views of every field and tensor: 2-3.5 s
for a 49k-token vocabulary, all spent before llama.cpp even starts loading (issue 15's load-time
profile). A server needs a handful of numbers to budget memory, so this walks the key/value
section once, keeps the scalars and the length of each array, and seeks past the rest.

Layout (GGUF v2/v3, little-endian): b"GGUF", u32 version, u64 n_tensors, u64 n_kv, then n_kv
times: string key, u32 value type, value. A string is u64 length + UTF-8 bytes; an array is
u32 element type, u64 count, the elements. Nothing read is trusted: every length is checked
against the file's size, and a malformed header raises ValueError.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import BinaryIO

import gguf

T = gguf.GGUFValueType
_SCALAR = {T.UINT8: "<B", T.INT8: "<b", T.UINT16: "<H", T.INT16: "<h", T.UINT32: "<I", T.INT32: "<i",
           T.FLOAT32: "<f", T.BOOL: "<?", T.UINT64: "<Q", T.INT64: "<q", T.FLOAT64: "<d"}
MAX_KV = 1 << 20          # keys in one header; real files have tens
MAX_KEY_BYTES = 1 << 16


def _read(f: BinaryIO, n: int) -> bytes:
    b = f.read(n)
    if len(b) != n:
        raise ValueError("truncated GGUF header")
    return b


def _u64(f: BinaryIO) -> int:
    return struct.unpack("<Q", _read(f, 8))[0]


def _skip_string(f: BinaryIO, size: int) -> None:
    n = _u64(f)
    if f.tell() + n > size:
        raise ValueError("GGUF string runs past the end of the file")
    f.seek(n, os.SEEK_CUR)


def _type(f: BinaryIO) -> T:
    code = struct.unpack("<I", _read(f, 4))[0]
    try:
        return T(code)
    except ValueError:
        raise ValueError(f"unknown GGUF value type {code}") from None


def read_header(path: Path) -> dict[str, object]:
    """{key: value} for scalar and string fields; {key: ("array", count)} for arrays."""
    size = path.stat().st_size
    out: dict[str, object] = {}
    with open(path, "rb") as f:
        if _read(f, 4) != b"GGUF":
            raise ValueError("not a GGUF file")
        version = struct.unpack("<I", _read(f, 4))[0]
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not 2 or 3")
        _u64(f)  # tensor count: not needed
        n_kv = _u64(f)
        if n_kv > MAX_KV:
            raise ValueError(f"GGUF header claims {n_kv} keys")
        for _ in range(n_kv):
            n = _u64(f)
            if n > MAX_KEY_BYTES:
                raise ValueError(f"GGUF key of {n} bytes")
            key = _read(f, n).decode("utf-8", errors="replace")
            vtype = _type(f)
            if vtype == T.STRING:
                n = _u64(f)
                if f.tell() + n > size:
                    raise ValueError("GGUF string runs past the end of the file")
                out[key] = _read(f, n).decode("utf-8", errors="replace") if n <= 4096 else None
            elif vtype == T.ARRAY:
                etype, count = _type(f), _u64(f)
                if etype == T.STRING:
                    if count > size // 8:
                        raise ValueError(f"GGUF array of {count} strings in a {size}-byte file")
                    for _ in range(count):
                        _skip_string(f, size)
                elif etype in _SCALAR:
                    nbytes = count * struct.calcsize(_SCALAR[etype])
                    if f.tell() + nbytes > size:
                        raise ValueError("GGUF array runs past the end of the file")
                    f.seek(nbytes, os.SEEK_CUR)
                else:  # arrays of arrays: no Llama GGUF has them
                    raise ValueError(f"GGUF array of {etype.name} is not supported")
                out[key] = ("array", count)
            else:
                fmt = _SCALAR[vtype]
                out[key] = struct.unpack(fmt, _read(f, struct.calcsize(fmt)))[0]
    return out
