"""Several models in one server (issue 11): swaps within a memory budget under load, failure
isolation, unloads that really free memory, keep-alive, and refusals at start."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import requests

from runtime import GenerationParams, load
from server.pool import Entry, ModelPool, ModelUnavailable, estimate_cost, gpu_fit, offloadable_layers, rss_bytes

KEY = {"Authorization": "test-key-123"}
GREEDY = {"prompt": "Numbers like 1234", "max_length": 12, "temperature": 0}


def loader(n_ctx=256, use_mmap=False):
    # On the CPU whatever the build: these tests are about host memory (RSS).
    def load_entry(e: Entry):
        return load(e.path, n_ctx=n_ctx, n_threads=2, model_id=e.model_id, chat=False, use_mmap=use_mmap, n_gpu_layers=0)
    return load_entry


def entry(model_id: str, path: Path, pinned=False, n_ctx=256) -> Entry:
    return Entry(model_id, Path(path), chat=False, file_bytes=Path(path).stat().st_size, estimate_bytes=estimate_cost(Path(path), n_ctx),
                 pinned=pinned)


@pytest.fixture()
def serve_pool(settings):
    from server.app import create_app, make_server

    made = []

    def start(pool: ModelPool):
        s = replace(settings, port=0)
        srv = make_server(create_app(s, pool=pool), s)
        t = threading.Thread(target=srv.run, daemon=True)
        t.start()
        made.append((srv, t, pool))
        return f"http://127.0.0.1:{srv.effective_port}"

    yield start
    for srv, t, pool in made:
        srv.close()
        t.join(10)
        pool.close()


def alone(path, prompt=GREEDY["prompt"]) -> str:
    rt = load(path, n_ctx=256, n_threads=2, chat=False, n_gpu_layers=0)
    try:
        return prompt + rt.generate(prompt, GenerationParams(max_length=12, temperature=0.0)).completions[0].text
    finally:
        rt.close()


def test_swapping_under_a_budget_for_one_model(serve_pool, big_gguf, big6_gguf):
    """Two ~100 MB models, each fits the budget alone, never both (estimated or measured)."""
    a, b = entry("a", big_gguf, pinned=True), entry("b", big6_gguf)
    budget = int(max(a.estimate_bytes, b.estimate_bytes) * 1.05)
    pool = ModelPool([a, b], loader(), budget)
    url = serve_pool(pool)
    want = {"a": alone(big_gguf), "b": alone(big6_gguf)}
    assert want["a"] != want["b"]  # different models, different answers: a mix-up would show
    for m in ["a", "b", "a", "b", "b", "a"]:  # alternating: every change of model is an unload and a load
        r = requests.post(f"{url}/{m}-webhook/predict", json=GREEDY, headers=KEY, timeout=60)
        assert r.status_code == 200 and r.json()["result"][0]["generated_text"] == want[m], (m, r.text)
        assert sum(e.state == "loaded" for e in pool.entries.values()) == 1
    # Concurrent requests to both during swaps: all succeed (a load waits for the other model to go idle).
    results, lock = [], threading.Lock()

    def client(i):
        m = "ab"[i % 2]
        for _ in range(3):
            r = requests.post(f"{url}/{m}-webhook/predict", json=GREEDY, headers=KEY, timeout=120)
            with lock:
                results.append((m, r.status_code, r.json()["result"]))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    [t.start() for t in threads]
    [t.join(180) for t in threads]
    assert len(results) == 18
    for m, status, result in results:
        assert status == 200 and result[0]["generated_text"] == want[m]
    for m in ("b", "a"):  # /v1 picks the model by its `model` field
        r = requests.post(url + "/v1/completions", json={"model": m, "prompt": GREEDY["prompt"], "max_tokens": 12, "temperature": 0},
                          headers=KEY, timeout=60)
        assert GREEDY["prompt"] + r.json()["choices"][0]["text"] == want[m]
    v1 = requests.get(url + "/v1/models", headers=KEY, timeout=10).json()["data"]
    assert [d["id"] for d in v1] == ["a", "b"] and all(d["object"] == "model" for d in v1)
    listed = {d["id"]: d for d in requests.get(url + "/models", headers=KEY, timeout=10).json()["data"]}
    assert set(listed) == {"a", "b"} and {d["state"] for d in listed.values()} <= {"loaded", "unloaded"}
    loaded = [d for d in listed.values() if d["state"] == "loaded"]
    assert len(loaded) == 1 and loaded[0]["memory_bytes"] > 0 and loaded[0]["file_bytes"] > 0
    assert loaded[0]["placement"] == "CPU" and loaded[0]["gpu_layers"] == 0  # this loader keeps models on the CPU


def test_a_corrupt_model_fails_alone(serve_pool, gguf_files, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(gguf_files["q8_0"].read_bytes()[: 4096])  # a GGUF cut short
    pool = ModelPool([entry("good", gguf_files["q8_0"], pinned=True), entry("bad", bad)], loader(), 1 << 40)
    url = serve_pool(pool)
    r = requests.post(url + "/bad-webhook/predict", json=GREEDY, headers=KEY, timeout=60)
    assert r.status_code == 503 and "failed to load" in r.json()["message"] and r.headers["Retry-After"]
    assert requests.post(url + "/good-webhook/predict", json=GREEDY, headers=KEY, timeout=60).status_code == 200
    assert requests.post(url + "/predict", json=GREEDY, headers=KEY, timeout=60).status_code == 200  # the default
    listed = {d["id"]: d for d in requests.get(url + "/models", headers=KEY, timeout=10).json()["data"]}
    assert listed["bad"]["state"] == "failed" and "bad.gguf" in listed["bad"]["error"]
    assert requests.get(url + "/health", timeout=10).status_code == 200  # the default model is fine


def test_no_room_is_a_503_saying_what_is_loaded(big_gguf, big6_gguf):
    a, b = entry("a", big_gguf, pinned=True), entry("b", big6_gguf)
    pool = ModelPool([a, b], loader(), int(max(a.estimate_bytes, b.estimate_bytes) * 1.05), room_wait_s=0.5)
    try:
        pool.acquire("a")  # a lease held: a is busy and cannot be unloaded
        with pytest.raises(ModelUnavailable) as e:
            pool.acquire("b")
        assert "no memory to load b" in str(e.value) and "a (loaded, busy" in str(e.value)
        pool.release("a")
        rt = pool.acquire("b")  # now a is idle: it goes, b comes
        assert rt.info.model_id == "b" and pool.entries["a"].state == "unloaded"
        pool.release("b")
    finally:
        pool.close()


class StandInGpu:
    """A GPU whose free memory is what the loaded models' estimates leave of its capacity. The pool's
    logic is what is tested; the models themselves are real and load on the CPU."""

    def __init__(self, capacity: int):
        self.capacity, self.pool = capacity, None

    def __call__(self):
        used = sum(x.estimate_bytes for x in self.pool.entries.values() if x.state == "loaded")
        return self.capacity - used, self.capacity


def test_idle_models_make_room_on_the_gpu_and_busy_ones_do_not_block_a_load(gguf_files):
    a, b = entry("a", gguf_files["f16"]), entry("b", gguf_files["q8_0"])
    big, small = max(a.estimate_bytes, b.estimate_bytes), min(a.estimate_bytes, b.estimate_bytes)
    gpu = StandInGpu(int(1.1 * big + 0.5 * small))  # either fits whole; both never do
    gpu.pool = pool = ModelPool([a, b], loader(), 1 << 40, room_wait_s=0.5, gpu_memory=gpu)
    try:
        pool.release(pool.acquire("a").info.model_id)
        rt = pool.acquire("b")  # a is idle: unloaded so that b fits whole, though host memory has room
        assert rt.info.model_id == "b" and pool.entries["a"].state == "unloaded"
        # b is busy: a loads beside it at once (offloading what fits), no wait and no 503 for the GPU
        t0 = time.monotonic()
        assert pool.acquire("a").info.model_id == "a" and time.monotonic() - t0 < 0.5
        assert pool.entries["b"].state == "loaded"
        pool.release("a")
        pool.release("b")
    finally:
        pool.close()


def test_no_model_is_unloaded_for_one_that_could_never_fit_the_gpu_whole(gguf_files):
    a, b = entry("a", gguf_files["q8_0"]), entry("b", gguf_files["f16"])
    gpu = StandInGpu(int(1.05 * b.estimate_bytes))  # b + 10% is more than the whole GPU
    gpu.pool = pool = ModelPool([a, b], loader(), 1 << 40, gpu_memory=gpu)
    try:
        pool.release(pool.acquire("a").info.model_id)
        pool.release(pool.acquire("b").info.model_id)
        assert pool.entries["a"].state == "loaded"  # unloading a could not have made b fit whole
    finally:
        pool.close()


def test_host_memory_counts_only_the_layers_the_gpu_will_not_take(gguf_files):
    e = entry("a", gguf_files["f16"])
    budget = e.estimate_bytes // 2  # the whole model would not fit in host memory
    no_gpu = ModelPool([e], loader(), budget, room_wait_s=0.1)
    try:
        with pytest.raises(ModelUnavailable, match="no memory to load a"):
            no_gpu.acquire("a")
    finally:
        no_gpu.close()
    e = entry("a", gguf_files["f16"])
    gpu = StandInGpu(4 * e.estimate_bytes)
    gpu.pool = pool = ModelPool([e], loader(), budget, room_wait_s=0.1, gpu_memory=gpu)
    try:
        assert pool._host_cost(e) == e.estimate_bytes // e.layers()  # all layers offloaded: the embeddings stay
        pool.release(pool.acquire("a").info.model_id)
    finally:
        pool.close()


def test_gpu_fit_offloads_every_layer_when_it_fits_else_an_even_share():
    assert gpu_fit(1000, 10, 1100) == 10
    assert gpu_fit(1000, 10, 1099) == 9   # 110 per layer with the 10% headroom
    assert gpu_fit(1000, 10, 550) == 5
    assert gpu_fit(1000, 10, 100) == 0
    assert gpu_fit(1000, 0, 10**9) == 0   # an unreadable header: nothing known to offload


def test_auto_offloads_every_layer_if_they_fit_else_what_fits_and_says_so(gguf_files, monkeypatch, caplog):
    import logging

    from server import cli
    from server.settings import Settings

    path, settings = gguf_files["q8_0"], Settings(n_ctx=256)
    n, need = offloadable_layers(path), estimate_cost(path, 256) * 1.1
    monkeypatch.setattr(cli, "_gpu_memory", lambda: (int(need) + 1, 10 * int(need)))
    assert cli._fit_gpu_layers(path, "m", settings) == -1  # all of them
    monkeypatch.setattr(cli, "_gpu_memory", lambda: (int(2 * need / n) + 1, 10 * int(need)))
    with caplog.at_level(logging.WARNING, logger="llamabox"):
        assert cli._fit_gpu_layers(path, "m", settings) == 2
    assert f"offloading 2 of its {n} layers" in caplog.text
    monkeypatch.setattr(cli, "_gpu_memory", lambda: None)  # no GPU: the runtime runs on the CPU
    assert cli._fit_gpu_layers(path, "m", settings) is None


def test_offloadable_layers_are_the_blocks_and_the_output_layer(gguf_files, tmp_path):
    from tinyllama import TinyConfig

    assert offloadable_layers(gguf_files["q8_0"]) == TinyConfig().n_layer + 1
    (tmp_path / "bad.gguf").write_bytes(b"GGUF\x03\x00")
    assert offloadable_layers(tmp_path / "bad.gguf") == 0


def test_keep_alive_unloads_idle_models_but_not_pinned_ones(gguf_files):
    pool = ModelPool([entry("a", gguf_files["f16"], pinned=True), entry("b", gguf_files["q8_0"])], loader(), 1 << 40,
                     keep_alive_s=0.5)
    try:
        for m in ("a", "b"):
            pool.release(pool.acquire(m).info.model_id)
        deadline = time.monotonic() + 10
        while pool.entries["b"].state == "loaded" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert pool.entries["b"].state == "unloaded" and pool.entries["a"].state == "loaded"
        assert pool.alive
    finally:
        pool.close()


def _big(tmp_path_factory, n_layer: int) -> Path:
    from tinyllama import TinyConfig, make_tiny_llama

    from convert.hf_to_gguf import export_gguf

    folder = tmp_path_factory.mktemp(f"big{n_layer}-hf")
    make_tiny_llama(folder, TinyConfig(n_embd=768, n_ff=2048, n_layer=n_layer, n_head=12, n_head_kv=4), "F32")
    out = folder / f"big{n_layer}.gguf"
    export_gguf(folder, out, "f16")
    return out


@pytest.fixture(scope="module")
def big_gguf(tmp_path_factory):
    """~100 MB of F16 weights: large enough that RSS noise does not matter."""
    return _big(tmp_path_factory, 8)


@pytest.fixture(scope="module")
def big6_gguf(tmp_path_factory):
    return _big(tmp_path_factory, 6)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux's /proc/self/status")
@pytest.mark.parametrize("use_mmap", [False, True])
def test_unloading_really_frees_memory(big_gguf, use_mmap):
    pool = ModelPool([entry("big", big_gguf)], loader(use_mmap=use_mmap), 1 << 40)
    try:
        before = rss_bytes()
        rt = pool.acquire("big")
        rt.generate("Hello", GenerationParams(max_length=4, temperature=0.0))  # touch the weights
        loaded = rss_bytes()
        cost = pool.entries["big"].measured_bytes
        assert cost > 0.8 * big_gguf.stat().st_size  # the weights are in memory, read or mapped
        pool.release("big")
        with pool._lock:
            pool._unload(pool.entries["big"], "test")
        after = rss_bytes()
        assert loaded - after >= 0.8 * cost, (before, loaded, after, cost)
    finally:
        pool.close()


def serve_cmd(tmp_path, *args, timeout=60):
    env = {**os.environ, "LLAMABOX_HOME": str(tmp_path / "home")}
    env.pop("LLAMABOX_API_KEY", None)
    return subprocess.run([sys.executable, "-m", "server.cli", "serve", "--port", "0", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_a_missing_model_is_refused_at_start_in_one_line(tmp_path, gguf_files):
    p = serve_cmd(tmp_path, "--model", gguf_files["q8_0"], "--model", tmp_path / "missing.gguf")
    assert p.returncode == 1 and p.stderr.strip().splitlines() == [f"llamabox: error: no model file at {tmp_path / 'missing.gguf'}"]
    p = serve_cmd(tmp_path, "--model", gguf_files["q8_0"], "--model", "nosuchid")
    assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1 and "nosuchid" in p.stderr


def test_the_same_model_twice_is_refused(tmp_path, gguf_files):
    p = serve_cmd(tmp_path, "--model", gguf_files["q8_0"], "--model", gguf_files["q8_0"])
    assert p.returncode == 2 and "serve each once" in p.stderr
