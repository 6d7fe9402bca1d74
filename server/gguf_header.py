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
import mmap
import struct
from pathlib import Path

import gguf

T = gguf.GGUFValueType
_SCALAR = {T.UINT8: "<B", T.INT8: "<b", T.UINT16: "<H", T.INT16: "<h", T.UINT32: "<I", T.INT32: "<i",
           T.FLOAT32: "<f", T.BOOL: "<?", T.UINT64: "<Q", T.INT64: "<q", T.FLOAT64: "<d"}
MAX_KV = 1 << 20          # keys in one header; real files have tens
MAX_KEY_BYTES = 1 << 16


class _Cursor:
    """Reads forward through the mapped file; every read is checked against its end. Mapped, not
    read: only the header's pages are touched, and a 49k-string vocabulary is skipped with one
    unpack per string (about 15 ms) instead of a read and a seek each (about 100 ms)."""

    def __init__(self, buf: mmap.mmap, size: int):
        self.buf, self.size, self.off = buf, size, 0

    def take(self, n: int) -> bytes:
        if self.off + n > self.size:
            raise ValueError("truncated GGUF header")
        b = self.buf[self.off : self.off + n]
        self.off += n
        return b

    def unpack(self, fmt: str):
        n = struct.calcsize(fmt)
        if self.off + n > self.size:
            raise ValueError("truncated GGUF header")
        v = struct.unpack_from(fmt, self.buf, self.off)[0]
        self.off += n
        return v

    def type(self) -> T:
        code = self.unpack("<I")
        try:
            return T(code)
        except ValueError:
            raise ValueError(f"unknown GGUF value type {code}") from None

    def string_length(self) -> int:
        n = self.unpack("<Q")
        if self.off + n > self.size:
            raise ValueError("GGUF string runs past the end of the file")
        return n

    def skip_strings(self, count: int) -> None:
        buf, size, off, unpack = self.buf, self.size, self.off, struct.unpack_from
        for _ in range(count):
            if off + 8 > size:
                raise ValueError("truncated GGUF header")
            off += 8 + unpack("<Q", buf, off)[0]
            if off > size:
                raise ValueError("GGUF string runs past the end of the file")
        self.off = off


def read_header(path: Path) -> dict[str, object]:
    """{key: value} for scalar and string fields; {key: ("array", count)} for arrays."""
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError("not a GGUF file")
        if os.fstat(f.fileno()).st_size < 24:  # magic, version, tensor and key counts
            raise ValueError("truncated GGUF header")
        # The mapping's own length bounds every read (the file may have changed since fstat). A
        # file cut short while mapped would be SIGBUS: the store only ever renames whole files in.
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _read(_Cursor(buf, len(buf)))


def _read(c: _Cursor) -> dict[str, object]:
    out: dict[str, object] = {}
    if c.take(4) != b"GGUF":
        raise ValueError("not a GGUF file")
    version = c.unpack("<I")
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} is not 2 or 3")
    c.unpack("<Q")  # tensor count: not needed
    n_kv = c.unpack("<Q")
    if n_kv > MAX_KV:
        raise ValueError(f"GGUF header claims {n_kv} keys")
    for _ in range(n_kv):
        n = c.unpack("<Q")
        if n > MAX_KEY_BYTES:
            raise ValueError(f"GGUF key of {n} bytes")
        key = c.take(n).decode("utf-8", errors="replace")
        vtype = c.type()
        if vtype == T.STRING:
            n = c.string_length()
            if n <= 4096:
                out[key] = c.take(n).decode("utf-8", errors="replace")
            else:
                out[key], c.off = None, c.off + n
        elif vtype == T.ARRAY:
            etype, count = c.type(), c.unpack("<Q")
            if etype == T.STRING:
                if count > c.size // 8:
                    raise ValueError(f"GGUF array of {count} strings in a {c.size}-byte file")
                c.skip_strings(count)
            elif etype in _SCALAR:
                nbytes = count * struct.calcsize(_SCALAR[etype])
                if c.off + nbytes > c.size:
                    raise ValueError("GGUF array runs past the end of the file")
                c.off += nbytes
            else:  # arrays of arrays: no Llama GGUF has them
                raise ValueError(f"GGUF array of {etype.name} is not supported")
            out[key] = ("array", count)
        else:
            out[key] = c.unpack(_SCALAR[vtype])
    return out
