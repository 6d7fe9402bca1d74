#!/usr/bin/env python3
"""Record llama.cpp's reference converter on the tiny Llama 2 family checkpoints: tests/golden/*.json.

tests/test_convert_golden.py converts the same checkpoints (tests/llama_family.py LAYOUTS) with
our converter and diffs every key/value and tensor against these files. Rerun this only when a
layout changes or the reference converter is upgraded, and review the JSON diff.

The reference converter is convert_hf_to_gguf.py from the llama.cpp inside the llama-cpp-python
sdist that llamabox pins. It imports torch and transformers, so it runs in its own venv, outside
the repo (a CPU torch from the local index; plain `torch` would download CUDA):

    python3 -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install torch==2.13.0 transformers==4.57.6 sentencepiece safetensors numpy protobuf
    /tmp/refvenv/bin/pip install /tmp/sdist/llama_cpp_python-0.3.36/vendor/llama.cpp/gguf-py
    .venv/bin/python scripts/make_golden.py --ref-python /tmp/refvenv/bin/python \\
        --llama-cpp /tmp/sdist/llama_cpp_python-0.3.36/vendor/llama.cpp

(The sdist: `pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36`, then untar it.)
The checkpoints' SentencePiece model, tests/golden/tokenizer.model, is trained once and
committed; --retrain-tokenizer makes a new one (then every golden file changes).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from gguf_golden import dump, kv_delta, to_json  # noqa: E402
from llama_family import LAYOUTS, N_PIECES, TOKENIZER_MODEL, build  # noqa: E402

VERSIONS = ("import importlib.metadata as m, json; "
            "print(json.dumps({p: m.version(p) for p in ('torch', 'transformers', 'gguf', 'sentencepiece', 'numpy')}))")


def checkpoint_hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def run_reference(ref_python: str, llama_cpp: Path, folder: Path, out: Path, outtype: str) -> None:
    cmd = [ref_python, str(llama_cpp / "convert_hf_to_gguf.py"), str(folder), "--outfile", str(out), "--outtype", outtype]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"reference converter failed on {folder.name} ({outtype}):\n{proc.stderr[-4000:]}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ref-python", required=True, help="python of a venv with torch, transformers and the sdist's gguf-py")
    ap.add_argument("--llama-cpp", required=True, type=Path, help="the llama.cpp folder holding convert_hf_to_gguf.py")
    ap.add_argument("--out", type=Path, default=ROOT / "tests" / "golden")
    ap.add_argument("--only", help="comma-separated layout names (default: all)")
    ap.add_argument("--retrain-tokenizer", action="store_true", help="train tests/golden/tokenizer.model anew")
    args = ap.parse_args()

    if args.retrain_tokenizer or not TOKENIZER_MODEL.is_file():
        from tinyllama import train_tokenizer

        TOKENIZER_MODEL.parent.mkdir(parents=True, exist_ok=True)
        train_tokenizer(TOKENIZER_MODEL.parent, N_PIECES)
        print(f"trained {TOKENIZER_MODEL} ({N_PIECES} pieces)")
    versions = json.loads(subprocess.run([args.ref_python, "-c", VERSIONS], capture_output=True, text=True, check=True).stdout)
    reference = {"converter": "convert_hf_to_gguf.py of the llama.cpp in the llama-cpp-python 0.3.36 sdist",
                 "gguf-py": "the sdist's own (gguf-py/), " + versions.pop("gguf"), **versions}

    names = args.only.split(",") if args.only else list(LAYOUTS)
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            layout = LAYOUTS[name]
            folder, _ = build(layout, Path(tmp))
            record = {"layout": name, "folder": layout.folder, "reference": reference,
                      "checkpoint": checkpoint_hashes(folder), "outputs": {}}
            base = None
            for outtype in layout.outtypes:
                gguf_path = Path(tmp) / f"{name}.{outtype}.gguf"
                run_reference(args.ref_python, args.llama_cpp, folder, gguf_path, outtype)
                d = dump(gguf_path)
                if base is None:  # the first outtype's keys in full, the others' as changes to it
                    base = d["kv"]
                    record["outputs"][outtype] = d
                else:
                    record["outputs"][outtype] = {"kv_delta": kv_delta(base, d["kv"]), "tensors": d["tensors"]}
                gguf_path.unlink()
            path = args.out / f"{name}.json"
            path.write_text(to_json(record) + "\n", encoding="utf-8")
            shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
            print(f"{shown}: {', '.join(layout.outtypes)}; {path.stat().st_size / 1024:.1f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
