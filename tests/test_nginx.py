"""deploy/nginx.conf in front of three real `llamabox serve` replicas, all on loopback.

The file is rendered for the test's ports (replica lines, listen address, pid/log/temp paths in a
temporary folder) and run by a real nginx in the foreground. Then:
  * a rolling restart under load: every replica in turn gets SIGTERM, exits, and comes back on
    its port, while six clients send predict and streaming /v1 requests: no request may fail;
  * kill -9 of one replica under load: only requests that were in flight on it may fail.
Counts are printed (pytest -s shows them; -rA too).

Skipped, with the reason, where nginx is not installed (.ci/run installs it as root)."""
from __future__ import annotations

import http.client
import json
import os
import pwd
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tinyllama import TinyConfig, make_tiny_llama

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "deploy" / "nginx.conf"
NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None)
pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx is not installed: `.ci/run` installs it as root "
                                                      "(apt-get install nginx); without it these tests cannot run")

# Big enough (about 10 ms a token on one thread) that requests last 0.1-2 s, so a signal finds
# some in flight; small enough to load in a second (tests/test_graceful.py uses the same shape).
MODEL = TinyConfig(n_embd=768, n_ff=2048, n_layer=8, n_head=12, n_head_kv=4)
KEY = "nginx-test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
N_REPLICAS = 3
CLIENTS = 6
DRAIN_S = 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def render_nginx_conf(text: str, replicas: list[str], listen: int, prefix: Path, upstream_header: bool = True) -> str:
    """deploy/nginx.conf for these replica addresses, listening on 127.0.0.1:listen, with every
    path it writes inside prefix. Each edit must apply exactly once: a template that changed shape
    fails here rather than rendering something else."""
    server_line = re.search(r"# BEGIN replicas[^\n]*\n\s*server\s+\S+(?P<params>[^;]*);", text)
    assert server_line, "no `server` line after `# BEGIN replicas`"
    servers = "".join(f"        server {a}{server_line['params']};\n" for a in replicas)
    temp = "".join(f"    {d}_temp_path {prefix}/{d};\n" for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    try:  # as root, workers run as the template's user (Debian's www-data); else nginx ignores `user`
        user = "user www-data;\n" if os.geteuid() == 0 and pwd.getpwnam("www-data") else ""
    except KeyError:
        user = ""
    edits = [
        (r"(?m)^user\s[^;]*;\n", user),
        (r"(?m)^pid\s[^;]*;", f"pid {prefix}/nginx.pid;"),
        (r"(?m)^error_log\s[^;]*;", f"error_log {prefix}/error.log info;"),
        (r"access_log\s+\S+\s+llamabox;", f"access_log {prefix}/access.log llamabox;"),
        (r"(?m)^http \{\n", "http {\n" + temp),
        (r"(?s)# BEGIN replicas[^\n]*\n.*?(?=\s*# END replicas)", "# BEGIN replicas\n" + servers.rstrip("\n")),
        (r"listen\s+80;", f"listen 127.0.0.1:{listen};"
                          + ("\n        add_header X-Upstream $upstream_addr always;" if upstream_header else "")),
    ]
    for pattern, repl in edits:
        text, n = re.subn(pattern, lambda _m: repl, text)
        assert n == 1, f"{pattern!r} matched {n} times in deploy/nginx.conf"
    return text


def early_error_log(prefix: Path) -> list[str]:
    """-e (nginx >= 1.19.5): the error log before the configuration is read, inside prefix too."""
    v = subprocess.run([NGINX, "-v"], capture_output=True, text=True, timeout=10).stderr
    m = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", v)
    return ["-e", str(prefix / "error.log")] if m and tuple(map(int, m.groups())) >= (1, 19, 5) else []


class Nginx:
    def __init__(self, replicas: list[str]):
        self.prefix = Path(tempfile.mkdtemp(prefix="llamabox-nginx-"))
        self.prefix.chmod(0o755)  # workers (www-data) reach their temp folders
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.conf = self.prefix / "nginx.conf"
        self.conf.write_text(render_nginx_conf(CONF.read_text(), replicas, self.port, self.prefix))
        base = [NGINX, "-p", f"{self.prefix}/", "-c", str(self.conf), *early_error_log(self.prefix)]
        check = subprocess.run([*base, "-t"], capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stderr
        self.proc = subprocess.Popen([*base, "-g", "daemon off;"], stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                assert self.proc.poll() is None, self.error_log()
                assert time.monotonic() < deadline, self.error_log()
                time.sleep(0.05)

    def error_log(self) -> str:
        p = self.prefix / "error.log"
        return p.read_text() if p.exists() else ""

    def access_log(self) -> list[str]:
        p = self.prefix / "access.log"
        return p.read_text().splitlines() if p.exists() else []

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful: let the workers finish
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.prefix, ignore_errors=True)


class Replica:
    """One `llamabox serve` on a fixed loopback port, restartable on the same port."""

    def __init__(self, gguf: Path, home: Path, port: int):
        self.gguf, self.home, self.port = gguf, home, port
        self.addr = f"127.0.0.1:{port}"
        self.url = f"http://{self.addr}"
        self.proc: subprocess.Popen | None = None
        self.log: list[str] = []
        self._reader: threading.Thread | None = None

    def start(self):
        env = {**os.environ, "LLAMABOX_HOME": str(self.home), "LLAMABOX_API_KEY": KEY, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve", "--model", str(self.gguf), "--port", str(self.port),
             "--ctx", "1024", "--threads", "1", "--drain-timeout", str(DRAIN_S)],
            cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        proc = self.proc
        self._reader = threading.Thread(target=lambda: self.log.extend(proc.stderr), daemon=True)
        self._reader.start()

    def wait_exit(self, timeout: float) -> int:
        rc = self.proc.wait(timeout)
        self._reader.join(5)  # the whole log, up to its last line
        return rc

    def wait_ready(self, timeout: float = 60):
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, f"replica {self.addr} exited:\n" + "".join(self.log[-30:])
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, f"replica {self.addr} not ready:\n" + "".join(self.log[-30:])
            time.sleep(0.1)

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture(scope="module")
def gguf(tmp_path_factory) -> Path:
    from convert.hf_to_gguf import export_gguf

    folder = tmp_path_factory.mktemp("nginx-hf")
    make_tiny_llama(folder, MODEL, "F32")
    out = folder / "tiny.gguf"
    export_gguf(folder, out, "f16")
    return out


@pytest.fixture(scope="module")
def cluster(gguf, tmp_path_factory):
    home = tmp_path_factory.mktemp("nginx-home")
    replicas = [Replica(gguf, home, free_port()) for _ in range(N_REPLICAS)]
    nginx = None
    try:
        for r in replicas:
            r.start()
        for r in replicas:
            r.wait_ready()
        nginx = Nginx([r.addr for r in replicas])
        model = requests.get(nginx.url + "/v1/models", headers=AUTH, timeout=10).json()["data"][0]["id"]
        yield nginx, replicas, model
    finally:
        if nginx is not None:
            nginx.stop()
        for r in replicas:
            r.stop()


# --- the load --------------------------------------------------------------------------------------

@dataclass
class Outcome:
    kind: str
    t0: float
    t1: float
    upstream: str    # X-Upstream: every replica nginx tried, in order ("" if no answer came)
    ok: bool
    why: str = ""

    @property
    def served_by(self) -> str:
        return self.upstream.rsplit(", ", 1)[-1]


PROMPTS = ["Once upon a time", "The quick brown fox", "Llamas live in", "Numbers like 1234", "Rivers flow to"]


class Streaming:
    """The replica each stream in progress is on (known once its headers arrived)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._on: dict[int, str] = {}

    def begin(self, upstream: str) -> int:
        with self._lock:
            key = max(self._on, default=0) + 1
            self._on[key] = upstream.rsplit(", ", 1)[-1]
            return key

    def end(self, key: int) -> None:
        with self._lock:
            self._on.pop(key, None)

    def busiest(self) -> tuple[str, int]:
        with self._lock:
            counts: dict[str, int] = {}
            for addr in self._on.values():
                counts[addr] = counts.get(addr, 0) + 1
        return max(counts.items(), key=lambda kv: kv[1], default=("", 0))


def one_request(session: requests.Session, base: str, model: str, kind: str, rng: random.Random,
                streaming: Streaming) -> Outcome:
    prompt = rng.choice(PROMPTS)
    t0 = time.monotonic()
    upstream = ""
    try:
        if kind == "predict":
            body = {"prompt": prompt, "max_length": rng.randint(8, 40), "temperature": 0.8, "seed": rng.randint(0, 10**6)}
            r = session.post(base + "/predict", json=body, headers=AUTH, timeout=60)
            upstream = r.headers.get("X-Upstream", "")
            if r.status_code != 200:
                return Outcome(kind, t0, time.monotonic(), upstream, False, f"{r.status_code} {r.text[:200]}")
            env = r.json()
            good = (set(env) == {"run_id", "run_time_ms", "message", "result"} and env["message"] == "Ran successfully"
                    and len(env["result"]) == 1 and env["result"][0]["generated_text"].startswith(prompt))
            return Outcome(kind, t0, time.monotonic(), upstream, good, "" if good else f"bad envelope {env}")
        path = "/v1/completions" if kind == "stream" else "/v1/chat/completions"
        body = {"model": model, "max_tokens": rng.randint(16, 64), "temperature": 0.8, "stream": True}
        body.update({"prompt": prompt} if kind == "stream" else {"messages": [{"role": "user", "content": prompt}]})
        with session.post(base + path, json=body, headers=AUTH, stream=True, timeout=60) as r:
            upstream = r.headers.get("X-Upstream", "")
            if r.status_code != 200 or not r.headers.get("Content-Type", "").startswith("text/event-stream"):
                return Outcome(kind, t0, time.monotonic(), upstream, False, f"{r.status_code} {r.text[:200]}")
            key = streaming.begin(upstream)
            try:
                lines = [ln.decode() for ln in r.iter_lines() if ln]
            finally:
                streaming.end(key)
        finished = False
        for ln in lines[:-1]:
            assert ln.startswith("data: {"), ln  # no `event: error`, nothing but chunks
            finished |= json.loads(ln[6:])["choices"][0]["finish_reason"] is not None
        good = bool(lines) and lines[-1] == "data: [DONE]" and finished
        return Outcome(kind, t0, time.monotonic(), upstream, good, "" if good else f"incomplete stream: {lines[-2:]}")
    except (requests.RequestException, AssertionError, ValueError, KeyError) as e:
        return Outcome(kind, t0, time.monotonic(), upstream, False, f"{type(e).__name__}: {e}")


def run_load(base: str, model: str, seconds: float, outcomes: list[Outcome], stop: threading.Event,
             streaming: Streaming) -> list[threading.Thread]:
    """CLIENTS threads, each sending requests one after another (a third each of predict, /v1
    completion streams and /v1 chat streams) for `seconds` or until stop is set."""
    end = time.monotonic() + seconds

    def client(i: int):
        rng = random.Random(i)
        with requests.Session() as s:
            while time.monotonic() < end and not stop.is_set():
                o = one_request(s, base, model, ("predict", "stream", "chat")[rng.randrange(3)], rng, streaming)
                outcomes.append(o)
                if not o.ok:
                    time.sleep(0.2)  # a failing request is quick: do not let a broken setup flood the counts

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(CLIENTS)]
    [t.start() for t in threads]
    return threads


def in_flight(outcomes: list[Outcome], addr: str, t: float) -> int:
    """Requests that a replica was serving at time t (per X-Upstream, its last address)."""
    return sum(1 for o in outcomes if o.t0 < t < o.t1 and o.served_by == addr)


def retries(nginx: Nginx, since: int) -> dict[str, int]:
    """From the access log (its lines from `since` on): requests that nginx sent to more than one
    replica, by what the first answered (502: the connection failed; 503: the replica's 503)."""
    out: dict[str, int] = {}
    for line in nginx.access_log()[since:]:
        m = re.search(r'ustatus="([^"]*)"', line)
        if m and "," in m.group(1):
            first = m.group(1).split(",")[0].strip()
            out[first] = out.get(first, 0) + 1
    return out


def replica_errors(replicas: list[Replica]) -> str:
    """What the replicas logged at ERROR (tracebacks included), for a failure's message."""
    out = []
    for r in replicas:
        text = "".join(r.log)
        for m in re.finditer(r"(?m)^.* (ERROR|CRITICAL) .*\n(?:(?!\d{4}-\d\d-\d\d ).*\n)*", text):
            out.append(f"[{r.addr}] {m.group(0)}")
    return "".join(out)[-6000:]


def summary(outcomes: list[Outcome]) -> str:
    kinds = {k: sum(1 for o in outcomes if o.kind == k) for k in ("predict", "stream", "chat")}
    return f"{len(outcomes)} requests ({kinds['predict']} predict, {kinds['stream']} completion streams, " \
           f"{kinds['chat']} chat streams), {sum(not o.ok for o in outcomes)} failed"


# --- checks ------------------------------------------------------------------------------------------

def test_the_rendered_template_passes_nginx_t(tmp_path):
    """The template's own syntax, with nothing but the paths and ports changed."""
    tmp_path.chmod(0o755)
    conf = tmp_path / "nginx.conf"
    conf.write_text(render_nginx_conf(CONF.read_text(), ["127.0.0.1:1", "127.0.0.1:2"], free_port(), tmp_path,
                                      upstream_header=False))
    r = subprocess.run([NGINX, "-t", "-p", f"{tmp_path}/", "-c", str(conf), *early_error_log(tmp_path)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr


def test_requests_and_keys_pass_through_and_errors_are_json(cluster):
    nginx, replicas, model = cluster
    body = {"prompt": "Once upon a time", "max_length": 8}
    assert requests.post(nginx.url + "/predict", json=body, timeout=30).status_code == 401  # the replicas check the key
    r = requests.post(nginx.url + "/predict", json=body, headers=AUTH, timeout=30)
    assert r.status_code == 200 and r.json()["message"] == "Ran successfully"
    assert r.headers["X-Upstream"] in {x.addr for x in replicas}
    # The body limit matches llamabox's (1 MiB): exactly 1 MiB reaches a replica, one byte more is
    # nginx's 413, in the route's JSON envelope.
    raw = json.dumps(body).encode()
    exact = raw[:-1] + b" " * ((1 << 20) - len(raw)) + b"}"
    assert len(exact) == 1 << 20
    headers = {**AUTH, "Content-Type": "application/json"}
    r = requests.post(nginx.url + "/predict", data=exact, headers=headers, timeout=30)
    assert r.status_code == 200, r.text[:300]
    r = requests.post(nginx.url + "/predict", data=exact + b" ", headers=headers, timeout=30)
    assert r.status_code == 413 and "1048576" in r.json()["message"] and r.json()["result"] == []
    r = requests.post(nginx.url + "/v1/completions", data=exact + b" ", headers=headers, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"


def test_streams_come_through_event_by_event(cluster):
    """The first events arrive long before the stream ends: nothing in between buffers it."""
    nginx, _, model = cluster
    # A JSON schema whose string needs 250 characters keeps EOS away for a few hundred tokens.
    schema = {"type": "object", "properties": {"s": {"type": "string", "minLength": 250}}, "required": ["s"]}
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 800, "stream": True,
            "temperature": 0,
            "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}}
    t0 = time.monotonic()
    times = []
    with requests.post(nginx.url + "/v1/chat/completions", json=body, headers=AUTH, stream=True, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines(chunk_size=1):  # each event as the socket delivers it
            if line:
                times.append(time.monotonic() - t0)
    assert len(times) > 100
    print(f"\nstream through nginx: {len(times)} events, event 10 at {times[9]:.3f}s, last at {times[-1]:.3f}s")
    assert times[9] < 0.5 * times[-1], (times[9], times[-1])


def test_a_draining_replica_answers_503_on_a_kept_alive_connection(gguf, tmp_path):
    """What the retries rest on: a request that reaches a draining replica on a connection opened
    before the drain is refused with 503 (nginx tries the next replica), and that connection is
    closed after it, while the streams in flight go on to their end."""
    rep = Replica(gguf, tmp_path, free_port())
    rep.start()
    try:
        rep.wait_ready()
        conn = http.client.HTTPConnection("127.0.0.1", rep.port, timeout=30)
        conn.request("GET", "/v1/models", headers=AUTH)
        first = conn.getresponse()
        assert first.status == 200 and first.getheader("Connection", "").lower() != "close"
        model = json.loads(first.read())["data"][0]["id"]
        # A stream that lasts a couple of seconds keeps the drain going.
        schema = {"type": "object", "properties": {"s": {"type": "string", "minLength": 60}}, "required": ["s"]}
        body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 400, "stream": True,
                "temperature": 0, "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}}
        with requests.post(rep.url + "/v1/chat/completions", json=body, headers=AUTH, stream=True, timeout=60) as s:
            lines = s.iter_lines()
            assert next(lines)  # the stream has started
            rep.proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            conn.request("POST", "/predict", body=json.dumps({"prompt": "Hi", "max_length": 4}),
                         headers={**AUTH, "Content-Type": "application/json"})
            r = conn.getresponse()
            answer = r.read()
            assert r.status == 503, (r.status, answer[:300], replica_errors([rep]))
            assert r.getheader("Retry-After") == "1" and r.getheader("Connection", "").lower() == "close"
            assert "shutting down" in json.loads(answer)["message"]
            rest = [ln.decode() for ln in lines if ln]
        assert rest[-1] == "data: [DONE]"
        assert rep.wait_exit(DRAIN_S + 10) == 0
    finally:
        rep.stop()


def test_rolling_restart_under_load_fails_no_request(cluster):
    nginx, replicas, model = cluster
    outcomes: list[Outcome] = []
    stop = threading.Event()
    t_start, log_from = time.monotonic(), len(nginx.access_log())
    threads = run_load(nginx.url, model, 30, outcomes, stop, Streaming())
    signals = []  # (replica, time of SIGTERM, seconds to exit, seconds until ready again)
    try:
        time.sleep(3)
        for rep in replicas:
            t, seen = time.monotonic(), len(rep.log)
            rep.proc.send_signal(signal.SIGTERM)
            rc = rep.wait_exit(DRAIN_S + 15)
            exited = time.monotonic() - t
            assert rc == 0, "".join(rep.log[-30:])
            assert any("drained" in ln for ln in rep.log[seen:]), "".join(rep.log[-30:])  # nothing was cut off
            rep.start()
            rep.wait_ready()
            signals.append((rep, t, exited, time.monotonic() - t))
            time.sleep(1)
    finally:
        [th.join(90) for th in threads]
        stop.set()
    took = time.monotonic() - t_start
    failed = [o for o in outcomes if not o.ok]
    print(f"\nrolling restart: {summary(outcomes)} in {took:.1f}s; retried by nginx (first answer: count): "
          f"{retries(nginx, log_from)}")
    for rep, t, exited, back in signals:
        print(f"  SIGTERM {rep.addr}: {in_flight(outcomes, rep.addr, t)} requests in flight on it, "
              f"exited after {exited:.2f}s, ready again after {back:.2f}s")
    assert len(signals) == N_REPLICAS
    assert len(outcomes) > 50
    assert not failed, [(o.kind, o.upstream, o.why) for o in failed[:10]] + [replica_errors(replicas)]


def test_kill_9_fails_only_what_was_in_flight_on_that_replica(cluster):
    nginx, replicas, model = cluster
    outcomes: list[Outcome] = []
    stop = threading.Event()
    t_start, log_from = time.monotonic(), len(nginx.access_log())
    streaming = Streaming()
    threads = run_load(nginx.url, model, 15, outcomes, stop, streaming)
    try:
        time.sleep(4)
        deadline = time.monotonic() + 3  # the replica with the most streams running (at least one, if any comes)
        while streaming.busiest()[1] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        addr = streaming.busiest()[0] or replicas[0].addr
        victim = next(r for r in replicas if r.addr == addr)
        t_kill = time.monotonic()
        victim.proc.kill()
        victim.wait_exit(10)
    finally:
        [th.join(90) for th in threads]
        stop.set()
    took = time.monotonic() - t_start
    failed = [o for o in outcomes if not o.ok]
    bound = in_flight(outcomes, victim.addr, t_kill)
    print(f"\nkill -9: {summary(outcomes)} in {took:.1f}s; {bound} requests were in flight on the killed replica "
          f"({sum(1 for o in outcomes if o.t0 < t_kill < o.t1)} in flight in all); retried by nginx: {retries(nginx, log_from)}")
    for o in failed:
        print(f"  failed: {o.kind} via {o.upstream or '?'}: {o.why[:120]}")
    try:
        assert len(outcomes) > 20
        assert len(failed) <= bound
        for o in failed:  # each one was running on the killed replica when it died
            assert o.t0 < t_kill and o.served_by == victim.addr, (o.kind, o.upstream, o.why)
        after = [o for o in outcomes if o.t0 > t_kill]
        assert after and all(o.ok for o in after)
    finally:
        victim.start()  # leave the cluster whole
        victim.wait_ready()
