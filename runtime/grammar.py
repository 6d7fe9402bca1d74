r"""JSON output constraints (response_format) as llama.cpp GBNF grammars.

    schema_to_grammar(schema) -> GBNF for {"type": "json_schema", ...}
    JSON_OBJECT_GRAMMAR       -> GBNF for {"type": "json_object"}: any JSON object

The conversion is llama-cpp-python's own (llama_cpp.llama_grammar.json_schema_to_gbnf, a copy of
llama.cpp's json_schema_to_grammar.py). It handles a subset of JSON Schema and silently ignores
the rest (minimum, multipleOf, ...); output that ignores a constraint would not validate, so
_check() below walks the schema first and refuses, with InvalidParameter("response_format", ...),
every keyword and form the converter would drop or get wrong. What it accepts:

  * annotations anywhere: title, description, default, examples, $comment, $schema, $id, ...
  * type: one of object, array, string, number, integer, boolean, null; or a list of them (alone)
  * object: properties, required (names among properties), additionalProperties (bool or schema).
    Unlike JSON Schema's default, properties not listed are NOT generated unless
    additionalProperties says so (the output still validates). Required properties come first,
    then optional ones, each group in the schema's order.
  * array: items (a schema; with minItems/maxItems) or items/prefixItems as a list (a tuple:
    exactly those items)
  * string: minLength/maxLength, or format (date, time, date-time, uuid), or pattern (anchored
    ^...$, no negated character classes)
  * enum, const (strings without ", \, control characters or characters beyond U+FFFF)
  * anyOf (alone), $ref to "#/$defs/NAME" or "#/definitions/NAME" (alone; recursion allowed)
  * {} and {"type": "object"} = any JSON object

Whitespace: the converter allows one optional space after each token (space ::= " "?), so a
model cannot run away in whitespace; llama-cpp-python's JSON_GBNF (any JSON) allows a newline and
up to 20 blanks at every such place, so JSON_OBJECT_GRAMMAR is made by the converter as well.
What stays unbounded: string length (unless maxLength), array length (unless maxItems), nesting in
{"type": "object"} values and recursive $refs. A model that does not want to close a string ends
at max_length (finish_reason "length", the text then does not parse).

One fix to the converter's output: its string character rule ([^"\\]) admits raw control
characters, which JSON forbids inside strings (json.loads refuses them); it is replaced by
llama.cpp's current rule, [^"\\\x7F\x00-\x1F], less surrogates and values above U+10FFFF
(llama.cpp's UTF-8 decoder lets those through; a byte-fallback model can spell them byte by
byte, and they come out as U+FFFD). Pattern "." ([^\x0A\x0D]) gets the same class.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any

from llama_cpp.llama_grammar import PRIMITIVE_RULES, json_schema_to_gbnf

from .errors import InvalidParameter

FIELD = "response_format"
MAX_SCHEMA_CHARS = 32 * 1024   # the schema as compact JSON
MAX_SCHEMA_DEPTH = 16          # nested schemas (properties, items, anyOf, ... each add one)
MAX_JSON_DEPTH = 64            # any nesting in the schema document (const/enum values included)
MAX_REPEAT = 256               # minItems/maxItems/minLength/maxLength: each unit is grammar text
MAX_GRAMMAR_CHARS = 256 * 1024

_ANNOTATIONS = frozenset({
    "title", "description", "default", "examples", "$comment", "$schema", "$id", "$anchor",
    "deprecated", "readOnly", "writeOnly", "contentMediaType", "contentEncoding",
})
_DEFS = ("$defs", "definitions")
_TYPES = frozenset({"object", "array", "string", "number", "integer", "boolean", "null"})
_FORMATS = frozenset({"date", "time", "date-time", "uuid"})
_REF = re.compile(r"#/(\$defs|definitions)/([^/~]+)\Z")

# The converter's string character rule and its replacement (see the module docstring). Matched
# by content, so a llama-cpp-python that fixes it upstream makes this a no-op.
_LOOSE_CHAR = PRIMITIVE_RULES["char"].content
_JSON_CHAR = r'[^"\\\x7F\x00-\x1F\uD800-\uDFFF\U00110000-\U001FFFFF]'
_STRICT_CHAR = _LOOSE_CHAR.replace(r'[^"\\]', _JSON_CHAR, 1)
# Pattern "." becomes this; inside a JSON string it must not produce ", \ or controls either.
_LOOSE_DOT = r"[^\x0A\x0D]"
_STRICT_DOT = _JSON_CHAR


def _bad(path: str, message: str) -> InvalidParameter:
    return InvalidParameter(FIELD, f"json_schema at {path}: {message}")


def _json_depth_ok(doc: Any) -> bool:
    """Iterative, so that a deep document cannot raise RecursionError here."""
    stack = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            return False
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)
    return True


def _check_literal_text(s: str, path: str) -> None:
    """Strings the converter writes as GBNF literals via json.dumps: a backslash escape there comes
    out one level short, and non-BMP characters as surrogate pairs no token can produce."""
    for c in s:
        if c in '"\\' or ord(c) < 0x20 or ord(c) > 0xFFFF:
            raise _bad(path, f"the string {s!r} contains {c!r}; quotes, backslashes, control characters "
                             "and characters beyond U+FFFF are not supported in property names, enum and const")


def _check_value(v: Any, path: str) -> None:
    """An enum/const value: any JSON, with literal-safe strings and finite numbers."""
    if isinstance(v, str):
        _check_literal_text(v, path)
    elif isinstance(v, float) and not math.isfinite(v):
        raise _bad(path, f"{v} is not a JSON number")
    elif isinstance(v, dict):
        for k, x in v.items():
            if not isinstance(k, str):
                raise _bad(path, "object keys must be strings")
            _check_literal_text(k, path)
            _check_value(x, path)
    elif isinstance(v, list):
        for x in v:
            _check_value(x, path)
    elif not (v is None or isinstance(v, (bool, int, float))):
        raise _bad(path, f"{type(v).__name__} is not a JSON value")


def _count(node: dict, key: str, path: str) -> int:
    v = node[key]
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_REPEAT:
        raise _bad(path, f"{key} must be an integer between 0 and {MAX_REPEAT}, got {v!r}")
    return v


def _check(node: Any, path: str, depth: int, defs: dict[str, Any]) -> dict:
    """Refuse what the converter would ignore or mistranslate; return the schema without its
    annotations (the converter treats {"description": ...} as a schema it does not know)."""
    if depth > MAX_SCHEMA_DEPTH:
        raise _bad(path, f"schemas nest more than {MAX_SCHEMA_DEPTH} deep")
    if not isinstance(node, dict):
        raise _bad(path, f"a schema must be a JSON object, got {json.dumps(node)[:40]}")
    out = {k: v for k, v in node.items() if k not in _ANNOTATIONS and (depth > 0 or k not in _DEFS)}
    if depth > 0 and any(k in node for k in _DEFS):
        raise _bad(path, "$defs/definitions are only supported at the top level")
    t = out.get("type")
    if isinstance(t, list):
        if not t or not all(isinstance(x, str) and x in _TYPES for x in t) or len(set(t)) != len(t):
            raise _bad(path, f"type must list distinct JSON types ({', '.join(sorted(_TYPES))}), got {t!r}")
    elif t is not None and t not in _TYPES:
        raise _bad(path, f"unknown type {t!r} (one of {', '.join(sorted(_TYPES))})")

    def only(*allowed: str) -> None:
        extra = sorted(set(out) - set(allowed))
        if extra:
            raise _bad(path, f"{', '.join(extra)} not supported here (with {', '.join(k for k in allowed if k in out)})")

    sub = depth + 1
    # The branches follow the converter's own order of precedence (SchemaConverter.visit).
    if "$ref" in out:
        only("$ref")
        ref = out["$ref"]
        m = _REF.match(ref) if isinstance(ref, str) else None
        if not m or m.group(2) not in defs.get(m.group(1), ()):
            raise _bad(path, f"$ref {ref!r} must name an entry of the top-level $defs or definitions")
        return out
    if "oneOf" in out:
        raise _bad(path, "oneOf is not supported (the converter treats it as anyOf); use anyOf")
    if "anyOf" in out:
        only("anyOf")
        alts = out["anyOf"]
        if not isinstance(alts, list) or not alts:
            raise _bad(path, "anyOf must be a non-empty list of schemas")
        out["anyOf"] = [_check(a, f"{path}/anyOf/{i}", sub, defs) for i, a in enumerate(alts)]
        return out
    if isinstance(t, list):
        only("type")
        return out
    if "const" in out:
        only("const", "type")
        _check_value(out["const"], f"{path}/const")
        return out
    if "enum" in out:
        only("enum", "type")
        if not isinstance(out["enum"], list) or not out["enum"]:
            raise _bad(path, "enum must be a non-empty list")
        _check_value(out["enum"], f"{path}/enum")
        return out
    if "allOf" in out:
        raise _bad(path, "allOf is not supported")
    if t in (None, "object") and ("properties" in out or out.get("additionalProperties", True) is not True):
        only("type", "properties", "required", "additionalProperties")
        props = out.get("properties", {})
        if not isinstance(props, dict):
            raise _bad(path, "properties must be an object")
        clean = {}
        for name, s in props.items():
            if not name:  # the converter names a property's rule after it, and "" is its root rule
                raise _bad(path, "an empty property name is not supported")
            _check_literal_text(name, f"{path}/properties")
            clean[name] = _check(s, f"{path}/properties/{name}", sub, defs)
        if "properties" in out:
            out["properties"] = clean
        req = out.get("required", [])
        if not isinstance(req, list) or not all(isinstance(r, str) for r in req):
            raise _bad(path, "required must be a list of property names")
        missing = [r for r in req if r not in props]
        if missing:
            raise _bad(path, f"required names {', '.join(map(repr, missing))}, which are not among its properties")
        add = out.get("additionalProperties")
        if isinstance(add, dict):
            out["additionalProperties"] = _check(add, f"{path}/additionalProperties", sub, defs)
        elif add is not None and not isinstance(add, bool):
            raise _bad(path, "additionalProperties must be true, false or a schema")
        return out
    if t in (None, "array") and ("items" in out or "prefixItems" in out):
        if "items" in out and "prefixItems" in out:
            raise _bad(path, "items together with prefixItems is not supported")
        key = "items" if "items" in out else "prefixItems"
        items = out[key]
        if isinstance(items, list):
            only("type", key)
            if not items:
                raise _bad(path, f"{key} must not be empty")
            out[key] = [_check(s, f"{path}/{key}/{i}", sub, defs) for i, s in enumerate(items)]
            return out
        if key == "prefixItems":
            raise _bad(path, "prefixItems must be a list of schemas")
        only("type", "items", "minItems", "maxItems")
        lo = _count(out, "minItems", path) if "minItems" in out else 0
        hi = _count(out, "maxItems", path) if "maxItems" in out else None
        if hi is not None and hi < lo:
            raise _bad(path, f"maxItems {hi} < minItems {lo}")
        out["items"] = _check(items, f"{path}/items", sub, defs)
        return out
    if t in (None, "string") and "pattern" in out:
        only("type", "pattern")
        p = out["pattern"]
        if not isinstance(p, str) or not (p.startswith("^") and p.endswith("$")) or len(p) < 2:
            raise _bad(path, "pattern must be a string anchored with ^ and $")
        if "[^" in p:
            raise _bad(path, "negated character classes ([^...]) are not supported in pattern")
        if "\\" in p:
            # The converter copies escapes into the grammar as they are: \x22 becomes a bare quote
            # inside the JSON string, \n a raw newline, \d a rule llama.cpp cannot parse.
            raise _bad(path, "escapes (\\...) are not supported in pattern; spell characters out, or use [0-9] for \\d")
        _check_literal_text(p, f"{path}/pattern")
        return out
    if t in (None, "string") and "format" in out:
        only("type", "format")
        if out["format"] not in _FORMATS:
            raise _bad(path, f"format {out['format']!r} is not supported (one of {', '.join(sorted(_FORMATS))})")
        return out
    if t == "string" and ("minLength" in out or "maxLength" in out):
        only("type", "minLength", "maxLength")
        lo = _count(out, "minLength", path) if "minLength" in out else 0
        hi = _count(out, "maxLength", path) if "maxLength" in out else None
        if hi is not None and hi < lo:
            raise _bad(path, f"maxLength {hi} < minLength {lo}")
        return out
    if not out or t == "object":
        only("type", "additionalProperties")  # additionalProperties: true here (false went above)
        return out
    if t is None:
        raise _bad(path, f"cannot tell what {sorted(out)} describes: give a type")
    only("type")
    return out


def schema_to_grammar(schema: dict) -> str:
    """GBNF (root rule "root") whose language is JSON text valid against `schema`.

    Raises InvalidParameter("response_format", ...) for a schema that is not a JSON object, is too
    big or deep, or uses what the converter cannot honour (see the module docstring). A grammar it
    returns may still fail llama.cpp's parser in odd corners (regex escapes in a pattern that GBNF
    lacks): runtime.model.check_grammar() finds that before generation.
    """
    if not isinstance(schema, dict):
        raise InvalidParameter(FIELD, f"json_schema must be a JSON object, got {type(schema).__name__}")
    if not _json_depth_ok(schema):
        raise InvalidParameter(FIELD, f"json_schema nests more than {MAX_JSON_DEPTH} deep")
    try:
        text = json.dumps(schema, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise InvalidParameter(FIELD, f"json_schema is not JSON: {e}") from None
    if len(text) > MAX_SCHEMA_CHARS:
        raise InvalidParameter(FIELD, f"json_schema is {len(text)} characters as JSON; at most {MAX_SCHEMA_CHARS}")
    defs = {key: schema[key] for key in _DEFS if key in schema}  # what a $ref may name
    for key, d in defs.items():
        if not isinstance(d, dict):
            raise _bad("#", f"{key} must be an object of schemas")
    clean = _check(schema, "#", 0, defs)
    for key, d in defs.items():
        clean[key] = {name: _check(s, f"#/{key}/{name}", 1, defs) for name, s in d.items()}
    if "$ref" in clean:
        # The converter's resolve_refs does not look beside a $ref, so $refs inside $defs would stay
        # unresolved (KeyError) when the root itself is one; anyOf of one is the same schema.
        clean["anyOf"] = [{"$ref": clean.pop("$ref")}]
    try:
        grammar = json_schema_to_gbnf(json.dumps(clean))
    except Exception as e:  # the converter raises ValueError, AssertionError, KeyError, ...
        raise InvalidParameter(FIELD, f"json_schema cannot be turned into a grammar: {type(e).__name__}: {e}") from None
    grammar = _fix_rules(grammar)
    if len(grammar) > MAX_GRAMMAR_CHARS:
        raise InvalidParameter(FIELD, f"json_schema makes a grammar of {len(grammar)} characters; at most {MAX_GRAMMAR_CHARS}")
    return grammar


def _fix_rules(grammar: str) -> str:
    """Swap the converter's loose string-character and pattern-dot rules for JSON-safe ones (by
    exact rule body, whatever name the converter gave the rule)."""
    lines = []
    for line in grammar.split("\n"):
        name, sep, body = line.partition(" ::= ")
        if sep and body == _LOOSE_CHAR:
            line = f"{name} ::= {_STRICT_CHAR}"
        elif sep and body == _LOOSE_DOT:
            line = f"{name} ::= {_STRICT_DOT}"
        lines.append(line)
    return "\n".join(lines)


# {"type": "json_object"}: any JSON object, with the converter's bounded whitespace.
JSON_OBJECT_GRAMMAR = schema_to_grammar({"type": "object"})
