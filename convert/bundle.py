"""Model bundles: one model of the store (all its quant files, or one) as one uncompressed tar.

A bundle is a PAX tar whose FIRST member is `llamabox-bundle.json` (format, version, model id,
chat flag, source, and name/size/sha256/quant of every GGUF), followed by the GGUF files, each a
plain regular-file member named exactly as in the manifest. Both ways stream in constant memory
(`w|` / `r|`), so `llamabox export m - | ssh host llamabox import -` works.

Export hashes every file while it streams it and refuses to finish when the bytes are not the
ones the store's manifest records: a damaged store is never exported silently. Import hashes
every file while it streams it into a partial (TMP_MARK) file of a store write, and places the
files (manifest written, staging folder swapped in) only once every member checked out; any
refusal leaves nothing visible, and the next store write sweeps what a killed import left.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO, Callable

from runtime.errors import BundleError, IntegrityError, ModelNotFound
from convert.store import TMP_MARK, Store, check_model_id, fsync_path, parse_ref, source_fingerprint, utc_now

MANIFEST_NAME = "llamabox-bundle.json"
FORMAT = "llamabox-bundle"
VERSION = 1
LICENSE_NOTE = ("This bundle carries Meta's Llama 2 weights (or weights derived from them), distributed under the "
                "Llama 2 Community License (https://ai.meta.com/llama/license/) and its Acceptable Use Policy; "
                "whoever passes it on must pass on that licence too.")
DEMO_NOTE = ("This bundle carries llamabox's built-in demo model, a tiny model trained by llamabox (not Llama 2); "
             "its source entry names the licences of what it was trained on.")
MAX_MANIFEST_BYTES = 1 << 20
CHUNK = 1 << 20
DISK_MARGIN = 64 << 20       # free space kept beyond the bundle's files, at least
_SHA = re.compile(r"[0-9a-f]{64}")
_QUANT = re.compile(r"[a-z0-9_]{2,10}")

Progress = Callable[[int, int], None]  # (bytes done, bytes in all)


def default_output(model_id: str) -> Path:
    return Path(f"{check_model_id(model_id)}.llamabox.tar")


# --- export ------------------------------------------------------------------------------

class _HashingReader:
    """A file object for tarfile.addfile that hashes (and counts) what it hands out."""

    def __init__(self, f: BinaryIO, on_bytes: Callable[[int], None]):
        self.f = f
        self.h = hashlib.sha256()
        self.on_bytes = on_bytes

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.h.update(data)
        self.on_bytes(len(data))
        return data


@dataclass(frozen=True)
class ExportResult:
    model_id: str
    files: list[str]
    bytes: int
    path: Path | None  # None: written to a stream


def bundle_manifest(store: Store, ref: str) -> tuple[dict[str, Any], list]:
    """The bundle manifest for `ref` ('id' or 'id:quant') and the store files it names."""
    model_id, quant = parse_ref(ref)
    builtin = not store.files(model_id) and bool(store.files(model_id, builtin=True))
    files = store.files(model_id, builtin)
    if not files:
        raise ModelNotFound(f"no model {model_id!r} in {store.models_dir}; `llamabox list` shows what is there")
    if quant:
        picked = [f for f in files if f.quant == quant]
        if not picked:
            raise ModelNotFound(f"{model_id} has no {quant} file; it has {', '.join(f.quant for f in files)}")
        files = picked
    m = store.manifest(model_id, builtin) or {}
    source = m.get("source") if isinstance(m.get("source"), dict) else {}
    manifest = {
        "format": FORMAT, "version": VERSION, "model_id": model_id,
        "chat": m.get("chat") if isinstance(m.get("chat"), bool) else None,
        "source": source, "license": DEMO_NOTE if builtin else LICENSE_NOTE, "created": utc_now(),
        "files": [{"name": f.path.name, "size": f.size, "sha256": f.sha256, "quant": f.quant} for f in files],
    }
    return manifest, files


def export_bundle(store: Store, ref: str, out: Path | BinaryIO, progress: Progress | None = None) -> ExportResult:
    """Write `ref` as a bundle to the file `out` (via a partial name, renamed when complete) or to
    the binary stream `out`. IntegrityError if a file's bytes are not the ones the store recorded;
    then no output file is left (a stream has got a tar without its end: the importer refuses it)."""
    manifest, files = bundle_manifest(store, ref)
    total = sum(f.size for f in files)
    opened: list[BinaryIO] = []
    try:
        # Open every file first, so the bundle holds the files the manifest was read with.
        for f in files:
            fh = open(f.path, "rb")
            opened.append(fh)
            size = os.fstat(fh.fileno()).st_size
            if size != f.size:
                raise IntegrityError(f"{f.path} is damaged (size {size} != manifest {f.size}); not exported. "
                                     f"`llamabox verify {f.model_id}` checks the whole model")
        if isinstance(out, (str, Path)):
            out = Path(out)
            partial = out.with_name(f".{out.name}{TMP_MARK}{os.getpid()}")
            try:
                with open(partial, "wb") as sink:
                    _write_tar(sink, manifest, files, opened, total, progress)
                    sink.flush()
                    os.fsync(sink.fileno())
                os.replace(partial, out)
                fsync_path(out.resolve().parent)
            except BaseException:
                partial.unlink(missing_ok=True)
                raise
            path = out
        else:
            _write_tar(out, manifest, files, opened, total, progress)
            out.flush()
            path = None
    finally:
        for fh in opened:
            fh.close()
    return ExportResult(manifest["model_id"], [f.path.name for f in files], total, path)


def _write_tar(sink: IO[bytes], manifest: dict[str, Any], files: list, opened: list[BinaryIO], total: int,
               progress: Progress | None) -> None:
    tf = tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT)
    try:
        _write_members(tf, manifest, files, opened, total, progress)
    except BaseException:
        # Not a finished tar: no end-of-archive, and nothing more written when the stream object is collected.
        tf.fileobj.closed = tf.closed = True
        raise
    tf.close()  # the end-of-archive blocks: only once every file checked out


def _write_members(tf: tarfile.TarFile, manifest: dict[str, Any], files: list, opened: list[BinaryIO], total: int,
                   progress: Progress | None) -> None:
    data = json.dumps(manifest, indent=2, sort_keys=True).encode()
    info = _tarinfo(MANIFEST_NAME, len(data))
    tf.addfile(info, io.BytesIO(data))
    done = 0

    def on_bytes(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, total)

    for f, fh in zip(files, opened):
        reader = _HashingReader(fh, on_bytes)
        try:
            tf.addfile(_tarinfo(f.path.name, f.size), reader)
        except tarfile.ReadError:  # tarfile's "unexpected end of data": the file shrank under us
            raise IntegrityError(f"{f.path} is damaged (shorter than its manifest's {f.size} bytes); not exported") from None
        digest = reader.h.hexdigest()
        if digest != f.sha256:
            # No end-of-archive: a stream reader sees a truncated tar, the file output is deleted.
            raise IntegrityError(f"{f.path} is damaged (sha256 {digest[:12]}… != manifest {f.sha256[:12]}…); not exported. "
                                 f"`llamabox verify {f.model_id}` checks the whole model")


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = int(time.time())
    info.uname = info.gname = ""
    return info


# --- import ------------------------------------------------------------------------------

@dataclass(frozen=True)
class ImportResult:
    model_id: str
    files: list[str]
    bytes: int
    already_present: bool  # True: the store already held exactly these files; nothing was written


def _check_manifest(data: bytes) -> dict[str, Any]:
    try:
        m = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{MANIFEST_NAME} is not valid JSON ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise BundleError(f"not a llamabox bundle ({MANIFEST_NAME} has no format {FORMAT!r})")
    if m.get("version") != VERSION:
        raise BundleError(f"bundle format version {m.get('version')!r} is not one this llamabox reads (it reads {VERSION}); "
                          f"upgrade llamabox")
    model_id = m.get("model_id")
    if not isinstance(model_id, str):
        raise BundleError("the bundle manifest has no model id")
    try:
        check_model_id(model_id)
    except Exception as e:
        raise BundleError(f"the bundle's model id is unsafe: {e}") from None
    if not isinstance(m.get("source"), dict) or m.get("chat") not in (True, False, None):
        raise BundleError("the bundle manifest has a bad source or chat flag")
    files = m.get("files")
    if not isinstance(files, list) or not files:
        raise BundleError("the bundle manifest lists no files")
    seen = set()
    for e in files:
        if not isinstance(e, dict) or not isinstance(e.get("quant"), str) or not _QUANT.fullmatch(e["quant"]) \
                or e.get("name") != f"{model_id}.{e['quant']}.gguf" or not isinstance(e.get("size"), int) \
                or isinstance(e.get("size"), bool) or e["size"] < 0 \
                or not isinstance(e.get("sha256"), str) or not _SHA.fullmatch(e["sha256"]):
            raise BundleError(f"the bundle manifest has a bad file entry: {json.dumps(e)[:200]}")
        if e["name"] in seen:
            raise BundleError(f"the bundle manifest lists {e['name']} twice")
        seen.add(e["name"])
    return m


def _bundle_source(m: dict[str, Any]) -> dict[str, Any]:
    """The store source of an imported model: the exporter's, which names its checkpoint. A source
    without a fingerprint (should not happen) gets one from the files themselves."""
    source = dict(m["source"])
    if source_fingerprint(source) is None:
        h = hashlib.sha256("".join(sorted(e["sha256"] for e in m["files"])).encode()).hexdigest()
        source["fingerprint"] = f"bundle:{h}"
    return source


def _already_present(store: Store, m: dict[str, Any], fingerprint: str) -> bool:
    try:
        current = store.manifest(m["model_id"])
    except IntegrityError:
        return False
    if not current or source_fingerprint(current.get("source") if isinstance(current.get("source"), dict) else {}) != fingerprint:
        return False
    have = {f.path.name: f for f in store.files(m["model_id"])}
    return all(e["name"] in have and have[e["name"]].sha256 == e["sha256"] and have[e["name"]].size == e["size"]
               and have[e["name"]].path.is_file() and have[e["name"]].path.stat().st_size == e["size"]
               for e in m["files"])


def _check_member(member: tarfile.TarInfo) -> None:
    name = member.name
    if name.startswith("/") or "/" in name or "\\" in name or name in ("", ".", "..") or ".." in name.split("/"):
        raise BundleError(f"bundle member {name!r} is a path, not a plain file name: refused (it could write outside the store)")
    if not member.isreg() or member.issparse():
        kind = "a link" if member.islnk() or member.issym() else "a folder" if member.isdir() else "a device or special file"
        raise BundleError(f"bundle member {name!r} is {kind}; a bundle holds regular files only")


def import_bundle(store: Store, src: Path | BinaryIO, force: bool = False, progress: Progress | None = None) -> ImportResult:
    """Read a bundle from the file or binary stream `src` into the store. BundleError for anything
    foreign, unsafe, truncated, tampered or inconsistent with the bundle manifest; ConversionError
    when the id holds another checkpoint and not `force`. Nothing becomes visible unless every
    file checked out."""
    close = None
    if isinstance(src, (str, Path)):
        close = src = open(src, "rb")
    try:
        try:
            tf = tarfile.open(fileobj=src, mode="r|")
        except tarfile.TarError as e:
            raise BundleError(f"not a llamabox bundle (not an uncompressed tar: {e})") from None
        try:
            return _import(store, tf, force, progress)
        except (tarfile.TarError, EOFError) as e:
            raise BundleError(f"the bundle is truncated or damaged ({e}); nothing was imported") from None
    finally:
        if close is not None:
            close.close()


def _import(store: Store, tf: tarfile.TarFile, force: bool, progress: Progress | None) -> ImportResult:
    first = tf.next()
    if first is None or first.name != MANIFEST_NAME:
        raise BundleError(f"not a llamabox bundle: its first member is {first.name if first else 'missing'!r}, "
                          f"not {MANIFEST_NAME}")
    _check_member(first)
    if first.size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{MANIFEST_NAME} is {first.size} bytes: not a llamabox bundle manifest")
    data = tf.extractfile(first).read()
    if len(data) != first.size:
        raise BundleError("the bundle is truncated (in its manifest)")
    m = _check_manifest(data)
    model_id = m["model_id"]
    entries = {e["name"]: e for e in m["files"]}
    total = sum(e["size"] for e in m["files"])
    source = _bundle_source(m)
    fingerprint = source_fingerprint(source)
    if _already_present(store, m, fingerprint):
        return ImportResult(model_id, list(entries), total, already_present=True)

    store.models_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(store.models_dir).free
    need = total + max(DISK_MARGIN, total // 100)
    if free < need:
        raise BundleError(f"not enough free disk in {store.models_dir}: the bundle needs {need / 2**30:.2f} GiB "
                          f"(with a margin), {free / 2**30:.2f} GiB are free")

    done = 0
    with store.writing(model_id, source, force=force) as w:  # refuses another checkpoint unless force
        partials: dict[str, Path] = {}
        while (member := tf.next()) is not None:  # (iterating tf would start again at the manifest)
            _check_member(member)
            name = member.name
            if name == MANIFEST_NAME or name in partials:
                raise BundleError(f"bundle member {name!r} appears twice")
            e = entries.get(name)
            if e is None:
                raise BundleError(f"bundle member {name!r} is not in the bundle manifest")
            if member.size != e["size"]:
                raise BundleError(f"bundle member {name} is {member.size} bytes; the manifest says {e['size']}")
            partial = w.partial(name)
            partials[name] = partial
            h = hashlib.sha256()
            got = 0
            reader = tf.extractfile(member)
            with open(partial, "wb") as out:
                while chunk := reader.read(CHUNK):
                    h.update(chunk)
                    out.write(chunk)
                    got += len(chunk)
                    done += len(chunk)
                    if progress:
                        progress(done, total)
            if got != e["size"]:
                raise BundleError(f"the bundle is truncated (in {name}); nothing was imported")
            if h.hexdigest() != e["sha256"]:
                raise BundleError(f"{name} in the bundle is damaged or was tampered with (sha256 {h.hexdigest()[:12]}… "
                                  f"!= manifest {e['sha256'][:12]}…); nothing was imported")
        missing = [n for n in entries if n not in partials]
        if missing:
            raise BundleError(f"the bundle is truncated or incomplete: {', '.join(missing)} missing; nothing was imported")
        # Every byte checked out: now place the files (in a staging folder swapped in at the end,
        # or, for more quants of the same checkpoint, each atomically beside the others).
        if isinstance(m.get("chat"), bool) and (not w.in_place or not isinstance(w.manifest.get("chat"), bool)):
            w.manifest["chat"] = m["chat"]
        for name, partial in partials.items():
            w.add_file(partial, entries[name]["quant"], sha256=entries[name]["sha256"])  # hashed as it streamed in
    return ImportResult(model_id, list(entries), total, already_present=False)
