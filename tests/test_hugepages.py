"""2 MiB pages for the weights (runtime/hugepages.py): the /proc/self/maps arithmetic, and a real load
whose weight mappings the kernel then flags for huge pages."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from runtime.hugepages import HUGE, anonymous_mappings, new_ranges, thp_mode, whole_huge_pages

MAPS = """\
55d0c0a00000-55d0c0a21000 r--p 00000000 fe:00 123                        /usr/bin/python3.11
55d0c2c3d000-55d0c3000000 rw-p 00000000 00:00 0                          [heap]
7f0e0365d000-7f0e14ffa000 rw-p 00000000 00:00 0 
7f0e20000000-7f0e20021000 rw-p 00000000 00:00 0
7f0e30000000-7f0e30400000 r--p 00000000 00:00 0
7f0e40000000-7f0e40200000 rw-p 00001000 fe:00 999                        /tmp/model.gguf
"""


def test_only_writable_anonymous_mappings_are_taken():
    assert anonymous_mappings(MAPS) == [(0x7F0E0365D000, 0x7F0E14FFA000), (0x7F0E20000000, 0x7F0E20021000)]


def test_new_ranges_subtract_what_was_there_before():
    before = [(0x1000, 0x3000), (0x8000, 0x9000)]
    # a mapping that grew on both sides of an old one, a new one, and an unchanged one
    after = [(0x0, 0x4000), (0x5000, 0x6000), (0x8000, 0x9000)]
    assert new_ranges(before, after) == [(0x0, 0x1000), (0x3000, 0x4000), (0x5000, 0x6000)]


def test_only_whole_aligned_huge_pages_are_advised():
    assert whole_huge_pages(HUGE + 1, 3 * HUGE - 1) is None  # no aligned 2 MiB inside
    assert whole_huge_pages(HUGE - 4096, 4 * HUGE + 4096) == (HUGE, 4 * HUGE)


def _flagged_bytes() -> int:
    """Bytes of this process's mappings that carry VM_HUGEPAGE ('hg' in smaps' VmFlags)."""
    total = 0
    for block in re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", Path("/proc/self/smaps").read_text()):
        flags = re.search(r"^VmFlags:(.*)$", block, re.M)
        if flags and "hg" in flags.group(1).split():
            a, b = (int(x, 16) for x in block.split(" ", 1)[0].split("-"))
            total += b - a
    return total


@pytest.fixture(scope="module")
def weights_gguf(tmp_path_factory) -> Path:
    """~97 MiB of F16 weights in one llama.cpp buffer: over the 64 MiB that glibc may serve from its
    heap, so a fresh mapping even in a process that freed big blocks before (see runtime/hugepages.py)."""
    from tinyllama import TinyConfig, make_tiny_llama

    from convert.hf_to_gguf import export_gguf

    folder = tmp_path_factory.mktemp("hp-hf")
    make_tiny_llama(folder, TinyConfig(n_embd=768, n_ff=2048, n_layer=8, n_head=12, n_head_kv=4), "F32")
    export_gguf(folder, folder / "hp.gguf", "f16")
    return folder / "hp.gguf"


@pytest.mark.skipif(thp_mode() != "madvise", reason="needs Linux with transparent huge pages in 'madvise' mode "
                                                     "(/sys/kernel/mm/transparent_hugepage/enabled)")
@pytest.mark.parametrize("huge_pages", [True, False])
def test_weights_read_into_memory_are_flagged_for_huge_pages(weights_gguf, huge_pages):
    from runtime.model import LlamaModel, LoadConfig

    before = _flagged_bytes()
    model = LlamaModel(weights_gguf, LoadConfig(n_ctx=64, n_threads=2, n_gpu_layers=0, huge_pages=huge_pages))
    try:
        flagged = _flagged_bytes() - before
        if huge_pages:
            # all of the F16 weights but the unaligned ends of their buffer (a mapping starts on any 4 KiB)
            assert model.huge_page_bytes >= 90 << 20
            assert flagged >= model.huge_page_bytes
        else:
            assert model.huge_page_bytes == 0 and flagged <= 0
    finally:
        model.close()


@pytest.mark.skipif(thp_mode() != "madvise", reason="needs Linux with transparent huge pages in 'madvise' mode")
def test_mapped_weights_are_not_advised(weights_gguf):
    from runtime.model import LlamaModel, LoadConfig

    model = LlamaModel(weights_gguf, LoadConfig(n_ctx=64, n_threads=2, n_gpu_layers=0, use_mmap=True))
    try:
        assert model.huge_page_bytes == 0
    finally:
        model.close()


@pytest.mark.skipif(thp_mode() != "madvise", reason="needs Linux with transparent huge pages in 'madvise' mode")
@pytest.mark.parametrize("flag", [[], ["--no-huge-pages"]])
def test_cli_asks_for_huge_pages_unless_told_not_to(tmp_path, weights_gguf, flag):
    from test_cli import llamabox

    proc = llamabox("generate", "--model", weights_gguf, *flag, "--max-length", 2, "--ctx", 64, "Hello", home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert ("asked for huge pages" in proc.stderr) == (not flag), proc.stderr


def test_an_exception_in_the_load_callback_is_raised_not_read_as_a_bad_file(weights_gguf):
    # The progress callback (huge pages, abort) runs inside llama.cpp's load; what it raises must
    # come out as itself (Ctrl-C is KeyboardInterrupt), not as "malformed or unsupported GGUF".
    from runtime.model import LlamaModel, LoadConfig

    class Stop(Exception):
        pass

    def abort():
        raise Stop("from the callback")

    with pytest.raises(Stop):
        LlamaModel(weights_gguf, LoadConfig(n_ctx=64, n_threads=2, n_gpu_layers=0), abort=abort)
