"""The predict contract over HTTP: the envelope, every error class, auth, concurrency, a real socket."""
from __future__ import annotations

import json
import threading
import time
import uuid

import pytest
import requests

AUTH = {"Authorization": "test-key-123"}

# The seed document's example, with the commas it is missing put back.
SEED_EXAMPLE = {
    "prompt": "Hey! How are you doing?",
    "max_length": 100,
    "temperature": 0.9,
    "top_p": 1.0,
    "top_k": 10,
    "num_return_sequences": 1,
    "repetition_penalty": 2.0,
}
# ...and as a user pastes it from the page: no commas after three values.
SEED_AS_PASTED = """{
        "prompt": "Hey! How are you doing?",
        "max_length": 100,
        "temperature": 0.9
        "top_p": 1.0
        "top_k": 10
        "num_return_sequences": 1
        "repetition_penalty": 2.0
    }"""


def post(client, body, path="/predict", headers=AUTH, **kw):
    return client.post(path, data=body if isinstance(body, (str, bytes)) else json.dumps(body),
                       headers={"Content-Type": "application/json", **headers}, **kw)


def assert_envelope(resp, status):
    assert resp.status_code == status, resp.get_data(as_text=True)
    body = resp.get_json()
    assert set(body) == {"run_id", "run_time_ms", "message", "result"}
    uuid.UUID(body["run_id"], version=4)
    assert isinstance(body["run_time_ms"], float) and body["run_time_ms"] >= 0
    return body


def test_seed_example_gets_exactly_the_envelope(client):
    body = assert_envelope(post(client, SEED_EXAMPLE), 200)
    assert body["message"] == "Ran successfully"
    assert len(body["result"]) == 1
    assert set(body["result"][0]) == {"generated_text"}
    assert body["result"][0]["generated_text"].startswith(SEED_EXAMPLE["prompt"])


def test_webhook_route_mirrors_the_hosted_url(client):
    body = assert_envelope(post(client, SEED_EXAMPLE, path="/llamav2-7b-chat-webhook/predict"), 200)
    assert body["message"] == "Ran successfully"


def test_three_return_sequences(client):
    body = assert_envelope(post(client, {**SEED_EXAMPLE, "num_return_sequences": 3, "max_length": 20}), 200)
    assert len(body["result"]) == 3


def test_seed_reproduces_and_temperature_zero_is_stable(client):
    req = {"prompt": "Hello", "max_length": 20, "num_return_sequences": 2, "seed": 42}
    a, b = (post(client, req).get_json()["result"] for _ in range(2))
    assert a == b
    greedy = {"prompt": "Hello", "max_length": 20, "temperature": 0}
    first = post(client, greedy).get_json()["result"]
    assert all(post(client, greedy).get_json()["result"] == first for _ in range(3))


def test_number_strings_are_accepted_when_exact(client):
    body = assert_envelope(post(client, {"prompt": "Hi", "max_length": "5", "repetition_penalty": "1.5", "seed": 1}), 200)
    assert body["message"] == "Ran successfully"


@pytest.mark.parametrize("field,value", [
    ("max_length", "5.5"), ("max_length", "ten"), ("max_length", 0), ("max_length", 10**6), ("max_length", True),
    ("temperature", -0.1), ("temperature", "hot"), ("top_p", 1.5), ("top_k", -1), ("num_return_sequences", 0),
    ("num_return_sequences", 99), ("repetition_penalty", 0.5), ("seed", -1), ("stop", 5), ("prompt", 7), ("prompt", ""),
])
def test_bad_values_name_the_field(client, field, value):
    body = assert_envelope(post(client, {"prompt": "Hi", **{field: value}}), 400)
    assert body["message"].startswith(field)
    assert body["result"] == []


def test_seed_example_as_pasted_says_where_the_json_breaks(client):
    body = assert_envelope(post(client, SEED_AS_PASTED), 400)
    assert "line 5, column 9" in body["message"] and "delimiter" in body["message"]


def test_missing_prompt(client):
    assert "prompt" in assert_envelope(post(client, {"max_length": 5}), 400)["message"]


def test_unknown_field(client):
    assert assert_envelope(post(client, {"prompt": "Hi", "max_tokens": 5}), 400)["message"].startswith("max_tokens")


def test_duplicate_key_is_rejected(client):
    assert "twice" in assert_envelope(post(client, '{"prompt": "a", "prompt": "b"}'), 400)["message"]


def test_prompt_plus_max_length_over_context(client):
    msg = assert_envelope(post(client, {"prompt": "Hi", "max_length": 500, "num_return_sequences": 3}), 400)["message"]
    assert msg.startswith("max_length") and "context" in msg


def test_system_prompt_goes_to_chat_model(client):
    assert_envelope(post(client, {"prompt": "Hi", "system_prompt": "Be brief.", "max_length": 5}), 200)


@pytest.mark.parametrize("headers", [{}, {"Authorization": "wrong-key-0000"}, {"Authorization": "Bearer wrong-key-0000"}])
def test_missing_or_wrong_key_is_401(client, headers):
    assert_envelope(post(client, SEED_EXAMPLE, headers=headers), 401)


def test_bearer_key_is_accepted(client):
    assert_envelope(post(client, {"prompt": "Hi", "max_length": 3}, headers={"Authorization": "Bearer test-key-123"}), 200)


def test_unknown_model_is_404(client):
    msg = assert_envelope(post(client, SEED_EXAMPLE, path="/llamav2-70b-webhook/predict"), 404)["message"]
    assert "llamav2-70b" in msg


def test_unknown_route_is_404_envelope(client):
    assert_envelope(client.get("/nope"), 404)


def test_wrong_method_is_405(client):
    resp = client.get("/predict", headers=AUTH)
    assert_envelope(resp, 405)
    assert "POST" in resp.headers["Allow"]


def test_body_too_large_is_413(client):
    assert_envelope(post(client, {"prompt": "x" * 100_000}), 413)


def test_not_json_is_415(client):
    resp = client.post("/predict", data="prompt=hi", headers={**AUTH, "Content-Type": "application/x-www-form-urlencoded"})
    assert_envelope(resp, 415)


def test_queue_full_is_503_with_retry_after(chat_runtime, settings):
    """A runtime with a one-slot queue and one sequence: the third concurrent request finds it full."""
    from runtime import load
    from server.app import create_app

    rt = load(chat_runtime.model.path, n_ctx=512, n_threads=2, model_id="llamav2-7b-chat", n_parallel=1, n_cache=0, queue_size=1)
    try:
        client = create_app(settings, rt).test_client()
        statuses, lock = [], threading.Lock()

        def run():
            r = post(client, {"prompt": "Hi", "max_length": 400, "temperature": 0})
            with lock:
                statuses.append((r.status_code, r.headers.get("Retry-After")))

        threads = [threading.Thread(target=run) for _ in range(6)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert any(s == 503 and ra for s, ra in statuses), statuses
        assert any(s == 200 for s, _ in statuses)
    finally:
        rt.close()


def test_internal_error_is_500_without_stack_trace(client, app, monkeypatch, caplog):
    rt = app.extensions["llamabox"].runtime

    def boom(*a, **k):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(rt, "submit", boom)
    body = assert_envelope(post(client, SEED_EXAMPLE), 500)
    assert "secret" not in body["message"] and body["run_id"] in body["message"]
    assert any(body["run_id"] in r.getMessage() for r in caplog.records)


def test_health_is_503_until_a_model_is_set(settings, chat_runtime):
    from server.app import create_app, set_runtime

    app = create_app(settings, None)
    c = app.test_client()
    assert c.get("/health").status_code == 503
    assert_envelope(post(c, SEED_EXAMPLE), 503)
    set_runtime(app, chat_runtime)
    assert c.get("/health").status_code == 200
    assert c.get("/models", headers=AUTH).get_json()["data"][0]["id"] == "llamav2-7b-chat"


def test_eight_threads_over_a_real_socket(live_server):
    """8 clients at once through waitress on loopback: every answer is right, the server lives on."""
    greedy = {"prompt": "Hello there", "max_length": 16, "temperature": 0}
    expected = requests.post(live_server + "/predict", json=greedy, headers=AUTH, timeout=60).json()["result"]
    results, lock = [], threading.Lock()

    def run(i):
        req = greedy if i % 2 == 0 else {**SEED_EXAMPLE, "max_length": 16, "num_return_sequences": 2, "seed": i}
        r = requests.post(live_server + "/llamav2-7b-chat-webhook/predict", json=req, headers=AUTH, timeout=120)
        with lock:
            results.append((i, r.status_code, r.json()))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(results) == 8
    for i, status, body in results:
        assert status == 200 and body["message"] == "Ran successfully"
        if i % 2 == 0:
            assert body["result"] == expected
        else:
            assert len(body["result"]) == 2
            assert all(r["generated_text"].startswith(SEED_EXAMPLE["prompt"]) for r in body["result"])
    assert requests.get(live_server + "/health", timeout=10).status_code == 200


def test_malformed_json_over_a_real_socket(live_server):
    r = requests.post(live_server + "/predict", data=SEED_AS_PASTED, headers={**AUTH, "Content-Type": "application/json"}, timeout=10)
    assert r.status_code == 400 and "line 5, column 9" in r.json()["message"]


def test_client_that_hangs_up_cancels_its_generation(client, app):
    """waitress reports a closed connection through environ; the job is cancelled, not run to the end."""
    sched = app.extensions["llamabox"].runtime.scheduler
    before = sched.stats["jobs_cancelled"]
    resp = post(client, {"prompt": "Hi", "max_length": 100, "num_return_sequences": 4},
                environ_overrides={"waitress.client_disconnected": lambda: True})
    assert_envelope(resp, 499)
    deadline = time.monotonic() + 10
    while sched.stats["jobs_cancelled"] == before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sched.stats["jobs_cancelled"] == before + 1


@pytest.mark.parametrize("body,field", [
    ('{"prompt": "a", "temperature": 1' + "0" * 400 + "}", "temperature"),
    ('{"prompt": "\\ud800"}', "prompt"),
    ('{"prompt": "a", "max_length": "\u0661\u0660\u0660"}', "max_length"),
])
def test_odd_but_valid_json_is_a_400_not_a_500(client, body, field):
    assert assert_envelope(post(client, body.encode()), 400)["message"].startswith(field)


def test_body_too_large_over_a_real_socket_is_the_envelope(live_server):
    r = requests.post(live_server + "/predict", data=json.dumps({"prompt": "x" * 100_000}),
                      headers={**AUTH, "Content-Type": "application/json"}, timeout=10)
    assert r.status_code == 413
    assert set(r.json()) == {"run_id", "run_time_ms", "message", "result"}
