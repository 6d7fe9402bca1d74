"""Issue 9, HTTP side: hostile clients over real sockets, bodies that used to give 500s,
waitress's own errors in the envelope, the edges of the contract, `serve` on a bad model."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace

import pytest
import requests

from test_server import AUTH, assert_envelope, post

ENVELOPE = {"run_id", "run_time_ms", "message", "result"}


# --- finding 3: bodies that gave 500s ----------------------------------------------------

def test_json_nested_1000_deep_is_a_400(client):
    body = '{"prompt": "a", "stop": ' + "[" * 1000 + "]" * 1000 + "}"
    msg = assert_envelope(post(client, body), 400)["message"]
    assert msg.startswith("body") and "nested" in msg


def test_json_nested_40_deep_is_a_400_too(client):
    body = '{"prompt": "a", "stop": ' + "[" * 40 + "]" * 40 + "}"
    assert "nested" in assert_envelope(post(client, body), 400)["message"]


@pytest.mark.parametrize("field", ["max_length", "temperature", "seed", "top_k"])
def test_a_5000_digit_integer_is_a_400_naming_the_field(client, field):
    body = '{"prompt": "a", "%s": %s}' % (field, "7" * 5000)
    msg = assert_envelope(post(client, body), 400)["message"]
    assert msg.startswith(field) and "5000 digits" in msg


def test_a_5000_digit_integer_as_the_prompt_is_a_400(client):
    assert assert_envelope(post(client, '{"prompt": %s}' % ("9" * 5000)), 400)["message"].startswith("prompt")


# --- finding 8: the edges of the contract ----------------------------------------------

def test_models_needs_the_key(client):
    assert_envelope(client.get("/models"), 401)
    r = client.get("/models", headers=AUTH)
    assert r.status_code == 200 and r.get_json()["data"][0]["id"] == "llamav2-7b-chat"


def test_health_says_status_only(client):
    r = client.get("/health")
    assert r.status_code == 200 and r.get_json() == {"status": "ok"}


def test_health_with_the_key_names_the_cpu_kernels(client):
    import runtime

    r = client.get("/health", headers=AUTH)
    cpu = runtime.cpu_backend()
    assert r.status_code == 200
    assert r.get_json()["cpu_backend"] == {"variant": cpu.variant, "features": list(cpu.features)}


def raw(url: str, data: bytes, timeout: float = 10) -> tuple[int, dict, bytes]:
    """Send bytes as they are; return (status, headers, body) of the answer."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(data)
        buf = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
            head, sep, body = buf.partition(b"\r\n\r\n")
            if sep:
                headers = dict(ln.split(": ", 1) for ln in head.decode("latin-1").split("\r\n")[1:])
                n = int(headers.get("Content-Length", -1))
                if n >= 0 and len(body) >= n:
                    break
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v for k, v in (ln.split(": ", 1) for ln in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def _req(headers: str, body: bytes = b"") -> bytes:
    return b"POST /predict HTTP/1.1\r\nHost: x\r\nAuthorization: test-key-123\r\n" + headers.encode() + b"\r\n" + body


@pytest.mark.parametrize("name,data,status", [
    ("headers too large", _req("X-Big: " + "a" * 300_000 + "\r\n"), 431),
    ("bad chunk size", _req("Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n", b"zz\r\n{}\r\n0\r\n\r\n"), 400),
    ("duplicate Content-Length", _req("Content-Type: application/json\r\nContent-Length: 2\r\nContent-Length: 3\r\n", b"{}"), 400),
    ("over waitress's body cap", _req("Content-Type: application/json\r\nContent-Length: %d\r\n" % (64 << 20)), 413),
])
def test_errors_waitress_answers_itself_are_in_the_envelope(live_server, name, data, status):
    got, headers, body = raw(live_server, data)
    assert got == status, (name, body)
    assert headers["content-type"] == "application/json"
    env = json.loads(body)
    assert set(env) == ENVELOPE and env["result"] == [] and env["message"]


def test_a_half_closed_request_is_a_hang_up(live_server, app):
    """Decision (README, "Hang-ups"): a client that shuts its sending side is treated as gone,
    as nginx does (its 499): no answer is written, and the generation is cancelled at once (or
    never started, when waitress saw the end of input before a thread picked the request up)."""
    from runtime import GenerationParams

    rt = app.extensions["llamabox"].runtime
    sched = rt.scheduler
    # A neighbour whose text callback takes 10 ms makes every step take that long, so the request
    # below (120 steps, never EOS for this prompt) would run over a second if nobody cancelled it.
    slow = rt.submit("Numbers like 1234", GenerationParams(max_length=400, temperature=0.0),
                     on_text=lambda _i, _t: time.sleep(0.01))
    before = dict(sched.stats)
    body = json.dumps({"prompt": "Numbers like 1234", "max_length": 120, "num_return_sequences": 2, "temperature": 0}).encode()
    host, port = live_server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(_req(f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n", body))
        s.shutdown(socket.SHUT_WR)
        assert s.recv(65536) == b""  # closed without an answer
    deadline = time.monotonic() + 5
    while sched.stats["jobs_cancelled"] == before["jobs_cancelled"] and time.monotonic() < deadline:
        time.sleep(0.01)
    slow.cancel()
    submitted = sched.stats["jobs_submitted"] - before["jobs_submitted"]
    cancelled = sched.stats["jobs_cancelled"] - before["jobs_cancelled"]
    assert (submitted, cancelled) in ((1, 1), (0, 0)), (submitted, cancelled)
    assert requests.get(live_server + "/health", timeout=5).status_code == 200


# --- finding 2: connection exhaustion ----------------------------------------------------

def _raise_fd_limit(need: int) -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.skip(f"needs {need} open files; the hard limit is {hard}")
    if soft != resource.RLIM_INFINITY and soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


@pytest.fixture()
def hostile_server(app, settings):
    """The app behind our HTTP server with short timeouts, so the test sees them act."""
    from server.app import make_server

    s = replace(settings, port=0, read_timeout_s=4.0, idle_timeout_s=4.0)
    server = make_server(app, s)
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.effective_port}", server
    server.close()
    t.join(10)


def test_idle_and_slowloris_connections_do_not_block_a_real_client(hostile_server):
    url, server = hostile_server
    _raise_fd_limit(2000)
    port = int(url.rsplit(":", 1)[1])
    idle, slow = [], []
    stop = threading.Event()
    try:
        for _ in range(300):
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        for _ in range(300):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")
            slow.append(s)

        def drip():  # one more header line every 2 s on every slowloris connection, bounded
            for n in range(5):
                if stop.wait(2):
                    return
                for s in slow:
                    try:
                        s.sendall(b"X-Drip-%d: a\r\n" % n)
                    except OSError:
                        pass

        dripper = threading.Thread(target=drip, daemon=True)
        dripper.start()
        t0 = time.monotonic()
        r = requests.post(url + "/predict", json={"prompt": "Hi", "max_length": 5}, headers=AUTH, timeout=5)
        assert r.status_code == 200 and r.json()["message"] == "Ran successfully"
        assert time.monotonic() - t0 < 5
        # The deadline (4 s here) then drops every slowloris and idle connection, dripping or not.
        deadline = time.monotonic() + 12
        while server.open_connections > 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert server.open_connections == 0
        slow[0].settimeout(5)
        assert slow[0].recv(10) == b""
    finally:
        stop.set()
        for s in idle + slow:
            s.close()


def test_a_slow_request_is_dropped_at_the_read_deadline(hostile_server):
    import select

    url, server = hostile_server
    port = int(url.rsplit(":", 1)[1])
    closed_after = None
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")
        t0 = time.monotonic()
        for n in range(30):  # a header line every 0.4 s: never idle, never complete
            time.sleep(0.4)
            if select.select([s], [], [], 0)[0]:
                assert s.recv(100) == b""  # closed, without an answer
                closed_after = time.monotonic() - t0
                break
            s.sendall(b"X-Drip-%d: a\r\n" % n)
    # The 4 s deadline, give or take the second the loop takes to notice.
    assert closed_after is not None and 3.5 < closed_after < 7, closed_after


# --- finding 7: `serve` always says why a model failed to load ---------------------------

def _bad_ggufs(tmp_path, good: bytes) -> dict[str, bytes]:
    import struct

    return {
        "empty": b"",
        "magic only": b"GGUF",
        "bad version": b"GGUF" + struct.pack("<I", 99) + b"\0" * 16,
        "huge tensor count": b"GGUF" + struct.pack("<IQQ", 3, 1 << 62, 0),
        "huge kv count": b"GGUF" + struct.pack("<IQQ", 3, 0, 1 << 62),
        "truncated 100": good[:100],
        "truncated half": good[: len(good) // 2],
        "truncated minus 1": good[:-1],
        "garbage after header": good[:24] + b"\xff" * 200,
    }


def test_serve_prints_why_a_malformed_model_failed(tmp_path, gguf_files):
    """All at once, as the review ran them: under that load the old loader thread's
    interrupt_main() raced the main thread, and 8 of 12 printed "interrupted" with rc 130."""
    env = {**os.environ, "LLAMABOX_HOME": str(tmp_path / "home")}
    env.pop("LLAMABOX_API_KEY", None)
    good = gguf_files["q8_0"].read_bytes()
    procs = {}
    for name, data in _bad_ggufs(tmp_path, good).items():
        p = tmp_path / f"bad-{name.replace(' ', '-')}.gguf"
        p.write_bytes(data)
        procs[name] = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--model", str(p), "--port", "0"],
                                       stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 1, (name, proc.returncode, err)
        last = err.strip().splitlines()[-1]
        assert last.startswith("llamabox: error: could not load") and "interrupted" not in last, (name, err)


@pytest.mark.parametrize("data", [b"GARBAGE\r\n\r\n", b"POST /predict HTTP/1.1\r\nBad Header\r\n\r\n",
                                  b"GET /v1/\xff\xfe HTTP/1.1\r\n\r\n"])
def test_an_unparseable_request_line_gets_a_400_and_the_connection_closes(live_server, data):
    """Before: waitress's error task read a path the parser never set, failed, and left the
    connection open with no answer, holding a connection slot for good."""
    host, port = live_server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(data)
        buf = b""
        while chunk := s.recv(65536):  # the server closes after answering: recv ends
            buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    assert head.split(b" ")[1] == b"400", buf[:200]
    assert set(json.loads(body)) == ENVELOPE
