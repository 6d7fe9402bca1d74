"""server/gguf_header.py: the header's scalars, as gguf-py reads them, without loading the file."""
import struct

import gguf
import pytest

from server.gguf_header import read_header
from server.pool import estimate_cost


def test_every_field_equals_what_gguf_py_reads(gguf_files):
    path = gguf_files["q8_0"]
    header = read_header(path)
    fields = {k: f for k, f in gguf.GGUFReader(path, "r").fields.items() if not k.startswith("GGUF.")}
    assert set(header) == set(fields)
    for key, f in fields.items():
        if f.types[0] == gguf.GGUFValueType.ARRAY:
            assert header[key] == ("array", len(f.data)), key
        else:
            assert header[key] == pytest.approx(f.contents()), key


def _header(kvs: bytes, n_kv: int) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, 0, n_kv) + kvs


def _key(name: str, vtype: int) -> bytes:
    return struct.pack("<Q", len(name)) + name.encode() + struct.pack("<I", vtype)


@pytest.mark.parametrize("data, why", [
    (b"GGML" + bytes(20), "not a GGUF"),
    (_header(b"", 2**40), "keys"),
    (_header(_key("a", 99), 1), "unknown GGUF value type"),
    (_header(_key("a", 8) + struct.pack("<Q", 2**50), 1), "past the end"),
    (_header(_key("a", 9) + struct.pack("<IQ", 8, 2**60), 1), "strings"),
    (_header(_key("a", 9) + struct.pack("<IQ", 4, 2**60), 1), "past the end"),
    (_header(_key("a", 4), 1), "truncated"),
    (b"", "not a GGUF"),
    (b"GG", "not a GGUF"),
    (b"GGUF" + bytes(3), "truncated"),
    (b"GGML" + bytes(3), "not a GGUF"),
])
def test_a_malformed_header_is_a_value_error_not_a_hang_or_a_huge_allocation(tmp_path, data, why):
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=why):
        read_header(path)
    assert estimate_cost(path, 512) == len(data)  # the pool falls back to the file's size


def test_the_estimate_counts_the_kv_cache_in_its_kv_type(gguf_files):
    """--kv-type q8_0 stores 34 bytes per 32 values where f16 stores 64: the estimate shrinks by
    exactly that share of the KV cache, and nothing else changes."""
    path = gguf_files["q8_0"]
    h = read_header(path)
    arch = h[gguf.Keys.General.ARCHITECTURE]
    key = lambda k: h[k.format(arch=arch)]  # noqa: E731
    head_dim = key(gguf.Keys.LLM.EMBEDDING_LENGTH) // key(gguf.Keys.Attention.HEAD_COUNT)
    kv_f16 = 2 * key(gguf.Keys.LLM.BLOCK_COUNT) * 512 * head_dim * key(gguf.Keys.Attention.HEAD_COUNT_KV) * 2
    f16, q8 = estimate_cost(path, 512), estimate_cost(path, 512, kv_type="q8_0")
    assert f16 - q8 == kv_f16 - kv_f16 * 34 // 64
