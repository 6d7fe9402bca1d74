"""`llamabox serve` and signals: SIGTERM drains (streams finish, new connections are refused,
exit 0), the drain timeout cancels what is left, a second signal exits at once.

A real process on a loopback port, with a tiny Llama made big enough (~15 ms a step)
that three streams are still running when the signal arrives."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import requests

from tinyllama import TinyConfig, make_tiny_llama

SLOW = TinyConfig(n_embd=768, n_ff=2048, n_layer=8, n_head=12, n_head_kv=4)
PROMPT = "Numbers like 1234"  # greedy on this model runs to max_tokens without EOS


@pytest.fixture(scope="module")
def slow_gguf(tmp_path_factory):
    from convert.hf_to_gguf import export_gguf

    folder = tmp_path_factory.mktemp("slow-hf")
    make_tiny_llama(folder, SLOW, "F32")
    out = folder / "slow.gguf"
    export_gguf(folder, out, "f16")
    return out


class Server:
    def __init__(self, gguf, tmp_path, *flags):
        env = {**os.environ, "LLAMABOX_HOME": str(tmp_path / "home"), "PYTHONUNBUFFERED": "1"}
        env.pop("LLAMABOX_API_KEY", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--model", str(gguf), "--port", "0",
                                      "--ctx", "2048", "--threads", "2", "--gpu-layers", "0", *flags],  # slow on purpose: never offloaded
                                     stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=env)
        self.log: list[str] = []
        port = None
        while port is None:
            line = self.proc.stderr.readline()
            assert line, "the server exited before it listened:\n" + "".join(self.log)
            self.log.append(line)
            m = re.search(r"POST http://127\.0\.0\.1:(\d+)/predict", line)
            port = int(m.group(1)) if m else None
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        threading.Thread(target=lambda: self.log.extend(self.proc.stderr), daemon=True).start()
        deadline = time.monotonic() + 60
        while requests.get(self.url + "/health", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, "".join(self.log)
            time.sleep(0.1)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def stream(url: str, max_tokens: int, out: list, started: threading.Event):
    """One streaming completion; appends each SSE data/event line to out."""
    body = {"model": "slow", "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    with requests.post(url + "/v1/completions", json=body, stream=True, timeout=120) as r:
        out.append(r.status_code)
        for line in r.iter_lines():
            if line:
                out.append(line.decode())
                if sum(1 for x in out if isinstance(x, str) and '"text": "' in x) >= 2:
                    started.set()


def long_stream(url: str, out: list, started: threading.Event):
    """A stream that cannot end early: a JSON schema whose string needs 250 characters keeps EOS
    out of the grammar for a few hundred tokens (several seconds on this model)."""
    schema = {"type": "object", "properties": {"s": {"type": "string", "minLength": 250}}, "required": ["s"]}
    body = {"model": "slow", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1500, "stream": True,
            "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}}
    try:
        with requests.post(url + "/v1/chat/completions", json=body, stream=True, timeout=120) as r:
            out.append(r.status_code)
            for line in r.iter_lines():
                if line:
                    out.append(line.decode())
                    if len(out) > 4:
                        started.set()
    except requests.RequestException:  # the server exited mid-stream (the second-signal test)
        out.append("cut")


def test_sigterm_lets_streams_finish_refuses_new_connections_and_exits_0(slow_gguf, tmp_path):
    srv = Server(slow_gguf, tmp_path, "--drain-timeout", "30")
    try:
        outs = [[] for _ in range(3)]
        started = [threading.Event() for _ in range(3)]
        threads = [threading.Thread(target=stream, args=(srv.url, 150, outs[i], started[i])) for i in range(3)]
        [t.start() for t in threads]
        assert all(e.wait(30) for e in started)
        t0 = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        at_signal = [len(out) for out in outs]
        time.sleep(0.5)
        with pytest.raises(ConnectionRefusedError):  # the listening socket is closed at once
            socket.create_connection(("127.0.0.1", srv.port), timeout=5).close()
        [t.join(60) for t in threads]
        for out, n in zip(outs, at_signal):
            assert out[0] == 200 and out[-1] == "data: [DONE]", out[-3:]
            assert any('"finish_reason": "' in x for x in out[1:])  # ran to its end
            assert len(out) > n + 2  # and went on streaming after the signal
            assert not any(x.startswith("event: error") for x in out[1:])
        assert srv.proc.wait(30) == 0
        assert time.monotonic() - t0 < 30
        assert any("drained" in ln for ln in srv.log), "".join(srv.log)
    finally:
        srv.kill()


def test_the_drain_timeout_cancels_what_is_left_with_a_clean_error(slow_gguf, tmp_path):
    srv = Server(slow_gguf, tmp_path, "--drain-timeout", "1")
    try:
        out, started = [], threading.Event()
        t = threading.Thread(target=long_stream, args=(srv.url, out, started))
        t.start()
        assert started.wait(30)
        t0 = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        t.join(30)
        assert out[-2].startswith("event: error") and "shut" in out[-1]  # a final error event, then the end
        assert srv.proc.wait(30) == 0
        assert time.monotonic() - t0 < 10
    finally:
        srv.kill()


def test_a_second_signal_exits_at_once(slow_gguf, tmp_path):
    srv = Server(slow_gguf, tmp_path, "--drain-timeout", "60")
    try:
        out, started = [], threading.Event()
        t = threading.Thread(target=long_stream, args=(srv.url, out, started), daemon=True)
        t.start()
        assert started.wait(30)
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        t0 = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(10) == 128 + signal.SIGTERM
        assert time.monotonic() - t0 < 5
    finally:
        srv.kill()
