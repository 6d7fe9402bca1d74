"""2 MiB pages for the weights (runtime/hugepages.py) against 4 KiB pages: load time and generation.

    python bench/hugepages.py --model bench/scratch/SmolLM2-135M-Instruct.Q4_1.gguf --rounds 10

Each round starts two fresh processes, one per arm, in rotated order: where the kernel puts a
process's weights (and whether it finds free huge pages) differs from process to process, so a
process kept across rounds would measure one placement many times. Each child loads the model
through runtime.load (read mode, CPU), then times --reps greedy generations of --n-gen tokens from
a short prompt. Arms:
  4k     huge_pages=False: the weights on 4 KiB pages (what llama.cpp's own tools get)
  huge   huge_pages=True, the default: MADV_HUGEPAGE on the weight buffers before they are read
Prints per-arm medians (load s, AnonHugePages MiB, tok/s) and the huge/4k ratios per round.
Needs Linux with THP in "madvise" mode; elsewhere both arms are the same and it says so.
Writes bench/out/hugepages-<model>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARMS = ("4k", "huge")
PROMPT = "Once upon a time"


def child(arm: str, model: str, threads: int, n_gen: int, reps: int) -> None:
    sys.path.insert(0, str(ROOT))
    from runtime import GenerationParams, load
    from server.pool import proc_value_bytes

    t = time.perf_counter()
    rt = load(model, n_ctx=2048, n_threads=threads, n_parallel=4, chat=False, n_gpu_layers=0, huge_pages=arm == "huge")
    load_s = time.perf_counter() - t
    try:
        rt.generate("Hello", GenerationParams(max_length=2, temperature=0.0))  # first decode: graph, threads
        p = GenerationParams(max_length=n_gen, temperature=0.0)
        rates, counts = [], []
        for _ in range(reps):
            t = time.perf_counter()
            n = rt.generate(PROMPT, p).completions[0].generated_tokens
            rates.append(n / (time.perf_counter() - t))
            counts.append(n)
        print(json.dumps({"load_s": load_s, "huge_mib": (proc_value_bytes("/proc/self/smaps_rollup", "AnonHugePages") or 0) / 2**20, "tok_s": statistics.median(rates),
                          "tokens": counts}))
    finally:
        rt.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--n-gen", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3, help="generations per process (default 3)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.model, args.threads, args.n_gen, args.reps)
        return 0
    sys.path.insert(0, str(ROOT))
    from runtime.hugepages import thp_mode

    mode = thp_mode()
    if mode != "madvise":
        print(f"note: transparent huge pages are {mode or 'absent'} here, not 'madvise': both arms get the same pages")
    res: dict[str, list[dict]] = {a: [] for a in ARMS}
    for r in range(args.rounds):
        for a in ARMS[r % 2:] + ARMS[: r % 2]:
            out = subprocess.run([sys.executable, __file__, "--child", a, "--model", args.model, "--threads", str(args.threads),
                                  "--n-gen", str(args.n_gen), "--reps", str(args.reps)], stdout=subprocess.PIPE, text=True,
                                 stderr=subprocess.DEVNULL)
            if out.returncode != 0:
                raise SystemExit(f"the {a} child exited with {out.returncode}")
            d = json.loads(out.stdout.strip().splitlines()[-1])
            res[a].append(d)
            print(f"  {r + 1:2} {a:5} load {d['load_s']:6.2f} s  huge pages {d['huge_mib']:7.0f} MiB  {d['tok_s']:7.2f} tok/s", flush=True)
    summary = {}
    print(f"\n{Path(args.model).name}: {args.rounds} rounds, {args.threads} threads, {args.reps} x {args.n_gen} tokens per process, "
          f"THP {mode}")
    for a in ARMS:
        summary[a] = {k: statistics.median(d[k] for d in res[a]) for k in ("load_s", "huge_mib", "tok_s")}
        print(f"  {a:5} load {summary[a]['load_s']:6.2f} s  huge pages {summary[a]['huge_mib']:7.0f} MiB  {summary[a]['tok_s']:7.2f} tok/s")
    for k in ("tok_s", "load_s"):
        ratios = [h[k] / f[k] for h, f in zip(res["huge"], res["4k"])]
        summary["ratio_" + k] = {"median": statistics.median(ratios), "rounds": ratios}
        print(f"  huge / 4k {k:7} median {statistics.median(ratios):.3f}  rounds " + " ".join(f"{x:.3f}" for x in ratios))
    dest = ROOT / "bench" / "out"
    dest.mkdir(exist_ok=True)
    path = dest / f"hugepages-{Path(args.model).stem}.json"
    path.write_text(json.dumps({"model": args.model, "threads": args.threads, "n_gen": args.n_gen, "thp": mode, "summary": summary,
                                "runs": res}, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
