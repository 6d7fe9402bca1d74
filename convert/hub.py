"""Download Llama 2 checkpoints and GGUF files from the Hugging Face Hub.

Everything goes through `huggingface_hub` (developed against 2.4.0):

* the repo is listed once with `HfApi.model_info` at the requested revision, which pins the commit;
* only the files a conversion needs (`select_files`) are fetched, pinned to that commit, into a plain
  folder (real files, no cache symlinks), resumably (see Resuming below); a GGUF the same way;
* the Hub endpoint is `HF_ENDPOINT`, the token is the explicit one or else whatever huggingface_hub
  finds (`HF_TOKEN`, then the `hf auth login` token file);
* `HF_HUB_OFFLINE` makes this module use only what an earlier download left in `dest`;
* huggingface_hub's own progress bars are shown (silence them with `HF_HUB_DISABLE_PROGRESS_BARS=1`).

Resuming: `hf_hub_download` cannot resume across processes (huggingface_hub >= 2.x downloads into a
per-process temporary file that it deletes on failure, or orphans on `kill -9`), so checkpoint files are
fetched here with huggingface_hub's own pieces instead: `hf_hub_url` + `get_hf_file_metadata` (auth
headers, the CDN redirect) and `file_download.http_get` (its HTTP client, `Range: bytes=N-`, up to 5
retries in a row without progress, restart when a server ignores the range). Each file grows in
`dest/.llamabox-partial/<name>.<content id>.incomplete`, which survives Ctrl-C, `kill -9` and a
dropped connection; the next call sends `Range: bytes=<its size>-` and appends. huggingface_hub writes
whole DOWNLOAD_CHUNK_SIZE (10 MiB) chunks, so at most that much is fetched twice. A finished file is
checked by size and by sha256 (LFS files) or git blob id (the others) before it is moved into place; a
mismatch deletes the partial, so a corrupt one is never resumed again. Finished files are recorded in
`dest/.llamabox-partial/<name>.done` and skipped by later calls.

Errors are classified by exception type, never by message text, into `runtime.errors`.
"""
from __future__ import annotations

import fnmatch
import glob
import hashlib
import importlib
import json
import logging
import os
import re
from pathlib import Path

from urllib.parse import urlsplit

from huggingface_hub import HfApi, constants, get_hf_file_metadata, hf_hub_download, hf_hub_url
from huggingface_hub.file_download import http_get
from huggingface_hub.utils import build_hf_headers
from huggingface_hub.errors import (
    DisabledRepoError,
    FileMetadataError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.errors import GatedRepoError as HfGatedRepoError

from .store import hash_file, sha256_file, write_json_atomic
from .vocab import PULL_GGUF_HINT
from runtime.errors import (
    DownloadError,
    GatedRepoError,
    IntegrityError,
    InvalidParameter,
    UnsupportedArchitecture,
)

__all__ = [
    "MODEL_REPOS",
    "MANIFEST_NAME",
    "select_files",
    "download_checkpoint",
    "download_gguf",
    "parse_gguf_spec",
]

logger = logging.getLogger(__name__)

# Short model names llamabox knows, and the Hub repos they come from.
MODEL_REPOS = {
    "llamav2-7b": "meta-llama/Llama-2-7b-hf",
    "llamav2-7b-chat": "meta-llama/Llama-2-7b-chat-hf",
}

# Written into `dest` once every selected file is there: what was downloaded, from which commit.
MANIFEST_NAME = ".llamabox-download.json"

# Tokenizer / config files a conversion reads, taken when the repo has them.
_METADATA_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "added_tokens.json",     # older fine-tunes' added tokens (<pad>): convert/vocab.py reads it
    "chat_template.jinja",   # newer repos keep the chat template beside tokenizer_config.json
    "chat_template.json",
    "README.md",             # the model card: general.license, base_model, tags, as the reference writes them
)
# Without these a repo cannot be converted (llama.cpp's converter needs a config and the SentencePiece model).
_REQUIRED_FILES = ("config.json", "tokenizer.model")

# Weight file names as transformers writes them (`model{suffix}.safetensors`,
# `pytorch_model{suffix}.bin`); llama.cpp's convert_hf_to_gguf.py looks for the same prefixes.
_SAFETENSORS_PATTERN = "model*.safetensors"
_SAFETENSORS_INDEX = "model.safetensors.index.json"
_BIN_PATTERN = "pytorch_model*.bin"
_BIN_INDEX = "pytorch_model.bin.index.json"

_NAME_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_-])?"
_REPO_ID_RE = re.compile(rf"^{_NAME_PART}/{_NAME_PART}$")
_FILE_PART_RE = re.compile(r"^[A-Za-z0-9_+-][A-Za-z0-9._+-]*$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
# Bookkeeping of resumable downloads inside a checkpoint folder. Hidden, and never named with the
# store's TMP_MARK: a partial here is kept for the next run, not swept.
PARTIAL_DIR = ".llamabox-partial"


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Exception types of the HTTP library huggingface_hub uses (connection refused, timeouts, ...).

    huggingface_hub lets them through unwrapped: httpx2.HTTPError in 2.x, httpx.HTTPError in 1.x.
    """
    errors: list[type[BaseException]] = []
    for module_name in ("httpx2", "httpx"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        error = getattr(module, "HTTPError", None)
        if isinstance(error, type) and issubclass(error, BaseException):
            errors.append(error)
    return tuple(errors)


_TRANSPORT_ERRORS = _transport_errors()
# Everything `_translate` knows how to turn into a llamabox error.
_HUB_ERRORS = (HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled, FileMetadataError, OSError) + (
    _TRANSPORT_ERRORS
)


# --------------------------------------------------------------------------------------------
# File selection
# --------------------------------------------------------------------------------------------


def select_files(filenames: list[str]) -> list[str]:
    """The files of a Hub repo listing that a Llama conversion needs, sorted.

    Config and tokenizer files (config.json, generation_config.json, tokenizer.model,
    tokenizer_config.json, special_tokens_map.json, tokenizer.json) when present, and the weights:
    `model*.safetensors` (+ model.safetensors.index.json) when the repo has any, else
    `pytorch_model*.bin` (+ pytorch_model.bin.index.json). Only top-level files: never anything in a
    folder (`original/consolidated.00.pth`), never `*.gguf`, `*.pth`, READMEs or licences.
    """
    top_level = {name for name in filenames if name and "/" not in name and "\\" not in name}
    selected = {name for name in _METADATA_FILES if name in top_level}
    safetensors = {name for name in top_level if fnmatch.fnmatchcase(name, _SAFETENSORS_PATTERN)}
    if safetensors:
        selected |= safetensors
        if _SAFETENSORS_INDEX in top_level:
            selected.add(_SAFETENSORS_INDEX)
    else:
        selected |= {name for name in top_level if fnmatch.fnmatchcase(name, _BIN_PATTERN)}
        if _BIN_INDEX in top_level and any(fnmatch.fnmatchcase(n, _BIN_PATTERN) for n in selected):
            selected.add(_BIN_INDEX)
    return sorted(selected)


def _missing_for_conversion(selected: list[str]) -> list[str]:
    missing = [name for name in _REQUIRED_FILES if name not in selected]
    if not any(
        fnmatch.fnmatchcase(name, _SAFETENSORS_PATTERN) or fnmatch.fnmatchcase(name, _BIN_PATTERN)
        for name in selected
    ):
        missing.append(f"weights ({_SAFETENSORS_PATTERN} or {_BIN_PATTERN})")
    return missing


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def _validate_repo_id(repo_id: object, field: str) -> str:
    if (
        not isinstance(repo_id, str)
        or not _REPO_ID_RE.match(repo_id)
        or ".." in repo_id
        or "--" in repo_id
    ):
        raise InvalidParameter(field, f"{repo_id!r} is not a Hub repo id of the form 'owner/name'")
    return repo_id


def _validate_revision(revision: object) -> str | None:
    if revision is None:
        return None
    if (
        not isinstance(revision, str)
        or not revision
        or len(revision) > 255
        or any(ch.isspace() or ord(ch) < 32 for ch in revision)
        or ".." in revision
    ):
        raise InvalidParameter("revision", f"{revision!r} is not a valid git revision")
    return revision


def _endpoint() -> str:
    """HF_ENDPOINT as it is now (huggingface_hub itself only reads it at import time)."""
    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _offline() -> bool:
    """HF_HUB_OFFLINE as it is now, or as huggingface_hub saw it at import time."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    return constants.is_offline_mode() or (value is not None and value.upper() in constants.ENV_VARS_TRUE_VALUES)


def _login_hint() -> str:
    return "log in with `hf auth login` or set the HF_TOKEN environment variable to a read token"


def _gated_error(repo_id: str, status: int | None, cause: BaseException) -> GatedRepoError:
    status_text = f" (HTTP {status})" if status else ""
    server = getattr(cause, "server_message", None)
    detail = f" The Hub said: {server.strip()}" if isinstance(server, str) and server.strip() else ""
    return GatedRepoError(
        f"Access to the Hugging Face repo {repo_id} was refused{status_text}: it is gated or private. "
        f"Accept the licence on https://huggingface.co/{repo_id} with your Hugging Face account, "
        f"then {_login_hint()}.{detail}"
    )


def _translate(exc: BaseException, repo_id: str, revision: str | None, what: str) -> Exception:
    """Map a huggingface_hub / transport exception to a llamabox error, by type."""
    rev = revision or "main"
    if isinstance(exc, HfGatedRepoError):  # before RepositoryNotFoundError, its base class
        return _gated_error(repo_id, _status(exc), exc)
    if isinstance(exc, RepositoryNotFoundError):
        return DownloadError(
            f"Hugging Face repo {repo_id} was not found (HTTP {_status(exc)}). Check the name; if it is "
            f"private or gated, accept its licence on https://huggingface.co/{repo_id} and {_login_hint()}."
        )
    if isinstance(exc, RevisionNotFoundError):
        return DownloadError(f"Revision {rev!r} does not exist in Hugging Face repo {repo_id}.")
    if isinstance(exc, RemoteEntryNotFoundError):
        return DownloadError(f"{what} is not in Hugging Face repo {repo_id} at revision {rev!r}.")
    if isinstance(exc, DisabledRepoError):
        return DownloadError(f"Hugging Face repo {repo_id} has been disabled.")
    if isinstance(exc, HfHubHTTPError):
        status = _status(exc)
        if status in (401, 403):
            return _gated_error(repo_id, status, exc)
        return DownloadError(
            f"The Hugging Face Hub ({_endpoint()}) answered HTTP {status} while fetching {what} "
            f"from {repo_id}; try again later."
        )
    if isinstance(exc, OfflineModeIsEnabled):
        return DownloadError(
            f"HF_HUB_OFFLINE is set, so {what} from {repo_id} cannot be fetched and it is not "
            "available locally; unset HF_HUB_OFFLINE to download it."
        )
    if isinstance(exc, LocalEntryNotFoundError):
        cause = exc.__cause__ or exc.__context__
        reason = f" ({type(cause).__name__}: {cause})" if cause is not None else ""
        return DownloadError(
            f"Could not reach the Hugging Face Hub at {_endpoint()} to fetch {what} from {repo_id}, "
            f"and it is not available locally{reason}. Check the network connection "
            "(and HF_ENDPOINT / proxy settings)."
        )
    if isinstance(exc, FileMetadataError):
        return DownloadError(
            f"{_endpoint()} does not answer like a Hugging Face Hub while fetching {what} from "
            f"{repo_id}: {exc}"
        )
    if _TRANSPORT_ERRORS and isinstance(exc, _TRANSPORT_ERRORS):
        return DownloadError(
            f"Network error while fetching {what} from Hugging Face repo {repo_id} at "
            f"{_endpoint()}: {type(exc).__name__}: {exc or 'no details'}. Check the network connection "
            "and try again; finished files are kept."
        )
    if isinstance(exc, OSError):
        return DownloadError(f"Could not download {what} from {repo_id}: {exc}")
    return DownloadError(f"Could not download {what} from {repo_id}: {type(exc).__name__}: {exc}")


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _sibling_size(sibling) -> int | None:
    lfs = getattr(sibling, "lfs", None)
    size = lfs.size if lfs is not None else getattr(sibling, "size", None)
    return size if isinstance(size, int) else None


def _git_blob_sha1(path: Path) -> str:
    """The git object id of a file's content: what the Hub lists as `blobId` for a non-LFS file."""
    return hash_file(path, hashlib.sha1(b"blob %d\0" % path.stat().st_size))


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def _read_manifest(dest: Path) -> dict | None:
    try:
        data = json.loads((dest / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        return None
    return data


def _write_manifest(dest: Path, manifest: dict) -> None:
    write_json_atomic(dest / MANIFEST_NAME, manifest)


def _manifest_complete(dest: Path, manifest: dict) -> bool:
    for name, size in manifest["files"].items():
        path = dest / name
        if not path.is_file() or (isinstance(size, int) and path.stat().st_size != size):
            return False
    return True


def _expected(sibling) -> tuple[int | None, str | None, str | None]:
    """(size, sha256, git blob id) the Hub lists for a file; sha256 only for LFS files."""
    lfs = getattr(sibling, "lfs", None)
    sha256 = getattr(lfs, "sha256", None) if lfs is not None else None
    sha256 = sha256.lower() if isinstance(sha256, str) and _SHA256_RE.match(sha256.lower()) else None
    blob_id = getattr(sibling, "blob_id", None)
    blob_id = blob_id if isinstance(blob_id, str) and re.fullmatch(r"[0-9a-f]{40}", blob_id) else None
    return _sibling_size(sibling), sha256, blob_id


def _content_mismatch(path: Path, size: int | None, sha256: str | None, blob_id: str | None) -> str | None:
    """Why `path` is not the listed content, or None when it is (size, then sha256 or git blob id)."""
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        return f"is {actual_size} bytes, the Hub lists {size}"
    if sha256 is not None:
        actual = sha256_file(path)
        if actual != sha256:
            return f"has sha256 {actual}, the Hub lists {sha256}"
    elif blob_id is not None:
        actual = _git_blob_sha1(path)
        if actual != blob_id:
            return f"has git blob id {actual}, the Hub lists {blob_id}"
    return None


def _same_origin(a: str, b: str) -> bool:
    sa, sb = urlsplit(a), urlsplit(b)
    return (sa.scheme, sa.hostname, sa.port) == (sb.scheme, sb.hostname, sb.port)


def _fetch_file(repo_id: str, name: str, commit: str, dest: Path, token: str | None, endpoint: str, sibling) -> Path:
    """Download one file of `repo_id`@`commit` to `dest/name`, resuming a partial an earlier call left.

    The partial is `dest/PARTIAL_DIR/<name>.<content id>.incomplete`; it is kept on any failure or
    kill (and resumed with a Range request next time), and deleted only when the finished content
    does not verify. Raises IntegrityError, or huggingface_hub / transport errors for `_translate`.
    """
    size, sha256, blob_id = _expected(sibling)
    key = sha256 or blob_id or commit
    final = dest / name
    state = dest / PARTIAL_DIR
    done = state / f"{name}.done"
    record = {"key": key, "size": size}
    if final.is_file():
        try:
            recorded = json.loads(done.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            recorded = None
        if recorded == record and (size is None or final.stat().st_size == size):
            return final
        if (sha256 or blob_id) and _content_mismatch(final, size, sha256, blob_id) is None:
            done.parent.mkdir(parents=True, exist_ok=True)
            done.write_text(json.dumps(record), encoding="utf-8")
            return final

    partial = state / f"{name}.{key[:16]}.incomplete"
    partial.parent.mkdir(parents=True, exist_ok=True)  # a name may hold folders: "Q4_K_M/model.gguf"
    final.parent.mkdir(parents=True, exist_ok=True)
    for other in state.glob(f"{glob.escape(name)}.*.incomplete"):
        if other != partial:  # another version of the file: useless now
            other.unlink(missing_ok=True)

    url = hf_hub_url(repo_id, name, revision=commit, endpoint=endpoint)
    metadata = get_hf_file_metadata(url, token=token, endpoint=endpoint, retry_on_errors=True)
    if size is None:
        size = metadata.size
    headers = build_hf_headers(token=token)
    headers["Accept-Encoding"] = "identity"  # byte ranges of the stored content, not of a gzip stream
    location = metadata.location or url
    if not _same_origin(url, location):
        headers.pop("authorization", None)  # a signed CDN URL: never send the token off the Hub

    resume = partial.stat().st_size if partial.is_file() else 0
    if size is not None and resume > size:
        resume = 0
    if resume:
        logger.info("Resuming %s at %d of %s bytes", name, resume, size if size is not None else "?")
    with open(partial, "r+b" if partial.is_file() else "wb") as f:
        f.seek(resume)
        f.truncate()
        http_get(location, f, resume_size=resume, headers=headers, expected_size=size, displayed_filename=name)
        f.flush()
        os.fsync(f.fileno())

    problem = _content_mismatch(partial, size, sha256, blob_id)
    if problem is not None:
        partial.unlink(missing_ok=True)
        raise IntegrityError(
            f"{name} from {repo_id}@{commit[:12]} {problem}; the download is corrupt and has been deleted."
        )
    final.unlink(missing_ok=True)
    os.replace(partial, final)
    done.write_text(json.dumps(record), encoding="utf-8")
    return final


def _offline_checkpoint(repo_id: str, dest: Path, revision: str | None) -> tuple[Path, str]:
    wanted = revision or "main"
    manifest = _read_manifest(dest)
    if (
        manifest is not None
        and manifest.get("repo_id") == repo_id
        and wanted in (manifest.get("revision"), manifest.get("commit"))
        and isinstance(manifest.get("commit"), str)
        and _manifest_complete(dest, manifest)
    ):
        logger.info("HF_HUB_OFFLINE: using %s@%s already in %s", repo_id, manifest["commit"], dest)
        return dest, manifest["commit"]
    raise DownloadError(
        f"HF_HUB_OFFLINE is set and {repo_id} (revision {wanted!r}) has not been completely "
        f"downloaded to {dest} yet. Unset HF_HUB_OFFLINE and run the download once with network access."
    )


def download_checkpoint(
    repo_id: str, dest: Path, revision: str | None = None, token: str | None = None
) -> tuple[Path, str]:
    """Download the files of a Llama checkpoint that a conversion needs into `dest`.

    Lists `repo_id` at `revision` (default: the main branch), downloads `select_files(...)` of it,
    pinned to the listed commit, and returns `(dest, commit_sha)`. Files already downloaded from that
    commit are skipped. With HF_HUB_OFFLINE set, nothing is requested: the earlier download in `dest`
    is returned, or DownloadError is raised.

    Raises GatedRepoError (licence not accepted / not logged in), DownloadError (missing repo,
    revision or file, network failure), UnsupportedArchitecture (the repo has no config.json,
    tokenizer.model or weights), InvalidParameter (bad repo id or revision).
    """
    repo_id = _validate_repo_id(repo_id, "repo_id")
    revision = _validate_revision(revision)
    dest = Path(dest).expanduser().resolve()

    if _offline():
        return _offline_checkpoint(repo_id, dest, revision)

    endpoint = _endpoint()
    api = HfApi(endpoint=endpoint, token=token)
    try:
        info = api.model_info(repo_id, revision=revision, files_metadata=True)
    except _HUB_ERRORS as exc:
        error = _translate(exc, repo_id, revision, "the file list")
        if isinstance(error, DownloadError) and not isinstance(error, GatedRepoError):
            manifest = _read_manifest(dest)
            if manifest is not None and manifest.get("repo_id") == repo_id:
                error = DownloadError(f"{error} (an earlier download is in {dest}: set HF_HUB_OFFLINE=1 to use it)")
        raise error from exc

    commit = info.sha
    if not isinstance(commit, str) or not commit:
        raise DownloadError(f"The Hub at {endpoint} gave no commit for {repo_id} at revision {revision or 'main'!r}.")
    siblings = {s.rfilename: s for s in (info.siblings or [])}
    selected = select_files(list(siblings))
    missing = _missing_for_conversion(selected)
    if missing:
        hint = ""
        if "tokenizer.model" in missing and "tokenizer.json" in selected:  # Llama 3, SmolLM: BPE only
            hint = f" Its tokenizer is a tokenizer.json without a SentencePiece tokenizer.model; {PULL_GGUF_HINT}."
        raise UnsupportedArchitecture(
            f"{repo_id}@{commit[:12]} is not a Hugging Face Llama checkpoint llamabox can convert: "
            f"missing {', '.join(missing)}.{hint}"
        )

    sizes = {name: _sibling_size(siblings[name]) for name in selected}
    total = sum(size for size in sizes.values() if isinstance(size, int))
    logger.info(
        "Downloading %d files (%.2f GB) of %s@%s into %s", len(selected), total / 1e9, repo_id, commit[:12], dest
    )
    dest.mkdir(parents=True, exist_ok=True)
    previous = _read_manifest(dest)
    if previous is not None and (previous.get("repo_id"), previous.get("commit")) != (repo_id, commit):
        # Files are about to be replaced: the old record must not vouch for a half-updated folder.
        (dest / MANIFEST_NAME).unlink(missing_ok=True)
    for name in selected:
        try:
            _fetch_file(repo_id, name, commit, dest, token, endpoint, siblings[name])
        except _HUB_ERRORS as exc:
            raise _translate(exc, repo_id, revision, name) from exc

    _write_manifest(
        dest,
        {
            "repo_id": repo_id,
            "revision": revision or "main",
            "commit": commit,
            "endpoint": endpoint,
            "files": {name: (dest / name).stat().st_size for name in selected},
        },
    )
    logger.info("Downloaded %s@%s into %s", repo_id, commit[:12], dest)
    return dest, commit


# --------------------------------------------------------------------------------------------
# GGUF files
# --------------------------------------------------------------------------------------------


def parse_gguf_spec(spec: str) -> tuple[str, str]:
    """Split and validate 'owner/name:file.gguf' into (repo_id, filename); InvalidParameter('gguf')."""
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise InvalidParameter("gguf", f"{spec!r} is not of the form 'owner/name:file.gguf'")
    repo_id, filename = spec.split(":")
    if not _REPO_ID_RE.match(repo_id) or ".." in repo_id or "--" in repo_id:
        raise InvalidParameter("gguf", f"{repo_id!r} in {spec!r} is not a Hub repo id of the form 'owner/name'")
    if not filename.endswith(".gguf") or filename == ".gguf":
        raise InvalidParameter("gguf", f"{filename!r} in {spec!r} is not a .gguf file")
    parts = filename.split("/")
    if (
        filename.startswith("/")
        or "\\" in filename
        or any(part in ("", ".", "..") or not _FILE_PART_RE.match(part) for part in parts)
    ):
        raise InvalidParameter("gguf", f"{filename!r} in {spec!r} is not a plain relative file path in the repo")
    return repo_id, filename


def download_gguf(spec: str, dest_dir: Path, token: str | None = None) -> tuple[Path, str]:
    """Download one GGUF file, 'owner/name:file.gguf', to `dest_dir/file.gguf`, resumably, verified.

    The expected sha256 is the one the Hub lists for the file (its LFS object id); a file without
    one is refused before downloading. The bytes grow in `dest_dir/PARTIAL_DIR/` as `_fetch_file`
    describes: an interrupted call (Ctrl-C, kill -9, a dropped connection) leaves the partial, and
    the next call asks for the rest only. A file that does not verify is deleted and IntegrityError
    raised. A verified file already at the destination is not downloaded again. Returns (path, sha256).
    """
    repo_id, filename = parse_gguf_spec(spec)
    dest_dir = Path(dest_dir).expanduser().resolve()

    if _offline():
        raise DownloadError(
            f"HF_HUB_OFFLINE is set, so {filename} cannot be fetched from {repo_id}; "
            "unset HF_HUB_OFFLINE to download it."
        )

    endpoint = _endpoint()
    api = HfApi(endpoint=endpoint, token=token)
    try:
        info = api.model_info(repo_id, files_metadata=True)
    except _HUB_ERRORS as exc:
        raise _translate(exc, repo_id, None, "the file list") from exc
    sibling = next((s for s in (info.siblings or []) if s.rfilename == filename), None)
    if sibling is None:
        raise DownloadError(f"{filename} is not in Hugging Face repo {repo_id}.")
    expected = ((sibling.lfs.sha256 if sibling.lfs is not None else None) or "").lower()
    if not _SHA256_RE.match(expected):
        raise IntegrityError(
            f"The Hub lists no sha256 for {filename} in {repo_id} (not an LFS file), so it cannot be verified."
        )
    try:
        path = _fetch_file(repo_id, filename, info.sha or "main", dest_dir, token, endpoint, sibling)
    except _HUB_ERRORS as exc:
        raise _translate(exc, repo_id, None, filename) from exc
    except IntegrityError:
        _remove_empty_dirs(dest_dir / PARTIAL_DIR, dest_dir)
        raise
    logger.info("Downloaded %s from %s (sha256 %s)", filename, repo_id, expected)
    return path, expected


def _remove_empty_dirs(leaf: Path, top: Path) -> None:
    """rmdir leaf and its parents up to and including top, stopping at the first that is not empty."""
    d = leaf
    while d == top or top in d.parents:
        try:
            d.rmdir()
        except OSError:
            return
        d = d.parent
