"""OpenAI request bodies (/v1/chat/completions, /v1/completions) -> what the runtime needs, strictly.

The same rules as predict's validation: every rejection names the field, nothing
is clamped, unknown fields are refused. Three sets of OpenAI fields:
  * supported: mapped onto GenerationParams (the README's table says how);
  * informational (`user`, `metadata`, `store`, `service_tier`): accepted and ignored,
    since they cannot change the output;
  * unsupported fields that would change the output (`tools`, `logprobs`, `logit_bias`,
    `echo`, `best_of`, `suffix`, ...): a 400 that names the field, unless the value is
    the one that means "off" (`logprobs: false`, `echo: false`, `best_of: 1`, null),
    which some clients send explicitly.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from runtime.errors import InvalidParameter
from runtime.model import MAX_SEED
from runtime.params import GenerationParams

from .validation import MAX_STOP_STRINGS, Limits, as_float, as_int, as_stop, as_str, show

MAX_MESSAGES = 1024
ROLES = ("system", "developer", "user", "assistant")
INFORMATIONAL = ("user", "metadata", "store", "service_tier")
# field -> values that mean the feature is off (accepted as if absent)
UNSUPPORTED_CHAT = {
    "tools": (None, []), "tool_choice": (None, "none", "auto"), "functions": (None, []), "function_call": (None, "none", "auto"),
    "parallel_tool_calls": (None, True, False), "logprobs": (None, False), "top_logprobs": (None, 0), "logit_bias": (None, {}),
    "audio": (None,), "modalities": (None, ["text"]), "prediction": (None,), "reasoning_effort": (None,),
    "web_search_options": (None,),
}
UNSUPPORTED_COMPLETIONS = {"logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1), "suffix": (None, ""),
                           "logit_bias": (None, {})}
COMMON = ("model", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "presence_penalty", "frequency_penalty",
          "stream", "stream_options", "top_k", "repetition_penalty")
CHAT_FIELDS = COMMON + ("messages", "max_completion_tokens", "response_format")
COMPLETION_FIELDS = COMMON + ("prompt",)


@dataclass(frozen=True)
class V1Request:
    model: str
    params: GenerationParams        # max_length is 0 when the client gave no limit: fill in after tokenizing
    stream: bool = False
    include_usage: bool = False
    messages: tuple[dict, ...] = ()  # chat: [{"role", "content"}], content always a string here
    prompt: str | None = None       # completions


def _check_fields(data: Any, known: tuple[str, ...], unsupported: dict[str, tuple]) -> dict:
    if not isinstance(data, dict):
        raise InvalidParameter("body", f"must be a JSON object, got {type(data).__name__}")
    for k, v in data.items():
        if k in unsupported:
            if not any(v == off and type(v) is type(off) for off in unsupported[k]):
                raise InvalidParameter(k, f"is not supported by llamabox (got {show(v)}); remove it")
        elif k not in known and k not in INFORMATIONAL:
            raise InvalidParameter(k, "is not a known field of this endpoint")
    return data


def _as_bool(field: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise InvalidParameter(field, f"must be true or false, got {show(v)}")
    return v


def _common(data: dict, limits: Limits) -> tuple[str, dict[str, Any], bool, bool]:
    if "model" not in data:
        raise InvalidParameter("model", "is required (GET /v1/models lists the ids)")
    model = as_str("model", data["model"], 200)
    kw: dict[str, Any] = {}
    for name in ("max_tokens", "max_completion_tokens"):
        if data.get(name) is not None:
            kw["max_length"] = as_int(name, data[name], 1, limits.max_new_tokens)
    if data.get("temperature") is not None:
        kw["temperature"] = as_float("temperature", data["temperature"], 0.0, 2.0)
    if data.get("top_p") is not None:
        kw["top_p"] = as_float("top_p", data["top_p"], 0.0, 1.0)
    if data.get("n") is not None:
        kw["num_return_sequences"] = as_int("n", data["n"], 1, limits.max_sequences)
    if data.get("stop") is not None:
        kw["stop"] = as_stop(data["stop"])
    if data.get("seed") is not None:
        kw["seed"] = as_int("seed", data["seed"], 0, MAX_SEED)
    for name in ("presence_penalty", "frequency_penalty"):
        if data.get(name) is not None:
            kw[name] = as_float(name, data[name], -2.0, 2.0)
    if data.get("top_k") is not None:
        kw["top_k"] = as_int("top_k", data["top_k"], 0, 1_000_000)
    if data.get("repetition_penalty") is not None:
        kw["repetition_penalty"] = as_float("repetition_penalty", data["repetition_penalty"], 1.0, 10.0)
    stream = _as_bool("stream", data["stream"]) if data.get("stream") is not None else False
    include_usage = False
    opts = data.get("stream_options")
    if opts is not None:
        if not stream:
            raise InvalidParameter("stream_options", "is only allowed with stream: true")
        if not isinstance(opts, dict) or set(opts) - {"include_usage", "include_obfuscation"}:
            raise InvalidParameter("stream_options", f"must be an object with include_usage, got {show(opts)}")
        include_usage = _as_bool("stream_options.include_usage", opts.get("include_usage", False))
    kw.setdefault("temperature", 1.0)
    kw.setdefault("top_k", 0)        # OpenAI has no top-k: off unless asked (predict keeps the hosted API's 50)
    kw.setdefault("max_length", 0)   # 0 = as many as fit; set after the prompt is tokenized
    return model, kw, stream, include_usage


def _content(i: int, v: Any, max_chars: int) -> str:
    """A message's content: a string, or OpenAI's list of parts of which we take text parts only."""
    field = f"messages[{i}].content"
    if isinstance(v, list):
        texts = []
        for j, part in enumerate(v):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidParameter(f"{field}[{j}]", f"only parts of type 'text' are supported, got {show(part)}")
            texts.append(part["text"])
        v = "".join(texts)
    return as_str(field, v, max_chars, allow_empty=True)


def _messages(v: Any, limits: Limits) -> tuple[dict, ...]:
    if not isinstance(v, list) or not 1 <= len(v) <= MAX_MESSAGES:
        raise InvalidParameter("messages", f"must be a list of 1 to {MAX_MESSAGES} messages, got {show(v)}")
    out = []
    total = 0
    for i, m in enumerate(v):
        if not isinstance(m, dict):
            raise InvalidParameter(f"messages[{i}]", f"must be an object with role and content, got {show(m)}")
        extra = set(m) - {"role", "content", "name"}
        if extra:
            raise InvalidParameter(f"messages[{i}].{sorted(extra)[0]}", "is not supported (tool calls and audio are not)")
        role = m.get("role")
        if role not in ROLES:
            raise InvalidParameter(f"messages[{i}].role", f"must be one of {', '.join(ROLES)}, got {show(role)}")
        if "content" not in m or m["content"] is None:
            raise InvalidParameter(f"messages[{i}].content", "is required")
        content = _content(i, m["content"], limits.max_prompt_chars)
        total += len(content)
        if total > limits.max_prompt_chars:
            raise InvalidParameter("messages", f"hold more than {limits.max_prompt_chars} characters in all")
        # "developer" is OpenAI's newer name for "system"; chat templates know only "system".
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return tuple(out)


def _response_format(v: Any) -> str | None:
    """The GBNF grammar that response_format asks for, or None for plain text."""
    from runtime.grammar import JSON_OBJECT_GRAMMAR, schema_to_grammar

    if not isinstance(v, dict) or not isinstance(v.get("type"), str):
        raise InvalidParameter("response_format", f"must be an object with a type, got {show(v)}")
    kind = v["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return JSON_OBJECT_GRAMMAR
    if kind == "json_schema":
        spec = v.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise InvalidParameter("response_format.json_schema.schema", "must be a JSON Schema object")
        return schema_to_grammar(spec["schema"])
    raise InvalidParameter("response_format.type", f"must be text, json_object or json_schema, got {show(kind)}")


def parse_chat(data: Any, limits: Limits) -> V1Request:
    data = _check_fields(data, CHAT_FIELDS, UNSUPPORTED_CHAT)
    if "messages" not in data:
        raise InvalidParameter("messages", "is required")
    messages = _messages(data["messages"], limits)
    model, kw, stream, include_usage = _common(data, limits)
    if data.get("response_format") is not None:
        grammar = _response_format(data["response_format"])
        if grammar is not None:
            kw["grammar"] = grammar
    return V1Request(model, GenerationParams(**kw), stream, include_usage, messages=messages)


def parse_completion(data: Any, limits: Limits) -> V1Request:
    data = _check_fields(data, COMPLETION_FIELDS, UNSUPPORTED_COMPLETIONS)
    if "prompt" not in data:
        raise InvalidParameter("prompt", "is required")
    prompt = data["prompt"]
    if isinstance(prompt, list):  # OpenAI takes a batch of prompts; one is all we take
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            raise InvalidParameter("prompt", "must be a string (or a list of exactly one string); token arrays and batches are not supported")
        prompt = prompt[0]
    prompt = as_str("prompt", prompt, limits.max_prompt_chars)
    model, kw, stream, include_usage = _common(data, limits)
    if "max_length" in kw and kw["max_length"] == 0:
        kw["max_length"] = min(16, limits.max_new_tokens)  # OpenAI's default for completions
    return V1Request(model, GenerationParams(**kw), stream, include_usage, prompt=prompt)


def fill_max_length(params: GenerationParams, n_prompt: int, n_ctx: int, n_parallel: int, field: str) -> GenerationParams:
    """No max_tokens: as many new tokens per sequence as fit beside the prompt, but at most a fair
    share of the context (n_ctx / n_parallel, as llama.cpp's server gives each slot). A request
    reserves its whole budget of KV cells up front, so an unlimited one would otherwise hold the
    entire context and run alone; most OpenAI clients send no max_tokens."""
    if params.max_length:
        return params
    room = (n_ctx - n_prompt) // params.num_return_sequences
    if room < 1:
        raise InvalidParameter(field, f"the prompt is {n_prompt} tokens; the context holds {n_ctx} in all")
    return replace(params, max_length=min(room, max(1, n_ctx // n_parallel)))


__all__ = ["V1Request", "parse_chat", "parse_completion", "fill_max_length", "MAX_STOP_STRINGS"]
