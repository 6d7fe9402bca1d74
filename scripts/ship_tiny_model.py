"""Convert the trained tiny Llama with llamabox's own converter and install it as built-in `llamabox-tiny`.

    python scripts/ship_tiny_model.py /work/tiny_hf [--quant q8_0]

Converts to F16 and every --report type (to report sizes), then copies the chosen
type into convert/builtin/llamabox-tiny/ with vocab.txt and a manifest that records
the sha256 (checked on every load), the source and the training record.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from convert.pipeline import convert  # noqa: E402
from convert.store import BUILTIN_DIR, CONVERTER_VERSION, sha256_file, utc_now, write_json_atomic  # noqa: E402

MODEL_ID = "llamabox-tiny"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("src", type=Path, help="the HF folder written by train_tiny_llama.py")
    ap.add_argument("--quant", default="q8_0", help="the type to ship")
    ap.add_argument("--report", default="f16,q8_0,q6_k,q4_k_m", help="types to convert and report sizes for")
    args = ap.parse_args()
    quants = list(dict.fromkeys(args.report.split(",") + [args.quant]))
    with tempfile.TemporaryDirectory() as tmp:
        reports = convert(args.src, quants, out_dir=Path(tmp), model_id=MODEL_ID)
        print(f"{'quant':8} {'bytes':>10} {'bits/weight':>12}")
        for r in reports:
            print(f"{r.quant:8} {r.size_bytes:10,} {r.bits_per_weight:12.2f}")
        chosen = next(r for r in reports if r.quant == args.quant)
        dest = BUILTIN_DIR / MODEL_ID
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        name = f"{MODEL_ID}.{args.quant}.gguf"
        shutil.copyfile(chosen.path, dest / name)
    shutil.copyfile(args.src / "vocab.txt", dest / "vocab.txt")
    training = json.loads((args.src / "training.json").read_text())
    manifest = {
        "model_id": MODEL_ID,
        # A base model (fortune files, no chat tuning), though its GGUF carries Llama 2's chat template.
        "chat": False,
        "source": {"trained_by": "scripts/train_tiny_llama.py", "corpus": training.get("corpus", {}).get("sources")},
        "converter_version": CONVERTER_VERSION,
        "created": utc_now(),
        "training": {k: training[k] for k in ("tokenizer", "model", "training", "seeds", "results", "environment") if k in training},
        "sizes": {r.quant: {"bytes": r.size_bytes, "bits_per_weight": round(r.bits_per_weight, 3)} for r in reports},
        "files": {name: {"sha256": sha256_file(dest / name), "size": (dest / name).stat().st_size,
                         "quant": args.quant, "created": utc_now()}},
    }
    write_json_atomic(dest / "manifest.json", manifest)
    print(f"installed {dest / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
