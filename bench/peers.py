"""llamabox against llama.cpp's own llama-server: same llama.cpp commit, GGUF, threads, context.

    python bench/peers.py --model bench/scratch/SmolLM2-135M-Instruct.Q4_1.gguf --quick
    make bench-quick        # SmolLM2-135M (real) and a 1.1B synthetic (TinyLlama's shapes)
    make bench              # and the 7B synthetic

llama-server is built from the pinned llama-cpp-python's own sdist (bench/llama_server_build.py),
so both servers run the same llama.cpp. Both get the same GGUF read into memory (no mmap), the
same threads, one unified KV cache of --ctx cells shared by --parallel sequences, and flash
attention on llama.cpp's default (auto); both are driven through the same OpenAI
/v1/completions requests with greedy sampling.

A round restarts both servers (order rotated), then measures, each arm in rotated order:
  fresh:  right after the start, nothing long in either server's cache (fresh_<measure>)
    gen1      1 client, N_GEN tokens from a short prompt                      tok/s
    clientsK  K = 1, 2, 4, 8 clients at once, each its own short prompts       total tok/s
    n4        one request for n=4 completions (llama-server: n_cmpl)           wall s
    pp        a 499-token prompt that shares only BOS with anything cached    prompt tok/s
              (last of the fresh ones: it leaves a long prompt cached)
  steady: after two 499-token prompts have been served (they sit in the prompt caches)
    gen1, clients1/2/4/8, pp, n4 as above, then
    prefix    a request whose 500-token prefix is cached, 1 token out         wall s
    prefix3   3 clients sharing one cached 500-token prefix                   total tok/s
  load      process start until /health answers 200, alone (no other server running), the
            median of --load-starts starts per round (arms alternating)                   s
  load_floor, load_bare  (information, not targets) the same for no server at all: a Python
            process that imports llamabox's `runtime` (load_floor), or llama_cpp alone
            (load_bare), loads the model and a context as `serve` does, and says so. Their
            ratios are to llama-server's whole start (load): they split llamabox's load
            figure into what Python and llama-cpp-python cost, what the runtime adds, and
            what the server adds.
  memory    RSS after load (one short request served), peak RSS over the round
Every ratio is llamabox / llama-server per round; the median and range over rounds are printed.
Rates: higher is better (target >= 1); times (n4, prefix, load, memory): lower is better (<= 1).

Token counts: llama-server gets ignore_eos; llamabox stops at EOS, so each round's counts (from
usage) are compared and any difference is printed and kept in the JSON. Rates are each server's
own tokens over its own wall time.

--python-server adds llama-cpp-python's own server (python -m llama_cpp.server, one request at a
time) to the 1- and 4-client measures (and to load and memory), and prints llamabox / it (issue 15's target there: >= 2.5 at
4 clients). Its dependencies are pip-installed once into bench/scratch/lcp-server-deps, apart from
the project's venv; it runs the venv's llama_cpp, so all three servers run the same llama.cpp.

--twin adds a second llama-server, started and measured exactly as the first: its ratios to the
first are the noise floor of every measure on this machine (the VM's drift, and where each process's
memory landed), printed in a table of their own after llamabox's, so that a miss can be read
against them.

Writes bench/out/peers-<model>[-<kv type>].json.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.llama_server_build import build as build_llama_server  # noqa: E402

LOGS = ROOT / "bench" / "scratch" / "peers-logs"
WORDS = ("the quick brown fox jumps over the lazy dog while a small bird sings in the old oak tree near the "
         "river bank and children play games of chance on the green hill under a pale winter sky ").split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_status_kib(pid: int, key: str) -> int:
    """VmRSS / VmHWM of a process, KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


@dataclass
class Reply:
    wall_s: float
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Peer:
    """One server process: how to start it, and how to talk to it."""
    name: str
    argv: list[str]            # without the port
    port_flag: str
    extra_body: dict = field(default_factory=dict)  # request fields only this server takes
    # llama-server's usage counts the first of n completions only; with ignore_eos each of them
    # runs to max_tokens (finish_reason "length"), so the total is that count times n.
    usage_is_per_choice: bool = False
    cwd: Path = ROOT
    env: dict | None = None    # extra environment variables
    health: str = "/health"    # answers 200 once the model is loaded
    measures: set | None = None  # the measures this server takes part in (None: all)
    proc: subprocess.Popen | None = None
    url: str = ""
    model_id: str = ""

    def start(self, timeout_s: float = 900) -> float:
        """Start the process; seconds until /health answers 200."""
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        LOGS.mkdir(parents=True, exist_ok=True)
        log = open(LOGS / f"{self.name}.log", "ab")
        t = time.perf_counter()
        env = {**os.environ, **self.env} if self.env else None
        self.proc = subprocess.Popen(self.argv + [self.port_flag, str(port)], stdout=log, stderr=subprocess.STDOUT, cwd=self.cwd,
                                     env=env)
        log.close()
        deadline = t + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name} exited with {self.proc.returncode} while starting; see {LOGS / (self.name + '.log')}")
            try:
                if requests.get(self.url + self.health, timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.perf_counter() > deadline:
                raise SystemExit(f"{self.name} did not become healthy in {timeout_s}s")
            time.sleep(0.005)
        dt = time.perf_counter() - t
        self.model_id = requests.get(self.url + "/v1/models", timeout=10).json()["data"][0]["id"]
        return dt

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def rss_mib(self) -> float:
        return proc_status_kib(self.proc.pid, "VmRSS") / 1024

    def peak_rss_mib(self) -> float:
        return proc_status_kib(self.proc.pid, "VmHWM") / 1024

    def complete(self, session: requests.Session, prompt: str, max_tokens: int, n: int = 1) -> Reply:
        body = {"model": self.model_id, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "n": n, **self.extra_body}
        t = time.perf_counter()
        r = session.post(self.url + "/v1/completions", json=body, timeout=1800)
        wall = time.perf_counter() - t
        if r.status_code != 200:
            raise SystemExit(f"{self.name}: HTTP {r.status_code}: {r.text[:500]}")
        data = r.json()
        u, choices = data["usage"], data["choices"]
        tokens = u["completion_tokens"]
        if self.usage_is_per_choice and len(choices) > 1:
            if any(c["finish_reason"] != "length" for c in choices):
                raise SystemExit(f"{self.name}: a completion ended before max_tokens; its token count is unknown")
            tokens *= len(choices)
        return Reply(wall, u["prompt_tokens"], tokens)


def llamabox_peer(model: str, threads: int, ctx: int, parallel: int, kv_type: str | None, root: Path = ROOT,
                  name: str = "llamabox") -> Peer:
    """`python -m server.cli serve` run in `root`: python -m puts the working directory first on
    sys.path, so another checkout (git worktree) of llamabox runs its own code with this venv."""
    # --gpu-layers 0 (and -ngl 0, --n_gpu_layers 0 below): a CPU comparison on any build, GPU builds too.
    argv = [sys.executable, "-m", "server.cli", "serve", "--model", model, "--threads", str(threads), "--ctx", str(ctx),
            "--parallel", str(parallel), "--queue-size", "64", "--no-ui", "--gpu-layers", "0"]
    if kv_type:
        argv += ["--kv-type", kv_type]
    return Peer(name, argv, "--port", cwd=root)


TWIN = "llama-server-2"  # --twin's second llama-server: its ratios to the first are the noise floor


def llama_server_peer(binary: Path, model: str, threads: int, ctx: int, parallel: int, kv_type: str | None,
                      name: str = "llama-server") -> Peer:
    # -np N with --kv-unified: one pool of ctx cells for all slots, as llamabox has (llama-server's
    # own default, -np auto, is 4 slots with a unified cache). --load-mode none: read, not mapped, as llamabox.
    argv = [str(binary), "-m", model, "-t", str(threads), "-tb", str(threads), "-c", str(ctx), "-np", str(parallel),
            "--kv-unified", "--load-mode", "none", "-fa", "auto", "--host", "127.0.0.1", "--no-webui", "-ngl", "0"]
    if kv_type:
        argv += ["-ctk", kv_type, "-ctv", kv_type]
    return Peer(name, argv, "--port", extra_body={"ignore_eos": True}, usage_is_per_choice=True)


# llama-cpp-python's own OpenAI server (python -m llama_cpp.server), for "≥ 2.5x at 4 clients".
# Its extra dependencies go to a folder of their own, never into the project's venv; it runs the
# venv's llama_cpp, so the same llama.cpp as both other servers.
LCP_DEPS = ROOT / "bench" / "scratch" / "lcp-server-deps"
LCP_REQUIREMENTS = ["uvicorn>=0.22.0", "fastapi>=0.100.0", "pydantic-settings>=2.0.1", "sse-starlette>=1.6.1",
                    "starlette-context>=0.3.6,<0.4", "PyYAML>=5.1"]  # llama-cpp-python 0.3.36's [server] extra


def llama_cpp_python_peer(model: str, threads: int, ctx: int) -> Peer:
    """One request at a time (that server has no batching); read mode and flash attention as the others."""
    if not (LCP_DEPS / ".complete").exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--target", str(LCP_DEPS), *LCP_REQUIREMENTS],
                       check=True)
        (LCP_DEPS / ".complete").write_text("")
    argv = [sys.executable, "-m", "llama_cpp.server", "--model", model, "--n_ctx", str(ctx), "--n_threads", str(threads),
            "--n_threads_batch", str(threads), "--use_mmap", "false", "--flash_attn", "true", "--n_gpu_layers", "0",
            "--host", "127.0.0.1"]
    path = os.pathsep.join(x for x in (str(LCP_DEPS), os.environ.get("PYTHONPATH")) if x)
    return Peer("llama-cpp-python", argv, "--port", env={"PYTHONPATH": path}, health="/v1/models",
                measures={"fresh_gen1", "fresh_clients4", "gen1", "clients4"})


# The floors under llamabox's load figure, each a `python -c` started from the checkout's root as
# `serve` is, timed until it prints "ready". Both read the weights into memory (no mmap) on the CPU
# and make a context as `serve` does; neither has a store, a memory estimate or an HTTP server.
FLOOR_SCRIPTS = {
    # llamabox's runtime: its imports, the load, the chat template, the scheduler's thread
    "load_floor": """
import sys
from runtime import load
model, ctx, threads, parallel, kv_type = sys.argv[1:]
rt = load(model, n_ctx=int(ctx), n_threads=int(threads), n_gpu_layers=0, n_parallel=int(parallel), kv_type=kv_type)
print("ready", flush=True)
sys.stdin.read()  # until the bench closes our stdin
rt.close()
""",
    # llama-cpp-python alone, as bench/run.py's raw arm uses it: the interpreter, `import llama_cpp`
    # (numpy, jinja2 and its ctypes bindings), llama.cpp's load and a context of the same shape
    # (serve's: --parallel slots + 4 prefix-cache sequences, one unified cache, batch 512)
    "load_bare": """
import sys
import llama_cpp as lc
from runtime.kv_types import KV_CACHE_TYPES, UNQUANTIZED  # names -> ggml type ids, no llama_cpp inside
model, ctx, threads, parallel, kv_type = sys.argv[1:]
quiet = lc.llama_log_callback(lambda level, text, user_data: None)
lc.llama_log_set(quiet, None)
mp = lc.llama_model_default_params()
mp.n_gpu_layers, mp.load_mode = 0, lc.LLAMA_LOAD_MODE_NONE
m = lc.llama_model_load_from_file(model.encode(), mp)
cp = lc.llama_context_default_params()
cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max, cp.kv_unified = int(ctx), 512, 512, int(parallel) + 4, True
cp.n_threads = cp.n_threads_batch = int(threads)
cp.type_k = cp.type_v = KV_CACHE_TYPES[kv_type]
if kv_type not in UNQUANTIZED:
    cp.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_ENABLED
c = lc.llama_init_from_model(m, cp) if m else None
if c:
    print("ready", flush=True)
    sys.stdin.read()
""",
}


def load_floor(which: str, model: str, threads: int, ctx: int, parallel: int, kv_type: str | None) -> float:
    """Seconds from process start until FLOOR_SCRIPTS[which] has loaded the model."""
    t = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-c", FLOOR_SCRIPTS[which], model, str(ctx), str(threads), str(parallel), kv_type or "f16"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT)
    line = p.stdout.readline()
    dt = time.perf_counter() - t
    p.stdin.close()
    if p.wait(60) != 0 or line.strip() != b"ready":
        raise SystemExit(f"the {which} process failed (exit {p.returncode}): run bench/peers.py's FLOOR_SCRIPTS[{which!r}] "
                         "with python -c to see why")
    return dt


def text_of(n_words: int, salt: str) -> str:
    return salt + " " + " ".join(WORDS[i % len(WORDS)] for i in range(n_words))


class Bench:
    def __init__(self, peers: list[Peer], n_gen: int, per_client: int, long_words: int, only: set[str] | None = None,
                 load_starts: int = 3, floor=None):
        self.peers = peers
        self.load_starts = load_starts        # starts per server per round for the load measure (median)
        self.floor = floor                    # (name in FLOOR_SCRIPTS) -> seconds for this model, or None
        self.only = only                      # measures to run (None: all); load and memory always
        self.n_gen = n_gen
        self.per_client = per_client
        self.long_words = long_words          # words that make ~499 tokens with this tokenizer
        self.rounds: list[dict] = []          # per round: measure -> peer -> {"value": ..., "tokens": ...}
        self._salt = 0
        self._sessions: dict[str, requests.Session] = {}  # url -> the one-client session (kept alive)
        self.shared_prefix = text_of(long_words, "Shared context:")

    def salt(self) -> str:
        """A new first word for a long prompt, so that it shares only BOS with what is cached. The
        same for every arm of one measure (measure() moves it on), so their prompts are identical."""
        return f"Note {self._salt}:"

    # --- workloads: each returns (value, tokens generated, prompt tokens) --------

    def gen1(self, p: Peer):
        r = p.complete(self.session(p), "Once upon a time", self.n_gen)
        return r.completion_tokens / r.wall_s, r.completion_tokens, r.prompt_tokens

    def pp(self, p: Peer):
        r = p.complete(self.session(p), text_of(self.long_words, self.salt()), 1)
        return r.prompt_tokens / r.wall_s, r.completion_tokens, r.prompt_tokens

    def n4(self, p: Peer):
        r = p.complete(self.session(p), "Once upon a time", self.n_gen, n=4)
        return r.wall_s, r.completion_tokens, r.prompt_tokens

    def prefix(self, p: Peer):
        r = p.complete(self.session(p), self.shared_prefix + f" Question {self.salt()}", 1)
        return r.wall_s, r.completion_tokens, r.prompt_tokens

    def clients(self, p: Peer, k: int, prompt_of):
        replies: list[Reply] = []
        lock = threading.Lock()

        def client(i: int) -> None:
            s = requests.Session()
            for j in range(self.per_client):
                r = p.complete(s, prompt_of(i, j), self.n_gen)
                with lock:
                    replies.append(r)

        t = time.perf_counter()
        ths = [threading.Thread(target=client, args=(i,)) for i in range(k)]
        [x.start() for x in ths]
        [x.join() for x in ths]
        wall = time.perf_counter() - t
        if len(replies) != k * self.per_client:
            raise SystemExit(f"{p.name}: {k * self.per_client - len(replies)} client requests failed")
        toks = sum(r.completion_tokens for r in replies)
        return toks / wall, toks, sum(r.prompt_tokens for r in replies)

    def session(self, p: Peer) -> requests.Session:
        s = self._sessions.get(p.url)
        if s is None:
            s = self._sessions[p.url] = requests.Session()
        return s

    # --- a round -----------------------------------------------------------------

    def run_round(self, r: int, quick: bool) -> dict:
        order = self.peers[r % len(self.peers):] + self.peers[: r % len(self.peers)]
        out: dict = {}

        def measure(name: str, fn) -> None:
            if self.only is not None and name not in self.only:
                return
            out[name] = {}
            self._salt += 1
            for p in order:
                if p.measures is not None and name not in p.measures:
                    continue
                time.sleep(0.3)  # let the other server's OpenMP threads stop spinning
                v, toks, ptoks = fn(p)
                out[name][p.name] = {"value": v, "tokens": toks, "prompt_tokens": ptoks}

        for p in self.peers:
            p.stop()
        self._sessions.clear()
        # Load time with no other server alive (a second loader is slowed by the first's memory,
        # which made this figure depend on the start order); then all start again for the rest.
        # Several starts each, alternating, and their median: one start per round swung by ±30%.
        starts: dict[str, list[float]] = {p.name: [] for p in order}
        floors: dict[str, list[float]] = {name: [] for name in FLOOR_SCRIPTS} if self.floor is not None else {}
        for i in range(self.load_starts):
            arms = [(p.name, p) for p in order] + [(name, None) for name in floors]
            for name, p in (arms if i % 2 == 0 else arms[::-1]):
                if p is None:
                    floors[name].append(self.floor(name))
                else:
                    starts[name].append(p.start())
                    p.stop()
        out["load"] = {name: {"value": statistics.median(v), "starts": v, "tokens": 0, "prompt_tokens": 0}
                       for name, v in starts.items()}
        for name, v in floors.items():  # as "llamabox" against llama-server's whole start, for the ratio
            out[name] = {"llamabox": {"value": statistics.median(v), "starts": v, "tokens": 0, "prompt_tokens": 0},
                         "llama-server": out["load"]["llama-server"]}
        for p in order:
            p.start()
        for p in order:  # one short request, so each has run its first decode
            p.complete(self.session(p), "Hello", 2)
        out["rss_after_load"] = {p.name: {"value": p.rss_mib(), "tokens": 0, "prompt_tokens": 0} for p in self.peers}

        short = lambda i, j: f"Story {i} {j}: once upon a time"  # noqa: E731
        measure("fresh_gen1", self.gen1)
        for k in (1, 2, 4, 8):
            measure(f"fresh_clients{k}", lambda p, k=k: self.clients(p, k, short))
        measure("fresh_n4", self.n4)
        measure("fresh_pp", self.pp)  # last: it leaves a long prompt in the cache
        for k in range(2):  # steady state: two long prompts now sit in each server's prompt cache
            self._salt += 1
            for p in order:
                p.complete(self.session(p), text_of(self.long_words, self.salt()), 1)
        measure("gen1", self.gen1)
        measure("pp", self.pp)
        for k in (1, 2, 4, 8):
            measure(f"clients{k}", lambda p, k=k: self.clients(p, k, short))
        measure("n4", self.n4)
        for p in order:  # the shared prefix, cached once
            p.complete(self.session(p), self.shared_prefix + " Question 0", 1)
        measure("prefix", self.prefix)
        # 3, not 4: llama-server gives each slot its own copy of the prefix, and 4 x ~520 cells overflow 2048
        measure("prefix3", lambda p: self.clients(p, 3, lambda i, j: self.shared_prefix + f" Question {i}.{j}:"))
        out["peak_rss"] = {p.name: {"value": p.peak_rss_mib(), "tokens": 0, "prompt_tokens": 0} for p in self.peers}
        self.rounds.append(out)
        return out


LOWER_IS_BETTER = {"n4", "fresh_n4", "prefix", "load", "load_floor", "load_bare", "rss_after_load", "peak_rss"}
INFORMATION = {"load_floor", "load_bare"}  # printed with its ratio, not judged against a target


def summarize(rounds: list[dict], a: str, b: str) -> dict:
    out = {}
    for m in rounds[0]:
        both = [rd for rd in rounds if a in rd[m] and b in rd[m]]
        if not both:
            continue  # a measure one of them does not take part in
        ratios = [rd[m][a]["value"] / rd[m][b]["value"] for rd in both]
        mismatched = [(i, rd[m][a]["tokens"], rd[m][b]["tokens"]) for i, rd in enumerate(both)
                      if rd[m][a]["tokens"] != rd[m][b]["tokens"] or rd[m][a]["prompt_tokens"] != rd[m][b]["prompt_tokens"]]
        out[m] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "ratios": ratios,
                  a: statistics.median(rd[m][a]["value"] for rd in both), b: statistics.median(rd[m][b]["value"] for rd in both),
                  "lower_is_better": m in LOWER_IS_BETTER, "token_mismatches": mismatched}
    return out


def long_prompt_words(peer: Peer, target_tokens: int = 499) -> int:
    """Words of WORDS that make about target_tokens prompt tokens (with the salt) on this model."""
    s = requests.Session()
    n = target_tokens
    for _ in range(4):
        got = peer.complete(s, text_of(n, "Note 0:"), 1).prompt_tokens
        n = max(1, round(n * target_tokens / got))
    while peer.complete(s, text_of(n, "Note 0:"), 1).prompt_tokens > target_tokens:
        n -= 1
    return n


def add_server_args(ap: argparse.ArgumentParser) -> None:
    """What every server in a bench is started with (bench/perf_split.py takes the same)."""
    ap.add_argument("--model", required=True, help="GGUF path")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--parallel", type=int, default=8)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_server_args(ap)
    ap.add_argument("--rounds", type=int, help="default 5, 3 with --quick")
    ap.add_argument("--n-gen", type=int, help="tokens per request (default 128, 64 with --quick)")
    ap.add_argument("--per-client", type=int, help="requests each client sends in a client measure (default 2, 1 with --quick)")
    ap.add_argument("--kv-type", help="KV cache type for both servers (llamabox --kv-type, llama-server -ctk/-ctv)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", help="comma-separated measures to run (default all), e.g. fresh_gen1,gen1,clients4,prefix")
    ap.add_argument("--tag", default="", help="suffix for the JSON file name")
    ap.add_argument("--load-starts", type=int, default=3, help="starts per server per round for the load measure (default 3)")
    ap.add_argument("--python-server", action="store_true",
                    help="also run llama-cpp-python's own server (1-client and 4-client measures); its dependencies "
                         "are installed into bench/scratch/lcp-server-deps on first use")
    ap.add_argument("--twin", action="store_true",
                    help="also run a second llama-server, 'llama-server-2', as an arm: its ratios to llama-server (same binary, "
                         "same settings) are this machine's noise floor for each measure")
    ap.add_argument("--baseline", type=Path, help="another llamabox checkout (git worktree) to run as a third arm, "
                                                  "'llamabox-base', e.g. the commit before a change")
    args = ap.parse_args()
    rounds = args.rounds or (3 if args.quick else 5)
    n_gen = args.n_gen or (64 if args.quick else 128)
    per_client = args.per_client or (1 if args.quick else 2)
    model = str(Path(args.model).resolve())

    binary = build_llama_server()
    peers = [llamabox_peer(model, args.threads, args.ctx, args.parallel, args.kv_type),
             llama_server_peer(binary, model, args.threads, args.ctx, args.parallel, args.kv_type)]
    if args.baseline:
        peers.append(llamabox_peer(model, args.threads, args.ctx, args.parallel, args.kv_type, args.baseline.resolve(),
                                   "llamabox-base"))
    if args.twin:
        peers.append(llama_server_peer(binary, model, args.threads, args.ctx, args.parallel, args.kv_type, TWIN))
    if args.python_server:
        peers.append(llama_cpp_python_peer(model, args.threads, args.ctx))
    try:
        peers[1].start()
        long_words = long_prompt_words(peers[1])
        floor = lambda which: load_floor(which, model, args.threads, args.ctx, args.parallel, args.kv_type)  # noqa: E731
        bench = Bench(peers, n_gen, per_client, long_words, set(args.only.split(",")) if args.only else None,
                      max(1, args.load_starts), floor)
        print(f"{Path(model).name}: {args.threads} threads, ctx {args.ctx}, parallel {args.parallel}, {rounds} rounds, "
              f"{n_gen} tokens per request, KV {args.kv_type or 'f16'}; load {os.getloadavg()[0]:.2f}", flush=True)
        for r in range(rounds):
            t = time.perf_counter()
            bench.run_round(r, args.quick)
            print(f"  round {r + 1}/{rounds}: {time.perf_counter() - t:.0f}s, load average {os.getloadavg()[0]:.2f}", flush=True)
    finally:
        for p in peers:
            p.stop()
    pairs = [(p.name, "llama-server") for p in peers if p.name != "llama-server"]
    if args.python_server:  # its target: llamabox / llama-cpp-python's server at 4 clients >= 2.5
        pairs = [x for x in pairs if x[0] != "llama-cpp-python"] + [("llamabox", "llama-cpp-python")]
    summary = {f"{a} / {b}": summarize(bench.rounds, a, b) for a, b in pairs}
    for a, b in pairs:
        print(f"\n  {'measure':16} {a:>16} {b:>16}   {a} / {b}: median [range]  target")
        for m, s in summary[f"{a} / {b}"].items():
            target = "<= 1" if s["lower_is_better"] else ">= 1"
            met = (s["median"] <= 1) if s["lower_is_better"] else (s["median"] >= 1)
            if a == TWIN:  # the same server twice: no target, only the spread
                verdict = "noise floor"
            else:
                verdict = "information" if m in INFORMATION else f"{target} {'met' if met else 'MISSED'}"
            warn = f"  token counts differ in rounds {[x[0] for x in s['token_mismatches']]}" if s["token_mismatches"] else ""
            print(f"  {m:16} {s[a]:16.2f} {s[b]:16.2f}   {s['median']:.3f} [{s['min']:.3f}-{s['max']:.3f}]"
                  f"  {verdict}{warn}")
    dest = ROOT / "bench" / "out"
    dest.mkdir(exist_ok=True)
    name = f"peers-{Path(model).stem}" + (f"-{args.kv_type}" if args.kv_type else "") + (f"-{args.tag}" if args.tag else "")
    (dest / f"{name}.json").write_text(json.dumps({
        "model": model, "threads": args.threads, "ctx": args.ctx, "parallel": args.parallel, "rounds": rounds, "n_gen": n_gen,
        "per_client": per_client, "kv_type": args.kv_type or "f16", "long_prompt_words": long_words,
        "llama_server": str(binary), "baseline": str(args.baseline) if args.baseline else None, "twin": args.twin, "summary": summary,
        "raw": bench.rounds}, indent=2))
    print(f"wrote {dest / (name + '.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
