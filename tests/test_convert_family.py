"""The Llama 2 family converts and runs: each layout of tests/llama_family.py loads in llama.cpp and
its logits match our float64 numpy reference (with rope theta and scaling); added tokens tokenize
as llama.cpp's reference converter means them to; BF16 stays lossless; what we cannot convert is
refused with one line that names the cause.
"""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from dataclasses import replace

import gguf
import numpy as np
import pytest

from llama_family import EXTRA, LAYOUTS, N_PIECES, build
from test_convert import PROMPT, TOL, llama_logits, tokens_of
from tinyllama import from_bf16_bits, reference_logits, to_bf16_bits

from convert.hf_to_gguf import F16_MAX, export_gguf, permute_qk
from convert.pipeline import convert, parse_quants
from runtime.errors import ConversionError, UnsupportedArchitecture

VARIANTS = {**LAYOUTS, **EXTRA}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """name -> (folder, weights as stored), built once per module."""
    root = tmp_path_factory.mktemp("family")
    return {name: build(layout, root) for name, layout in VARIANTS.items()}


@pytest.mark.parametrize("outtype", ["f32", "f16"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_logits_match_numpy_reference(built, tmp_path, name, outtype):
    folder, weights = built[name]
    cfg = VARIANTS[name].cfg
    out = tmp_path / f"{name}.{outtype}.gguf"
    export_gguf(folder, out, outtype)
    toks = tokens_of(folder, PROMPT)
    got, _ = llama_logits(out, toks)
    ref = reference_logits(weights, cfg, toks)
    err = np.abs(got - ref).max()
    print(f"{name:10} {outtype}: max |llama.cpp - reference| = {err:.2e}, relative to max |logit| {err / np.abs(ref).max():.2e} "
          f"({len(toks)} positions, vocab {cfg.n_vocab})")
    assert err < TOL[outtype]
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    if cfg.rope_scaling or cfg.rope_theta != 10000.0:  # and the rope settings were needed to get there
        plain = reference_logits(weights, replace(cfg, rope_scaling=None, rope_theta=10000.0), toks)
        assert np.abs(plain - ref).max() > 20 * err


def test_rope_settings_reach_the_gguf(built, tmp_path):
    """rope_theta, and rope_scaling written as the reference writes it (linear: type, factor; yarn: + original context)."""
    K, arch = gguf.Keys, "llama"

    def fields(name):
        out = tmp_path / f"{name}.gguf"
        export_gguf(built[name][0], out, "f16")
        r = gguf.GGUFReader(out)
        return {k: f.contents() for k, f in r.fields.items()}

    code = fields("codellama")
    assert code[K.Rope.FREQ_BASE.format(arch=arch)] == 1e6 and code[K.LLM.CONTEXT_LENGTH.format(arch=arch)] == 16384
    assert K.Rope.SCALING_TYPE.format(arch=arch) not in code
    lin = fields("linear")
    assert lin[K.Rope.SCALING_TYPE.format(arch=arch)] == "linear" and lin[K.Rope.SCALING_FACTOR.format(arch=arch)] == 4.0
    yarn = fields("yarn")
    assert yarn[K.Rope.SCALING_TYPE.format(arch=arch)] == "yarn" and yarn[K.Rope.SCALING_FACTOR.format(arch=arch)] == 4.0
    assert yarn[K.Rope.SCALING_ORIG_CTX_LEN.format(arch=arch)] == 4096
    gqa = fields("tinyllama")
    assert gqa[K.Attention.HEAD_COUNT.format(arch=arch)] == 8 and gqa[K.Attention.HEAD_COUNT_KV.format(arch=arch)] == 1


def test_mistral_sliding_window_is_dropped_as_the_reference_does_and_said(tmp_path, caplog):
    """llama.cpp's llama architecture attends over the whole context: within the window the logits are the
    checkpoint's; past it they are full attention's, not the window's. The conversion says so."""
    layout = replace(EXTRA["mistral"], cfg=replace(EXTRA["mistral"].cfg, sliding_window=8), config_extra={"sliding_window": 8})
    folder, weights = build(layout, tmp_path)
    with caplog.at_level(logging.WARNING, logger="convert.hf_to_gguf"):
        export_gguf(folder, tmp_path / "m.gguf", "f32")
    assert any("sliding_window 8" in r.getMessage() for r in caplog.records)
    toks = tokens_of(folder, PROMPT)
    assert len(toks) > 16
    got, _ = llama_logits(tmp_path / "m.gguf", toks)
    full = reference_logits(weights, replace(layout.cfg, sliding_window=None), toks)
    windowed = reference_logits(weights, layout.cfg, toks)
    assert np.abs(got - full).max() < TOL["f32"]
    assert np.abs(got[:8] - windowed[:8]).max() < TOL["f32"]
    assert np.abs(got[8:] - windowed[8:]).max() > 10 * TOL["f32"]


# --- added tokens ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chat_pad_gguf(built, tmp_path_factory):
    out = tmp_path_factory.mktemp("chat-pad") / "chat-pad.f16.gguf"
    export_gguf(built["chat_pad"][0], out, "f16")
    return out


def test_added_pad_typed_as_text_stays_text(chat_pad_gguf):
    from runtime.model import LlamaModel, LoadConfig

    pad, think = N_PIECES, N_PIECES + 1
    m = LlamaModel(chat_pad_gguf, LoadConfig(n_ctx=64, n_threads=1, n_seq_max=1))
    try:
        text = "Hello <pad> world"
        as_text = m.tokenize(text, add_bos=False, special=False)
        assert pad not in as_text and len(m.tokenize("<pad>", add_bos=False, special=False)) > 1  # its characters' pieces
        assert pad in m.tokenize(text, add_bos=False, special=True)
        # A user-defined (not special) added token is matched in plain text, as transformers does;
        # its "▁" became a space, so " <think>" is what matches.
        assert think in m.tokenize("Hello <think> world", add_bos=False, special=False)
        assert think not in m.tokenize("Hello<think>", add_bos=False, special=False)
    finally:
        m.close()


def test_chat_template_using_the_added_pad_works(chat_pad_gguf):
    from runtime import GenerationParams, load

    rt = load(chat_pad_gguf, n_ctx=256, n_threads=2, chat=True)
    try:
        m = rt.model
        ids = rt.chat_tokens([{"role": "user", "content": "Tell me about <pad> tokens"}])
        # The template's separator is the <pad> token; the user's "<pad>" is text.
        assert ids.count(N_PIECES) == 1
        assert ids[:1] == [1] and ids[-len(m.tokenize("ASSISTANT:", add_bos=False)):] == m.tokenize("ASSISTANT:", add_bos=False)
        r = rt.generate("Tell me about <pad> tokens", GenerationParams(max_length=4, temperature=0.0))
        assert r.completions[0].generated_tokens >= 1
    finally:
        rt.close()


# --- BF16 and F16's range ------------------------------------------------------------------------------

def _tensor(path, name):
    return next(t for t in gguf.GGUFReader(path).tensors if t.name == name)


def test_bf16_output_of_a_bf16_checkpoint_is_lossless(built, tmp_path):
    folder, weights = built["tinyllama"]
    cfg = EXTRA["tinyllama"].cfg
    out = tmp_path / "t.bf16.gguf"
    export_gguf(folder, out, "bf16")
    emb = _tensor(out, "token_embd.weight")
    assert emb.tensor_type == gguf.GGMLQuantizationType.BF16
    assert np.array_equal(np.asarray(emb.data).view(np.uint16).reshape(-1), to_bf16_bits(weights["model.embed_tokens.weight"]).reshape(-1))
    k = _tensor(out, "blk.1.attn_k.weight")
    want = to_bf16_bits(permute_qk(weights["model.layers.1.self_attn.k_proj.weight"], cfg.n_head_kv))
    assert np.array_equal(np.asarray(k.data).view(np.uint16).reshape(-1), want.reshape(-1))
    assert gguf.GGUFReader(out).fields[gguf.Keys.General.FILE_TYPE].contents() == gguf.LlamaFileType.MOSTLY_BF16


@pytest.fixture(scope="module")
def huge(tmp_path_factory):
    """A BF16 checkpoint with 3 weights beyond F16's range and one just inside it."""
    from tinyllama import write_safetensors

    root = tmp_path_factory.mktemp("huge")
    folder, weights = build(EXTRA["tinyllama"], root)
    w = dict(weights)
    down = w["model.layers.0.mlp.down_proj.weight"].copy()
    down[0, :4] = [70000.0, -1e5, 2e5, 65280.0]  # 65280 is a BF16 value below 65504
    w["model.layers.0.mlp.down_proj.weight"] = down
    write_safetensors(folder / "model.safetensors", w, "BF16")
    return folder, from_bf16_bits(to_bf16_bits(down))


def test_f16_output_reports_weights_beyond_its_range(huge, tmp_path, caplog):
    folder, down = huge
    with caplog.at_level(logging.WARNING, logger="convert.hf_to_gguf"):
        r = export_gguf(folder, tmp_path / "h.f16.gguf", "f16")
    assert r.f16_overflow == 3
    assert any("3 weights overflow F16" in rec.getMessage() and "bf16" in rec.getMessage() for rec in caplog.records)
    got = np.asarray(_tensor(tmp_path / "h.f16.gguf", "blk.0.ffn_down.weight").data).reshape(down.shape)
    assert list(got[0, :4]) == [F16_MAX, -F16_MAX, F16_MAX, 65280.0]
    assert export_gguf(folder, tmp_path / "h.bf16.gguf", "bf16").f16_overflow == 0
    kept = np.asarray(_tensor(tmp_path / "h.bf16.gguf", "blk.0.ffn_down.weight").data).view(np.uint16).reshape(down.shape)
    assert np.array_equal(from_bf16_bits(kept)[0, :4], down[0, :4])


def test_pipeline_reports_the_overflow_and_quantizes_from_a_lossless_intermediate(huge, tmp_path):
    folder, _ = huge
    assert parse_quants("bf16,f16,q8_0") == ["bf16", "f16", "q8_0"]
    reports = convert(folder, ["f16", "bf16", "q8_0"], out_dir=tmp_path / "out", model_id="huge")
    by = {r.quant: r for r in reports}
    assert by["f16"].f16_overflow == 3 and by["bf16"].f16_overflow == 0 and by["q8_0"].f16_overflow == 0
    # q8_0 came from the BF16 intermediate: its blocks saw 70000 and -1e5, not ±65504.
    q = _tensor(by["q8_0"].path, "blk.0.ffn_down.weight")
    row = gguf.quants.dequantize(np.asarray(q.data), q.tensor_type).reshape(-1)[:4]
    assert row[1] < -70000 and row[0] > 65504
    assert not list((tmp_path / "out").glob(".*"))  # no intermediate left behind


def test_cli_prints_the_overflow(huge, tmp_path):
    folder, _ = huge
    proc = subprocess.run([sys.executable, "-m", "server.cli", "convert", str(folder), "--quant", "f16", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "3 weights are beyond F16's range" in proc.stdout and "--quant bf16" in proc.stdout


# --- refusals ----------------------------------------------------------------------------------------

def _edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("scaling,error,match", [
    ({"type": "dynamic", "factor": 2.0}, UnsupportedArchitecture, "rope_scaling type 'dynamic' is not supported"),
    ({"rope_type": "longrope", "factor": 2.0}, UnsupportedArchitecture, "'longrope'"),
    ({"rope_type": "llama3", "factor": 8.0}, UnsupportedArchitecture, "'llama3'"),
    ({"type": "linear"}, ConversionError, "missing 'factor'"),
    ({"type": "linear", "factor": 0}, ConversionError, "factor must be positive, got 0"),
    ({"type": "yarn", "factor": 4.0}, ConversionError, "missing 'original_max_position_embeddings'"),
    ({"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096, "mscale": 0.7, "mscale_all_dim": 0.7},
     UnsupportedArchitecture, "mscale, mscale_all_dim"),
    # llama.cpp scales attention by 0.1 ln(4) + 1 whatever the GGUF says; transformers would by 1.0
    ({"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096, "attention_factor": 1.0},
     UnsupportedArchitecture, r"attention_factor 1.0 \(llama.cpp uses 1.13863\)"),
    ({"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096, "beta_fast": 16, "beta_slow": 2},
     UnsupportedArchitecture, r"beta_fast 16.0 \(llama.cpp uses 32\), beta_slow 2.0 \(llama.cpp uses 1\)"),
])
def test_rope_scaling_llama_cpp_cannot_run_is_refused_by_name(built, tmp_path, scaling, error, match):
    import shutil

    folder = tmp_path / "hf"
    shutil.copytree(built["llama2"][0], folder)
    _edit_config(folder, rope_scaling=scaling)
    with pytest.raises(error, match=match):
        export_gguf(folder, tmp_path / "x.gguf")


def test_bpe_tokenizer_json_only_is_refused_in_one_line_pointing_to_pull_gguf(built, tmp_path):
    import shutil

    folder = tmp_path / "SmolLM-like"
    shutil.copytree(built["llama2"][0], folder)
    (folder / "tokenizer.model").unlink()
    tj = json.loads((folder / "tokenizer.json").read_text())
    tj["model"] = {"type": "BPE", "vocab": {"a": 0}, "merges": [], "byte_fallback": False}
    tj["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False}
    (folder / "tokenizer.json").write_text(json.dumps(tj))
    for call in (lambda: export_gguf(folder, tmp_path / "x.gguf"), lambda: convert(folder, ["q8_0"], out_dir=tmp_path / "o")):
        with pytest.raises(UnsupportedArchitecture) as e:
            call()
        msg = str(e.value)
        assert "\n" not in msg and "BPE tokenizer.json" in msg and "Llama 3" in msg and "llamabox pull NAME --gguf" in msg
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("extra,theta,scaling", [
    ({"rope_theta": None}, 10000.0, None),                                                  # Llama 2: none given
    ({"rope_scaling": {"rope_type": "default"}}, 10000.0, None),
    ({"rope_theta": None, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}, 5e5, None),  # transformers 5
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}}, 1e6, ("linear", 2.0)),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096, "beta_fast": 32, "extrapolation_factor": 0.5,
                       "attention_factor": 0.1 * np.log(4.0) + 1}}, 10000.0, ("yarn", 4.0)),  # = transformers' default
])
def test_rope_config_spellings(built, tmp_path, extra, theta, scaling):
    import shutil

    from convert.checkpoint import read_config

    folder = tmp_path / "hf"
    shutil.copytree(built["llama2"][0], folder)
    _edit_config(folder, **extra)
    cfg = read_config(folder)
    assert cfg.rope_theta == theta
    assert (cfg.rope_scaling and (cfg.rope_scaling.kind, cfg.rope_scaling.factor)) == (scaling or None)


def test_broken_model_card_is_refused_naming_it(built, tmp_path):
    import shutil

    folder = tmp_path / "hf"
    shutil.copytree(built["llama2"][0], folder)
    (folder / "README.md").write_text("---\nlicense: [llama2\n---\n")
    with pytest.raises(ConversionError, match="README.md: the model card's front matter is not valid YAML"):
        export_gguf(folder, tmp_path / "x.gguf")


def test_float_outputs_of_an_f32_checkpoint_need_no_intermediate(built, tmp_path):
    """f16 and bf16 come straight from the checkpoint; the progress callback follows one pass."""
    folder, _ = built["linear"]  # F32
    calls = []
    reports = convert(folder, ["f16", "bf16"], out_dir=tmp_path, model_id="lin", progress=lambda d, t: calls.append((d, t)))
    assert [r.quant for r in reports] == ["f16", "bf16"]
    assert [d for d, _ in calls] == list(range(1, calls[0][1] + 1))
    types = {r.quant: {t.tensor_type for t in gguf.GGUFReader(r.path).tensors} for r in reports}
    assert types == {"f16": {gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32},
                     "bf16": {gguf.GGMLQuantizationType.BF16, gguf.GGMLQuantizationType.F32}}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lin.bf16.gguf", "lin.f16.gguf"]
