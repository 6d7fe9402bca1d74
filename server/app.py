"""The `predict` HTTP contract, as a Flask app factory.

Every answer, success or error, is the hosted endpoint's envelope:
    {"run_id": uuid4, "run_time_ms": float, "message": str, "result": [...]}
Errors carry the reason in `message` and an empty `result`.
"""
from __future__ import annotations

import hmac
import json
import logging
import time
import uuid
from concurrent.futures import CancelledError
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException

from runtime.errors import InvalidParameter, LlamaboxError, QueueFull
from runtime.engine import Runtime

from .settings import Settings
from .validation import Limits, parse_json, parse_predict

log = logging.getLogger(__name__)

OK_MESSAGE = "Ran successfully"
POLL_S = 0.1  # how often a waiting request checks for a client that hung up


class ApiError(Exception):
    """An HTTP error with the envelope's message (raised inside handlers)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


@dataclass
class AppState:
    """What the app hangs off app.extensions['llamabox']."""
    settings: Settings
    runtime: Runtime | None = None      # None while the model is loading
    load_error: str | None = None       # set when loading failed
    started: float = field(default_factory=time.monotonic)


def state() -> AppState:
    from flask import current_app

    return current_app.extensions["llamabox"]


def envelope_dict(message: str, result: list | None = None, run_id: str | None = None, run_time_ms: float = 0.0) -> dict:
    """The hosted endpoint's envelope, for every answer, success or error."""
    return {"run_id": run_id or str(uuid.uuid4()), "run_time_ms": run_time_ms, "message": message,
            "result": result if result is not None else []}


def wsgi_error_body(status: int, message: str, path: str | None) -> tuple[str, bytes]:
    """The envelope for errors that waitress answers itself, before Flask sees the request."""
    return "application/json", json.dumps(envelope_dict(message)).encode()


def envelope(message: str, result: list | None = None, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    started = g.get("t0", time.perf_counter())
    resp = jsonify(envelope_dict(message, result, g.get("run_id"), (time.perf_counter() - started) * 1000.0))
    resp.status_code = status
    for k, v in (headers or {}).items():
        resp.headers[k] = v
    return resp


def _check_auth(settings: Settings) -> None:
    if not settings.api_keys:
        return
    header = request.headers.get("Authorization")
    if not header:
        raise ApiError(401, "missing Authorization header: send 'Authorization: <API_KEY>' or 'Authorization: Bearer <API_KEY>'",
                       {"WWW-Authenticate": "Bearer"})
    scheme, _, rest = header.partition(" ")
    given = rest.strip() if scheme.lower() == "bearer" else header.strip()
    ok = False
    for key in settings.api_keys:  # compare with every key, in constant time each
        ok |= hmac.compare_digest(given.encode(), key.encode())
    if not ok:
        raise ApiError(401, "invalid API key in the Authorization header", {"WWW-Authenticate": "Bearer"})


def _runtime() -> Runtime:
    st = state()
    if st.runtime is None:
        if st.load_error:
            raise ApiError(503, f"the model failed to load: {st.load_error}")
        raise ApiError(503, "the model is still loading; retry shortly", {"Retry-After": "5"})
    return st.runtime


def _predict(model_id: str | None):
    st = state()
    _check_auth(st.settings)
    rt = _runtime()
    if model_id is not None and model_id != rt.info.model_id:
        raise ApiError(404, f"unknown model {model_id!r}: this server serves {rt.info.model_id!r} (POST /{rt.info.model_id}-webhook/predict)")
    mimetype = request.mimetype
    if mimetype != "application/json":
        raise ApiError(415, f"Content-Type must be application/json, got {mimetype or 'none'!r}")
    body = request.get_data(cache=False)  # MAX_CONTENT_LENGTH turns an oversized body into 413 here
    prompt, params = parse_predict(parse_json(body), Limits(max_new_tokens=rt.info.n_ctx, max_sequences=rt.info.n_parallel))
    job = rt.submit(prompt, params)
    # waitress (with channel_request_lookahead) tells us when the client hangs up: then the
    # job is cancelled and the worker frees its sequences at its next step.
    gone = request.environ.get("waitress.client_disconnected", lambda: False)
    deadline = time.monotonic() + st.settings.request_timeout_s
    while True:
        if gone():  # checked before each wait, so a client already gone costs nothing
            job.cancel()
            log.info("run %s: client disconnected; generation cancelled", g.run_id)
            raise ApiError(499, "client closed the connection; generation cancelled")
        if time.monotonic() > deadline:
            job.cancel()
            raise ApiError(504, f"generation did not finish within {st.settings.request_timeout_s:g} s and was cancelled")
        try:
            result = job.future.result(timeout=POLL_S)
            break
        except FutureTimeout:
            continue
        except CancelledError:
            raise ApiError(503, "the request was cancelled", {"Retry-After": "1"}) from None
    return envelope(OK_MESSAGE, [{"generated_text": prompt + c.text} for c in result.completions])


def create_app(settings: Settings, runtime: Runtime | None = None) -> Flask:
    """The app. Pass runtime=None to serve /health (503) while a model loads; then call set_runtime()."""
    app = Flask("llamabox")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False
    app.extensions["llamabox"] = AppState(settings, runtime)

    @app.before_request
    def _start():
        g.t0 = time.perf_counter()
        g.run_id = str(uuid.uuid4())

    @app.post("/predict")
    def predict():
        return _predict(None)

    @app.post("/<hook>/predict")
    def predict_webhook(hook: str):
        if not hook.endswith("-webhook"):
            raise ApiError(404, f"no such endpoint /{hook}/predict; use /predict or /<model_id>-webhook/predict")
        return _predict(hook[: -len("-webhook")])

    @app.get("/health")
    def health():
        # Unauthenticated (load balancers and probes call it), so it says nothing but the state;
        # the reasons go to the log and, with the key, to /models.
        st = state()
        if st.runtime is None:
            return jsonify({"status": "failed" if st.load_error else "loading"}), 503
        if not st.runtime.ready:
            return jsonify({"status": "unavailable"}), 503
        return jsonify({"status": "ok"})

    @app.get("/models")
    def models():
        _check_auth(state().settings)
        rt = _runtime()
        i = rt.info
        return jsonify({"data": [{
            "id": i.model_id, "chat": i.chat, "backend": i.backend, "n_ctx": i.n_ctx,
            "n_parallel": i.n_parallel, "endpoint": f"/{i.model_id}-webhook/predict",
        }]})

    @app.errorhandler(ApiError)
    def _api_error(e: ApiError):
        return envelope(e.message, status=e.status, headers=e.headers)

    @app.errorhandler(InvalidParameter)
    def _invalid(e: InvalidParameter):
        return envelope(str(e), status=400)

    @app.errorhandler(QueueFull)
    def _full(e: QueueFull):
        return envelope(str(e), status=503, headers={"Retry-After": str(e.retry_after_s)})

    @app.errorhandler(HTTPException)
    def _http(e: HTTPException):
        headers = {k: v for k, v in e.get_headers() if k.lower() in ("allow", "retry-after")}
        msg = {
            404: f"no such endpoint {request.path}; POST /predict or /<model_id>-webhook/predict",
            405: f"{request.method} is not allowed on {request.path}; use {headers.get('Allow', 'POST')}",
            413: f"request body is larger than {settings.max_body_bytes} bytes",
        }.get(e.code or 500, e.description or e.name)
        return envelope(msg, status=e.code or 500, headers=headers)

    @app.errorhandler(LlamaboxError)
    @app.errorhandler(Exception)
    def _internal(e: Exception):
        run_id = g.get("run_id", "?")
        log.error("run %s failed: %s", run_id, e, exc_info=e)
        return envelope(f"internal error; the server log has the details under run_id {run_id}", status=500)

    return app


def make_server(app: Flask, settings: Settings):
    """The production HTTP server for `app` (server/wsgi.py says why and how); .run() serves, .close() stops."""
    from .wsgi import HttpServer

    return HttpServer(
        app, host=settings.host, port=settings.port, threads=settings.http_threads, max_body_bytes=settings.max_body_bytes,
        max_connections=settings.max_connections, idle_timeout_s=settings.idle_timeout_s,
        read_timeout_s=settings.read_timeout_s, error_body=wsgi_error_body,
    )


def set_runtime(app: Flask, runtime: Runtime | None, load_error: str | None = None) -> None:
    st: AppState = app.extensions["llamabox"]
    st.runtime, st.load_error = runtime, load_error
