"""Does offload work? One model on the CPU against the same model offloaded, on a GPU build.

    python bench/gpu_check.py --model convert/builtin/llamabox-tiny/llamabox-tiny.q8_0.gguf

Needs llama-cpp-python built with a GPU backend
(CMAKE_ARGS="-DGGML_CUDA=on" pip install --force-reinstall --no-cache-dir llama-cpp-python==0.3.36)
and a GPU; on a CPU-only build the "auto" arm simply runs on the CPU too, and the table says so.

Each arm is its own process (one llama.cpp context, one OpenMP team): "cpu" loads with
--gpu-layers 0, "auto" with the default (every layer when there is a GPU). Each reports:
- where the model runs (backend, layers offloaded), load seconds, RSS and, from nvidia-smi,
  the GPU memory the process holds after load;
- greedy text for three prompts (the two arms' texts are compared: GPU kernels round
  differently, so a late divergence is expected, an early one is not);
- tok/s: one client, n_gen tokens, median of 3; four clients at once, total;
- the prefix cache on device memory: a ~400-token prompt, another prompt (which parks the
  first to host memory), the first again (restored from host): same greedy text as the first
  time, with one restore counted.
Prints a table; writes bench/out/gpu-check.json.
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
PROMPTS = ("Once upon a time", "The little dog", "She opened the door and")


def _gpu_mib(pid: int) -> float | None:
    """GPU memory nvidia-smi says this process holds, in MiB; None without nvidia-smi or a match."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in out.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) == 2 and fields[0] == str(pid):
            return float(fields[1])
    return None


def child(arm: str, model: str, n_gen: int) -> dict:
    from runtime import GenerationParams, cpu_backend, load
    from server.pool import rss_bytes

    greedy = GenerationParams(max_length=n_gen, temperature=0.0)
    rt = load(model, n_ctx=2048, n_gpu_layers=0 if arm == "cpu" else None, n_parallel=4, chat=False)
    try:
        out: dict = {"arm": arm, "placement": rt.info.placement(), "backend": rt.info.backend,
                     "gpu_layers": rt.info.n_gpu_layers, "layers": rt.info.n_layers, "cpu_kernels": cpu_backend().describe(),
                     "load_s": round(rt.info.load_seconds, 3), "rss_mib": round(rss_bytes() / 2**20, 1), "gpu_mib": _gpu_mib(os.getpid())}
        out["texts"] = [rt.generate(p, greedy).completions[0].text for p in PROMPTS]

        def timed(prompt: str) -> float:
            t = time.perf_counter()
            c = rt.generate(prompt, GenerationParams(max_length=n_gen, temperature=0.0)).completions[0]
            return c.generated_tokens / (time.perf_counter() - t)

        out["tok_s_1"] = round(statistics.median(timed(PROMPTS[0]) for _ in range(3)), 1)
        counts: list[int] = []

        def client(i: int) -> None:
            counts.append(rt.generate(f"Client {i}: {PROMPTS[i % 3]}", greedy).completions[0].generated_tokens)

        t = time.perf_counter()
        ths = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        [th.start() for th in ths]
        [th.join() for th in ths]
        out["tok_s_4"] = round(sum(counts) / (time.perf_counter() - t), 1)

        long_prompt = " ".join(["The quick brown fox jumps over the lazy dog."] * 40)
        first = rt.generate(long_prompt, greedy).completions[0].text
        rt.generate("A different story begins here, and it is not about foxes at all.", greedy)
        restores = rt.scheduler.cache.stats["prefix_cache_restores"]
        again = rt.generate(long_prompt, greedy).completions[0].text
        out["prefix_restore"] = {"restores": rt.scheduler.cache.stats["prefix_cache_restores"] - restores,
                                 "parks": rt.scheduler.cache.stats["prefix_cache_parks"], "same_text": first == again}
        out["gpu_mib_after"] = _gpu_mib(os.getpid())
        out["rss_mib_after"] = round(rss_bytes() / 2**20, 1)
        return out
    finally:
        rt.close()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "convert/builtin/llamabox-tiny/llamabox-tiny.q8_0.gguf"))
    ap.add_argument("--n-gen", type=int, default=128)
    ap.add_argument("--child", choices=("cpu", "auto"))
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.model, args.n_gen)), flush=True)
        return 0
    arms = {}
    for arm in ("cpu", "auto"):
        p = subprocess.run([sys.executable, __file__, "--child", arm, "--model", args.model, "--n-gen", str(args.n_gen)],
                           capture_output=True, text=True, timeout=600)
        if p.returncode != 0:
            print(f"{arm}: failed (exit {p.returncode})\n{p.stderr[-3000:]}", file=sys.stderr)
            return 1
        arms[arm] = json.loads(p.stdout.strip().splitlines()[-1])
    from runtime.prefix_cache import common_prefix

    cpu, auto = arms["cpu"], arms["auto"]
    print(f"model {args.model}\nCPU kernels: {cpu['cpu_kernels']}")
    rows = ("placement", "load_s", "rss_mib", "gpu_mib", "tok_s_1", "tok_s_4", "prefix_restore", "rss_mib_after", "gpu_mib_after")
    for key in rows:
        print(f"  {key:15} cpu: {cpu[key]!s:34} auto: {auto[key]!s}")
    agree = [common_prefix(a, b) for a, b in zip(cpu["texts"], auto["texts"])]  # characters
    lengths = [len(t) for t in cpu["texts"]]
    print(f"  greedy texts agree for {agree} of {lengths} characters")
    for t in auto["texts"]:
        print(f"    auto: {t[:100]!r}")
    out = ROOT / "bench/out/gpu-check.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "arms": arms, "agree_chars": agree}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
