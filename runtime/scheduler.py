"""Continuous batching on one llama.cpp context, driven by one worker thread.

A llama.cpp context is not thread-safe, so every decode, memory edit and sample
happens on the worker thread below. Other threads only `submit()` jobs and wait
on a Future.

On a CPU a decode step is bound by memory bandwidth: it reads every weight once
whether it advances one sequence or eight. So:
  * num_return_sequences = n evaluates the prompt once (sequence s0), copies its
    KV cells to n-1 more sequences (llama_memory_seq_cp: in the unified KV cache
    that only tags cells, it copies nothing), and decodes all n together;
  * a job that arrives while others run joins the batch: its prompt is evaluated
    in chunks that ride in the same llama_decode as the running sequences' next
    tokens, at most `prefill_chunk` prompt tokens per step, so a long prompt never
    freezes them; several short prompts that arrive together share one step;
  * evaluated prompts are kept (runtime/prefix_cache.py: in the KV cache while a job
    shares them or nothing runs, in host memory otherwise), so a later prompt that
    starts with the same tokens copies them instead of recomputing.

Admission: at most n_parallel + queue_size requests are in the runtime at once
(running, evaluating their prompt, or waiting); the next submit() gets QueueFull.
The count does not depend on how far the worker has got, so it is exact.

KV budget: the context has n_ctx cells shared by all sequences. Each cache entry
a running job shares (pinned, so in the KV cache) counts its length; idle entries
do not, as a starting job parks them first. A job reserves prompt + n * max_length
cells, less the prompt cells it shares with a cache entry, plus that entry's
length when no running job shares it yet. If llama.cpp still finds no slot (llama_decode returns 1,
e.g. after fragmentation), that is back-pressure, not a failure: the worker puts a
prompt being evaluated back in line, and only then fails the youngest running
request with KVCacheFull (a 503).

The worker's owner: if the worker thread ever stops on an unexpected error,
`dead` says why, every waiting request fails at once, and submit() refuses new
work with WorkerDied instead of letting callers wait out their timeout.
"""
from __future__ import annotations

import codecs
import collections
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

from .errors import InvalidParameter, KVCacheFull, QueueFull, ShuttingDown, WorkerDied
from .model import MAX_SEED, LlamaModel, Sampler
from .params import Completion, GenerationParams, Result
from .prefix_cache import CacheEntry, PrefixCache

log = logging.getLogger(__name__)

# on_text(sequence_index, text_delta): called on the worker thread as text becomes final.
TextCallback = Callable[[int, str], None]

DEFAULT_PREFILL_CHUNK = 64  # prompt tokens per step while other sequences generate (see README "Concurrency")


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
    cursor: int = 0                   # prompt tokens evaluated (or reused) so far
    reused: int = 0                   # prompt tokens copied from the prefix cache
    # monotonic seconds, for metrics: queued, first token sampled, future resolved
    submitted_at: float = 0.0
    first_token_at: float | None = None
    finished_at: float | None = None

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


def _cancel(future: Future) -> None:
    """Cancel a job's future and wake everything that waits on it: Future.cancel() alone leaves
    concurrent.futures.wait() callers asleep (they are notified by set_running_or_notify_cancel)."""
    if future.cancel():
        future.set_running_or_notify_cancel()


class Scheduler:
    def __init__(self, model: LlamaModel, n_parallel: int, n_cache: int, queue_size: int, min_cached_prompt: int = 32,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK, compute: Callable[[Callable[[], None]], None] | None = None):
        assert n_parallel + n_cache <= model.config.n_seq_max
        assert n_parallel < model.config.n_batch, "a decode step must fit every running sequence plus a prompt chunk"
        self.model = model
        self.n_parallel = n_parallel          # sequences decoded together at most
        self.capacity = n_parallel + queue_size  # requests admitted at once (running or waiting)
        self.min_cached_prompt = min_cached_prompt  # shorter prompts are not worth a cache slot
        self.prefill_chunk = max(1, prefill_chunk)
        # Runs each llama_decode: directly on this worker, or, when several models share the process,
        # on one shared thread (runtime/compute.py says why: OpenMP keeps a thread team per caller).
        self._compute = compute or (lambda fn: fn())
        self._queue: queue.SimpleQueue[Job] = queue.SimpleQueue()
        self._waiting: collections.deque[Job] = collections.deque()  # taken from the queue, waiting for room
        self._free_ids = list(range(n_parallel))
        # Host copies of parked entries take at most as many tokens as the context has cells.
        self.cache = PrefixCache(model, list(range(n_parallel, n_parallel + n_cache)), max_tokens=model.n_ctx,
                                 min_restore=min_cached_prompt)
        self._active: list[_Seq] = []        # sequences generating
        self._prefill: list[Job] = []        # admitted jobs whose prompts are being evaluated, oldest first
        self._jobs: dict[int, tuple[Job, list[_Seq]]] = {}  # id(job) -> (job, its sequences)
        self._reserved = 0
        # Admission: _lock guards _inflight, _accepting and the put into _queue, so that a submit
        # can never slip in after the worker's final drain.
        self._lock = threading.Lock()
        self._inflight = 0
        self._accepting = True
        self.dead: BaseException | None = None  # why the worker stopped, if it stopped on an error
        # Counters for tests and benchmarks. The worker writes them, except jobs_cancelled, which
        # submit() also bumps when it purges cancelled waiting jobs: that goes through _count_cancelled.
        self._stats_lock = threading.Lock()
        self.stats = {"jobs_submitted": 0, "prompt_tokens_evaluated": 0, "prompt_tokens_reused": 0, "jobs_cancelled": 0, "tokens_generated": 0,
                      "kv_full_retries": 0, "prefix_cache_hits": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="llamabox-worker", daemon=True)
        self._thread.start()

    # --- any thread --------------------------------------------------------------

    def submit(self, job: Job) -> Job:
        with self._lock:
            self._check_accepting()
            if self._inflight >= self.capacity:
                purged = self._purge_cancelled()
            else:
                purged = []
        for j in purged:  # outside the lock: the done-callbacks take it
            self._count_cancelled()
            _cancel(j.future)
        with self._lock:
            self._check_accepting()
            if self._inflight >= self.capacity:
                raise QueueFull(f"the server is at capacity ({self.capacity} requests running or waiting); retry shortly")
            self._inflight += 1
            self.stats["jobs_submitted"] += 1  # under _lock: submit() runs on many threads
            job.submitted_at = time.monotonic()
            job.future.add_done_callback(self._release)
            self._queue.put(job)
        return job

    def _check_accepting(self) -> None:
        if self.dead is not None:
            raise WorkerDied(f"the generation worker stopped on an error ({type(self.dead).__name__}: {self.dead}); "
                             "restart the server")
        if not self._accepting or self._stop.is_set():
            raise ShuttingDown("the runtime is shutting down")

    def _purge_cancelled(self) -> list[Job]:
        """Take the queued jobs whose clients gave up out of the queue (caller holds _lock)."""
        kept, dropped = [], []
        while True:
            try:
                j = self._queue.get_nowait()
            except queue.Empty:
                break
            (dropped if j.cancelled.is_set() else kept).append(j)
        for j in kept:
            self._queue.put(j)
        return dropped

    def _release(self, _future: Future) -> None:
        with self._lock:
            self._inflight -= 1

    def _count_cancelled(self) -> None:
        with self._stats_lock:  # read-modify-write from two threads would lose counts
            self.stats["jobs_cancelled"] += 1

    def close(self) -> None:
        """Stop the worker (after the decode in flight) and fail whatever was still waiting."""
        self._stop.set()
        self._thread.join()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.dead is None

    @property
    def inflight(self) -> int:
        return self._inflight

    def gauges(self) -> dict[str, int]:
        """A snapshot for /metrics (read from another thread: each value is one read, fine for gauges)."""
        return {"waiting": max(0, self._inflight - len(self._jobs)), "active_sequences": len(self._active),
                "prefilling": len(self._prefill), "kv_cells_reserved": self._reserved + self.cache.resident_cells(),
                "kv_cells_total": self.model.n_ctx, "cache_entries": len(self.cache.entries)}

    # --- worker thread -----------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    self._admit()
                    if self._active or self._prefill:
                        self._step()
                except Exception as e:  # a failed decode: fail what was running, keep serving
                    log.exception("generation step failed")
                    self._fail_all(e)
        except BaseException as e:  # anything that escapes the loop kills the worker: say so, loudly
            self.dead = e
            log.critical("the generation worker stopped: %s: %s; failing all requests", type(e).__name__, e, exc_info=e)
        finally:
            self._drain()

    def _drain(self) -> None:
        """Fail every job still here. Must not raise: nobody may wait forever on a job that will never run."""
        with self._lock:
            self._accepting = False  # from here on submit() refuses, so the queue only shrinks
        if self.dead is not None:
            down: BaseException = WorkerDied(f"the generation worker stopped on an error ({type(self.dead).__name__}); "
                                             "restart the server")
        else:
            down = ShuttingDown("the runtime shut down before this request finished")
        jobs = [job for job, _ in self._jobs.values()] + list(self._waiting)
        while True:
            try:
                jobs.append(self._queue.get_nowait())
            except queue.Empty:
                break
        for job in jobs:
            if not job.future.done():
                try:
                    job.future.set_exception(down)
                except Exception:  # InvalidStateError: a racing cancel() got there first
                    pass
        try:  # best effort: the model may be what broke
            for job in list(j for j, _ in self._jobs.values()):
                self._finish_job(job)
        except Exception:
            log.exception("freeing sequences after the worker stopped failed")

    def _admit(self) -> None:
        while True:
            if not self._waiting:
                try:
                    busy = self._active or self._prefill
                    self._waiting.append(self._queue.get_nowait() if busy else self._queue.get(timeout=0.05))
                except queue.Empty:
                    return
            job = self._waiting[0]
            if job.cancelled.is_set():
                self._waiting.popleft()
                self._count_cancelled()
                _cancel(job.future)
                continue
            plan = self._plan(job)
            if plan is None:
                return
            self._waiting.popleft()
            try:
                self._begin(job, *plan)
            except Exception as e:  # this request's own problem (its sampler, say): fail it alone
                log.exception("starting a request failed")
                self._finish_job(job, error=e)

    def _plan(self, job: Job) -> tuple[CacheEntry | None, int] | None:
        """None if the job has to wait; else the cache entry it will share (or None) and how many
        of its prompt tokens that entry gives. Cells: what running jobs reserve, plus entries in
        the KV cache, plus this job's cells less the shared ones, plus a parked entry's length."""
        if len(self._free_ids) < job.params.num_return_sequences:
            return None
        used = self._reserved + self.cache.pinned_cells()  # idle entries are parked when the job starts
        best, shared = self.cache.best(job.tokens)
        if best is not None and used + job.cells_needed - shared + self.cache.pin_cells(best) <= self.model.n_ctx:
            return best, shared
        if used + job.cells_needed <= self.model.n_ctx:
            return None, 0  # no room to bring a parked prefix back: evaluate the whole prompt
        return None

    def _begin(self, job: Job, best: CacheEntry | None, start: int) -> None:
        """Give an admitted job its sequences and budget, copy its cached prefix, queue its prompt."""
        p = job.params
        samplers: list[Sampler] = []
        try:  # samplers first: one that fails must leave no sequence id taken
            for i in range(p.num_return_sequences):
                samplers.append(self.model.new_sampler(p, (job.seed + i * 1_000_003) % (MAX_SEED + 1), job.tokens))
        except BaseException:
            for sm in samplers:
                sm.free()
            raise
        seqs = [_Seq(job, i, self._free_ids.pop(), sm, pos=len(job.tokens)) for i, sm in enumerate(samplers)]
        ids = [s.seq_id for s in seqs]
        self._jobs[id(job)] = (job, seqs)
        # Idle entries left resident while nothing ran would widen this job's attention: out they go,
        # except the one it shares (a follow-up turn then needs no copy at all).
        self.cache.park_idle(keep=best)
        # Reuse the longest cached prefix: all of it when an entry is this very prompt (its stored
        # logits give the first token), else all but the last token, evaluated for logits.
        if best is not None and not self.cache.share(best, ids[0], start):
            start = 0  # llama.cpp found no cells to put the parked prefix back
        if start > 0:
            job.pinned.append(best)
        job.reserved = job.cells_needed - start
        self._reserved += job.reserved
        job.cursor = job.reused = start
        log.debug("prompt of %d tokens, %d reused from the prefix cache", len(job.tokens), start)
        self.stats["prompt_tokens_reused"] += start
        self.stats["prefix_cache_hits"] += start > 0
        if start == len(job.tokens):
            self._prompt_done(job, saved=best.logits)
        else:
            self._prefill.append(job)

    def _requeue(self, job: Job) -> None:
        """Undo _begin for a job whose prompt is still being evaluated, and put it first in line."""
        self._prefill.remove(job)
        self._release_job(job)
        self.stats["prompt_tokens_reused"] -= job.reused  # counted again when it restarts
        self.stats["prefix_cache_hits"] -= job.reused > 0
        job.cursor = job.reused = 0
        self._waiting.appendleft(job)

    def _step(self) -> None:
        """One llama_decode: every generating sequence's next token, plus chunks of waiting prompts."""
        for s in self._active:
            if s.job.cancelled.is_set():
                s.finish = "cancelled"
        self._retire()
        for job in [j for j in self._prefill if j.cancelled.is_set()]:
            self._finish_job(job)  # a long prompt is not worth finishing for nobody
        gen = self._active[: self.model.config.n_batch - 1]
        # Prompt chunks, oldest prompt first, several prompts per step when they fit: a burst of
        # short requests starts together in one decode, as llama-server starts its slots. Alone,
        # prompts fill the whole batch; beside running sequences, at most prefill_chunk tokens in
        # all ride along, so each running token waits for at most that many prompt tokens.
        budget = min(self.model.config.n_batch - len(gen), self.prefill_chunk) if gen else self.model.config.n_batch
        pres: list[tuple[Job, list[int]]] = []
        for job in self._prefill:
            if budget <= 0:
                break
            chunk = job.tokens[job.cursor : job.cursor + budget]
            pres.append((job, chunk))
            budget -= len(chunk)
        while True:
            entries = [(s.next_token, s.pos, s.seq_id, True) for s in gen]
            ends: list[tuple[Job, int]] = []  # prompts this decode completes, and their logits' index
            for job, chunk in pres:
                s0 = self._jobs[id(job)][1][0].seq_id
                last = job.cursor + len(chunk) == len(job.tokens)
                entries += [(t, job.cursor + k, s0, last and k == len(chunk) - 1) for k, t in enumerate(chunk)]
                if last:
                    ends.append((job, len(entries) - 1))
            if not entries:
                return
            try:
                self._compute(lambda: self.model.decode(entries))
                break
            except KVCacheFull as e:
                # Back-pressure, in order of least harm, one at a time: put the youngest prompt of
                # this step back in line (the oldest stays while nothing else runs), then fail the
                # youngest running request. (The prefix cache has no cells to give: an idle entry
                # is parked in host memory whenever a job runs.)
                self.stats["kv_full_retries"] += 1
                if len(pres) > 1 or (pres and gen):
                    job, _ = pres.pop()
                    log.info("no KV slot: prompt of %d tokens goes back in line", len(job.tokens))
                    self._requeue(job)
                    continue
                if pres:  # one prompt alone and still no room: retrying would loop forever
                    self._finish_job(pres[0][0], error=e)
                    return
                victim = gen[-1].job
                log.warning("no KV slot even with the prefix cache parked: failing one request of %d running", len(self._jobs))
                self._finish_job(victim, error=e)
                gen = [s for s in gen if s.job is not victim]
        for j, s in enumerate(gen):
            s.pos += 1
            self._accept(s, self.model.sample(s.sampler, j))
        for job, chunk in pres:
            job.cursor += len(chunk)
            self.stats["prompt_tokens_evaluated"] += len(chunk)
        for job, logits_index in ends:
            self._prompt_done(job, logits_index)
        self._retire()

    def _prompt_done(self, job: Job, logits_index: int = -1, saved: bytes | None = None) -> None:
        """The prompt is in s0's cells: copy them to the other sequences, cache them, sample the first
        tokens from the last decode's logits at logits_index, or from `saved` (a cache entry's) when
        the whole prompt came from the prefix cache."""
        seqs = self._jobs[id(job)][1]
        s0 = seqs[0].seq_id
        for s in seqs[1:]:
            self.model.seq_copy(s0, s.seq_id)
        if saved is None:
            self._prefill.remove(job)
            self._remember(job, s0, logits_index)
        for s in seqs:
            token = self.model.sample(s.sampler, logits_index) if saved is None else self.model.sample_saved(s.sampler, saved)
            self._accept(s, token)
        self._active.extend(s for s in seqs if s.finish is None)
        self._maybe_finish(job)

    def _remember(self, job: Job, s0: int, logits_index: int) -> None:
        """Keep this prompt's KV cells under a cache sequence id for later prefix reuse.

        The entry takes over the accounting of the job's own prompt cells (tokens[start:]),
        so remembering costs the budget only the `start` cells it shares with another entry.
        A prompt that adds fewer than min_cached_prompt tokens to a cached prefix (a question
        after a shared document) gets no entry of its own (its host copy would repeat the whole
        prefix): the entry it shares follows it instead (PrefixCache.follow), so the next
        question shares what this one had in common with it. A short prompt that shares nothing
        is kept only when it ran alone, and only in a free cache slot, never displacing an entry:
        asked again (the same question, a client's retry, a benchmark's loop), it is answered
        without evaluating anything. (Beside other requests, short prompts are mostly distinct, and
        keeping each one cost clients2/clients4 about 5% on the 1.1B in bench/peers.py.)
        """
        tokens = job.tokens
        own = len(tokens) - job.reused  # the cells this job evaluated itself
        if own < self.min_cached_prompt and job.reused:
            if self.cache.follow(job.pinned[0], tokens, s0, job.reused, logits_index):
                job.reserved -= own  # its own cells are the entry's now, counted by pinned_cells()
                self._reserved -= own
            return
        if own < self.min_cached_prompt and (len(self._jobs) > 1 or not self.cache.has_free_slot()):
            return
        if self.cache.holds(tokens):
            return
        if self._reserved - own + self.cache.pinned_cells() + len(tokens) > self.model.n_ctx:
            return
        entry = self.cache.add(tokens, s0, logits_index)
        if entry is None:
            return
        job.pinned.append(entry)
        job.reserved -= own
        self._reserved -= own

    def _accept(self, s: _Seq, token: int) -> None:
        """Take a freshly sampled token: end on EOS, stop string or length, else queue it for decoding."""
        p = s.job.params
        if s.job.first_token_at is None:
            s.job.first_token_at = time.monotonic()
        if s.sampler.grammar_dead_end:
            # The grammar allowed no token: the text is an unfinished prefix of what was asked for.
            # That is the request's failure, not an ordinary end ("stop" would claim it is complete).
            s.job.error = InvalidParameter("response_format", "generation reached a point where the grammar (from "
                                           "response_format) allows no token; the schema cannot be completed")
            s.finish = "eos"
        elif self.model.is_eog(token):
            s.finish = "eos"
        else:
            s.n_generated += 1
            self.stats["tokens_generated"] += 1
            before = len(s.text)
            s.text += s.decoder.decode(self.model.piece(token))
            s.next_token = token
            hit = self._find_stop(s, before)
            if hit >= 0:
                s.text = s.text[:hit]
                s.finish = "stop"
            elif s.n_generated >= p.max_length:
                s.finish = "length"
        if s.finish in ("eos", "length"):
            s.text += s.decoder.decode(b"", final=True)  # a dangling partial UTF-8 sequence becomes U+FFFD
        self._emit(s)

    @staticmethod
    def _find_stop(s: _Seq, before: int) -> int:
        """The first stop string that the text added since `before` completes (or -1). A match
        that ends in the new text starts at most len(stop) - 1 characters before it, however
        long the new token's text is (a single token can be 20+ spaces)."""
        stops = s.job.params.stop
        if not stops:
            return -1
        lo = max(0, before - max(len(x) for x in stops) + 1)
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
        entry = self._jobs.get(id(job))
        if entry is not None and all(s.finish is not None for s in entry[1]):
            self._finish_job(job)

    def _release_job(self, job: Job) -> list[_Seq]:
        """Free a job's sequences, samplers, budget and pins; returns its sequences."""
        entry = self._jobs.pop(id(job), None)
        if entry is None:
            return []
        _, seqs = entry
        for s in seqs:
            self.model.seq_remove(s.seq_id)
            s.sampler.free()
            self._free_ids.append(s.seq_id)
            if s in self._active:
                self._active.remove(s)
        self._reserved -= job.reserved
        job.reserved = 0
        # After the job's own cells are gone. The last job out parks the entry if others still run;
        # as the server goes idle it stays resident for the next turn of the same conversation.
        for e in job.pinned:
            self.cache.unpin(e, park=bool(self._jobs))
        job.pinned.clear()
        return seqs

    def _finish_job(self, job: Job, error: BaseException | None = None) -> None:
        if job in self._prefill:
            self._prefill.remove(job)
        seqs = self._release_job(job)
        if job.future.done():
            return
        job.finished_at = time.monotonic()
        if error is not None:
            job.future.set_exception(error)
        elif job.error is not None:
            job.future.set_exception(job.error)
        elif job.cancelled.is_set():
            self._count_cancelled()
            _cancel(job.future)
        else:
            n_prompt = len(job.tokens)
            job.future.set_result(Result([Completion(s.text, n_prompt, s.n_generated, s.finish) for s in seqs], seed=job.seed))

    def _fail_all(self, error: BaseException) -> None:
        self.cache.clear()  # first: nothing is parked from a KV cache that a failed decode left behind
        for job, _ in list(self._jobs.values()):
            self._finish_job(job, error=error)
        self.model.clear_memory()
