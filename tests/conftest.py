"""Layered fixtures: tiny HF checkpoint -> GGUF (our converter) -> runtime -> app -> client.

Everything is made here, offline, from random weights; llama.cpp is real.
"""
from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import pytest

from tinyllama import TinyConfig, make_tiny_llama

from convert.hf_to_gguf import export_gguf
from runtime.quantize import quantize

TINY = TinyConfig()


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory) -> tuple[Path, dict]:
    """(folder, weights as stored) of an F32 single-file tiny Llama."""
    folder = tmp_path_factory.mktemp("tiny-hf")
    return folder, make_tiny_llama(folder, TINY, "F32")


@pytest.fixture(scope="session")
def gguf_files(tiny_hf, tmp_path_factory) -> dict[str, Path]:
    """The tiny model as f32, f16, q8_0 and q4_k_m GGUF."""
    folder, _ = tiny_hf
    out = tmp_path_factory.mktemp("gguf")
    files = {t: out / f"tiny.{t}.gguf" for t in ("f32", "f16")}
    for t, p in files.items():
        export_gguf(folder, p, t)
    for q in ("q8_0", "q4_k_m"):
        files[q] = out / f"tiny.{q}.gguf"
        quantize(files["f16"], files[q], q, 2)
    return files


@pytest.fixture(scope="session")
def runtime(gguf_files):
    """A base-model runtime on the F16 file (chat=False: the GGUF has Llama 2's template, as Meta's base repo
    ships one); shared by tests, so its worker sees concurrent use too."""
    from runtime import load

    rt = load(gguf_files["f16"], n_ctx=512, n_threads=2, model_id="llamav2-7b", chat=False, n_parallel=4, queue_size=16)
    yield rt
    rt.close()


@pytest.fixture(scope="session")
def chat_runtime(gguf_files):
    from runtime import load

    rt = load(gguf_files["f16"], n_ctx=512, n_threads=2, model_id="llamav2-7b-chat", n_parallel=4)
    yield rt
    rt.close()


@pytest.fixture()
def runtimes(gguf_files):
    """Runtimes of a test's own, closed after it: runtimes(quant, **load_kwargs)."""
    from runtime import load

    made = []

    def make(quant: str, **kw):
        rt = load(gguf_files[quant], **{"n_ctx": 512, "n_threads": 2, **kw})
        made.append(rt)
        return rt

    yield make
    for rt in made:
        rt.close()


@pytest.fixture()
def settings():
    from server.settings import Settings

    return Settings(api_keys=("test-key-123",), max_body_bytes=64 * 1024, request_timeout_s=60)


@pytest.fixture()
def app(settings, chat_runtime):
    from server.app import create_app

    return create_app(settings, chat_runtime)


@pytest.fixture()
def client(app):
    return app.test_client()


@pytest.fixture()
def live_server(app):
    """The app behind waitress on a loopback port; yields the base URL."""
    from server.app import make_server

    server = make_server(app, replace(app.extensions["llamabox"].settings, port=0))  # what `llamabox serve` runs
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.effective_port}"
    server.close()
    t.join(5)
