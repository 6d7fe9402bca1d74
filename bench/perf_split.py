"""Where a generated token's CPU time goes, llamabox against llama-server: perf samples per token.

    python bench/perf_split.py --model bench/scratch/SmolLM2-135M-Instruct.Q4_1.gguf --reps 6 --twin

bench/peers.py says how fast each server is; this says why they differ, from a profile. Both
servers start as bench/peers.py starts them (same GGUF, threads, context, read mode) and serve two
~499-token prompts, so both are in peers' steady state. Then they take turns, in rotated order,
each generating 128-token completions from short prompts (greedy; --clients at once, default
one) for --window seconds, while `perf record` samples that process alone (cpu-clock at --freq
Hz, every thread). Each window's samples are split by the shared object they fall in, and
divided by the tokens made (at 999 Hz a sample is about 1 ms of CPU):
  ggml     libggml-cpu: llama.cpp's kernels. Both servers run the same code (one sdist, the same
           functions at the same offsets), so more samples per token here means the same work ran
           slower in that process, not that it did more work.
  openmp   libgomp: the thread team's barriers, and its threads spinning between kernels.
  python   the interpreter, its C extension modules (ctypes, json, sockets, numpy) and libffi:
           llamabox's own per-step work (the scheduler, its calls into llama.cpp, detokenising,
           HTTP), less what those spend in libc, which counts under other. llama-server has none.
  other    the rest: the kernel, libc, libm, libllama, libggml-base, the C++ server.
--twin adds a second llama-server, 'llama-server-2', the noise floor: the same binary twice.
--env-peer NAME=VALUE adds another llama-server, 'llama-server+env', with that variable in its
environment (GLIBC_TUNABLES=glibc.malloc.hugetlb=1 gives it huge pages, as llamabox asks for).
--by-kernel also splits the ggml samples by function (the 12 costliest, ms per token). The pip-built
libggml-cpu that llamabox loads is stripped, so every server's samples are named from the llama-server
build's unstripped copy: the two builds compile the same sources with the same flags into the same
layout, which this checks (.text at the same address, of the same size) before it trusts the names.
Prints per-arm medians, and each window's tok/s ratio to llama-server's window in the same rep.
Needs perf (Debian: linux-perf) and the right to attach to a process (root, or
kernel.perf_event_paranoid <= 1); without them it says so and exits 0, as make bench goes on.
Writes bench/out/perf-split-<model>[-c<clients>].json.
"""
from __future__ import annotations

import argparse
import bisect
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.llama_server_build import build as build_llama_server  # noqa: E402
from bench.peers import (TWIN, Peer, add_server_args, llama_server_peer, llamabox_peer,  # noqa: E402
                         long_prompt_words, text_of)

GROUPS = ("ggml", "openmp", "python", "other")
# cpu-clock, not perf's default (cycles where the CPU has counters): a sample is then 1/freq s of
# CPU time on any machine. No build-id cache: it would copy every library sampled into ~/.debug.
PERF_RECORD = ("-q", "-e", "cpu-clock", "--no-buildid-cache")
PROMPT, N_GEN = "Once upon a time", 128


def group_of(dso: str) -> str:
    if dso.startswith("libggml-cpu"):
        return "ggml"
    if dso.startswith("libgomp"):
        return "openmp"
    if dso.startswith(("libpython", "python", "libffi")) or ".cpython-" in dso:  # C extensions: _ctypes, _json, numpy
        return "python"
    return "other"


def samples_by_group(data: Path) -> dict[str, int]:
    """perf report's sample count per shared object, summed into GROUPS."""
    out = subprocess.run(["perf", "report", "-i", str(data), "--no-children", "--sort", "dso", "--stdio", "-g", "none",
                          "-F", "sample,dso"], capture_output=True, text=True, check=True).stdout
    counts = dict.fromkeys(GROUPS, 0)
    for line in out.splitlines():
        m = re.match(r"\s+(\d+)\s+(\S+)", line)  # "   12345  libggml-cpu.so.0"
        if m:
            counts[group_of(m.group(2))] += int(m.group(1))
    return counts


class KernelNames:
    """Function names for offsets into the libggml-cpu both servers load, from an unstripped build
    of the same code. make() says why not (and returns None) when the two cannot be matched."""

    def __init__(self, unstripped: Path, stem: str):
        nm = subprocess.run(["nm", "-n", "--defined-only", "-C", str(unstripped)], capture_output=True, text=True,
                            check=True).stdout
        rows = [line.split(" ", 2) for line in nm.splitlines()]
        rows = [(int(r[0], 16), r[2]) for r in rows if len(r) == 3 and r[1] in "tTwW"]
        self.starts, self.names = [a for a, _ in rows], [n for _, n in rows]
        self.stem = stem  # "libggml-cpu" (or a portable build's "libggml-cpu-haswell"): which samples are named
        self._mmap = re.compile(r"\[(0x[0-9a-f]+)\(0x[0-9a-f]+\) @ (0x[0-9a-f]+|0) .*r-xp \S*/" + re.escape(stem) + r"\.so")
        self._sample = re.compile(r"\s*([0-9a-f]+) \(\S*/" + re.escape(stem) + r"\.so\S*\)")

    @classmethod
    def make(cls, unstripped: Path, loaded: Path) -> KernelNames | None:
        """Names from `unstripped` are valid for `loaded` when both have the same functions at the same
        addresses (their unwind tables' ranges, readelf -wf) and .text sits at its file offset (so a
        sample's offset in the file is its address)."""
        why = None
        layouts = [cls._layout(unstripped), cls._layout(loaded)]
        if None in layouts:
            why = "cannot read .text's address and offset (readelf)"
        elif any(text[0] != text[1] for text, _ in layouts):
            why = ".text is not at its file offset"
        elif layouts[0] != layouts[1]:
            why = "the two builds lay their functions out differently"
        if why:
            print(f"note: --by-kernel skipped: {loaded} against {unstripped}: {why}")
            return None
        return cls(unstripped, Path(loaded).name.split(".")[0])

    @staticmethod
    def _layout(lib: Path) -> tuple[tuple[int, int, int], tuple[str, ...]] | None:
        """((.text address, offset, size), every FDE's pc range) of a shared object."""
        sections = subprocess.run(["readelf", "-S", "-W", str(lib)], capture_output=True, text=True).stdout
        m = re.search(r"\.text\s+PROGBITS\s+([0-9a-f]+)\s+([0-9a-f]+)\s+([0-9a-f]+)", sections)
        if not m:
            return None
        frames = subprocess.run(["readelf", "-wf", str(lib)], capture_output=True, text=True).stdout
        return (int(m.group(1), 16), int(m.group(2), 16), int(m.group(3), 16)), tuple(re.findall(r"pc=(\S+)", frames))

    def count(self, data: Path) -> dict[str, int]:
        """Samples per libggml-cpu function in a perf.data file: the library's executable mapping
        (from the mmap events) turns each sample's address into a file offset, named by nm."""
        out = subprocess.run(["perf", "script", "-i", str(data), "--show-mmap-events", "-F", "ip,dso"],
                             capture_output=True, text=True, check=True).stdout
        base, counts = None, {}
        for line in out.splitlines():
            m = self._mmap.search(line)
            if m:  # PERF_RECORD_MMAP2 ...: [start(len) @ file offset ...]: r-xp path
                base = int(m.group(1), 16) - int(m.group(2), 16)
                continue
            m = self._sample.match(line)
            if m and base is not None:
                i = bisect.bisect_right(self.starts, int(m.group(1), 16) - base) - 1
                name = self.names[i] if i >= 0 else "?"
                counts[name] = counts.get(name, 0) + 1
        return counts


def window(p: Peer, clients: int, seconds: float, freq: int, data: Path, kernels: KernelNames | None = None) -> dict:
    """`clients` clients generate for `seconds` under perf (requests in flight then run to their
    end, still sampled); tok/s and samples per generated token by group."""
    rec = subprocess.Popen(["perf", "record", *PERF_RECORD, "-F", str(freq), "-p", str(p.proc.pid), "-o", str(data)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.3)  # perf attaches to every thread before the first request
    tokens = [0] * clients
    failed: list[BaseException] = []
    t = time.perf_counter()

    def client(i: int) -> None:
        s, j = requests.Session(), 0
        try:
            while time.perf_counter() - t < seconds:
                # one client: always the same short prompt (peers' gen1); several: each its own, as peers' clientsK
                prompt = PROMPT if clients == 1 else f"Story {i} {j}: {PROMPT.lower()}"
                tokens[i] += p.complete(s, prompt, N_GEN).completion_tokens
                j += 1
        except BaseException as e:  # Peer.complete raises SystemExit, which a thread would drop silently
            failed.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    [x.start() for x in threads]
    [x.join() for x in threads]
    wall = time.perf_counter() - t
    rec.send_signal(signal.SIGINT)  # perf writes its file, then exits by re-raising the signal
    if rec.wait(60) not in (0, -signal.SIGINT):
        raise SystemExit(f"perf record exited with {rec.returncode} while sampling {p.name}")
    if failed:
        raise SystemExit(f"{p.name}: a client failed while perf was sampling: {failed[0]}")
    counts = samples_by_group(data)
    n = sum(tokens)
    if n == 0:
        raise SystemExit(f"{p.name} generated no tokens in a {seconds:.0f} s window")
    out = {"tok_s": n / wall, "tokens": n, **{g: counts[g] / n for g in GROUPS}, "all": sum(counts.values()) / n}
    if kernels is not None:
        out["kernels"] = {k: v / n for k, v in kernels.count(data).items()}
    return out


def perf_usable() -> str | None:
    """Why perf cannot sample another running process here, as window() does, or None."""
    if shutil.which("perf") is None:
        return "perf is not installed (Debian: apt-get install linux-perf)"
    target = subprocess.Popen(["sleep", "5"])
    try:
        r = subprocess.run(["perf", "record", *PERF_RECORD, "-p", str(target.pid), "-o", os.devnull, "--", "sleep", "0.2"],
                           capture_output=True, text=True)
    finally:
        target.kill()
        target.wait()
    if r.returncode != 0:
        return f"perf cannot attach to a process here: {(r.stderr.strip().splitlines() or ['exit ' + str(r.returncode)])[-1]}"
    return None


def kernel_samples_excluded() -> bool:
    """kernel.perf_event_paranoid > 1 keeps an unprivileged user's samples to user space."""
    try:
        return os.geteuid() != 0 and int(Path("/proc/sys/kernel/perf_event_paranoid").read_text()) > 1
    except (OSError, ValueError):
        return False


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_server_args(ap)
    ap.add_argument("--reps", type=int, default=6, help="windows per server (default 6)")
    ap.add_argument("--window", type=float, default=8.0, help="seconds of generation per window (default 8)")
    ap.add_argument("--freq", type=int, default=999, help="perf samples per second per thread (default 999)")
    ap.add_argument("--clients", type=int, default=1, help="clients generating at once (default 1)")
    ap.add_argument("--twin", action="store_true", help="also a second llama-server, the noise floor")
    ap.add_argument("--by-kernel", action="store_true", help="also split the ggml samples by function")
    ap.add_argument("--env-peer", metavar="NAME=VALUE", help="also a llama-server with this environment variable")
    args = ap.parse_args()
    why = perf_usable()
    if why:
        print(f"bench/perf_split.py skipped: {why}")
        return 0
    if kernel_samples_excluded():
        print("note: kernel.perf_event_paranoid > 1 and not root, so perf samples user space only: 'other' lacks "
              "kernel time")
    model = str(Path(args.model).resolve())
    binary = build_llama_server()
    kernels = None
    if args.by_kernel:
        from runtime import cpu_backend

        kernels = KernelNames.make(binary.parent / "libggml-cpu.so", Path(cpu_backend().library))
    shape = (model, args.threads, args.ctx, args.parallel, None)
    peers = [llamabox_peer(*shape), llama_server_peer(binary, *shape)]
    if args.twin:
        peers.append(llama_server_peer(binary, *shape, name=TWIN))
    if args.env_peer:
        key, sep, value = args.env_peer.partition("=")
        if not sep or not key:
            raise SystemExit(f"--env-peer: expected NAME=VALUE, got {args.env_peer!r}")
        peers.append(llama_server_peer(binary, *shape, name="llama-server+env"))
        peers[-1].env = {key: value}
    windows: dict[str, list[dict]] = {p.name: [] for p in peers}
    try:
        for p in peers:
            p.start()
        words = long_prompt_words(peers[1])
        sessions = {p.name: requests.Session() for p in peers}
        for p in peers:  # steady state, as bench/peers.py's: two long prompts cached, one generation done
            for i in range(2):
                p.complete(sessions[p.name], text_of(words, f"Note {i}:"), 1)
            p.complete(sessions[p.name], PROMPT, N_GEN)
        print(f"{Path(model).name}: {args.threads} threads, {args.clients} client(s), {args.reps} windows of {args.window:.0f} s per server, "
              f"perf at {args.freq} Hz; load average {os.getloadavg()[0]:.2f}", flush=True)
        with tempfile.TemporaryDirectory(prefix="llamabox-perf-") as tmp:
            for r in range(args.reps):
                for p in peers[r % len(peers):] + peers[: r % len(peers)]:
                    time.sleep(0.3)  # the previous server's OpenMP threads stop spinning
                    w = window(p, args.clients, args.window, args.freq, Path(tmp) / "perf.data", kernels)
                    windows[p.name].append(w)
                    print(f"  {r + 1}  {p.name:15} {w['tok_s']:7.1f} tok/s   samples per token: "
                          + "  ".join(f"{g} {w[g]:5.2f}" for g in GROUPS), flush=True)
    finally:
        for p in peers:
            p.stop()
    print(f"\n  {'median':15} {'tok/s':>7}  " + "".join(f"{g:>8}" for g in GROUPS) + f"{'all':>8}   tok/s / llama-server per rep")
    summary = {}
    base = windows["llama-server"]
    for name, ws in windows.items():
        med = {k: statistics.median(w[k] for w in ws) for k in ("tok_s", *GROUPS, "all")}
        ratios = [w["tok_s"] / b["tok_s"] for w, b in zip(ws, base)]
        summary[name] = {**med, "ratios": ratios}
        print(f"  {name:15} {med['tok_s']:7.1f}  " + "".join(f"{med[g]:8.2f}" for g in GROUPS) + f"{med['all']:8.2f}   "
              + (" ".join(f"{x:.3f}" for x in ratios) if name != "llama-server" else ""))
    if kernels is not None:
        names = sorted({k for ws in windows.values() for w in ws for k in w["kernels"]},
                       key=lambda k: -statistics.median(w["kernels"].get(k, 0) for w in base))[:12]
        width = max(16, *(len(n) + 2 for n in windows))
        print(f"\n  {'ggml function, median ms/token':48}" + "".join(f"{n:>{width}}" for n in windows))
        for k in names:
            meds = [statistics.median(w["kernels"].get(k, 0) for w in ws) for ws in windows.values()]
            print(f"  {k[:48]:48}" + "".join(f"{m:{width}.2f}" for m in meds))
            for name, m in zip(windows, meds):
                summary[name].setdefault("kernels", {})[k] = m
    dest = ROOT / "bench" / "out"
    dest.mkdir(exist_ok=True)
    path = dest / (f"perf-split-{Path(model).stem}" + (f"-c{args.clients}" if args.clients > 1 else "") + ".json")
    path.write_text(json.dumps({"model": model, "threads": args.threads, "clients": args.clients, "window_s": args.window, "freq": args.freq,
                                "summary": summary, "windows": windows}, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
