"""Build llama.cpp's own llama-server from the llama.cpp that the pinned llama-cpp-python vendors.

    python bench/llama_server_build.py          # prints the binary's path

The peer benchmark (bench/peers.py) compares llamabox with this binary, so both run the
same llama.cpp commit. Steps, each skipped when its output exists:
  1. the sdist llama_cpp_python-<version>.tar.gz in bench/scratch/ (pip download, no binaries)
  2. extracted to bench/scratch/llama-server-<version>/src/
  3. cmake Release, target llama-server only, no curl, no OpenSSL, no web UI download
     (the build must work offline), into bench/scratch/llama-server-<version>/build/
The cache is keyed by llama-cpp-python's version: a new pin builds a new server.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import tarfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRATCH = ROOT / "bench" / "scratch"

log = logging.getLogger(__name__)

# Release, native CPU flags and OpenMP: llama.cpp's defaults, and what pip's build of
# llama-cpp-python used here (llama_print_system_info: AVX2, OPENMP, REPACK, LLAMAFILE).
CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
]


def pinned_version() -> str:
    return metadata.version("llama-cpp-python")


def sdist(version: str) -> Path:
    path = SCRATCH / f"llama_cpp_python-{version}.tar.gz"
    if not path.is_file():
        SCRATCH.mkdir(parents=True, exist_ok=True)
        log.info("downloading the llama-cpp-python %s sdist", version)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={version}", "-d", str(SCRATCH)], check=True)
    return path


def build(version: str | None = None) -> Path:
    """The llama-server binary for `version` (default: the installed llama-cpp-python's)."""
    version = version or pinned_version()
    home = SCRATCH / f"llama-server-{version}"
    binary = home / "build" / "bin" / "llama-server"
    if binary.is_file():
        return binary
    src = home / "src" / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if not (src / "CMakeLists.txt").is_file():
        with tarfile.open(sdist(version)) as tar:
            tar.extractall(home / "src", filter="data")
    build_dir = home / "build"
    log.info("building llama-server from %s (a few minutes)", src)
    subprocess.run(["cmake", "-S", str(src), "-B", str(build_dir), *CMAKE_FLAGS], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(build_dir), "--target", "llama-server", "-j", str(os.cpu_count() or 1)],
                   check=True, stdout=subprocess.DEVNULL)
    if not binary.is_file():
        raise SystemExit(f"the build finished but {binary} is missing")
    return binary


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(build())
