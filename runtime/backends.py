"""Which llama.cpp CPU kernels this process runs, and loading them in a portable build.

Two kinds of llama-cpp-python build exist:
- native (pip's default): the CPU backend is compiled for this machine's CPU (-march=native) and
  linked into libggml. It is registered before any code runs. Carried to an older CPU, it can
  die with SIGILL.
- portable (`make wheelhouse`: GGML_BACKEND_DL + GGML_CPU_ALL_VARIANTS): each backend is a module,
  llama_cpp/lib/libggml-cpu-<variant>.so, one per x86-64 feature level (x64, sse42, haswell,
  skylakex, icelake, zen4, ...). Loading asks each module to score this CPU and keeps the best.

ggml's own loader (ggml_backend_load_all, which llama_backend_init calls when nothing is
registered) searches the executable's folder and the *current directory*: a libggml-cpu-*.so
lying in whatever folder llamabox was started from would be loaded into the process. So we load
from the package's own lib folder first, and llama_backend_init then finds backends registered and
searches nowhere.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
import llama_cpp.llama_cpp as _bindings

from .errors import BackendError

log = logging.getLogger(__name__)

# The SIMD features ggml reports (ggml-cpu.cpp, ggml_backend_cpu_get_features), most capable last;
# the others it reports (OPENMP, REPACK, LLAMAFILE, ...) say how it was built, not what it uses.
SIMD_FEATURES = (
    "SSE3", "SSSE3", "AVX", "AVX_VNNI", "AVX2", "F16C", "FMA", "BMI2",
    "AVX512", "AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16", "AMX_INT8",
    "NEON", "ARM_FMA", "FP16_VA", "MATMUL_INT8", "SVE", "DOTPROD", "SME", "SME2",
    "RISCV_V", "VSX", "VXE", "WASM_SIMD",
)


@dataclass(frozen=True)
class CpuBackend:
    variant: str                # "haswell", "skylakex", ... in a portable build; "native" otherwise
    features: tuple[str, ...]   # SIMD features the chosen kernels were compiled with, ggml's order
    library: str                # file the CPU kernels live in

    def describe(self) -> str:
        """One line for people: 'haswell (SSE3 SSSE3 AVX AVX2 F16C FMA BMI2)'."""
        return f"{self.variant} ({' '.join(self.features) or 'baseline x86-64: SSE2'})"


class _Feature(ctypes.Structure):  # ggml-backend.h: struct ggml_backend_feature
    _fields_ = [("name", ctypes.c_char_p), ("value", ctypes.c_char_p)]


class _DlInfo(ctypes.Structure):  # dlfcn.h: Dl_info
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


def _fn(name: str, restype, *argtypes):
    # ggml's symbols are reached through libllama's handle: dlsym searches its dependencies too.
    f = getattr(_bindings._lib, name)
    f.restype, f.argtypes = restype, list(argtypes)
    return f


_reg_count = _fn("ggml_backend_reg_count", ctypes.c_size_t)
_reg_get = _fn("ggml_backend_reg_get", ctypes.c_void_p, ctypes.c_size_t)
_reg_name = _fn("ggml_backend_reg_name", ctypes.c_char_p, ctypes.c_void_p)
_reg_proc = _fn("ggml_backend_reg_get_proc_address", ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p)
_load_all_from = _fn("ggml_backend_load_all_from_path", None, ctypes.c_char_p)
_dev_count = _fn("ggml_backend_dev_count", ctypes.c_size_t)
_dev_get = _fn("ggml_backend_dev_get", ctypes.c_void_p, ctypes.c_size_t)
_dev_type = _fn("ggml_backend_dev_type", ctypes.c_int, ctypes.c_void_p)
_dev_memory = _fn("ggml_backend_dev_memory", None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t),
                  ctypes.POINTER(ctypes.c_size_t))

# ggml-backend.h, enum ggml_backend_dev_type: CPU 0, GPU 1, IGPU 2, ACCEL 3.
_GPU, _IGPU = 1, 2


def lib_dir() -> Path:
    """Where llama-cpp-python keeps libllama, libggml and, in a portable build, the backend modules."""
    return Path(llama_cpp.__file__).parent / "lib"


def _library_of(address: int) -> str:
    """The shared object that holds code at address (dladdr), or '' where that cannot be told."""
    if sys.platform == "win32":
        return ""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
    info = _DlInfo()
    if not libc.dladdr(ctypes.c_void_p(address), ctypes.byref(info)) or not info.dli_fname:
        return ""
    return os.fsdecode(info.dli_fname)


def _cpu_backend() -> CpuBackend:
    for i in range(_reg_count()):
        reg = _reg_get(i)
        if _reg_name(reg) != b"CPU":
            continue
        addr = _reg_proc(reg, b"ggml_backend_get_features")
        if not addr:
            break
        get_features = ctypes.CFUNCTYPE(ctypes.POINTER(_Feature), ctypes.c_void_p)(addr)
        feats, names = get_features(reg), []
        for j in range(64):  # the list ends with a NULL name; 64 bounds a malformed one
            if not feats[j].name:
                break
            names.append(feats[j].name.decode())
        library = _library_of(addr)
        stem = Path(library).name.split(".")[0]  # libggml-cpu-haswell.so -> libggml-cpu-haswell
        variant = stem.removeprefix("libggml-cpu-").removeprefix("ggml-cpu-") if "ggml-cpu-" in stem else "native"
        return CpuBackend(variant, tuple(n for n in names if n in SIMD_FEATURES), library)
    raise BackendError("llama.cpp has no CPU backend registered")


def gpu_memory() -> tuple[int, int] | None:
    """(free, total) bytes over the devices llama.cpp offloads layers to, as their drivers report
    them now (other processes' use included); None where there is none (a CPU-only build, or no
    GPU found). The devices are llama.cpp's choice (llama.cpp: llama_model_load_from_file):
    the discrete GPUs, or the integrated ones only where there is no discrete GPU (an integrated
    GPU's "free" memory is host RAM). A device that reports 0 of 0 bytes does not know: skipped."""
    by_type: dict[int, list[tuple[int, int]]] = {_GPU: [], _IGPU: []}
    for i in range(_dev_count()):
        dev = _dev_get(i)
        kind = _dev_type(dev)
        if kind not in by_type:
            continue
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        _dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        if total.value:
            by_type[kind].append((free.value, total.value))
    devices = by_type[_GPU] or by_type[_IGPU]
    if not devices:
        return None
    return sum(f for f, _ in devices), sum(t for _, t in devices)


def load_backends() -> CpuBackend:
    """Register llama.cpp's backends from the package's own folder where the build loads them at run
    time, and say which CPU kernels were chosen. Call before llama_backend_init."""
    if _reg_count() == 0:  # a GGML_BACKEND_DL build: nothing is linked in
        where = lib_dir()
        _load_all_from(os.fsencode(where))
        if _reg_count() == 0:
            raise BackendError(f"this llama-cpp-python build loads its backends at run time, and none loaded "
                               f"from {where}: no libggml-cpu-*.so there suits this CPU")
    cpu = _cpu_backend()
    log.debug("CPU backend: %s from %s", cpu.describe(), cpu.library or "?")  # the CLI prints it
    return cpu
