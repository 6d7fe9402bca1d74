"""Where a small model's generation time goes, below HTTP: raw llama.cpp loops against the runtime.

    python bench/overhead.py --model bench/scratch/SmolLM2-135M-Instruct.Q4_1.gguf --rounds 7

Each arm is its own process (two llama.cpp contexts decoding in one process means two OpenMP
thread teams, which throttles both; see runtime/compute.py), kept alive across rounds; arms
take turns in rotated order, and ratios are per round. Arms, all greedy, n_gen tokens from
the same short prompt, EOS ignored by the raw loops (the runtime's count is checked):
  raw          bench/run.py's RawLoop on the main thread, the only thread that ever decodes
  raw-thread   the same loop on a second thread, after the main thread has decoded once
               (OpenMP keeps a team per calling thread: two teams on two cores)
  runtime      runtime.generate: the scheduler's worker thread, no HTTP
  runtime-2c   the same, after two ~499-token prompts went through the prefix cache
  runtime:TYPE runtime with a TYPE KV cache (--kv-type), e.g. --arms runtime,runtime:q8_0
Prints tok/s medians and per-round ratios to raw; writes bench/out/overhead-<model>.json.
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
ARMS = ("raw", "raw-thread", "runtime", "runtime-2c")
PROMPT = "Once upon a time"


def child(arm: str, model: str, threads: int, n_gen: int) -> None:
    """Serve `gen` commands on stdin: one generation of n_gen tokens, its tok/s on stdout."""
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "bench"))
    if arm.startswith("raw"):
        from run import RawLoop

        raw = RawLoop(model, threads, n_ctx=2048, n_seq_max=12)
        prompt = raw_tokens(raw, PROMPT)
        raw.generate(prompt, 4)  # the main thread decodes first
        if arm == "raw":
            gen = lambda: (n_gen, raw.generate(prompt, n_gen))  # noqa: E731
        else:
            gen = on_thread(lambda: (n_gen, raw.generate(prompt, n_gen)))
    else:
        from runtime import GenerationParams, load

        kv = arm.split(":")[1] if ":" in arm else "f16"
        rt = load(model, n_ctx=2048, n_threads=threads, n_parallel=8, chat=False, kv_type=kv)
        p = GenerationParams(max_length=n_gen, temperature=0.0)
        rt.generate("Hello", GenerationParams(max_length=2, temperature=0.0))
        if arm == "runtime-2c":
            words = "the quick brown fox jumps over the lazy dog".split()
            for i in range(2):
                rt.generate(f"Note {i}: " + " ".join(words[k % 9] for k in range(440)), GenerationParams(max_length=1))

        def gen():
            t = time.perf_counter()
            r = rt.generate(PROMPT, p)
            n = r.completions[0].generated_tokens
            return n, n / (time.perf_counter() - t)
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() == "gen":
            n, rate = gen()
            print(f"{n} {rate}", flush=True)


def raw_tokens(raw, text: str) -> list[int]:
    lc = raw.lc
    vocab = lc.llama_model_get_vocab(raw.model)
    buf = (lc.llama_token * 256)()
    n = lc.llama_tokenize(vocab, text.encode(), len(text.encode()), buf, 256, True, False)
    return list(buf[:n])


def on_thread(fn):
    """fn, run on one long-lived second thread (not the one that decoded first)."""
    import queue

    jobs: queue.SimpleQueue = queue.SimpleQueue()
    results: queue.SimpleQueue = queue.SimpleQueue()
    threading.Thread(target=lambda: [results.put(fn()) for _ in iter(jobs.get, None)], daemon=True).start()

    def call():
        jobs.put(1)
        return results.get()
    return call


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--n-gen", type=int, default=128)
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.model, args.threads, args.n_gen)
        return 0
    arms = args.arms.split(",")
    procs = {}
    for a in arms:
        procs[a] = subprocess.Popen([sys.executable, __file__, "--child", a, "--model", args.model, "--threads", str(args.threads),
                                     "--n-gen", str(args.n_gen)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                    stderr=subprocess.DEVNULL)
        assert procs[a].stdout.readline().strip() == "ready", a
    rates: dict[str, list[float]] = {a: [] for a in arms}
    counts: dict[str, list[int]] = {a: [] for a in arms}
    try:
        for r in range(args.rounds):
            for a in arms[r % len(arms):] + arms[: r % len(arms)]:
                time.sleep(0.3)  # the previous arm's OpenMP threads stop spinning
                procs[a].stdin.write("gen\n")
                procs[a].stdin.flush()
                n, rate = procs[a].stdout.readline().split()
                counts[a].append(int(n))
                rates[a].append(float(rate))
    finally:
        for p in procs.values():
            p.stdin.close()
            p.wait(30)
    base = arms[0]
    out = {"model": args.model, "threads": args.threads, "n_gen": args.n_gen, "rates": rates, "counts": counts, "vs_" + base: {}}
    print(f"{Path(args.model).name}: {args.rounds} rounds of {args.n_gen} tokens, load {os.getloadavg()[0]:.2f}")
    for a in arms:
        ratios = [x / y for x, y in zip(rates[a], rates[base])]
        out["vs_" + base][a] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
        print(f"  {a:12} {statistics.median(rates[a]):8.1f} tok/s  / {base}: {statistics.median(ratios):.3f} "
              f"[{min(ratios):.3f}-{max(ratios):.3f}]  tokens {sorted(set(counts[a]))}")
    dest = ROOT / "bench" / "out"
    dest.mkdir(exist_ok=True)
    (dest / f"overhead-{Path(args.model).stem}.json").write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
