"""A `llamabox pull` killed half-way (kill -9) continues from the bytes it has when run again.

The fake Hub (tests/fakehub.py) serves a ~42 MB LFS safetensors file, throttled so the transfer takes
about 2 s; `llamabox pull` runs in a subprocess and is SIGKILLed while the partial file is half there.
The rerun must ask for the rest only (`Range: bytes=N-`), and what it ends with must verify.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from huggingface_hub import constants
from huggingface_hub.utils import close_session

try:
    from fakehub import FakeHub, isolate_hf
except ImportError:
    from tests.fakehub import FakeHub, isolate_hf

import convert.pull as pull_module
from convert.hub import PARTIAL_DIR
from convert.store import Store

REPO = "someone/tiny-llama-resume"
BIG = "model.safetensors"
ROOT = Path(__file__).resolve().parents[1]


def _files() -> dict[str, bytes]:
    # huggingface_hub writes whole DOWNLOAD_CHUNK_SIZE (10 MiB) chunks: 4 of them and a bit, so a kill
    # after the second leaves about half the file.
    return {
        "config.json": b'{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}',
        "tokenizer.model": b"\x0a\x05hello" * 100,
        BIG: os.urandom(4 * constants.DOWNLOAD_CHUNK_SIZE + 1234),
    }


@pytest.fixture
def hub(tmp_path, monkeypatch):
    with FakeHub() as server:
        isolate_hf(monkeypatch, server.url, tmp_path / "hf-home")
        monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        try:
            yield server
        finally:
            close_session()


def _served_bytes(hub: FakeHub, name: str, total: int) -> int:
    """Bytes of `name` the fake Hub sent (or started to send) in answer to content GETs."""
    served = 0
    for req in hub.content_gets(name):
        start = 0
        if req.range:
            first, _, last = req.range[len("bytes="):].partition("-")
            start = int(first)
            if last:
                served += int(last) + 1 - start
                continue
        served += total - start
    return served


def _pull_killed_half_way(args: list[str], partials: Path, name: str, size: int) -> Path:
    """Run `llamabox pull ARGS` in a subprocess and SIGKILL it once the partial of `name` holds 45 %
    of its `size` bytes (it grows in steps of a few MiB, and a rerun must need less than 60 %).
    Returns the partial file it left."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from server.cli import main; sys.exit(main())", "pull", *args],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    partial = None
    deadline = time.monotonic() + 15
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            found = list(partials.glob(f"{name}.*.incomplete")) if partials.is_dir() else []
            if found and found[0].stat().st_size >= 0.45 * size:
                partial = found[0]
                break
            time.sleep(0.01)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    err = proc.stderr.read()
    proc.stderr.close()
    assert partial is not None, f"no half-way partial seen; pull exited {proc.returncode}: {err[-2000:]!r}"
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    return partial


def test_killed_pull_resumes_from_the_partial_file(hub, tmp_path, monkeypatch):
    files = _files()
    size = len(files[BIG])
    hub.add_repo(REPO, files)
    hub.throttle = size / 2.0  # about 2 s for the whole file
    home = tmp_path / "home"
    monkeypatch.setenv("LLAMABOX_HOME", str(home))
    download = home / "downloads" / REPO.replace("/", "--")
    partials = download / PARTIAL_DIR

    # 1. `llamabox pull` in a subprocess, SIGKILLed with 30-70 % of the weights on disk.
    partial = _pull_killed_half_way(["tiny", "--repo", REPO], partials, BIG, size)
    kept = partial.stat().st_size
    assert 0.3 * size <= kept <= 0.7 * size
    assert files[BIG].startswith(partial.read_bytes())
    assert not (download / BIG).exists()

    # 2. Our own clean-up leaves it alone: the store's sweep, and another write to the store.
    store = Store(home, builtin_dir=tmp_path / "none")
    store.sweep_partials()
    with store.writing("other", {"fingerprint": "test:other"}):
        pass
    assert partial.stat().st_size == kept

    # 3. The rerun (pull's start-up and download; the conversion of these random weights is stubbed
    # out) asks only for the missing bytes and ends with the verified file.
    hub.clear_requests()
    hub.throttle = None
    converted = {}

    def fake_convert(folder, qs, **kw):
        converted["folder"] = Path(folder)
        converted["files"] = {name: (Path(folder) / name).read_bytes() for name in files}
        return []

    monkeypatch.setattr(pull_module, "convert", fake_convert)
    pull_module.pull("tiny", repo=REPO, store=store)

    gets = hub.content_gets(BIG)
    assert [g.range for g in gets] == [f"bytes={kept}-"]
    rerun = _served_bytes(hub, BIG, size)
    assert rerun < 0.6 * size
    assert converted["folder"] == download.resolve()
    assert converted["files"] == files
    assert hashlib.sha256(converted["files"][BIG]).hexdigest() == hashlib.sha256(files[BIG]).hexdigest()
    print(f"\nkilled at {kept / size:.0%} on disk; rerun transferred {rerun / size:.0%} of {size} bytes")


def test_a_corrupt_partial_is_deleted_not_resumed_again(hub, tmp_path):
    from convert.hub import download_checkpoint
    from runtime.errors import IntegrityError

    files = _files()
    hub.add_repo(REPO, files)
    dest = tmp_path / "ckpt"
    digest = hashlib.sha256(files[BIG]).hexdigest()
    partial = dest / PARTIAL_DIR / f"{BIG}.{digest[:16]}.incomplete"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"\0" * (size := 3 * constants.DOWNLOAD_CHUNK_SIZE))  # wrong bytes

    with pytest.raises(IntegrityError, match="sha256"):
        download_checkpoint(REPO, dest)
    assert not partial.exists() and not (dest / BIG).exists()
    assert [g.range for g in hub.content_gets(BIG)] == [f"bytes={size}-"]

    folder, _ = download_checkpoint(REPO, dest)  # starts over, and verifies
    assert (folder / BIG).read_bytes() == files[BIG]
    record = json.loads((folder / PARTIAL_DIR / f"{BIG}.done").read_text())
    assert record == {"key": digest, "size": len(files[BIG])}


def test_killed_gguf_pull_resumes_and_lands_in_the_store(hub, tmp_path, monkeypatch):
    gguf = b"GGUF" + os.urandom(4 * constants.DOWNLOAD_CHUNK_SIZE + 99)
    name, repo = "tiny.Q4_K_M.gguf", "someone/tiny-GGUF"
    hub.add_repo(repo, {name: gguf})
    hub.throttle = len(gguf) / 2.0
    home = tmp_path / "home"
    monkeypatch.setenv("LLAMABOX_HOME", str(home))
    partials = home / "downloads" / "gguf" / repo.replace("/", "--") / PARTIAL_DIR

    partial = _pull_killed_half_way(["g", "--gguf", f"{repo}:{name}"], partials, name, len(gguf))
    kept = partial.stat().st_size
    assert 0.3 * len(gguf) <= kept <= 0.7 * len(gguf)

    store = Store(home, builtin_dir=tmp_path / "none")
    assert store.list() == []  # nothing half-written is visible
    store.sweep_partials()
    assert partial.stat().st_size == kept  # and our clean-up keeps what the rerun resumes

    hub.clear_requests()
    hub.throttle = None
    pull_module.pull("g", gguf=f"{repo}:{name}", store=store)
    assert [g.range for g in hub.content_gets(name)] == [f"bytes={kept}-"]
    assert _served_bytes(hub, name, len(gguf)) < 0.6 * len(gguf)
    [mf] = store.list()
    assert (mf.model_id, mf.quant, mf.sha256) == ("g", "q4_k_m", hashlib.sha256(gguf).hexdigest())
    assert store.verify("g") == []
    assert not list(partials.iterdir())  # the finished file moved into the store; no record left behind
