"""`llamabox pull`: Hub -> local checkpoint -> quantized GGUF in the store."""
from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path
from typing import Any

from runtime.errors import InvalidParameter

from .hub import MODEL_REPOS, download_checkpoint, download_gguf
from .pipeline import QuantReport, convert, parse_quants
from .store import Store, check_model_id

log = logging.getLogger(__name__)

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_GGUF_QUANT = re.compile(r"(q\d_k_[sml]|q\d_k|q\d_\d|f16|bf16|f32)", re.IGNORECASE)


def fetch_source(src: str, revision: str | None = None, store: Store | None = None) -> tuple[Path, dict[str, Any]]:
    """A local HF folder as-is, or a Hub repo id downloaded into the store's download area."""
    p = Path(src).expanduser()
    if p.is_dir():
        return p, {"path": str(p.resolve())}
    if not _REPO_ID.match(src) or ".." in src:
        raise InvalidParameter("src", f"{src!r} is neither a folder nor a Hub repo id (owner/name)")
    store = store or Store()
    dest = store.home / "downloads" / src.replace("/", "--")
    folder, commit = download_checkpoint(src, dest, revision=revision)
    return folder, {"repo": src, "revision": commit}


def pull(
    name: str,
    quants: str = "q4_k_m",
    repo: str | None = None,
    revision: str | None = None,
    gguf: str | None = None,
    model_id: str | None = None,
    keep_download: bool = False,
    store: Store | None = None,
) -> list[QuantReport]:
    store = store or Store()
    model_id = check_model_id(model_id or name)
    if gguf:
        store.clean_partials(model_id)
        # Everything the download writes lives in a partial-marked folder, so an interrupted
        # pull leaves nothing listed and the next pull's clean_partials removes it.
        staging = store.partial_path(model_id, "gguf-download")
        try:
            path, sha = download_gguf(gguf, staging)
            m = _GGUF_QUANT.search(path.name)
            quant = m.group(1).lower() if m else "gguf"
            mf = store.add_file(model_id, path, quant, {"repo": gguf.partition(":")[0], "file": gguf.partition(":")[2], "sha256": sha})
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return [QuantReport(quant, mf.path, mf.size, float("nan"), 0.0)]

    repo = repo or MODEL_REPOS.get(name)
    if repo is None:
        raise InvalidParameter("name", f"unknown model {name!r}: use {' or '.join(MODEL_REPOS)}, or give --repo owner/name")
    qs = parse_quants(quants)
    folder, source = fetch_source(repo, revision=revision, store=store)
    reports = convert(folder, qs, store=store, model_id=model_id, source=source)
    if not keep_download:
        shutil.rmtree(folder, ignore_errors=True)
    return reports
