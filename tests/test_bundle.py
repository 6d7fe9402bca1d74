"""Model bundles (issue 13): `llamabox export` / `llamabox import` round-trip a store model as one tar,
and import refuses anything foreign, unsafe, truncated or tampered with, leaving nothing visible."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from convert.bundle import LICENSE_NOTE, MANIFEST_NAME, export_bundle, import_bundle
from convert.store import TMP_MARK, Store
from runtime.errors import BundleError, ConversionError, IntegrityError

QUANTS = ("q8_0", "q4_k_m")


def new_store(root: Path) -> Store:
    return Store(root, builtin_dir=root / "no-builtin")


def leftovers(store: Store) -> list[str]:
    if not store.models_dir.is_dir():
        return []
    return sorted(str(p.relative_to(store.models_dir)) for p in store.models_dir.rglob("*") if TMP_MARK in p.name)


def listed(store: Store) -> list[tuple[str, str]]:
    return sorted((f.model_id, f.quant) for f in store.list())


def llamabox(home: Path, *args, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "LLAMABOX_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "server.cli", *map(str, args)], capture_output=True, timeout=120,
                          env=env, **kw)


def add_model(store: Store, gguf_files, model_id="tiny", repo="someone/tiny-GGUF", quants=QUANTS, chat=True) -> None:
    """A store model made the way `pull --gguf` makes one: prebuilt GGUFs of one checkpoint."""
    with store.writing(model_id, {"repo": repo, "file": "tiny.gguf"}) as w:
        w.manifest["chat"] = chat
        for q in quants:
            partial = w.partial(q)
            shutil.copyfile(gguf_files[q], partial)
            w.add_file(partial, q)


@pytest.fixture()
def src_store(tmp_path, gguf_files) -> Store:
    store = new_store(tmp_path / "src")
    add_model(store, gguf_files)
    return store


@pytest.fixture()
def bundle(src_store, tmp_path) -> Path:
    return export_bundle(src_store, "tiny", tmp_path / "tiny.llamabox.tar").path


def members(data: bytes) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return [(m, tf.extractfile(m).read() if m.isreg() else None) for m in tf.getmembers()]


def build_tar(parts: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for info, data in parts:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def with_manifest(data: bytes, change) -> bytes:
    """The bundle with its manifest edited by change(manifest)."""
    parts = members(data)
    m = json.loads(parts[0][1])
    change(m)
    raw = json.dumps(m).encode()
    parts[0][0].size = len(raw)
    return build_tar([(parts[0][0], raw)] + parts[1:])


def refused(tmp_path: Path, data: bytes, match: str) -> Store:
    """Importing `data` is refused with `match`, and leaves nothing listed and no leftovers."""
    store = new_store(tmp_path / "dst")
    with pytest.raises(BundleError, match=match):
        import_bundle(store, io.BytesIO(data))
    assert listed(store) == [] and leftovers(store) == []
    assert not (tmp_path / "evil.gguf").exists() and not Path("/tmp/llamabox-evil.gguf").exists()
    return store


# --- round trips ---------------------------------------------------------------------------

def test_export_import_round_trip_through_the_cli(src_store, tmp_path):
    dst = tmp_path / "dst"
    out = tmp_path / "work"
    out.mkdir()
    proc = llamabox(src_store.home, "export", "tiny", cwd=out)
    assert proc.returncode == 0, proc.stderr
    path = out / "tiny.llamabox.tar"  # the default name
    parts = members(path.read_bytes())
    assert parts[0][0].name == MANIFEST_NAME and [m.name for m, _ in parts[1:]] == ["tiny.q4_k_m.gguf", "tiny.q8_0.gguf"]
    manifest = json.loads(parts[0][1])
    assert manifest["license"] == LICENSE_NOTE and "Llama 2 Community License" in LICENSE_NOTE
    assert manifest["model_id"] == "tiny" and manifest["chat"] is True and manifest["version"] == 1
    assert [os.path.basename(p) for p in os.listdir(out)] == ["tiny.llamabox.tar"]  # no partial output left

    proc = llamabox(dst, "import", path)
    assert proc.returncode == 0 and b"imported tiny" in proc.stdout, proc.stderr
    store = new_store(dst)
    for q in QUANTS:
        assert store.resolve(f"tiny:{q}").path.read_bytes() == src_store.resolve(f"tiny:{q}").path.read_bytes()
    assert store.manifest("tiny")["chat"] is True
    assert store.manifest("tiny")["source"]["fingerprint"] == src_store.manifest("tiny")["source"]["fingerprint"]
    proc = llamabox(dst, "verify", "tiny")
    assert proc.returncode == 0 and b"tiny: OK" in proc.stdout
    proc = llamabox(dst, "list")
    assert b"q4_k_m" in proc.stdout and b"q8_0" in proc.stdout

    # The same bundle again: a no-op, said so, exit 0.
    before = {p.name: p.stat().st_mtime_ns for p in (dst / "models" / "tiny").iterdir()}
    proc = llamabox(dst, "import", path)
    assert proc.returncode == 0 and b"nothing to import" in proc.stdout, proc.stderr
    assert {p.name: p.stat().st_mtime_ns for p in (dst / "models" / "tiny").iterdir()} == before


def test_export_to_stdout_import_from_stdin_through_a_pipe(src_store, tmp_path):
    env = os.environ
    exp = subprocess.Popen([sys.executable, "-m", "server.cli", "export", "tiny:q8_0", "-o", "-"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, env={**env, "LLAMABOX_HOME": str(src_store.home)})
    imp = subprocess.run([sys.executable, "-m", "server.cli", "import", "-"], stdin=exp.stdout, capture_output=True,
                         timeout=120, env={**env, "LLAMABOX_HOME": str(tmp_path / "dst")})
    exp.stdout.close()
    assert exp.wait(60) == 0 and imp.returncode == 0, (exp.stderr.read(), imp.stderr)
    store = new_store(tmp_path / "dst")
    assert listed(store) == [("tiny", "q8_0")] and store.verify("tiny") == []


def test_more_quants_of_the_same_checkpoint_join_the_model_and_another_checkpoint_needs_force(src_store, gguf_files, tmp_path):
    dst = new_store(tmp_path / "dst")
    add_model(dst, gguf_files, quants=("q8_0",))
    one = export_bundle(src_store, "tiny:q4_k_m", tmp_path / "one.tar").path
    assert not import_bundle(dst, one).already_present
    assert listed(dst) == [("tiny", "q4_k_m"), ("tiny", "q8_0")] and dst.verify("tiny") == []

    other = new_store(tmp_path / "other")
    add_model(other, gguf_files, repo="else/where-GGUF", quants=("q8_0",))
    b = export_bundle(other, "tiny", tmp_path / "other.tar").path
    with pytest.raises(ConversionError, match="another checkpoint.*--force"):
        import_bundle(dst, b)
    assert listed(dst) == [("tiny", "q4_k_m"), ("tiny", "q8_0")]
    proc = llamabox(dst.home, "import", b)
    errors = [ln for ln in proc.stderr.decode().splitlines() if "error" in ln]
    assert proc.returncode == 1 and len(errors) == 1 and "--force" in errors[0], proc.stderr
    assert llamabox(dst.home, "import", b, "--force").returncode == 0
    assert listed(dst) == [("tiny", "q8_0")] and dst.manifest("tiny")["source"]["repo"] == "else/where-GGUF"
    assert leftovers(dst) == []


# --- refusals ------------------------------------------------------------------------------

def test_a_flipped_byte_is_refused_and_leaves_nothing(bundle, tmp_path):
    data = bytearray(bundle.read_bytes())
    with tarfile.open(bundle) as tf:
        member = tf.getmember("tiny.q8_0.gguf")
    data[member.offset_data + member.size // 2] ^= 0x01
    store = refused(tmp_path, bytes(data), "tiny.q8_0.gguf.*tampered")
    # The next write to the store finds nothing to sweep and imports the good bundle.
    import_bundle(store, bundle)
    assert listed(store) == [("tiny", "q4_k_m"), ("tiny", "q8_0")] and leftovers(store) == []


def test_the_cli_says_one_line_and_exits_non_zero(bundle, tmp_path):
    bad = tmp_path / "bad.tar"
    bad.write_bytes(bundle.read_bytes()[:-20000])
    proc = llamabox(tmp_path / "dst", "import", bad)
    errors = [ln for ln in proc.stderr.decode().splitlines() if "error" in ln]
    assert proc.returncode == 1 and len(errors) == 1 and "truncated" in errors[0], proc.stderr
    assert b"\ntiny " not in llamabox(tmp_path / "dst", "list").stdout


@pytest.mark.parametrize("cut", ["in a file", "between files", "in the manifest", "in a header"])
def test_truncation_is_refused(bundle, tmp_path, cut):
    data = bundle.read_bytes()
    with tarfile.open(bundle) as tf:
        second = tf.getmembers()[2]
    end = {"in a file": second.offset_data + 1000, "between files": second.offset,
           "in the manifest": 1200, "in a header": second.offset + 100}[cut]
    refused(tmp_path, data[:end], "truncated|not a llamabox bundle")


def file_member(name: str, data: bytes, kind=tarfile.REGTYPE, link: str = "") -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data if kind == tarfile.REGTYPE else None


@pytest.mark.parametrize("evil", ["../evil.gguf", "/tmp/llamabox-evil.gguf", "sub/tiny.q8_0.gguf", "symlink", "hardlink",
                                  "dir", "fifo"])
def test_members_that_are_paths_links_or_special_files_are_refused(bundle, tmp_path, evil):
    parts = members(bundle.read_bytes())
    payload = parts[2][1]
    name = "tiny.q8_0.gguf"
    member = {
        "symlink": file_member(name, b"", tarfile.SYMTYPE, str(tmp_path / "evil.gguf")),
        "hardlink": file_member(name, b"", tarfile.LNKTYPE, "tiny.q4_k_m.gguf"),
        "dir": file_member(name, b"", tarfile.DIRTYPE),
        "fifo": file_member(name, b"", tarfile.FIFOTYPE),
    }.get(evil) or file_member(evil, payload)
    refused(tmp_path, build_tar(parts[:2] + [member]), "not a plain file name|a link|a folder|special file")


@pytest.mark.parametrize("change", ["size", "sha256", "missing", "extra", "twice"])
def test_a_manifest_that_does_not_match_the_contents_is_refused(bundle, tmp_path, change):
    data = bundle.read_bytes()
    if change == "size":
        data = with_manifest(data, lambda m: m["files"][1].update(size=m["files"][1]["size"] + 1))
        match = "bytes; the manifest says"
    elif change == "sha256":
        data = with_manifest(data, lambda m: m["files"][0].update(sha256="0" * 64))
        match = "tampered"
    elif change == "missing":
        data = build_tar(members(data)[:2])
        match = "missing"
    elif change == "extra":
        data = build_tar(members(data) + [file_member("tiny.f16.gguf", b"GGUF")])
        match = "not in the bundle manifest"
    else:
        data = build_tar(members(data) + [members(data)[2]])
        match = "twice"
    refused(tmp_path, data, match)


def test_foreign_tars_and_unknown_versions_are_refused(bundle, tmp_path):
    parts = members(bundle.read_bytes())
    refused(tmp_path, build_tar(parts[1:] + parts[:1]), "first member is 'tiny.q4_k_m.gguf'")
    refused(tmp_path, build_tar([file_member("README", b"hello")]), "first member")
    refused(tmp_path, b"\x1f\x8b" + os.urandom(4000), "not a llamabox bundle")
    refused(tmp_path, b"", "not a llamabox bundle")
    refused(tmp_path, with_manifest(bundle.read_bytes(), lambda m: m.update(version=2)), "version 2")
    refused(tmp_path, with_manifest(bundle.read_bytes(), lambda m: m.update(format="other")), "not a llamabox bundle")
    refused(tmp_path, with_manifest(bundle.read_bytes(), lambda m: m.update(model_id="../up")), "unsafe")
    refused(tmp_path, with_manifest(bundle.read_bytes(), lambda m: m["files"][0].update(name="../../x.gguf")),
            "bad file entry")


def test_not_enough_disk_is_refused_before_writing(bundle, tmp_path, monkeypatch):
    import convert.bundle as bundle_module

    monkeypatch.setattr(bundle_module.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    refused(tmp_path, bundle.read_bytes(), "not enough free disk")


def test_export_of_a_damaged_store_file_is_refused_and_leaves_no_output(src_store, tmp_path):
    path = src_store.resolve("tiny:q8_0").path
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size: only the sha256 can tell
    path.write_bytes(bytes(data))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(IntegrityError, match="tiny.q8_0.gguf is damaged"):
        export_bundle(src_store, "tiny", out / "t.tar")
    assert list(out.iterdir()) == []
    proc = llamabox(src_store.home, "export", "tiny", "-o", out / "t.tar")
    errors = [ln for ln in proc.stderr.decode().splitlines() if "error" in ln]
    assert proc.returncode == 1 and len(errors) == 1 and "damaged" in errors[0], proc.stderr
    assert list(out.iterdir()) == []
    # A shorter file is refused too, before anything is written.
    path.write_bytes(bytes(data[:-10]))
    with pytest.raises(IntegrityError, match="size"):
        export_bundle(src_store, "tiny:q8_0", out / "t.tar")
    assert list(out.iterdir()) == []


def test_export_of_an_unknown_model_or_quant_is_one_line(src_store, tmp_path):
    for ref, match in (("nope", b"no model 'nope'"), ("tiny:f16", b"tiny has no f16 file")):
        proc = llamabox(src_store.home, "export", ref, "-o", tmp_path / "x.tar")
        assert proc.returncode == 1 and match in proc.stderr, proc.stderr
    assert not (tmp_path / "x.tar").exists()
