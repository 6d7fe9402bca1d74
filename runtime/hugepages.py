"""Transparent huge pages for the weights llama.cpp reads into memory, on Linux.

Why: every decode step streams every weight once, 3.8 GiB for a 7B Q4_K_M: a million 4 KiB pages,
a TLB miss each (a two-level page walk in a VM). On 2 MiB pages that is two thousand.
bench/hugepages.py measures the difference; README's "Huge pages" paragraph has the figures.

How: llama.cpp reads the weights (load mode "none") into buffers from posix_memalign, which glibc
serves from fresh anonymous mappings. Most distributions ship THP in "madvise" mode, so those stay
on 4 KiB pages unless the process asks. llama.cpp allocates every weight buffer before it reads the
first tensor, and calls the load's progress callback before each tensor (llama-model-loader.cpp,
load_all_data). At the first call, WeightPages.advise() gives madvise(MADV_HUGEPAGE) to the large
anonymous mappings made since the load began; the reads that follow then fault in huge pages. No
copy at load time (khugepaged may later collapse what still faulted in small, as it does for any
area so marked). Where fresh huge pages are slow to come by (this VM: see the README), a load can
take longer; on the 7B it took less.

Which mappings: those of at least MIN_ADVISED that appeared during the load. Other threads may map
memory meanwhile (a server starting its HTTP threads: 8 MiB stacks); the size floor keeps those on
their own pages. glibc maps a block of its own only when the heap's free top cannot hold it and it
is over the mmap threshold (128 KiB, raised to the size of any mapped block freed, at most 32 MiB;
the top keeps up to twice that), so a weight buffer over 64 MiB is always a fresh mapping, and a
smaller one may reuse memory the process had and then keeps the pages it has (a model that small
gains little: most of it fits in the CPU's last-level cache).

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

THP = Path("/sys/kernel/mm/transparent_hugepage")
MADV_HUGEPAGE = 14       # linux/mman-common.h
MIN_ADVISED = 16 << 20   # smaller new mappings (thread stacks, malloc arenas' pieces) are left alone


def _pmd_size() -> int:
    """The huge page size THP uses (2 MiB on x86-64; 32 or 512 MiB on arm64 with 16 or 64 KiB pages)."""
    try:
        return int((THP / "hpage_pmd_size").read_text())
    except (OSError, ValueError):
        return 2 << 20


HUGE = _pmd_size()       # advise only whole ones
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
    """The part of [a, b) aligned to HUGE at both ends, or None when it holds no whole huge page."""
    lo, hi = (a + HUGE - 1) & ~(HUGE - 1), b & ~(HUGE - 1)
    return (lo, hi) if hi > lo else None


def thp_mode() -> str | None:
    """'always', 'madvise' or 'never' (the bracketed word in sysfs); None where there is no THP."""
    try:
        m = re.search(r"\[(\w+)\]", (THP / "enabled").read_text())
    except OSError:
        return None
    return m.group(1) if m else None


def _read_maps() -> list[tuple[int, int]] | None:
    try:  # a mapped file's name need not be UTF-8
        return anonymous_mappings(Path("/proc/self/maps").read_bytes().decode("utf-8", "replace"))
    except OSError:
        return None


class WeightPages:
    """One load's huge-page request: made before llama_model_load_from_file, advise() called from its
    progress callback (the loading thread), a no-op after the first call. `active` is False where
    there is nothing to ask (no Linux THP, THP "always" (the buffers get huge pages anyway) or
    "never", no /proc/self/maps); the load then needs no callback for it."""

    def __init__(self) -> None:
        self.mode = thp_mode() if sys.platform.startswith("linux") else None
        self._before = _read_maps() if self.mode == "madvise" else None
        self.active = self._before is not None
        self.advised = 0  # bytes given MADV_HUGEPAGE

    def advise(self) -> None:
        before, self._before = self._before, None
        after = _read_maps() if before is not None else None
        if after is None:
            return
        libc = ctypes.CDLL(None, use_errno=True)  # this process's symbols: libc's madvise on Linux
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        for a, b in new_ranges(before, after):
            span = whole_huge_pages(a, b) if b - a >= MIN_ADVISED else None
            if span is None:
                continue
            if libc.madvise(span[0], span[1] - span[0], MADV_HUGEPAGE) == 0:
                self.advised += span[1] - span[0]
                continue
            err = ctypes.get_errno()
            log.debug("madvise(MADV_HUGEPAGE) on %d MiB refused: %s", (span[1] - span[0]) >> 20, errno.errorcode.get(err, err))
            if err == errno.EINVAL:  # this kernel has no THP for such mappings: the rest would be refused too
                return
            # ENOMEM: another thread unmapped the range since the maps were read; the others still count
