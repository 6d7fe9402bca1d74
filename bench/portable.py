"""Native against portable llama-cpp-python on the same GGUF: what the air-gapped kit costs in speed.

    python bench/portable.py --model FILE.gguf --portable VENV/bin/python [--native .venv/bin/python]
                             [--rounds 5] [--threads 2]

`native` is the wheel `make` builds (-march=native, one CPU backend linked in); `portable` is the
one `make wheelhouse` ships (GGML_NATIVE=OFF, every x86-64 variant as a module, the best chosen at
run time), installed with the wheelhouse's install.sh. Each arm runs in its own fresh process
(load, one warm-up, then a 400-token prompt with 1 new token, then 128 new tokens greedy from a
short prompt), arms alternating with the order rotated every round; the figures are medians of
per-round ratios, with their ranges, which cancels the VM's drift.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

ARM = r'''
import json, sys, time
from runtime import GenerationParams, cpu_backend, load
path, threads = sys.argv[1], int(sys.argv[2])
rt = load(path, n_ctx=2048, n_threads=threads, n_parallel=1, chat=False)
greedy = lambda n: GenerationParams(max_length=n, temperature=0.0)
rt.generate("Warm up with a few words", greedy(4))
long = " ".join(f"The {i}th river runs to the sea." for i in range(50))
t0 = time.perf_counter(); r = rt.generate(long, greedy(1)); pp_s = time.perf_counter() - t0
pp_tokens = r.completions[0].prompt_tokens
t0 = time.perf_counter(); r = rt.generate("Once upon a time", greedy(128)); tg_s = time.perf_counter() - t0
c = r.completions[0]
print(json.dumps({"variant": cpu_backend().describe(), "pp_tok_s": pp_tokens / pp_s, "pp_tokens": pp_tokens,
                  "tg_tok_s": c.generated_tokens / tg_s, "tg_tokens": c.generated_tokens}))
rt.close()
'''


def run_arm(python: str, model: str, threads: int) -> dict:
    r = subprocess.run([python, "-c", ARM, model, str(threads)], capture_output=True, text=True, timeout=600)
    if r.returncode:
        raise SystemExit(f"{python} failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--native", default=str(ROOT / ".venv" / "bin" / "python"))
    ap.add_argument("--portable", required=True, help="python of a venv installed from the wheelhouse")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    arms = {"native": args.native, "portable": args.portable}
    rounds = []
    for i in range(args.rounds):
        order = list(arms) if i % 2 == 0 else list(arms)[::-1]
        res = {name: run_arm(arms[name], args.model, args.threads) for name in order}
        rounds.append(res)
        print(f"round {i + 1}: " + "  ".join(f"{n}: pp {r['pp_tok_s']:.1f} tg {r['tg_tok_s']:.1f} tok/s"
                                               for n, r in res.items()), flush=True)
    for name in arms:
        print(f"{name:9} CPU backend: {rounds[0][name]['variant']}")
    for key, label in (("pp_tok_s", "prompt processing"), ("tg_tok_s", "generation")):
        ratios = [r["portable"][key] / r["native"][key] for r in rounds]
        med = {n: statistics.median(r[n][key] for r in rounds) for n in arms}
        print(f"{label:18} native {med['native']:.1f} tok/s, portable {med['portable']:.1f} tok/s; "
              f"portable / native = {statistics.median(ratios):.3f} [{min(ratios):.3f}-{max(ratios):.3f}]")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rounds, indent=2))


if __name__ == "__main__":
    main()
