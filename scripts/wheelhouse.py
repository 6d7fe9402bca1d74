"""Build a wheelhouse: everything llamabox needs to install on a machine that has no network.

    python scripts/wheelhouse.py [--out dist/wheelhouse]          (what `make wheelhouse` runs)

The folder it writes, and a tarball of it beside it, hold:
- every wheel llamabox needs, for this Python (cpXY) and platform;
- llama-cpp-python built *portable*: -DGGML_NATIVE=OFF, and llama.cpp's CPU backend built once
  per x86-64 feature level (GGML_BACKEND_DL + GGML_CPU_ALL_VARIANTS: x64, sse42, sandybridge,
  haswell, skylakex, icelake, zen4, ...), each a module llama.cpp scores against the CPU at run time.
  A native build (pip's default: -march=native) can die with SIGILL on an older CPU;
- install.sh, which checks SHA256SUMS, makes a venv and installs with `pip --no-index`;
- SHA256SUMS, for every other file.

pip's wheel cache is keyed by the sdist, not by CMAKE_ARGS: with it, a native wheel built earlier
for `make` would come back as the "portable" one. So llama-cpp-python is built with
--no-cache-dir, into our own cache keyed by version, flags, Python and platform, and every wheel,
cached or fresh, is checked for the CPU variant modules before it is used (check_portable).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
import zipfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from convert.store import sha256_file  # noqa: E402  (one sha256 helper in the project)

log = logging.getLogger("wheelhouse")

# LLAVA_BUILD=OFF: llamabox does not use the multimodal library, and it would be a 15th build.
# CMAKE_INSTALL_BINDIR puts the backend modules, which ggml installs to "bin", beside libllama in
# the wheel's llama_cpp/lib, where runtime/backends.py loads them from.
PORTABLE_CMAKE_ARGS = ("-DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON "
                       "-DCMAKE_INSTALL_BINDIR=llama_cpp/lib -DLLAVA_BUILD=OFF")
# The x86-64 variants the pinned llama.cpp builds (ggml/src/CMakeLists.txt, GGML_CPU_ALL_VARIANTS).
X86_VARIANTS = ("x64", "sse42", "sandybridge", "ivybridge", "piledriver", "haswell", "skylakex", "cannonlake",
                "cascadelake", "icelake", "cooperlake", "zen4", "alderlake", "sapphirerapids")


class WheelhouseError(Exception):
    pass


def pinned_llama_cpp() -> str:
    """The llama-cpp-python requirement of the installed llamabox ('llama-cpp-python==0.3.36')."""
    for req in metadata.requires("llamabox") or []:
        if req.replace("_", "-").startswith("llama-cpp-python==") and ";" not in req:
            return req.strip()
    raise WheelhouseError("llamabox's metadata pins no llama-cpp-python==VERSION; run `make` first")


def python_tag() -> str:
    return f"cp{sys.version_info[0]}{sys.version_info[1]}"


def check_portable(wheel: Path) -> list[str]:
    """The CPU variants inside a llama-cpp-python wheel; raises if it is not a portable build."""
    with zipfile.ZipFile(wheel) as z:
        names = [Path(n).name for n in z.namelist() if n.startswith("llama_cpp/lib/")]
    found = sorted(n.split(".")[0].removeprefix("libggml-cpu-") for n in names if n.startswith("libggml-cpu-"))
    if "libggml-cpu.so" in names or not found:
        raise WheelhouseError(f"{wheel.name} is a native build (libggml-cpu.so, no libggml-cpu-<variant>.so modules)")
    if platform.machine() in ("x86_64", "AMD64"):
        missing = [v for v in X86_VARIANTS if v not in found]
        if missing:
            raise WheelhouseError(f"{wheel.name} lacks the CPU variants {', '.join(missing)}")
    return found


def build_key(requirement: str) -> str:
    """What decides the portable wheel's bytes: the version, the flags, Python and platform."""
    key = {"req": requirement, "cmake_args": PORTABLE_CMAKE_ARGS, "python": python_tag(),
           "platform": sysconfig.get_platform()}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(os.environ.get("LLAMABOX_WHEEL_CACHE", Path(base) / "llamabox" / "portable-wheels"))


def pip(*args: str, env: dict[str, str] | None = None) -> None:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    log.info("$ %s", " ".join(cmd))
    r = subprocess.run(cmd, env=env)
    if r.returncode:
        raise WheelhouseError(f"pip {args[0]} failed (exit {r.returncode}); its output is above")


def portable_wheel(requirement: str, cache: Path) -> tuple[Path, float]:
    """A portable llama-cpp-python wheel from the cache, or built into it (minutes: 14 CPU variants).
    Returns (wheel, build seconds; 0 when cached)."""
    slot = cache / build_key(requirement)
    for whl in sorted(slot.glob("llama_cpp_python-*.whl")):
        check_portable(whl)
        log.info("portable llama-cpp-python from the cache: %s", whl)
        return whl, 0.0
    cache.mkdir(parents=True, exist_ok=True)
    log.info("building %s portable (%s); about 30 CPU-minutes: 15 minutes on 2 idle cores", requirement, PORTABLE_CMAKE_ARGS)
    env = {**os.environ, "CMAKE_ARGS": PORTABLE_CMAKE_ARGS, "FORCE_CMAKE": "1",
           "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 1)}
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=".build-", dir=cache) as tmp:
        # --no-cache-dir: neither take pip's cached native wheel nor leave a portable one in its
        # place for `make`. --no-binary: build from the sdist even if an index offered a wheel.
        pip("wheel", "--no-cache-dir", "--no-deps", "--no-binary", "llama-cpp-python", "-w", tmp, requirement, env=env)
        built = sorted(Path(tmp).glob("llama_cpp_python-*.whl"))
        if len(built) != 1:
            raise WheelhouseError(f"pip wheel made {len(built)} llama-cpp-python wheels, expected one")
        check_portable(built[0])
        staged = Path(tmp) / "slot"
        staged.mkdir()
        os.replace(built[0], staged / built[0].name)
        try:
            os.rename(staged, slot)  # a slot appears whole or not at all
        except OSError:
            if not slot.exists():
                raise
    return next(slot.glob("llama_cpp_python-*.whl")), time.monotonic() - t0


INSTALL_SH = r"""#!/bin/sh
# Install llamabox @VERSION@ from this folder, with no network.
#   ./install.sh [VENV]        VENV: where to create the virtualenv (default: ./llamabox-venv)
# Needs: CPython @PYVER@ with venv (set PYTHON=/path/to/python@PYVER@ if python3 is another one),
# glibc >= @GLIBC@ and libstdc++ with GLIBCXX_@GLIBCXX@ (the portable llama.cpp was built against
# them), and libgomp (Debian: libgomp1).
set -eu
here=$(CDPATH= cd -- "$(dirname -- "$0")" && pwd -P)
venv=${1:-./llamabox-venv}
PYTHON=${PYTHON:-python3}
fail() { echo "install.sh: $*" >&2; exit 1; }

(CDPATH= cd -- "$here" && sha256sum --check --quiet --strict SHA256SUMS) \
  || fail "files in $here do not match SHA256SUMS: copy the wheelhouse again"
[ "$(uname -m)" = "x86_64" ] || fail "these wheels are for Linux x86-64; this machine is $(uname -m)"
glibc=$(getconf GNU_LIBC_VERSION 2>/dev/null | sed 's/^glibc //') || glibc=""
[ -n "$glibc" ] || fail "cannot tell this system's glibc version (getconf GNU_LIBC_VERSION); the wheels need glibc >= @GLIBC@"
[ "$(printf '%s\n%s\n' "@GLIBC@" "$glibc" | sort -V | head -n1)" = "@GLIBC@" ] \
  || fail "this system has glibc $glibc; llama.cpp in this wheelhouse needs >= @GLIBC@ (build the wheelhouse on a machine with glibc <= $glibc)"
tag=$("$PYTHON" -c 'import sys; print("cp%d%d" % sys.version_info[:2])') || fail "no $PYTHON (set PYTHON=/path/to/python@PYVER@)"
[ "$tag" = "@PYTAG@" ] || fail "these wheels are for Python @PYVER@ (@PYTAG@); $PYTHON is $tag (set PYTHON=/path/to/python@PYVER@)"
if [ -e "$venv" ] && [ ! -f "$venv/pyvenv.cfg" ]; then
  fail "$venv exists and is not a virtualenv; not touching it"
fi
"$PYTHON" -m venv "$venv"
# Exactly the wheels listed, each checked against its sha256 (a stray wheel in this folder is never
# chosen); --force-reinstall: a venv that already holds llama-cpp-python @LLAMA_VERSION@ built native gets
# the portable build, not "already satisfied".
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-index --find-links "$here" \
  --require-hashes --no-deps --force-reinstall -r "$here/requirements.txt"
# -I and cd /: check the installed package, never a runtime/ folder in the current directory.
cpu=$(cd / && "$venv/bin/python" -I -c 'import runtime; c = runtime.cpu_backend(); print(c.variant, "|", c.describe())') \
  || fail "installed, but llama.cpp does not load here (missing libraries? try: ldd $venv/lib/python*/site-packages/llama_cpp/lib/*.so | grep 'not found')"
[ "${cpu%% |*}" != "native" ] || fail "$venv runs a native llama-cpp-python build, not this wheelhouse's portable one"
echo "installed llamabox @VERSION@ in $venv (CPU backend: ${cpu#*| })"
echo "start it with: $venv/bin/llamabox serve"
"""

MARKER = ".llamabox-wheelhouse"  # in every folder this script writes: only those does it replace


def _wheel_name_version(wheel: Path) -> tuple[str, str]:
    # {distribution}-{version}(-{build})?-{python}-{abi}-{platform}.whl (PEP 427)
    parts = wheel.name[:-len(".whl")].split("-")
    return parts[0], parts[1]


def glibc_needs(wheel: Path) -> tuple[str, str]:
    """The newest GLIBC_ and GLIBCXX_ symbol versions the wheel's shared libraries ask for (their
    version-needed strings), e.g. ('2.34', '3.4.29'): the oldest system that can load them."""
    seen: dict[bytes, set[tuple[int, ...]]] = {b"GLIBC_": set(), b"GLIBCXX_": set()}
    with zipfile.ZipFile(wheel) as z:
        for n in z.namelist():
            if ".so" in Path(n).name:
                data = z.read(n)
                for m in re.finditer(rb"\x00(GLIBC_|GLIBCXX_)(\d+(?:\.\d+)+)\x00", data):
                    seen[m.group(1)].add(tuple(int(x) for x in m.group(2).split(b".")))
    return tuple(".".join(map(str, max(v))) if v else "0" for v in seen.values())  # type: ignore[return-value]


def write_install_sh(out: Path, version: str, llama_whl: Path) -> None:
    glibc, glibcxx = glibc_needs(llama_whl)
    text = (INSTALL_SH.replace("@VERSION@", version).replace("@PYTAG@", python_tag())
            .replace("@PYVER@", "%d.%d" % sys.version_info[:2]).replace("@GLIBC@", glibc)
            .replace("@GLIBCXX@", glibcxx).replace("@LLAMA_VERSION@", _wheel_name_version(llama_whl)[1]))
    (out / "install.sh").write_text(text)
    (out / "install.sh").chmod(0o755)


def _ours_or_absent(folder: Path) -> None:
    if folder.exists() and any(folder.iterdir()) and not (folder / MARKER).is_file():
        raise WheelhouseError(f"{folder} exists and was not written by `make wheelhouse`; not touching it")


def build(out: Path, cache: Path) -> dict:
    stage = out.with_name(out.name + ".partial")
    _ours_or_absent(out)
    _ours_or_absent(stage)
    t0 = time.monotonic()
    requirement = pinned_llama_cpp()
    llama_whl, build_s = portable_wheel(requirement, cache)
    variants = check_portable(llama_whl)
    version = metadata.version("llamabox")

    shutil.rmtree(stage, ignore_errors=True)  # ours (checked above): a previous run's leftover
    stage.mkdir(parents=True)
    (stage / MARKER).write_text("written by llamabox's scripts/wheelhouse.py\n")
    shutil.copy2(llama_whl, stage / llama_whl.name)
    pip("wheel", "--no-deps", "--quiet", "-w", str(stage), str(ROOT))  # llamabox itself
    own = next(stage.glob("llamabox-*.whl"))
    # Everything else, as wheels for this Python and platform. --find-links offers the portable
    # wheel; --only-binary keeps pip from choosing llama-cpp-python's sdist over it.
    pip("download", "--quiet", "--only-binary", ":all:", "--find-links", str(stage), "-d", str(stage), str(own))
    # An index that offers prebuilt llama-cpp-python wheels (a pip.conf extra-index-url) could have
    # added one whose tag pip ranks above ours: ship exactly the portable wheel, or nothing.
    wheels = sorted(stage.glob("*.whl"))
    digest = {w.name: sha256_file(w) for w in wheels}  # each wheel read once: requirements.txt and SHA256SUMS
    llamas = [w.name for w in wheels if w.name.startswith("llama_cpp_python-")]
    if llamas != [llama_whl.name] or digest[llama_whl.name] != sha256_file(llama_whl):
        raise WheelhouseError(f"pip download left {llamas} beside the portable {llama_whl.name}; "
                              "check pip's configuration (extra index URLs)")
    (stage / "requirements.txt").write_text("".join(
        "{}=={} --hash=sha256:{}\n".format(*_wheel_name_version(w), digest[w.name]) for w in wheels))
    write_install_sh(stage, version, llama_whl)
    files = sorted(p for p in stage.iterdir() if p.is_file() and p.name != MARKER)
    (stage / "SHA256SUMS").write_text("".join(f"{digest.get(p.name) or sha256_file(p)}  {p.name}\n" for p in files))

    if out.exists():
        shutil.rmtree(out)  # a wheelhouse this script wrote (its marker was checked above)
    os.replace(stage, out)
    tarball = out.with_name(f"llamabox-wheelhouse-{version}-{python_tag()}-{sysconfig.get_platform()}.tar")
    tmp = tarball.with_name(tarball.name + ".partial")
    with tarfile.open(tmp, "w") as tar:  # wheels are zips already: no compression
        tar.add(out, arcname=out.name)
    os.replace(tmp, tarball)
    size = sum(p.stat().st_size for p in out.iterdir())
    return {"wheelhouse": str(out), "tarball": str(tarball), "bytes": size, "wheels": len(wheels),
            "llama_cpp_wheel": llama_whl.name, "variants": variants, "needs_glibc": glibc_needs(llama_whl),
            "build_seconds": round(build_s, 1), "total_seconds": round(time.monotonic() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "dist" / "wheelhouse")
    ap.add_argument("--cache", type=Path, default=None, help="portable-wheel cache (default ~/.cache/llamabox/portable-wheels)")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="wheelhouse: %(message)s")
    try:
        info = build(args.out.resolve(), args.cache or default_cache())
    except WheelhouseError as e:
        print(f"wheelhouse: error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(info))
    else:
        print(f"wheelhouse: {info['wheels']} wheels, {info['bytes'] / 2**20:.1f} MiB in {info['wheelhouse']}")
        print(f"wheelhouse: tarball {info['tarball']}")
        print(f"wheelhouse: {info['llama_cpp_wheel']}: CPU variants {' '.join(info['variants'])}")
        print(f"wheelhouse: carry the tarball, then: tar -xf {Path(info['tarball']).name} && ./{args.out.name}/install.sh")
    return 0


if __name__ == "__main__":
    sys.exit(main())
