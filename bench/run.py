"""llamabox benchmarks: every figure on the same GGUF, same threads, same run.

    make bench-quick            # the built-in demo model, a few seconds per figure
    make bench ARGS="--model PATH.gguf"

Prints a table and writes bench/out/<model>.json. Figures:
  * memory read bandwidth (numpy, one thread per core), the roofline (bandwidth / model bytes per token)
  * prompt processing (512 tokens) and generation (128 tokens) tokens/s for a raw
    llama_cpp low-level loop, llama_cpp.Llama, runtime.generate, and HTTP /predict;
    generation is timed from a short prompt to the 128th token, the same way for all.
    Raw, runtime and HTTP run in paired rounds (see paired_rounds) and their ratios
    are per-round ratios, so the VM's drift cancels
  * num_return_sequences 1/2/4/8 wall time relative to 1, and n=4 against raw
    llama.cpp doing the same batched work
  * 1/2/4/8 concurrent HTTP clients: total tokens/s, p50/p95 latency
  * a second request sharing a long prefix: time to first token vs the first's
  * model load time; the server's RSS and peak RSS before the baselines load their copies
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runtime import GenerationParams, load  # noqa: E402

N_GEN = 128
N_PROMPT = 512
GEN_PROMPT = "Once upon a time"  # every generation arm starts from this prompt


def memory_bandwidth_gbs(n_bytes: int = 1 << 30, threads: int = 2, repeats: int = 5) -> float:
    """Best-of read bandwidth: `threads` threads each sum their slice of an n_bytes array.

    Reading is what generation does (every weight once per token), so this, not a copy
    (which also writes), is the roofline's bandwidth. numpy releases the GIL while summing.
    """
    a = np.ones(n_bytes // 8)
    parts = np.array_split(a, threads)
    best = float("inf")
    for _ in range(repeats):
        ths = [threading.Thread(target=np.sum, args=(p,)) for p in parts]
        t = time.perf_counter()
        [x.start() for x in ths]
        [x.join() for x in ths]
        best = min(best, time.perf_counter() - t)
    return n_bytes / best / 1e9


class RawLoop:
    """The baseline: llama_cpp's C API driven directly, no llamabox code in the loop.

    One model and one context, made once and kept for every round, so no round pays a
    load. Generation is timed like a runtime request: from evaluating the prompt to the
    n_gen-th sampled token (one prompt decode, then n_gen - 1 decodes), EOS ignored.
    """

    def __init__(self, path: str, threads: int, n_ctx: int = 2048, n_seq_max: int = 8):
        import llama_cpp as lc

        self.lc = lc
        mp = lc.llama_model_default_params()
        mp.load_mode = lc.LLAMA_LOAD_MODE_NONE  # read, not mapped: as the runtime loads it
        self.model = lc.llama_model_load_from_file(path.encode(), mp)
        cp = lc.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_threads, cp.n_threads_batch = n_ctx, 512, 512, threads, threads
        cp.n_seq_max, cp.kv_unified = n_seq_max, True
        self.ctx = lc.llama_init_from_model(self.model, cp)
        self.mem = lc.llama_get_memory(self.ctx)
        self.batch = lc.llama_batch_init(512, 0, 1)

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        b = self.batch
        for i, (tok, pos, seq, logits) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.seq_id[i][0], b.logits[i] = tok, pos, 1, seq, logits
        b.n_tokens = len(entries)
        assert self.lc.llama_decode(self.ctx, b) == 0

    def prompt_rate(self, tokens: list[int]) -> float:
        """Prompt tokens/s: one decode of the whole prompt (at most n_batch tokens)."""
        self.lc.llama_memory_clear(self.mem, True)
        t = time.perf_counter()
        self._decode([(tok, i, 0, i == len(tokens) - 1) for i, tok in enumerate(tokens)])
        return len(tokens) / (time.perf_counter() - t)

    def generate(self, prompt: list[int], n_gen: int, n_seq: int = 1, temperature: float = 0.0, seed: int = 1) -> float:
        """Tokens/s over all n_seq sequences: the prompt once, its KV copied, then one batch per step.
        Samplers match the runtime's for the same request (temp, top_k 50, dist; or greedy)."""
        lc = self.lc
        chains = []
        for i in range(n_seq):
            c = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
            if temperature == 0.0:
                lc.llama_sampler_chain_add(c, lc.llama_sampler_init_greedy())
            else:
                lc.llama_sampler_chain_add(c, lc.llama_sampler_init_temp(temperature))
                lc.llama_sampler_chain_add(c, lc.llama_sampler_init_top_k(50))
                lc.llama_sampler_chain_add(c, lc.llama_sampler_init_dist(seed + i))
            chains.append(c)
        lc.llama_memory_clear(self.mem, True)
        t = time.perf_counter()
        self._decode([(tok, i, 0, i == len(prompt) - 1) for i, tok in enumerate(prompt)])
        for s in range(1, n_seq):
            lc.llama_memory_seq_cp(self.mem, 0, s, -1, -1)
        toks = [lc.llama_sampler_sample(c, self.ctx, len(prompt) - 1) for c in chains]
        for k in range(n_gen - 1):
            self._decode([(tok, len(prompt) + k, s, True) for s, tok in enumerate(toks)])
            toks = [lc.llama_sampler_sample(c, self.ctx, s) for s, c in enumerate(chains)]
        rate = n_seq * n_gen / (time.perf_counter() - t)
        for c in chains:
            lc.llama_sampler_free(c)
        return rate

    def step_costs(self, prompt: list[int], steps: int = 8) -> dict[int, float]:
        """Seconds per decode step advancing B sequences at once (what batching can win)."""
        out = {}
        for B in (1, 2, 4, 8):
            self.lc.llama_memory_clear(self.mem, True)
            for b in range(B):
                self._decode([(tok, i, b, False) for i, tok in enumerate(prompt[:8])])
            t = time.perf_counter()
            for k in range(steps):
                self._decode([(100 + b, 8 + k, b, True) for b in range(B)])
            out[B] = (time.perf_counter() - t) / steps
        return out

    def close(self) -> None:
        self.lc.llama_batch_free(self.batch)
        self.lc.llama_free(self.ctx)
        self.lc.llama_model_free(self.model)


def paired_rounds(arms: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Each arm once per round, the order rotated every round.

    This VM's speed drifts by +-20% over minutes. Arms measured side by side in the same
    round see the same drift, so their per-round ratio is stable where separate medians
    are not (an earlier version, always raw first, reported HTTP at 0.68-0.85x raw).
    """
    names = list(arms)
    out: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        for k in names[r % len(names):] + names[: r % len(names)]:
            out[k].append(arms[k]())
    return out


def paired_ratio(a: list[float], b: list[float]) -> dict[str, float]:
    """Median (and range) over rounds of a[i] / b[i]."""
    r = [x / y for x, y in zip(a, b)]
    return {"median": statistics.median(r), "min": min(r), "max": max(r)}


def llama_class(path: str, threads: int) -> float:
    """Generation tok/s with the high-level llama_cpp.Llama.generate loop (greedy)."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=path, n_ctx=2048, n_threads=threads, verbose=False)
    toks = llm.tokenize(GEN_PROMPT.encode())
    t = time.perf_counter()
    n = 0
    for _ in llm.generate(toks, temp=0.0, top_k=1):
        n += 1
        if n >= N_GEN:
            break
    rate = n / (time.perf_counter() - t)
    llm.close()
    return rate


def vm_status_kib(key: str) -> int:
    """VmRSS / VmHWM of this process, KiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="GGUF path (default: the built-in llamabox-tiny)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--rounds", type=int, help="paired rounds of raw / runtime / HTTP generation (default 5, 3 with --quick)")
    ap.add_argument("--quick", action="store_true", help="fewer rounds and client requests")
    ap.add_argument("--gen-only", action="store_true",
                    help="only the paired generation rounds (raw / runtime / HTTP) and their ratios: the 7B check "
                         "of HTTP / raw >= 0.95 in about 10 minutes instead of 40")
    args = ap.parse_args()
    if args.model is None:
        from convert.store import Store

        args.model = str(Store().resolve("llamabox-tiny").path)
    rounds = args.rounds or (3 if args.quick else 5)
    path = args.model
    size = Path(path).stat().st_size
    out: dict = {"model": path, "model_bytes": size, "threads": args.threads, "rounds": rounds}

    t = time.perf_counter()
    rt = load(path, n_ctx=2048, n_threads=args.threads, model_id="bench", n_parallel=8, queue_size=64)
    out["load_s"] = time.perf_counter() - t
    words = ("the quick brown fox jumps over the lazy dog " * 200).split()
    prompt_512 = rt.model.tokenize(" ".join(words), add_bos=True)[:N_PROMPT]
    gen_prompt = rt.model.tokenize(GEN_PROMPT, add_bos=True)
    rt.generate("warm up", GenerationParams(max_length=4, temperature=0.0))  # first decode allocates the graph

    # HTTP end to end through waitress, as `llamabox serve` runs it.
    import requests

    from server.app import create_app, make_server
    from server.settings import Settings

    settings = Settings(request_timeout_s=600, port=0)
    server = make_server(create_app(settings, rt), settings)
    threading.Thread(target=server.run, daemon=True).start()
    url = f"http://127.0.0.1:{server.effective_port}/predict"

    def http(body):
        return requests.post(url, json=body, timeout=600).json()

    def counted(fn) -> float:
        """tokens/s of fn(), counting the tokens the scheduler generated (EOS may end early)."""
        n0, t = rt.scheduler.stats["tokens_generated"], time.perf_counter()
        fn()
        return (rt.scheduler.stats["tokens_generated"] - n0) / (time.perf_counter() - t)

    http({"prompt": "warm up", "max_length": 2})
    # The server alone: its peak so far (load included) and what it holds now.
    out["server_rss_mib"] = vm_status_kib("VmRSS") / 1024
    out["server_peak_rss_mib"] = vm_status_kib("VmHWM") / 1024
    out["memory_bandwidth_gbs"] = memory_bandwidth_gbs(threads=args.threads)
    out["roofline_tok_s"] = out["memory_bandwidth_gbs"] * 1e9 / size

    raw = RawLoop(path, args.threads)
    if args.gen_only:
        return gen_only(out, raw, rt, server, http, counted, gen_prompt, rounds, path)
    out["llama_class_gen_tok_s"] = llama_class(path, args.threads)
    raw.generate(gen_prompt, 4)  # warm-up: the first decode allocates the compute graph
    salts = itertools.count(1000)
    prompt_rounds = paired_rounds({
        "raw": lambda: raw.prompt_rate(prompt_512),
        "runtime": lambda: counted_prompt(rt, prompt_512, next(salts)),
    }, min(rounds, 3))  # 512-token prompts are slow on 7B and vary less
    out["raw_prompt_tok_s"] = statistics.median(prompt_rounds["raw"])
    out["runtime_prompt_tok_s"] = statistics.median(prompt_rounds["runtime"])

    gen = generation_rounds(out, raw, rt, http, counted, gen_prompt, rounds)
    for k in gen:
        out[f"{k}_gen_tok_s"] = statistics.median(gen[k])
    out["raw_step_s"] = raw.step_costs(prompt_512)

    # num_return_sequences: wall time of n relative to 1 (sampled, so EOS rarely ends early).
    def sampled(n):
        return GenerationParams(max_length=N_GEN, temperature=0.8, num_return_sequences=n, seed=1)

    out["n_return"] = {}
    for n in (1, 2, 4, 8):
        t = time.perf_counter()
        res = rt.generate(GEN_PROMPT, sampled(n))
        wall = time.perf_counter() - t
        out["n_return"][n] = {"wall_s": wall, "relative": wall / out["n_return"].get(1, {"wall_s": wall})["wall_s"],
                              "tokens": sum(c.generated_tokens for c in res.completions)}
    # The same n=1 / n=4 requests against raw llama.cpp doing the same work (prompt once, KV
    # copied, 4 sequences per batch), paired: how much of n=4's cost is llama.cpp's own.
    nr = paired_rounds({
        "raw_1": lambda: raw.generate(gen_prompt, N_GEN, 1, 0.8),
        "raw_4": lambda: raw.generate(gen_prompt, N_GEN, 4, 0.8),
        "runtime_1": lambda: counted(lambda: rt.generate(GEN_PROMPT, sampled(1))),
        "runtime_4": lambda: counted(lambda: rt.generate(GEN_PROMPT, sampled(4))),
    }, max(2, rounds // 2))
    # wall(n=4) / wall(n=1) = 4 * rate(1) / rate(4), per round
    out["n4_vs_n1_paired"] = {
        "raw": paired_ratio([4 * a for a in nr["raw_1"]], nr["raw_4"]),
        "runtime": paired_ratio([4 * a for a in nr["runtime_1"]], nr["runtime_4"]),
        "runtime_vs_raw_at_4": paired_ratio(nr["runtime_4"], nr["raw_4"]),
        "rounds": nr,
    }
    raw.close()

    # Concurrent clients over HTTP.
    out["clients"] = {}
    for k in (1, 2, 4, 8):
        lat: list[float] = []
        lock = threading.Lock()

        def client(i):
            for j in range(2 if args.quick else 4):
                t0 = time.perf_counter()
                http({"prompt": f"Story {i} {j}: once upon a time", "max_length": N_GEN, "temperature": 0.8, "seed": i * 10 + j})
                with lock:
                    lat.append(time.perf_counter() - t0)
        n0 = rt.scheduler.stats["tokens_generated"]
        t = time.perf_counter()
        ths = [threading.Thread(target=client, args=(i,)) for i in range(k)]
        [x.start() for x in ths]
        [x.join() for x in ths]
        wall = time.perf_counter() - t
        lat.sort()
        p95 = lat[min(len(lat) - 1, -(-95 * len(lat) // 100) - 1)]  # nearest rank
        toks = rt.scheduler.stats["tokens_generated"] - n0
        # The most k sequences can give here: k tokens per raw k-sequence decode step.
        bound = k / out["raw_step_s"][k]
        out["clients"][k] = {"total_tok_s": toks / wall, "vs_1_client": toks / wall / out["clients"].get(1, {}).get("total_tok_s", toks / wall),
                             "of_raw_step_bound": toks / wall / bound, "p50_s": statistics.median(lat), "p95_s": p95}

    # Shared prefix: second request's time to first token relative to the first's.
    one = GenerationParams(max_length=1, temperature=0.0)
    prefix = " ".join(words[:450])
    t = time.perf_counter()
    rt.generate(prefix + " first question", one)
    first = time.perf_counter() - t
    t = time.perf_counter()
    rt.generate(prefix + " second question", one)
    second = time.perf_counter() - t
    out["prefix_ttft"] = {"first_s": first, "second_s": second, "relative": second / first, **rt.scheduler.stats}

    out["achieved_of_roofline"] = out["raw_gen_tok_s"] / out["roofline_tok_s"]
    out["bench_peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    server.close()
    rt.close()

    n4 = out["n4_vs_n1_paired"]
    rows = [
        ("memory bandwidth", f"{out['memory_bandwidth_gbs']:.1f} GB/s"),
        ("roofline (bandwidth / model bytes)", f"{out['roofline_tok_s']:.1f} tok/s"),
        ("raw llama_cpp: prompt / generation", f"{out['raw_prompt_tok_s']:.1f} / {out['raw_gen_tok_s']:.2f} tok/s"),
        ("llama_cpp.Llama generation", f"{out['llama_class_gen_tok_s']:.2f} tok/s"),
        ("runtime: prompt / generation", f"{out['runtime_prompt_tok_s']:.1f} / {out['runtime_gen_tok_s']:.2f} tok/s"),
        ("HTTP /predict generation", f"{out['http_gen_tok_s']:.2f} tok/s"),
        (f"runtime / raw, paired over {rounds} rounds", fmt_ratio(out["runtime_vs_raw"])),
        (f"HTTP / raw, paired over {rounds} rounds", fmt_ratio(out["http_vs_raw"])),
        ("generation / roofline", f"{out['achieved_of_roofline']:.0%}"),
    ]
    rows += [(f"num_return_sequences={n}", f"{v['wall_s']:.2f}s = {v['relative']:.2f} x n=1") for n, v in out["n_return"].items()]
    rows += [("n=4 / n=1 wall, paired: raw llama_cpp", fmt_ratio(n4["raw"])),
             ("n=4 / n=1 wall, paired: runtime", fmt_ratio(n4["runtime"])),
             ("runtime / raw tok/s at n=4, paired", fmt_ratio(n4["runtime_vs_raw_at_4"]))]
    rows += [(f"raw decode step, {b} sequences", f"{v * 1000:.1f} ms = {v / out['raw_step_s'][1]:.2f} x 1 sequence") for b, v in out["raw_step_s"].items()]
    rows += [(f"{k} concurrent clients", f"{v['total_tok_s']:.1f} tok/s ({v['vs_1_client']:.2f} x 1; {v['of_raw_step_bound']:.0%} of {k} / raw step), "
              f"p50 {v['p50_s']:.2f}s, p95 {v['p95_s']:.2f}s")
             for k, v in out["clients"].items()]
    rows += [("shared 450-word prefix: TTFT 2nd / 1st", f"{out['prefix_ttft']['relative']:.2f}"),
             ("model load time", f"{out['load_s']:.2f}s"),
             ("server RSS / peak (before the baselines load)", f"{out['server_rss_mib']:.0f} / {out['server_peak_rss_mib']:.0f} MiB"),
             ("bench process peak RSS (all baselines)", f"{out['bench_peak_rss_mib']:.0f} MiB")]
    w = max(len(a) for a, _ in rows)
    print(f"model {path} ({size / 2**20:.1f} MiB), {args.threads} threads")
    for a, b in rows:
        print(f"  {a:<{w}}  {b}")
    dest = Path(__file__).parent / "out"
    dest.mkdir(exist_ok=True)
    (dest / f"{Path(path).stem}.json").write_text(json.dumps(out, indent=2))
    return 0


def generation_rounds(out: dict, raw: "RawLoop", rt, http, counted, gen_prompt: list[int], rounds: int) -> dict:
    """Same prompt, same N_GEN greedy tokens, raw / runtime / HTTP in paired rounds; the rounds and
    the paired ratios go into `out`."""
    greedy = GenerationParams(max_length=N_GEN, temperature=0.0)
    gen = paired_rounds({
        "raw": lambda: raw.generate(gen_prompt, N_GEN),
        "runtime": lambda: counted(lambda: rt.generate(GEN_PROMPT, greedy)),
        "http": lambda: counted(lambda: http({"prompt": GEN_PROMPT, "max_length": N_GEN, "temperature": 0})),
    }, rounds)
    out["gen_rounds"] = gen
    out["runtime_vs_raw"] = paired_ratio(gen["runtime"], gen["raw"])
    out["http_vs_raw"] = paired_ratio(gen["http"], gen["raw"])
    return gen


def gen_only(out: dict, raw: "RawLoop", rt, server, http, counted, gen_prompt: list[int], rounds: int, path: str) -> int:
    """--gen-only: the generation rounds of main(), printed and written to <model>-gen.json."""
    raw.generate(gen_prompt, 4)  # warm-up: the first decode allocates the compute graph
    gen = generation_rounds(out, raw, rt, http, counted, gen_prompt, rounds)
    raw.close()
    server.close()
    rt.close()
    print(f"model {path}, {N_GEN} greedy tokens, {rounds} paired rounds; load {out['load_s']:.1f}s")
    for k in gen:
        print(f"  {k:8} {statistics.median(gen[k]):.2f} tok/s  {[round(x, 2) for x in gen[k]]}")
    print(f"  runtime / raw  {fmt_ratio(out['runtime_vs_raw'])}")
    print(f"  HTTP / raw     {fmt_ratio(out['http_vs_raw'])}   target >= 0.95")
    dest = Path(__file__).parent / "out"
    dest.mkdir(exist_ok=True)
    (dest / f"{Path(path).stem}-gen.json").write_text(json.dumps(out, indent=2))
    return 0


def counted_prompt(rt, tokens: list[int], salt: int) -> float:
    """Prompt tokens/s through the runtime, on the raw arm's own tokens.

    Token 1 is `salt` (a new one each call) so the prefix cache can reuse only BOS; the
    rate counts the tokens the scheduler really evaluated.
    """
    from runtime.scheduler import Job

    toks = [tokens[0], salt] + tokens[2:]
    n0 = rt.scheduler.stats["prompt_tokens_evaluated"]
    t = time.perf_counter()
    rt.scheduler.submit(Job(toks, GenerationParams(max_length=1, temperature=0.0), seed=1)).future.result()
    return (rt.scheduler.stats["prompt_tokens_evaluated"] - n0) / (time.perf_counter() - t)


def fmt_ratio(r: dict[str, float]) -> str:
    return f"{r['median']:.3f} (range {r['min']:.3f}-{r['max']:.3f})"


if __name__ == "__main__":
    sys.exit(main())
