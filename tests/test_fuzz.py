"""A bounded fuzz of every endpoint that takes a body: no input may give a 5xx, and every
answer is the endpoint's envelope. LLAMABOX_FUZZ_EXAMPLES raises the example count
(the closing note of issue 9 records a larger run)."""
from __future__ import annotations

import json
import os

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from server.v1_schema import CHAT_FIELDS, COMPLETION_FIELDS, UNSUPPORTED_CHAT
from server.validation import FIELDS

EXAMPLES = int(os.environ.get("LLAMABOX_FUZZ_EXAMPLES", "60"))
AUTH = {"Authorization": "Bearer test-key-123"}
PATHS = ["/predict", "/llamav2-7b-chat-webhook/predict"]
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                              HealthCheck.too_slow])

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(10**30), max_value=10**30), st.floats(allow_nan=False),
    st.text(max_size=40), st.sampled_from(["", "0", "1e999", "-1", "NaN", "100", "2.0", "\u0661", "\ud800"]),
)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=12)
# Bodies that are mostly right: known fields (and a stray one) with values of any type.
near_valid = st.fixed_dictionaries({"prompt": st.text(min_size=0, max_size=60)},
                                   optional={f: json_values for f in FIELDS if f != "prompt"} | {"max_tokens": json_values})


V1_PATHS = ["/v1/chat/completions", "/v1/completions"]
message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "developer", "tool", 3]),
                                 "content": st.one_of(st.text(max_size=40), json_values)},
                                optional={"name": json_values})
near_valid_chat = st.fixed_dictionaries(
    {"model": st.sampled_from(["llamav2-7b-chat", "gpt-4o"]), "messages": st.lists(message, max_size=3) | json_values},
    optional={f: json_values for f in CHAT_FIELDS if f not in ("model", "messages")} | {k: json_values for k in list(UNSUPPORTED_CHAT)[:4]}
    | {"response_format": st.sampled_from([{"type": "json_object"}, {"type": "text"}, {"type": "json_schema"},
                                           {"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}])},
)
near_valid_completion = st.fixed_dictionaries(
    {"model": st.just("llamav2-7b-chat"), "prompt": st.text(max_size=40) | json_values},
    optional={f: json_values for f in COMPLETION_FIELDS if f not in ("model", "prompt")} | {"echo": json_values},
)


@pytest.fixture(scope="module")
def fuzz_client(gguf_files):
    """A small context, so that valid requests the fuzz finds generate quickly."""
    from runtime import load
    from server.app import create_app
    from server.settings import Settings

    rt = load(gguf_files["q8_0"], n_ctx=128, n_threads=2, model_id="llamav2-7b-chat", n_parallel=4)
    yield create_app(Settings(api_keys=("test-key-123",), max_body_bytes=64 * 1024, request_timeout_s=60), rt).test_client()
    rt.close()


def check_v1(resp):
    assert resp.status_code < 500, resp.get_data(as_text=True)
    if resp.status_code != 200:
        err = resp.get_json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
    elif resp.mimetype == "text/event-stream":
        assert resp.get_data(as_text=True).rstrip().endswith("data: [DONE]")
    else:
        assert resp.get_json()["choices"]


def check(resp):
    assert resp.status_code < 500, resp.get_data(as_text=True)
    body = resp.get_json()
    assert set(body) == {"run_id", "run_time_ms", "message", "result"}
    assert (resp.status_code == 200) == (body["message"] == "Ran successfully")


@FUZZ
@given(path=st.sampled_from(PATHS), body=near_valid)
def test_fuzz_near_valid_bodies(fuzz_client, path, body):
    check(fuzz_client.post(path, data=json.dumps(body), headers={**AUTH, "Content-Type": "application/json"}))


@FUZZ
@given(path=st.sampled_from(PATHS), body=json_values)
def test_fuzz_any_json(fuzz_client, path, body):
    check(fuzz_client.post(path, data=json.dumps(body), headers={**AUTH, "Content-Type": "application/json"}))


@FUZZ
@given(path=st.sampled_from(PATHS), body=st.binary(max_size=200) | st.text(max_size=200).map(str.encode),
       content_type=st.sampled_from(["application/json", "application/json; charset=latin-1", "text/plain", ""]))
def test_fuzz_raw_bytes(fuzz_client, path, body, content_type):
    check(fuzz_client.post(path, data=body, headers={**AUTH, "Content-Type": content_type}))


@FUZZ
@given(body=near_valid_chat)
def test_fuzz_v1_chat(fuzz_client, body):
    check_v1(fuzz_client.post("/v1/chat/completions", data=json.dumps(body), headers={**AUTH, "Content-Type": "application/json"}))


@FUZZ
@given(body=near_valid_completion)
def test_fuzz_v1_completions(fuzz_client, body):
    check_v1(fuzz_client.post("/v1/completions", data=json.dumps(body), headers={**AUTH, "Content-Type": "application/json"}))


@FUZZ
@given(path=st.sampled_from(V1_PATHS), body=st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
def test_fuzz_v1_any_body(fuzz_client, path, body):
    check_v1(fuzz_client.post(path, data=body, headers={**AUTH, "Content-Type": "application/json"}))
