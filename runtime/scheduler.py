"""Continuous batching on one llama.cpp context, driven by one worker thread.

A llama.cpp context is not thread-safe, so every decode, memory edit and sample
happens on the worker thread below. Other threads only `submit()` jobs into a
bounded queue and wait on a Future.

On a CPU a decode step is bound by memory bandwidth: it reads every weight once
whether it advances one sequence or eight. So:
  * num_return_sequences = n evaluates the prompt once (sequence s0), copies its
    KV cells to n-1 more sequences (llama_memory_seq_cp: in the unified KV cache
    that only tags cells, it copies nothing), and decodes all n together;
  * a job that arrives while others run joins the batch at the next step;
  * evaluated prompts stay tagged with spare "cache" sequence ids, so a later
    prompt that starts with the same tokens copies them instead of recomputing.

KV budget: the context has n_ctx cells shared by all sequences. Each cache entry
counts its length; a job reserves prompt + n * max_length cells, less the prompt
cells it shares with cache entries (those entries are pinned while it runs, so
the cells stay accounted for). A decode never runs out of cells mid-generation.
"""
from __future__ import annotations

import codecs
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

from .errors import QueueFull, ShuttingDown
from .model import MAX_SEED, LlamaModel, Sampler
from .params import Completion, GenerationParams, Result

log = logging.getLogger(__name__)

# on_text(sequence_index, text_delta): called on the worker thread as text becomes final.
TextCallback = Callable[[int, str], None]


@dataclass
class Job:
    tokens: list[int]                 # the prompt, BOS and chat markup included
    params: GenerationParams
    seed: int
    on_text: TextCallback | None = None
    future: Future = field(default_factory=Future)
    cancelled: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None  # set by the worker when the job's own callback failed
    reserved: int = 0                 # KV cells this job holds in the budget (set by the worker)
    pinned: list = field(default_factory=list)  # cache entries whose cells this job shares

    @property
    def cells_needed(self) -> int:
        return len(self.tokens) + self.params.num_return_sequences * self.params.max_length

    def cancel(self) -> None:
        """Ask the worker to drop this job and free its sequences at its next step."""
        self.cancelled.set()


@dataclass(eq=False)
class _Seq:
    job: Job
    index: int              # which of the job's num_return_sequences
    seq_id: int             # llama.cpp sequence id
    sampler: Sampler
    pos: int                # position the next fed token takes
    next_token: int = -1    # sampled, not yet evaluated
    n_generated: int = 0
    text: str = ""
    emitted: int = 0        # chars of text handed to on_text
    finish: str | None = None
    decoder: codecs.IncrementalDecoder = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))


@dataclass(eq=False)
class _CacheEntry:
    seq_id: int
    tokens: list[int]
    last_used: float
    pins: int = 0           # running jobs sharing these cells: an entry is never evicted while pinned


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Scheduler:
    def __init__(self, model: LlamaModel, n_parallel: int, n_cache: int, queue_size: int, min_cached_prompt: int = 32):
        assert n_parallel + n_cache <= model.config.n_seq_max
        self.model = model
        self.n_parallel = n_parallel          # sequences decoded together at most
        self.min_cached_prompt = min_cached_prompt  # shorter prompts are not worth a cache slot
        self._queue: queue.Queue[Job] = queue.Queue(maxsize=queue_size)
        self._free_ids = list(range(n_parallel))
        self._free_cache_ids = list(range(n_parallel, n_parallel + n_cache))
        self._cache: list[_CacheEntry] = []
        self._active: list[_Seq] = []
        self._jobs: dict[int, tuple[Job, list[_Seq]]] = {}  # id(job) -> (job, its sequences)
        self._reserved = 0
        self._head: Job | None = None  # taken from the queue, waiting for room
        # Counters for tests and benchmarks. The worker thread writes them, except jobs_cancelled,
        # which submit() also bumps when it purges a full queue: that one goes through _count_cancelled.
        self._stats_lock = threading.Lock()
        self.stats = {"prompt_tokens_evaluated": 0, "prompt_tokens_reused": 0, "jobs_cancelled": 0, "tokens_generated": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="llamabox-worker", daemon=True)
        self._thread.start()

    # --- any thread --------------------------------------------------------------

    def submit(self, job: Job) -> Job:
        if self._stop.is_set():
            raise ShuttingDown("the runtime is shutting down")
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            # Jobs whose clients gave up still sit in the queue: drop them, then try once more.
            with self._queue.mutex:
                live = [j for j in self._queue.queue if not j.cancelled.is_set()]
                dropped = [j for j in self._queue.queue if j.cancelled.is_set()]
                self._queue.queue.clear()
                self._queue.queue.extend(live)
                self._queue.not_full.notify_all()
            for j in dropped:
                self._count_cancelled()
                j.future.cancel()
            try:
                self._queue.put_nowait(job)
            except queue.Full:
                raise QueueFull(f"the generation queue is full ({self._queue.maxsize} waiting); retry shortly") from None
        return job

    def _count_cancelled(self) -> None:
        with self._stats_lock:  # read-modify-write from two threads would lose counts
            self.stats["jobs_cancelled"] += 1

    def close(self) -> None:
        """Stop the worker (after the decode in flight) and fail whatever was still waiting."""
        self._stop.set()
        self._thread.join()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # --- worker thread -----------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._admit()
                if self._active:
                    self._step()
            except Exception as e:  # a failed decode: fail what was running, keep serving
                log.exception("generation step failed")
                self._fail_all(e)
        # Shutting down: nobody may wait forever on a job that will never run.
        down = ShuttingDown("the runtime shut down before this request finished")
        for job, _ in list(self._jobs.values()):
            self._finish_job(job, error=down)
        pending = [self._head] if self._head is not None else []
        self._head = None
        while True:
            try:
                pending.append(self._queue.get_nowait())
            except queue.Empty:
                break
        for job in pending:
            if not job.future.done():
                job.future.set_exception(down)

    def _admit(self) -> None:
        while True:
            if self._head is None:
                try:
                    self._head = self._queue.get(timeout=0.05) if not self._active else self._queue.get_nowait()
                except queue.Empty:
                    return
            job = self._head
            if job.cancelled.is_set():
                self._head = None
                self._count_cancelled()
                job.future.cancel()
                continue
            if not self._make_room(job):
                return
            self._head = None
            try:
                self._start(job)
            except Exception as e:
                log.exception("prompt evaluation failed")
                self._finish_job(job, error=e)

    def _cache_cells(self) -> int:
        return sum(len(e.tokens) for e in self._cache)

    def _best_prefix(self, tokens: list[int]) -> tuple[_CacheEntry | None, int]:
        """The cache entry sharing the longest prefix, and how many tokens can be reused
        (never the whole prompt: its last token is evaluated to get logits)."""
        best = max(self._cache, key=lambda e: _common_prefix(e.tokens, tokens), default=None)
        if best is None:
            return None, 0
        return best, min(_common_prefix(best.tokens, tokens), len(tokens) - 1)

    def _make_room(self, job: Job) -> bool:
        if len(self._free_ids) < job.params.num_return_sequences:
            return False
        best, shared = self._best_prefix(job.tokens)
        need = job.cells_needed - shared
        while self._reserved + self._cache_cells() + need > self.model.n_ctx:
            victims = [e for e in self._cache if e.pins == 0 and e is not best]
            if victims:
                self._evict(min(victims, key=lambda e: e.last_used))
            elif best is not None and best.pins == 0:
                self._evict(best)  # the prefix we hoped to reuse has to go after all
                best, need = None, job.cells_needed
            else:
                return False
        return True

    def _evict(self, entry: _CacheEntry) -> None:
        self.model.seq_remove(entry.seq_id)
        self._cache.remove(entry)
        self._free_cache_ids.append(entry.seq_id)

    def _start(self, job: Job) -> None:
        p = job.params
        tokens = job.tokens
        ids = [self._free_ids.pop() for _ in range(p.num_return_sequences)]
        seqs = [
            _Seq(job, i, sid, self.model.new_sampler(p, (job.seed + i * 1_000_003) % (MAX_SEED + 1), tokens), pos=len(tokens))
            for i, sid in enumerate(ids)
        ]
        self._jobs[id(job)] = (job, seqs)
        s0 = ids[0]

        # Reuse the longest cached prefix; at least one token is always evaluated for logits.
        best, start = self._best_prefix(tokens)
        job.reserved = job.cells_needed - start
        self._reserved += job.reserved
        if start > 0:
            self.model.seq_copy(best.seq_id, s0, 0, start)
            best.last_used = time.monotonic()
            best.pins += 1
            job.pinned.append(best)
        log.debug("prompt of %d tokens, %d reused from the prefix cache", len(tokens), start)
        self.stats["prompt_tokens_reused"] += start
        self.stats["prompt_tokens_evaluated"] += len(tokens) - start

        step = self.model.config.n_batch
        for c in range(start, len(tokens), step):
            if job.cancelled.is_set():  # a long prompt is not worth finishing for nobody
                self._finish_job(job)
                return
            if self._stop.is_set():
                self._finish_job(job, error=ShuttingDown("the runtime shut down during prompt evaluation"))
                return
            chunk = tokens[c : c + step]
            last = c + len(chunk) == len(tokens)
            self.model.decode([(t, c + k, s0, last and k == len(chunk) - 1) for k, t in enumerate(chunk)])
        logits_index = (len(tokens) - start - 1) % step
        for sid in ids[1:]:
            self.model.seq_copy(s0, sid)
        self._remember(job, start, s0)

        for s in seqs:
            self._accept(s, self.model.sample(s.sampler, logits_index))
        self._active.extend(s for s in seqs if s.finish is None)
        self._maybe_finish(job)

    def _remember(self, job: Job, start: int, s0: int) -> None:
        """Keep this prompt's KV cells under a cache sequence id for later prefix reuse.

        The entry takes over the accounting of the job's own prompt cells (tokens[start:]),
        so remembering costs the budget only the `start` cells it shares with another entry.
        """
        tokens = job.tokens
        if len(tokens) < self.min_cached_prompt or any(e.tokens == tokens for e in self._cache):
            return
        if not self._free_cache_ids:
            victims = [e for e in self._cache if e.pins == 0]
            if not victims:
                return
            self._evict(min(victims, key=lambda e: e.last_used))
        own = len(tokens) - start
        if self._reserved - own + self._cache_cells() + len(tokens) > self.model.n_ctx:
            return
        entry = _CacheEntry(self._free_cache_ids.pop(), list(tokens), time.monotonic(), pins=1)
        self.model.seq_copy(s0, entry.seq_id, 0, len(tokens))
        self._cache.append(entry)
        job.pinned.append(entry)
        job.reserved -= own
        self._reserved -= own

    def _step(self) -> None:
        for s in self._active:
            if s.job.cancelled.is_set():
                s.finish = "cancelled"
        self._retire()
        if not self._active:
            return
        batch = self._active[: self.model.batch_capacity]
        self.model.decode([(s.next_token, s.pos, s.seq_id, True) for s in batch])
        for j, s in enumerate(batch):
            s.pos += 1
            self._accept(s, self.model.sample(s.sampler, j))
        self._retire()

    def _accept(self, s: _Seq, token: int) -> None:
        """Take a freshly sampled token: end on EOS, stop string or length, else queue it for decoding."""
        p = s.job.params
        if self.model.is_eog(token):
            s.finish = "eos"
        else:
            s.n_generated += 1
            self.stats["tokens_generated"] += 1
            s.text += s.decoder.decode(self.model.piece(token))
            s.next_token = token
            hit = self._find_stop(s)
            if hit >= 0:
                s.text = s.text[:hit]
                s.finish = "stop"
            elif s.n_generated >= p.max_length:
                s.finish = "length"
        if s.finish in ("eos", "length"):
            s.text += s.decoder.decode(b"", final=True)  # a dangling partial UTF-8 sequence becomes U+FFFD
        self._emit(s)

    @staticmethod
    def _find_stop(s: _Seq) -> int:
        stops = s.job.params.stop
        if not stops:
            return -1
        # Only the tail can hold a new match: the last token added at most one piece.
        window = max(len(x) for x in stops) + 16
        lo = max(0, len(s.text) - window)
        hits = [i for i in (s.text.find(x, lo) for x in stops) if i >= 0]
        return min(hits) if hits else -1

    def _emit(self, s: _Seq) -> None:
        if s.job.on_text is None:
            return
        if s.finish is None:
            # Hold back what could still turn out to be the start of a stop string.
            hold = max((len(x) for x in s.job.params.stop), default=1) - 1
            upto = max(s.emitted, len(s.text) - hold)
        else:
            upto = len(s.text)
        if upto > s.emitted:
            try:
                s.job.on_text(s.index, s.text[s.emitted : upto])
            except Exception as e:  # the caller's callback failed: end its job, not everyone's
                log.warning("text callback failed (%s); cancelling its request", type(e).__name__)
                s.job.error = e
                s.job.cancel()
            s.emitted = upto

    def _retire(self) -> None:
        done = [s for s in self._active if s.finish is not None]
        if not done:
            return
        self._active = [s for s in self._active if s.finish is None]
        for job in {id(s.job): s.job for s in done}.values():
            self._maybe_finish(job)

    def _maybe_finish(self, job: Job) -> None:
        _, seqs = self._jobs[id(job)]
        if all(s.finish is not None for s in seqs):
            self._finish_job(job)

    def _finish_job(self, job: Job, error: BaseException | None = None) -> None:
        entry = self._jobs.pop(id(job), None)
        if entry is not None:
            _, seqs = entry
            for s in seqs:
                self.model.seq_remove(s.seq_id)
                s.sampler.free()
                self._free_ids.append(s.seq_id)
                if s in self._active:
                    self._active.remove(s)
            self._reserved -= job.reserved
            for e in job.pinned:
                e.pins -= 1
            job.pinned.clear()
        if job.future.done():
            return
        if error is not None:
            job.future.set_exception(error)
        elif job.error is not None:
            job.future.set_exception(job.error)
        elif job.cancelled.is_set():
            self._count_cancelled()
            job.future.cancel()
        else:
            n_prompt = len(job.tokens)
            job.future.set_result(
                Result([Completion(s.text, n_prompt, s.n_generated, s.finish) for s in entry[1]], seed=job.seed)
            )

    def _fail_all(self, error: BaseException) -> None:
        for job, _ in list(self._jobs.values()):
            self._finish_job(job, error=error)
        for e in list(self._cache):
            self._evict(e)
        self.model.clear_memory()
