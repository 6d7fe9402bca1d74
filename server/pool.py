"""Several models in one server, loaded on demand within a memory budget.

Each model is an Entry: unloaded -> loading -> loaded (or failed), and back to
unloaded when it is evicted or idles past --keep-alive. Rules:
  * A request takes a lease on its model (acquire) and gives it back when its
    response closes (release), streams included. A model with a lease, or with
    requests queued or running in its scheduler, is never unloaded.
  * Concurrent requests for an unloaded model share one load; requests to models
    already loaded are served meanwhile (loads run outside the pool's lock). Loads
    run one at a time, so that each one's resident-memory delta is its own.
  * Before a load, the model's cost is estimated from its GGUF (weights + KV cache +
    compute buffers); after it, the measured RSS delta replaces the estimate. If the
    budget would be exceeded, idle models are unloaded, least recently used first.
    If nothing can be freed, the request gets a 503 saying what is loaded and what
    the model needs.
  * Where models are offloaded to a GPU (gpu_memory given), idle models are unloaded first
    until the GPU has the new model's estimate (+10%) free, so that it can be offloaded
    whole; if that cannot be done, the load offloads the layers that fit (server/cli.py
    fits the count) and the rest runs on the CPU: never a wait or a 503 for the GPU.
    --max-memory counts host memory: before a first load, the estimate's share of the
    layers that will not be offloaded; after it, the measured RSS delta.
  * A model that fails to load stays failed (its file will not mend itself): its
    requests get a 503 quoting the load error, and the other models keep serving.

Threads: every model has its own scheduler worker, but with several models all
their llama_decode calls run on one shared compute thread (runtime/compute.py), so
llama.cpp's OpenMP keeps a single thread team and the models take turns step by
step (README "Several models" has the measurements). The keep-alive reaper and the
compute thread are threads this pool owns; if either dies, `alive` says so.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from runtime.errors import LlamaboxError, LoadStopped, ModelNotFound, QueueFull

log = logging.getLogger(__name__)

GiB = 1 << 30


class ModelUnavailable(QueueFull):
    """The model cannot serve now: it failed to load, or there is no room to load it (503)."""


@dataclass(eq=False)
class Entry:
    model_id: str
    path: Path
    chat: bool | None = None          # the store's verdict; None: the GGUF decides
    quant: str = ""
    file_bytes: int = 0
    estimate_bytes: int = 0           # from the GGUF's shapes, before any load
    measured_bytes: int | None = None  # RSS delta of the last load
    n_layers: int | None = None        # layers llama.cpp can offload (blocks + output), read when first needed
    pinned: bool = False              # the default model and --preload ones: never unloaded for idling
    state: str = "unloaded"           # unloaded | loading | loaded | failed
    runtime: object | None = None
    error: str | None = None
    users: int = 0                    # leases: requests holding this model until their response closes
    last_used: float = 0.0
    load_seconds: float = 0.0
    done_loading: threading.Event = field(default_factory=threading.Event)

    @property
    def cost(self) -> int:
        return self.measured_bytes if self.measured_bytes is not None else self.estimate_bytes

    def layers(self) -> int:
        """Offloadable layers, from the GGUF's header (read once); 0 where it cannot be read."""
        if self.n_layers is None:
            self.n_layers = offloadable_layers(self.path)
        return self.n_layers

    def busy(self) -> bool:
        rt = self.runtime
        return self.users > 0 or (rt is not None and rt.scheduler.inflight > 0)


def proc_value_bytes(path: str, key: str) -> int | None:
    """A 'Key:  123 kB' line of a /proc file, in bytes; None where there is no such file or line."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    """This process's resident set (VmRSS), or 0 where /proc is missing."""
    return proc_value_bytes("/proc/self/status", "VmRSS") or 0


def available_memory() -> int:
    """MemAvailable from /proc/meminfo (bytes); falls back to total physical memory."""
    return proc_value_bytes("/proc/meminfo", "MemAvailable") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


DEFAULT_BUDGET_SHARE = 0.8  # --max-memory's default: this share of MemAvailable at start
GPU_HEADROOM = 1.1          # GPU memory a whole offload asks free: the estimate + 10%, since the
                            # CUDA/Metal context and the estimate's rounding are not in it


def gpu_fit(estimate_bytes: int, n_layers: int, free_bytes: int) -> int:
    """Layers to offload so that they fit in free_bytes: all n_layers when the estimate (+10%)
    fits, else as many as fit at an even share of it each (weights, KV cache and compute
    buffers all grow with the layer count), down to 0."""
    need = estimate_bytes * GPU_HEADROOM
    if n_layers <= 0 or need <= free_bytes:
        return max(n_layers, 0)
    return max(0, min(n_layers, int(free_bytes // (need / n_layers))))


def offloadable_layers(path: Path) -> int:
    """Layers llama.cpp can offload: the GGUF's block count (next-token-prediction blocks
    included) plus the output layer; 0 where the header cannot be read."""
    import gguf

    from .gguf_header import read_header

    try:
        h = read_header(path)
        n = h[gguf.Keys.LLM.BLOCK_COUNT.format(arch=h[gguf.Keys.General.ARCHITECTURE])]
    except (OSError, ValueError, KeyError, TypeError):
        return 0
    return n + 1 if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 0


def estimate_cost(path: Path, n_ctx: int, n_batch: int = 512, kv_type: str = "f16") -> int:
    """Bytes a model will take once loaded: weights (the file), the KV cache for n_ctx cells
    in kv_type (--kv-type), and compute buffers (logits and activations for one n_batch
    batch). Reads the GGUF's metadata only. A file we cannot read costs its size (the load
    will say why)."""
    import gguf

    from runtime.kv_types import KV_CACHE_TYPES

    from .gguf_header import read_header

    # (elements per block, bytes per block) of the cache's ggml type: f16 (1, 2), q8_0 (32, 34)
    block, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(KV_CACHE_TYPES[kv_type])]

    size = path.stat().st_size
    try:
        h = read_header(path)  # the header's scalars only: GGUFReader took 2-3.5 s of every load
        arch = h[gguf.Keys.General.ARCHITECTURE]

        def num(key: str) -> int:
            v = h[key.format(arch=arch)]
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{key.format(arch=arch)} is {v!r}")
            return v

        n_layer = num(gguf.Keys.LLM.BLOCK_COUNT)
        n_embd = num(gguf.Keys.LLM.EMBEDDING_LENGTH)
        n_head = num(gguf.Keys.Attention.HEAD_COUNT)
        n_head_kv = num(gguf.Keys.Attention.HEAD_COUNT_KV) if gguf.Keys.Attention.HEAD_COUNT_KV.format(arch=arch) in h else n_head
        n_ctx = n_ctx or min(num(gguf.Keys.LLM.CONTEXT_LENGTH), 4096)
        tok = h.get(gguf.Keys.Tokenizer.LIST)
        n_vocab = tok[1] if isinstance(tok, tuple) else 32000
    except (OSError, ValueError, KeyError, TypeError) as e:  # malformed metadata: the loader reports it properly
        log.debug("cannot read %s's shapes (%s); estimating its file size", path.name, e)
        return size
    kv = 2 * n_layer * n_ctx * (n_embd // n_head) * n_head_kv * block_bytes // block  # K and V
    # llama.cpp's CPU compute buffer for one n_batch batch, F32: activations (~16 vectors of
    # n_embd per token), one layer's attention scores (n_batch x n_ctx per head), logits for a
    # few outputs. An estimate: the load measures the real cost (RSS delta) and that replaces it.
    compute = 4 * (n_batch * n_embd * 16 + n_batch * n_ctx * n_head + 16 * n_vocab)
    return size + kv + compute


class ModelPool:
    def __init__(self, entries: list[Entry], loader: Callable[[Entry], object] | None, budget_bytes: int,
                 keep_alive_s: float | None = None, on_load: Callable[[str, float], None] | None = None,
                 on_unload: Callable[[str], None] | None = None, room_wait_s: float = 60.0, compute=None,
                 gpu_memory: Callable[[], tuple[int, int] | None] | None = None):
        if not entries:
            raise ValueError("a pool needs at least one model")
        self.entries = {e.model_id: e for e in entries}
        self.default_id = entries[0].model_id
        self.loader = loader
        self.budget_bytes = budget_bytes
        self.keep_alive_s = keep_alive_s
        self.room_wait_s = room_wait_s      # how long a load may wait for a busy model to go idle before 503
        self.compute = compute              # the shared decode thread (runtime/compute.py), owned here
        self.gpu_memory = gpu_memory        # (free, total) bytes on the GPU now, or None: models are offloaded
        self.on_load = on_load or (lambda _m, _s: None)
        self.on_unload = on_unload or (lambda _m: None)
        self._lock = threading.Condition()  # entries' states, leases, the budget; notified when one changes
        self._load_lock = threading.Lock()  # one load at a time, so RSS deltas are per model
        self._stop = threading.Event()
        self.reaper_error: BaseException | None = None
        self._reaper = None
        if keep_alive_s:
            self._reaper = threading.Thread(target=self._reap, name="llamabox-keep-alive", daemon=True)
            self._reaper.start()

    def watch(self, on_load: Callable[[str, float], None], on_unload: Callable[[str], None]) -> None:
        """Set the load/unload hooks, and report every model already loaded to on_load: exactly once
        each, even while a load finishes on another thread (serve starts loading before the app exists).
        A load reports through the hook it reads under the lock where it marks the model loaded."""
        with self._lock:
            self.on_load, self.on_unload = on_load, on_unload
            loaded = [(e.model_id, e.load_seconds) for e in self.entries.values() if e.runtime is not None]
        for model_id, seconds in loaded:
            on_load(model_id, seconds)

    @classmethod
    def single(cls, runtime, budget_bytes: int = 0) -> "ModelPool":
        """One model that is already loaded (tests, and create_app(settings, runtime))."""
        e = Entry(runtime.info.model_id, Path(runtime.info.path), pinned=True, state="loaded", runtime=runtime,
                  load_seconds=runtime.info.load_seconds)
        e.done_loading.set()
        return cls([e], None, budget_bytes or 1 << 62)

    # --- requests ---------------------------------------------------------------------

    def acquire(self, model_id: str | None) -> object:
        """The loaded runtime of model_id (None: the default), with a lease; loads it if needed.
        Raises ModelNotFound (404), ModelUnavailable (503)."""
        model_id = model_id or self.default_id
        deadline = time.monotonic() + self.room_wait_s
        with self._lock:
            e = self.entries.get(model_id)
            if e is None:
                raise ModelNotFound(f"unknown model {model_id!r}; this server serves {', '.join(self.entries)}")
            while True:
                if e.state == "loaded":
                    e.users += 1
                    e.last_used = time.monotonic()
                    return e.runtime
                if e.state == "failed":
                    raise ModelUnavailable(f"the model {model_id} failed to load: {e.error}", retry_after_s=60)
                if e.state == "loading" and self.loader is None:  # filled from outside (the CLI's background load)
                    raise ModelUnavailable(f"the model {model_id or 'to serve'} is still loading; retry shortly", retry_after_s=5)
                if e.state == "loading":
                    self._lock.release()
                    try:
                        e.done_loading.wait(600)
                    finally:
                        self._lock.acquire()
                    continue
                if self.loader is None:  # unloaded, and nothing here can load it
                    raise ModelUnavailable(f"the model {model_id} is not loaded", retry_after_s=5)
                if not self._make_room(e, final=time.monotonic() >= deadline):
                    # Every model in the way is busy: wait for one to go idle (a release or a load
                    # notifies), then look again; past the deadline _make_room raises the 503.
                    self._lock.wait(min(1.0, max(0.0, deadline - time.monotonic())))
                    continue
                e.state, e.error = "loading", None
                e.done_loading.clear()
                break
        return self._load(e)

    def release(self, model_id: str) -> None:
        with self._lock:
            e = self.entries[model_id]
            e.users -= 1
            e.last_used = time.monotonic()
            self._lock.notify_all()

    # --- loading and unloading -----------------------------------------------------------

    def _make_room(self, e: Entry, final: bool) -> bool:
        """Unload idle models, least recently used first, until e fits (caller holds _lock).
        False when busy models are in the way (the caller waits); with final, a 503 instead."""
        def used() -> int:
            return sum(x.cost for x in self.entries.values() if x.state in ("loaded", "loading"))

        # The GPU first: idle models make way until e can be offloaded whole. Not while another load
        # is under way (the driver's free figure holds part of it), and not for a model that could
        # never fit whole: its load offloads what fits (server/cli.py), with no wait and no 503.
        while self.gpu_memory is not None and not any(x.state == "loading" and x is not e for x in self.entries.values()):
            mem = self.gpu_memory()
            need = int(e.estimate_bytes * GPU_HEADROOM)
            idle = [x for x in self.entries.values() if x.state == "loaded" and not x.busy()]
            if mem is None or need <= mem[0] or need > mem[1] or not idle:
                break
            self._unload(min(idle, key=lambda x: x.last_used), f"to make room on the GPU for {e.model_id}")
        cost = self._host_cost(e)
        while used() + cost > self.budget_bytes:
            idle = [x for x in self.entries.values() if x.state == "loaded" and not x.busy()]
            if not idle and (not final and any(x.state in ("loaded", "loading") for x in self.entries.values())
                             and cost <= self.budget_bytes):
                return False
            if not idle:
                loaded = ", ".join(f"{x.model_id} ({x.state}{', busy' if x.busy() else ''}, {x.cost / GiB:.2f} GiB)"
                                   for x in self.entries.values() if x.state in ("loaded", "loading")) or "nothing"
                raise ModelUnavailable(
                    f"no memory to load {e.model_id}: it needs about {cost / GiB:.2f} GiB and the budget is "
                    f"{self.budget_bytes / GiB:.2f} GiB; loaded: {loaded}. Retry when a model is idle, or raise --max-memory",
                    retry_after_s=5)
            self._unload(min(idle, key=lambda x: x.last_used), "to make room for " + e.model_id)
        return True

    def _host_cost(self, e: Entry) -> int:
        """Host memory e will take: its measured RSS delta once loaded; before that its estimate, less
        the share of the layers that the GPU's free memory will take (the input embeddings, about a
        layer's share, stay on the host)."""
        mem = self.gpu_memory() if self.gpu_memory is not None and e.measured_bytes is None else None
        if mem is None or not e.layers():
            return e.cost
        n = e.layers()
        k = gpu_fit(e.estimate_bytes, n, mem[0])
        return int(e.estimate_bytes * min(n, n - k + 1) / n)

    def _unload(self, e: Entry, why: str) -> None:
        """Caller holds _lock; e is idle, so closing its runtime waits for nothing."""
        rt, e.runtime, e.state = e.runtime, None, "unloaded"
        before = rss_bytes()
        rt.close()
        log.info("unloaded %s (%s): resident memory %.0f -> %.0f MiB", e.model_id, why, before / 2**20, rss_bytes() / 2**20)
        self.on_unload(e.model_id)

    def _load(self, e: Entry) -> object:
        """Load e outside the pool lock and return it with a lease (taken under the lock, so no
        eviction can slip in between); every waiter is woken whatever happens."""
        try:
            with self._load_lock:
                before = rss_bytes()
                t0 = time.monotonic()
                rt = self.loader(e)
                seconds = time.monotonic() - t0
                delta = rss_bytes() - before
        except BaseException as err:  # any failure stays with this model
            msg = str(err) if isinstance(err, LlamaboxError) else f"{type(err).__name__}: {err}"
            # A load stopped on purpose (a signal during it) is no failure to alarm anyone about.
            log.log(logging.INFO if isinstance(err, LoadStopped) else logging.ERROR, "loading %s failed: %s", e.model_id, msg)
            with self._lock:
                e.state, e.error = "failed", msg
                e.done_loading.set()
                self._lock.notify_all()
            raise ModelUnavailable(f"the model {e.model_id} failed to load: {msg}", retry_after_s=60) from None
        with self._lock:
            e.runtime, e.state, e.load_seconds = rt, "loaded", seconds
            e.measured_bytes = delta if delta > 0 else e.estimate_bytes
            e.users += 1
            e.last_used = time.monotonic()
            e.done_loading.set()
            self._lock.notify_all()
            on_load = self.on_load  # read with the state change: see watch()
        log.info("loaded %s in %.1fs: %.0f MiB resident (estimated %.0f MiB)", e.model_id, seconds, e.cost / 2**20,
                 e.estimate_bytes / 2**20)
        on_load(e.model_id, seconds)
        return rt

    def preload(self, model_ids: list[str]) -> None:
        """Load these now (the default model first); failures are recorded per model."""
        for m in model_ids:
            try:
                self.release(self.acquire(m).info.model_id)
            except ModelUnavailable:
                pass  # recorded in the entry; /health and /models say so

    def set_loaded(self, model_id: str, runtime, error: str | None = None) -> None:
        """For a single-model pool filled from outside (the CLI's background load, tests)."""
        with self._lock:
            e = self.entries[model_id]
            if runtime is not None:
                e.runtime, e.state, e.load_seconds = runtime, "loaded", runtime.info.load_seconds
            elif error is not None:
                e.state, e.error = "failed", error
            e.done_loading.set()
            on_load = self.on_load  # read with the state change: see watch()
        if runtime is not None:
            on_load(model_id, runtime.info.load_seconds)

    def _reap(self) -> None:
        try:
            while not self._stop.wait(1.0):
                now = time.monotonic()
                with self._lock:
                    for e in self.entries.values():
                        if e.state == "loaded" and not e.pinned and not e.busy() and now - e.last_used > self.keep_alive_s:
                            self._unload(e, f"idle for {self.keep_alive_s:g} s")
        except BaseException as err:  # the owner (this pool) records it; /livez reports it
            self.reaper_error = err
            log.critical("the keep-alive thread stopped: %s", err, exc_info=err)

    # --- views ------------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        """False when a loaded model's worker or the keep-alive thread has died."""
        if self.reaper_error is not None or (self.compute is not None and not self.compute.alive):
            return False
        return all(e.runtime.scheduler.dead is None for e in self.entries.values() if e.runtime is not None)

    def default(self) -> Entry:
        return self.entries[self.default_id]

    def loaded_runtimes(self) -> list:
        with self._lock:
            return [e.runtime for e in self.entries.values() if e.runtime is not None]

    def inflight(self) -> int:
        return sum(rt.scheduler.inflight for rt in self.loaded_runtimes())

    def describe(self) -> list[dict]:
        with self._lock:
            out = []
            for e in self.entries.values():
                d = {"id": e.model_id, "state": e.state, "quant": e.quant, "file_bytes": e.file_bytes,
                     "memory_bytes": e.measured_bytes if e.state == "loaded" else None,
                     "estimated_bytes": e.estimate_bytes, "endpoint": f"/{e.model_id}-webhook/predict"}
                if e.runtime is not None:
                    i = e.runtime.info
                    d.update({"chat": i.chat, "backend": i.backend, "placement": i.placement(), "gpu_layers": i.n_gpu_layers,
                              "n_ctx": i.n_ctx, "n_parallel": i.n_parallel})
                if e.error:
                    d["error"] = e.error
                out.append(d)
            return out

    def close(self) -> None:
        self._stop.set()
        if self._reaper is not None:
            self._reaper.join(5)
        with self._lock:
            for e in self.entries.values():
                if e.runtime is not None:
                    e.runtime.close()
                    e.runtime, e.state = None, "unloaded"
        if self.compute is not None:
            self.compute.close()
