"""The `llamabox` command. The only place that prints, and the only place that exits.

Library errors (runtime.errors) become one line on stderr and a non-zero exit.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import NamedTuple

from runtime import cpu_backend
from runtime.errors import BackendError, InvalidParameter, LlamaboxError, ModelNotFound
from server.settings import Settings, read_api_keys

DEMO_ID = "llamabox-tiny"
GET_LLAMA2 = "llamabox pull llamav2-7b-chat"

log = logging.getLogger("llamabox")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one readable line, not usage + error
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _die(message: str, code: int = 1) -> int:
    print(f"llamabox: error: {message}", file=sys.stderr)
    return code


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    level = logging.DEBUG if verbose else logging.INFO
    for name in ("runtime", "convert", "server", "llamabox"):
        logging.getLogger(name).setLevel(level)
    logging.getLogger("llama_cpp").setLevel(logging.DEBUG if verbose else logging.WARNING)


# --- model resolution -------------------------------------------------------------

class ResolvedModel(NamedTuple):
    path: Path
    model_id: str
    demo: bool
    chat: bool | None  # the store manifest's verdict (False: a base model even if its GGUF has a template); None: the GGUF decides
    quant: str = ""    # the store's quant name; "" for a plain .gguf path


def resolve_model(ref: str | None, store) -> ResolvedModel:
    """--model: a GGUF path, a store id, or None for the built-in demo."""
    if ref is None:
        ref = DEMO_ID
    p = Path(ref).expanduser()
    if ref.endswith(".gguf") or os.sep in ref:
        if not p.is_file():
            raise ModelNotFound(f"no model file at {p}")
        from convert.store import model_id_for  # not convert.pipeline: that imports the converter and llama.cpp

        return ResolvedModel(p, model_id_for(Path(p.stem.split(".")[0])), False, None)
    mf = store.resolve(ref)
    # A store file must still be the one its manifest describes: size every time, sha256 when it changed.
    store.check_before_load(mf)
    return ResolvedModel(mf.path, mf.model_id, mf.model_id == DEMO_ID, mf.chat, mf.quant)


def _load_runtime(path: Path, model_id: str, settings: Settings, chat: bool | None = None, compute=None, abort=None):
    """chat: resolve_model's verdict; --no-chat and --chat-template (settings) override it.
    abort: True stops a load in progress (runtime.load)."""
    from runtime import load

    template = None
    if settings.no_chat:
        chat = False
    elif settings.chat_template:
        chat = None  # the user's template makes it a chat model, whatever the store says
        try:
            template = Path(settings.chat_template).expanduser().read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise InvalidParameter("chat_template", f"cannot read {settings.chat_template}: "
                                                    f"{getattr(e, 'strerror', None) or e}") from None
    gpu_layers = settings.gpu_layers if settings.gpu_layers is not None else _fit_gpu_layers(path, model_id, settings)
    return load(path, n_ctx=settings.n_ctx, n_threads=settings.threads, n_gpu_layers=gpu_layers, model_id=model_id,
                use_mmap=settings.mmap, huge_pages=settings.huge_pages, n_parallel=settings.n_parallel, queue_size=settings.queue_size,
                prefill_chunk=settings.prefill_chunk, chat=chat, chat_template=template, compute=compute,
                kv_type=settings.kv_type, abort=abort)


# --- commands ---------------------------------------------------------------------

def _gpu_memory():
    # runtime.model first: it registers the backends (a GPU build may load them at run time) and
    # routes their log. (cmd_serve has imported it already; other callers may not have.)
    import runtime.model  # noqa: F401
    from runtime.backends import gpu_memory

    return gpu_memory()


def _fit_gpu_layers(path: Path, model_id: str, settings: Settings) -> int | None:
    """--gpu-layers auto: every layer if the model's estimate (+10%) is free on the GPU now, else as
    many as fit, said in a warning; None where there is no GPU (the runtime then runs on the CPU)."""
    from server.pool import GiB, GPU_HEADROOM, estimate_cost, gpu_fit, offloadable_layers

    mem = _gpu_memory()
    n = offloadable_layers(path) if mem is not None else 0
    if not n:
        return None
    estimate = estimate_cost(path, settings.n_ctx, kv_type=settings.kv_type)
    k = gpu_fit(estimate, n, mem[0])
    if k < n:
        log.warning("%s needs about %.1f GiB on the GPU and %.1f GiB is free there: offloading %d of its %d layers, "
                    "the rest runs on the CPU (--gpu-layers N sets the count)",
                    model_id, estimate * GPU_HEADROOM / GiB, mem[0] / GiB, k, n)
    return -1 if k >= n else k


def _raise_open_file_limit(want: int) -> None:
    """Each connection is a file descriptor: let the soft limit reach what --max-connections needs."""
    try:
        import resource
    except ImportError:  # not POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < want:
        log.warning("the open-file limit (%d) is below what --max-connections needs (%d)", target, want)


_SIZE = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1 << 10, "m": 10**6, "mb": 10**6, "mib": 1 << 20,
         "g": 10**9, "gb": 10**9, "gib": 1 << 30, "t": 10**12, "tb": 10**12, "tib": 1 << 40}
_DURATION = {"": 1, "s": 1, "m": 60, "h": 3600}


def parse_size(field: str, text: str) -> int:
    """'12GiB', '12G' (decimal), '500MiB', '8000000000' -> bytes."""
    import re

    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _SIZE or float(m.group(1)) <= 0:
        raise InvalidParameter(field, f"must be a size such as 12GiB, 500MiB or 8GB, got {text!r}")
    return int(float(m.group(1)) * _SIZE[m.group(2).lower()])


def parse_duration(field: str, text: str) -> float:
    """'5m', '30s', '1h', '90' (seconds) -> seconds."""
    import re

    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([smh]?)\s*", text)
    if not m or float(m.group(1)) <= 0:
        raise InvalidParameter(field, f"must be a duration such as 30s, 5m or 1h, got {text!r}")
    return float(m.group(1)) * _DURATION[m.group(2)]


def _pool_entries(refs: list[str], settings: Settings, store):
    """One pool entry per --model, resolved (and checked) now: an unknown id or a missing file
    stops the server before it starts, with one line."""
    from server.pool import Entry, estimate_cost

    entries, seen = [], {}
    for ref in refs:
        r = resolve_model(ref, store)
        if r.model_id in seen:
            raise InvalidParameter("model", f"{ref!r} and {seen[r.model_id]!r} are both served as {r.model_id!r}; serve each once")
        seen[r.model_id] = ref
        entries.append(Entry(r.model_id, r.path, chat=r.chat, quant=r.quant, file_bytes=r.path.stat().st_size,
                             estimate_bytes=estimate_cost(r.path, settings.n_ctx, kv_type=settings.kv_type)))
    return entries


def cmd_serve(args) -> int:
    from convert.store import Store
    from server.pool import DEFAULT_BUDGET_SHARE, GiB, ModelPool, available_memory

    store = Store()
    refs = list(args.model or [])
    if args.all:
        refs += [f.model_id for f in store.list() if f.model_id not in refs]
        refs = list(dict.fromkeys(refs))
    refs = refs or [DEMO_ID]
    settings = Settings(
        models=tuple(refs), host=args.host, port=args.port, api_keys=read_api_keys(args.api_key_file),
        insecure_no_auth=args.insecure_no_auth, threads=args.threads, gpu_layers=args.gpu_layers, n_ctx=args.ctx, kv_type=args.kv_type,
        mmap=args.mmap, huge_pages=not args.no_huge_pages, n_parallel=args.parallel, queue_size=args.queue_size, request_timeout_s=args.timeout,
        max_connections=args.max_connections, idle_timeout_s=args.idle_timeout, read_timeout_s=args.read_timeout,
        prefill_chunk=args.prefill_chunk, chat_template=args.chat_template, no_chat=args.no_chat,
        drain_timeout_s=args.drain_timeout, metrics_public=args.metrics_public, log_format=args.log_format, ui=not args.no_ui,
        max_memory_bytes=parse_size("max_memory", args.max_memory) if args.max_memory else 0,
        keep_alive_s=parse_duration("keep_alive", args.keep_alive) if args.keep_alive else None,
        preload=tuple(x for p in (args.preload or []) for x in p.split(",") if x),
    )
    settings.check()
    if settings.log_format == "json":  # one JSON object per access-log line, nothing around it
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        access = logging.getLogger("llamabox.access")
        access.addHandler(handler)
        access.propagate = False
    entries = _pool_entries(refs, settings, store)
    ids = [e.model_id for e in entries]
    for p in settings.preload:
        if p not in ids:
            raise InvalidParameter("preload", f"{p!r} is not one of the served models ({', '.join(ids)})")
    budget = settings.max_memory_bytes or int(available_memory() * DEFAULT_BUDGET_SHARE)
    from runtime.compute import ComputeThread

    # Every model's llama_decode on one thread (runtime/compute.py says why); the pool owns it.
    compute = ComputeThread() if len(entries) > 1 else None
    for e in entries:
        e.pinned = e.model_id == ids[0] or e.model_id in settings.preload
        if e.estimate_bytes > budget:
            log.warning("%s needs about %.1f GiB, more than the memory budget (%.1f GiB): it will load only if a GPU "
                        "takes most of it", e.model_id, e.estimate_bytes / GiB, budget / GiB)
    # Set when this server will not serve (a signal, a failed start): a load in progress stops at
    # its next tensor, so no exit waits out a 7B read or leaves llama.cpp loading at interpreter exit.
    stop_loading = threading.Event()
    pool = ModelPool(entries, lambda e: _load_runtime(e.path, e.model_id, settings, e.chat, compute and compute.call,
                                                      abort=stop_loading.is_set),
                     budget, settings.keep_alive_s, compute=compute,
                     # Offloading every layer (auto, the default, or -1): idle models make room on the GPU.
                     # A partial --gpu-layers N is the user's own sizing.
                     gpu_memory=_gpu_memory if settings.gpu_layers in (None, -1) else None)
    _raise_open_file_limit(settings.max_connections + 64)
    failed: list[str] = []
    default = entries[0]
    live: dict = {}                   # "server" and "state" (the app's), once this thread has made them
    made_or_not = threading.Event()   # set when they exist, or when making them failed
    signals: list[int] = []

    def on_signal(signum, _frame):
        # Only flags here: the serve loop (this same thread, between iterations) does the work.
        signals.append(signum)
        if len(signals) > 1:  # a second signal: no more waiting
            os._exit(128 + signum)
        stop_loading.set()
        if live:
            live["state"].draining = True
            live["server"].begin_drain()

    def load_in_background():
        # Started before Flask is even imported: llama.cpp reads the weights (without the GIL)
        # while the main thread imports the app and binds the port, so a start costs the longer of
        # the two instead of their sum (issue 15: load time against llama-server).
        # The loader's owner is the serve loop below: if the default model fails, it records why
        # and stops the loop, which then prints the reason and exits non-zero. Other models that
        # fail stay failed, with their own 503s; the rest keep serving.
        try:
            pool.preload([ids[0]] + [m for m in settings.preload if m != ids[0]])
            if default.state != "loaded":
                raise LlamaboxError(default.error or "unknown error")
            rt = default.runtime
            print(f"llamabox: {default.model_id} ready on {rt.info.placement()} ({rt.info.n_threads} threads, "
                  f"context {rt.info.n_ctx}, load {rt.info.load_seconds:.1f}s)", file=sys.stderr, flush=True)
        except BaseException as e:  # any failure, not only ours: /health must not say "loading" forever
            msg = str(e) if isinstance(e, LlamaboxError) else f"{type(e).__name__}: {e}"
            if not isinstance(e, LlamaboxError):
                log.exception("loading %s failed", default.model_id)
            failed.append(msg)
            made_or_not.wait()
            if live:
                live["server"].request_stop()  # a server that cannot load its default model is no server

    def cancel_rest() -> None:
        log.warning("drain timeout (%gs): cancelling %d requests still in flight", settings.drain_timeout_s, pool.inflight())
        pool.close()  # fails what is left with ShuttingDown: 503 + Retry-After

    # Handlers first: from the loader's start on, every way out goes through the finally below.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # The runtime's imports (llama_cpp, numpy, jinja2: about 0.2 s of Python under the GIL) here, before
    # the loader starts and before Flask's: made by the loader while this thread imported Flask, the two
    # took turns on the GIL and llama.cpp's read began only after both. Measured (/health answering 200,
    # 2 threads, 10 and 8 interleaved starts): SmolLM2-135M 0.91 -> 0.74 s, 1.1B 1.89 -> 1.67 s.
    try:
        import runtime.engine  # noqa: F401
    except ImportError as e:  # a broken llama-cpp-python install: one line, as a failed load would say
        raise BackendError(f"cannot import the runtime: {e}") from e
    loader = threading.Thread(target=load_in_background, name="llamabox-load", daemon=True)
    loader.start()
    server = None
    try:
        try:
            from server.app import create_app, make_server

            app = create_app(settings, pool=pool)
            server = make_server(app, settings)
            live.update(server=server, state=app.extensions["llamabox"])
        finally:
            made_or_not.set()
        if signals:  # one arrived while the app was being made
            live["state"].draining = True
            server.begin_drain()

        url = f"http://{settings.host}:{server.effective_port}"
        print(f"llamabox: CPU backend: {cpu_backend().describe()}", file=sys.stderr)
        for e in entries:
            print(f"llamabox: serving {e.model_id} from {e.path}", file=sys.stderr)
        print(f"llamabox: POST {url}/predict  (or {url}/{ids[0]}-webhook/predict)", file=sys.stderr)
        if len(entries) > 1:
            print(f"llamabox: memory budget {budget / GiB:.1f} GiB for {len(entries)} models, loaded on demand", file=sys.stderr)
        if ids[0] == DEMO_ID:
            print(f"llamabox: {DEMO_ID} is a tiny demo model trained by llamabox, not Llama 2. Get Llama 2 with: {GET_LLAMA2}",
                  file=sys.stderr)
        if not settings.api_keys:
            if settings.is_loopback:
                print("llamabox: no API key set (LLAMABOX_API_KEY or --api-key-file): listening on loopback only", file=sys.stderr)
            else:
                print("llamabox: WARNING: no API key and --insecure-no-auth: anyone who can reach this port can use it", file=sys.stderr)
        sys.stderr.flush()

        server.run(drain_timeout_s=settings.drain_timeout_s, idle=lambda: pool.inflight() == 0, cancel=cancel_rest)
        if signals:
            name = signal.Signals(signals[0]).name
            busy = pool.inflight()
            if busy:
                log.warning("%s: exiting with %d requests unfinished", name, busy)
            else:
                log.info("%s: drained; every request in flight finished", name)
    finally:
        stop_loading.set()  # a load still running stops at its next tensor...
        loader.join()       # ...so this is quick, and llama.cpp is never mid-load at interpreter exit
        pool.close()  # fails what still waits (503), so the request threads can finish
        if server is not None:
            server.close()
    if signals:
        return 0
    if failed:
        return _die(f"could not load {default.model_id}: {failed[0]}")
    return 0


def cmd_generate(args) -> int:
    from convert.store import Store
    from server.validation import Limits, parse_predict

    body = {"prompt": args.prompt, "max_length": args.max_length, "temperature": args.temperature, "top_p": args.top_p,
            "top_k": args.top_k, "repetition_penalty": args.repetition_penalty}
    if args.seed is not None:
        body["seed"] = args.seed
    if args.stop:
        body["stop"] = args.stop
    if args.system is not None:
        body["system_prompt"] = args.system
    settings = Settings(threads=args.threads, gpu_layers=args.gpu_layers, n_ctx=args.ctx, mmap=args.mmap,
                        huge_pages=not args.no_huge_pages,
                        chat_template=args.chat_template, no_chat=args.no_chat, kv_type=args.kv_type)
    settings.check()
    path, model_id, _, chat, _ = resolve_model(args.model, Store())
    prompt, params = parse_predict(body, Limits(max_new_tokens=args.ctx or 1_000_000, max_sequences=1))
    rt = _load_runtime(path, model_id, settings, chat)
    print(f"llamabox: CPU backend: {cpu_backend().describe()}", file=sys.stderr)  # after the load: a failed one is one line
    try:
        t0 = time.perf_counter()
        out = sys.stdout
        if not args.quiet_prompt:
            out.write(prompt)
        result = rt.generate(prompt, params, on_text=lambda _i, text: (out.write(text), out.flush()))
        dt = time.perf_counter() - t0
        out.write("\n")
        c = result.completions[0]
        print(f"[{c.generated_tokens} tokens in {dt:.2f}s = {c.generated_tokens / dt:.1f} tok/s, prompt {c.prompt_tokens} tokens, "
              f"finish: {c.finish_reason}, seed {result.seed}]", file=sys.stderr)
    finally:
        rt.close()
    return 0


CHAT_HELP = "commands: /reset starts a new conversation, /exit (or Ctrl-D) quits; Ctrl-C stops an answer"


def cmd_chat(args) -> int:
    """A multi-turn conversation in the terminal with the model's own chat template, like `ollama run`."""
    from convert.store import Store
    from runtime import GenerationParams
    from server.validation import as_float, as_int

    settings = Settings(threads=args.threads, gpu_layers=args.gpu_layers, n_ctx=args.ctx, mmap=args.mmap,
                        huge_pages=not args.no_huge_pages,
                        chat_template=args.chat_template, no_chat=args.no_chat, kv_type=args.kv_type)
    settings.check()
    temperature = as_float("temperature", args.temperature, 0.0, 5.0)
    max_tokens = as_int("max_tokens", args.max_tokens, 1, 1_000_000)
    seed = None if args.seed is None else as_int("seed", args.seed, 0, 0xFFFFFFFE)
    path, model_id, _, chat, _ = resolve_model(args.model, Store())
    if settings.no_chat or (chat is False and not settings.chat_template):
        return _die(f"{model_id} is used as a base model; chat needs a chat model (or --chat-template FILE)")
    rt = _load_runtime(path, model_id, settings, chat)
    try:
        if not rt.info.chat:
            return _die(f"{model_id} has no chat template; use `llamabox generate`, or give one with --chat-template FILE")
        start = [{"role": "system", "content": args.system}] if args.system else []
        messages = list(start)
        tty = sys.stdin.isatty()
        print(f"llamabox: chatting with {model_id} (context {rt.info.n_ctx} tokens); {CHAT_HELP}", file=sys.stderr)
        while True:
            try:
                line = input(">>> " if tty else "")
            except EOFError:
                break
            text = line.strip()
            if text in ("/exit", "/bye", "/quit"):
                break
            if text == "/reset":
                messages = list(start)
                print("(new conversation)", file=sys.stderr)
                continue
            if not text:
                continue
            if text.startswith("/") and " " not in text:
                print(CHAT_HELP, file=sys.stderr)
                continue
            messages.append({"role": "user", "content": line})
            try:
                tokens = rt.chat_tokens(messages)
                room = rt.info.n_ctx - len(tokens)
                if room < 1:
                    raise InvalidParameter("messages", f"the conversation is {len(tokens)} tokens and fills the context")
                params = GenerationParams(max_length=min(max_tokens, room), temperature=temperature, seed=seed)
                job = rt.submit_tokens(tokens, params, on_text=lambda _i, t: (sys.stdout.write(t), sys.stdout.flush()))
            except InvalidParameter as e:
                messages.pop()
                print(f"llamabox: {e.message}; /reset starts a new conversation", file=sys.stderr)
                continue
            try:
                answer = job.future.result().completions[0].text
            except KeyboardInterrupt:  # stop this answer, keep the conversation
                job.cancel()
                messages.pop()
                print("\n(stopped)", file=sys.stderr)
                continue
            sys.stdout.write("\n")
            sys.stdout.flush()
            messages.append({"role": "assistant", "content": answer})
    finally:
        rt.close()
    return 0


def cmd_pull(args) -> int:
    from convert.pull import pull

    reports = pull(args.name, quants=args.quant, repo=args.repo, revision=args.revision, gguf=args.gguf,
                   model_id=args.id, keep_download=args.keep_download, force=args.force)
    _print_reports(reports)
    return 0


def cmd_convert(args) -> int:
    from convert.pipeline import convert, parse_quants
    from convert.store import model_id_for
    from convert.pull import fetch_source
    from convert.store import Store

    quants = parse_quants(args.quant)
    src, source, _ = fetch_source(args.src, revision=args.revision)
    store = None if args.out else Store()
    bar = _tqdm_tensors()
    try:
        reports = convert(src, quants, store=store, out_dir=Path(args.out) if args.out else None,
                          model_id=args.id or model_id_for(src), source=source, force=args.force, n_threads=args.threads,
                          progress=bar)
    finally:
        bar.close()
    _print_reports(reports)
    return 0


class _tqdm_tensors:
    """A progress callback (done, total) drawn as a tqdm bar."""

    def __init__(self):
        self.bar = None

    def __call__(self, done: int, total: int) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total, desc="writing f16 GGUF", unit="tensor")
        self.bar.update(done - self.bar.n)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _print_reports(reports) -> None:
    print(f"{'quant':8} {'size MiB':>10} {'bits/weight':>12} {'seconds':>8}  file")
    for r in reports:
        print(f"{r.quant:8} {r.size_bytes / 2**20:10.1f} {r.bits_per_weight:12.2f} {r.seconds:8.1f}  {r.path}")
    for r in reports:
        if r.f16_overflow:
            print(f"{r.quant}: {r.f16_overflow} weights are beyond F16's range (±65504) and were written as ±65504; "
                  "--quant bf16 keeps them")


def cmd_list(args) -> int:
    from convert.store import Store

    files, broken = Store().scan()
    if not files and not broken:
        print("no models yet; `llamabox pull llamav2-7b-chat` fetches Llama 2 7B chat")
        return 0
    print(f"{'model':28} {'quant':8} {'size MiB':>10}  sha256")
    for f in files:
        print(f"{f.model_id + (' (built-in)' if f.builtin else ''):28} {f.quant:8} {f.size / 2**20:10.1f}  {f.sha256[:16]}")
    for b in broken:  # listed, not fatal: one bad manifest must not hide the other models
        print(f"{b.model_id + (' (built-in)' if b.builtin else ''):28} BROKEN: {b.reason}")
    return 0


def cmd_rm(args) -> int:
    from convert.store import Store

    Store().remove(args.model)
    print(f"removed {args.model}")
    return 0


def cmd_verify(args) -> int:
    from convert.store import Store

    store = Store()
    if args.model:
        ids = [args.model]
    else:
        files, broken = store.scan()
        ids = sorted({f.model_id for f in files} | {b.model_id for b in broken})
    bad = 0
    for model_id in ids:
        problems = store.verify(model_id)
        print(f"{model_id}: {'OK' if not problems else 'DAMAGED'}")
        for p in problems:
            print(f"  {p}")
        bad += bool(problems)
    return 1 if bad else 0


class _tqdm_bytes:
    """A progress callback (bytes done, bytes in all) drawn as a tqdm bar on stderr."""

    def __init__(self, desc: str):
        self.desc = desc
        self.bar = None

    def __call__(self, done: int, total: int) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total, desc=self.desc, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr)
        self.bar.update(done - self.bar.n)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def cmd_export(args) -> int:
    from convert.bundle import default_output, export_bundle
    from convert.store import Store, parse_ref

    model_id, _ = parse_ref(args.model)
    to_stdout = args.output == "-"
    if to_stdout and sys.stdout.isatty():
        return _die("refusing to write a binary bundle to a terminal; pipe it, or give -o FILE")
    out = sys.stdout.buffer if to_stdout else Path(args.output or default_output(model_id))
    bar = _tqdm_bytes(f"exporting {args.model}")
    try:
        result = export_bundle(Store(), args.model, out, progress=bar)
    finally:
        bar.close()
    print(f"exported {result.model_id} ({', '.join(result.files)}; {result.bytes / 2**20:.1f} MiB) to "
          f"{result.path if result.path else 'stdout'}", file=sys.stderr if to_stdout else sys.stdout)
    return 0


def cmd_import(args) -> int:
    from convert.bundle import import_bundle
    from convert.store import Store

    src = sys.stdin.buffer if args.bundle == "-" else Path(args.bundle)
    bar = _tqdm_bytes("importing")
    try:
        result = import_bundle(Store(), src, force=args.force, progress=bar)
    finally:
        bar.close()
    if result.already_present:
        print(f"{result.model_id} already holds these files ({', '.join(result.files)}); nothing to import")
    else:
        print(f"imported {result.model_id} ({', '.join(result.files)}; {result.bytes / 2**20:.1f} MiB)")
    return 0


def _gpu_layers(text: str) -> int | None:
    """--gpu-layers: 'auto' (None) or a layer count; range checked by Settings."""
    if text == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be auto, -1 (all), 0 or a number of layers, got {text!r}") from None


def _add_model_flags(p: argparse.ArgumentParser, many: bool = False) -> None:
    if many:
        p.add_argument("--model", action="append",
                       help="store id (llamav2-7b-chat, llamav2-7b-chat:q8_0) or a .gguf path; repeat it to serve several "
                            "models (the first is the default); default: the built-in demo")
    else:
        p.add_argument("--model", help="store id (llamav2-7b-chat, llamav2-7b-chat:q8_0) or a .gguf path; default: the built-in demo")
    p.add_argument("--threads", type=int, default=0, help="llama.cpp threads (default: all cores)")
    p.add_argument("--gpu-layers", type=_gpu_layers, default=None, metavar="N|auto",
                   help="layers to offload to Metal/CUDA: -1 = all, 0 = none (default: auto: where llama-cpp-python "
                        "was built with a GPU backend and sees a GPU, all layers if they fit in its free memory, else as "
                        "many as fit; none otherwise)")
    p.add_argument("--mmap", action="store_true",
                   help="map the model file instead of reading it: faster loads for types llama.cpp does not "
                        "repack, but Q4_0/Q4_K/IQ4_NL then count twice in RAM")
    p.add_argument("--no-huge-pages", action="store_true",
                   help="leave the weights read into memory on 4 KiB pages (default on Linux with THP in 'madvise' "
                        "mode: ask for 2 MiB pages, fewer TLB misses per token)")
    p.add_argument("--ctx", type=int, default=0,
                   help="context size in tokens, shared by running sequences (default: the model's, at most 4096)")
    p.add_argument("--kv-type", default="f16",
                   help="KV cache type: f16 (default), q8_0 (half the memory), q4_0, q4_1, q5_0, q5_1, iq4_nl, bf16, f32; "
                        "quantized types turn flash attention on")
    chat = p.add_mutually_exclusive_group()
    chat.add_argument("--chat-template", metavar="FILE",
                      help="a Jinja chat template (Hugging Face's format) to use instead of the model's own")
    chat.add_argument("--no-chat", action="store_true",
                      help="plain completion: never wrap prompts in a chat template, even if the model has one")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="llamabox", description="Llama 2, offline, on your CPU.")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging (llama.cpp's too)")
    sub = ap.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("serve", help="serve the predict API")
    _add_model_flags(p, many=True)
    p.add_argument("--all", action="store_true", help="serve every model in the store too")
    p.add_argument("--max-memory", help="memory budget for loaded models, e.g. 12GiB (default: 80%% of the RAM available at start)")
    p.add_argument("--keep-alive", help="unload a model idle this long, e.g. 5m (default: never; the first model and "
                                        "--preload ones stay)")
    p.add_argument("--preload", action="append", help="load these models at start (comma-separated or repeated)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--api-key-file", help="file with one API key per line (also: LLAMABOX_API_KEY)")
    p.add_argument("--insecure-no-auth", action="store_true", help="allow a non-loopback bind without an API key")
    p.add_argument("--parallel", type=int, default=4, help="sequences decoded together (default 4)")
    p.add_argument("--queue-size", type=int, default=16, help="requests waiting before 503 (default 16)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds before a generation is cancelled (default 600)")
    p.add_argument("--max-connections", type=int, default=1000, help="open connections at most (default 1000)")
    p.add_argument("--idle-timeout", type=float, default=15.0,
                   help="seconds before a connection with no request in progress is closed (default 15)")
    p.add_argument("--read-timeout", type=float, default=30.0,
                   help="seconds a client has to send a whole request, headers and body (default 30)")
    p.add_argument("--metrics-public", action="store_true", help="serve /metrics without the API key")
    p.add_argument("--no-ui", action="store_true", help="do not serve the chat page at /")
    p.add_argument("--log-format", choices=("text", "json"), default="text", help="access log lines (default text)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on SIGTERM/SIGINT, seconds that requests in flight get to finish (default 30)")
    p.add_argument("--prefill-chunk", type=int, default=64,
                   help="prompt tokens evaluated per step while other requests generate (default 64)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("generate", help="generate from a prompt, printing tokens as they come")
    _add_model_flags(p)
    p.add_argument("prompt")
    p.add_argument("--max-length", default=100)
    p.add_argument("--temperature", default=1.0)
    p.add_argument("--top-p", default=1.0)
    p.add_argument("--top-k", default=50)
    p.add_argument("--repetition-penalty", default=1.0)
    p.add_argument("--seed")
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--system", help="system prompt (chat models)")
    p.add_argument("--quiet-prompt", action="store_true", help="print only the completion")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="talk with a chat model in the terminal, answers printed as they come")
    _add_model_flags(p)
    p.add_argument("--system", help="system prompt")
    p.add_argument("--temperature", default=0.7, help="0 = greedy (default 0.7)")
    p.add_argument("--max-tokens", default=1024, help="longest answer, in tokens (default 1024)")
    p.add_argument("--seed", help="seed for reproducible answers")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("pull", help="download Llama 2 from the Hugging Face Hub, convert and quantize it")
    p.add_argument("name", help="llamav2-7b or llamav2-7b-chat (or any id, with --repo)")
    p.add_argument("--quant", default="q4_k_m", help="comma-separated quantization types (default q4_k_m)")
    p.add_argument("--repo", help="owner/name on the Hub (default: Meta's repo for the name)")
    p.add_argument("--revision", help="branch, tag or commit")
    p.add_argument("--gguf", help="owner/name:file.gguf: fetch a prebuilt GGUF instead (sha256-checked)")
    p.add_argument("--id", help="store id to save as (default: the name)")
    p.add_argument("--keep-download", action="store_true", help="keep the downloaded checkpoint after converting")
    p.add_argument("--force", action="store_true",
                   help="replace the whole model if the id holds another checkpoint (default: refuse)")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("convert", help="convert a local HF folder (or a Hub repo id) to quantized GGUF")
    p.add_argument("src")
    p.add_argument("--quant", default="q4_k_m",
                   help="comma-separated types, e.g. q4_k_m,q8_0; f16 and bf16 are unquantized (default q4_k_m)")
    p.add_argument("--out", help="write the GGUF files into this folder instead of the store")
    p.add_argument("--id", help="store id (default: from the folder name)")
    p.add_argument("--revision", help="with a repo id: branch, tag or commit")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--force", action="store_true",
                   help="replace the whole model if the id holds another checkpoint (default: refuse)")
    p.set_defaults(func=cmd_convert)

    sub.add_parser("list", help="models in the store").set_defaults(func=cmd_list)
    p = sub.add_parser("rm", help="remove a model from the store")
    p.add_argument("model")
    p.set_defaults(func=cmd_rm)
    p = sub.add_parser("verify", help="re-hash model files against their manifest")
    p.add_argument("model", nargs="?")
    p.set_defaults(func=cmd_verify)
    p = sub.add_parser("export", help="write a model (all its quant files, or ID:QUANT) to one .tar bundle")
    p.add_argument("model", help="store id, or id:quant for one file")
    p.add_argument("-o", "--output", help="bundle file, or - for stdout (default ./<id>.llamabox.tar)")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("import", help="add a model from a bundle made by `llamabox export` (every file sha256-checked)")
    p.add_argument("bundle", help="bundle file, or - for stdin")
    p.add_argument("--force", action="store_true",
                   help="replace the whole model if the id holds another checkpoint (default: refuse)")
    p.set_defaults(func=cmd_import)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except InvalidParameter as e:
        return _die(f"--{e.field.replace('_', '-')}: {e.message}" if e.field not in ("body", "model") else str(e), 2)
    except LlamaboxError as e:
        return _die(str(e))
    except KeyboardInterrupt:
        return _die("interrupted", 130)
    except OSError as e:
        return _die(f"{e.strerror or e}: {e.filename}" if e.filename else str(e))


if __name__ == "__main__":
    sys.exit(main())
