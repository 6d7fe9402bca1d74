"""Tiny checkpoints in the layouts of the Llama 2 family that users carry, in Hugging Face layout.

Each Layout is one real model's repo shape, shrunk: its config.json keys (and the ones it leaves
out), its tokenizer files (tokenizer.json or not, added_tokens_decoder, added_tokens.json), its
dtype and sharding, a model card and generation_config.json where the real repo has them. The
weights are random (tinyllama.random_weights, fixed seed) and every file is written
deterministically, so a clean clone builds the same bytes: tests/golden/*.json record the
reference converter's output on these checkpoints (scripts/make_golden.py), and
tests/test_convert_golden.py diffs ours against it.

All layouts share one SentencePiece model, tests/golden/tokenizer.model (384 pieces, trained
once by tinyllama.train_tokenizer and committed, so the vocabulary does not depend on the
installed sentencepiece's trainer).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from tinyllama import LLAMA2_CHAT_TEMPLATE, TinyConfig, from_bf16_bits, random_weights, to_bf16_bits, write_safetensors

GOLDEN_DIR = Path(__file__).resolve().parent / "golden"
TOKENIZER_MODEL = GOLDEN_DIR / "tokenizer.model"
N_PIECES = 384  # pieces of TOKENIZER_MODEL: <unk> <s> </s>, 256 bytes, merges
SPACE = "\u2581"

# Small enough that a 32016-row Code Llama embedding stays a few MB; head_dim 32.
BASE = TinyConfig(n_vocab=N_PIECES, n_embd=128, n_ff=256, n_layer=2, n_head=4, n_head_kv=4, n_ctx_train=4096)

# A chat template whose markup uses the added <pad> token as its turn separator.
PAD_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] | upper }}: {{ message['content'] }}<pad>{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def _added(content: str, special: bool = True) -> dict[str, Any]:
    """One tokenizer_config.json added_tokens_decoder entry, as transformers writes it."""
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": special}


LLAMA_SPECIALS = {0: _added("<unk>"), 1: _added("<s>"), 2: _added("</s>")}


@dataclass(frozen=True)
class Layout:
    name: str                       # tests/golden/<name>.json
    folder: str                     # the checkpoint folder's name (general.name comes from it)
    cfg: TinyConfig
    dtype: str = "F16"              # safetensors dtype: F32 | F16 | BF16
    shards: int = 1
    arch: str = "LlamaForCausalLM"
    config_extra: dict = field(default_factory=dict)   # more config.json keys; a None value removes the key
    added: dict = field(default_factory=dict)          # added_tokens_decoder beyond LLAMA_SPECIALS: {id: entry}
    specials_in_decoder: bool = True                   # Llama 2's tokenizer_config lists <unk> <s> </s> too
    added_tokens_json: bool = False                    # also write added_tokens.json (older fine-tunes)
    tokenizer_json: bool = True                        # write tokenizer.json (repos saved by transformers' fast tokenizer)
    tokenizer_extra: dict = field(default_factory=dict)  # more tokenizer_config.json keys
    chat_template: str | None = None
    card: str | None = None                            # README.md model card front matter (YAML), None: no README
    generation: dict | None = None                     # generation_config.json

    @property
    def outtypes(self) -> tuple[str, ...]:
        return ("f16", "f32", "bf16") if self.dtype == "BF16" else ("f16", "f32")


LAYOUTS = {
    # meta-llama/Llama-2-7b-chat-hf: F16 shards, MHA, no rope_theta in config.json (transformers'
    # default 10000), the chat template in a base-looking repo, tokenizer.json, a model card.
    "llama2": Layout(
        "llama2", "Llama-2-tiny-chat-hf", BASE, "F16", shards=2,
        config_extra={"_name_or_path": "meta-llama/Llama-2-tiny-chat-hf", "rope_theta": None, "pretraining_tp": 1,
                      "initializer_range": 0.02, "use_cache": True, "transformers_version": "4.31.0.dev0"},
        tokenizer_extra={"legacy": False, "pad_token": None, "padding_side": "right", "model_max_length": 1000000000000000019884624838656,
                         "clean_up_tokenization_spaces": False, "sp_model_kwargs": {}, "use_default_system_prompt": False},
        chat_template=LLAMA2_CHAT_TEMPLATE,
        card="language:\n- en\npipeline_tag: text-generation\ninference: false\nlicense: llama2\n"
             "tags:\n- facebook\n- meta\n- pytorch\n- llama\n- llama-2\n",
        generation={"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "temperature": 0.6, "top_p": 0.9,
                    "max_length": 4096, "do_sample": True, "transformers_version": "4.31.0.dev0"},
    ),
    # A chat fine-tune that adds <pad> (Llama 2's vocab 32000 -> 32001) and a user-defined token with
    # SentencePiece's space, saved by a recent transformers (head_dim in config.json), BF16, with
    # added_tokens.json next to tokenizer_config.json, a template that uses <pad>, and sampling defaults.
    "chat_pad": Layout(
        "chat_pad", "Llama-2-tiny-chat-pad", replace(BASE, n_vocab=N_PIECES + 2), "BF16",
        config_extra={"head_dim": 32, "pad_token_id": N_PIECES, "attention_bias": False, "mlp_bias": False,
                      "transformers_version": "4.46.0"},
        added={N_PIECES: _added("<pad>"), N_PIECES + 1: _added(SPACE + "<think>", special=False)},
        added_tokens_json=True,
        tokenizer_extra={"pad_token": "<pad>", "legacy": False},
        chat_template=PAD_CHAT_TEMPLATE,
        card="base_model: meta-llama/Llama-2-7b-chat-hf\ndatasets:\n- OpenAssistant/oasst1\nlicense: llama2\nlanguage:\n- en\n",
        generation={"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": N_PIECES, "temperature": 0.7, "top_p": 0.95,
                    "top_k": 40, "repetition_penalty": 1.1, "do_sample": True},
    ),
    # codellama/CodeLlama-7b-hf: vocab 32016 with the infill tokens at 32007-32010 (special in
    # tokenizer_config.json), rope_theta 1e6, 16k context, BF16. Here the SentencePiece model has
    # 384 pieces, so the ids between are padding.
    "codellama": Layout(
        "codellama", "CodeLlama-tiny-hf", replace(BASE, n_vocab=32016, rope_theta=1e6, n_ctx_train=16384), "BF16", shards=2,
        config_extra={"_name_or_path": "codellama/CodeLlama-tiny-hf", "transformers_version": "4.33.0.dev0"},
        added={32007: _added(SPACE + "<PRE>"), 32008: _added(SPACE + "<SUF>"), 32009: _added(SPACE + "<MID>"),
               32010: _added(SPACE + "<EOT>")},
        tokenizer_extra={"prefix_token": SPACE + "<PRE>", "middle_token": SPACE + "<MID>", "suffix_token": SPACE + "<SUF>",
                         "eot_token": SPACE + "<EOT>", "fill_token": "<FILL_ME>", "legacy": None,
                         "tokenizer_class": "CodeLlamaTokenizer"},
        card="language:\n- code\npipeline_tag: text-generation\ntags:\n- llama-2\nlicense: llama2\n",
    ),
    # A long-context fine-tune with linear rope scaling (4096 x 4 = 16384 tokens), GQA, F32, an older
    # repo: no tokenizer.json, no added_tokens_decoder, special tokens as AddedToken objects.
    "linear": Layout(
        "linear", "llama-2-tiny-16k-linear",
        replace(BASE, n_head_kv=2, n_ctx_train=16384, rope_scaling="linear", rope_factor=4.0), "F32",
        specials_in_decoder=False, tokenizer_json=False,
        tokenizer_extra={"bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": False, "normalized": True,
                                       "rstrip": False, "single_word": False},
                         "eos_token": {"__type": "AddedToken", "content": "</s>", "lstrip": False, "normalized": True,
                                       "rstrip": False, "single_word": False}},
    ),
}

# Variants our tests run but the golden files do not record (see test_convert_family.py).
EXTRA = {
    # YaRN: factor 4 over Llama 2's 4096 tokens.
    "yarn": Layout("yarn", "llama-2-tiny-yarn", replace(BASE, n_ctx_train=16384, rope_scaling="yarn", rope_factor=4.0,
                                                        rope_orig_ctx=4096), "F16"),
    # TinyLlama-1.1B's shape: 8 query heads per KV head, 2048 tokens.
    "tinyllama": Layout("tinyllama", "TinyLlama-tiny", replace(BASE, n_head=8, n_head_kv=1, n_ctx_train=2048), "BF16"),
    # mistralai/Mistral-7B-v0.1: MistralForCausalLM, GQA 4:1, 32k positions, a 4096-token sliding window.
    "mistral": Layout("mistral", "Mistral-tiny-v0.1", replace(BASE, n_head=8, n_head_kv=2, n_ctx_train=32768, sliding_window=4096),
                      "BF16", arch="MistralForCausalLM", config_extra={"sliding_window": 4096, "model_type": "mistral"}),
}


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _tokenizer_json(pieces: list[str], added: dict[int, dict]) -> dict:
    """A tokenizer.json as transformers writes one for a Llama tokenizer: added tokens, the BOS
    post-processor and a BPE model (vocab only: neither converter reads its merges for a
    SentencePiece repo, so none are written)."""
    added_tokens = [{"id": i, **{k: v for k, v in e.items()}} for i, e in sorted(added.items())]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added_tokens,
        "normalizer": {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": SPACE},
                                                           {"type": "Replace", "pattern": {"String": " "}, "content": SPACE}]},
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}},
        },
        "decoder": {"type": "Sequence", "decoders": [{"type": "Replace", "pattern": {"String": SPACE}, "content": " "},
                                                      {"type": "ByteFallback"}, {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": {p: i for i, p in enumerate(pieces)}, "merges": []},
    }


def build(layout: Layout, parent: Path, seed: int = 0) -> tuple[Path, dict[str, np.ndarray]]:
    """Write `layout` as parent/<layout.folder>; return (folder, weights as stored, in float32)."""
    import sentencepiece as spm

    cfg = layout.cfg
    folder = parent / layout.folder
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(TOKENIZER_MODEL, folder / "tokenizer.model")
    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER_MODEL))
    pieces = [sp.IdToPiece(i) for i in range(sp.vocab_size())]
    assert len(pieces) == N_PIECES

    hf = {
        "architectures": [layout.arch], "model_type": "llama", "vocab_size": cfg.n_vocab, "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.n_ff, "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_head_kv, "max_position_embeddings": cfg.n_ctx_train, "rms_norm_eps": cfg.rms_eps,
        "rope_theta": cfg.rope_theta, "rope_scaling": cfg.hf_rope_scaling(), "bos_token_id": 1, "eos_token_id": 2,
        "tie_word_embeddings": False, "hidden_act": "silu",
        "torch_dtype": {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[layout.dtype],
    }
    for k, v in layout.config_extra.items():
        if v is None:
            hf.pop(k, None)
        else:
            hf[k] = v
    _write_json(folder / "config.json", dict(sorted(hf.items())))

    added = {**(LLAMA_SPECIALS if layout.specials_in_decoder else {}), **layout.added}
    tok = {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
           "tokenizer_class": "LlamaTokenizer"}
    if added:
        tok["added_tokens_decoder"] = {str(i): e for i, e in sorted(added.items())}
    tok.update(layout.tokenizer_extra)
    if layout.chat_template is not None:
        tok["chat_template"] = layout.chat_template
    _write_json(folder / "tokenizer_config.json", tok)
    _write_json(folder / "special_tokens_map.json", {k: tok[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")
                                                     if tok.get(k) is not None})
    if layout.tokenizer_json:
        _write_json(folder / "tokenizer.json", _tokenizer_json(pieces, {**LLAMA_SPECIALS, **layout.added}))
    if layout.added_tokens_json:
        _write_json(folder / "added_tokens.json", {e["content"]: i for i, e in sorted(layout.added.items())})
    if layout.card is not None:
        (folder / "README.md").write_text(f"---\n{layout.card}---\n\n# {layout.folder}\n\nA tiny random test checkpoint.\n")
    if layout.generation is not None:
        _write_json(folder / "generation_config.json", layout.generation)

    w = random_weights(cfg, seed)
    names = list(w)
    if layout.shards == 1:
        write_safetensors(folder / "model.safetensors", w, layout.dtype)
    else:
        weight_map, per = {}, -(-len(names) // layout.shards)
        for s in range(layout.shards):
            fname = f"model-{s + 1:05d}-of-{layout.shards:05d}.safetensors"
            part = {n: w[n] for n in names[s * per:(s + 1) * per]}
            write_safetensors(folder / fname, part, layout.dtype)
            weight_map.update({n: fname for n in part})
        _write_json(folder / "model.safetensors.index.json", {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))})
    if layout.dtype == "F16":
        w = {k: v.astype(np.float16).astype(np.float32) for k, v in w.items()}
    elif layout.dtype == "BF16":
        w = {k: from_bf16_bits(to_bf16_bits(v)) for k, v in w.items()}
    return folder, w
