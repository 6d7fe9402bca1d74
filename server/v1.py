"""OpenAI's API: GET /v1/models, POST /v1/chat/completions and /v1/completions, with streaming.

Shapes follow OpenAI's exactly (ids chatcmpl-... / cmpl-..., object, created, model,
choices with index and finish_reason, usage). Streaming is Server-Sent Events:
    data: {chunk}\\n\\n ... data: [DONE]\\n\\n
The first chunk of each choice carries the role, then content deltas as the worker
produces them (whole UTF-8 characters: the scheduler decodes incrementally), then a
chunk with finish_reason; with stream_options.include_usage, a last chunk with usage.
An error after the stream has started is one final `event: error` whose data is the
error envelope; then the stream ends (the openai SDK raises it as APIError).
A client that disconnects mid-stream cancels its generation at once.
"""
from __future__ import annotations

import json
import logging
import queue
import secrets
import time
from typing import Iterator

from flask import Blueprint, Response, g, jsonify, request, stream_with_context

from runtime.errors import InvalidParameter, LlamaboxError, QueueFull
from runtime.params import Result

from .app import POLL_S, ApiError, acquire, check_auth, json_body, openai_error_dict, state, wait_for
from .metrics import record_job
from .v1_schema import V1Request, fill_max_length, parse_chat, parse_completion
from .validation import Limits, as_str, parse_json

log = logging.getLogger(__name__)

bp = Blueprint("v1", __name__, url_prefix="/v1")

_FINISH = {"eos": "stop", "stop": "stop", "length": "length"}
_DONE = object()  # end-of-job marker on a stream's queue


def _limits(rt) -> Limits:
    return Limits(max_new_tokens=rt.info.n_ctx, max_sequences=rt.info.n_parallel)


def _model_of(data) -> str:
    """The body's model id, checked before anything else: the model decides the limits."""
    if not isinstance(data, dict):
        raise InvalidParameter("body", f"must be a JSON object, got {type(data).__name__}")
    if "model" not in data:
        raise InvalidParameter("model", "is required (GET /v1/models lists the ids)")
    name = as_str("model", data["model"], 200)
    _check_model(name)
    return name


def _check_model(name: str) -> None:
    pool = state().pool
    if name not in pool.entries:
        raise ApiError(404, f"the model {name!r} does not exist; this server serves {', '.join(pool.entries)} (GET /v1/models)",
                       param="model", code="model_not_found")


def _usage(n_prompt: int, result: Result) -> dict:
    done = sum(c.generated_tokens for c in result.completions)
    return {"prompt_tokens": n_prompt, "completion_tokens": done, "total_tokens": n_prompt + done}


@bp.get("/models")
def models():
    check_auth()
    created = int(time.time() - (time.monotonic() - state().started))
    return jsonify({"object": "list", "data": [
        {"id": d["id"], "object": "model", "created": created, "owned_by": "llamabox", "state": d["state"]}
        for d in state().pool.describe()]})


@bp.post("/chat/completions")
def chat_completions():
    check_auth()
    data = parse_json(json_body())
    rt = acquire(_model_of(data))
    req = parse_chat(data, _limits(rt))
    tokens = rt.chat_tokens(list(req.messages))
    return _run(rt, req, tokens, "messages", chat=True)


@bp.post("/completions")
def completions():
    check_auth()
    data = parse_json(json_body())
    rt = acquire(_model_of(data))
    req = parse_completion(data, _limits(rt))
    tokens = rt.raw_tokens(req.prompt)
    return _run(rt, req, tokens, "prompt", chat=False)


# The runtime names predict's fields; a /v1 client should read its own.
_V1_NAMES = {"max_length": "max_tokens", "num_return_sequences": "n"}


def _submit(rt, tokens: list[int], params, field: str, on_text=None):
    try:
        return rt.submit_tokens(tokens, params, on_text=on_text)
    except InvalidParameter as e:
        msg = e.message
        for ours, theirs in _V1_NAMES.items():
            msg = msg.replace(ours, theirs)
        raise type(e)(_V1_NAMES.get(e.field, field if e.field == "prompt" else e.field), msg) from None


def _run(rt, req: V1Request, tokens: list[int], field: str, chat: bool):
    params = fill_max_length(req.params, len(tokens), rt.info.n_ctx, rt.info.n_parallel, field)
    kind = "chat.completion" if chat else "text_completion"
    head = {"id": ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12), "object": kind, "created": int(time.time()),
            "model": rt.info.model_id}
    if req.stream:
        deltas: queue.SimpleQueue = queue.SimpleQueue()
        job = _submit(rt, tokens, params, field, on_text=lambda i, text: deltas.put((i, text)))
        job.future.add_done_callback(lambda _f: deltas.put(_DONE))
        g.rec.stream = True
        stream = _stream(job, deltas, {**head, "object": kind + ".chunk" if chat else kind}, len(tokens), req, chat)
        resp = Response(stream_with_context(stream), mimetype="text/event-stream")
        resp.headers["Cache-Control"] = "no-cache"
        resp.headers["X-Accel-Buffering"] = "no"  # nginx: pass each event on at once
        return resp
    job = _submit(rt, tokens, params, field)
    result = wait_for(job)
    record_job(g.rec, rt.info.model_id, job, len(tokens), result)
    if chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": c.text}, "logprobs": None,
                    "finish_reason": _FINISH.get(c.finish_reason, "stop")} for i, c in enumerate(result.completions)]
    else:
        choices = [{"index": i, "text": c.text, "logprobs": None, "finish_reason": _FINISH.get(c.finish_reason, "stop")}
                   for i, c in enumerate(result.completions)]
    return jsonify({**head, "choices": choices, "usage": _usage(len(tokens), result)})


def _sse(data) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _stream(job, deltas: queue.SimpleQueue, head: dict, n_prompt: int, req: V1Request, chat: bool) -> Iterator[str]:
    settings = state().settings
    gone = request.environ.get("waitress.client_disconnected", lambda: False)
    deadline = time.monotonic() + settings.request_timeout_s
    n = req.params.num_return_sequences
    extra = {"usage": None} if req.include_usage else {}
    run_id = g.run_id
    rec = g.rec  # the access log reads it when the response closes, after the last event

    def chunk(index: int, delta: str | None = None, finish: str | None = None, role: bool = False) -> str:
        if chat:
            d: dict = {"role": "assistant", "content": ""} if role else ({"content": delta} if delta is not None else {})
            choice = {"index": index, "delta": d, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": index, "text": delta or "", "logprobs": None, "finish_reason": finish}
        return _sse({**head, "choices": [choice], **extra})

    def error_event(status: int, message: str, code: str | None) -> str:
        return f"event: error\ndata: {json.dumps(openai_error_dict(status, message, code=code))}\n\n"

    finished = False
    try:
        if chat:
            for i in range(n):
                yield chunk(i, role=True)
        while True:
            if time.monotonic() > deadline:
                yield error_event(504, f"generation did not finish within {settings.request_timeout_s:g} s and was cancelled",
                                  "timeout")
                return
            try:
                item = deltas.get(timeout=POLL_S)
            except queue.Empty:
                # While text flows, a gone client shows up as a failed write (GeneratorExit here);
                # while it does not, we ask.
                if gone():
                    log.info("run %s: client disconnected mid-stream; generation cancelled", run_id)
                    return
                continue
            if item is _DONE:
                break
            i, text = item
            yield chunk(i, text)
        finished = True
        try:
            result = job.future.result(timeout=0)
        except QueueFull as e:  # KV cache full, worker gone, shutting down: the stream ends with why
            yield error_event(503, str(e), type(e).__name__)
            return
        except LlamaboxError as e:
            yield error_event(400, str(e), type(e).__name__)
            return
        except Exception as e:  # noqa: BLE001 - after the headers went out, an error event is all we can send
            log.error("run %s failed mid-stream: %s", run_id, e, exc_info=e)
            yield error_event(500, f"internal error; the server log has the details under run_id {run_id}", None)
            return
        record_job(rec, head["model"], job, n_prompt, result)
        for i, c in enumerate(result.completions):
            yield chunk(i, finish=_FINISH.get(c.finish_reason, "stop"))
        if req.include_usage:
            yield _sse({**head, "choices": [], "usage": _usage(n_prompt, result)})
        yield "data: [DONE]\n\n"
    finally:
        if not finished or not job.future.done():
            job.cancel()  # the client went away (GeneratorExit at a yield), timed out, or we failed
