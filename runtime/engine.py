"""The runtime's public face: load a GGUF, format prompts, generate.

    rt = load("model.gguf", n_ctx=4096, n_threads=8)
    result = rt.generate("Hey! How are you doing?", GenerationParams(max_length=50))
    rt.close()
"""
from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path

from .chat import format_user_turn, is_chat_model
from .errors import ContextOverflow, InvalidParameter, ShuttingDown
from .model import MAX_SEED, LlamaModel, LoadConfig
from .params import GenerationParams, Result
from .scheduler import DEFAULT_PREFILL_CHUNK, Job, Scheduler, TextCallback

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RuntimeInfo:
    model_id: str
    path: str
    backend: str           # "CPU", "CUDA", "Metal", ...
    n_gpu_layers: int
    n_ctx: int             # KV cells shared by all running sequences
    n_ctx_train: int
    n_threads: int
    n_parallel: int        # sequences decoded together at most (also the num_return_sequences cap)
    chat: bool             # prompts are wrapped in Llama 2's [INST] format
    load_seconds: float


class Runtime:
    def __init__(self, model: LlamaModel, model_id: str, chat: bool, n_parallel: int, n_cache: int, queue_size: int, load_seconds: float,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK):
        self.model = model
        self.chat = chat
        # Guards the model's lifetime: close() waits until no thread is tokenizing. Tokenizing
        # itself runs outside the lock (llama.cpp's vocabulary is read-only), so HTTP threads
        # never queue behind each other's long prompts.
        self._lock = threading.Condition()
        self._tokenizing = 0
        self._closed = False
        self.scheduler = Scheduler(model, n_parallel=n_parallel, n_cache=n_cache, queue_size=queue_size, prefill_chunk=prefill_chunk)
        self.info = RuntimeInfo(
            model_id=model_id, path=str(model.path), backend=model.backend, n_gpu_layers=model.config.n_gpu_layers,
            n_ctx=model.n_ctx, n_ctx_train=model.n_ctx_train, n_threads=model.n_threads, n_parallel=n_parallel,
            chat=chat, load_seconds=load_seconds,
        )

    def prompt_tokens(self, prompt: str, params: GenerationParams) -> list[int]:
        """The prompt as the model sees it, checked against the context. Raises ContextOverflow."""
        with self._lock:
            if self._closed:
                raise ShuttingDown("the runtime is shut down")
            self._tokenizing += 1
        try:
            if self.chat:
                tokens = [self.model.bos] + self.model.tokenize(format_user_turn(prompt, params.system_prompt), add_bos=False)
            else:
                tokens = self.model.tokenize(prompt, add_bos=True)
        finally:
            with self._lock:
                self._tokenizing -= 1
                self._lock.notify_all()
        need = len(tokens) + params.num_return_sequences * params.max_length
        if need > self.model.n_ctx:
            room = self.model.n_ctx - len(tokens)
            if room < params.num_return_sequences:
                raise ContextOverflow("prompt", f"the prompt is {len(tokens)} tokens; the context holds {self.model.n_ctx} in all")
            raise ContextOverflow(
                "max_length",
                f"the prompt is {len(tokens)} tokens and max_length {params.max_length} x num_return_sequences "
                f"{params.num_return_sequences} asks for {need - len(tokens)} more, but the context holds {self.model.n_ctx}; "
                f"ask for at most {room // params.num_return_sequences} new tokens per sequence",
            )
        return tokens

    def submit(self, prompt: str, params: GenerationParams, on_text: TextCallback | None = None) -> Job:
        """Queue a request; returns its Job (a Future plus cancel()). Raises QueueFull, ContextOverflow."""
        if params.num_return_sequences > self.info.n_parallel:
            raise InvalidParameter("num_return_sequences", f"must be between 1 and {self.info.n_parallel}, got {params.num_return_sequences}")
        if params.system_prompt is not None and not self.chat:
            raise InvalidParameter("system_prompt", f"{self.info.model_id} is not a chat model; system_prompt is for -chat models")
        seed = params.seed if params.seed is not None else secrets.randbelow(MAX_SEED + 1)
        return self.scheduler.submit(Job(self.prompt_tokens(prompt, params), params, seed, on_text))

    def generate(self, prompt: str, params: GenerationParams, timeout: float | None = None, on_text: TextCallback | None = None) -> Result:
        job = self.submit(prompt, params, on_text)
        try:
            return job.future.result(timeout)
        except FutureTimeout:
            job.cancel()  # the worker frees its sequences at its next step
            raise
        except BaseException:
            job.cancel()
            raise

    @property
    def ready(self) -> bool:
        return self.scheduler.alive and not self._closed

    def close(self) -> None:
        """Finish the decode in flight, fail what waits, then free llama.cpp's memory. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.scheduler.close()
        with self._lock:
            self._lock.wait_for(lambda: self._tokenizing == 0)
            self.model.close()


def load(
    path: str | os.PathLike[str],
    n_ctx: int = 0,
    n_threads: int = 0,
    n_gpu_layers: int = 0,
    model_id: str | None = None,
    chat: bool | None = None,
    n_parallel: int = 4,
    n_cache: int = 4,
    queue_size: int = 16,
    n_batch: int = 512,
    use_mmap: bool = False,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
) -> Runtime:
    """Load a GGUF. n_ctx=0 takes the model's training context (at most 4096).
    chat=None decides from the model id ('*-chat*' models get Llama 2's [INST] format)."""
    path = Path(path)
    model_id = model_id or path.stem
    t0 = time.monotonic()
    config = LoadConfig(n_ctx=n_ctx, n_threads=n_threads, n_gpu_layers=n_gpu_layers, n_batch=n_batch, n_seq_max=n_parallel + n_cache,
                        use_mmap=use_mmap)
    model = LlamaModel(path, config)
    try:
        rt = Runtime(model, model_id, is_chat_model(model_id) if chat is None else chat, n_parallel, n_cache, queue_size,
                     time.monotonic() - t0, prefill_chunk)
    except BaseException:
        model.close()
        raise
    log.info("loaded %s (%s) on %s in %.2fs: n_ctx %d, %d threads, %d parallel sequences",
             model_id, path.name, rt.info.backend, rt.info.load_seconds, rt.info.n_ctx, rt.info.n_threads, n_parallel)
    return rt
