"""`llamabox pull`: Hub -> local checkpoint -> quantized GGUF in the store."""
from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, NamedTuple

from runtime.errors import IntegrityError, InvalidParameter

from .hub import MODEL_REPOS, PARTIAL_DIR, download_checkpoint, download_gguf, parse_gguf_spec
from .pipeline import QuantReport, convert, parse_quants
from .store import Store, check_model_id, hold_flock, sha256_file

log = logging.getLogger(__name__)

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_GGUF_QUANT = re.compile(r"(q\d_k_[sml]|q\d_k|q\d_\d|f16|bf16|f32)", re.IGNORECASE)


class Fetched(NamedTuple):
    folder: Path
    source: dict[str, Any]
    downloaded: bool  # True only for a download made here, into the store's downloads area: ours to delete


def fetch_source(src: str, revision: str | None = None, store: Store | None = None) -> Fetched:
    """A local HF folder as-is, or a Hub repo id downloaded into the store's download area."""
    p = Path(src).expanduser()
    if p.is_dir():
        if _REPO_ID.match(src):
            log.info("%s is a folder here: converting it, not the Hub repo of that name", src)
        return Fetched(p, {"path": str(p.resolve())}, downloaded=False)
    if not _REPO_ID.match(src) or ".." in src:
        raise InvalidParameter("src", f"{src!r} is neither a folder nor a Hub repo id (owner/name)")
    store = store or Store()
    dest = store.home / "downloads" / src.replace("/", "--")
    folder, commit = download_checkpoint(src, dest, revision=revision)
    return Fetched(folder, {"repo": src, "revision": commit}, downloaded=True)


def known_chat(name: str, repo: str) -> bool | None:
    """Chat or base for a repo llamabox knows by name (MODEL_REPOS), None for others. Meta's base repo
    ships a chat template in its tokenizer_config.json too, so the template cannot tell."""
    if MODEL_REPOS.get(name) != repo:
        return None
    return "-chat" in repo.lower()


def pull(
    name: str,
    quants: str = "q4_k_m",
    repo: str | None = None,
    revision: str | None = None,
    gguf: str | None = None,
    model_id: str | None = None,
    keep_download: bool = False,
    force: bool = False,
    store: Store | None = None,
) -> list[QuantReport]:
    store = store or Store()
    model_id = check_model_id(model_id or name)
    if gguf:
        source = {"repo": gguf.partition(":")[0], "file": gguf.partition(":")[2]}
        with store.writing(model_id, source, force=force) as w:
            chat = known_chat(name, MODEL_REPOS.get(name, ""))
            if chat is not None:  # otherwise the GGUF decides when it is loaded: chat iff it has a template
                w.manifest["chat"] = chat
            # The download grows under <home>/downloads/gguf/<repo>/, outside the store's sweep, so
            # a pull stopped by Ctrl-C, kill -9 or a dropped connection resumes from its bytes when
            # run again. The verified file is hard-linked into this write's partial, and the
            # download let go only once the store holds it: a failure before that keeps it.
            repo_id, filename = parse_gguf_spec(gguf)
            downloads = store.home / "downloads" / "gguf" / repo_id.replace("/", "--")
            with hold_flock(downloads.parent / f".{downloads.name}.lock", gguf):  # one pull per download
                path, sha = download_gguf(gguf, downloads)
                m = _GGUF_QUANT.search(path.name)
                quant = m.group(1).lower() if m else "gguf"
                staging = w.partial("gguf-download")
                try:
                    os.link(path, staging)
                except OSError as e:  # another filesystem (a linked downloads folder): a copy, hashed again
                    log.info("cannot hard-link %s into the store (%s); copying it", path, e.strerror)
                    shutil.copyfile(path, staging)
                    if sha256_file(staging) != sha:
                        raise IntegrityError(f"copying {path} into the store changed its bytes; nothing was added")
                w.source = {**w.source, "sha256": sha}
                mf = w.add_file(staging, quant, sha256=sha)  # the bytes download_gguf checked against the Hub
        # Committed: the store has the file now.
        path.unlink(missing_ok=True)
        (downloads / PARTIAL_DIR / f"{filename}.done").unlink(missing_ok=True)
        return [QuantReport(quant, mf.path, mf.size, float("nan"), 0.0)]

    repo = repo or MODEL_REPOS.get(name)
    if repo is None:
        raise InvalidParameter("name", f"unknown model {name!r}: use {' or '.join(MODEL_REPOS)}, or give --repo owner/name")
    qs = parse_quants(quants)
    if not Path(repo).expanduser().is_dir():
        # Refuse before a long download when the id surely holds another checkpoint; the exact
        # commit is known only after it, and the conversion checks again under the model's lock.
        store.check_writable(model_id, lambda fp: fp.startswith(f"hub:{repo}@"), force)
    fetched = fetch_source(repo, revision=revision, store=store)
    reports = convert(fetched.folder, qs, store=store, model_id=model_id, source=fetched.source, force=force,
                      chat=known_chat(name, repo))
    # Never delete what llamabox did not download: a --repo that is a local folder is the user's.
    downloads = (store.home / "downloads").resolve()
    if fetched.downloaded and not keep_download and fetched.folder.resolve().is_relative_to(downloads):
        shutil.rmtree(fetched.folder, ignore_errors=True)
    return reports
