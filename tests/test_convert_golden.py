"""Our GGUF equals llama.cpp's reference converter's, key by key and tensor by tensor.

tests/golden/<layout>.json holds the reference converter's output (convert_hf_to_gguf.py with
transformers 4.57.6, from the llama-cpp-python 0.3.36 sdist; scripts/make_golden.py) on the
tiny checkpoints of tests/llama_family.py: plain Llama 2, a chat fine-tune with an added <pad>,
Code Llama, linear rope scaling. Here we build the same checkpoints, convert them to F16, F32
(and BF16 for BF16 checkpoints), and diff. Every difference must be listed in DELIBERATE with
its reason, and every listed difference must still occur.
"""
from __future__ import annotations

import hashlib
import json

import pytest

from gguf_golden import apply_delta, diff_kv, diff_tensors, dump
from llama_family import GOLDEN_DIR, LAYOUTS, build

from convert.hf_to_gguf import export_gguf

# (layout, key): why our value differs from the reference's.
DELIBERATE = {
    ("linear", "tokenizer.ggml.unknown_token_id"):
        "no tokenizer.json names <unk>, so the reference writes no id and llama.cpp assumes 0 for a SentencePiece "
        "vocabulary; we take the id tokenizer.model itself defines (0 here, and right where a model's is not 0)",
}


# Where our converter deliberately behaves otherwise than the reference on inputs the four golden
# layouts do not contain (each is tested in tests/test_convert_family.py or test_convert.py):
BEHAVIOUR_DIFFERENCES = {
    "tokenizer.model with more pieces than vocab_size": "refused; the reference truncates it with a warning",
    "Code Llama's end-of-text id": "taken from the ▁<EOT> piece; the reference keys it on vocab_size == 32016, so a "
                                   "Code Llama fine-tune with added tokens gets none there",
    "bos/eos/pad ids the HF files leave out": "taken from tokenizer.model, which defines them",
    "F16 output of weights beyond ±65504": "clamped to ±65504, counted, logged and printed; the reference writes ±inf "
                                           "silently (--quant bf16 keeps them)",
    "NaN or inf weights in the checkpoint": "refused, naming the tensor; the reference writes them",
    "rope_scaling dynamic, longrope, llama3; yarn with non-default attention_factor/beta":
        "refused by name: llama.cpp's llama architecture does not run them (the reference writes nothing or keys "
        "llama.cpp ignores, and the model then runs unscaled)",
    "tokenizer.json without tokenizer.model": "refused, pointing to pull --gguf; the reference converts BPE vocabularies",
    "add_bos_token in tokenizer_config.json vs tokenizer.json's post-processor":
        "PyPI gguf 0.19.0's SpecialVocab lets tokenizer_config.json win (as transformers does); the sdist's gguf-py "
        "lets the post-processor win. The golden layouts agree in both files",
}


def golden(name: str) -> dict:
    return json.loads((GOLDEN_DIR / f"{name}.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_metadata_and_tensors_equal_the_reference(tmp_path, name):
    g = golden(name)
    layout = LAYOUTS[name]
    folder, _ = build(layout, tmp_path)
    built = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}
    assert built == g["checkpoint"], (
        "the checkpoint built here is not the one the golden file was recorded from (changed builder, or a "
        "numpy that draws other random numbers); rerun scripts/make_golden.py and review the diff")

    base = None
    seen, unexplained = set(), []
    for outtype in layout.outtypes:
        want = g["outputs"][outtype]
        if base is None:
            base = want["kv"]
        want_kv = want["kv"] if "kv" in want else apply_delta(base, want["kv_delta"])
        out = tmp_path / f"{name}.{outtype}.gguf"
        export_gguf(folder, out, outtype)
        ours = json.loads(json.dumps(dump(out)))  # as the golden file holds it (lists, not tuples)
        for key, what in diff_kv(want_kv, ours["kv"]).items():
            if (name, key) in DELIBERATE:
                seen.add((name, key))
            else:
                unexplained.append(f"{outtype} {key}: {what}")
        unexplained += [f"{outtype} {d}" for d in diff_tensors(want["tensors"], ours["tensors"])]
        out.unlink()
    assert not unexplained, f"{name}: differences from the reference converter:\n" + "\n".join(unexplained)
    assert seen == {k for k in DELIBERATE if k[0] == name}, "a deliberate difference no longer occurs: update DELIBERATE"


def test_golden_diff_names_the_first_differing_index():
    """The diff a failing golden test prints: an array difference is located, not just detected."""
    from gguf_golden import encode_array

    g = {"tokenizer.ggml.token_type": {"type": "ARRAY[INT32]", "value": encode_array([3, 3, 3] + [5] * 30000 + [3])}}
    o = {"tokenizer.ggml.token_type": {"type": "ARRAY[INT32]", "value": encode_array([3, 3, 3] + [5] * 29999 + [4, 3])}}
    assert diff_kv(g, o) == {"tokenizer.ggml.token_type": "first difference at index 30002: reference 5, ours 4"}
    toks = [f"[PAD{i}]" for i in range(40000)]
    assert encode_array(toks) == [["[PAD#]", 40000]]
