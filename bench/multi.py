"""Several models in one process (issue 11): the cost of a swap, and two models decoding at once.

    python bench/multi.py --model FILE.gguf [--rounds 3]

The same GGUF is loaded twice under two ids (two real llama.cpp models and contexts).
  * swap: with a budget for one model, a request to the other forces an unload and a load;
    its wall time is compared with the plain load time of the model.
  * two at once: two clients generate at the same time, one per model, each with --threads
    threads; total tokens/s with the shared compute lock (what the server does) against
    separate locks (both decode at once on the same cores), and one model alone as the bound.
Arms alternate, order rotated each round; medians are printed and written to bench/out/multi.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()

    from runtime import load
    from server.pool import Entry, ModelPool, estimate_cost

    path = Path(args.model)

    def loader(lock):
        return lambda e: load(e.path, n_ctx=1024, n_threads=args.threads, model_id=e.model_id, chat=False, compute_lock=lock)

    out: dict = {"model": str(path), "threads": args.threads}
    # --- swap ---------------------------------------------------------------------------------
    est = estimate_cost(path, 1024)
    entries = [Entry("a", path, chat=False, estimate_bytes=est, pinned=True), Entry("b", path, chat=False, estimate_bytes=est)]
    pool = ModelPool(entries, loader(threading.Lock()), int(est * 1.05))  # one fits, estimated or measured
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

    # --- two models decoding at once ------------------------------------------------------------
    shared = threading.Lock()
    a, b = load(path, n_ctx=1024, n_threads=args.threads, model_id="a", chat=False, compute_lock=shared), \
        load(path, n_ctx=1024, n_threads=args.threads, model_id="b", chat=False, compute_lock=shared)
    c, d = load(path, n_ctx=1024, n_threads=args.threads, model_id="c", chat=False), \
        load(path, n_ctx=1024, n_threads=args.threads, model_id="d", chat=False)
    gen(a), gen(c)  # warm-up

    def pair(x, y) -> float:
        counts = [0, 0]
        t0 = time.perf_counter()
        ts = [threading.Thread(target=lambda i, rt: counts.__setitem__(i, gen(rt)), args=(i, rt)) for i, rt in enumerate((x, y))]
        [t.start() for t in ts]
        [t.join() for t in ts]
        return sum(counts) / (time.perf_counter() - t0)

    def alone(x) -> float:
        t0 = time.perf_counter()
        return gen(x) / (time.perf_counter() - t0)

    arms = {"one model alone": lambda: alone(a), "two, shared lock": lambda: pair(a, b), "two, no lock": lambda: pair(c, d)}
    res: dict[str, list[float]] = {k: [] for k in arms}
    names = list(arms)
    for r in range(args.rounds):
        for k in range(len(names)):
            name = names[(k + r) % len(names)]
            res[name].append(arms[name]())
            print(f"round {r + 1} {name:18} {res[name][-1]:7.1f} tok/s total", flush=True)
    for rt in (a, b, c, d):
        rt.close()
    out["two_at_once"] = {k: statistics.median(v) for k, v in res.items()}
    print(f"\nmedians over {args.rounds} rounds, {path.name}, {args.threads} threads each:")
    for k, v in out["two_at_once"].items():
        print(f"  {k:18} {v:7.1f} tok/s total")
    (ROOT / "bench" / "out").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "out" / "multi.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
