"""llamabox benchmarks: every figure on the same GGUF, same threads, same run.

    make bench-quick            # the built-in demo model, a few seconds per figure
    make bench ARGS="--model PATH.gguf"

Prints a table and writes bench/out/<model>.json. Figures:
  * memory read bandwidth (numpy, one thread per core), the roofline (bandwidth / model bytes per token)
  * prompt processing (512 tokens) and generation (128 tokens) tokens/s for a raw
    llama_cpp low-level loop, llama_cpp.Llama, runtime.generate, and HTTP /predict;
    generation is timed from a short prompt to the 128th token, the same way for all
  * num_return_sequences 1/2/4/8 wall time relative to 1
  * 1/2/4/8 concurrent HTTP clients: total tokens/s, p50/p95 latency
  * a second request sharing a long prefix: time to first token vs the first's
  * model load time and peak RSS
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runtime import GenerationParams, load  # noqa: E402

N_GEN = 128
N_PROMPT = 512
RAW_STEP_S: dict[int, float] = {}  # filled by raw_lowlevel: seconds per decode step of B sequences


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


def raw_lowlevel(path: str, threads: int, prompt_tokens: list[int], gen_prompt: list[int]) -> tuple[float, float]:
    """(prompt tok/s, generation tok/s) with llama_cpp's C API directly: one sequence, greedy, EOS ignored.

    Generation is timed like the runtime's requests: from evaluating `gen_prompt` to the
    N_GEN-th sampled token (one prompt decode, then N_GEN - 1 single-token decodes).
    """
    import llama_cpp as lc

    mp = lc.llama_model_default_params()
    model = lc.llama_model_load_from_file(path.encode(), mp)
    cp = lc.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_threads, cp.n_threads_batch = 2048, 512, 512, threads, threads
    cp.n_seq_max, cp.kv_unified = 8, True
    ctx = lc.llama_init_from_model(model, cp)
    batch = lc.llama_batch_init(512, 0, 1)
    smpl = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
    lc.llama_sampler_chain_add(smpl, lc.llama_sampler_init_greedy())

    def decode(toks, pos0):
        for i, t in enumerate(toks):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.seq_id[i][0] = t, pos0 + i, 1, 0
            batch.logits[i] = i == len(toks) - 1
        batch.n_tokens = len(toks)
        assert lc.llama_decode(ctx, batch) == 0

    decode(prompt_tokens[:64], 0)  # warm-up: the first decode allocates the compute graph
    lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
    t = time.perf_counter()
    decode(prompt_tokens, 0)
    pp = len(prompt_tokens) / (time.perf_counter() - t)
    lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
    tg = 0.0
    for _ in range(1):
        lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
        t = time.perf_counter()
        decode(gen_prompt, 0)
        pos = len(gen_prompt)
        for i in range(N_GEN):
            tok = lc.llama_sampler_sample(smpl, ctx, -1)
            if i < N_GEN - 1:
                decode([tok], pos)
                pos += 1
        tg = max(tg, N_GEN / (time.perf_counter() - t))

    # Cost of one decode step advancing B sequences at once (what batching can win).
    step_s = {}
    for B in (1, 2, 4, 8):
        lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
        for b in range(B):
            for i, tkn in enumerate(prompt_tokens[:8]):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.seq_id[i][0], batch.logits[i] = tkn, i, 1, b, False
            batch.n_tokens = 8
            assert lc.llama_decode(ctx, batch) == 0
        steps = 8
        t = time.perf_counter()
        for k in range(steps):
            for b in range(B):
                batch.token[b], batch.pos[b], batch.n_seq_id[b], batch.seq_id[b][0], batch.logits[b] = 100 + b, 8 + k, 1, b, True
            batch.n_tokens = B
            assert lc.llama_decode(ctx, batch) == 0
        step_s[B] = (time.perf_counter() - t) / steps
    RAW_STEP_S.update(step_s)
    lc.llama_sampler_free(smpl)
    lc.llama_batch_free(batch)
    lc.llama_free(ctx)
    lc.llama_model_free(model)
    return pp, tg


def llama_class(path: str, threads: int) -> float:
    """Generation tok/s with the high-level llama_cpp.Llama.generate loop (greedy)."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=path, n_ctx=2048, n_threads=threads, verbose=False)
    toks = llm.tokenize(b"Once upon a time")
    t = time.perf_counter()
    n = 0
    for _ in llm.generate(toks, temp=0.0, top_k=1):
        n += 1
        if n >= N_GEN:
            break
    rate = n / (time.perf_counter() - t)
    llm.close()
    return rate


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="GGUF path (default: the built-in llamabox-tiny)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--quick", action="store_true", help="one round instead of three, fewer client requests")
    args = ap.parse_args()
    if args.model is None:
        from convert.store import Store

        args.model = str(Store().resolve("llamabox-tiny").path)
    path = args.model
    size = Path(path).stat().st_size
    out: dict = {"model": path, "model_bytes": size, "threads": args.threads}

    out["memory_bandwidth_gbs"] = memory_bandwidth_gbs(threads=args.threads)
    out["roofline_tok_s"] = out["memory_bandwidth_gbs"] * 1e9 / size

    t = time.perf_counter()
    rt = load(path, n_ctx=2048, n_threads=args.threads, model_id="bench", n_parallel=8, queue_size=64)
    out["load_s"] = time.perf_counter() - t
    words = ("the quick brown fox jumps over the lazy dog " * 200).split()
    prompt_512 = rt.model.tokenize(" ".join(words), add_bos=True)[:N_PROMPT]

    gen_prompt = rt.model.tokenize("Once upon a time", add_bos=True)
    rt.generate("warm up", GenerationParams(max_length=4, temperature=0.0))  # first decode allocates the graph
    out["llama_class_gen_tok_s"] = llama_class(path, args.threads)

    prompt_text = " ".join(words[:400])
    one = GenerationParams(max_length=1, temperature=0.0)
    t = time.perf_counter()
    r = rt.generate(prompt_text + " unique-a", one)
    out["runtime_prompt_tok_s"] = r.completions[0].prompt_tokens / (time.perf_counter() - t)

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

    # This machine's speed drifts by +-20% over minutes, so raw, runtime and HTTP are measured
    # in turns, three rounds, and each reports its median: same prompt, same 128 tokens.
    greedy = GenerationParams(max_length=N_GEN, temperature=0.0)
    raw_pp, raw_tg, rt_tg, http_tg = [], [], [], []
    for _ in range(3):
        pp, tg = raw_lowlevel(path, args.threads, prompt_512, gen_prompt)
        raw_pp.append(pp)
        raw_tg.append(tg)
        rt_tg.append(counted(lambda: rt.generate("Once upon a time", greedy)))
        http_tg.append(counted(lambda: http({"prompt": "Once upon a time", "max_length": N_GEN, "temperature": 0})))
    out["raw_prompt_tok_s"], out["raw_gen_tok_s"] = statistics.median(raw_pp), statistics.median(raw_tg)
    out["runtime_gen_tok_s"], out["http_gen_tok_s"] = statistics.median(rt_tg), statistics.median(http_tg)
    out["gen_rounds"] = {"raw": raw_tg, "runtime": rt_tg, "http": http_tg}
    out["raw_step_s"] = dict(RAW_STEP_S)
    out["http_vs_raw"] = out["http_gen_tok_s"] / out["raw_gen_tok_s"]

    # num_return_sequences scaling (sampled, so all run the full length... unless EOS).
    base = None
    out["n_return"] = {}
    for n in (1, 2, 4, 8):
        p = GenerationParams(max_length=N_GEN, temperature=0.8, num_return_sequences=n, seed=1)
        t = time.perf_counter()
        res = rt.generate("Once upon a time", p)
        wall = time.perf_counter() - t
        base = base or wall
        out["n_return"][n] = {"wall_s": wall, "relative": wall / base, "tokens": sum(c.generated_tokens for c in res.completions)}

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
        out["clients"][k] = {"total_tok_s": toks / wall, "vs_1_client": toks / wall / out["clients"].get(1, {}).get("total_tok_s", toks / wall),
                             "p50_s": statistics.median(lat), "p95_s": p95}

    # Shared prefix: second request's time to first token relative to the first's.
    prefix = " ".join(words[:450])
    t = time.perf_counter()
    rt.generate(prefix + " first question", one)
    first = time.perf_counter() - t
    t = time.perf_counter()
    rt.generate(prefix + " second question", one)
    second = time.perf_counter() - t
    out["prefix_ttft"] = {"first_s": first, "second_s": second, "relative": second / first, **rt.scheduler.stats}

    out["achieved_of_roofline"] = out["raw_gen_tok_s"] / out["roofline_tok_s"]
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    server.close()
    rt.close()

    rows = [
        ("memory bandwidth", f"{out['memory_bandwidth_gbs']:.1f} GB/s"),
        ("roofline (bandwidth / model bytes)", f"{out['roofline_tok_s']:.0f} tok/s"),
        ("raw llama_cpp: prompt / generation", f"{out['raw_prompt_tok_s']:.1f} / {out['raw_gen_tok_s']:.2f} tok/s"),
        ("llama_cpp.Llama generation", f"{out['llama_class_gen_tok_s']:.2f} tok/s"),
        ("runtime: prompt / generation", f"{out['runtime_prompt_tok_s']:.1f} / {out['runtime_gen_tok_s']:.2f} tok/s"),
        ("HTTP /predict generation", f"{out['http_gen_tok_s']:.2f} tok/s ({out['http_vs_raw']:.2f} x raw)"),
        ("generation / roofline", f"{out['achieved_of_roofline']:.0%}"),
    ]
    rows += [(f"num_return_sequences={n}", f"{v['wall_s']:.2f}s = {v['relative']:.2f} x n=1") for n, v in out["n_return"].items()]
    rows += [(f"raw decode step, {b} sequences", f"{v * 1000:.1f} ms = {v / out['raw_step_s'][1]:.2f} x 1 sequence") for b, v in out["raw_step_s"].items()]
    rows += [(f"{k} concurrent clients", f"{v['total_tok_s']:.1f} tok/s ({v['vs_1_client']:.2f} x 1), p50 {v['p50_s']:.2f}s, p95 {v['p95_s']:.2f}s")
             for k, v in out["clients"].items()]
    rows += [("shared 450-word prefix: TTFT 2nd / 1st", f"{out['prefix_ttft']['relative']:.2f}"),
             ("load time / peak RSS", f"{out['load_s']:.2f}s / {out['peak_rss_mib']:.0f} MiB")]
    w = max(len(a) for a, _ in rows)
    print(f"model {path} ({size / 2**20:.1f} MiB), {args.threads} threads")
    for a, b in rows:
        print(f"  {a:<{w}}  {b}")
    dest = Path(__file__).parent / "out"
    dest.mkdir(exist_ok=True)
    (dest / f"{Path(path).stem}.json").write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
