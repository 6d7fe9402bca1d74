"""`llamabox pull` end to end: fake Hub on loopback -> download -> convert -> quantize -> store -> generate."""
from __future__ import annotations

import pytest
from huggingface_hub.utils import close_session

from fakehub import FakeHub, isolate_hf

from convert.pull import pull
from convert.store import Store
from runtime.errors import GatedRepoError


@pytest.fixture
def hub(tmp_path, monkeypatch, tiny_hf):
    folder, _ = tiny_hf
    files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    files["README.md"] = b"# a tiny llama"
    with FakeHub() as server:
        isolate_hf(monkeypatch, server.url, tmp_path / "hf-home")
        server.add_repo("meta-llama/Llama-2-7b-chat-hf", files, gated=True, allowed_token="hf_good")
        try:
            yield server
        finally:
            close_session()


def test_pull_llamav2_7b_chat_into_the_store(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_good")
    store = Store(tmp_path / "home", builtin_dir=tmp_path / "none")
    reports = pull("llamav2-7b-chat", quants="q8_0,q4_k_m", store=store)
    assert [r.quant for r in reports] == ["q8_0", "q4_k_m"]
    m = store.manifest("llamav2-7b-chat")
    assert m["source"]["repo"] == "meta-llama/Llama-2-7b-chat-hf" and len(m["source"]["revision"]) == 40
    assert store.verify("llamav2-7b-chat") == []
    assert not (store.home / "downloads").exists() or not any((store.home / "downloads").iterdir())

    from runtime import GenerationParams, load

    rt = load(store.resolve("llamav2-7b-chat").path, n_ctx=256, n_threads=2, model_id="llamav2-7b-chat")
    try:
        assert rt.chat and rt.info.model_id == "llamav2-7b-chat"
        assert rt.generate("Hi", GenerationParams(max_length=4, temperature=0)).completions[0].generated_tokens >= 1
    finally:
        rt.close()


def test_pull_without_access_says_accept_the_licence(hub, tmp_path):
    store = Store(tmp_path / "home", builtin_dir=tmp_path / "none")
    with pytest.raises(GatedRepoError, match="licen[cs]e"):
        pull("llamav2-7b-chat", store=store)
    assert store.list() == []
