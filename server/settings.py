"""Server settings: loaded once (by the CLI, from flags and environment) and passed down."""
from __future__ import annotations

import ipaddress
import math
import os
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import InvalidParameter
from runtime.kv_types import check_kv_type


@dataclass(frozen=True)
class Settings:
    models: tuple[str, ...] = ()      # store ids ("llamav2-7b-chat", "llamav2-7b-chat:q8_0") or GGUF paths; the first is
                                      # the default; () = llamabox-tiny
    max_memory_bytes: int = 0         # budget for loaded models; 0 = 80% of MemAvailable at start (server/pool.py)
    keep_alive_s: float | None = None  # unload a model idle this long (never the default or --preload ones); None = never
    preload: tuple[str, ...] = ()     # model ids loaded at start besides the default
    host: str = "127.0.0.1"
    port: int = 8080
    api_keys: tuple[str, ...] = ()    # accepted Authorization keys; empty = no auth (loopback only)
    insecure_no_auth: bool = False    # allow a non-loopback bind without a key
    threads: int = 0                  # llama.cpp threads; 0 = all cores
    gpu_layers: int | None = None     # layers offloaded to Metal/CUDA; -1 = all; None = all if there is a GPU
    mmap: bool = False                # map the GGUF instead of reading it (see runtime.model.LoadConfig.use_mmap)
    huge_pages: bool = True           # ask Linux for 2 MiB pages for the weights read (runtime/hugepages.py)
    n_ctx: int = 0                    # context (KV cells) shared by running sequences; 0 = the model's (<= 4096)
    kv_type: str = "f16"              # KV cache element type (runtime.kv_types.KV_CACHE_TYPES): f16, q8_0, q4_0, ...
    n_parallel: int = 4               # sequences decoded together; also caps num_return_sequences
    queue_size: int = 16              # requests waiting beyond the running batch before 503
    max_body_bytes: int = 1 << 20     # larger request bodies get 413
    request_timeout_s: float = 600.0  # a generation still running after this is cancelled (504)
    http_threads: int = 32            # waitress worker threads (requests being answered or waiting on a generation)
    max_connections: int = 1000       # open connections at most; beyond, new ones wait in the listen backlog
    idle_timeout_s: float = 15.0      # a connection with no request in progress, silent this long, is closed
    read_timeout_s: float = 30.0      # a request (headers + body) not fully received this long after its first byte is dropped
    prefill_chunk: int = 64           # prompt tokens evaluated per step while other sequences generate
    drain_timeout_s: float = 30.0     # on SIGTERM/SIGINT: how long requests in flight may take to finish
    metrics_public: bool = False      # /metrics without the API key (for a scraper on a private network)
    log_format: str = "text"          # access log lines: "text" (key=value) or "json"
    chat_template: str | None = None  # a Jinja chat template file used instead of the GGUF's (--chat-template)
    no_chat: bool = False             # never wrap prompts in a chat template, even if the model has one (--no-chat)
    ui: bool = True                   # serve the chat page at / (server/ui.py); --no-ui turns it off

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def check(self) -> None:
        """Refuse settings that would expose an unauthenticated server."""
        if not self.api_keys and not self.is_loopback and not self.insecure_no_auth:
            raise InvalidParameter(
                "host",
                f"binding {self.host} without an API key would expose the model to the network; set LLAMABOX_API_KEY "
                "or --api-key-file, bind 127.0.0.1, or pass --insecure-no-auth",
            )
        if not 0 <= self.port < 65536:
            raise InvalidParameter("port", f"must be between 0 (any free port) and 65535, got {self.port}")
        if self.threads < 0:
            raise InvalidParameter("threads", f"must be 0 (all cores) or positive, got {self.threads}")
        if self.gpu_layers is not None and self.gpu_layers < -1:
            raise InvalidParameter("gpu_layers", f"must be auto, -1 (all), 0 or positive, got {self.gpu_layers}")
        if not (math.isfinite(self.request_timeout_s) and self.request_timeout_s > 0):
            raise InvalidParameter("timeout", f"must be a positive number of seconds, got {self.request_timeout_s}")
        if self.n_ctx < 0:
            raise InvalidParameter("ctx", f"must be 0 (the model's) or positive, got {self.n_ctx}")
        check_kv_type(self.kv_type)
        if self.log_format not in ("text", "json"):
            raise InvalidParameter("log_format", f"must be text or json, got {self.log_format!r}")
        for name in ("idle_timeout_s", "read_timeout_s", "drain_timeout_s"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise InvalidParameter(name.removesuffix("_s").replace("_", "-"), f"must be a positive number of seconds, got {v}")
        for name in ("n_parallel", "queue_size", "max_body_bytes", "http_threads", "max_connections", "prefill_chunk"):
            if getattr(self, name) < 1:
                raise InvalidParameter(name, f"must be positive, got {getattr(self, name)}")


def read_api_keys(key_file: str | None, env: dict[str, str] | None = None) -> tuple[str, ...]:
    """Keys from LLAMABOX_API_KEY and/or a key file (one key per line, '#' comments)."""
    env = os.environ if env is None else env
    keys = []
    if env.get("LLAMABOX_API_KEY", "").strip():
        keys.append(env["LLAMABOX_API_KEY"].strip())
    if key_file:
        try:
            lines = Path(key_file).read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise InvalidParameter("api-key-file", f"cannot read {key_file}: {e.strerror}") from None
        file_keys = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
        if not file_keys:
            raise InvalidParameter("api-key-file", f"{key_file} holds no key")
        keys += file_keys
    for k in keys:
        if len(k) < 8 or any(c.isspace() for c in k):
            raise InvalidParameter("api-key", "keys must be at least 8 characters with no spaces")
    return tuple(keys)
