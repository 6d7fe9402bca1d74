"""A bounded fuzz of every endpoint that takes a body: no input may give a 5xx, and every
answer is the endpoint's envelope. LLAMABOX_FUZZ_EXAMPLES raises the example count
(the closing note of issue 9 records a larger run)."""
from __future__ import annotations

import json
import os

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

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


@pytest.fixture(scope="module")
def fuzz_client(gguf_files):
    """A small context, so that valid requests the fuzz finds generate quickly."""
    from runtime import load
    from server.app import create_app
    from server.settings import Settings

    rt = load(gguf_files["q8_0"], n_ctx=128, n_threads=2, model_id="llamav2-7b-chat", n_parallel=4)
    yield create_app(Settings(api_keys=("test-key-123",), max_body_bytes=64 * 1024, request_timeout_s=60), rt).test_client()
    rt.close()


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
