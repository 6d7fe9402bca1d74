"""Which CPU kernels llama.cpp chose, as llamabox reports it (serve, generate, /health)."""
import sys
from pathlib import Path

import pytest

from runtime import backends, cpu_backend

# ggml's feature names -> the flags Linux shows in /proc/cpuinfo for the same instructions.
CPUINFO_FLAG = {"SSE3": "pni", "SSSE3": "ssse3", "AVX": "avx", "AVX2": "avx2", "F16C": "f16c", "FMA": "fma",
                "BMI2": "bmi2", "AVX512": "avx512f", "AVX512_VBMI": "avx512vbmi", "AVX512_VNNI": "avx512_vnni",
                "AVX512_BF16": "avx512_bf16", "AVX_VNNI": "avx_vnni", "AMX_INT8": "amx_int8"}


def cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="needs Linux's /proc/cpuinfo to know the CPU's features")
def test_the_reported_kernels_use_only_what_this_cpu_has():
    cpu = cpu_backend()
    flags = cpu_flags()
    assert cpu.features, "an x86-64 build has at least SSE3 kernels"
    for feature in cpu.features:
        assert CPUINFO_FLAG[feature] in flags, f"{feature} reported, but this CPU lacks {CPUINFO_FLAG[feature]}"


def test_the_reported_library_is_the_one_loaded_from_the_package():
    cpu = cpu_backend()
    lib = Path(cpu.library)
    assert lib.parent == backends.lib_dir() and lib.name.startswith("libggml-cpu")
    loaded = Path(f"/proc/{__import__('os').getpid()}/maps").read_text() if sys.platform == "linux" else str(lib)
    assert str(lib) in loaded
    # a native build has one libggml-cpu; a portable one names the variant in the file
    assert (cpu.variant == "native") == (lib.name.split(".")[0] == "libggml-cpu")


def test_the_cli_says_which_kernels_it_runs(tmp_path):
    import subprocess

    out = subprocess.run([sys.executable, "-m", "server.cli", "generate", "--max-length", "2", "Hi"],
                         capture_output=True, text=True, timeout=300, env={**__import__("os").environ,
                                                                           "LLAMABOX_HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    assert f"llamabox: CPU backend: {cpu_backend().describe()}" in out.stderr.splitlines()


def test_no_gpu_memory_is_reported_where_llama_cpp_offloads_nothing():
    from runtime.model import backend_name

    if backend_name() != "CPU":
        pytest.skip("this llama.cpp build can offload")
    assert backends.gpu_memory() is None
