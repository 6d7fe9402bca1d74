"""The local model store: $LLAMABOX_HOME/models/<model_id>/{manifest.json, <model_id>.<quant>.gguf}.

Rules:
  * a model id is a safe file name ([a-z0-9][a-z0-9._-]*, no '..'), so no id
    or file name from a user or a manifest can reach outside the store;
  * every file is written under a temporary name in its final folder, hashed,
    then renamed into place; the manifest is rewritten the same way, last. A
    model appears in `list` only once its manifest names a complete file;
  * the manifest records sha256 and size of every file; `verify` re-hashes.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from runtime.errors import IntegrityError, InvalidModelId, ModelNotFound

log = logging.getLogger(__name__)

CONVERTER_VERSION = "llamabox-convert 1"
_ID = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")   # used with fullmatch: '$' would accept a trailing newline
_QUANT = re.compile(r"[a-z0-9_]{2,10}")
TMP_MARK = ".partial-"
PREFERRED_QUANTS = ("q4_k_m", "q5_k_m", "q8_0", "q6_k", "q4_0", "f16")
BUILTIN_DIR = Path(__file__).parent / "builtin"


def default_home() -> Path:
    return Path(os.environ.get("LLAMABOX_HOME") or Path.home() / ".cache" / "llamabox")


def check_model_id(model_id: str) -> str:
    if not isinstance(model_id, str) or not _ID.fullmatch(model_id) or ".." in model_id:
        raise InvalidModelId("model", f"{model_id!r} is not a valid model id (lowercase letters, digits, '.', '_', '-'; at most 64)")
    return model_id


def parse_ref(ref: str) -> tuple[str, str | None]:
    """'llamav2-7b-chat' or 'llamav2-7b-chat:q8_0' -> (id, quant or None)."""
    model_id, _, quant = ref.partition(":")
    check_model_id(model_id)
    if quant and not _QUANT.fullmatch(quant):
        raise InvalidModelId("model", f"{quant!r} is not a quantization name (e.g. q4_k_m, q8_0)")
    return model_id, quant or None


def sha256_file(path: Path, progress: Callable[[int], None] | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            if progress:
                progress(len(chunk))
    return h.hexdigest()


def utc_now() -> str:
    """Now, UTC, ISO 8601 to the second: the manifest's timestamps."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass(frozen=True)
class ModelFile:
    model_id: str
    quant: str
    path: Path
    sha256: str
    size: int
    builtin: bool = False


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
        out = []
        for name, info in sorted(m["files"].items()):
            # A manifest is data from disk: its file names must be plain names of this model's files.
            if not isinstance(name, str) or "/" in name or "\\" in name or name.startswith(".") or not name.endswith(".gguf"):
                raise IntegrityError(f"manifest of {model_id} names a bad file {name!r}")
            if not isinstance(info, dict) or not isinstance(info.get("sha256"), str) or not isinstance(info.get("size"), int):
                raise IntegrityError(f"manifest of {model_id} has a bad entry for {name}")
            out.append(ModelFile(model_id, str(info.get("quant", "")), folder / name, info["sha256"], info["size"], builtin))
        return out

    def list(self) -> list[ModelFile]:
        out: list[ModelFile] = []
        for builtin, base in ((False, self.models_dir), (True, self.builtin_dir)):
            if not base.is_dir():
                continue
            for d in sorted(base.iterdir()):
                if d.is_dir() and _ID.fullmatch(d.name) and ".." not in d.name and (d / "manifest.json").is_file():
                    out += self.files(d.name, builtin)
        return out

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
        """Re-hash every file of a model; returns the problems found (empty = all good)."""
        builtin = self.manifest(model_id) is None and self.manifest(model_id, builtin=True) is not None
        files = self.files(model_id, builtin)
        if not files:
            raise ModelNotFound(f"no model {model_id!r} in the store")
        problems = []
        for f in files:
            if not f.path.is_file():
                problems.append(f"{f.path.name}: missing")
                continue
            size = f.path.stat().st_size
            if size != f.size:
                problems.append(f"{f.path.name}: size {size} != manifest {f.size}")
                continue
            digest = sha256_file(f.path, progress)
            if digest != f.sha256:
                problems.append(f"{f.path.name}: sha256 {digest[:12]}… != manifest {f.sha256[:12]}…")
        return problems

    # --- writing ----------------------------------------------------------------

    def partial_path(self, model_id: str, name: str) -> Path:
        """Where to write a file before it is complete (same folder, so the rename is atomic)."""
        folder = self._folder(model_id)
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f".{name}{TMP_MARK}{os.getpid()}"

    def clean_partials(self, model_id: str) -> int:
        """Remove leftovers of interrupted writes to this model; returns how many."""
        folder = self._folder(model_id)
        n = 0
        if folder.is_dir():
            for p in folder.iterdir():
                if TMP_MARK in p.name:
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
                    n += 1
        return n

    def add_file(self, model_id: str, partial: Path, quant: str, source: dict[str, Any]) -> ModelFile:
        """Hash a completed partial file, rename it into place, then record it in the manifest."""
        folder = self._folder(model_id)
        name = f"{model_id}.{quant}.gguf"
        digest = sha256_file(partial)
        size = partial.stat().st_size
        final = folder / name
        m = self.manifest(model_id) or {"model_id": model_id, "files": {}, "created": utc_now()}
        if name in m["files"]:
            # Replacing a file: unlist it first, so a crash mid-swap never leaves a listed file
            # whose bytes and manifest disagree.
            del m["files"][name]
            write_json_atomic(folder / "manifest.json", m)
        os.replace(partial, final)
        m["source"] = source  # the latest conversion's source; each file also keeps its own
        m["converter_version"] = CONVERTER_VERSION
        m["files"][name] = {"sha256": digest, "size": size, "quant": quant, "created": utc_now(), "source": source}
        write_json_atomic(folder / "manifest.json", m)
        return ModelFile(model_id, quant, final, digest, size)

    def remove(self, model_id: str) -> None:
        folder = self._folder(model_id)
        if not folder.is_dir():
            raise ModelNotFound(f"no model {model_id!r} in {self.models_dir}")
        # The manifest goes first so a half-removed model is never listed.
        (folder / "manifest.json").unlink(missing_ok=True)
        shutil.rmtree(folder)
