"""Resident memory of llamabox and llama-server by KV cache type, after load and under load.

    python bench/kv_memory.py --model bench/scratch/synth1b.q4_k_m.gguf --ctx 4096 --types f16,q8_0,q4_0

For each type, each server (one at a time, nothing else running in it): start it, read VmRSS
once /health is 200 and one short request has run ("after load"), then fill the context: 8
clients at once, each a prompt of ctx/8 - 80 tokens and 64 generated tokens, twice; read VmHWM
("under load"; llamabox's includes the host copies of its parked prompts). Memory does not depend on timing, so one run each is enough. Writes
bench/out/kv-memory-<model>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.llama_server_build import build  # noqa: E402
from bench.peers import ROOT, llama_server_peer, llamabox_peer, long_prompt_words, text_of  # noqa: E402


def measure(peer, ctx: int) -> dict:
    peer.start()
    try:
        s = requests.Session()
        peer.complete(s, "Hello", 2)
        after_load = peer.rss_mib()
        words = long_prompt_words(peer, ctx // 8 - 80)

        def client(i: int) -> None:
            cs = requests.Session()
            for j in range(2):
                peer.complete(cs, text_of(words, f"Client {i} turn {j}:"), 64)

        ths = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        [t.start() for t in ths]
        [t.join() for t in ths]
        return {"rss_after_load_mib": after_load, "peak_rss_mib": peer.peak_rss_mib(), "rss_after_mib": peer.rss_mib()}
    finally:
        peer.stop()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--types", default="f16,q8_0,q4_0")
    args = ap.parse_args()
    model = str(Path(args.model).resolve())
    binary = build()
    out: dict = {"model": model, "ctx": args.ctx, "threads": args.threads, "types": {}}
    for kv in args.types.split(","):
        peers = [llamabox_peer(model, args.threads, args.ctx, 8, kv), llama_server_peer(binary, model, args.threads, args.ctx, 8, kv)]
        out["types"][kv] = {p.name: measure(p, args.ctx) for p in peers}
        for name, m in out["types"][kv].items():
            print(f"  {kv:6} {name:13} after load {m['rss_after_load_mib']:7.0f} MiB   peak under load {m['peak_rss_mib']:7.0f} MiB",
                  flush=True)
    dest = ROOT / "bench" / "out"
    dest.mkdir(exist_ok=True)
    (dest / f"kv-memory-{Path(model).stem}.json").write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
