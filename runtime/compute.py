"""One OS thread that runs every llama_decode of several models.

Why: llama.cpp's CPU backend here is built with OpenMP, and OpenMP keeps one team of
threads per *calling* thread. When two threads call llama_decode (one worker per model),
there are two teams, more threads than cores, and libgomp then stops spin-waiting at its
barriers (it throttles spinning once threads outnumber CPUs): every decode slows down,
even while the other model sits idle. Measured on 2 cores with SmolLM2-135M
(bench/multi.py): one model alone 87 tok/s; the same with a second model loaded whose
worker had decoded once, 35 tok/s. Running every decode on this one thread keeps one team
(and serializes the models' steps, which a shared lock would do too, without the fix).

A single-model runtime does not need it: its scheduler's worker is the only caller.
"""
from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable

log = logging.getLogger(__name__)


class ComputeThread:
    """call(fn) runs fn on this thread and returns its result (or raises its exception)."""

    def __init__(self, name: str = "llamabox-compute"):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.error: BaseException | None = None   # set if the thread itself ever dies
        self._closing = threading.Lock()          # call() and close() exclude each other: nothing is
        self._closed = False                      # queued behind the stop marker, where no one runs it
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def call(self, fn: Callable[[], Any]) -> Any:
        f: Future = Future()
        with self._closing:
            if self._closed or self.error is not None or not self._thread.is_alive():
                raise RuntimeError(f"the compute thread stopped ({'closed' if self._closed else repr(self.error)})")
            self._jobs.put((fn, f))
        return f.result()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def _run(self) -> None:
        try:
            while True:
                item = self._jobs.get()
                if item is None:
                    return
                fn, f = item
                try:
                    f.set_result(fn())
                except BaseException as e:  # the caller's error goes back to the caller
                    f.set_exception(e)
        except BaseException as e:  # only a bug here: record it, the owner (the pool) reports it
            self.error = e
            log.critical("the compute thread stopped: %s", e, exc_info=e)
            with self._closing:  # no caller may wait on a job that will never run
                self._closed = True
            while True:
                try:
                    item = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    item[1].set_exception(RuntimeError(f"the compute thread stopped ({e!r})"))

    def close(self) -> None:
        with self._closing:
            self._closed = True
            self._jobs.put(None)
        self._thread.join(5)
