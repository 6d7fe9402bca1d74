"""One llama.cpp model and context, through llama-cpp-python's low-level C API.

This module, runtime/quantize.py and runtime/chat_template.py are the only code that imports llama_cpp.

Thread safety: tokenize/piece/is_eog only read the vocabulary and may be called
from any thread. Everything that touches the context (decode, memory, sampling)
belongs to the scheduler's single worker thread.
"""
from __future__ import annotations

import ctypes
import logging
import os
import weakref
from dataclasses import dataclass
from typing import Callable
from pathlib import Path

import llama_cpp
import numpy as np

from .backends import gpu_memory, load_backends
from .errors import BackendError, InvalidParameter, KVCacheFull, LoadStopped, ModelLoadError
from .hugepages import WeightPages
from .params import GenerationParams

log = logging.getLogger(__name__)
_cpp_log = logging.getLogger("llama_cpp")

# ggml log levels -> logging levels (ggml.h: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5).
_GGML_LEVELS = {0: logging.CRITICAL, 1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING, 4: logging.ERROR, 5: logging.DEBUG}


@llama_cpp.llama_log_callback
def _route_llama_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    # llama.cpp's chatter (INFO) goes to DEBUG so a served model stays quiet by default.
    msg = text.decode("utf-8", errors="replace").rstrip()
    if msg:
        _cpp_log.log(_GGML_LEVELS.get(level, logging.DEBUG), msg)


llama_cpp.llama_log_set(_route_llama_log, ctypes.c_void_p(0))
CPU_BACKEND = load_backends()  # before llama_backend_init: see runtime/backends.py
llama_cpp.llama_backend_init()

DEFAULT_CTX = 4096  # Llama 2's training context

# Seeds are uint32; 0xFFFFFFFF is LLAMA_DEFAULT_SEED, which llama.cpp turns into a random seed.
MAX_SEED = 0xFFFFFFFE


@dataclass(frozen=True)
class LoadConfig:
    n_ctx: int = 0             # KV cells shared by all sequences (kv_unified), in tokens; 0 = the
                               # model's training context, at most DEFAULT_CTX
    n_threads: int = 0         # 0 = every core llama.cpp's default picks (os.cpu_count())
    n_gpu_layers: int | None = None  # layers offloaded to Metal/CUDA; -1 = all; None = all when this
                               # build has a GPU to offload to (llama.cpp's own default), else none
    n_batch: int = 512         # prompt tokens per llama_decode call
    n_seq_max: int = 12        # llama.cpp sequence ids: parallel slots + prefix-cache slots
    use_mmap: bool = False     # map the file instead of reading it into memory. On the CPU,
                               # llama.cpp repacks Q4_0/Q4_K/IQ4_NL weights into its own buffers
                               # for its batched kernels, and a mapping keeps the file's pages
                               # resident beside that copy: 7B Q4_K_M measured 7,120 MiB RSS
                               # mapped, 4,222 MiB read, same decode step time. Mapping loads
                               # types that are not repacked faster and lets processes share them.
    kv_type: str = "f16"       # element type of the K and V cache (runtime/kv_types.py). Quantized types
                               # turn flash attention on (llama.cpp needs it for a quantized V cache)
    huge_pages: bool = True    # ask Linux for 2 MiB pages for the weights read into memory
                               # (runtime/hugepages.py); no effect with use_mmap, or where THP is not "madvise"


def backend_name() -> str:
    """'CUDA', 'Metal', 'Vulkan', ... when this llama.cpp build can offload, else 'CPU'."""
    if not llama_cpp.llama_supports_gpu_offload():
        return "CPU"
    info = llama_cpp.llama_print_system_info().decode("utf-8", errors="replace")
    for name in ("CUDA", "Metal", "Vulkan", "SYCL", "HIP", "ROCm", "OpenCL"):
        if name in info:
            return name
    return "GPU"


def check_gguf_header(path: Path) -> None:
    """Refuse files that are not GGUF before handing them to llama.cpp (cheap: 4 bytes)."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelLoadError(f"cannot read model file {path}: {e.strerror}") from e
    if magic != b"GGUF":
        raise ModelLoadError(f"{path} is not a GGUF file (magic {magic!r}, expected b'GGUF')")


class LlamaModel:
    """A loaded GGUF: weights, one llama.cpp context, and its vocabulary."""

    def __init__(self, path: str | os.PathLike[str], config: LoadConfig, abort: Callable[[], bool] | None = None):
        """abort: asked as llama.cpp loads each tensor; True stops the load (ModelLoadError), so a
        server that will not serve (a failed start, a signal) need not wait out a 7B read."""
        self.path = Path(path)
        self.config = config
        self.backend = backend_name()
        if config.n_gpu_layers not in (None, 0) and self.backend == "CPU":
            raise BackendError(
                f"--gpu-layers {config.n_gpu_layers} was asked, but this llama-cpp-python build is CPU-only, or sees "
                "no GPU (llama_supports_gpu_offload() is false). Use --gpu-layers 0, or reinstall llama-cpp-python "
                "with CMAKE_ARGS='-DGGML_CUDA=on' (or -DGGML_METAL=on)."
            )
        # None ("auto"): every layer when llama.cpp has a GPU to offload to (a GPU build can see none;
        # an RPC-only build offloads nothing by itself). The CLI fits a count to free GPU memory instead.
        gpu_layers = config.n_gpu_layers
        if gpu_layers is None:
            gpu_layers = -1 if self.backend != "CPU" and gpu_memory() is not None else 0
        # (imported here, not at the top of the module: that part belongs to backend loading)
        from .kv_types import KV_CACHE_TYPES, UNQUANTIZED, check_kv_type

        check_kv_type(config.kv_type)  # InvalidParameter("kv_type", ...) names the flag
        check_gguf_header(self.path)

        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = gpu_layers
        mparams.load_mode = llama_cpp.LLAMA_LOAD_MODE_MMAP if config.use_mmap else llama_cpp.LLAMA_LOAD_MODE_NONE
        # Not with offloading: the GPU driver maps host memory of its own while the load runs.
        pages = WeightPages() if config.huge_pages and not config.use_mmap and gpu_layers == 0 else None
        pages = pages if pages is not None and pages.active else None
        raised: list[BaseException] = []  # from the callback, which cannot raise into llama.cpp
        if abort is not None or pages is not None:
            def on_progress(_fraction: float, _user_data) -> bool:
                # Called before each tensor is read, the first time after every buffer is allocated.
                # llama.h: loading goes on while this returns true. An exception cannot cross the C
                # frames; it is kept, the load is stopped, and it is raised once the load returns.
                try:
                    if pages is not None:
                        pages.advise()
                    return abort is None or not abort()
                except BaseException as e:  # KeyboardInterrupt too: Ctrl-C during a load stops it
                    raised.append(e)
                    return False

            progress = llama_cpp.llama_progress_callback(on_progress)
            mparams.progress_callback = progress  # (the local keeps it alive until the load returns)
        self._model = llama_cpp.llama_model_load_from_file(str(self.path).encode(), mparams)
        if raised:
            if self._model:
                llama_cpp.llama_model_free(self._model)
            raise raised[0]
        if not self._model and abort is not None and abort():
            raise LoadStopped(f"loading {self.path} was stopped")
        if not self._model:
            why = "malformed or unsupported GGUF"
            if gpu_layers != 0:
                why += f", or too little {self.backend} memory for the offloaded layers (--gpu-layers to offload fewer)"
            raise ModelLoadError(f"llama.cpp could not load {self.path}: {why} (see the log)")
        self.huge_page_bytes = pages.advised if pages is not None else 0  # weights given MADV_HUGEPAGE
        if self.huge_page_bytes:
            log.info("asked for huge pages for %d MiB of %s's weights (THP %s)", self.huge_page_bytes >> 20, self.path.name,
                     pages.mode)
        elif pages is not None:
            log.debug("%s's weights are in memory this process had before the load: left on the pages they have",
                      self.path.name)
        self._ctx = None
        self._batch = None
        try:
            self._vocab = llama_cpp.llama_model_get_vocab(self._model)
            self.n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
            self.n_ctx_train = llama_cpp.llama_model_n_ctx_train(self._model)
            # What llama.cpp offloads (llama-model.cpp): the last n of the blocks (the GGUF's block count,
            # next-token-prediction blocks included), plus the output layer once n exceeds them; -1: all.
            n_offloadable = llama_cpp.llama_model_n_layer(self._model) + llama_cpp.llama_model_n_layer_nextn(self._model) + 1
            self.n_layers = n_offloadable
            self.gpu_layers = n_offloadable if gpu_layers < 0 else min(gpu_layers, n_offloadable)
            self.bos = llama_cpp.llama_vocab_bos(self._vocab)
            self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))

            cparams = llama_cpp.llama_context_default_params()
            cparams.n_ctx = config.n_ctx or min(self.n_ctx_train, DEFAULT_CTX)
            cparams.n_batch = config.n_batch
            cparams.n_ubatch = config.n_batch
            cparams.n_seq_max = config.n_seq_max
            cparams.kv_unified = True
            cparams.type_k = cparams.type_v = KV_CACHE_TYPES[config.kv_type]
            if config.kv_type not in UNQUANTIZED:
                # Asked for, not left to "auto": without flash attention a quantized V cache fails.
                cparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
            n_threads = config.n_threads or (os.cpu_count() or 1)
            cparams.n_threads = n_threads
            cparams.n_threads_batch = n_threads
            self._ctx = llama_cpp.llama_init_from_model(self._model, cparams)
            if not self._ctx:
                why = ""
                if config.kv_type not in UNQUANTIZED:
                    why = (f" with a {config.kv_type} KV cache (--kv-type; it needs flash attention and head sizes that are"
                           " a multiple of the type's block, 32; see the log)")
                elif self.gpu_layers:
                    why = f" (its KV cache may not fit in {self.backend} memory beside the offloaded layers; see the log)"
                raise ModelLoadError(f"llama.cpp could not create a context of {config.n_ctx} tokens for {self.path}{why}")
            self.n_ctx = llama_cpp.llama_n_ctx(self._ctx)
            self.n_threads = n_threads
            self._mem = llama_cpp.llama_get_memory(self._ctx)
            self.batch_capacity = max(config.n_batch, config.n_seq_max)
            self._batch = llama_cpp.llama_batch_init(self.batch_capacity, 0, 1)
        except BaseException:
            self.close()
            raise
        if self.n_ctx > self.n_ctx_train:
            log.warning("context %d is longer than the %d tokens %s was trained on", self.n_ctx, self.n_ctx_train, self.path.name)

    # --- vocabulary (any thread) -------------------------------------------------

    def tokenize(self, text: str, add_bos: bool, special: bool = False) -> list[int]:
        """Token ids of `text`. Control-token text ("</s>") becomes control tokens only with special=True,
        which is for a chat template's own markup (runtime/chat_template.py), never for user text."""
        data = text.encode("utf-8")
        n_max = len(data) + 2
        buf = (llama_cpp.llama_token * n_max)()
        n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buf, n_max, add_bos and self.add_bos, special)
        if n < 0:  # buffer too small: -n is the count needed
            n_max = -n
            buf = (llama_cpp.llama_token * n_max)()
            n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buf, n_max, add_bos and self.add_bos, special)
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        """The bytes one token stands for (SentencePiece's '▁' becomes a space; no lstrip)."""
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        return buf.raw[:n]

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    # --- context (worker thread only) --------------------------------------------

    def decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """Evaluate one batch. entries: (token, position, seq_id, want_logits); at most batch_capacity."""
        b = self._batch
        for i, (tok, pos, seq, logits) in enumerate(entries):
            b.token[i] = tok
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = logits
        b.n_tokens = len(entries)
        rc = llama_cpp.llama_decode(self._ctx, b)
        if rc == 1:
            # llama.h: "could not find a KV slot for the batch (try reducing the size of the batch
            # or increase the context)". Recoverable: the memory is as it was before the call.
            raise KVCacheFull(f"no free KV cells for a batch of {len(entries)} tokens", retry_after_s=1)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc} ({len(entries)} tokens)")

    def seq_copy(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None:
        llama_cpp.llama_memory_seq_cp(self._mem, src, dst, p0, p1)

    def seq_remove(self, seq: int, p0: int = -1, p1: int = -1) -> None:
        llama_cpp.llama_memory_seq_rm(self._mem, seq, p0, p1)

    def clear_memory(self) -> None:
        llama_cpp.llama_memory_clear(self._mem, True)

    def seq_pos_max(self, seq: int) -> int:
        """The highest position sequence `seq` holds in the KV cache; -1 if it holds no cells."""
        return llama_cpp.llama_memory_seq_pos_max(self._mem, seq)

    def seq_state(self, seq: int) -> bytearray:
        """A host copy of sequence `seq`'s KV cells (positions and K/V rows of every layer)."""
        n = llama_cpp.llama_state_seq_get_size(self._ctx, seq)
        buf = bytearray(n)
        got = llama_cpp.llama_state_seq_get_data(self._ctx, (ctypes.c_uint8 * n).from_buffer(buf), n, seq)
        if got != n:
            raise RuntimeError(f"llama_state_seq_get_data wrote {got} of {n} bytes for sequence {seq}")
        return buf

    def set_seq_state(self, seq: int, state: bytearray) -> bool:
        """Put a seq_state() copy back as sequence `seq` (in whichever cells are free); False if
        llama.cpp found no room for it (the KV cache is then as it was, less `seq`'s old cells)."""
        n = len(state)
        return llama_cpp.llama_state_seq_set_data(self._ctx, (ctypes.c_uint8 * n).from_buffer(state), n, seq) > 0

    def new_sampler(self, params: GenerationParams, seed: int, history: list[int]) -> "Sampler":
        return Sampler(self, params, seed, history)

    def sample(self, sampler: "Sampler", batch_index: int) -> int:
        """Sample (and accept) one token from the logits at batch_index of the last decode."""
        return llama_cpp.llama_sampler_sample(sampler.chain, self._ctx, batch_index)

    def logits_row(self, batch_index: int) -> bytes:
        """A copy of the logits row at batch_index of the last decode: n_vocab float32s (4 bytes each)."""
        return ctypes.string_at(llama_cpp.llama_get_logits_ith(self._ctx, batch_index), 4 * self.n_vocab)

    def sample_saved(self, sampler: "Sampler", row: bytes) -> int:
        """Sample (and accept) one token from a logits_row() copy, as sample() does from the last decode:
        llama_sampler_sample builds the same candidates (every token id in order, its logit, p 0),
        applies the chain and accepts the pick. Same row, same sampler state: same token."""
        if len(row) != 4 * self.n_vocab:
            raise ValueError(f"a logits row of {len(row)} bytes for a vocabulary of {self.n_vocab}")
        cur = np.zeros(self.n_vocab, dtype=_TOKEN_DATA)
        cur["id"] = np.arange(self.n_vocab, dtype=np.int32)
        cur["logit"] = np.frombuffer(row, dtype=np.float32)
        arr = llama_cpp.llama_token_data_array(cur.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token_data)),
                                               self.n_vocab, -1, False)
        llama_cpp.llama_sampler_apply(sampler.chain, ctypes.byref(arr))
        if not 0 <= arr.selected < arr.size:
            raise RuntimeError(f"the sampler chain selected candidate {arr.selected} of {arr.size}")
        token = arr.data[arr.selected].id
        llama_cpp.llama_sampler_accept(sampler.chain, token)
        return token

    def logits(self, batch_index: int) -> list[float]:
        """The raw logits row at batch_index of the last decode (tests compare them to a reference)."""
        row = llama_cpp.llama_get_logits_ith(self._ctx, batch_index)
        return row[: self.n_vocab]

    def close(self) -> None:
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            llama_cpp.llama_model_free(self._model)
            self._model = None


def _init_grammar(model: LlamaModel, grammar: str):
    """A llama.cpp grammar sampler for GBNF text (start rule "root"); raises InvalidParameter if it
    does not parse (llama.cpp returns NULL: syntax error, undefined rule, no root, left recursion)."""
    if not grammar.strip():
        raise InvalidParameter("response_format", "the grammar is empty")
    if "\0" in grammar:
        raise InvalidParameter("response_format", "the grammar contains a NUL character")
    try:
        text = grammar.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate
        raise InvalidParameter("response_format", f"the grammar is not valid Unicode: {e.reason}") from None
    smpl = llama_cpp.llama_sampler_init_grammar(model._vocab, text, b"root")
    if not smpl:  # llama.cpp printed the reason to stderr
        raise InvalidParameter("response_format", "llama.cpp could not parse the grammar (GBNF syntax error, "
                               "undefined rule, no 'root' rule, or left recursion)")
    return smpl


def check_grammar(model: LlamaModel, grammar: str | None) -> None:
    """Parse a grammar once and drop it: raises InvalidParameter("response_format", ...) if it is bad.
    Call it before submitting (any thread): the Sampler runs on the worker, which must not be the
    first to find out."""
    if grammar is not None:
        llama_cpp.llama_sampler_free(_init_grammar(model, grammar))


_GUARD_NAME = b"grammar-guard"  # lives as long as the module: the pointer the name callback returns
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])  # llama_token_data
assert _TOKEN_DATA.itemsize == ctypes.sizeof(llama_cpp.llama_token_data)

# UTF-8 lead bytes -> (continuation bytes needed, allowed range of the first continuation).
_UTF8_LEADS = {b: (1, 0x80, 0xBF) for b in range(0xC2, 0xE0)}
_UTF8_LEADS.update({b: (2, 0x80, 0xBF) for b in range(0xE1, 0xF0)})
_UTF8_LEADS.update({0xE0: (2, 0xA0, 0xBF), 0xED: (2, 0x80, 0x9F), 0xF0: (3, 0x90, 0xBF), 0xF4: (3, 0x80, 0x8F)})
_UTF8_LEADS.update({b: (3, 0x80, 0xBF) for b in range(0xF1, 0xF4)})


def _utf8_tail(data: bytes) -> bytes | None:
    """The incomplete last character of `data` (b"" if none), or None if `data` is not a prefix of
    valid UTF-8 (no overlong forms, surrogates or values past U+10FFFF)."""
    i, n = 0, len(data)
    while i < n:
        b = data[i]
        if b < 0x80:
            i += 1
            continue
        if b not in _UTF8_LEADS:
            return None
        need, lo, hi = _UTF8_LEADS[b]
        for k in range(1, need + 1):
            if i + k >= n:
                return data[i:]
            c = data[i + k]
            if not (lo <= c <= hi if k == 1 else 0x80 <= c <= 0xBF):
                return None
        i += need + 1
    return b""


_byte_tokens_cache: "weakref.WeakKeyDictionary[LlamaModel, dict[int, np.ndarray]]" = weakref.WeakKeyDictionary()


def _byte_tokens(model: LlamaModel) -> dict[int, np.ndarray]:
    """byte value (0x80-0xFF) -> ids of the byte-fallback tokens that stand for that byte alone.
    A vocabulary scan, once per model (about 60 ms for Llama 2's 32,000 tokens)."""
    table = _byte_tokens_cache.get(model)
    if table is None:
        found: dict[int, list[int]] = {}
        for t in range(model.n_vocab):
            p = model.piece(t)
            if len(p) == 1 and p[0] >= 0x80:
                found.setdefault(p[0], []).append(t)
        table = {b: np.array(ids, dtype=np.int32) for b, ids in found.items()}
        _byte_tokens_cache[model] = table
    return table


class _GrammarGuard:
    """llama.cpp's grammar sampler, wrapped in a Python sampler that mends two holes in it.

    1. A dead end aborts the process. When a grammar allows no token at all (it needs a character
       no token can produce, like NUL), every logit is -inf, the draw picks a forbidden token, and
       llama.cpp's grammar accept throws a C++ exception through the C API (std::terminate) or
       GGML_ABORTs on EOS. Here such a step allows only EOS instead, `dead_end` is set, and the
       grammar is no longer fed.
    2. llama.cpp's UTF-8 decoder takes any byte from 0xF8 up as a lead byte and does not refuse
       overlong forms, so byte-fallback tokens can spell what it reads as '"' (0xC0 0xA2,
       0xE0 0x80 0xA2, ...) and the grammar would close a JSON string that the text never closes.
       Here byte tokens that would not continue valid UTF-8 are masked before the draw.
    Costs two Python calls per token; the vocabulary work is numpy."""

    def __init__(self, model: LlamaModel, grammar: str):
        lc = llama_cpp
        self.model = model
        self.eos = llama_cpp.llama_vocab_eos(model._vocab)
        self.dead_end = False
        self.bytes = _byte_tokens(model)
        self.pending = b""  # the output's unfinished UTF-8 character
        self._masks: dict[bytes, np.ndarray] = {}  # pending -> byte-token ids it may not be followed by
        self.inner = _init_grammar(model, grammar)
        # The callbacks and the interface table must outlive the C sampler: they live on self,
        # which the Sampler keeps until it frees the chain (and with it this sampler).
        self._callbacks = (
            lc.llama_sampler_i_name(lambda smpl: _GUARD_NAME),
            lc.llama_sampler_i_accept(self._accept),
            lc.llama_sampler_i_apply(self._apply),
            lc.llama_sampler_i_free(self._free),
        )
        self._iface = lc.llama_sampler_i()
        self._iface.name, self._iface.accept, self._iface.apply, self._iface.free = self._callbacks
        self.smpl = lc.llama_sampler_init(ctypes.pointer(self._iface), None)

    def _invalid_bytes(self) -> np.ndarray:
        mask = self._masks.get(self.pending)
        if mask is None:
            bad = [ids for b, ids in self.bytes.items() if _utf8_tail(self.pending + bytes([b])) is None]
            mask = self._masks[self.pending] = np.concatenate(bad) if bad else np.zeros(0, dtype=np.int32)
        return mask

    def _apply(self, smpl, cur_p) -> None:
        arr = cur_p.contents
        if arr.size == 0:
            return
        raw = (ctypes.c_byte * (arr.size * _TOKEN_DATA.itemsize)).from_address(ctypes.addressof(arr.data.contents))
        cands = np.frombuffer(raw, dtype=_TOKEN_DATA)
        if not self.dead_end:
            llama_cpp.llama_sampler_apply(self.inner, cur_p)
            bad = self._invalid_bytes()
            ids = cands["id"]
            if len(ids) == self.model.n_vocab and np.array_equal(ids[bad], bad):  # the whole vocabulary, by id
                cands["logit"][bad] = -np.inf
            else:
                cands["logit"][np.isin(ids, bad)] = -np.inf
            if np.isfinite(cands["logit"]).any():
                return
            log.warning("the grammar allows no token here: ending the sequence")
            self.dead_end = True
        cands["logit"] = -np.inf
        cands["logit"][cands["id"] == self.eos] = 0.0
        if not np.isfinite(cands["logit"]).any():
            cands["logit"][0] = 0.0  # EOS not among the candidates: anything finite, never fed on

    def _accept(self, smpl, token: int) -> None:
        if self.dead_end:
            return
        llama_cpp.llama_sampler_accept(self.inner, token)
        if not self.model.is_eog(token):
            self.pending = _utf8_tail(self.pending + self.model.piece(token)) or b""

    def _free(self, smpl) -> None:
        if self.inner:
            llama_cpp.llama_sampler_free(self.inner)
            self.inner = None


class Sampler:
    """One llama.cpp sampler chain: one per sequence, each with its own seed.

    Chain order:
      1. grammar (params.grammar): disallowed tokens -> -inf (EOS only when the grammar is complete).
         It must come first so that nothing after it (the draw, argmax) can pick a token it forbids.
      2. repetition penalty (HF/CTRL; params.repetition_penalty): a penalties sampler with only
         penalty_repeat, window n_ctx, fed the prompt here, so prompt and output tokens count.
      3. presence/frequency penalties (OpenAI; params.presence_penalty, frequency_penalty): a second
         penalties sampler with only penalty_freq/penalty_present, window n_ctx, never fed the prompt:
         it counts generated tokens only (logit -= frequency * count + presence * (count > 0)).
      4. temperature, top-k, top-p, then a seeded draw; temperature 0 replaces these with argmax
         (over the tokens the grammar allows).
    Sampling (LlamaModel.sample -> llama_sampler_sample) applies the chain and accepts the sampled
    token into every member: grammar state and penalty counts advance together.
    Raises InvalidParameter if params.grammar does not parse; frees what it built first.
    """

    def __init__(self, model: LlamaModel, params: GenerationParams, seed: int, history: list[int]):
        lc = llama_cpp
        self._grammar: _GrammarGuard | None = None
        self.chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        try:
            self._build(model, params, seed, history)
        except BaseException:
            self.free()
            raise

    def _build(self, model: LlamaModel, params: GenerationParams, seed: int, history: list[int]) -> None:
        lc = llama_cpp
        if params.grammar is not None:
            guard = _GrammarGuard(model, params.grammar)
            self._grammar = guard  # keeps its callbacks alive as long as the chain
            lc.llama_sampler_chain_add(self.chain, guard.smpl)
        if params.repetition_penalty != 1.0:
            # The window is the whole context, and the prompt's tokens are fed in below,
            # so a token seen anywhere in prompt or output is penalised, as in HF.
            rep = lc.llama_sampler_init_penalties(model.n_vocab, model.n_ctx, params.repetition_penalty, 0.0, 0.0)
            # Fed to this sampler alone, not the chain: the grammar must not see the prompt.
            for tok in history:
                lc.llama_sampler_accept(rep, tok)
            lc.llama_sampler_chain_add(self.chain, rep)
        if params.presence_penalty != 0.0 or params.frequency_penalty != 0.0:
            lc.llama_sampler_chain_add(
                self.chain,
                lc.llama_sampler_init_penalties(model.n_vocab, model.n_ctx, 1.0, params.frequency_penalty, params.presence_penalty),
            )
        if params.temperature == 0.0:
            lc.llama_sampler_chain_add(self.chain, lc.llama_sampler_init_greedy())
            return
        lc.llama_sampler_chain_add(self.chain, lc.llama_sampler_init_temp(params.temperature))
        if params.top_k > 0:
            lc.llama_sampler_chain_add(self.chain, lc.llama_sampler_init_top_k(params.top_k))
        if 0.0 < params.top_p < 1.0:
            lc.llama_sampler_chain_add(self.chain, lc.llama_sampler_init_top_p(params.top_p, 1))
        lc.llama_sampler_chain_add(self.chain, lc.llama_sampler_init_dist(seed))

    @property
    def grammar_dead_end(self) -> bool:
        """True once the grammar allowed no token and the sequence was ended with EOS instead:
        its text is an incomplete prefix of the grammar's language."""
        return self._grammar is not None and self._grammar.dead_end

    def free(self) -> None:
        if self.chain:
            llama_cpp.llama_sampler_free(self.chain)
            self.chain = None
        self._grammar = None
