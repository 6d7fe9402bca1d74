"""How long a running stream stalls while a long prompt arrives (issue 9, finding 9).

    python bench/prefill_stall.py --model FILE.gguf                    # this checkout, several prefill chunks
    python bench/prefill_stall.py --model FILE.gguf --before TREE      # + another checkout (e.g. the commit
                                                                       #   before interleaving), rounds interleaved

Stream A generates; after its 16th token, request B arrives with a prompt of
--prompt-tokens tokens. From B's arrival to B's first token we record the times
of A's tokens (on the worker thread, monotonic clock) and report A's worst gap,
A's median gap, and B's time to first token. Before interleaving, B's whole
prompt was evaluated between two of A's steps, so A's worst gap was B's whole
prompt time. Each configuration runs in its own child process, in turns.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COUNTING = ", ".join(str(i) for i in range(1, 40))  # a prompt a model continues for a long time


def child(model: str, prompt_tokens: int, chunk: int | None, threads: int) -> dict:
    from runtime import GenerationParams, load

    kw = dict(n_ctx=4096, n_threads=threads, n_parallel=2, n_cache=0, queue_size=4)
    sig = inspect.signature(load).parameters
    if "chat" in sig:
        kw["chat"] = False
    if chunk is not None:
        kw["prefill_chunk"] = chunk
    rt = load(model, **kw)
    try:
        # B's prompt: words until it is prompt_tokens long (measured with the model's tokenizer).
        words = "the river carries stone and sand down to the sea where the tide turns".split()
        n_words = prompt_tokens
        for _ in range(3):
            text = " ".join(words[i % len(words)] for i in range(n_words))
            n = len(rt.prompt_tokens(text, GenerationParams(max_length=1)))
            n_words = max(1, n_words * prompt_tokens // n)
        a_times: list[float] = []
        b_first: list[float] = []
        sixteen = threading.Event()

        def on_a(_i, _t):
            a_times.append(time.monotonic())
            if len(a_times) == 16:
                sixteen.set()

        # Warm up once (first decode allocates buffers).
        rt.generate("Hello", GenerationParams(max_length=4, temperature=0.0))
        a = rt.submit(COUNTING, GenerationParams(max_length=1500, temperature=0.0), on_text=on_a)
        assert sixteen.wait(120), "stream A did not produce 16 tokens"
        t_b = time.monotonic()
        b = rt.submit(text, GenerationParams(max_length=4, temperature=0.0),
                      on_text=lambda _i, _t: b_first.append(time.monotonic()) if not b_first else None)
        b.future.result(600)
        a_done = a.future.done()
        a.cancel()
        t_end = b_first[0] if b_first else time.monotonic()
        window = [t_b] + [t for t in a_times if t_b < t <= t_end] + [t_end]
        gaps = [y - x for x, y in zip(window, window[1:])]
        return {"prompt_tokens": n, "a_tokens_during": len(window) - 2, "worst_gap_s": max(gaps),
                "median_gap_s": statistics.median(gaps), "b_ttft_s": t_end - t_b, "a_finished_early": a_done}
    finally:
        rt.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompt-tokens", type=int, default=1500)
    ap.add_argument("--chunks", default="64,16", help="prefill chunks to measure in this checkout")
    ap.add_argument("--before", help="another checkout to measure the same way (its own runtime/)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--chunk", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.model = str(Path(args.model).resolve())  # the children run in their own trees
    if args.child:
        print(json.dumps(child(args.model, args.prompt_tokens, args.chunk, args.threads)))
        return
    arms: list[tuple[str, Path, int | None]] = []
    if args.before:
        arms.append(("before", Path(args.before).resolve(), None))
    arms += [(f"chunk {c}", ROOT, int(c)) for c in args.chunks.split(",")]
    results: dict[str, list[dict]] = {name: [] for name, _, _ in arms}
    for r in range(args.rounds):
        for k in range(len(arms)):
            name, tree, chunk = arms[(k + r) % len(arms)]  # rotate the order every round
            cmd = [sys.executable, str(ROOT / "bench" / "prefill_stall.py"), "--child", "--model", args.model,
                   "--prompt-tokens", str(args.prompt_tokens), "--threads", str(args.threads)]
            if chunk is not None:
                cmd += ["--chunk", str(chunk)]
            env = {**os.environ, "PYTHONPATH": str(tree)}
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tree, timeout=1200)
            if out.returncode != 0:
                sys.exit(f"{name}: {out.stderr.strip().splitlines()[-1]}")
            res = json.loads(out.stdout.strip().splitlines()[-1])
            results[name].append(res)
            print(f"round {r + 1} {name:10} worst gap {res['worst_gap_s']:7.3f} s  median gap {res['median_gap_s']:.3f} s  "
                  f"B ttft {res['b_ttft_s']:6.2f} s  A tokens meanwhile {res['a_tokens_during']}", flush=True)
    print(f"\nprompt of B: {results[arms[0][0]][0]['prompt_tokens']} tokens, medians over {args.rounds} rounds")
    summary = {}
    for name, rs in results.items():
        summary[name] = {k: statistics.median(x[k] for x in rs) for k in ("worst_gap_s", "median_gap_s", "b_ttft_s", "a_tokens_during")}
        s = summary[name]
        print(f"{name:10} worst gap {s['worst_gap_s']:7.3f} s  median gap {s['median_gap_s']:.3f} s  B ttft {s['b_ttft_s']:6.2f} s")
    out_dir = ROOT / "bench" / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "prefill_stall.json").write_text(json.dumps({"model": args.model, "rounds": results, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
