"""The built-in demo model: intact, writes corpus words, and `llamabox serve` serves it out of the box."""
from __future__ import annotations

import json
import os
import re
import signal
import string
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from convert.store import Store

ROOT = Path(__file__).resolve().parent.parent
DEMO = "llamabox-tiny"


@pytest.fixture(scope="module")
def demo():
    return Store(Path("/nonexistent-llamabox-home")).resolve(DEMO)


def corpus_words(text: str) -> list[str]:
    """vocab.txt's rule (scripts/train_tiny_llama.py): lowercase, split on whitespace, strip punctuation."""
    return [w for w in (w.strip(string.punctuation) for w in text.lower().split()) if w]


def test_shipped_model_matches_its_manifest(demo):
    assert demo.builtin and demo.path.is_file()
    assert Store(Path("/nonexistent-llamabox-home")).verify(DEMO) == []
    assert demo.size < 20 * 2**20


def test_greedy_output_is_made_of_corpus_words(demo):
    from runtime import GenerationParams, load

    vocab = set((demo.path.parent / "vocab.txt").read_text(encoding="utf-8").split())
    rt = load(demo.path, n_ctx=512, n_threads=2, model_id=DEMO, chat=demo.chat)  # the manifest says base
    try:
        words = []
        for prompt in ("Once upon a time", "The best thing about", "A man walked into", "Life is",
                       "A wise man", "Love is", "The world", "If you want to"):
            text = rt.generate(prompt, GenerationParams(max_length=60, temperature=0.0)).completions[0].text
            words += corpus_words(text)
    finally:
        rt.close()
    known = sum(w in vocab for w in words) / len(words)
    print(f"{len(words)} words, {known:.0%} in the training vocabulary")
    assert len(words) >= 40
    assert known >= 0.8


def readme_curl_body() -> dict:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    m = re.search(r"--data-raw '(\{.*?\})'", readme, re.S)
    assert m, "README has no curl example"
    return json.loads(m.group(1))  # the README's curl must be valid JSON as pasted


def test_serve_without_model_serves_the_demo_over_http(tmp_path):
    env = {**os.environ, "LLAMABOX_HOME": str(tmp_path)}
    env.pop("LLAMABOX_API_KEY", None)
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--port", "0", "--threads", "2"],
                            stderr=subprocess.PIPE, text=True, env=env)
    lines: list[str] = []  # stderr, read on a thread: the loader's "ready" line may come before or after the rest
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True)
    reader.start()

    def seen(*parts: str) -> str:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all(x in "".join(lines) for x in parts):
            time.sleep(0.05)
        return "".join(lines)

    try:
        m = re.search(r"POST (http://127\.0\.0\.1:\d+)/predict", seen("/predict"))
        assert m, "".join(lines)
        url = m.group(1)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and requests.get(url + "/health", timeout=5).status_code != 200:
            time.sleep(0.2)
        text = seen("demo model", "llamabox pull llamav2-7b-chat", "loopback only")
        assert "demo model" in text and "llamabox pull llamav2-7b-chat" in text and "loopback only" in text
        r = requests.post(url + f"/{DEMO}-webhook/predict", json=readme_curl_body(), timeout=60)
        body = r.json()
        assert r.status_code == 200 and body["message"] == "Ran successfully"
        assert set(body) == {"run_id", "run_time_ms", "message", "result"}
        assert body["result"][0]["generated_text"].startswith(readme_curl_body()["prompt"])
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
