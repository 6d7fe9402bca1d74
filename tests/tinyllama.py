"""A tiny random Llama in Hugging Face layout, and an independent numpy forward pass.

The checkpoint is what a user would download: config.json, safetensors (single
or sharded, fp32/fp16/bf16), a SentencePiece tokenizer.model trained here with
byte fallback, and tokenizer_config.json with Llama 2's chat template (or another,
or none; with CHATML_TOKENS added as special tokens, a ChatML model).

Dimensions are multiples of 256 so llama.cpp's K-quants (QK_K = 256) accept
every weight matrix: n_embd 256 and n_ff 512 are the rows K-quants see.
"""
from __future__ import annotations

import io
import json
import math
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)

# SmolLM2-Instruct's template (HuggingFaceTB/SmolLM2-135M-Instruct): ChatML with a default system turn.
CHATML_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Llamas live in the mountains of South America and carry loads for people.",
    "A model that runs offline is useful on a plane, at sea, or in a lab without a network.",
    "Quantization stores each weight in fewer bits, so the model fits in less memory.",
    "Grouped query attention lets several query heads share one key and value head.",
    "The server answers with a run id, the run time in milliseconds, and the generated text.",
    "Numbers like 1234, 56.78 and 2024-11-24 appear in text too.",
    "Hello, world! How are you doing today? I am doing well, thank you.",
    "Tokens are pieces of words; a tokenizer splits text into tokens and back.",
    "Rivers flow to the sea, and the sea returns water to the sky as rain.",
] * 20


@dataclass(frozen=True)
class TinyConfig:
    n_vocab: int = 384       # SentencePiece pieces: 3 specials + 256 bytes + merges
    n_embd: int = 256        # hidden size; a multiple of QK_K = 256
    n_ff: int = 512          # SwiGLU width; ffn_down's rows are this long
    n_layer: int = 2
    n_head: int = 4          # head_dim = 64
    n_head_kv: int = 2       # GQA: two query heads per KV head
    n_ctx_train: int = 512
    rms_eps: float = 1e-5
    rope_theta: float = 10000.0
    init_std: float = 0.05   # weight scale; large enough that logits are not flat
    rope_scaling: str | None = None  # None, "linear" or "yarn" (config.json's rope_scaling type)
    rope_factor: float = 1.0         # rope_scaling factor
    rope_orig_ctx: int = 0           # yarn: original_max_position_embeddings (tokens)
    sliding_window: int | None = None  # Mistral: each position attends to itself and the window - 1 before it

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def hf_rope_scaling(self) -> dict | None:
        """config.json's rope_scaling for this config (transformers 4.x spelling)."""
        if self.rope_scaling is None:
            return None
        d = {"type": self.rope_scaling, "factor": self.rope_factor}
        if self.rope_scaling == "yarn":
            d["original_max_position_embeddings"] = self.rope_orig_ctx
        return d


def train_tokenizer(folder: Path, n_vocab: int) -> None:
    """A Llama-style SentencePiece BPE: byte fallback, unk=0 bos=1 eos=2, no pad, digits split."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_writer=buf,
        vocab_size=n_vocab,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        character_coverage=0.9995,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        add_dummy_prefix=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    (folder / "tokenizer.model").write_bytes(buf.getvalue())


def random_weights(cfg: TinyConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """HF names and layouts: Linear weights are (out_features, in_features)."""
    rng = np.random.default_rng(seed)
    e, hd = cfg.n_embd, cfg.n_embd // cfg.n_head
    kv = cfg.n_head_kv * hd

    def lin(o, i):
        return (rng.standard_normal((o, i)) * cfg.init_std).astype(np.float32)

    w = {"model.embed_tokens.weight": (rng.standard_normal((cfg.n_vocab, e))).astype(np.float32)}
    for i in range(cfg.n_layer):
        p = f"model.layers.{i}."
        w[p + "self_attn.q_proj.weight"] = lin(e, e)
        w[p + "self_attn.k_proj.weight"] = lin(kv, e)
        w[p + "self_attn.v_proj.weight"] = lin(kv, e)
        w[p + "self_attn.o_proj.weight"] = lin(e, e)
        w[p + "mlp.gate_proj.weight"] = lin(cfg.n_ff, e)
        w[p + "mlp.up_proj.weight"] = lin(cfg.n_ff, e)
        w[p + "mlp.down_proj.weight"] = lin(e, cfg.n_ff)
        w[p + "input_layernorm.weight"] = (1.0 + 0.1 * rng.standard_normal(e)).astype(np.float32)
        w[p + "post_attention_layernorm.weight"] = (1.0 + 0.1 * rng.standard_normal(e)).astype(np.float32)
    w["model.norm.weight"] = (1.0 + 0.1 * rng.standard_normal(e)).astype(np.float32)
    w["lm_head.weight"] = lin(cfg.n_vocab, e) * 4
    return w


def to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even."""
    u = a.astype(np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def from_bf16_bits(b: np.ndarray) -> np.ndarray:
    return (b.astype(np.uint32) << 16).view(np.float32)


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], dtype: str) -> None:
    """Minimal safetensors writer: dtype is 'F32', 'F16' or 'BF16'."""
    header, blobs, off = {}, [], 0
    for name, a in tensors.items():
        if dtype == "BF16":
            raw = to_bf16_bits(a).tobytes()
        else:
            raw = a.astype(np.float32 if dtype == "F32" else np.float16).tobytes()
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    header["__metadata__"] = {"format": "pt"}
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def make_tiny_llama(folder: Path, cfg: TinyConfig = TinyConfig(), dtype: str = "F32", shards: int = 1, seed: int = 0,
                    chat_template: str | None = LLAMA2_CHAT_TEMPLATE, added_tokens: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """Write the checkpoint; return the weights as the checkpoint stores them (rounded to dtype), in float32.

    chat_template None: tokenizer_config.json has none (a base repo). added_tokens: special tokens
    after the SentencePiece pieces, ids cfg.n_vocab - len(added_tokens) on, as HF's added_tokens_decoder."""
    folder.mkdir(parents=True, exist_ok=True)
    n_pieces = cfg.n_vocab - len(added_tokens)
    train_tokenizer(folder, n_pieces)
    hf_config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.n_vocab, "hidden_size": cfg.n_embd, "intermediate_size": cfg.n_ff,
        "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_head_kv,
        "max_position_embeddings": cfg.n_ctx_train, "rms_norm_eps": cfg.rms_eps, "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.hf_rope_scaling(),
        "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False, "hidden_act": "silu",
        "torch_dtype": {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[dtype],
    }
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2))
    tok_cfg = {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    if chat_template is not None:
        tok_cfg["chat_template"] = chat_template
    tok_cfg["tokenizer_class"] = "LlamaTokenizer"
    if added_tokens:
        tok_cfg["added_tokens_decoder"] = {
            str(n_pieces + i): {"content": t, "special": True, "lstrip": False, "rstrip": False, "normalized": False,
                                "single_word": False}
            for i, t in enumerate(added_tokens)
        }
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    w = random_weights(cfg, seed)
    names = list(w)
    if shards == 1:
        write_safetensors(folder / "model.safetensors", w, dtype)
    else:
        weight_map = {}
        per = -(-len(names) // shards)
        for s in range(shards):
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: w[n] for n in names[s * per : (s + 1) * per]}
            write_safetensors(folder / fname, part, dtype)
            weight_map.update({n: fname for n in part})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if dtype == "F16":
        w = {k: v.astype(np.float16).astype(np.float32) for k, v in w.items()}
    elif dtype == "BF16":
        w = {k: from_bf16_bits(to_bf16_bits(v)) for k, v in w.items()}
    (folder / "tiny_config.json").write_text(json.dumps(asdict(cfg)))
    return w


# --- reference forward pass: Hugging Face's LlamaForCausalLM maths, in float64 numpy ---

def _rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rotate_half(x: np.ndarray) -> np.ndarray:
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def rope_inv_freq(cfg: TinyConfig) -> tuple[np.ndarray, float]:
    """(inverse frequencies (head_dim/2,) in radians per position, cos/sin scale), as transformers'
    modeling_rope_utils computes them for rope_scaling None, "linear" and "yarn"."""
    hd, base = cfg.head_dim, cfg.rope_theta
    inv_freq = 1.0 / (base ** (np.arange(0, hd, 2) / hd))
    if cfg.rope_scaling is None:
        return inv_freq, 1.0
    if cfg.rope_scaling == "linear":  # positions divided by factor
        return inv_freq / cfg.rope_factor, 1.0
    assert cfg.rope_scaling == "yarn", cfg.rope_scaling
    # YaRN with transformers' defaults (beta_fast 32, beta_slow 1, truncate): dimensions that turn
    # fewer than beta_slow times over the original context are interpolated (divided by factor),
    # those that turn more than beta_fast times are kept, and a linear ramp blends those between.
    factor, orig = cfg.rope_factor, cfg.rope_orig_ctx

    def corr_dim(rotations: float) -> float:  # the dimension that turns `rotations` times over `orig` positions
        return hd * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = max(math.floor(corr_dim(32)), 0), min(math.ceil(corr_dim(1)), hd - 1)
    ramp = np.clip((np.arange(hd // 2) - low) / ((high - low) or 0.001), 0, 1)   # 0: keep, 1: interpolate
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    return inv_freq, (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)


def reference_logits(w: dict[str, np.ndarray], cfg: TinyConfig, tokens: list[int]) -> np.ndarray:
    """Logits (T, n_vocab) for every position of `tokens`, as transformers' LlamaForCausalLM computes them
    (MistralForCausalLM with cfg.sliding_window)."""
    w = {k: v.astype(np.float64) for k, v in w.items()}
    T, hd = len(tokens), cfg.head_dim
    group = cfg.n_head // cfg.n_head_kv
    inv_freq, scale = rope_inv_freq(cfg)                                       # (hd/2,)
    freqs = np.outer(np.arange(T), inv_freq)                                   # (T, hd/2)
    emb = np.concatenate([freqs, freqs], axis=-1)                              # (T, hd)
    cos, sin = scale * np.cos(emb)[:, None, :], scale * np.sin(emb)[:, None, :]  # (T, 1, hd)
    mask = np.triu(np.full((T, T), -np.inf), k=1)
    if cfg.sliding_window:
        mask += np.tril(np.full((T, T), -np.inf), k=-cfg.sliding_window)      # key more than window - 1 back

    h = w["model.embed_tokens.weight"][tokens]                                 # (T, e)
    for i in range(cfg.n_layer):
        p = f"model.layers.{i}."
        x = _rms_norm(h, w[p + "input_layernorm.weight"], cfg.rms_eps)
        q = (x @ w[p + "self_attn.q_proj.weight"].T).reshape(T, cfg.n_head, hd)
        k = (x @ w[p + "self_attn.k_proj.weight"].T).reshape(T, cfg.n_head_kv, hd)
        v = (x @ w[p + "self_attn.v_proj.weight"].T).reshape(T, cfg.n_head_kv, hd)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)        # (T, n_head, hd)
        att = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd) + mask             # (n_head, T, T)
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        o = np.einsum("hqk,khd->qhd", att, v).reshape(T, cfg.n_embd)
        h = h + o @ w[p + "self_attn.o_proj.weight"].T
        x = _rms_norm(h, w[p + "post_attention_layernorm.weight"], cfg.rms_eps)
        g = x @ w[p + "mlp.gate_proj.weight"].T
        h = h + ((g / (1 + np.exp(-g))) * (x @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
    h = _rms_norm(h, w["model.norm.weight"], cfg.rms_eps)
    return h @ w["lm_head.weight"].T
