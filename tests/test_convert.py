"""Conversion: HF checkpoint -> GGUF is exact, streamed, refuses what it can't do, and never leaves half files."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm

from tinyllama import TinyConfig, make_tiny_llama, reference_logits

from convert.hf_to_gguf import export_gguf
from convert.pipeline import convert
from convert.store import Store
from runtime.errors import ConversionError, UnsupportedArchitecture
from runtime.model import LlamaModel, LoadConfig

TINY = TinyConfig()
PROMPT = "Hello, world! How are you doing today? Llamas live in the mountains."


def llama_logits(path, tokens):
    m = LlamaModel(path, LoadConfig(n_ctx=256, n_threads=2, n_seq_max=1))
    try:
        m.decode([(t, i, 0, True) for i, t in enumerate(tokens)])
        return np.array([m.logits(i) for i in range(len(tokens))], dtype=np.float64), m
    finally:
        m.close()


def tokens_of(folder, text):
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    return [1] + sp.encode(text)


# Tolerances. The reference runs in float64. llama.cpp keeps its KV cache in F16 and
# accumulates in F32, so even the F32 GGUF differs by ~1e-3 on logits of std ~3.
# F16 weights add a relative rounding of 2^-11 per weight, which over 256-long dot
# products and 2 layers stays well under 5e-2 absolute. Both bounds are ~10x what we measure.
TOL = {"f32": 2e-2, "f16": 5e-2}


@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_logits_match_numpy_reference(tiny_hf, gguf_files, outtype):
    folder, weights = tiny_hf
    toks = tokens_of(folder, PROMPT)
    got, _ = llama_logits(gguf_files[outtype], toks)
    ref = reference_logits(weights, TINY, toks)
    err = np.abs(got - ref).max()
    print(f"{outtype}: max |llama.cpp - reference| = {err:.2e} (logit std {ref.std():.2f})")
    assert err < TOL[outtype]
    assert (got.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize("dtype,shards", [("F16", 1), ("BF16", 1), ("F32", 3), ("BF16", 2)])
def test_dtypes_and_shards_convert_exactly(tmp_path, dtype, shards):
    folder = tmp_path / "hf"
    weights = make_tiny_llama(folder, TINY, dtype, shards=shards, seed=1)
    if shards > 1:
        assert (folder / "model.safetensors.index.json").is_file()
    out = tmp_path / "m.gguf"
    export_gguf(folder, out, "f32")
    toks = tokens_of(folder, PROMPT)
    got, _ = llama_logits(out, toks)
    ref = reference_logits(weights, TINY, toks)
    assert np.abs(got - ref).max() < TOL["f32"]


TOKENIZER_CASES = [
    "Hello, world!",
    "  leading spaces and   runs   of spaces  ",
    "line one\nline two\n\n\ttabbed",
    "numbers 1234567890 and 3.14159",
    "unicode: café, naïve, Ærøskøbing, 東京, Привет",
    "emoji: 🦙🚀 👍🏽 family 👨‍👩‍👧",
    "bytes the vocabulary lacks: ☃ ∮ ⅋ \u0001 \u00ff",
    "</s> <s> [INST] tokens typed by a user stay text [/INST]",
    "",
    " ",
]


def test_tokenizer_matches_sentencepiece(tiny_hf, gguf_files):
    folder, _ = tiny_hf
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    m = LlamaModel(gguf_files["f16"], LoadConfig(n_ctx=64, n_threads=1, n_seq_max=1))
    try:
        for text in TOKENIZER_CASES:
            assert m.tokenize(text, add_bos=False) == sp.encode(text), text
            assert m.tokenize(text, add_bos=True)[:1] == [1]
    finally:
        m.close()


def test_metadata_written(gguf_files):
    import gguf

    r = gguf.GGUFReader(gguf_files["f16"])
    K = gguf.Keys
    arch = "llama"

    def val(key):
        f = r.fields[key]
        return f.contents()

    assert val(K.General.ARCHITECTURE) == arch
    assert val(K.LLM.CONTEXT_LENGTH.format(arch=arch)) == TINY.n_ctx_train
    assert val(K.Attention.HEAD_COUNT.format(arch=arch)) == TINY.n_head
    assert val(K.Attention.HEAD_COUNT_KV.format(arch=arch)) == TINY.n_head_kv
    assert val(K.Rope.DIMENSION_COUNT.format(arch=arch)) == TINY.n_embd // TINY.n_head
    assert val(K.Tokenizer.MODEL) == "llama"
    assert val(K.Tokenizer.BOS_ID) == 1 and val(K.Tokenizer.EOS_ID) == 2 and val(K.Tokenizer.UNK_ID) == 0
    assert val(K.Tokenizer.ADD_BOS) is True and val(K.Tokenizer.ADD_EOS) is False
    assert "[INST]" in val(K.Tokenizer.CHAT_TEMPLATE)
    types = val(K.Tokenizer.TOKEN_TYPE)
    assert types[0] == gguf.TokenType.UNKNOWN and types[1] == gguf.TokenType.CONTROL
    assert sum(t == gguf.TokenType.BYTE for t in types) == 256
    norms = [t for t in r.tensors if t.name.endswith("norm.weight")]
    assert norms and all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in norms)


@pytest.mark.parametrize("quant", ["q8_0", "q4_k_m"])
def test_quantized_files_load_generate_and_mostly_agree(tiny_hf, gguf_files, quant):
    import gguf

    # K-quants accept our 256-multiple rows: check that q4_k_m really produced K-quant tensors.
    types = {t.tensor_type for t in gguf.GGUFReader(gguf_files[quant]).tensors}
    if quant == "q4_k_m":
        assert gguf.GGMLQuantizationType.Q4_K in types
    folder, _ = tiny_hf
    toks = tokens_of(folder, PROMPT)
    ref16, _ = llama_logits(gguf_files["f16"], toks)
    got, _ = llama_logits(gguf_files[quant], toks)
    agree = (ref16.argmax(-1) == got.argmax(-1)).mean()
    print(f"{quant}: top-1 agreement with f16 over {len(toks)} positions = {agree:.2%}")
    assert agree >= (0.9 if quant == "q8_0" else 0.6)

    from runtime import GenerationParams, load

    rt = load(gguf_files[quant], n_ctx=256, n_threads=2)
    try:
        r = rt.generate("Hello", GenerationParams(max_length=8, temperature=0.0))
        assert r.completions[0].generated_tokens >= 1
    finally:
        rt.close()


def test_non_llama_architecture_is_refused(tmp_path):
    folder = tmp_path / "hf"
    make_tiny_llama(folder, TINY)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"] = ["Qwen2ForCausalLM"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitecture, match="Qwen2ForCausalLM"):
        export_gguf(folder, tmp_path / "x.gguf")


def test_lying_safetensors_header_is_refused(tmp_path):
    folder = tmp_path / "hf"
    make_tiny_llama(folder, TINY)
    st = folder / "model.safetensors"
    data = bytearray(st.read_bytes())
    data[:8] = (len(data) * 2).to_bytes(8, "little")  # header longer than the file
    st.write_bytes(bytes(data))
    with pytest.raises(ConversionError, match="header length"):
        export_gguf(folder, tmp_path / "x.gguf")


def test_store_lists_converted_model_and_verify_catches_a_flipped_byte(tiny_hf, tmp_path):
    folder, _ = tiny_hf
    store = Store(tmp_path / "home", builtin_dir=tmp_path / "none")
    reports = convert(folder, ["q8_0", "f16"], store=store, model_id="tiny")
    assert sorted(f.quant for f in store.list()) == ["f16", "q8_0"]
    assert store.verify("tiny") == []
    path = reports[0].path
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x01]))
    problems = store.verify("tiny")
    assert len(problems) == 1 and "sha256" in problems[0]


KILL_MIDWAY = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from convert.pipeline import convert
from convert.store import Store
def progress(done, total):
    if done == total // 2:
        os.kill(os.getpid(), signal.SIGKILL)  # a power cut half-way through the F16 pass
convert(Path({src!r}), ["q8_0"], store=Store(Path({home!r})), model_id="tiny", progress=progress)
"""


def test_conversion_killed_half_way_leaves_nothing_listed(tiny_hf, tmp_path):
    folder, _ = tiny_hf
    home = tmp_path / "home"
    code = KILL_MIDWAY.format(tests=os.path.dirname(__file__), src=str(folder), home=str(home))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert proc.returncode == -9
    store = Store(home, builtin_dir=tmp_path / "none")
    assert store.list() == []
    leftovers = [p.name for p in (home / "models").iterdir() if not p.name.endswith(".lock")]
    assert leftovers and all(".partial-" in n for n in leftovers)  # only the staging folder: no model folder
    convert(folder, ["q8_0"], store=store, model_id="tiny")  # a rerun starts cleanly
    assert [f.quant for f in store.list()] == ["q8_0"]
    assert not [p for p in (home / "models").rglob("*") if ".partial-" in p.name]


def test_bin_only_checkpoint_needs_the_torch_extra_or_converts(tmp_path):
    """PyTorch .bin weights: converted through torch when the extra is installed, else a clear message."""
    folder = tmp_path / "hf"
    weights = make_tiny_llama(folder, TINY, "F32")
    (folder / "model.safetensors").unlink()
    try:
        import torch
    except ImportError:
        (folder / "pytorch_model.bin").write_bytes(b"not really a pickle")
        with pytest.raises(ConversionError, match=r"llamabox\[torch\]"):
            export_gguf(folder, tmp_path / "x.gguf")
        return
    torch.save({k: torch.from_numpy(v) for k, v in weights.items()}, folder / "pytorch_model.bin")
    export_gguf(folder, tmp_path / "x.gguf", "f32")
    toks = tokens_of(folder, PROMPT)
    got, _ = llama_logits(tmp_path / "x.gguf", toks)
    assert np.abs(got - reference_logits(weights, TINY, toks)).max() < TOL["f32"]


def test_model_ids_are_strict():
    from convert.store import check_model_id, parse_ref
    from runtime.errors import InvalidModelId

    for bad in ("abc\n", "../x", "a/b", "A", "", ".hidden", "a" * 65, "x..y"):
        with pytest.raises(InvalidModelId):
            check_model_id(bad)
    with pytest.raises(InvalidModelId):
        parse_ref("llamav2-7b:q4_k_m\n")
    assert parse_ref("llamav2-7b-chat:q8_0") == ("llamav2-7b-chat", "q8_0")
