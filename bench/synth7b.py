"""A checkpoint with Llama 2 7B's exact shapes and random weights, converted by our converter.

    python bench/synth7b.py --dir /scratch/llama7b-synth      # ~31 GB of disk at peak
    python bench/synth7b.py --shape tinyllama-1.1b            # TinyLlama-1.1B's shapes: ~5 GB, minutes

Writes an HF folder (fp16 safetensors in 2 shards + index, a small SentencePiece
tokenizer padded to 32000 ids), then, each in a child process so its peak RSS
is its own: HF -> F16 GGUF with convert.hf_to_gguf, and F16 -> Q4_K_M with
llama.cpp's quantizer. Prints time and peak RSS of both; writes
bench/out/<name>.json (synth7b, synth1b). The speed of a model does not depend on its weights'
values, so this stands in for Llama 2 7B in the speed benchmarks.
"""
from __future__ import annotations

import argparse
import io
import json
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

# Llama-2-7b-hf's config.json (the values that shape tensors and metadata).
LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000, "hidden_size": 4096,
    "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "bos_token_id": 1,
    "eos_token_id": 2, "tie_word_embeddings": False, "torch_dtype": "float16", "hidden_act": "silu",
}

# TinyLlama-1.1B's config.json: Llama 2's architecture and vocabulary, 22 layers, grouped-query
# attention (4 KV heads of 64), 2048 training context.
TINYLLAMA_1B = {**LLAMA2_7B, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
                "num_attention_heads": 32, "num_key_value_heads": 4, "max_position_embeddings": 2048}

# --shape -> (file name stem, config, free disk needed at peak in bytes: checkpoint + F16 GGUF + Q4_K_M)
SHAPES = {"llama2-7b": ("synth7b", LLAMA2_7B, 34 * 10**9), "tinyllama-1.1b": ("synth1b", TINYLLAMA_1B, 6 * 10**9)}


def tensor_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    e, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    kv = c["num_key_value_heads"] * (e // c["num_attention_heads"])
    shapes = {"model.embed_tokens.weight": (v, e)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (e, e), p + "self_attn.k_proj.weight": (kv, e),
                       p + "self_attn.v_proj.weight": (kv, e), p + "self_attn.o_proj.weight": (e, e),
                       p + "mlp.gate_proj.weight": (f, e), p + "mlp.up_proj.weight": (f, e),
                       p + "mlp.down_proj.weight": (e, f), p + "input_layernorm.weight": (e,),
                       p + "post_attention_layernorm.weight": (e,)})
    shapes.update({"model.norm.weight": (e,), "lm_head.weight": (v, e)})
    return shapes


def write_shard(path: Path, shapes: dict[str, tuple[int, ...]], rng: np.random.Generator) -> None:
    header, off = {}, 0
    for name, shape in shapes.items():
        n = int(np.prod(shape)) * 2
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        for name, shape in shapes.items():
            if len(shape) == 1:
                a = np.ones(shape, dtype=np.float16)
            else:
                a = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)
            a.tofile(f)


def make_checkpoint(folder: Path, config: dict) -> None:
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, "add_eos_token": False}))
    text = (Path(np.__file__).parent / "__init__.py").read_text().splitlines()  # any English-ish text will do
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text * 3), model_writer=buf, vocab_size=1000, model_type="bpe",
                                   byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    (folder / "tokenizer.model").write_bytes(buf.getvalue())
    shapes = tensor_shapes(config)
    names = list(shapes)
    half = len(names) // 2
    rng = np.random.default_rng(0)
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        write_shard(folder / fname, {n: shapes[n] for n in part}, rng)
        weight_map.update({n: fname for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def timed_child(code: str) -> tuple[float, float]:
    """Run python code in a child; (seconds, the child's own peak RSS in MiB).

    VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across fork and exec, so a
    child of this (large) process would report our peak instead of its own.
    """
    code += ("\nprint('PEAK_RSS_KIB', next(int(l.split()[1]) for l in open('/proc/self/status') "
             "if l.startswith('VmHWM:')))")
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    dt = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"child failed:\n{proc.stderr[-2000:]}")
    kib = next(int(ln.split()[1]) for ln in proc.stdout.splitlines() if ln.startswith("PEAK_RSS_KIB"))
    return dt, kib / 1024


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path, default=ROOT / "bench" / "scratch")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama2-7b")
    ap.add_argument("--if-missing", action="store_true", help="do nothing if the Q4_K_M file exists (make bench-quick)")
    ap.add_argument("--skip-quantize", action="store_true", help="keep an existing Q4_K_M file; measure conversion only")
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    name, config, disk = SHAPES[args.shape]
    hf, f16, q4 = args.dir / ("hf" if name == "synth7b" else f"hf-{name}"), args.dir / f"{name}.f16.gguf", args.dir / f"{name}.q4_k_m.gguf"
    if q4.is_file() and args.if_missing:
        print(q4)
        return 0
    free = shutil.disk_usage(args.dir).free
    if free < disk:
        print(f"need ~{disk / 1e9:.0f} GB free in {args.dir}, have {free / 1e9:.1f} GB", file=sys.stderr)
        return 1
    out: dict = {"shape": args.shape}
    if not (hf / "model.safetensors.index.json").is_file():
        t = time.perf_counter()
        make_checkpoint(hf, config)
        out["make_checkpoint_s"] = time.perf_counter() - t
    out["checkpoint_bytes"] = sum(p.stat().st_size for p in hf.glob("*.safetensors"))
    out["convert_f16_s"], out["convert_f16_peak_rss_mib"] = timed_child(
        f"from pathlib import Path; from convert.hf_to_gguf import export_gguf; export_gguf(Path({str(hf)!r}), Path({str(f16)!r}), 'f16', name={name!r})")
    if args.skip_quantize and q4.is_file():
        f16.unlink()
        return _report(out, q4, name)
    out["quantize_q4_k_m_s"], out["quantize_q4_k_m_peak_rss_mib"] = timed_child(
        f"import os; from pathlib import Path; from runtime.quantize import quantize; "
        f"quantize(Path({str(f16)!r}), Path({str(q4)!r}), 'q4_k_m', {args.threads} or os.cpu_count())")
    out["f16_bytes"], out["q4_k_m_bytes"] = f16.stat().st_size, q4.stat().st_size
    f16.unlink()
    return _report(out, q4, name)


def _report(out: dict, q4: Path, name: str) -> int:
    for k, v in out.items():
        print(f"  {k:32} {v:,.1f}" if isinstance(v, float) else f"  {k:32} {v:,}" if isinstance(v, int) else f"  {k:32} {v}")
    dest = ROOT / "bench" / "out"
    dest.mkdir(exist_ok=True)
    (dest / f"{name}.json").write_text(json.dumps(out, indent=2))
    print(q4)
    return 0


if __name__ == "__main__":
    sys.exit(main())
