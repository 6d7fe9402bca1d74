"""Streaming against non-streaming over HTTP on the same model (issue 10): time to first token and tokens/s.

    python bench/stream.py --model FILE.gguf [--rounds 5] [--max-tokens 128]

One server (our HTTP stack on loopback), one client at a time, POST /v1/completions
with the same greedy request, arms alternating with the order rotated every round.
Non-streaming's "first token" is its whole answer: the client sees nothing before.
tokens/s counts the completion tokens the server reports (usage) over the wall time.
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

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PROMPT = "The history of the river begins in the mountains, where"


def one(url: str, model: str, max_tokens: int, stream: bool) -> tuple[float, float, int]:
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    t0 = time.perf_counter()
    r = requests.post(url + "/v1/completions", json=body, stream=stream, timeout=600)
    r.raise_for_status()
    if not stream:
        n = r.json()["usage"]["completion_tokens"]
        t = time.perf_counter() - t0
        return t, t, n
    first, n = None, 0
    for line in r.iter_lines():
        if not line.startswith(b"data: {"):
            continue
        chunk = json.loads(line[6:])
        if chunk["choices"] and chunk["choices"][0]["text"] and first is None:
            first = time.perf_counter() - t0
        if chunk.get("usage"):
            n = chunk["usage"]["completion_tokens"]
    return first or float("nan"), time.perf_counter() - t0, n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()

    from runtime import load
    from server.app import create_app, make_server
    from server.settings import Settings

    settings = Settings(port=0, threads=args.threads)
    rt = load(args.model, n_ctx=2048, n_threads=args.threads, model_id="bench", chat=False)
    server = make_server(create_app(settings, rt), settings)
    threading.Thread(target=server.run, daemon=True).start()
    url = f"http://127.0.0.1:{server.effective_port}"
    try:
        one(url, "bench", 8, False)  # warm-up
        rows: dict[str, list[tuple[float, float, int]]] = {"plain": [], "stream": []}
        for r in range(args.rounds):
            for stream in ((False, True) if r % 2 == 0 else (True, False)):
                ttft, total, n = one(url, "bench", args.max_tokens, stream)
                rows["stream" if stream else "plain"].append((ttft, total, n))
                print(f"round {r + 1} {'stream' if stream else 'plain':6} first token {ttft * 1000:8.1f} ms  "
                      f"{n} tokens in {total:.2f} s = {n / total:6.1f} tok/s", flush=True)
        summary = {}
        for arm, xs in rows.items():
            summary[arm] = {"ttft_ms": statistics.median(x[0] for x in xs) * 1000,
                            "tok_s": statistics.median(x[2] / x[1] for x in xs)}
        ratio = statistics.median(b[2] / b[1] / (a[2] / a[1]) for a, b in zip(rows["plain"], rows["stream"]))
        print(f"\nmedians over {args.rounds} rounds, {Path(args.model).name}, {args.threads} threads:")
        for arm, s in summary.items():
            print(f"  {arm:6} first token {s['ttft_ms']:8.1f} ms   {s['tok_s']:6.1f} tok/s")
        print(f"  stream / plain tokens/s, per round: median {ratio:.3f}")
        out = ROOT / "bench" / "out"
        out.mkdir(parents=True, exist_ok=True)
        (out / "stream.json").write_text(json.dumps({"model": args.model, "summary": summary, "ratio": ratio, "rounds": rows}, indent=2))
    finally:
        server.close()
        rt.close()


if __name__ == "__main__":
    main()
