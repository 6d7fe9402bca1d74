"""/metrics (parsed with prometheus_client's own parser), /livez, and the access log, over a real socket."""
from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import replace

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from runtime import GenerationParams

KEY = {"Authorization": "Bearer test-key-123"}
MODEL = "llamav2-7b-chat"


@pytest.fixture()
def server(settings, chat_runtime):
    """A fresh app (fresh counters) on the shared runtime, behind our HTTP server."""
    from server.app import create_app, make_server

    def start(**changes):
        s = replace(settings, port=0, **changes)
        app = create_app(s, chat_runtime)
        srv = make_server(app, s)
        t = threading.Thread(target=srv.run, daemon=True)
        t.start()
        started.append((srv, t))
        return f"http://127.0.0.1:{srv.effective_port}"

    started = []
    yield start
    for srv, t in started:
        srv.close()
        t.join(10)


def scrape(url: str, headers=KEY) -> dict:
    """{(name, labels as a sorted tuple): value} of every sample."""
    r = requests.get(url + "/metrics", headers=headers, timeout=10)
    assert r.status_code == 200, r.text
    out = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def settle():
    time.sleep(0.3)  # the record is written when the response closes, just after the client has read it


def test_counters_match_a_known_workload_exactly(server, chat_runtime):
    url = server()
    predicts = ["Hello", "Rivers flow", "The sea"]
    want_prompt, want_gen = 0, 0
    for p in predicts:
        r = requests.post(url + "/predict", json={"prompt": p, "max_length": 6, "temperature": 0}, headers=KEY, timeout=30)
        assert r.status_code == 200
        alone = chat_runtime.generate(p, GenerationParams(max_length=6, temperature=0.0)).completions[0]
        want_prompt += alone.prompt_tokens
        want_gen += alone.generated_tokens
    assert requests.post(url + "/predict", json={"prompt": "x", "temperature": 9}, headers=KEY, timeout=10).status_code == 400
    assert requests.post(url + "/predict", json={"prompt": "x"}, timeout=10).status_code == 401
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 7, "temperature": 0}
    for _ in range(2):
        u = requests.post(url + "/v1/chat/completions", json=chat, headers=KEY, timeout=30).json()["usage"]
        want_prompt += u["prompt_tokens"]
        want_gen += u["completion_tokens"]
    lines = requests.post(url + "/v1/chat/completions", json={**chat, "stream": True, "stream_options": {"include_usage": True}},
                          headers=KEY, timeout=30).text.splitlines()
    u = json.loads([ln for ln in lines if '"usage": {' in ln][0][6:])["usage"]
    want_prompt += u["prompt_tokens"]
    want_gen += u["completion_tokens"]
    assert requests.post(url + "/v1/chat/completions", json={**chat, "model": "nope"}, headers=KEY, timeout=10).status_code == 404
    settle()
    m = scrape(url)
    assert value(m, "llamabox_requests_total", model=MODEL, endpoint="/predict", status="200") == 3
    assert value(m, "llamabox_requests_total", model=MODEL, endpoint="/predict", status="400") == 1
    assert value(m, "llamabox_requests_total", model="-", endpoint="/predict", status="401") == 1
    assert value(m, "llamabox_requests_total", model=MODEL, endpoint="/v1/chat/completions", status="200") == 3
    assert value(m, "llamabox_requests_total", model="-", endpoint="/v1/chat/completions", status="404") == 1  # never a label per unknown name
    assert sum(v for (name, _), v in m.items() if name == "llamabox_requests_total") == 9  # probes and scrapes not counted
    assert value(m, "llamabox_prompt_tokens_total", model=MODEL) == want_prompt
    assert value(m, "llamabox_generated_tokens_total", model=MODEL) == want_gen
    assert value(m, "llamabox_time_to_first_token_seconds_count", model=MODEL) == 6
    assert value(m, "llamabox_request_duration_seconds_count", model=MODEL, endpoint="/predict") == 4
    assert value(m, "llamabox_kv_cells_total", model=MODEL) == chat_runtime.info.n_ctx
    assert value(m, "llamabox_model_loads_total", model=MODEL) == 1
    for name in ("llamabox_queue_depth", "llamabox_active_sequences", "llamabox_kv_cells_used",
                 "llamabox_prefix_cache_hits_total", "llamabox_prefix_cache_reused_tokens_total", "llamabox_model_load_seconds"):
        assert any(n == name for n, _ in m), name


def test_metrics_needs_the_key_unless_public(server):
    url = server()
    assert requests.get(url + "/metrics", timeout=10).status_code == 401
    public = server(metrics_public=True)
    assert requests.get(public + "/metrics", timeout=10).status_code == 200


def test_livez_is_200_while_the_worker_lives_and_503_when_it_died(settings, gguf_files, monkeypatch):
    from runtime import load
    from server.app import create_app

    rt = load(gguf_files["q8_0"], n_ctx=256, n_threads=2, chat=False)
    try:
        client = create_app(settings, rt).test_client()
        assert client.get("/livez").status_code == 200
        monkeypatch.setattr(rt.scheduler, "_step", lambda: (_ for _ in ()).throw(RuntimeError("boom")))
        monkeypatch.setattr(rt.model, "clear_memory", lambda: (_ for _ in ()).throw(RuntimeError("and again")))
        rt.submit("Hello", GenerationParams(max_length=5))
        deadline = time.monotonic() + 10
        while rt.scheduler.dead is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert client.get("/livez").status_code == 503
        assert client.get("/health").status_code == 503
    finally:
        rt.close()


def test_access_log_has_one_json_line_per_request(server, caplog):
    url = server(log_format="json")
    with caplog.at_level(logging.INFO, logger="llamabox.access"):
        requests.post(url + "/predict", json={"prompt": "Hello", "max_length": 4, "temperature": 0}, headers=KEY, timeout=30)
        requests.post(url + "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 3, "stream": True},
                      headers=KEY, timeout=30).text
        requests.get(url + "/health", timeout=5)
        settle()
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "llamabox.access"]
    assert [(x["endpoint"], x["status"], x["stream"]) for x in lines] == [("/predict", 200, False), ("/v1/completions", 200, True)]
    for x in lines:
        assert set(x) == {"run_id", "model", "endpoint", "status", "prompt_tokens", "generated_tokens", "ttft_ms", "total_ms", "stream"}
        assert x["model"] == MODEL and x["prompt_tokens"] > 0 and x["generated_tokens"] > 0 and x["ttft_ms"] >= 0
