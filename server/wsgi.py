"""The HTTP server: waitress, with the limits a server on a network needs.

Why waitress: it is pure Python (nothing to compile on an air-gapped box), and its
single asyncore loop reads and buffers each whole request before a worker thread
sees it, so a slow or idle client costs one socket, never one of the threads that
wait on generations. Gunicorn's sync and gthread workers tie a thread (or a
process) to a slow reader; uvicorn would mean an ASGI rewrite for no gain here.

What waitress lacks, we add:
  * a deadline for receiving a complete request, headers and body
    (`read_timeout_s`). waitress's channel_timeout only drops connections that
    are silent for that long, so a slowloris client that sends a header line
    every 2 s was never dropped;
  * poll() instead of select(), so that more than ~1,000 sockets work at all,
    and a connection limit (`max_connections`) far above what real clients
    open, with idle connections closed after `idle_timeout_s`;
  * waitress's own error answers (431, bad chunked encoding, 413 over its body
    cap, 500) in our JSON envelope instead of plain text;
  * a run loop that stops on request (an Event), so a signal handler or a
    failed model load ends `serve` cleanly instead of by KeyboardInterrupt.

Production deployments put nginx in front (deploy/), which also limits per-client
connections; this keeps the server standing on its own.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from typing import Callable

import waitress
from waitress import wasyncore
from waitress.channel import HTTPChannel
from waitress.server import BaseWSGIServer
from waitress.task import ErrorTask, WSGITask

log = logging.getLogger(__name__)

# (status, message, path or None) -> (content type, body). Set by the app: the envelope depends on the route.
ErrorBody = Callable[[int, str, "str | None"], tuple[str, bytes]]


def default_error_body(status: int, message: str, path: str | None) -> tuple[str, bytes]:
    return "application/json", json.dumps({"message": message}).encode()


class _EnvelopeErrorTask(ErrorTask):
    """waitress's answer to a request it could not parse, in our envelope."""

    def execute(self):
        e = self.request.error
        # A request whose first line did not parse has no path (nor other attributes): then the
        # envelope cannot follow the route, and predict's is used.
        path = getattr(self.request, "path", None)
        content_type, body = self.channel.server.llamabox_error_body(e.code, f"{e.reason}: {e.body}", path)
        self.status = f"{e.code} {e.reason}"
        self.response_headers.append(("Content-Type", content_type))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


class _Task(WSGITask):
    """Lets the app close the connection after its answer (a WSGI app may not send Connection: close)."""

    def get_environment(self):
        environ = super().get_environment()
        environ["llamabox.close_connection"] = self.set_close_on_finish
        return environ


class _Channel(HTTPChannel):
    """A connection with a deadline for each request to arrive in full."""

    task_class = _Task
    error_task_class = _EnvelopeErrorTask
    request_began = 0.0  # monotonic time of the first byte of the request being received

    def received(self, data):
        if self.request is None and data:
            self.request_began = time.monotonic()
        return super().received(data)

    def readable(self):
        # The loop asks every channel this once per iteration (at least once a second), which
        # makes it the place to enforce the deadline without a timer per connection.
        if self.request is not None and not self.will_close:
            if time.monotonic() - self.request_began > self.server.llamabox_read_timeout:
                log.info("closing %s: request not complete within %.0f s", self.addr, self.server.llamabox_read_timeout)
                self.will_close = True
                return False
        return super().readable()


class HttpServer:
    """waitress serving `app`, bound at construction; run() serves until close()."""

    def __init__(self, app, *, host: str, port: int, threads: int, max_body_bytes: int, max_connections: int,
                 idle_timeout_s: float, read_timeout_s: float, error_body: ErrorBody = default_error_body):
        self._map: dict = {}
        self._server = waitress.create_server(
            app, map=self._map, host=host, port=port, threads=threads, ident="llamabox",
            # Far above our own limit, so that Flask's MAX_CONTENT_LENGTH answers 413 with a
            # message about our limit; past this waitress answers (in the envelope, see above).
            max_request_body_size=16 * max_body_bytes,
            channel_request_lookahead=1,  # lets a waiting handler see that its client hung up
            connection_limit=max_connections,
            channel_timeout=idle_timeout_s,  # a connection with no request in progress, silent this long, is closed
            cleanup_interval=1,              # ...checked every second (waitress's default: 30)
            asyncore_use_poll=True,          # select() cannot watch file descriptors above 1023
            asyncore_loop_timeout=1,
        )
        self._listeners = [d for d in self._map.values() if isinstance(d, BaseWSGIServer)]
        for s in self._listeners:
            s.channel_class = _Channel
            s.llamabox_read_timeout = read_timeout_s
            s.llamabox_error_body = error_body
        self._stop = threading.Event()
        self._drain = threading.Event()
        self._stopped = threading.Event()
        self._stopped.set()
        self.listening = True

    @property
    def effective_port(self) -> int:
        return self._listeners[0].effective_port

    @property
    def open_connections(self) -> int:
        return sum(1 for d in list(self._map.values()) if isinstance(d, HTTPChannel))

    @property
    def busy_connections(self) -> int:
        """Connections with a request being answered or an answer still being sent."""
        return sum(1 for d in list(self._map.values())
                   if isinstance(d, HTTPChannel) and (d.requests or d.total_outbufs_len))

    def run(self, drain_timeout_s: float = 30.0, idle: Callable[[], bool] = lambda: True,
            cancel: Callable[[], None] = lambda: None) -> None:
        """Serve until request_stop(), or until a drain (begin_drain(), from a signal handler say) ends:
        the listening sockets close at once, so new connections are refused and a load balancer
        moves on; requests in flight go on until `idle()` and no connection is busy, or until
        drain_timeout_s; then `cancel()` (which should fail what is left, quickly), and a few
        seconds more for those answers to go out."""
        self._stopped.clear()
        deadline = None
        cancelled = False
        try:
            while not self._stop.is_set():
                if self._drain.is_set():
                    now = time.monotonic()
                    if deadline is None:
                        self._close_listeners()
                        deadline = now + drain_timeout_s
                    if idle() and not self.busy_connections:
                        break
                    if now > deadline:
                        if cancelled:
                            log.warning("drain: %d connections still busy; closing them", self.busy_connections)
                            break
                        cancelled = True
                        cancel()
                        deadline = now + 5.0  # time for the 503s to go out
                wasyncore.loop(timeout=0.2 if self._drain.is_set() else 1.0, map=self._map, use_poll=True, count=1)
        finally:
            self._stopped.set()

    def _close_listeners(self) -> None:
        # Not BaseWSGIServer.close(): that closes the trigger too, which the loop still needs.
        for s in self._listeners:
            s.accepting = False
            wasyncore.dispatcher.close(s)
        self.listening = False

    def begin_drain(self) -> None:
        """Stop accepting connections and finish what is in flight; safe from a signal handler."""
        self._drain.set()
        self._wake()

    def request_stop(self) -> None:
        """Make run() return soon; safe from a signal handler (sets a flag, writes one byte)."""
        self._stop.set()
        self._wake()

    def _wake(self) -> None:
        try:
            self._listeners[0].trigger.pull_trigger()
        except OSError:
            pass

    def close(self, timeout: float = 10.0) -> None:
        """Stop serving, close every socket, and let the request threads finish (up to `timeout` s)."""
        self.request_stop()
        self._stopped.wait(timeout)
        wasyncore.close_all(self._map)
        self._listeners[0].task_dispatcher.shutdown(timeout=timeout)
