"""Several models in one process (issue 11): the cost of a swap, and two models decoding at once.

    python bench/multi.py --model FILE.gguf [--rounds 3]

The same GGUF is loaded twice under two ids (two real llama.cpp models and contexts).
  * swap: with a budget for one model, a request to the other forces an unload and a load;
    its wall time is compared with the plain load time of the model.
  * two at once: two models loaded; tokens/s of one generating alone, and total tokens/s of both
    generating at once, with every decode on one shared compute thread (what the server does
    with several models) against a worker thread each calling llama.cpp (runtime/compute.py).
Arms alternate, order rotated each round; medians are printed and written to bench/out/multi.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPT = "The history of the river begins in the mountains, where"
N_TOKENS = 96


def gen(rt, n=N_TOKENS) -> int:
    from runtime import GenerationParams

    return rt.generate(PROMPT, GenerationParams(max_length=n, temperature=0.0)).completions[0].generated_tokens


def child(path: Path, threads: int, shared: bool) -> dict:
    """Two models of the same file; tokens/s of one generating alone, then of both at once."""
    from runtime import load
    from runtime.compute import ComputeThread

    compute = ComputeThread() if shared else None
    a, b = (load(path, n_ctx=1024, n_threads=threads, model_id=m, chat=False, compute=compute and compute.call) for m in "ab")
    try:
        gen(a), gen(b)  # warm-up: both have decoded (in the separate arm, each worker made its thread team)

        def alone() -> float:
            t0 = time.perf_counter()
            return gen(a) / (time.perf_counter() - t0)

        def pair() -> float:
            counts = [0, 0]
            t0 = time.perf_counter()
            ts = [threading.Thread(target=lambda i, rt: counts.__setitem__(i, gen(rt)), args=(i, rt)) for i, rt in enumerate((a, b))]
            [t.start() for t in ts]
            [t.join() for t in ts]
            return sum(counts) / (time.perf_counter() - t0)

        return {"alone": statistics.median(alone() for _ in range(3)), "pair": statistics.median(pair() for _ in range(3))}
    finally:
        a.close()
        b.close()
        if compute is not None:
            compute.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--child", choices=("shared", "separate"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(Path(args.model), args.threads, args.child == "shared")))
        return

    from runtime import load
    from server.pool import Entry, ModelPool, estimate_cost

    path = Path(args.model)

    def loader(lock):
        return lambda e: load(e.path, n_ctx=1024, n_threads=args.threads, model_id=e.model_id, chat=False)

    out: dict = {"model": str(path), "threads": args.threads}
    # --- swap ---------------------------------------------------------------------------------
    est = estimate_cost(path, 1024)
    entries = [Entry("a", path, chat=False, estimate_bytes=est, pinned=True), Entry("b", path, chat=False, estimate_bytes=est)]
    pool = ModelPool(entries, loader(None), int(est * 1.05))  # one fits, estimated or measured
    plain, swaps = [], []
    for r in range(args.rounds):
        t0 = time.perf_counter()
        rt = load(path, n_ctx=1024, n_threads=args.threads, chat=False)
        plain.append(time.perf_counter() - t0)
        rt.close()
        for m in ("a", "b"):
            t0 = time.perf_counter()
            rt = pool.acquire(m)  # the other one goes first (the budget holds one)
            swaps.append(time.perf_counter() - t0)
            pool.release(m)
    pool.close()
    swaps = swaps[1:]  # the first acquire is a plain load: nothing to unload yet
    out["swap"] = {"plain_load_s": statistics.median(plain), "swap_s": statistics.median(swaps)}
    print(f"plain load {out['swap']['plain_load_s'] * 1000:.0f} ms, request that forces unload + load "
          f"{out['swap']['swap_s'] * 1000:.0f} ms (medians: {len(plain)} loads, {len(swaps)} swaps)", flush=True)

    # --- two models decoding at once: each configuration in its own process -----------------
    # (OpenMP thread teams, once made by a thread that decoded, stay for the process's life.)
    res: dict[str, list[dict]] = {"shared compute thread": [], "a worker each": []}
    names = list(res)
    for r in range(args.rounds):
        for k in range(len(names)):
            name = names[(k + r) % len(names)]
            cmd = [sys.executable, __file__, "--model", str(path), "--threads", str(args.threads),
                   "--child", "shared" if name.startswith("shared") else "separate"]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            if done.returncode != 0:
                sys.exit(done.stderr.strip().splitlines()[-1])
            res[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
            x = res[name][-1]
            print(f"round {r + 1} {name:22} one model {x['alone']:6.1f} tok/s, two at once {x['pair']:6.1f} tok/s total", flush=True)
    out["two_at_once"] = {k: {m: statistics.median(x[m] for x in v) for m in ("alone", "pair")} for k, v in res.items()}
    print(f"\nmedians over {args.rounds} rounds, {path.name}, {args.threads} threads each, two models loaded:")
    for k, v in out["two_at_once"].items():
        print(f"  {k:22} one model generating {v['alone']:6.1f} tok/s; both at once {v['pair']:6.1f} tok/s total")
    (ROOT / "bench" / "out").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "out" / "multi.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
