"""A GGUF file as a small JSON-able dict, and the differences between two of them.

dump(path) = {"kv": {key: {"type": ..., "value": ...}}, "tensors": [{"name", "type", "shape", "sha256"}]}

- Every key/value except the GGUF header's own counters (GGUF.version, tensor_count, kv_count).
  "type" is the GGUF value type ("UINT32", "FLOAT32", "STRING", "ARRAY[STRING]", ...).
- Arrays are run-length encoded, so a 32016-token vocabulary that is mostly padding stays a few
  KB yet every element is kept: each item is a scalar (one element) or [value, count] (a run).
  A string element "[PAD{i}]" at index i (the converters' name for padding ids) is stored as
  "[PAD#]", so that padding forms one run.
- Tensors in file order: GGML type name, shape in GGUF order (ne0 first), sha256 of the raw data.

diff(golden, ours) lists every difference as a line; array differences name the first index.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

PAD = "[PAD#]"


def encode_array(values: list) -> list:
    out: list = []
    prev, n = object(), 0
    for i, v in enumerate(values):
        if isinstance(v, str) and v == f"[PAD{i}]":
            v = PAD
        if v == prev and type(v) is type(prev):
            n += 1
            continue
        if n:
            out.append(prev if n == 1 else [prev, n])
        prev, n = v, 1
    if n:
        out.append(prev if n == 1 else [prev, n])
    return out


def decode_array(runs: list) -> list:
    values: list = []
    for item in runs:
        v, n = item if isinstance(item, list) else (item, 1)
        for _ in range(n):
            values.append(f"[PAD{len(values)}]" if v == PAD else v)
    return values


def _type_name(field) -> str:
    import gguf

    t = gguf.GGUFValueType(field.types[0]).name
    if t == "ARRAY":
        t = f"ARRAY[{gguf.GGUFValueType(field.types[1]).name}]" if len(field.types) > 1 else "ARRAY[]"
    return t


def dump(path: Path) -> dict[str, Any]:
    import gguf

    r = gguf.GGUFReader(path)
    kv = {}
    for key, field in r.fields.items():
        if key.startswith("GGUF."):
            continue
        t = _type_name(field)
        value = field.contents()
        kv[key] = {"type": t, "value": encode_array(value) if t.startswith("ARRAY") else value}
    tensors = [{"name": t.name, "type": t.tensor_type.name, "shape": [int(d) for d in t.shape],
                "sha256": hashlib.sha256(t.data.tobytes()).hexdigest()} for t in r.tensors]
    return {"kv": kv, "tensors": tensors}


def kv_delta(base: dict, other: dict) -> dict:
    """Keys of `other` that `base` lacks or holds differently; a key of `base` missing from `other` maps to None."""
    d = {k: v for k, v in other.items() if base.get(k) != v}
    d.update({k: None for k in base if k not in other})
    return d


def apply_delta(base: dict, delta: dict) -> dict:
    out = {k: v for k, v in base.items() if delta.get(k, v) is not None}
    out.update({k: v for k, v in delta.items() if v is not None})
    return out


def _show(v: Any, limit: int = 120) -> str:
    s = repr(v)
    return s if len(s) <= limit else s[:limit] + "..."


def diff_kv(golden: dict, ours: dict) -> dict[str, str]:
    """{key: what differs} over the union of keys."""
    out = {}
    for key in sorted(set(golden) | set(ours)):
        g, o = golden.get(key), ours.get(key)
        if g == o:
            continue
        if g is None:
            out[key] = f"only ours has it: {o['type']} {_show(o['value'])}"
        elif o is None:
            out[key] = f"only the reference has it: {g['type']} {_show(g['value'])}"
        elif g["type"] != o["type"]:
            out[key] = f"type {g['type']} (reference) != {o['type']} (ours); values {_show(g['value'])} / {_show(o['value'])}"
        elif g["type"].startswith("ARRAY"):
            gv, ov = decode_array(g["value"]), decode_array(o["value"])
            i = next((i for i, (a, b) in enumerate(zip(gv, ov)) if a != b or type(a) is not type(b)), min(len(gv), len(ov)))
            at = f"first difference at index {i}: reference {_show(gv[i]) if i < len(gv) else '(end)'}, ours {_show(ov[i]) if i < len(ov) else '(end)'}"
            out[key] = at + (f" (lengths {len(gv)} / {len(ov)})" if len(gv) != len(ov) else "")
        else:
            out[key] = f"reference {_show(g['value'])}, ours {_show(o['value'])}"
    return out


def diff_tensors(golden: list[dict], ours: list[dict]) -> list[str]:
    out = []
    gn, on = [t["name"] for t in golden], [t["name"] for t in ours]
    if set(gn) != set(on):
        out.append(f"tensor names: only the reference has {sorted(set(gn) - set(on))}, only ours has {sorted(set(on) - set(gn))}")
    elif gn != on:
        i = next(i for i, (a, b) in enumerate(zip(gn, on)) if a != b)
        out.append(f"tensor order differs first at #{i}: reference {gn[i]}, ours {on[i]}")
    theirs = {t["name"]: t for t in golden}
    for t in ours:
        g = theirs.get(t["name"])
        if g is None:
            continue
        for field in ("type", "shape", "sha256"):
            if g[field] != t[field]:
                out.append(f"{t['name']}: {field} {g[field]} (reference) != {t[field]} (ours)")
    return out


def to_json(obj: Any, indent: int = 0) -> str:
    """JSON with one key/value, tensor or checkpoint file per line (arrays stay on their line), so a
    regenerated golden file diffs line by line."""
    pad = " " * (indent + 1)
    if isinstance(obj, dict) and obj and "type" not in obj:
        return "{\n" + ",\n".join(f"{pad}{json.dumps(k)}: {to_json(v, indent + 1)}" for k, v in obj.items()) + "\n" + pad[:-1] + "}"
    if isinstance(obj, list) and obj and all(isinstance(x, dict) for x in obj):
        return "[\n" + ",\n".join(pad + json.dumps(x, ensure_ascii=False) for x in obj) + "\n" + pad[:-1] + "]"
    return json.dumps(obj, ensure_ascii=False)
