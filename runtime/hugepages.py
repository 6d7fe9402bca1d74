"""Transparent huge pages (2 MiB) for the weights llama.cpp reads into memory, on Linux.

Why: every decode step streams every weight once, 3.8 GiB for a 7B Q4_K_M: a million 4 KiB pages,
a TLB miss each (a two-level page walk in a VM). On 2 MiB pages that is two thousand.
bench/hugepages.py measures the difference; README's "Huge pages" paragraph has the figures.

How: llama.cpp reads the weights (load mode "none") into buffers from posix_memalign, which glibc
serves from fresh anonymous mappings. Most distributions ship THP in "madvise" mode, so those stay
on 4 KiB pages unless the process asks. llama.cpp allocates every weight buffer before it reads the
first tensor, and calls the load's progress callback before each tensor (llama-model-loader.cpp,
load_all_data). At the first call, WeightPages.advise() gives madvise(MADV_HUGEPAGE) to what was
mapped since the load began; the reads that follow then fault in 2 MiB pages. Nothing is copied or
collapsed afterwards, so a load costs what it did (or less: 512 times fewer page faults).

glibc mmaps every block over its mmap threshold: 128 KiB at first, raised to the size of any
mapped block the process frees, at most 32 MiB. A weight buffer over 32 MiB, any model worth the
pages, is always a fresh mapping; a smaller one can reuse memory the process already had, and is
then left on the pages it has (a model that small fits in the CPU's caches anyway).

Not covered: the KV cache and compute buffers (made and zeroed when the context is created, with no
callback in between; a step reads only the KV cells in use), mapped loads (--mmap: page cache pages,
which THP does not back), loads that offload layers to a GPU (its driver maps host memory of its own
during the load), and platforms without /proc/self/maps or madvise (nothing is asked there).
"""
from __future__ import annotations

import ctypes
import errno
import logging
import re
import sys
from pathlib import Path

log = logging.getLogger(__name__)

HUGE = 2 << 20           # x86-64 and arm64 PMD size with 4 KiB base pages; advise only whole ones
MADV_HUGEPAGE = 14       # linux/mman-common.h
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")
_MAPS_LINE = re.compile(r"([0-9a-f]+)-([0-9a-f]+) rw.p [0-9a-f]+ \S+ 0\s*$")  # anonymous: inode 0, no path


def anonymous_mappings(maps: str) -> list[tuple[int, int]]:
    """[start, end) of every writable anonymous mapping in /proc/PID/maps text (no [heap], no files)."""
    out = []
    for line in maps.splitlines():
        m = _MAPS_LINE.match(line)
        if m:
            out.append((int(m.group(1), 16), int(m.group(2), 16)))
    return out


def new_ranges(before: list[tuple[int, int]], after: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of `after`'s ranges that no range of `before` covered. The kernel merges a new
    mapping into an adjacent one with the same flags, so a new buffer can show up as a grown range."""
    out = []
    for a, b in after:
        pieces = [(a, b)]
        for c, d in before:
            pieces = [p for x, y in pieces for p in ((x, min(y, c)), (max(x, d), y)) if p[0] < p[1]]
        out += pieces
    return out


def whole_huge_pages(a: int, b: int) -> tuple[int, int] | None:
    """The 2 MiB-aligned part of [a, b), or None when it holds no whole huge page."""
    lo, hi = (a + HUGE - 1) & ~(HUGE - 1), b & ~(HUGE - 1)
    return (lo, hi) if hi > lo else None


def thp_mode() -> str | None:
    """'always', 'madvise' or 'never' (the bracketed word in sysfs); None where there is no THP."""
    try:
        m = re.search(r"\[(\w+)\]", THP_MODE.read_text())
    except OSError:
        return None
    return m.group(1) if m else None


def anon_huge_bytes() -> int | None:
    """This process's anonymous memory on huge pages (AnonHugePages), in bytes; None if unknown."""
    try:
        m = re.search(r"^AnonHugePages:\s+(\d+) kB", Path("/proc/self/smaps_rollup").read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) * 1024 if m else None


def _read_maps() -> list[tuple[int, int]] | None:
    try:
        return anonymous_mappings(Path("/proc/self/maps").read_text())
    except OSError:
        return None


class WeightPages:
    """One load's huge-page request: made before llama_model_load_from_file, advise() called from its
    progress callback (the loading thread), idempotent after the first call."""

    def __init__(self) -> None:
        mode = thp_mode() if sys.platform.startswith("linux") else None
        # "always" backs the buffers already; "never" refuses; no THP at all: nothing to ask.
        self._before = _read_maps() if mode == "madvise" else None
        self.mode = mode
        self.advised = 0  # bytes given MADV_HUGEPAGE

    def advise(self) -> None:
        before, self._before = self._before, None
        if before is None:
            return
        after = _read_maps()
        libc = ctypes.CDLL(None, use_errno=True)  # this process's symbols: libc's madvise on Linux
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        if after is None:
            return
        for a, b in new_ranges(before, after):
            span = whole_huge_pages(a, b)
            if span is None:
                continue
            if libc.madvise(span[0], span[1] - span[0], MADV_HUGEPAGE) != 0:
                err = ctypes.get_errno()  # EINVAL: a kernel without THP for this mapping; stop asking
                log.debug("madvise(MADV_HUGEPAGE) refused: %s", errno.errorcode.get(err, err))
                return
            self.advised += span[1] - span[0]
