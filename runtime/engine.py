"""The runtime's public face: load a GGUF, format prompts, generate.

    rt = load("model.gguf", n_ctx=4096, n_threads=8)
    result = rt.generate("Hey! How are you doing?", GenerationParams(max_length=50))
    rt.close()

A model is a chat model when it has a chat template: the GGUF's own (tokenizer.chat_template),
or one given to load(); chat=False turns chat formatting off. The file name decides nothing.
"""
from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .chat_template import ChatTemplate, eos_token, gguf_chat_template, token_text, tokenize_chat
from .errors import ContextOverflow, InvalidParameter, ModelLoadError, ShuttingDown
from .model import MAX_SEED, LlamaModel, LoadConfig, check_grammar
from .params import GenerationParams, Result
from .scheduler import DEFAULT_PREFILL_CHUNK, Job, Scheduler, TextCallback

log = logging.getLogger(__name__)

_NOT_CHAT = "its GGUF has no chat template, or chat formatting is off: a base model, or --no-chat"


@dataclass(frozen=True)
class RuntimeInfo:
    model_id: str
    path: str
    backend: str           # "CPU", "CUDA", "Metal", ...
    n_gpu_layers: int      # layers llama.cpp offloaded, at most n_layers; 0 on the CPU
    n_layers: int          # layers that could be offloaded: the GGUF's blocks (nextn ones too) + the output layer
    n_ctx: int             # KV cells shared by all running sequences
    n_ctx_train: int
    n_threads: int
    n_parallel: int        # sequences decoded together at most (also the num_return_sequences cap)
    kv_type: str           # KV cache element type ("f16", "q8_0", ...)
    chat: bool             # prompts are wrapped in the model's chat template
    chat_template_source: str  # where that template came from: "gguf", "file" (load's chat_template), "none"
    load_seconds: float

    def placement(self) -> str:
        """Where the model runs, for people: 'CPU', 'CUDA (23/23 layers)'."""
        return f"{self.backend} ({self.n_gpu_layers}/{self.n_layers} layers)" if self.n_gpu_layers else "CPU"


class Runtime:
    def __init__(self, model: LlamaModel, model_id: str, template: ChatTemplate | None, n_parallel: int, n_cache: int,
                 queue_size: int, load_started: float, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                 compute=None):
        """load_started: time.monotonic() when the load began; it ends once the scheduler runs."""
        self.model = model
        self.template = template
        self.chat = template is not None
        # Guards the model's lifetime: close() waits until no thread is tokenizing. Tokenizing
        # itself runs outside the lock (llama.cpp's vocabulary is read-only), so HTTP threads
        # never queue behind each other's long prompts.
        self._lock = threading.Condition()
        self._tokenizing = 0
        self._closed = False
        self.scheduler = Scheduler(model, n_parallel=n_parallel, n_cache=n_cache, queue_size=queue_size, prefill_chunk=prefill_chunk,
                                   compute=compute)
        self.info = RuntimeInfo(
            model_id=model_id, path=str(model.path), backend=model.backend, n_gpu_layers=model.gpu_layers, n_layers=model.n_layers,
            n_ctx=model.n_ctx, n_ctx_train=model.n_ctx_train, n_threads=model.n_threads, n_parallel=n_parallel,
            kv_type=model.config.kv_type,
            chat=self.chat, chat_template_source=template.origin if template else "none",
            load_seconds=time.monotonic() - load_started,
        )

    @contextmanager
    def _tokenizing_guard(self):
        with self._lock:
            if self._closed:
                raise ShuttingDown("the runtime is shut down")
            self._tokenizing += 1
        try:
            yield
        finally:
            with self._lock:
                self._tokenizing -= 1
                self._lock.notify_all()

    def _chat_ids(self, messages: list[dict], add_generation_prompt: bool) -> list[int]:
        """Raises InvalidParameter("messages", ...) when the template refuses the messages."""
        return tokenize_chat(self.model, self.template.segments(messages, add_generation_prompt))

    def prompt_tokens(self, prompt: str, params: GenerationParams) -> list[int]:
        """The prompt as the model sees it, checked against the context. Raises ContextOverflow.

        A chat model gets the prompt as one user turn (after params.system_prompt, if any) in its
        own template. Both are stripped and a blank system prompt is left out, as Meta's reference
        chat_completion and llamabox before templates did: for Llama 2 chat the ids are unchanged,
        <s>[INST] {prompt} [/INST].
        """
        with self._tokenizing_guard():
            if self.template is None:
                tokens = self.model.tokenize(prompt, add_bos=True)
            else:
                system = params.system_prompt.strip() if params.system_prompt is not None else ""
                messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt.strip()}]
                try:
                    tokens = self._chat_ids(messages, add_generation_prompt=True)
                except InvalidParameter as e:  # e.g. a template without a system role
                    raise InvalidParameter("system_prompt" if system else "prompt", e.message) from None
        self._check_fits(tokens, params)
        return tokens

    def chat_tokens(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """A conversation ([{"role": "system"|"user"|"assistant", "content": str}, ...]) as the model
        sees it, in its own chat template; text in the messages is never a control token.
        Raises InvalidParameter("messages", ...) when the model is not a chat model or its template
        refuses the messages, ContextOverflow("messages", ...) when they leave no room to generate."""
        if self.template is None:
            raise InvalidParameter("messages", f"{self.info.model_id} is not a chat model here ({_NOT_CHAT}); "
                                               "use completions, or serve it with --chat-template FILE")
        with self._tokenizing_guard():
            tokens = self._chat_ids(messages, add_generation_prompt)
        self._check_room(tokens, "messages")
        return tokens

    def raw_tokens(self, text: str) -> list[int]:
        """Plain text as the model sees it, never in a chat template: BOS (if the model wants it) and the
        text, whose control-token text stays text. Raises ContextOverflow("prompt", ...) when it leaves no room."""
        with self._tokenizing_guard():
            tokens = self.model.tokenize(text, add_bos=True)
        self._check_room(tokens, "prompt")
        return tokens

    def _check_room(self, tokens: list[int], field: str) -> None:
        if len(tokens) >= self.model.n_ctx:
            raise ContextOverflow(field, f"the prompt is {len(tokens)} tokens; the context holds {self.model.n_ctx} in all")

    def _check_fits(self, tokens: list[int], params: GenerationParams) -> None:
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

    def _check_params(self, params: GenerationParams) -> None:
        """What only the model can check, before the job reaches the worker (which must not be the
        first to find out: a bad grammar there would fail the request late and alone)."""
        if params.num_return_sequences > self.info.n_parallel:
            raise InvalidParameter("num_return_sequences", f"must be between 1 and {self.info.n_parallel}, got {params.num_return_sequences}")
        if params.grammar is not None:
            with self._tokenizing_guard():
                check_grammar(self.model, params.grammar)

    def submit(self, prompt: str, params: GenerationParams, on_text: TextCallback | None = None) -> Job:
        """Queue a request; returns its Job (a Future plus cancel()). Raises QueueFull, ContextOverflow."""
        self._check_params(params)
        if params.system_prompt is not None and not self.chat:
            raise InvalidParameter("system_prompt", f"{self.info.model_id} is not a chat model here ({_NOT_CHAT}); "
                                                    "system_prompt is for chat models")
        seed = params.seed if params.seed is not None else secrets.randbelow(MAX_SEED + 1)
        return self.scheduler.submit(Job(self.prompt_tokens(prompt, params), params, seed, on_text))

    def submit_tokens(self, tokens: list[int], params: GenerationParams, on_text: TextCallback | None = None) -> Job:
        """Like submit(), with the prompt already tokenized (chat_tokens, raw_tokens); params.system_prompt
        is not used. Raises InvalidParameter, ContextOverflow, QueueFull."""
        self._check_params(params)
        tokens = list(tokens)
        if not tokens:
            raise InvalidParameter("prompt", "is empty")
        if not all(isinstance(t, int) and 0 <= t < self.model.n_vocab for t in tokens):
            # llama.cpp aborts the process on a token id outside the vocabulary
            raise InvalidParameter("prompt", f"holds a token id outside the vocabulary (0..{self.model.n_vocab - 1})")
        self._check_fits(tokens, params)
        seed = params.seed if params.seed is not None else secrets.randbelow(MAX_SEED + 1)
        return self.scheduler.submit(Job(tokens, params, seed, on_text))

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
    n_gpu_layers: int | None = None,
    model_id: str | None = None,
    chat: bool | None = None,
    chat_template: str | None = None,
    n_parallel: int = 4,
    n_cache: int = 4,
    queue_size: int = 16,
    n_batch: int = 512,
    use_mmap: bool = False,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    compute=None,
    kv_type: str = "f16",
    abort=None,
    huge_pages: bool = True,
) -> Runtime:
    """Load a GGUF. n_ctx=0 takes the model's training context (at most 4096).

    chat_template: Jinja text (Hugging Face's chat template format) used instead of the GGUF's.
    chat=None: a chat model iff there is a template (chat_template, else the GGUF's);
    chat=True: the same, but no template is a ModelLoadError (the caller knows it is a chat model);
    chat=False: plain completion, whatever the GGUF holds (a base model whose repo ships a template).
    n_gpu_layers: layers to offload to Metal/CUDA, -1 all; None: all when the build sees a GPU, else none.
    kv_type: the KV cache's element type (runtime.kv_types.KV_CACHE_TYPES); q8_0 halves its memory.
    abort: a callable asked while the weights load; True stops the load with ModelLoadError.
    huge_pages: ask Linux for 2 MiB pages for the weights (runtime/hugepages.py).
    """
    path = Path(path)
    model_id = model_id or path.stem
    t0 = time.monotonic()
    config = LoadConfig(n_ctx=n_ctx, n_threads=n_threads, n_gpu_layers=n_gpu_layers, n_batch=n_batch, n_seq_max=n_parallel + n_cache,
                        use_mmap=use_mmap, kv_type=kv_type, huge_pages=huge_pages)
    model = LlamaModel(path, config, abort)
    try:
        template = _chat_template(model, chat, chat_template)
        rt = Runtime(model, model_id, template, n_parallel, n_cache, queue_size, t0, prefill_chunk,
                     compute)
    except BaseException:
        model.close()
        raise
    log.info("loaded %s (%s) on %s in %.2fs: n_ctx %d (%s KV), %d threads, %d parallel sequences, chat template: %s",
             model_id, path.name, rt.info.placement(), rt.info.load_seconds, rt.info.n_ctx, kv_type, rt.info.n_threads, n_parallel,
             rt.info.chat_template_source)
    return rt


def _chat_template(model: LlamaModel, chat: bool | None, source: str | None) -> ChatTemplate | None:
    if chat is False:
        if source is not None:
            raise InvalidParameter("chat_template", "a chat template and chat=False (--no-chat) contradict each other")
        return None
    bos, eos = token_text(model, model.bos), token_text(model, eos_token(model))
    if source is not None:
        return ChatTemplate(source, bos, eos, origin="file")
    source = gguf_chat_template(model)
    if source is None:
        if chat:
            raise ModelLoadError(f"{model.path.name} is a chat model but its GGUF has no chat template; "
                                 "give one with --chat-template FILE, or serve it as a base model with --no-chat")
        return None
    try:
        return ChatTemplate(source, bos, eos, origin="gguf")
    except InvalidParameter as e:
        raise ModelLoadError(f"the chat template in {model.path.name} does not compile ({e.message}); "
                             "give one with --chat-template FILE, or serve it as a base model with --no-chat") from None
