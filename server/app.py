"""The Flask app factory: state, auth, errors, and the blueprints.

Two contracts, each with its own error envelope, chosen by the route:
  * predict (server/predict.py): the hosted endpoint's
        {"run_id": uuid4, "run_time_ms": float, "message": str, "result": [...]}
  * /v1 (server/v1.py): OpenAI's
        {"error": {"message": str, "type": str, "param": str|null, "code": str|null}}
Errors raised anywhere (ApiError, InvalidParameter, QueueFull, werkzeug's, waitress's own)
are answered in the envelope of the route that was asked.
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
from pathlib import Path

from flask import Flask, Response, current_app, g, jsonify, request
from werkzeug.exceptions import HTTPException

from runtime import cpu_backend
from runtime.errors import InvalidParameter, LlamaboxError, ModelNotFound, QueueFull
from runtime.engine import Runtime
from runtime.params import Result

from .metrics import Metrics, RequestRecord
from .pool import Entry, ModelPool
from .settings import Settings

log = logging.getLogger(__name__)

POLL_S = 0.1  # how often a waiting request checks for a client that hung up

# OpenAI's error "type" by status (the SDK maps statuses to exception classes; type is informational).
_OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
                 405: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error",
                 499: "invalid_request_error", 503: "server_error", 504: "server_error"}


class ApiError(Exception):
    """An HTTP error raised inside a handler; `param` names the field, `code` is a short tag for /v1."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.headers, self.param, self.code = status, message, headers or {}, param, code


@dataclass
class AppState:
    """What the app hangs off app.extensions['llamabox']."""
    settings: Settings
    pool: ModelPool                     # the models; the first is the default (POST /predict)
    draining: bool = False              # shutting down: finish what is in flight, take nothing new
    started: float = field(default_factory=time.monotonic)
    metrics: "Metrics | None" = None

    @property
    def runtime(self) -> Runtime | None:
        """The default model's runtime, when it is loaded."""
        return self.pool.default().runtime

    @property
    def load_error(self) -> str | None:
        return self.pool.default().error


def state() -> AppState:
    return current_app.extensions["llamabox"]


# --- envelopes -----------------------------------------------------------------------

def envelope_dict(message: str, result: list | None = None, run_id: str | None = None, run_time_ms: float = 0.0) -> dict:
    """The hosted endpoint's envelope, for every predict answer, success or error."""
    return {"run_id": run_id or str(uuid.uuid4()), "run_time_ms": run_time_ms, "message": message,
            "result": result if result is not None else []}


def openai_error_dict(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": _OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
                      "param": param, "code": code}}


def is_v1(path: str | None) -> bool:
    return bool(path) and (path == "/v1" or path.startswith("/v1/"))


def wsgi_error_body(status: int, message: str, path: str | None) -> tuple[str, bytes]:
    """The envelope for errors that waitress answers itself, before Flask sees the request."""
    body = openai_error_dict(status, message) if is_v1(path) else envelope_dict(message)
    return "application/json", json.dumps(body).encode()


def envelope(message: str, result: list | None = None, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    started = g.get("t0", time.perf_counter())
    resp = jsonify(envelope_dict(message, result, g.get("run_id"), (time.perf_counter() - started) * 1000.0))
    resp.status_code = status
    for k, v in (headers or {}).items():
        resp.headers[k] = v
    return resp


def error_response(status: int, message: str, headers: dict[str, str] | None = None, param: str | None = None,
                   code: str | None = None) -> Response:
    """An error in the envelope of the route that was asked."""
    if not is_v1(request.path):
        return envelope(message, status=status, headers=headers)
    resp = jsonify(openai_error_dict(status, message, param, code))
    resp.status_code = status
    for k, v in (headers or {}).items():
        resp.headers[k] = v
    return resp


# --- what every handler needs -----------------------------------------------------------

def check_auth() -> None:
    keys = state().settings.api_keys
    if not keys:
        return
    header = request.headers.get("Authorization")
    if not header:
        raise ApiError(401, "missing Authorization header: send 'Authorization: <API_KEY>' or 'Authorization: Bearer <API_KEY>'",
                       {"WWW-Authenticate": "Bearer"}, code="invalid_api_key")
    scheme, _, rest = header.partition(" ")
    given = rest.strip() if scheme.lower() == "bearer" else header.strip()
    ok = False
    for key in keys:  # compare with every key, in constant time each
        ok |= hmac.compare_digest(given.encode(), key.encode())
    if not ok:
        raise ApiError(401, "invalid API key in the Authorization header", {"WWW-Authenticate": "Bearer"}, code="invalid_api_key")


def _authorized() -> bool:
    """Whether this request may see more than an anonymous probe: it passed the key, or the
    server has none (then it listens on loopback only, or was told --insecure-no-auth)."""
    try:
        check_auth()
    except ApiError:
        return False
    return True


def acquire(model_id: str | None = None) -> Runtime:
    """The runtime of model_id (None: the default model), loading it if needed; the lease is given
    back when the request's context closes (after the last byte of a stream).
    Raises ModelNotFound (404), ModelUnavailable (503)."""
    rt = state().pool.acquire(model_id)
    g.setdefault("leases", []).append(rt.info.model_id)
    g.rec.model = rt.info.model_id
    return rt


def json_body() -> bytes:
    """The request body, after the Content-Type check (MAX_CONTENT_LENGTH turns an oversized one into 413)."""
    if request.mimetype != "application/json":
        raise ApiError(415, f"Content-Type must be application/json, got {request.mimetype or 'none'!r}")
    return request.get_data(cache=False)


def wait_for(job) -> Result:
    """Wait for a job, cancelling it when the client hangs up or the request timeout passes."""
    settings = state().settings
    # waitress (with channel_request_lookahead) tells us when the client hangs up: then the
    # job is cancelled and the worker frees its sequences at its next step.
    gone = request.environ.get("waitress.client_disconnected", lambda: False)
    deadline = time.monotonic() + settings.request_timeout_s
    while True:
        if gone():  # checked before each wait, so a client already gone costs nothing
            job.cancel()
            log.info("run %s: client disconnected; generation cancelled", g.run_id)
            raise ApiError(499, "client closed the connection; generation cancelled")
        if time.monotonic() > deadline:
            job.cancel()
            raise ApiError(504, f"generation did not finish within {settings.request_timeout_s:g} s and was cancelled", code="timeout")
        try:
            return job.future.result(timeout=POLL_S)
        except FutureTimeout:
            continue
        except CancelledError:
            raise ApiError(503, "the request was cancelled", {"Retry-After": "1"}) from None


# --- the app ---------------------------------------------------------------------------

def create_app(settings: Settings, runtime: Runtime | None = None, pool: ModelPool | None = None) -> Flask:
    """The app, serving a pool of models, or one runtime. Pass neither to serve /health (503) while
    a single model loads elsewhere; then call set_runtime()."""
    from .predict import bp as predict_bp
    from .v1 import bp as v1_bp

    app = Flask("llamabox", static_folder=None)  # no <cwd>/static: the chat page's files come from server/ui.py
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False
    if pool is None:
        pool = ModelPool.single(runtime) if runtime is not None else _placeholder_pool()
    st = AppState(settings, pool)
    st.metrics = Metrics(lambda: st.pool.loaded_runtimes(), settings.log_format)
    pool.watch(st.metrics.model_loaded, st.metrics.model_unloaded)  # a model may finish loading meanwhile
    app.extensions["llamabox"] = st
    app.register_blueprint(predict_bp)
    app.register_blueprint(v1_bp)
    if settings.ui:
        from .ui import bp as ui_bp

        app.register_blueprint(ui_bp)  # the chat page at / (server/static/)

    @app.before_request
    def _start():
        g.t0 = time.perf_counter()
        g.run_id = str(uuid.uuid4())
        g.rec = RequestRecord(g.run_id, request.url_rule.rule if request.url_rule is not None else "unmatched")
        if state().draining and request.path not in ("/health", "/livez"):
            request.environ.get("llamabox.close_connection", lambda: None)()  # then close this connection
            # A request on a connection that was open before the drain began: nothing has started,
            # so another replica can take it (nginx retries our 503s; see deploy/nginx.conf).
            raise ApiError(503, "the server is shutting down; retry on another replica",
                           {"Retry-After": "1"}, code="shutting_down")

    @app.after_request
    def _record(resp: Response):
        # Probes and scrapes are neither counted nor logged: they would drown the requests that matter.
        rec = g.get("rec")
        if rec is not None and request.path not in ("/health", "/livez", "/metrics"):
            rec.status = resp.status_code
            metrics = st.metrics
            resp.call_on_close(lambda: metrics.finish(rec))  # after the last byte of a stream too
        return resp

    @app.teardown_request
    def _give_back(_exc):
        # Runs when the request context closes: for a stream, after its last event.
        for model_id in g.pop("leases", []):
            state().pool.release(model_id)

    @app.get("/livez")
    def livez():
        # Liveness: the process answers and its threads live. A dead worker never comes back,
        # so the right move for an orchestrator is a restart.
        if not state().pool.alive:
            return jsonify({"status": "worker stopped"}), 503
        return jsonify({"status": "ok"})

    @app.get("/metrics")
    def metrics():
        if not settings.metrics_public:
            check_auth()
        return Response(st.metrics.exposition(), mimetype="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/health")
    def health():
        # Unauthenticated (load balancers and probes call it), so it says nothing but the state;
        # the reasons go to the log and, with the key, to /models.
        st = state()
        if st.draining:
            return jsonify({"status": "draining"}), 503
        default = st.pool.default()
        if default.state != "loaded":
            return jsonify({"status": "failed" if default.state == "failed" else "loading"}), 503
        if not st.pool.alive or not default.runtime.ready:
            return jsonify({"status": "unavailable"}), 503
        body = {"status": "ok"}
        if _authorized():  # which CPU kernels llama.cpp chose: for the operator, not for anonymous probes
            cpu = cpu_backend()
            body["cpu_backend"] = {"variant": cpu.variant, "features": list(cpu.features)}
        return jsonify(body)

    @app.errorhandler(ApiError)
    def _api_error(e: ApiError):
        return error_response(e.status, e.message, e.headers, e.param, e.code)

    @app.errorhandler(InvalidParameter)
    def _invalid(e: InvalidParameter):
        return error_response(400, str(e), param=e.field)

    @app.errorhandler(ModelNotFound)
    def _no_model(e: ModelNotFound):
        return error_response(404, str(e), param="model", code="model_not_found")

    @app.errorhandler(QueueFull)
    def _full(e: QueueFull):
        return error_response(503, str(e), {"Retry-After": str(e.retry_after_s)}, code=type(e).__name__)

    @app.errorhandler(HTTPException)
    def _http(e: HTTPException):
        headers = {k: v for k, v in e.get_headers() if k.lower() in ("allow", "retry-after")}
        hint = "GET /v1/models, POST /v1/chat/completions or /v1/completions" if is_v1(request.path) else \
            "POST /predict or /<model_id>-webhook/predict"
        msg = {
            404: f"no such endpoint {request.path}; {hint}",
            405: f"{request.method} is not allowed on {request.path}; use {headers.get('Allow', 'POST')}",
            413: f"request body is larger than {settings.max_body_bytes} bytes",
        }.get(e.code or 500, e.description or e.name)
        return error_response(e.code or 500, msg, headers)

    @app.errorhandler(LlamaboxError)
    @app.errorhandler(Exception)
    def _internal(e: Exception):
        run_id = g.get("run_id", "?")
        log.error("run %s failed: %s", run_id, e, exc_info=e)
        return error_response(500, f"internal error; the server log has the details under run_id {run_id}")

    return app


def make_server(app: Flask, settings: Settings):
    """The production HTTP server for `app` (server/wsgi.py says why and how); .run() serves, .close() stops."""
    from .wsgi import HttpServer

    return HttpServer(
        app, host=settings.host, port=settings.port, threads=settings.http_threads, max_body_bytes=settings.max_body_bytes,
        max_connections=settings.max_connections, idle_timeout_s=settings.idle_timeout_s,
        read_timeout_s=settings.read_timeout_s, error_body=wsgi_error_body,
    )


def _placeholder_pool() -> ModelPool:
    e = Entry("", Path("."), pinned=True, state="loading")
    return ModelPool([e], None, 1 << 62)


def set_runtime(app: Flask, runtime: Runtime | None, load_error: str | None = None) -> None:
    """Fill a single-model app whose model was loading (see create_app)."""
    st: AppState = app.extensions["llamabox"]
    if runtime is not None:
        st.pool = ModelPool.single(runtime)
        st.pool.watch(st.metrics.model_loaded, st.metrics.model_unloaded)
    else:
        st.pool.set_loaded(st.pool.default_id, None, load_error)
