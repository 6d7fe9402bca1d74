"""The air-gapped kit's wheelhouse: built by scripts/wheelhouse.py (`make wheelhouse`), installed
into a fresh venv in a network namespace that has no network at all, and serving `predict` there.

The first run builds llama-cpp-python portable (14 CPU variants: about half an hour on 2 cores);
later runs take it from ~/.cache/llamabox/portable-wheels, keyed by version and build flags.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import wheelhouse as wh  # noqa: E402


def _unshare_ok() -> str | None:
    """Why the offline test cannot run here, or None."""
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return "the wheelhouse is built and tested for Linux x86-64"
    if not shutil.which("unshare") or not shutil.which("ip"):
        return "needs unshare (util-linux) and ip (iproute2)"
    r = subprocess.run(["unshare", "--net", "ip", "link", "set", "lo", "up"], capture_output=True, text=True)
    if r.returncode:
        return f"`unshare --net` is not permitted here ({r.stderr.strip() or r.returncode}); run as root"
    return None


SKIP = _unshare_ok()
if SKIP and os.environ.get("CI") == "true":  # CI must run this test, not skip it
    raise RuntimeError(f"test_offline_install cannot run in CI: {SKIP}")
pytestmark = pytest.mark.skipif(SKIP is not None, reason=SKIP or "")


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("kit") / "wheelhouse"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "wheelhouse.py"), "--out", str(out), "--json"],
                       capture_output=True, text=True, timeout=3600)
    assert r.returncode == 0, r.stderr[-4000:]
    info = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"\nwheelhouse: {info}")
    return out


def test_the_shipped_llama_cpp_wheel_is_the_portable_build(wheelhouse):
    [whl] = wheelhouse.glob("llama_cpp_python-*.whl")
    with zipfile.ZipFile(whl) as z:
        libs = {Path(n).name.split(".")[0] for n in z.namelist() if n.startswith("llama_cpp/lib/")}
    assert "libggml-cpu" not in libs, "a native libggml-cpu.so slipped in (pip's wheel cache ignores CMAKE_ARGS)"
    assert {f"libggml-cpu-{v}" for v in wh.X86_VARIANTS} <= libs
    assert {"libggml", "libggml-base", "libllama"} <= libs


def test_every_file_is_in_sha256sums(wheelhouse):
    listed = {line.split("  ", 1)[1] for line in (wheelhouse / "SHA256SUMS").read_text().splitlines()}
    assert listed == {p.name for p in wheelhouse.iterdir()} - {"SHA256SUMS", wh.MARKER}
    assert subprocess.run(["sha256sum", "--check", "--quiet", "SHA256SUMS"], cwd=wheelhouse).returncode == 0


def test_the_tarball_holds_the_same_folder(wheelhouse):
    import tarfile

    [tar] = wheelhouse.parent.glob("llamabox-wheelhouse-*.tar")
    with tarfile.open(tar) as t:
        names = {m.name for m in t.getmembers() if m.isfile()}
    assert names == {f"wheelhouse/{p.name}" for p in wheelhouse.iterdir()}


def test_a_damaged_wheelhouse_is_refused_before_anything_is_installed(wheelhouse, tmp_path):
    copy = tmp_path / "wheelhouse"
    shutil.copytree(wheelhouse, copy)
    whl = next(copy.glob("flask-*.whl"))
    data = bytearray(whl.read_bytes())
    data[len(data) // 2] ^= 0xFF
    whl.write_bytes(bytes(data))
    r = subprocess.run(["sh", str(copy / "install.sh"), str(tmp_path / "venv")], capture_output=True, text=True)
    assert r.returncode != 0 and "do not match SHA256SUMS" in r.stderr
    assert not (tmp_path / "venv").exists()


# Runs inside `unshare --net` with the system Python: installs, serves, asks.
DRIVER = textwrap.dedent('''
    import json, os, socket, subprocess, sys, time, urllib.request
    kit, venv, home = sys.argv[1:4]
    out = {"links": subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout.count("\\n")}
    try:
        socket.create_connection(("1.1.1.1", 443), timeout=3).close()
        out["outside"] = "reachable"
    except OSError as e:
        out["outside"] = f"unreachable: {e}"
    t0 = time.monotonic()
    r = subprocess.run(["sh", os.path.join(kit, "install.sh"), venv], capture_output=True, text=True)
    out["install_seconds"] = round(time.monotonic() - t0, 1)
    out["install_rc"], out["install_out"] = r.returncode, (r.stdout + r.stderr)[-3000:]
    if r.returncode == 0:
        env = {**os.environ, "LLAMABOX_HOME": home}
        env.pop("LLAMABOX_API_KEY", None)
        srv = subprocess.Popen([os.path.join(venv, "bin", "llamabox"), "serve", "--port", "18080"],
                               env=env, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                try:
                    urllib.request.urlopen("http://127.0.0.1:18080/health", timeout=2)
                    break
                except OSError:
                    time.sleep(0.5)
            req = urllib.request.Request("http://127.0.0.1:18080/predict",
                                         json.dumps({"prompt": "Once upon a time", "max_length": 8}).encode(),
                                         {"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=60) as resp:
                    out["predict_status"], out["predict"] = resp.status, json.loads(resp.read())
            except urllib.error.HTTPError as e:
                out["predict_status"], out["predict"] = e.code, e.read().decode()
        finally:
            srv.terminate()
            out["serve_stderr"] = srv.communicate(timeout=60)[1][-3000:]
    print(json.dumps(out))
''')


def test_installs_and_serves_predict_with_no_network_at_all(wheelhouse, tmp_path):
    (tmp_path / "driver.py").write_text(DRIVER)
    python = getattr(sys, "_base_executable", None) or shutil.which("python3")
    script = (f"ip link set lo up && PYTHON={python} exec {python} {tmp_path / 'driver.py'} "
              f"{wheelhouse} {tmp_path / 'venv'} {tmp_path / 'home'}")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "VIRTUAL_ENV"))}
    r = subprocess.run(["unshare", "--net", "sh", "-c", script], capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"\noffline install: {out['install_seconds']} s")
    assert out["links"] == 1 and out["outside"].startswith("unreachable"), out  # only lo: no network at all
    assert out["install_rc"] == 0, out["install_out"]
    assert "CPU backend: " in out["install_out"]
    assert out.get("predict_status") == 200, out
    assert out["predict"]["result"][0]["generated_text"].startswith("Once upon a time"), out["predict"]
    assert "CPU backend: " in out["serve_stderr"]


@pytest.fixture(scope="module")
def portable_venv(wheelhouse, tmp_path_factory) -> Path:
    """The wheelhouse installed by its install.sh (here, with the network: what is tested is the
    portable wheel's behaviour, not the isolation), from a copy holding a stray newer wheel that
    SHA256SUMS does not list (as extracting a new tarball over an old folder leaves)."""
    base = tmp_path_factory.mktemp("pv")
    kit = base / "kit with space"
    shutil.copytree(wheelhouse, kit)
    [blinker] = kit.glob("blinker-*.whl")
    shutil.copy(blinker, kit / "blinker-99.0-py3-none-any.whl")
    venv = base / "venv"
    python = getattr(sys, "_base_executable", None) or shutil.which("python3")
    r = subprocess.run(["sh", str(kit / "install.sh"), str(venv)], capture_output=True, text=True,
                       env={**os.environ, "PYTHON": python, "CDPATH": ".:/tmp"}, timeout=600, cwd="/")
    assert r.returncode == 0, r.stderr
    return venv


def test_install_takes_exactly_the_listed_wheels(portable_venv, wheelhouse):
    pinned = dict(line.split(" ")[0].split("==") for line in (wheelhouse / "requirements.txt").read_text().splitlines())
    r = subprocess.run([str(portable_venv / "bin" / "python"), "-m", "pip", "list", "--format=json"],
                       capture_output=True, text=True, check=True)
    installed = {d["name"].lower().replace("-", "_"): d["version"] for d in json.loads(r.stdout)}
    assert installed["blinker"] == pinned["blinker"] != "99.0"
    for name, version in pinned.items():
        assert installed[name.lower().replace("-", "_")] == version


def test_backend_modules_are_never_loaded_from_the_current_directory(portable_venv, tmp_path):
    [lib] = portable_venv.glob("lib/python*/site-packages/llama_cpp/lib")
    for name in ("libggml-cpu-zzz.so", "libggml-rpc.so", "libggml-cpu.so"):  # what ggml's own search would take
        shutil.copy(lib / "libggml-cpu-x64.so", tmp_path / name)
    r = subprocess.run([str(portable_venv / "bin" / "python"), "-I", "-c",
                        "import runtime; runtime.cpu_backend(); print(open('/proc/self/maps').read())"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert str(tmp_path) not in r.stdout
    assert str(lib / "libggml-cpu-") in r.stdout


@pytest.mark.skipif(not shutil.which("objdump"), reason="needs objdump (binutils) to read the machine code")
def test_the_libraries_every_cpu_loads_use_no_avx(wheelhouse, tmp_path):
    # The CPU test below runs on whatever CPU CI has; this proves what it cannot: that the code an
    # old CPU runs (llama, ggml, ggml-base and the x64 module) has no AVX/AVX-512 instruction.
    [whl] = wheelhouse.glob("llama_cpp_python-*.whl")
    with zipfile.ZipFile(whl) as z:
        for name in ("libllama.so", "libggml.so", "libggml-base.so", "libggml-cpu-x64.so"):
            (tmp_path / name).write_bytes(z.read(f"llama_cpp/lib/{name}"))
            asm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(tmp_path / name)],
                                 capture_output=True, text=True, check=True).stdout
            assert "%ymm" not in asm and "%zmm" not in asm, f"{name} uses AVX registers"
    # and the check can tell: the haswell module does use them
    (tmp_path / "h.so").write_bytes(zipfile.ZipFile(whl).read("llama_cpp/lib/libggml-cpu-haswell.so"))
    assert "%ymm" in subprocess.run(["objdump", "-d", str(tmp_path / "h.so")], capture_output=True, text=True).stdout


def _only_variants(venv: Path, keep: set[str]) -> None:
    [lib] = venv.glob("lib/python*/site-packages/llama_cpp/lib")
    for so in lib.glob("libggml-cpu-*.so"):
        if so.name.split(".")[0].removeprefix("libggml-cpu-") not in keep:
            so.unlink()


GENERATE = ("import runtime, sys; from runtime import GenerationParams, load; from convert.store import Store; "
            "print(runtime.cpu_backend().variant); m = Store().resolve('llamabox-tiny'); "
            "print(len(load(m.path, n_ctx=256, n_threads=2).generate('Once', GenerationParams(max_length=4, temperature=0)).completions[0].text))")


def test_the_portable_build_runs_on_a_plain_x86_64_cpu(portable_venv, tmp_path):
    # With only the baseline module left, which is what an old CPU ends up choosing among all 14.
    _only_variants(portable_venv, {"x64"})
    r = subprocess.run([str(portable_venv / "bin" / "python"), "-c", GENERATE], capture_output=True, text=True,
                       env={**os.environ, "LLAMABOX_HOME": str(tmp_path)}, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    variant, chars = r.stdout.split()
    assert variant == "x64" and int(chars) > 0


def test_with_no_usable_cpu_module_the_error_says_so(portable_venv):
    _only_variants(portable_venv, set())
    r = subprocess.run([str(portable_venv / "bin" / "llamabox"), "generate", "hi"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "libggml-cpu-" in lines[0] and "none loaded" in lines[0], r.stderr[-2000:]
