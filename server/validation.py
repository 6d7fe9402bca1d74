"""The `predict` request body -> (prompt, GenerationParams), strictly.

Every rejection is an InvalidParameter naming the field, the value and the
allowed range. Numbers may arrive as JSON numbers or, because the hosted API
documents `max_length` and `repetition_penalty` as strings, as strings that
parse exactly ("100", "2.0"); nothing is rounded or clamped.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from runtime.errors import InvalidParameter
from runtime.model import MAX_SEED
from runtime.params import GenerationParams

_INT = re.compile(r"[+-]?[0-9]{1,18}")
_FLOAT = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?")

MAX_STOP_STRINGS = 8
MAX_STOP_CHARS = 128


class MalformedJSON(InvalidParameter):
    """The body is not JSON; the message says where (line, column)."""


@dataclass(frozen=True)
class Limits:
    """Bounds that depend on the loaded model and the server's settings."""
    max_new_tokens: int       # the context size: no single sequence can have more
    max_sequences: int        # parallel sequences of the runtime
    max_prompt_chars: int = 1_000_000


MAX_JSON_DEPTH = 32       # objects/arrays nested deeper are refused (no field needs more than 2)
MAX_INT_DIGITS = 100      # longer integer literals are kept as text, never converted (see parse_json)


class LongNumber(str):
    """An integer literal too long to convert: Python's int() takes quadratic time on them and
    refuses past 4,300 digits. It stays text, so the field's own check names it."""


def show(v: Any) -> str:
    if isinstance(v, LongNumber):
        return f"an integer of {len(v.lstrip('+-'))} digits"
    try:
        s = json.dumps(v, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        s = type(v).__name__
    return s if len(s) <= 40 else s[:37] + "..."


def as_int(field: str, v: Any, lo: int, hi: int) -> int:
    n: int | None = None
    if isinstance(v, (bool, LongNumber)):
        n = None
    elif isinstance(v, int):
        n = v
    elif isinstance(v, float) and v.is_integer():
        n = int(v)
    elif isinstance(v, str) and _INT.fullmatch(v.strip()):
        n = int(v.strip())
    if n is None:
        raise InvalidParameter(field, f"must be an integer between {lo} and {hi}, got {show(v)}")
    if not lo <= n <= hi:
        raise InvalidParameter(field, f"must be between {lo} and {hi}, got {n}")
    return n


def as_float(field: str, v: Any, lo: float, hi: float) -> float:
    x: float | None = None
    if isinstance(v, (bool, LongNumber)):
        x = None
    elif isinstance(v, (int, float)):
        try:
            x = float(v)
        except OverflowError:  # a 400-digit JSON integer
            x = None
    elif isinstance(v, str) and _FLOAT.fullmatch(v.strip()):
        x = float(v.strip())
    if x is None or not math.isfinite(x):
        raise InvalidParameter(field, f"must be a number between {lo} and {hi}, got {show(v)}")
    if not lo <= x <= hi:
        raise InvalidParameter(field, f"must be between {lo} and {hi}, got {show(v)}")
    return x


def as_str(field: str, v: Any, max_chars: int, allow_empty: bool = False) -> str:
    if not isinstance(v, str) or isinstance(v, LongNumber):
        raise InvalidParameter(field, f"must be a string, got {show(v)}")
    if not v and not allow_empty:
        raise InvalidParameter(field, "must not be empty")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:  # JSON allows "\ud800"; UTF-8 (and the tokenizer) does not
        raise InvalidParameter(field, "contains an unpaired UTF-16 surrogate (\\ud800-\\udfff)") from None
    if len(v) > max_chars:
        raise InvalidParameter(field, f"is {len(v)} characters; at most {max_chars} are accepted")
    return v


def as_stop(v: Any) -> tuple[str, ...]:
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not 0 <= len(items) <= MAX_STOP_STRINGS:
        raise InvalidParameter("stop", f"must be a string or a list of at most {MAX_STOP_STRINGS} strings, got {show(v)}")
    return tuple(as_str("stop", s, MAX_STOP_CHARS) for s in items)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise InvalidParameter(k, "appears twice in the JSON object")
        out[k] = v
    return out


def _no_constants(name: str) -> Any:
    raise InvalidParameter("body", f"{name} is not valid JSON")


def parse_json(body: bytes) -> Any:
    """Strict JSON: UTF-8, no NaN/Infinity, no duplicate keys; errors say line and column."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MalformedJSON("body", f"is not UTF-8 (byte {e.start})") from None
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constants, parse_int=_parse_int)
    except json.JSONDecodeError as e:
        raise MalformedJSON("body", f"malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except RecursionError:  # ~1,000 levels: the C scanner recurses once per level
        raise MalformedJSON("body", f"JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    _check_depth(data)
    return data


def _parse_int(literal: str) -> int | LongNumber:
    return LongNumber(literal) if len(literal) > MAX_INT_DIGITS else int(literal)


def _check_depth(data: Any) -> None:
    """Refuse nesting deeper than MAX_JSON_DEPTH, iteratively (deep values would make any later
    recursive walk, json.dumps included, raise RecursionError)."""
    stack = [(data, 1)]
    while stack:
        v, depth = stack.pop()
        children = v.values() if isinstance(v, dict) else v if isinstance(v, list) else ()
        for c in children:
            if isinstance(c, (dict, list)):
                if depth + 1 > MAX_JSON_DEPTH:
                    raise MalformedJSON("body", f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
                stack.append((c, depth + 1))


FIELDS = ("prompt", "max_length", "temperature", "top_p", "top_k", "num_return_sequences", "repetition_penalty", "seed", "stop", "system_prompt")


def parse_predict(data: Any, limits: Limits) -> tuple[str, GenerationParams]:
    """Validate a decoded `predict` body. Defaults are the hosted API's, except top_p (see README)."""
    if not isinstance(data, dict):
        raise InvalidParameter("body", f"must be a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise InvalidParameter(unknown[0], f"is not a known field; known fields are {', '.join(FIELDS)}")
    if "prompt" not in data:
        raise InvalidParameter("prompt", "is required")
    prompt = as_str("prompt", data["prompt"], limits.max_prompt_chars)
    kw: dict[str, Any] = {}
    if "max_length" in data:
        kw["max_length"] = as_int("max_length", data["max_length"], 1, limits.max_new_tokens)
    if "temperature" in data:
        kw["temperature"] = as_float("temperature", data["temperature"], 0.0, 5.0)
    if "top_p" in data:
        kw["top_p"] = as_float("top_p", data["top_p"], 0.0, 1.0)
    if "top_k" in data:
        kw["top_k"] = as_int("top_k", data["top_k"], 0, 1_000_000)
    if "num_return_sequences" in data:
        kw["num_return_sequences"] = as_int("num_return_sequences", data["num_return_sequences"], 1, limits.max_sequences)
    if "repetition_penalty" in data:
        kw["repetition_penalty"] = as_float("repetition_penalty", data["repetition_penalty"], 1.0, 10.0)
    if "seed" in data:
        kw["seed"] = as_int("seed", data["seed"], 0, MAX_SEED)
    if "stop" in data:
        kw["stop"] = as_stop(data["stop"])
    if "system_prompt" in data:
        kw["system_prompt"] = as_str("system_prompt", data["system_prompt"], limits.max_prompt_chars, allow_empty=True)
    return prompt, GenerationParams(**kw)  # absent fields take GenerationParams' defaults
