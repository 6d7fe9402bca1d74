"""Constrained output (GBNF grammars, JSON schema) and OpenAI presence/frequency penalties.

Generation runs on the real tiny model: random weights, so at temperature 1.0 it wanders over the
whole vocabulary (byte-fallback tokens included), which is what a grammar has to hold in.
"""
from __future__ import annotations

import collections
import json
import re

import llama_cpp
import numpy as np
import pytest

from runtime import GenerationParams, load
from runtime.errors import InvalidParameter
from runtime.grammar import JSON_OBJECT_GRAMMAR, MAX_SCHEMA_CHARS, schema_to_grammar
from runtime.model import Sampler, check_grammar

SEEDS_PER_SCHEMA = 20
MAX_LENGTH = 256


@pytest.fixture(scope="module")
def grt(gguf_files):
    """Room for four 256-token sequences at once."""
    rt = load(gguf_files["f16"], n_ctx=2048, n_threads=2, model_id="llamav2-7b", n_parallel=4, queue_size=16)
    yield rt
    rt.close()


# --- a JSON Schema checker for the keywords these tests use (jsonschema is not a dependency) ------

def _is(x, t: str) -> bool:
    if t in ("integer", "number"):
        return isinstance(x, int if t == "integer" else (int, float)) and not isinstance(x, bool)
    return isinstance(x, {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}[t])


def validate(x, schema, root=None):
    """Raise AssertionError if x is not valid against schema."""
    root = root if root is not None else schema
    if "$ref" in schema:
        _, kind, name = schema["$ref"].split("/")
        return validate(x, root[kind][name], root)
    if "anyOf" in schema:
        errors = []
        for alt in schema["anyOf"]:
            try:
                return validate(x, alt, root)
            except AssertionError as e:
                errors.append(str(e))
        raise AssertionError(f"{x!r} matches no anyOf branch: {errors}")
    if "const" in schema:
        assert x == schema["const"] and type(x) is type(schema["const"]), f"{x!r} != const {schema['const']!r}"
    if "enum" in schema:
        assert any(x == v and type(x) is type(v) for v in schema["enum"]), f"{x!r} not in {schema['enum']}"
    t = schema.get("type")
    if t is not None:
        assert any(_is(x, k) for k in (t if isinstance(t, list) else [t])), f"{x!r} is not {t}"
    if isinstance(x, dict):
        props = schema.get("properties", {})
        for name in schema.get("required", []):
            assert name in x, f"required {name!r} missing from {x!r}"
        for k, v in x.items():
            if k in props:
                validate(v, props[k], root)
            else:
                extra = schema.get("additionalProperties", True)
                assert extra is not False, f"additional property {k!r}"
                if isinstance(extra, dict):
                    validate(v, extra, root)
    if isinstance(x, list):
        assert len(x) >= schema.get("minItems", 0), f"fewer than minItems: {x!r}"
        assert len(x) <= schema.get("maxItems", len(x)), f"more than maxItems: {x!r}"
        for v in x:
            if isinstance(schema.get("items"), dict):
                validate(v, schema["items"], root)
    if isinstance(x, str):
        assert len(x) >= schema.get("minLength", 0) and len(x) <= schema.get("maxLength", len(x)), f"length of {x!r}"
        if "pattern" in schema:
            assert re.search(schema["pattern"], x), f"{x!r} does not match {schema['pattern']}"
        if schema.get("format") == "date":
            assert re.fullmatch(r"\d{4}-\d\d-\d\d", x), f"{x!r} is not a date"


def test_the_checker_itself_refuses_what_it_should():
    s = SCHEMAS["person"]
    validate({"name": "ab", "age": 3, "tags": ["a"]}, s)
    for bad in ({"name": "ab"}, {"name": "ab", "age": 3.5}, {"name": "ab", "age": 3, "x": 1},
                {"name": "ab", "age": 3, "tags": ["z"]}, {"name": "a" * 13, "age": 1}, [], {"name": "ab", "age": True}):
        with pytest.raises(AssertionError):
            validate(bad, s)
    validate({"s": "x", "d": "2024-01-02", "p": "a-1", "u": None}, SCHEMAS["strings"])
    for bad in ({"s": "x", "d": "2024-01-02", "p": "a-1", "u": 3}, {"s": "", "d": "2024-01-02", "p": "a-1"},
                {"s": "x", "d": "2024-01-02", "p": "d-1"}):
        with pytest.raises(AssertionError):
            validate(bad, SCHEMAS["strings"])
    validate({"a": {"t": "leaf", "v": None}, "b": [{"t": "leaf", "v": 2}]}, SCHEMAS["refs_anyof_const"])
    with pytest.raises(AssertionError):
        validate({"a": {"t": "leaf", "v": "2"}}, SCHEMAS["refs_anyof_const"])


SCHEMAS = {
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12, "description": "annotations are ignored"},
            "age": {"type": "integer"},
            "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 4},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    "nested": {
        "type": "object",
        "properties": {
            "id": {"type": "integer"},
            "owner": {
                "type": "object",
                "properties": {"ok": {"type": "boolean"}, "kind": {"enum": ["x", "yy", 3, None]}},
                "required": ["ok", "kind"],
            },
            "vals": {"type": "array", "items": {"type": "number"}, "minItems": 1, "maxItems": 5},
        },
        "required": ["id", "owner", "vals"],
    },
    "array_of_objects": {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {"k": {"enum": ["alpha", "beta"]}, "n": {"type": "integer"}, "f": {"type": "boolean"}},
            "required": ["k", "n"],
        },
        "minItems": 1,
        "maxItems": 3,
    },
    "refs_anyof_const": {
        "$defs": {
            "leaf": {
                "type": "object",
                "properties": {"t": {"const": "leaf"}, "v": {"anyOf": [{"type": "integer"}, {"type": "null"}]}},
                "required": ["t", "v"],
            },
        },
        "type": "object",
        "properties": {"a": {"$ref": "#/$defs/leaf"}, "b": {"type": "array", "items": {"$ref": "#/$defs/leaf"}, "maxItems": 2}},
        "required": ["a"],
    },
    "strings": {
        "type": "object",
        "properties": {
            "s": {"type": "string", "minLength": 1, "maxLength": 8},
            "d": {"type": "string", "format": "date"},
            "p": {"type": "string", "pattern": "^[a-c]-[0-9]$"},
            "u": {"type": ["string", "null"]},
        },
        "required": ["s", "d", "p"],
    },
}


def sample_many(rt, grammar: str, n: int = SEEDS_PER_SCHEMA, **kw):
    """n completions at temperature 1.0 with no top-k: n/4 requests of 4 sequences, each its own seed."""
    out = []
    for k in range(n // 4):
        p = GenerationParams(max_length=MAX_LENGTH, temperature=1.0, top_k=0, grammar=grammar, seed=1000 + k,
                             num_return_sequences=4, **kw)
        out += rt.generate("Here is the data:", p).completions
    return out


@pytest.mark.parametrize("name", SCHEMAS)
def test_schema_output_parses_and_validates(grt, name):
    schema = SCHEMAS[name]
    grammar = schema_to_grammar(schema)
    check_grammar(grt.model, grammar)
    done = sample_many(grt, grammar)
    finishes = collections.Counter(c.finish_reason for c in done)
    for c in done:
        if c.finish_reason == "eos":
            validate(json.loads(c.text), schema)
            assert "\ufffd" not in c.text  # no invalid UTF-8 got through the grammar
    # Every schema here bounds its strings and arrays, so a random model closes them in time.
    assert finishes["eos"] >= SEEDS_PER_SCHEMA * 3 // 4, finishes


def test_json_object_mode_gives_objects(grt):
    check_grammar(grt.model, JSON_OBJECT_GRAMMAR)
    done = sample_many(grt, JSON_OBJECT_GRAMMAR)
    eos = [c for c in done if c.finish_reason == "eos"]
    assert len(eos) >= SEEDS_PER_SCHEMA * 3 // 4
    for c in eos:
        assert isinstance(json.loads(c.text), dict)


def test_json_whitespace_is_bounded():
    """One optional space between tokens: a model cannot spend max_length on blanks."""
    for g in [JSON_OBJECT_GRAMMAR, schema_to_grammar(SCHEMAS["nested"])]:
        assert 'space ::= " "?' in g
        assert "\\n" not in g and "\\t" not in g  # blanks are one optional space; strings refuse raw \x00-\x1F


def test_grammar_holds_at_temperature_zero_and_with_other_samplers(grt):
    free = grt.generate("Answer:", GenerationParams(max_length=8, temperature=0.0)).completions[0].text
    g = 'root ::= "yes" | "no"'
    r = grt.generate("Answer:", GenerationParams(max_length=8, temperature=0.0, grammar=g))
    assert r.completions[0].text in ("yes", "no") and r.completions[0].finish_reason == "eos"
    assert free not in ("yes", "no")
    for kw in ({"top_k": 1}, {"top_p": 0.5, "top_k": 5}, {"temperature": 3.0, "top_k": 0}):
        p = GenerationParams(max_length=8, grammar=g, seed=3, num_return_sequences=4, **kw)
        assert {c.text for c in grt.generate("Answer:", p).completions} <= {"yes", "no"}


def test_grammar_does_not_see_the_prompt(grt):
    """The repetition penalty is fed the prompt; the grammar beside it in the chain must not be
    (a prompt token the grammar refuses would make llama.cpp throw through the C API: abort)."""
    g = schema_to_grammar(SCHEMAS["person"])
    for kw in ({"repetition_penalty": 1.3}, {"repetition_penalty": 1.3, "presence_penalty": 0.5, "frequency_penalty": 0.5}):
        for c in sample_many(grt, g, n=4, **kw):
            if c.finish_reason == "eos":
                validate(json.loads(c.text), SCHEMAS["person"])


@pytest.mark.parametrize("bad", [
    "root ::= (",                       # syntax
    'start ::= "a"',                    # no root rule
    'root ::= other',                   # undefined rule
    'root ::= root "a" | "b"',          # left recursion
    "",                                 # empty
    "   \n",
    'root ::= "a\x00"',                 # NUL
    'root ::= "\ud800"',                # not encodable
])
def test_unparseable_grammar_is_invalid_parameter(grt, bad):
    with pytest.raises(InvalidParameter) as e:
        check_grammar(grt.model, bad)
    assert e.value.field == "response_format"
    with pytest.raises(InvalidParameter):
        Sampler(grt.model, GenerationParams(grammar=bad), 1, [1, 2, 3])


def test_a_dead_end_grammar_ends_the_sequence_instead_of_aborting(grt):
    """No token spells NUL (llama.cpp refuses empty and NUL-led pieces): the grammar allows nothing
    after "ab". Unguarded, llama.cpp would pick a forbidden token and abort the process."""
    for t in (0.0, 1.0):  # the process lives, and the request fails as what it is: an unfinishable grammar
        with pytest.raises(InvalidParameter) as e:
            grt.generate("x", GenerationParams(max_length=16, temperature=t, seed=1, grammar='root ::= "ab" [\\x00]'))
        assert e.value.field == "response_format"
    assert grt.generate("x", GenerationParams(max_length=4, temperature=0.0)).completions[0].generated_tokens > 0
    s = Sampler(grt.model, GenerationParams(temperature=0.0, grammar="root ::= [\\x00]"), 1, [])
    try:
        assert pick(s, grt.model, {}) == llama_cpp.llama_vocab_eos(grt.model._vocab)
        assert s.grammar_dead_end
    finally:
        s.free()


# --- the sampler chain on hand-made logits -----------------------------------------------------

def apply(sampler: Sampler, model, logits: dict[int, float]) -> tuple[np.ndarray, int]:
    """Run the chain on logits (token -> logit, others 0.0): (the logits it leaves, the token it picks).
    Nothing is accepted; at temperature 0 the chain ends in argmax, which reorders nothing."""
    data = (llama_cpp.llama_token_data * model.n_vocab)()
    for i in range(model.n_vocab):
        data[i].id, data[i].logit, data[i].p = i, logits.get(i, 0.0), 0.0
    arr = llama_cpp.llama_token_data_array(data, model.n_vocab, -1, False)
    llama_cpp.llama_sampler_apply(sampler.chain, llama_cpp.byref(arr))
    return np.array([d.logit for d in data], dtype=np.float32), data[arr.selected].id


def pick(sampler: Sampler, model, logits: dict[int, float], accept: bool = True) -> int:
    tok = apply(sampler, model, logits)[1]
    if accept:
        llama_cpp.llama_sampler_accept(sampler.chain, tok)
    return tok


X, Y = 100, 101  # two ordinary tokens of the tiny vocabulary


def test_presence_and_frequency_follow_openai_and_ignore_the_prompt(grt):
    m = grt.model
    s = Sampler(m, GenerationParams(temperature=0.0, presence_penalty=1.0, frequency_penalty=0.25), 1, history=[X] * 7)
    try:
        out, picked = apply(s, m, {X: 3.0})
        assert out[X] == 3.0 and picked == X  # seven X in the prompt: not counted
        for count in (1, 2, 3):
            llama_cpp.llama_sampler_accept(s.chain, X)
            assert apply(s, m, {X: 3.0})[0][X] == pytest.approx(3.0 - 1.0 - 0.25 * count)
        llama_cpp.llama_sampler_accept(s.chain, Y)
        out, _ = apply(s, m, {X: 3.0, Y: 3.0})
        assert out[Y] == pytest.approx(3.0 - 1.25) and out[X] == pytest.approx(3.0 - 1.75)
    finally:
        s.free()


def test_repetition_penalty_still_counts_the_prompt_beside_openai_penalties(grt):
    m = grt.model
    s = Sampler(m, GenerationParams(temperature=0.0, repetition_penalty=2.0, presence_penalty=1.0, frequency_penalty=0.5), 1, history=[X])
    try:
        out, _ = apply(s, m, {X: 3.0, Y: -3.0})
        assert out[X] == pytest.approx(1.5) and out[Y] == -3.0  # HF: the prompt's X is divided
        llama_cpp.llama_sampler_accept(s.chain, X)
        llama_cpp.llama_sampler_accept(s.chain, Y)
        out, _ = apply(s, m, {X: 3.0, Y: -3.0})
        assert out[X] == pytest.approx(1.5 - 1.5) and out[Y] == pytest.approx(-6.0 - 1.5)
    finally:
        s.free()


def test_presence_and_frequency_change_greedy_output(grt):
    base = GenerationParams(max_length=48, temperature=0.0)
    plain = grt.generate("Once upon a time", base).completions[0].text
    for kw in ({"presence_penalty": 2.0}, {"frequency_penalty": 2.0}, {"presence_penalty": -2.0}):
        p = GenerationParams(max_length=48, temperature=0.0, **kw)
        assert grt.generate("Once upon a time", p).completions[0].text != plain, kw


def test_prompt_tokens_are_not_penalised_end_to_end(grt):
    """Through the scheduler: a grammar of token ids forces token A, then lets greedy choose A or B,
    with B all over the prompt. Where plain greedy repeats A, a huge presence or frequency penalty
    must switch to B: A was generated, B only prompted. (Were the prompt counted, both would carry
    the penalty and greedy would repeat A.)"""
    m = grt.model
    ids = {m.piece(t): t for t in range(m.n_vocab)}
    decisive = 0
    for a, b in [("y", "x"), ("b", "a"), ("s", "t"), ("a", "b"), ("x", "y"), ("t", "s")]:
        ta, tb = ids[a.encode()], ids[b.encode()]
        prompt = "Once " + ".".join(b * 5)
        assert tb in m.tokenize(prompt, add_bos=True)
        g = f"root ::= <[{ta}]> (<[{ta}]> | <[{tb}]>)"
        plain = grt.generate(prompt, GenerationParams(max_length=4, temperature=0.0, grammar=g)).completions[0].text
        if plain != a + a:
            continue
        decisive += 1
        for kw in ({"presence_penalty": 1e4}, {"frequency_penalty": 1e4}):
            out = grt.generate(prompt, GenerationParams(max_length=4, temperature=0.0, grammar=g, **kw)).completions[0].text
            assert out == a + b, (a, b, kw)
    assert decisive >= 1


def test_invalid_utf8_byte_tokens_are_masked_under_a_grammar(grt):
    """llama.cpp's grammar decodes 0xC0 0xA2 as '"' (overlong) and takes 0xF8-0xFF as lead bytes;
    the guard only lets byte tokens through that continue valid UTF-8."""
    m = grt.model
    byte = {m.piece(t)[0]: t for t in range(m.n_vocab) if len(m.piece(t)) == 1}
    a = m.tokenize("a", add_bos=False)[-1]
    s = Sampler(m, GenerationParams(temperature=0.0, grammar='root ::= [^"]+'), 1, [])
    try:
        assert pick(s, m, {byte[0xC0]: 9.0, byte[0xF8]: 8.0, byte[0x80]: 7.0, a: 1.0}) == a
        assert pick(s, m, {byte[0xE0]: 9.0}) == byte[0xE0]          # a valid lead
        assert pick(s, m, {byte[0x80]: 9.0, byte[0xA0]: 8.0}) == byte[0xA0]  # E0 80 would be overlong
        assert pick(s, m, {a: 9.0, byte[0x80]: 5.0}) == byte[0x80]  # E0 A0 needs a continuation
        assert pick(s, m, {a: 9.0}) == a
    finally:
        s.free()


# --- schema checks -----------------------------------------------------------------------------

@pytest.mark.parametrize("schema, words", [
    ([{"type": "object"}], "must be a JSON object"),
    ("{}", "must be a JSON object"),
    ({"type": "integer", "minimum": 0}, "minimum"),
    ({"type": "string", "format": "email"}, "email"),
    ({"oneOf": [{"type": "string"}]}, "oneOf"),
    ({"allOf": [{"type": "object"}]}, "allOf"),
    ({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["b"]}, "'b'"),
    ({"type": "object", "properties": {"a": {"type": "object", "patternProperties": {}}}}, "#/properties/a"),
    ({"enum": ['say "hi"']}, "quotes"),
    ({"const": "back\\slash"}, "backslashes"),
    ({"type": "object", "properties": {"tab\there": {"type": "string"}}}, "control"),
    ({"enum": []}, "non-empty"),
    ({"$ref": "https://example.com/schema.json"}, "$ref"),
    ({"$ref": "#/$defs/missing"}, "$ref"),
    ({"type": "array", "items": {"type": "string"}, "maxItems": 10**6}, "maxItems"),
    ({"type": "string", "pattern": "[a-z]+"}, "anchored"),
    ({"type": "string", "pattern": "^[^a]$"}, "negated"),
    ({"type": "uuid"}, "unknown type"),
    ({"type": ["string", "null"], "maxLength": 3}, "maxLength"),
    ({"description": "no type", "minimum": 3}, "type"),
    ({"properties": {"a": True}}, "must be a JSON object"),
])
def test_unsupported_schema_is_invalid_parameter(schema, words):
    with pytest.raises(InvalidParameter) as e:
        schema_to_grammar(schema)
    assert e.value.field == "response_format"
    assert words in e.value.message


def test_schema_size_and_depth_are_bounded():
    deep: dict = {"type": "string"}
    for _ in range(20):
        deep = {"type": "object", "properties": {"a": deep}}
    with pytest.raises(InvalidParameter, match="nest"):
        schema_to_grammar(deep)
    very_deep: list = []
    for _ in range(10_000):
        very_deep = [very_deep]
    with pytest.raises(InvalidParameter, match="nest"):
        schema_to_grammar({"const": very_deep})
    wide = {"type": "object", "properties": {f"p{i}": {"type": "string", "description": "x" * 100} for i in range(400)}}
    with pytest.raises(InvalidParameter, match=str(MAX_SCHEMA_CHARS)):
        schema_to_grammar(wide)


def test_a_pattern_llama_cpp_cannot_parse_is_caught_before_generation(grt):
    # The converter passes \d through, and llama.cpp cannot parse it: refused before any grammar is made.
    with pytest.raises(InvalidParameter):
        schema_to_grammar({"type": "string", "pattern": "^\\d+$"})
    with pytest.raises(InvalidParameter):  # and a hand-made grammar with the same rule, at the sampler
        check_grammar(grt.model, 'root ::= "\\"" \\d+ "\\""')


def test_string_rule_refuses_raw_control_characters():
    g = schema_to_grammar({"type": "string"})
    assert "[^\"\\\\]" not in g and "\\x00-\\x1F" in g


def test_a_grammar_llama_cpp_cannot_parse_is_refused_at_submit(runtime):
    """Checked on the caller's thread: the request gets InvalidParameter, nobody beside it is failed."""
    from runtime.errors import InvalidParameter

    other = runtime.submit("Hello", GenerationParams(max_length=40, temperature=0.0))
    with pytest.raises(InvalidParameter) as e:
        runtime.submit("Hi", GenerationParams(max_length=5, grammar='root ::= "a" [unterminated'))
    assert e.value.field == "response_format"
    assert other.future.result(30).completions[0].generated_tokens > 0


@pytest.mark.parametrize("schema", [
    {"type": "string", "pattern": "^\\x22$"},        # an escaped quote: became a bare " inside the JSON string
    {"type": "string", "pattern": "^\\n$"},          # a raw newline inside a JSON string
    {"type": "object", "properties": {"": {"type": "null"}}, "required": [""]},  # "" took over the root rule
])
def test_schemas_the_converter_gets_wrong_are_refused(schema):
    with pytest.raises(InvalidParameter) as e:
        schema_to_grammar(schema)
    assert e.value.field == "response_format"


def test_a_grammar_dead_end_fails_the_request_instead_of_calling_it_complete(runtime):
    """A grammar that parses but can reach a point where no token is allowed: the request fails
    with response_format named, rather than returning a cut prefix as finish_reason stop."""
    job = runtime.submit("Hi", GenerationParams(max_length=20, temperature=0.0, grammar='root ::= "ab" [\\x00]'))
    with pytest.raises(InvalidParameter) as e:
        job.future.result(30)
    assert e.value.field == "response_format"
