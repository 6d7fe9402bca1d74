"""The store under hostile conditions (review issue 9): never delete the user's folders, never mix
two checkpoints in one model, survive kills, concurrent writers and one corrupt manifest, and
refuse to load a file that changed since it was verified. llama.cpp is real throughout."""
from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub.utils import close_session

from fakehub import FakeHub, isolate_hf
from tinyllama import TinyConfig, make_tiny_llama

import convert.store as store_module
from convert.pipeline import checkpoint_fingerprint, convert
from convert.pull import pull
from convert.store import TMP_MARK, Store, check_model_id, parse_ref
from runtime.errors import ConversionError, IntegrityError, InvalidModelId

TESTS = os.path.dirname(__file__)


@pytest.fixture(scope="module")
def other_hf(tmp_path_factory) -> Path:
    """A second tiny checkpoint, different weights from tiny_hf's."""
    folder = tmp_path_factory.mktemp("other-hf")
    make_tiny_llama(folder, TinyConfig(), "F32", seed=1)
    return folder


def new_store(tmp_path) -> Store:
    return Store(tmp_path / "home", builtin_dir=tmp_path / "no-builtin")


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(store: Store) -> list[str]:
    """Every name in the store that carries the partial mark."""
    return sorted(str(p.relative_to(store.models_dir)) for p in store.models_dir.rglob("*") if TMP_MARK in p.name)


def listed(store: Store) -> list[tuple[str, str]]:
    return sorted((f.model_id, f.quant) for f in store.list())


def run_script(code: str, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout)


def llamabox(home: Path, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "LLAMABOX_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "server.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=120, env=env)


# --- 1. pull never deletes a folder it did not download ---------------------------------------

def test_pull_from_local_folders_leaves_them_untouched(tiny_hf, other_hf, tmp_path, monkeypatch):
    store = new_store(tmp_path)
    # A folder named like a Hub repo id, under the current directory, and a plain absolute path.
    monkeypatch.chdir(tmp_path)
    repo_like = tmp_path / "meta-llama" / "Llama-2-7b-chat-hf"
    shutil.copytree(tiny_hf[0], repo_like)
    elsewhere = tmp_path / "my checkpoints" / "other"
    shutil.copytree(other_hf, elsewhere)
    before = {repo_like: snapshot(repo_like), elsewhere: snapshot(elsewhere)}

    pull("tiny-local", quants="q8_0", repo="meta-llama/Llama-2-7b-chat-hf", store=store)
    assert snapshot(repo_like) == before[repo_like]
    assert store.manifest("tiny-local")["source"]["path"] == str(repo_like.resolve())
    with pytest.raises(ConversionError, match=r"tiny-local.*--force"):  # another checkpoint: refused
        pull("tiny-local", quants="q8_0", repo=str(elsewhere), store=store)
    pull("tiny-local", quants="q8_0", repo=str(elsewhere), force=True, store=store)
    assert store.manifest("tiny-local")["source"]["path"] == str(elsewhere.resolve())

    for folder, files in before.items():
        assert folder.is_dir() and snapshot(folder) == files  # every file still there, byte for byte


# --- 2. one model, one checkpoint -------------------------------------------------------------

KILLED_CONVERT = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from pathlib import Path
import convert.pipeline as pipeline
from convert.store import Store

real_quantize = pipeline.quantize
def quantize_then_power_cut(src, dst, q, n):
    # The first quant type completes and is placed; the process dies before the second.
    if q != "q4_k_m":
        os.kill(os.getpid(), signal.SIGKILL)
    return real_quantize(src, dst, q, n)
pipeline.quantize = quantize_then_power_cut
extra = {{"force": True}} if sys.argv[1] == "force" else {{}}
pipeline.convert(Path({src!r}), ["q4_k_m", "q8_0"], store=Store(Path({home!r})), model_id="m", **extra)
"""


def test_a_model_never_mixes_checkpoints_even_when_killed(tiny_hf, other_hf, tmp_path):
    store = new_store(tmp_path)
    convert(tiny_hf[0], ["q8_0"], store=store, model_id="m")
    code = KILLED_CONVERT.format(tests=TESTS, src=str(other_hf), home=str(store.home))

    # The review's case: another checkpoint into "m", killed after its first quant type.
    # Without --force it is refused before anything is written.
    proc = run_script(code, "plain")
    assert proc.returncode == 1 and "--force" in proc.stderr and "ConversionError" in proc.stderr, proc.stderr
    assert listed(store) == [("m", "q8_0")] and store.verify("m") == []
    fp_a, fp_b = checkpoint_fingerprint(tiny_hf[0]), checkpoint_fingerprint(other_hf)
    assert fp_a != fp_b and store.manifest("m")["source"]["fingerprint"] == fp_a

    # With --force the new model is built aside: killed, the old one is still whole.
    proc = run_script(code, "force")
    assert proc.returncode == -9, proc.stderr
    assert listed(store) == [("m", "q8_0")] and store.verify("m") == []
    assert store.manifest("m")["source"]["fingerprint"] == fp_a
    assert all(name.startswith(f".m{TMP_MARK}") for name in leftovers(store)) and leftovers(store)

    # Forced again, to completion: the whole model is B's; the killed attempt's staging is swept.
    convert(other_hf, ["q4_k_m"], store=store, model_id="m", force=True)
    assert listed(store) == [("m", "q4_k_m")] and store.verify("m") == []
    assert store.manifest("m")["source"]["fingerprint"] == fp_b
    assert leftovers(store) == []
    # Same checkpoint: quant types are added in place, as before.
    convert(other_hf, ["q8_0"], store=store, model_id="m")
    assert listed(store) == [("m", "q4_k_m"), ("m", "q8_0")] and store.verify("m") == []


def test_cli_refuses_another_checkpoint_in_one_line_and_force_replaces(tiny_hf, other_hf, tmp_path):
    proc = llamabox(tmp_path, "convert", tiny_hf[0], "--id", "m", "--quant", "q8_0")
    assert proc.returncode == 0, proc.stderr
    proc = llamabox(tmp_path, "convert", other_hf, "--id", "m", "--quant", "q8_0")
    errors = [ln for ln in proc.stderr.splitlines() if "error" in ln]
    assert proc.returncode == 1 and len(errors) == 1 and "m already holds another checkpoint" in errors[0] \
        and "--force" in errors[0], proc.stderr
    proc = llamabox(tmp_path, "convert", other_hf, "--id", "m", "--quant", "q8_0", "--force")
    assert proc.returncode == 0, proc.stderr
    m = json.loads((tmp_path / "models" / "m" / "manifest.json").read_text())
    assert m["source"]["fingerprint"] == checkpoint_fingerprint(other_hf)


def test_a_failed_convert_of_a_new_id_leaves_no_model_folder(tiny_hf, tmp_path):
    bad = tmp_path / "bad-hf"
    shutil.copytree(tiny_hf[0], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["intermediate_size"] *= 2  # the weights no longer match: export fails half-way through
    (bad / "config.json").write_text(json.dumps(cfg))
    store = new_store(tmp_path)
    with pytest.raises(ConversionError, match="shape"):
        convert(bad, ["q8_0"], store=store, model_id="bad")
    assert not (store.models_dir / "bad").exists()
    assert leftovers(store) == []


@pytest.fixture
def gguf_hub(tmp_path, monkeypatch, gguf_files):
    with FakeHub() as server:
        isolate_hf(monkeypatch, server.url, tmp_path / "hf-home")
        server.add_repo("someone/tiny-GGUF", {"tiny.Q8_0.gguf": gguf_files["q8_0"].read_bytes(),
                                              "tiny.Q4_K_M.gguf": gguf_files["q4_k_m"].read_bytes()})
        try:
            yield server
        finally:
            close_session()


def test_prebuilt_ggufs_join_one_model_and_never_join_a_converted_one(gguf_hub, tiny_hf, tmp_path):
    store = new_store(tmp_path)
    pull("g", gguf="someone/tiny-GGUF:tiny.Q8_0.gguf", store=store)
    pull("g", gguf="someone/tiny-GGUF:tiny.Q4_K_M.gguf", store=store)  # same repo: same checkpoint
    assert listed(store) == [("g", "q4_k_m"), ("g", "q8_0")] and store.verify("g") == []
    assert leftovers(store) == []

    convert(tiny_hf[0], ["q8_0"], store=store, model_id="c")
    gguf_hub.clear_requests()
    with pytest.raises(ConversionError, match=r"c already holds another checkpoint.*--force"):
        pull("c", gguf="someone/tiny-GGUF:tiny.Q4_K_M.gguf", store=store)
    assert gguf_hub.content_gets("tiny.Q4_K_M.gguf") == []  # refused before downloading
    assert listed(store) == [("c", "q8_0"), ("g", "q4_k_m"), ("g", "q8_0")]
    assert store.manifest("g")["source"]["fingerprint"] == "hub-gguf:someone/tiny-GGUF"


def test_pull_from_the_hub_into_an_id_holding_another_checkpoint_is_refused_before_downloading(tiny_hf, tmp_path,
                                                                                               monkeypatch):
    folder, _ = tiny_hf
    with FakeHub() as hub:
        isolate_hf(monkeypatch, hub.url, tmp_path / "hf-home")
        hub.add_repo("meta-llama/Llama-2-7b-chat-hf", {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()})
        try:
            store = new_store(tmp_path)
            convert(folder, ["q8_0"], store=store, model_id="llamav2-7b-chat")  # converted from a local folder
            hub.clear_requests()
            with pytest.raises(ConversionError, match=r"llamav2-7b-chat already holds another checkpoint.*--force"):
                pull("llamav2-7b-chat", store=store)
            assert hub.requests == []  # not one byte of a 13 GB download
        finally:
            close_session()


# --- 3. leftovers, locks, ids -----------------------------------------------------------------

def test_every_store_write_sweeps_dead_writers_leftovers_but_not_a_live_ones(tiny_hf, tmp_path):
    store = new_store(tmp_path)
    models = store.models_dir
    # A dead writer's staging folder for "b", a dead writer's partial inside "a"'s folder,
    # and a live writer of "c" (we hold its lock, as a running convert does).
    (models / f".b{TMP_MARK}99998").mkdir(parents=True)
    (models / f".b{TMP_MARK}99998" / "b.q8_0.gguf").write_bytes(b"x" * 100)
    (models / "a").mkdir()
    (models / "a" / f".a.q8_0.gguf{TMP_MARK}99999").write_bytes(b"x" * 100)
    (models / "c").mkdir()
    live = models / "c" / f".c.q8_0.gguf{TMP_MARK}12345"
    live.write_bytes(b"x" * 100)
    lock_fd = os.open(models / ".c.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(lock_fd, fcntl.LOCK_EX)
    try:
        convert(tiny_hf[0], ["q8_0"], store=store, model_id="d")  # a write to another model
        assert leftovers(store) == [str(live.relative_to(models))]
    finally:
        os.close(lock_fd)  # the writer of "c" dies
    store.remove("d")  # rm is a store write too
    assert leftovers(store) == []


def test_model_ids_never_carry_the_partial_mark():
    for bad in (f"llama{TMP_MARK}2", f"x{TMP_MARK}", f"a.b{TMP_MARK}c-d"):
        with pytest.raises(InvalidModelId):
            check_model_id(bad)
        with pytest.raises(InvalidModelId):
            parse_ref(f"{bad}:q8_0")
    assert check_model_id("llama.partial2") == "llama.partial2"


TWO_WRITERS = """
import logging, sys, time
sys.path.insert(0, {tests!r})
from pathlib import Path
from convert.pipeline import convert
from convert.store import Store
logging.basicConfig(level=logging.INFO)
sync = Path({sync!r})
def wait_for(name):
    deadline = time.monotonic() + 60
    while not (sync / name).exists():
        if time.monotonic() > deadline:
            sys.exit("timed out waiting for " + name)
        time.sleep(0.01)
if sys.argv[1] == "first":
    def progress(done, total):
        if done >= total // 2 and not (sync / "first-writing").exists():
            (sync / "first-writing").touch()
            wait_for("second-starting")
            time.sleep(1.0)  # the second writer's convert runs meanwhile
    convert(Path({src!r}), ["q8_0"], store=Store(Path({home!r})), model_id="tiny", progress=progress)
else:
    wait_for("first-writing")
    (sync / "second-starting").touch()
    convert(Path({src!r}), ["q4_k_m"], store=Store(Path({home!r})), model_id="tiny")
"""


def test_two_processes_writing_one_model_keep_both_files(tiny_hf, tmp_path):
    store = new_store(tmp_path)
    sync = tmp_path / "sync"
    sync.mkdir()
    code = TWO_WRITERS.format(tests=TESTS, sync=str(sync), src=str(tiny_hf[0]), home=str(store.home))
    # The second starts while the first is half-way through its F16 pass.
    procs = [subprocess.Popen([sys.executable, "-c", code, role], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for role in ("first", "second")]
    outs = [p.communicate(timeout=180) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err
    assert "waiting for another llamabox process" in outs[1][1]  # it really met the lock
    assert listed(store) == [("tiny", "q4_k_m"), ("tiny", "q8_0")]
    assert store.verify("tiny") == [] and leftovers(store) == []


# --- 4. fsync --------------------------------------------------------------------------------

def test_finished_files_and_their_renames_are_fsynced(tiny_hf, tmp_path, monkeypatch):
    synced: list[tuple[int, str]] = []  # (inode, path at the time of the fsync)
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append((os.fstat(fd).st_ino, os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    store = new_store(tmp_path)
    reports = convert(tiny_hf[0], ["q8_0", "q4_k_m"], store=store, model_id="m")
    for r in reports:  # each GGUF's bytes were flushed under its partial name, before the rename
        assert any(ino == r.path.stat().st_ino and TMP_MARK in path for ino, path in synced), r.path
    inodes = [ino for ino, _ in synced]
    # The renames: in the model's folder (built aside, then renamed), and of the folder in models/.
    assert (store.models_dir / "m").stat().st_ino in inodes
    assert store.models_dir.stat().st_ino in inodes


# --- 5. a corrupt manifest breaks one model, not the store -----------------------------------

def test_list_and_verify_name_a_corrupt_model_and_go_on(tiny_hf, tmp_path):
    store = Store(tmp_path)  # the CLI's store: LLAMABOX_HOME=tmp_path, the built-in demo included
    convert(tiny_hf[0], ["q8_0"], store=store, model_id="good")
    (store.models_dir / "broken").mkdir()
    (store.models_dir / "broken" / "manifest.json").write_text('{"files": {"broken.q8_0.gguf": ')

    assert ("good", "q8_0") in listed(store)
    assert "corrupt" in store.verify("broken")[0]
    proc = llamabox(tmp_path, "list")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert any(ln.startswith("good ") and "q8_0" in ln for ln in lines)
    assert any(ln.startswith("llamabox-tiny (built-in)") for ln in lines)
    assert any(ln.startswith("broken ") and "BROKEN" in ln and "corrupt" in ln for ln in lines), proc.stdout
    proc = llamabox(tmp_path, "verify")
    assert proc.returncode == 1, proc.stderr
    assert "good: OK" in proc.stdout and "llamabox-tiny: OK" in proc.stdout and "broken: DAMAGED" in proc.stdout


# --- 6. every load checks the file ------------------------------------------------------------

def test_load_refuses_a_changed_file_and_does_not_rehash_an_untouched_one(tiny_hf, tmp_path, monkeypatch, caplog):
    from server.cli import resolve_model

    store = new_store(tmp_path)
    convert(tiny_hf[0], ["q8_0"], store=store, model_id="m")
    hashed: list[Path] = []
    real_sha256 = store_module.sha256_file
    monkeypatch.setattr(store_module, "sha256_file", lambda path, progress=None: (hashed.append(path),
                                                                                   real_sha256(path, progress))[1])
    caplog.set_level(logging.INFO, logger="convert.store")
    path = store.resolve("m").path

    assert resolve_model("m", store)[0] == path
    assert resolve_model("m", store)[0] == path
    assert hashed == []  # untouched since the conversion hashed it: no re-hash

    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))  # touched, same bytes
    assert resolve_model("m", store)[0] == path and hashed == [path]
    assert "re-hashing" in caplog.text
    resolve_model("m", store)
    assert hashed == [path]  # verified again, and remembered

    size = path.stat().st_size
    with open(path, "r+b") as f:  # one flipped byte, same size
        f.seek(size // 2)
        b = f.read(1)
        f.seek(size // 2)
        f.write(bytes([b[0] ^ 0x01]))
    for _ in range(2):  # refused every time, not only the first
        with pytest.raises(IntegrityError, match=r"m\.q8_0\.gguf.*llamabox verify m"):
            resolve_model("m", store)
    assert hashed == [path] * 3

    with open(path, "r+b") as f:
        f.truncate(size - 1)
    with pytest.raises(IntegrityError, match=rf"size {size - 1} != manifest {size}"):
        resolve_model("m", store)
    assert len(hashed) == 3  # a wrong size is caught without reading the file


def test_forced_replacement_also_works_without_an_atomic_exchange(tiny_hf, other_hf, tmp_path, monkeypatch):
    """Where renameat2(RENAME_EXCHANGE) is missing (macOS, musl, old kernels) the swap is two renames."""
    store = new_store(tmp_path)
    convert(tiny_hf[0], ["q8_0"], store=store, model_id="m")
    monkeypatch.setattr(store_module, "_renameat2", lambda: None)
    convert(other_hf, ["q4_k_m"], store=store, model_id="m", force=True)
    assert listed(store) == [("m", "q4_k_m")] and store.verify("m") == []
    assert store.manifest("m")["source"]["fingerprint"] == checkpoint_fingerprint(other_hf)
    assert leftovers(store) == []
