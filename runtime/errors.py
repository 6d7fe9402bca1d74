"""llamabox's error hierarchy.

Library code raises these; the edges (the HTTP handler, the CLI) translate them
into a status code or an exit line. Callers classify errors by type, never by
message text.
"""
from __future__ import annotations


class LlamaboxError(Exception):
    """Base class of every error llamabox raises on purpose."""


class InvalidParameter(LlamaboxError):
    """A request or CLI value is out of its allowed domain.

    `field` names the offending field so the edge can report it.
    """

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class ContextOverflow(InvalidParameter):
    """The prompt plus the requested new tokens do not fit in the context."""


class ModelNotFound(LlamaboxError):
    """No model with that id or path."""


class InvalidModelId(InvalidParameter):
    """A model id that is not a safe store name."""


class ModelLoadError(LlamaboxError):
    """A model file exists but could not be loaded (malformed GGUF, ...)."""


class LoadStopped(ModelLoadError):
    """A load was stopped on purpose (runtime.load's abort): the server is shutting down."""


class BackendError(LlamaboxError):
    """The llama.cpp build cannot do what was asked (GPU offload on a CPU build)."""


class QueueFull(LlamaboxError):
    """The generation queue is full; the caller should retry later."""

    def __init__(self, message: str, retry_after_s: int = 1):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ShuttingDown(QueueFull):
    """The runtime is closing and takes no more work."""


class WorkerDied(ShuttingDown):
    """The generation worker thread stopped on an unexpected error; the runtime takes no more work."""


class KVCacheFull(QueueFull):
    """llama.cpp found no free KV cells for a batch (llama_decode returned 1), even after the
    prefix cache was emptied: the request that did not fit is failed and can be retried."""


class ConversionError(LlamaboxError):
    """A checkpoint could not be converted to GGUF."""


class UnsupportedArchitecture(ConversionError):
    """The checkpoint is not a LlamaForCausalLM with a SentencePiece tokenizer."""


class QuantizeError(ConversionError):
    """llama.cpp's quantizer refused or failed."""


class DownloadError(LlamaboxError):
    """A download from the Hugging Face Hub failed."""


class GatedRepoError(DownloadError):
    """The repo is gated or private and the user has no access (401/403)."""


class IntegrityError(LlamaboxError):
    """A file's checksum or size does not match its manifest."""


class BundleError(LlamaboxError):
    """A model bundle (`llamabox import`) is not ours, is unsafe, is damaged, or does not match its manifest."""
