"""The /v1 API, driven over a real socket by the real openai SDK (pinned in the test extra)."""
from __future__ import annotations

import json
import threading
import time
from dataclasses import replace

import openai
import pytest
import requests

from runtime import GenerationParams

KEY = "test-key-123"
MODEL = "llamav2-7b-chat"
HELLO = [{"role": "user", "content": "Hello there"}]


def sdk(url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


@pytest.fixture()
def client(live_server):
    return sdk(live_server)


def serve(app):
    """Run `app` behind our HTTP server on a free loopback port; returns (url, stop)."""
    from server.app import make_server

    server = make_server(app, replace(app.extensions["llamabox"].settings, port=0))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()

    def stop():
        server.close()
        t.join(10)

    return f"http://127.0.0.1:{server.effective_port}", stop


def slow_neighbour(rt, per_token_s: float = 0.005, n: int = 250):
    """A running request whose text callback sleeps: every decode step then takes at least
    per_token_s, so what runs beside it is slow enough to observe mid-way. Cancel it after.
    (It holds about 270 of the 512 KV cells: what runs beside it must fit in the rest.)"""
    return rt.submit("Numbers like 1234", GenerationParams(max_length=n, temperature=0.0),
                     on_text=lambda _i, _t: time.sleep(per_token_s))


# --- shapes ---------------------------------------------------------------------------

def test_models_lists_the_served_model(client):
    ids = [m.id for m in client.models.list()]
    assert ids == [MODEL]


def test_chat_completion_shape_and_usage(client, chat_runtime):
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12, temperature=0)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == MODEL and r.created > 0
    (c,) = r.choices
    assert c.index == 0 and c.message.role == "assistant" and isinstance(c.message.content, str)
    assert c.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == len(chat_runtime.chat_tokens(HELLO))
    assert 1 <= r.usage.completion_tokens <= 12 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    if c.finish_reason == "length":
        assert r.usage.completion_tokens == 12


def test_completion_shape_is_raw_text_without_the_chat_template(client, chat_runtime):
    r = client.completions.create(model=MODEL, prompt="Numbers like 1234", max_tokens=10, temperature=0)
    assert r.id.startswith("cmpl-") and r.object == "text_completion"
    (c,) = r.choices
    assert c.index == 0 and c.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == len(chat_runtime.raw_tokens("Numbers like 1234"))
    # the same text predict gives a base model for this prompt: no [INST] wrapping
    job = chat_runtime.submit_tokens(chat_runtime.raw_tokens("Numbers like 1234"), GenerationParams(max_length=10, temperature=0.0))
    expected = job.future.result(30).completions[0].text
    assert c.text == expected


def test_streaming_chat_equals_the_plain_answer(client):
    plain = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=30, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=30, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_streaming_completions(client):
    plain = client.completions.create(model=MODEL, prompt="Numbers like 1234", max_tokens=20, temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt="Numbers like 1234", max_tokens=20, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == plain.choices[0].text
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason


def test_first_chunk_arrives_before_generation_finishes(live_server, chat_runtime):
    sched = chat_runtime.scheduler
    neighbour = slow_neighbour(chat_runtime)
    try:
        stream = sdk(live_server).completions.create(model=MODEL, prompt="Numbers like 1234", max_tokens=100,
                                                     temperature=0, stream=True)
        first_text_at = None
        seen = 0
        for c in stream:
            if c.choices and c.choices[0].text and first_text_at is None:
                first_text_at = sched.stats["tokens_generated"]
                jobs_running = len(sched._jobs)
            seen += 1
        assert first_text_at is not None
        assert jobs_running == 2  # ours was still generating when its first text reached us
        assert seen > 10          # and it came in many pieces, not one at the end
    finally:
        neighbour.cancel()


def test_n_3_and_seed_reproducibility(client):
    kw = dict(model=MODEL, messages=HELLO, max_tokens=16, temperature=1.0, n=3, seed=1234)
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    other = client.chat.completions.create(**{**kw, "seed": 1235})
    assert [c.message.content for c in other.choices] != [c.message.content for c in a.choices]


def test_json_schema_output_parses_and_fits(client):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                                "size": {"type": "string", "enum": ["small", "large"]},
                                                "count": {"type": "integer"}},
              "required": ["name", "size", "count"], "additionalProperties": False}
    for seed in range(4):
        r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=200, temperature=1.0, seed=seed,
                                           response_format={"type": "json_schema", "json_schema": {"name": "t", "schema": schema}})
        c = r.choices[0]
        if c.finish_reason == "length":
            continue  # the README documents it: the JSON may be cut at max_tokens, and finish_reason says so
        data = json.loads(c.message.content)
        assert set(data) == {"name", "size", "count"} and data["size"] in ("small", "large") and isinstance(data["count"], int)


# --- errors, each as the SDK's typed exception ------------------------------------------

def test_bad_value_is_bad_request_naming_the_param(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=HELLO, temperature=7)
    assert e.value.body["param"] == "temperature" and e.value.body["type"] == "invalid_request_error"


def test_unsupported_field_is_bad_request_naming_it(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=HELLO, tools=[{"type": "function", "function": {"name": "f"}}])
    assert e.value.body["param"] == "tools"
    # informational fields are accepted
    assert client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2, user="u-1", metadata={"a": "b"}).choices


def test_malformed_schema_is_bad_request(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5,
                                       response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}})
    assert e.value.body["param"].startswith("response_format")


def test_wrong_key_is_authentication_error(live_server):
    with pytest.raises(openai.AuthenticationError):
        sdk(live_server, "wrong-key-0000").models.list()


def test_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=HELLO)
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"


def test_unknown_route_is_not_found_in_openai_shape(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.embeddings.create(model=MODEL, input="hi")
    assert "no such endpoint /v1/embeddings" in e.value.body["message"]


def test_body_too_large_is_413_and_wrong_type_is_415(live_server):
    with pytest.raises(openai.APIStatusError) as e:
        sdk(live_server).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x" * 100_000}])
    assert e.value.status_code == 413
    r = requests.post(live_server + "/v1/chat/completions", data="hi", headers={"Authorization": f"Bearer {KEY}",
                                                                                "Content-Type": "text/plain"}, timeout=10)
    assert r.status_code == 415 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_queue_full_is_503_with_retry_after(chat_runtime, settings):
    from runtime import load
    from server.app import create_app

    rt = load(chat_runtime.model.path, n_ctx=512, n_threads=2, model_id=MODEL, n_parallel=1, n_cache=0, queue_size=0)
    url, stop = serve(create_app(settings, rt))
    neighbour = slow_neighbour(rt)
    try:
        with pytest.raises(openai.InternalServerError) as e:
            sdk(url).chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5)
        assert e.value.status_code == 503 and e.value.response.headers["Retry-After"]
    finally:
        neighbour.cancel()
        stop()
        rt.close()


def test_timeout_is_504(chat_runtime, settings):
    from server.app import create_app

    url, stop = serve(create_app(replace(settings, request_timeout_s=0.3), chat_runtime))
    neighbour = slow_neighbour(chat_runtime)
    try:
        with pytest.raises(openai.InternalServerError) as e:
            sdk(url).completions.create(model=MODEL, prompt="Numbers like 1234", max_tokens=200, temperature=0)
        assert e.value.status_code == 504
        # the same deadline mid-stream: a final error event, which the SDK raises
        with pytest.raises(openai.APIError, match="did not finish"):
            for _ in sdk(url).completions.create(model=MODEL, prompt="Numbers like 1234", max_tokens=200, temperature=0,
                                                 stream=True):
                pass
    finally:
        neighbour.cancel()
        stop()


# --- a client that disconnects mid-stream --------------------------------------------------

def test_disconnect_mid_stream_cancels_and_frees_the_sequences(live_server, chat_runtime):
    sched = chat_runtime.scheduler
    deadline = time.monotonic() + 10  # earlier tests' cancelled jobs are counted when the worker gets to them
    while sched.inflight and time.monotonic() < deadline:
        time.sleep(0.01)
    before = sched.stats["jobs_cancelled"]
    neighbour = slow_neighbour(chat_runtime)
    try:
        r = requests.post(live_server + "/v1/completions", json={"model": MODEL, "prompt": "Numbers like 1234", "max_tokens": 100,
                                                                 "temperature": 0, "n": 2, "stream": True},
                          headers={"Authorization": f"Bearer {KEY}"}, stream=True, timeout=30)
        lines = r.iter_lines()
        assert next(lines).startswith(b"data: {")
        r.close()  # hang up mid-stream
        deadline = time.monotonic() + 10
        while sched.stats["jobs_cancelled"] == before and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sched.stats["jobs_cancelled"] == before + 1
    finally:
        neighbour.cancel()
    deadline = time.monotonic() + 10
    while sched._jobs and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(sched._free_ids) == list(range(sched.n_parallel)) and sched._reserved == 0
    assert sdk(live_server).completions.create(model=MODEL, prompt="Hi", max_tokens=3).choices  # still serving


def test_context_errors_name_openai_fields(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=500, n=2)
    assert e.value.body["param"] == "max_tokens" and "max_length" not in e.value.body["message"]


def test_without_max_tokens_a_chat_gets_its_share_of_the_context(live_server, chat_runtime):
    """4 parallel sequences on 512 cells: an unlimited request may take 128 tokens, so four such
    requests run side by side instead of each reserving the whole context."""
    job_sizes = []
    real = chat_runtime.submit_tokens

    def spy(tokens, params, on_text=None):
        job_sizes.append(params.max_length)
        return real(tokens, params, on_text=on_text)

    chat_runtime.submit_tokens = spy
    try:
        r = sdk(live_server).chat.completions.create(model=MODEL, messages=HELLO, temperature=0)
    finally:
        del chat_runtime.submit_tokens
    assert job_sizes == [512 // 4] and r.usage.completion_tokens <= 128
