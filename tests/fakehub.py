"""A loopback stand-in for the Hugging Face Hub, for tests that must not touch the network.

It speaks the part of the Hub protocol that `huggingface_hub` (developed against 2.4.0) uses for
`HfApi.model_info` and `hf_hub_download` on the plain-HTTP path (no Xet headers are ever sent, so
`hf_xet` is never used):

* ``GET /api/models/{owner}/{name}`` and ``GET /api/models/{owner}/{name}/revision/{rev}``:
  the repo's ``sha``, ``gated`` flag and ``siblings``; with ``?blobs=true`` (what
  ``files_metadata=True`` sends) every sibling also carries ``size``, ``blobId`` and, for LFS
  files, ``lfs: {size, sha256, pointerSize}``.
* ``HEAD``/``GET /{owner}/{name}/resolve/{rev}/{path}``: always ``X-Repo-Commit``. A regular git
  file answers 200 with ``ETag: "<git blob sha1>"`` and ``Content-Length``. An LFS file answers like
  the real Hub does: a 302 to a second "CDN" server (127.0.0.1 too, but addressed as ``localhost`` on
  another port: another host, so huggingface_hub neither follows the HEAD redirect nor forwards the
  Authorization header there) carrying ``X-Linked-Etag: "<sha256>"`` and ``X-Linked-Size``.
* ``GET /cdn-lfs/{owner}/{name}/{sha256}`` on the CDN server: the LFS content, with HTTP ranges
  (``Range: bytes=N-`` / ``bytes=N-M`` answer 206 with ``Content-Range``; 416 when unsatisfiable).

Failure modes a test can switch on:

* ``gated=True``: resolve answers 401 (no token) or 403 (wrong token) with ``X-Error-Code: GatedRepo``
  and a JSON error body, as the Hub does for a licence not yet accepted. ``allowed_token`` is let in.
  Model info stays public, as on the Hub.
* ``served={path: bytes}``: the CDN serves these bytes while every piece of metadata (size, sha256,
  ETag) still describes the original content: a corrupted mirror.
* ``FakeHub.throttle = bytes_per_second``: content bodies are sent in slices at about that rate
  (None: as fast as possible), so a test can interrupt a download half-way.
* ``FakeHub.break_once(repo_id, path)``: the next GET of that file sends the full
  ``Content-Length``, writes half the bytes, then closes the connection.

Every request is recorded in ``FakeHub.requests`` (method, path, headers), so a test can assert on
``Range`` headers or on the absence of any request at all.

``isolate_hf(monkeypatch, endpoint, home)`` points huggingface_hub at the fake hub and moves every
cache / token location into ``home``, so the user's real cache and login are never touched.
"""
from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["FakeHub", "FakeRepo", "RecordedRequest", "isolate_hf", "git_blob_sha1", "sha256_hex"]

DEFAULT_LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".model", ".pth", ".pt", ".h5", ".msgpack")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob, which is the ETag the Hub gives a non-LFS file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class FakeRepo:
    repo_id: str
    files: dict[str, bytes]
    commit: str
    gated: bool = False
    allowed_token: str | None = None
    served: dict[str, bytes] = field(default_factory=dict)
    lfs_files: set[str] = field(default_factory=set)

    def is_lfs(self, path: str) -> bool:
        return path in self.lfs_files

    def served_bytes(self, path: str) -> bytes:
        return self.served.get(path, self.files[path])

    def sibling(self, path: str, with_blobs: bool) -> dict:
        entry: dict = {"rfilename": path}
        if with_blobs:
            data = self.files[path]
            if self.is_lfs(path):
                entry.update(
                    size=len(data),
                    blobId=git_blob_sha1(b"pointer:" + path.encode()),
                    lfs={"size": len(data), "sha256": sha256_hex(data), "pointerSize": 134},
                )
            else:
                entry.update(size=len(data), blobId=git_blob_sha1(data))
        return entry


@dataclass(frozen=True)
class RecordedRequest:
    server: str  # "hub" or "cdn"
    method: str
    path: str  # unquoted path, without the query string
    headers: dict[str, str]

    @property
    def range(self) -> str | None:
        return self.headers.get("range")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, hub: "FakeHub", role: str):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.hub = hub
        self.role = role
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()

    # Track live connections so that stop() can cut keep-alive ones too: otherwise a client's pooled
    # connection would go on being served by its handler thread after the server "stopped".
    def process_request(self, request, client_address):
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def close_open_connections(self) -> None:
        with self._open_lock:
            live = list(self._open)
        for sock in live:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # keep pytest output clean
        pass

    # -- plumbing ---------------------------------------------------------------------------

    def do_HEAD(self):
        self._dispatch(send_body=False)

    def do_GET(self):
        self._dispatch(send_body=True)

    def _dispatch(self, send_body: bool) -> None:
        hub = self.server.hub
        split = urlsplit(self.path)
        path = unquote(split.path)
        query = parse_qs(split.query)
        with hub._lock:
            hub.requests.append(
                RecordedRequest(
                    server=self.server.role,
                    method=self.command,
                    path=path,
                    headers={k.lower(): v for k, v in self.headers.items()},
                )
            )
        try:
            if self.server.role == "cdn":
                self._cdn(path, send_body)
            elif path.startswith("/api/models/"):
                self._model_info(split.path, query, send_body)
            elif "/resolve/" in split.path:
                self._resolve(split.path, send_body)
            else:
                self._error(404, None, "Not found", send_body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _send(self, status: int, headers: dict[str, str], body: bytes, send_body: bool) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        if "Content-Length" not in headers:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body and body:
            self.wfile.write(body)

    def _error(self, status: int, code: str | None, message: str, send_body: bool, extra=None) -> None:
        headers = {"Content-Type": "application/json", "X-Error-Message": message}
        if code is not None:
            headers["X-Error-Code"] = code
        headers.update(extra or {})
        self._send(status, headers, json.dumps({"error": message}).encode(), send_body)

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization")
        if auth and auth.lower().startswith("bearer "):
            return auth[7:].strip()
        return None

    def _repo(self, repo_id: str, send_body: bool) -> FakeRepo | None:
        repo = self.server.hub.repos.get(repo_id)
        if repo is None:
            # What the Hub answers an anonymous caller for a repo that does not exist (or is private).
            self._error(
                401, "RepoNotFound", "Repository not found", send_body
            )
        return repo

    # -- hub endpoints ----------------------------------------------------------------------

    def _model_info(self, raw_path: str, query: dict, send_body: bool) -> None:
        rest = raw_path[len("/api/models/") :]
        parts = rest.split("/")
        if len(parts) == 2:
            repo_id, revision = "/".join(parts), None
        elif len(parts) == 4 and parts[2] == "revision":
            repo_id, revision = "/".join(parts[:2]), unquote(parts[3])
        else:
            self._error(404, None, "Not found", send_body)
            return
        repo = self._repo(unquote(repo_id), send_body)
        if repo is None:
            return
        if revision is not None and revision not in ("main", repo.commit):
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", send_body)
            return
        with_blobs = query.get("blobs", ["false"])[0].lower() in ("1", "true")
        info = {
            "_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": repo.commit,
            "private": False,
            "gated": "manual" if repo.gated else False,
            "disabled": False,
            "tags": ["llama", "text-generation"],
            "pipeline_tag": "text-generation",
            "library_name": "transformers",
            "siblings": [repo.sibling(p, with_blobs) for p in sorted(repo.files)],
        }
        self._send(200, {"Content-Type": "application/json"}, json.dumps(info).encode(), send_body)

    def _resolve(self, raw_path: str, send_body: bool) -> None:
        head, _, tail = raw_path.partition("/resolve/")
        repo_id = unquote(head.lstrip("/"))
        revision_q, _, file_q = tail.partition("/")
        revision, filename = unquote(revision_q), unquote(file_q)
        repo = self._repo(repo_id, send_body)
        if repo is None:
            return
        if repo.gated and self._token() != repo.allowed_token:
            if self._token() is None:
                status = 401
                message = (
                    f"Access to model {repo_id} is restricted. You must have access to it and be "
                    "authenticated to access it. Please log in."
                )
            else:
                status = 403
                message = (
                    f"Access to model {repo_id} is restricted and you are not in the authorized list. "
                    f"Visit https://huggingface.co/{repo_id} to ask for access."
                )
            self._error(status, "GatedRepo", message, send_body)
            return
        if revision not in ("main", repo.commit):
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", send_body)
            return
        commit_header = {"X-Repo-Commit": repo.commit}
        if filename not in repo.files:
            self._error(404, "EntryNotFound", f"{filename} does not exist on \"{revision}\"", send_body,
                        extra=commit_header)
            return
        data = repo.files[filename]
        if repo.is_lfs(filename):
            sha = sha256_hex(data)
            location = f"{self.server.hub.cdn_url}/cdn-lfs/{repo_id}/{sha}"
            self._send(
                302,
                {
                    **commit_header,
                    "Location": location,
                    "X-Linked-Etag": f'"{sha}"',
                    "X-Linked-Size": str(len(data)),
                    "ETag": f'"{git_blob_sha1(b"pointer:" + filename.encode())}"',
                    "Content-Type": "text/plain; charset=utf-8",
                },
                b"Found. Redirecting to " + location.encode(),
                send_body,
            )
            return
        self._send_content(
            repo, filename, repo.served_bytes(filename),
            {**commit_header, "ETag": f'"{git_blob_sha1(data)}"'}, send_body,
        )

    def _cdn(self, path: str, send_body: bool) -> None:
        parts = path.strip("/").split("/")
        if len(parts) != 4 or parts[0] != "cdn-lfs":
            self._error(404, None, "Not found", send_body)
            return
        repo = self.server.hub.repos.get(f"{parts[1]}/{parts[2]}")
        sha = parts[3]
        match = None
        if repo is not None:
            for name, data in repo.files.items():
                if repo.is_lfs(name) and sha256_hex(data) == sha:
                    match = name
                    break
        if match is None:
            self._error(404, None, "Not found", send_body)
            return
        self._send_content(repo, match, repo.served_bytes(match), {"ETag": f'"{sha}"'}, send_body)

    def _send_content(self, repo: FakeRepo, filename: str, data: bytes, headers: dict, send_body: bool) -> None:
        total = len(data)
        start, end = 0, total - 1
        status = 200
        range_header = self.headers.get("Range")
        if range_header:
            spec = range_header.strip()
            ok = spec.startswith("bytes=") and "," not in spec
            if ok:
                first, _, last = spec[len("bytes="):].partition("-")
                try:
                    if first:
                        start = int(first)
                        end = int(last) if last else total - 1
                    else:  # suffix range: the last N bytes
                        start, end = max(total - int(last), 0), total - 1
                except ValueError:
                    ok = False
            if not ok or start >= total or start > end:
                self._send(416, {"Content-Range": f"bytes */{total}"}, b"", send_body)
                return
            end = min(end, total - 1)
            status = 206
            headers = {**headers, "Content-Range": f"bytes {start}-{end}/{total}"}
        body = data[start : end + 1]
        headers = {
            **headers,
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
            "Content-Length": str(len(body)),
        }
        hub = self.server.hub
        key = (repo.repo_id, filename)
        breaking = False
        if send_body:
            with hub._lock:
                if key in hub._break_next:
                    hub._break_next.discard(key)
                    breaking = True
        if not breaking:
            if send_body and hub.throttle:
                self._send_throttled(status, headers, body, hub.throttle)
            else:
                self._send(status, headers, body, send_body)
            return
        # Promise the whole body, deliver half of it, then hang up.
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body[: len(body) // 2])
        self.wfile.flush()
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


    def _send_throttled(self, status: int, headers: dict, body: bytes, rate: float) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        step = 64 * 1024
        start = time.monotonic()
        for offset in range(0, len(body), step):
            self.wfile.write(body[offset : offset + step])
            self.wfile.flush()
            ahead = (offset + step) / rate - (time.monotonic() - start)
            if ahead > 0:
                time.sleep(ahead)


class FakeHub:
    """Two loopback servers (the Hub and its LFS "CDN") serving in-memory repos.

    Use as a context manager, or call start()/stop().
    """

    def __init__(self) -> None:
        self.repos: dict[str, FakeRepo] = {}
        self.requests: list[RecordedRequest] = []
        self._break_next: set[tuple[str, str]] = set()
        self.throttle: float | None = None  # bytes per second for content bodies
        self._lock = threading.Lock()
        self._servers: list[_Server] = []
        self._threads: list[threading.Thread] = []
        self.url = ""
        self.cdn_url = ""

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> "FakeHub":
        for role in ("hub", "cdn"):
            server = _Server(self, role)
            thread = threading.Thread(
                target=server.serve_forever, kwargs={"poll_interval": 0.02}, name=f"fakehub-{role}", daemon=True
            )
            thread.start()
            self._servers.append(server)
            self._threads.append(thread)
        self.url = "http://127.0.0.1:%d" % self._servers[0].server_address[1]
        # The CDN gets another host name, as on the real Hub (cdn-lfs.hf.co): huggingface_hub 1.x
        # compares host names only, 2.x whole origins; either way this is "off the Hub".
        self.cdn_url = "http://localhost:%d" % self._servers[1].server_address[1]
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
            server.close_open_connections()
        for thread in self._threads:
            thread.join(timeout=5)
        self._servers.clear()
        self._threads.clear()

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- configuration ----------------------------------------------------------------------

    def add_repo(
        self,
        repo_id: str,
        files: dict[str, bytes],
        *,
        commit: str | None = None,
        gated: bool = False,
        allowed_token: str | None = None,
        served: dict[str, bytes] | None = None,
        lfs_files: set[str] | None = None,
    ) -> FakeRepo:
        if commit is None:
            digest = hashlib.sha1(repo_id.encode())
            for name in sorted(files):
                digest.update(name.encode() + b"\0" + files[name])
            commit = digest.hexdigest()
        if lfs_files is None:
            lfs_files = {name for name in files if name.endswith(DEFAULT_LFS_SUFFIXES)}
        repo = FakeRepo(
            repo_id=repo_id,
            files=dict(files),
            commit=commit,
            gated=gated,
            allowed_token=allowed_token,
            served=dict(served or {}),
            lfs_files=set(lfs_files),
        )
        self.repos[repo_id] = repo
        return repo

    def break_once(self, repo_id: str, filename: str) -> None:
        """Cut the next GET of this file off half-way (full Content-Length promised)."""
        with self._lock:
            self._break_next.add((repo_id, filename))

    # -- inspection -------------------------------------------------------------------------

    def clear_requests(self) -> None:
        with self._lock:
            self.requests.clear()

    def content_gets(self, filename: str) -> list[RecordedRequest]:
        """GET requests that transferred this file's content (resolve of a git file, or the CDN)."""
        result = []
        with self._lock:
            requests = list(self.requests)
        for req in requests:
            if req.method != "GET":
                continue
            if req.server == "hub" and "/resolve/" in req.path and req.path.endswith("/" + filename):
                result.append(req)
            elif req.server == "cdn":
                for repo in self.repos.values():
                    if filename in repo.files and req.path.endswith("/" + sha256_hex(repo.files[filename])):
                        result.append(req)
                        break
        return result


_PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


def isolate_hf(monkeypatch, endpoint: str, home: Path) -> None:
    """Point huggingface_hub at `endpoint` and keep every cache/token location under `home`.

    huggingface_hub reads its environment once, at import time, into `huggingface_hub.constants`;
    this sets both the environment variables (for code that reads them at call time, and for any
    subprocess) and the already-imported constants. The shared HTTP client is closed before (so it is
    rebuilt with this environment's proxy settings) and, via monkeypatch's undo, the constants come
    back afterwards.
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import close_session

    home = Path(home)
    hub_cache = home / "hub"
    token_path = home / "token"
    env = {
        "HF_ENDPOINT": endpoint,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(hub_cache),
        "HF_ASSETS_CACHE": str(home / "assets"),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN_PATH": str(token_path),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_SYMLINKS_WARNING": "1",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in (
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "HF_OIDC_RESOURCE",
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "HUGGINGFACE_CO_STAGING",
        "HUGGINGFACE_HUB_CACHE",
        *_PROXY_VARS,
    ):
        monkeypatch.delenv(key, raising=False)

    patches = {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(hub_cache),
        "HUGGINGFACE_HUB_CACHE": str(hub_cache),
        "HF_ASSETS_CACHE": str(home / "assets"),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN_PATH": str(token_path),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_DISABLE_XET": True,
    }
    for name, value in patches.items():
        if hasattr(constants, name):
            monkeypatch.setattr(constants, name, value)
    close_session()
