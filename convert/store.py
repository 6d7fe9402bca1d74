"""The local model store: $LLAMABOX_HOME/models/<model_id>/{manifest.json, <model_id>.<quant>.gguf}.

Rules:
  * a model id is a safe file name ([a-z0-9][a-z0-9._-]*, no '..', never TMP_MARK), so no id
    or file name from a user or a manifest can reach outside the store, and no id looks
    like a leftover;
  * one writer per model at a time: every write (convert, pull, rm) holds an flock on
    models/.<id>.lock for its whole length. The lock file lives beside the model folder,
    not in it, so it survives the folder being swapped;
  * every file is written under a temporary name (TMP_MARK), hashed, fsynced, then renamed
    into place; the manifest is rewritten the same way, last. A model appears in `list`
    only once its manifest names a complete file;
  * a model holds files from one checkpoint only: the manifest's `source.fingerprint`
    says which, and a write from another checkpoint is refused unless forced; a forced
    write, and the first write of a new id, build the whole model in a staging folder
    models/.<id>.partial-<pid> that is swapped in only when complete;
  * leftovers of killed writes (names with TMP_MARK) are swept at the start of every
    write, for every model whose lock nobody holds: an unheld lock means the writer is
    gone, because the kernel drops an flock when its process dies;
  * the manifest records sha256 and size of every file; `verify` re-hashes, and every
    load checks the size and re-hashes a file whose (size, mtime, ctime, inode) changed
    since it was last verified (cached in models/<id>/.verified.json).
"""
from __future__ import annotations

import contextlib
import ctypes
import datetime as _dt
import errno
import fcntl
import functools
import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from runtime.errors import ConversionError, IntegrityError, InvalidModelId, ModelNotFound

log = logging.getLogger(__name__)

CONVERTER_VERSION = "llamabox-convert 1"
_ID = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")   # used with fullmatch: '$' would accept a trailing newline
_QUANT = re.compile(r"[a-z0-9_]{2,10}")
_COMMIT = re.compile(r"[0-9a-f]{40}")
TMP_MARK = ".partial-"
VERIFIED = ".verified.json"   # per-model cache of files whose sha256 was checked, and as which (size, times, inode)
PREFERRED_QUANTS = ("q4_k_m", "q5_k_m", "q8_0", "q6_k", "q4_0", "f16")
BUILTIN_DIR = Path(__file__).parent / "builtin"


def default_home() -> Path:
    return Path(os.environ.get("LLAMABOX_HOME") or Path.home() / ".cache" / "llamabox")


def check_model_id(model_id: str) -> str:
    # TMP_MARK is refused because the sweep treats any name carrying it as an interrupted write's leftover.
    if not isinstance(model_id, str) or not _ID.fullmatch(model_id) or ".." in model_id or TMP_MARK in model_id:
        raise InvalidModelId("model", f"{model_id!r} is not a valid model id (lowercase letters, digits, '.', '_', '-'; "
                                      f"at most 64; never {TMP_MARK!r})")
    return model_id


def model_id_for(src: Path) -> str:
    """A store id from a folder name: 'Llama-2-7b-chat-hf' -> 'llama-2-7b-chat-hf'."""
    return check_model_id(re.sub(r"[^a-z0-9._-]+", "-", src.name.lower()).strip("-._")[:64] or "model")


def _is_model_id(name: str) -> bool:
    try:
        check_model_id(name)
    except InvalidModelId:
        return False
    return True


def parse_ref(ref: str) -> tuple[str, str | None]:
    """'llamav2-7b-chat' or 'llamav2-7b-chat:q8_0' -> (id, quant or None)."""
    model_id, _, quant = ref.partition(":")
    check_model_id(model_id)
    if quant and not _QUANT.fullmatch(quant):
        raise InvalidModelId("model", f"{quant!r} is not a quantization name (e.g. q4_k_m, q8_0)")
    return model_id, quant or None


def hash_file(path: Path, h, progress: Callable[[int], None] | None = None) -> str:
    """Feed a file to a hashlib object (which may already hold a prefix, as git's blob ids do)."""
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            if progress:
                progress(len(chunk))
    return h.hexdigest()


def sha256_file(path: Path, progress: Callable[[int], None] | None = None) -> str:
    return hash_file(path, hashlib.sha256(), progress)


def utc_now() -> str:
    """Now, UTC, ISO 8601 to the second: the manifest's timestamps."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a folder's entries (after a rename in it), to disk.

    A rename is only durable once the folder holding it is fsynced; a renamed file's bytes
    only once the file itself was. Without both, a power cut can leave a listed file empty.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def hold_flock(path: Path, what: str, wait: bool = True) -> Iterator[bool]:
    """Hold an exclusive flock on path (created if needed); yields False without waiting if wait=False
    and another process holds it. The kernel releases an flock when its holder exits, however it
    exits, so nobody waits on a dead process. The lock file is never deleted: deleting it while
    someone waits on it would let two holders in. Not re-entrant: two opens in one process conflict.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                yield False
                return
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
            log.info("waiting for another llamabox process (pid %s) that is writing %s", holder, what)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)  # who holds it, for the message above
        yield True
    finally:
        os.close(fd)  # releases the flock


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def source_fingerprint(source: dict[str, Any]) -> str | None:
    """Which checkpoint a manifest `source` describes, as a string two writes can compare.

    Written explicitly since fingerprints exist; derived for older manifests from what they
    recorded: a Hub checkpoint is its repo at a resolved commit, a prebuilt GGUF its repo (the
    files of one GGUF repo are quantizations of one checkpoint). None: unknown.
    """
    fp = source.get("fingerprint")
    if isinstance(fp, str) and fp:
        return fp
    repo = source.get("repo")
    if not isinstance(repo, str):
        return None
    if "file" in source:
        return f"hub-gguf:{repo}"
    rev = source.get("revision")
    return f"hub:{repo}@{rev}" if isinstance(rev, str) and _COMMIT.fullmatch(rev) else None


# --- swapping a folder into place ----------------------------------------------------------

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


@functools.lru_cache(maxsize=1)
def _renameat2():
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28; absent on macOS and musl
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux RENAME_EXCHANGE). False: not supported here."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # old kernel, or a filesystem without it
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


@dataclass(frozen=True)
class ModelFile:
    model_id: str
    quant: str
    path: Path
    sha256: str
    size: int
    builtin: bool = False
    chat: bool | None = None  # the manifest's "chat": True chat, False base (even if the GGUF has a template), None unknown


@dataclass(frozen=True)
class BrokenModel:
    """A model folder whose manifest cannot be read: `list` names it, `verify` calls it DAMAGED."""
    model_id: str
    builtin: bool
    reason: str


class Store:
    def __init__(self, home: Path | None = None, builtin_dir: Path = BUILTIN_DIR):
        self.home = home or default_home()
        self.models_dir = self.home / "models"
        self.builtin_dir = builtin_dir

    # --- reading ----------------------------------------------------------------

    def _folder(self, model_id: str) -> Path:
        return self.models_dir / check_model_id(model_id)

    def manifest(self, model_id: str, builtin: bool = False) -> dict[str, Any] | None:
        folder = (self.builtin_dir / check_model_id(model_id)) if builtin else self._folder(model_id)
        path = folder / "manifest.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise IntegrityError(f"{path} is corrupt ({e}); remove it with `llamabox rm {model_id}`") from None
        if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
            raise IntegrityError(f"{path} is not a llamabox manifest")
        return data

    def files(self, model_id: str, builtin: bool = False) -> list[ModelFile]:
        m = self.manifest(model_id, builtin)
        if m is None:
            return []
        folder = (self.builtin_dir if builtin else self.models_dir) / model_id
        chat = m.get("chat") if isinstance(m.get("chat"), bool) else None
        out = []
        for name, info in sorted(m["files"].items()):
            # A manifest is data from disk: its file names must be plain names of this model's files.
            if not isinstance(name, str) or "/" in name or "\\" in name or name.startswith(".") or not name.endswith(".gguf"):
                raise IntegrityError(f"manifest of {model_id} names a bad file {name!r}")
            if not isinstance(info, dict) or not isinstance(info.get("sha256"), str) or not isinstance(info.get("size"), int):
                raise IntegrityError(f"manifest of {model_id} has a bad entry for {name}")
            out.append(ModelFile(model_id, str(info.get("quant", "")), folder / name, info["sha256"], info["size"], builtin, chat))
        return out

    def scan(self) -> tuple[list[ModelFile], list[BrokenModel]]:
        """Every listed file, and every model whose manifest cannot be read: one bad model
        must not hide the others."""
        files: list[ModelFile] = []
        broken: list[BrokenModel] = []
        for builtin, base in ((False, self.models_dir), (True, self.builtin_dir)):
            if not base.is_dir():
                continue
            for d in sorted(base.iterdir()):
                if d.is_dir() and _is_model_id(d.name) and (d / "manifest.json").is_file():
                    try:
                        files += self.files(d.name, builtin)
                    except (IntegrityError, OSError) as e:
                        broken.append(BrokenModel(d.name, builtin, str(e)))
        return files, broken

    def list(self) -> list[ModelFile]:
        files, broken = self.scan()
        for b in broken:
            log.warning("skipping %s: %s", b.model_id, b.reason)
        return files

    def resolve(self, ref: str) -> ModelFile:
        """A store reference ('id' or 'id:quant') to one file. User store first, then built-in models."""
        model_id, quant = parse_ref(ref)
        for builtin in (False, True):
            files = self.files(model_id, builtin)
            if not files:
                continue
            if quant:
                for f in files:
                    if f.quant == quant:
                        return f
                raise ModelNotFound(f"{model_id} has no {quant} file; it has {', '.join(f.quant for f in files)}")
            for q in PREFERRED_QUANTS:
                for f in files:
                    if f.quant == q:
                        return f
            return files[0]
        raise ModelNotFound(
            f"no model {model_id!r} in {self.models_dir}; `llamabox list` shows what is there, "
            f"`llamabox pull {model_id}` fetches it"
        )

    def verify(self, model_id: str, progress: Callable[[int], None] | None = None) -> list[str]:
        """Re-hash every file of a model; returns the problems found (empty = all good).

        An unreadable manifest is a problem of this model, reported like the others."""
        builtin = not (self._folder(model_id) / "manifest.json").is_file() and \
            (self.builtin_dir / model_id / "manifest.json").is_file()
        try:
            files = self.files(model_id, builtin)
        except IntegrityError as e:
            return [str(e)]
        if not files:
            raise ModelNotFound(f"no model {model_id!r} in the store")
        return [p for p in (self._check(f, full=True, progress=progress) for f in files) if p]

    def check_before_load(self, mf: ModelFile) -> None:
        """Refuse (IntegrityError) a store file that no longer matches its manifest.

        The size is checked on every load; the full sha256 only when the file changed (size,
        mtime, ctime or inode) since it was last verified, so an untouched 4 GB file loads
        without a 4 GB read. Built-in models are small and live in the package, which is not
        ours to write a cache into: they are hashed every time.
        """
        problem = self._check(mf, full=False)
        if problem is None:
            return
        if mf.builtin:
            raise IntegrityError(f"the built-in model is damaged ({problem}); reinstall llamabox")
        raise IntegrityError(f"{mf.path} is damaged ({problem}); `llamabox verify {mf.model_id}` checks the whole model, "
                             f"and pulling or converting it again replaces the file")

    def _check(self, mf: ModelFile, full: bool, progress: Callable[[int], None] | None = None) -> str | None:
        """One file against its manifest entry: None if it matches, else the problem."""
        try:
            st = mf.path.stat()
        except FileNotFoundError:
            return f"{mf.path.name}: missing"
        if st.st_size != mf.size:
            return f"{mf.path.name}: size {st.st_size} != manifest {mf.size}"
        if not full and not mf.builtin:
            if self._read_verified(mf.path.parent).get(mf.path.name) == _verified_entry(st, mf.sha256):
                return None
            log.info("%s changed since it was last verified (or never was): re-hashing it", mf.path)
        digest = sha256_file(mf.path, progress)
        if digest != mf.sha256:
            return f"{mf.path.name}: sha256 {digest[:12]}… != manifest {mf.sha256[:12]}…"
        if not mf.builtin:
            # Only a cache: skipped while another process writes this model (it owns the folder),
            # and on a read-only store, which still loads, re-hashing each time.
            try:
                with self._lock(mf.model_id, wait=False) as held:
                    if held:
                        self._record_verified(mf.path.parent, mf.path.name, st, mf.sha256)
            except OSError as e:
                log.info("cannot record that %s was verified: %s", mf.path, e)
        return None

    def _read_verified(self, folder: Path) -> dict[str, Any]:
        try:
            data = json.loads((folder / VERIFIED).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}  # no cache, or a damaged one: everything gets re-hashed, which is safe
        return data if isinstance(data, dict) else {}

    def _record_verified(self, folder: Path, name: str, st: os.stat_result, sha256: str) -> None:
        """Remember that `name`, as it is now on disk, hashed to `sha256`. Caller holds the model's lock."""
        cache = self._read_verified(folder)
        cache[name] = _verified_entry(st, sha256)
        write_json_atomic(folder / VERIFIED, cache)

    # --- locking and leftovers ----------------------------------------------------

    def _lock_path(self, model_id: str) -> Path:
        return self.models_dir / f".{check_model_id(model_id)}.lock"

    @contextlib.contextmanager
    def _lock(self, model_id: str, wait: bool = True) -> Iterator[bool]:
        """Hold the model's write lock; yields False (without waiting) if wait=False and it is taken.

        A second writer waits rather than fails: what it wants (another quant, the same model
        again) is usually fine once the first is done. See hold_flock.
        """
        with hold_flock(self._lock_path(model_id), model_id, wait) as held:
            yield held

    def sweep_partials(self, holding: str | None = None) -> int:
        """Remove leftovers of interrupted writes anywhere in the store; returns how many.

        A leftover is a name with TMP_MARK: a staging folder models/.<id>.partial-<pid>[-old|-rm],
        or a file models/<id>/…partial-<pid>. It is stale when its model's lock is free (a live
        writer holds it). `holding`: the id whose lock the caller already holds, and so whose
        leftovers are stale too.
        """
        if not self.models_dir.is_dir():
            return 0
        owners: set[str] = set()
        for entry in self.models_dir.iterdir():
            if entry.name.startswith(".") and TMP_MARK in entry.name:
                owners.add(entry.name[1:entry.name.index(TMP_MARK)])
            elif entry.is_dir() and not entry.is_symlink() and any(TMP_MARK in p.name for p in entry.iterdir()):
                owners.add(entry.name)
        n = 0
        for model_id in sorted(o for o in owners if _is_model_id(o)):  # anything else is not ours to delete
            if model_id == holding:
                n += self._remove_partials(model_id)
                continue
            with self._lock(model_id, wait=False) as held:
                if held:
                    n += self._remove_partials(model_id)
        return n

    def _remove_partials(self, model_id: str) -> int:
        """Caller holds the model's lock."""
        leftovers = list(self.models_dir.glob(f".{model_id}{TMP_MARK}*"))
        folder = self.models_dir / model_id
        if folder.is_dir() and not folder.is_symlink():
            leftovers += [p for p in folder.iterdir() if TMP_MARK in p.name]
        for p in leftovers:
            log.info("removing %s, left by an interrupted write", p)
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)
        return len(leftovers)

    # --- writing ----------------------------------------------------------------

    def check_writable(self, model_id: str, accepts: Callable[[str], bool], force: bool) -> bool:
        """May a write whose checkpoint `accepts` approves go into `model_id`? True: into the model
        as it is (same checkpoint); False: as a whole new model, staged and swapped in (a new id,
        or force). Refuses (ConversionError) to mix checkpoints or to replace an unreadable or
        foreign folder without force."""
        folder = self._folder(model_id)
        if not folder.exists():
            return False
        try:
            m = self.manifest(model_id)
        except IntegrityError as e:
            if force:
                return False
            raise ConversionError(f"{e}; or rerun with --force to replace the whole model") from None
        if m is None:
            # Leftovers of interrupted writes do not make a folder foreign (a write sweeps them first).
            if force or all(TMP_MARK in p.name for p in folder.iterdir()):
                return False
            raise ConversionError(f"{folder} exists but is not a llamabox model (no manifest.json); "
                                  f"move it away, or rerun with --force to replace it")
        old = m.get("source") if isinstance(m.get("source"), dict) else {}
        fp = source_fingerprint(old)
        if fp is not None and accepts(fp):
            return True
        if force:
            return False
        raise ConversionError(f"{model_id} already holds another checkpoint ({fp or 'of unknown origin'}); "
                              f"rerun with --force to replace the whole model")

    @contextlib.contextmanager
    def writing(self, model_id: str, source: dict[str, Any], force: bool = False) -> Iterator["ModelWrite"]:
        """One write to one model, under its lock: add files with ModelWrite.add_file.

        Same checkpoint as the model's: files are added to it in place, each atomically.
        A new id, or force: the whole model is built in a staging folder and swapped in at
        the end, so an interrupted write leaves the old model (or no model) as it was.
        """
        fingerprint = source_fingerprint(source)
        if fingerprint is None:
            raise ValueError("a store write needs a source with a checkpoint fingerprint")
        source = {**source, "fingerprint": fingerprint}
        with self._lock(model_id):
            self.sweep_partials(holding=model_id)
            in_place = self.check_writable(model_id, lambda fp: fp == fingerprint, force)
            w = ModelWrite(self, model_id, source, in_place)
            try:
                yield w
                w.commit()
            except BaseException:
                w.abort()
                raise

    def remove(self, model_id: str) -> None:
        folder = self._folder(model_id)
        if not folder.is_dir():
            raise ModelNotFound(f"no model {model_id!r} in {self.models_dir}")
        with self._lock(model_id):
            self.sweep_partials(holding=model_id)
            if not folder.is_dir():
                raise ModelNotFound(f"no model {model_id!r} in {self.models_dir}")
            # One rename makes the whole model disappear; a crash while deleting leaves a
            # partial-marked folder that the next write sweeps.
            trash = self.models_dir / f".{model_id}{TMP_MARK}{os.getpid()}-rm"
            os.rename(folder, trash)
            fsync_path(self.models_dir)
            shutil.rmtree(trash)


def _verified_entry(st: os.stat_result, sha256: str) -> dict[str, Any]:
    # ctime too: unlike mtime, no tool can set it back after changing the bytes.
    return {"sha256": sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "ino": st.st_ino}


class ModelWrite:
    """Files going into one model during Store.writing; `folder` is where partial files go."""

    def __init__(self, store: Store, model_id: str, source: dict[str, Any], in_place: bool):
        self.store = store
        self.model_id = model_id
        self.source = source
        self.in_place = in_place
        self.target = store.models_dir / model_id
        if in_place:
            self.folder = self.target
            self.manifest = store.manifest(model_id)
        else:
            self.folder = store.models_dir / f".{model_id}{TMP_MARK}{os.getpid()}"
            self.folder.mkdir(parents=True)
            self.manifest = {"model_id": model_id, "files": {}, "created": utc_now()}

    def partial(self, name: str) -> Path:
        """Where to write a file (or folder) before it is complete: same folder, so the rename is atomic."""
        return self.folder / f".{name}{TMP_MARK}{os.getpid()}"

    def add_file(self, partial: Path, quant: str, sha256: str | None = None) -> ModelFile:
        """Hash a completed partial file, make it durable, rename it into place, then record it.
        sha256: the digest when the caller has just computed it from these very bytes (a bundle
        import hashes while it streams, a Hub download is checked against the Hub's): a multi-GB
        file is then not read a second time."""
        name = f"{self.model_id}.{quant}.gguf"
        digest = sha256 or sha256_file(partial)
        size = partial.stat().st_size
        fsync_path(partial)
        final = self.folder / name
        m = self.manifest
        if name in m["files"]:
            # Replacing a file: unlist it first, so a crash mid-swap never leaves a listed file
            # whose bytes and manifest disagree.
            del m["files"][name]
            write_json_atomic(self.folder / "manifest.json", m)
        os.replace(partial, final)
        fsync_path(self.folder)
        m["source"] = self.source
        m["converter_version"] = CONVERTER_VERSION
        m["files"][name] = {"sha256": digest, "size": size, "quant": quant, "created": utc_now(), "source": self.source}
        write_json_atomic(self.folder / "manifest.json", m)
        # We just hashed these bytes: the first load need not hash them again.
        self.store._record_verified(self.folder, name, final.stat(), digest)
        return ModelFile(self.model_id, quant, self.target / name, digest, size)

    def commit(self) -> None:
        if self.in_place:
            return
        if not self.manifest["files"]:
            self.abort()  # nothing was written: no empty model
            return
        models_dir = self.store.models_dir
        fsync_path(self.folder)
        if not self.target.exists():
            os.rename(self.folder, self.target)
            old = None
        elif _exchange(self.folder, self.target):
            old = self.folder  # the staging name now holds the old model
        else:
            # No atomic exchange (not Linux, old kernel, some filesystems): two renames. Between
            # them the id has no model at all (never a mix of two); a crash there leaves both
            # folders partial-marked, and the next write sweeps them.
            old = models_dir / f".{self.model_id}{TMP_MARK}{os.getpid()}-old"
            os.rename(self.target, old)
            try:
                os.rename(self.folder, self.target)
            except BaseException:
                os.rename(old, self.target)  # put the old model back rather than leave none
                raise
        fsync_path(models_dir)
        if old is not None:
            shutil.rmtree(old)
        log.info("%s: %s", self.model_id, "replaced" if old is not None else "created")

    def abort(self) -> None:
        if self.in_place:
            for p in self.folder.glob(f"*{TMP_MARK}{os.getpid()}"):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        else:
            shutil.rmtree(self.folder, ignore_errors=True)
