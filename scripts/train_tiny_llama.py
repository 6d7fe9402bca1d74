#!/usr/bin/env python3
"""Train a tiny Llama-2-shaped language model on CPU and save it in Hugging Face layout.

The output folder looks like a (very small) Hugging Face Llama 2 checkpoint:

    config.json             LlamaForCausalLM config
    generation_config.json  bos/eos ids
    model.safetensors       weights under HF Llama tensor names (q/k in HF rotate_half layout)
    tokenizer.model         SentencePiece BPE model (byte_fallback, unk=0 bos=1 eos=2, no pad)
    tokenizer_config.json   Llama-2-chat chat_template, add_bos_token=true, add_eos_token=false
    special_tokens_map.json
    vocab.txt               distinct lowercase words of the corpus (for "is this English?" tests)
    training.json           corpus provenance, sizes, hyperparameters, seeds, losses, samples

The model is written in plain torch (no `transformers`), llama2.c / nanoGPT style, but its
module names mirror HF's LlamaForCausalLM so that `state_dict()` already carries HF names.

The corpus is read from files given on the command line (fortune(6) cookie files, entries
separated by lines holding a single "%"); nothing is fetched from the network.
See scripts/README.md for how to obtain the corpus with apt and how to reproduce the run.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import math
import os
import platform
import random
import re
import string
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np
import sentencepiece as spm
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

# --------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    dim: int = 256  # hidden_size; a multiple of 256 so K-quants accept every row
    n_layers: int = 4  # num_hidden_layers
    n_heads: int = 8  # num_attention_heads; head_dim = dim // n_heads = 32
    n_kv_heads: int = 4  # num_key_value_heads (grouped-query attention: 2 q heads per kv head)
    hidden_dim: int = 768  # intermediate_size of the SwiGLU MLP; a multiple of 256 (down_proj rows)
    vocab_size: int = 4096  # SentencePiece vocabulary size (set from the trained tokenizer)
    max_seq_len: int = 512  # max_position_embeddings
    norm_eps: float = 1e-5  # rms_norm_eps
    rope_theta: float = 10000.0  # rotary base frequency

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


@dataclass
class TrainConfig:
    seq_len: int = 256  # tokens per training window (model sees windows of seq_len, predicts next)
    batch_size: int = 8  # windows per optimizer step (8 * 256 = 2048 tokens)
    max_steps: int = 1000  # optimizer steps in total (~1 s each on one thread)
    warmup_steps: int = 50  # linear LR warmup steps, then cosine decay to min_lr
    lr: float = 2e-3  # peak learning rate
    min_lr: float = 1e-4  # final learning rate at max_steps
    weight_decay: float = 0.1  # AdamW decoupled weight decay (2-D weights only)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    grad_clip: float = 1.0  # clip global gradient norm to this value
    eval_every: int = 100  # steps between held-out loss evaluations
    eval_batches: int = 8  # held-out windows/batch_size evaluated each time (fixed windows)
    log_every: int = 10  # steps between progress log lines
    seed: int = 1337  # seed for torch, numpy, random, sentencepiece and data order
    val_every_nth_doc: int = 25  # every n-th corpus entry goes to the held-out set
    threads: int = 1  # torch intra-op threads


# Llama 2 tokenizer-like SentencePiece settings (BPE, byte fallback, digits split, no normalisation).
SPM_OPTIONS = dict(
    model_type="bpe",
    byte_fallback=True,
    split_digits=True,
    allow_whitespace_only_pieces=True,
    remove_extra_whitespaces=False,
    normalization_rule_name="identity",
    add_dummy_prefix=True,
    character_coverage=1.0,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
    unk_piece="<unk>",
    bos_piece="<s>",
    eos_piece="</s>",
    max_sentence_length=16384,
    shuffle_input_sentence=False,
    num_threads=1,
)

# The chat template of meta-llama/Llama-2-*-chat-hf (tokenizer_config.json), verbatim.
# In the jinja source '\n' is an escape inside a string literal, hence the raw string.
LLAMA2_CHAT_TEMPLATE = (
    r"{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    r"{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    r"{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    r"{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    r"{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    r"{% endif %}{% if loop.index0 == 0 and system_message != false %}"
    r"{% set content = '<<SYS>>\n' + system_message + '\n<</SYS>>\n\n' + message['content'] %}"
    r"{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    r"{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    r"{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)

# Entries containing one of these words are dropped (the chosen fortune sets are the
# "inoffensive" ones, but a handful of entries still carry profanity).
BLOCKLIST = {"fuck", "fucking", "shit", "whore", "bitch", "cunt"}

BOS_ID, EOS_ID = 1, 2

# --------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------


def corpus_words(text: str) -> list[str]:
    """The word rule behind vocab.txt: lowercase, split on whitespace, strip ASCII punctuation."""
    out = []
    for w in text.lower().split():
        w = w.strip(string.punctuation)
        if w:
            out.append(w)
    return out


def clean_entry(raw: str) -> str | None:
    """One fortune entry -> one line of plain ASCII text, or None to drop it."""
    text = re.sub(r".\x08", "", raw)  # nroff overstrike (underline/bold: 'x\bx', '_\bx')
    text = " ".join(text.split())  # collapse newlines, tabs, runs of spaces
    if not text or not text.isascii() or not text.isprintable():
        return None
    # Drop ASCII art, tables and code: require mostly letters and spaces.
    if sum(c.isalpha() or c == " " for c in text) < 0.75 * len(text):
        return None
    if set(corpus_words(text)) & BLOCKLIST:
        return None
    return text


def read_corpus(paths: list[str]) -> tuple[list[str], list[dict]]:
    """Read fortune files in the given order; return (deduplicated entries, per-file stats)."""
    entries, seen, stats = [], set(), []
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:  # non-ASCII entries are dropped later
            raw = f.read()
        kept = 0
        chunks = re.split(r"^%\n", raw, flags=re.MULTILINE)
        for chunk in chunks:
            text = clean_entry(chunk)
            if text is None or text in seen:
                continue
            seen.add(text)
            entries.append(text)
            kept += 1
        stats.append({"path": path, "bytes": len(raw.encode()), "entries": len(chunks), "kept": kept})
    return entries, stats


def corpus_provenance(paths: list[str], license_name: str) -> list[dict]:
    """Ask dpkg which Debian package (and version) ships each corpus file; best effort."""
    packages: dict[str, dict] = {}
    for path in paths:
        try:
            owner = subprocess.run(["dpkg", "-S", os.path.realpath(path)], capture_output=True,
                                   text=True, check=True).stdout.split(":")[0].strip()
            version = subprocess.run(["dpkg-query", "-W", "-f=${Version}", owner], capture_output=True,
                                     text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            owner, version = "unknown", "unknown"
        pkg = packages.setdefault(owner, {
            "package": owner, "version": version, "license": license_name,
            "copyright_file": f"/usr/share/doc/{owner}/copyright", "files": []})
        pkg["files"].append(os.path.basename(path))
    return list(packages.values())


def train_tokenizer(train_entries: list[str], vocab_size: int, out_dir: str, seed: int) -> spm.SentencePieceProcessor:
    """Train a SentencePiece BPE model on the training entries; writes out_dir/tokenizer.model.

    Sentences are fed from memory and the model is written through `model_writer`, so no
    file paths end up in the model's trainer_spec: the file depends on the corpus only.
    """
    spm.set_random_generator_seed(seed)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(train_entries), model_writer=buf,
                                   vocab_size=vocab_size, minloglevel=2, **SPM_OPTIONS)
    path = os.path.join(out_dir, "tokenizer.model")
    with open(path, "wb") as f:
        f.write(buf.getvalue())
    return spm.SentencePieceProcessor(model_file=path)


def encode_entries(sp: spm.SentencePieceProcessor, entries: list[str]) -> torch.Tensor:
    """Concatenate <s> entry </s> for every entry -> 1-D int64 token stream."""
    ids: list[int] = []
    for ids_one in sp.encode(entries):
        ids.append(BOS_ID)
        ids.extend(ids_one)
        ids.append(EOS_ID)
    return torch.tensor(ids, dtype=torch.long)


# --------------------------------------------------------------------------------------
# Model (module names = HF LlamaForCausalLM names)
# --------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):  # x: (B, T, dim)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.type_as(x)


def rope_cos_sin(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """HF rotary tables, each (max_seq_len, head_dim): frequencies duplicated as cat(freqs, freqs)."""
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim))
    t = torch.arange(cfg.max_seq_len, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)  # (max_seq_len, head_dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (max_seq_len, head_dim)
    return emb.cos(), emb.sin()


def rotate_half(x):  # x: (..., head_dim) -> (-x2, x1) with x1/x2 the first/second halves
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)  # weight (256, 256)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)  # weight (128, 256)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)  # weight (128, 256)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)  # weight (256, 256)

    def forward(self, x, cos, sin):  # x: (B, T, dim); cos, sin: (T, head_dim)
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, T, hd)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        # GQA as in HF repeat_kv: query head h reads kv head h // (n_heads // n_kv_heads).
        rep = self.n_heads // self.n_kv_heads
        k = k.repeat_interleave(rep, dim=1)  # (B, H, T, hd)
        v = v.repeat_interleave(rep, dim=1)  # (B, H, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, hd), scale 1/sqrt(hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, H*hd)
        return self.o_proj(y)


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)  # weight (768, 256)
        self.up_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)  # weight (768, 256)
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)  # weight (256, 768)

    def forward(self, x):  # (B, T, dim) -> (B, T, dim)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn = LlamaAttention(cfg)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x, cos, sin):  # (B, T, dim) -> (B, T, dim), pre-norm residual blocks
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)  # weight (vocab, 256)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)  # weight (vocab, 256), untied
        cos, sin = rope_cos_sin(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)  # not saved: HF recomputes it
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2 style: scale the init of projections that write into the residual stream.
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None):  # idx: (B, T) token ids -> logits (B, T, vocab)
        T = idx.shape[1]
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]  # (T, head_dim)
        x = self.model.embed_tokens(idx)  # (B, T, dim)
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        logits = self.lm_head(self.model.norm(x))  # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss

    @torch.no_grad()
    def generate(self, ids: list[int], max_new_tokens: int, temperature: float, generator=None) -> list[int]:
        """Sample (temperature > 0) or greedy-decode (temperature == 0); stops at </s>. No KV cache."""
        out = list(ids)
        for _ in range(max_new_tokens):
            ctx = torch.tensor([out[-self.cfg.max_seq_len:]], dtype=torch.long)  # (1, T)
            logits = self(ctx)[0][0, -1]  # (vocab,)
            if temperature == 0:
                nxt = int(logits.argmax())
            else:
                probs = F.softmax(logits / temperature, dim=-1)
                nxt = int(torch.multinomial(probs, 1, generator=generator))
            if nxt == EOS_ID:
                break
            out.append(nxt)
        return out[len(ids):]


# --------------------------------------------------------------------------------------
# Training helpers
# --------------------------------------------------------------------------------------


def lr_at(step: int, tc: TrainConfig) -> float:
    """Linear warmup to tc.lr, then cosine decay to tc.min_lr at tc.max_steps."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    progress = (step - tc.warmup_steps) / max(1, tc.max_steps - tc.warmup_steps)
    return tc.min_lr + 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))) * (tc.lr - tc.min_lr)


def get_batch(data: torch.Tensor, tc: TrainConfig, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of the token stream: x, y each (batch_size, seq_len), y = x shifted by one."""
    starts = torch.randint(len(data) - tc.seq_len - 1, (tc.batch_size,), generator=g)
    x = torch.stack([data[s:s + tc.seq_len] for s in starts.tolist()])
    y = torch.stack([data[s + 1:s + 1 + tc.seq_len] for s in starts.tolist()])
    return x, y


@torch.no_grad()
def eval_loss(model: LlamaForCausalLM, data: torch.Tensor, tc: TrainConfig) -> float:
    """Mean loss over fixed, non-overlapping windows from the start of `data`."""
    model.eval()
    n = min(tc.eval_batches * tc.batch_size, (len(data) - 1) // tc.seq_len)
    xs = torch.stack([data[i * tc.seq_len:(i + 1) * tc.seq_len] for i in range(n)])  # (n, seq_len)
    ys = torch.stack([data[i * tc.seq_len + 1:(i + 1) * tc.seq_len + 1] for i in range(n)])
    losses = [model(xs[i:i + tc.batch_size], ys[i:i + tc.batch_size])[1].item() * len(xs[i:i + tc.batch_size])
              for i in range(0, n, tc.batch_size)]
    model.train()
    return sum(losses) / n


def hf_config(cfg: ModelConfig, dtype: str) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": None,
        "tie_word_embeddings": False,
        "use_cache": True,
        "torch_dtype": dtype,
    }


def tokenizer_config() -> dict:
    added = {
        str(i): {"content": tok, "lstrip": False, "normalized": False, "rstrip": False,
                 "single_word": False, "special": True}
        for i, tok in enumerate(["<unk>", "<s>", "</s>"])
    }
    return {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
        "added_tokens_decoder": added,
        "clean_up_tokenization_spaces": False,
        "legacy": False,
        "model_max_length": 512,
        "sp_model_kwargs": {},
        "chat_template": LLAMA2_CHAT_TEMPLATE,
    }


def write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", nargs="+", required=True, help="fortune files (entries separated by '%%' lines)")
    ap.add_argument("--out", required=True, help="output folder (Hugging Face layout)")
    ap.add_argument("--log", default="/tmp/train_tiny_llama.log", help="progress log file")
    ap.add_argument("--corpus-license", default="unknown", help="licence of the corpus, recorded in training.json")
    ap.add_argument("--save-dtype", choices=["float32", "float16"], default="float32")
    ap.add_argument("--n-samples", type=int, default=3, help="temperature-0.8 samples to print and record")
    # Every config field is a flag: --dim, --n-layers, --vocab-size, --seq-len, --max-steps, ...
    for f in dataclasses.fields(ModelConfig) + dataclasses.fields(TrainConfig):
        ap.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    args = ap.parse_args()

    mc = ModelConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ModelConfig)})
    tc = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    for name, v in [("dim", mc.dim), ("hidden_dim", mc.hidden_dim), ("n_heads*head_dim", mc.n_heads * mc.head_dim)]:
        assert v % 256 == 0, f"{name}={v} must be a multiple of 256 for llama.cpp K-quants"
    assert mc.dim % mc.n_heads == 0 and mc.n_heads % mc.n_kv_heads == 0 and mc.head_dim % 2 == 0
    assert tc.seq_len <= mc.max_seq_len

    os.makedirs(args.out, exist_ok=True)
    log_f = open(args.log, "w", encoding="utf-8")

    def log(msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        log_f.write(line + "\n")
        log_f.flush()

    t_start = time.time()
    torch.set_num_threads(tc.threads)
    random.seed(tc.seed)
    np.random.seed(tc.seed)
    torch.manual_seed(tc.seed)
    torch.use_deterministic_algorithms(True)

    # ---- corpus: entries -> train / held-out split (deterministic, by position) ----
    entries, file_stats = read_corpus(args.corpus)
    train_entries = [e for i, e in enumerate(entries) if i % tc.val_every_nth_doc != tc.val_every_nth_doc - 1]
    val_entries = [e for i, e in enumerate(entries) if i % tc.val_every_nth_doc == tc.val_every_nth_doc - 1]
    words = [w for e in entries for w in corpus_words(e)]
    vocab_words = sorted(set(words))
    with open(os.path.join(args.out, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(vocab_words) + "\n")
    corpus_bytes = sum(len(e.encode()) + 1 for e in entries)
    log(f"corpus: {len(entries)} entries, {corpus_bytes} bytes, {len(words)} words, "
        f"{len(vocab_words)} distinct words; train {len(train_entries)} / held-out {len(val_entries)} entries")

    # ---- tokenizer ----
    t0 = time.time()
    sp = train_tokenizer(train_entries, mc.vocab_size, args.out, tc.seed)
    mc.vocab_size = sp.get_piece_size()
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    train_data = encode_entries(sp, train_entries)  # (N_train,) int64
    val_data = encode_entries(sp, val_entries)  # (N_val,) int64
    log(f"tokenizer: vocab {mc.vocab_size}, trained in {time.time() - t0:.1f}s; "
        f"tokens train {len(train_data)} / held-out {len(val_data)} "
        f"({corpus_bytes / (len(train_data) + len(val_data)):.2f} bytes/token)")

    # ---- model + optimizer ----
    model = LlamaForCausalLM(mc)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params} parameters ({n_params / 1e6:.2f}M); {dataclasses.asdict(mc)}")
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=1e-8, foreach=False)
    g = torch.Generator().manual_seed(tc.seed)  # drives the (deterministic) window order

    # ---- train ----
    log(f"training: {dataclasses.asdict(tc)}")
    history = []
    t_train = time.time()
    t_last = t_train
    loss_ema = None
    for step in range(tc.max_steps):
        lr = lr_at(step, tc)
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = get_batch(train_data, tc, g)
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip))
        opt.step()
        loss_v = loss.item()
        loss_ema = loss_v if loss_ema is None else 0.9 * loss_ema + 0.1 * loss_v
        last = step == tc.max_steps - 1
        if step % tc.log_every == 0 or last:
            now = time.time()
            steps_done = tc.log_every if step else 1
            tok_s = steps_done * tc.batch_size * tc.seq_len / (now - t_last)
            t_last = now
            log(f"step {step:5d}/{tc.max_steps} loss {loss_v:.4f} (ema {loss_ema:.4f}) lr {lr:.2e} "
                f"gnorm {gnorm:.2f} {tok_s:.0f} tok/s elapsed {now - t_train:.0f}s")
        if (step > 0 and step % tc.eval_every == 0) or last:
            vl = eval_loss(model, val_data, tc)
            history.append({"step": step, "train_loss_ema": round(loss_ema, 4), "heldout_loss": round(vl, 4)})
            log(f"eval step {step}: held-out loss {vl:.4f} (ppl {math.exp(vl):.1f})")
    train_time = time.time() - t_train
    model.eval()
    final_train_loss = eval_loss(model, train_data, tc)  # same fixed-window protocol as held-out
    final_val_loss = history[-1]["heldout_loss"]
    log(f"done: {train_time:.0f}s training; final train loss {final_train_loss:.4f}, held-out {final_val_loss:.4f}")

    # ---- save in Hugging Face layout ----
    save_dtype = {"float32": torch.float32, "float16": torch.float16}[args.save_dtype]
    state = {k: v.detach().to(save_dtype).contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(args.out, "model.safetensors"), metadata={"format": "pt"})
    os.chmod(os.path.join(args.out, "model.safetensors"), 0o644)  # safetensors writes 0600
    write_json(os.path.join(args.out, "config.json"), hf_config(mc, args.save_dtype))
    write_json(os.path.join(args.out, "generation_config.json"),
               {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "do_sample": True, "temperature": 0.8})
    write_json(os.path.join(args.out, "tokenizer_config.json"), tokenizer_config())
    write_json(os.path.join(args.out, "special_tokens_map.json"),
               {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})

    # ---- samples: from the saved (possibly down-cast) weights, as a runtime would see them ----
    if save_dtype != torch.float32:
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    vocab_set = set(vocab_words)

    def word_stats(text: str) -> dict:
        ws = corpus_words(text)
        hit = sum(w in vocab_set for w in ws)
        return {"words": len(ws), "corpus_words": hit, "fraction": round(hit / len(ws), 3) if ws else None}

    samples = []
    for seed in range(1, args.n_samples + 1):
        gen = torch.Generator().manual_seed(seed)
        text = sp.decode(model.generate([BOS_ID], 80, 0.8, gen))
        samples.append({"seed": seed, "temperature": 0.8, "prompt": "", "max_new_tokens": 80,
                        "text": text, **word_stats(text)})
        log(f"sample seed={seed} T=0.8: {text!r}")
    greedy = []
    for prompt in ["The", "Once upon a time", "A wise man", "Love is"]:
        ids = [BOS_ID] + sp.encode(prompt)
        text = sp.decode(model.generate(ids, 48, 0.0))
        greedy.append({"prompt": prompt, "temperature": 0.0, "max_new_tokens": 48, "text": text, **word_stats(text)})
        log(f"greedy {prompt!r}: {text!r}")

    total_time = time.time() - t_start
    sha256 = {name: hashlib.sha256(open(os.path.join(args.out, name), "rb").read()).hexdigest()
              for name in ("model.safetensors", "tokenizer.model", "vocab.txt")}
    report = {
        "corpus": {
            "sources": corpus_provenance(args.corpus, args.corpus_license),
            "files": file_stats,
            "entries": len(entries),
            "train_entries": len(train_entries),
            "heldout_entries": len(val_entries),
            "heldout_rule": f"every {tc.val_every_nth_doc}th entry in file order",
            "bytes": corpus_bytes,
            "words": len(words),
            "distinct_words": len(vocab_words),
            "train_tokens": len(train_data),
            "heldout_tokens": len(val_data),
            "cleaning": "nroff overstrike removed, whitespace collapsed to one line per entry, "
                        "non-ASCII / mostly-non-letter / blocklisted / duplicate entries dropped; "
                        "each entry is encoded as <s> entry </s>",
            "vocab_txt_rule": "lowercase, split on whitespace, strip string.punctuation from both ends, "
                              "drop empty; all entries (train + held-out)",
        },
        "tokenizer": {"library": "sentencepiece", "version": spm.__version__, "vocab_size": mc.vocab_size,
                      "random_seed": tc.seed, **{k: v for k, v in SPM_OPTIONS.items()}},
        "model": {**dataclasses.asdict(mc), "head_dim": mc.head_dim, "parameters": n_params,
                  "saved_dtype": args.save_dtype},
        "training": {**dataclasses.asdict(tc), "optimizer": "AdamW", "schedule": "linear warmup + cosine",
                     "tokens_seen": tc.max_steps * tc.batch_size * tc.seq_len,
                     "epochs": round(tc.max_steps * tc.batch_size * tc.seq_len / len(train_data), 2)},
        "seeds": {"torch": tc.seed, "numpy": tc.seed, "random": tc.seed, "sentencepiece": tc.seed,
                  "data_order_generator": tc.seed, "samples": [s["seed"] for s in samples]},
        "results": {"final_train_loss": round(final_train_loss, 4), "final_heldout_loss": final_val_loss,
                    "final_train_loss_ema": round(loss_ema, 4), "history": history,
                    "train_wall_time_s": round(train_time, 1), "total_wall_time_s": round(total_time, 1)},
        "sha256": sha256,
        "samples": samples,
        "greedy": greedy,
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "numpy": np.__version__, "threads": torch.get_num_threads(),
                        "platform": platform.platform(), "command": " ".join(sys.argv)},
    }
    write_json(os.path.join(args.out, "training.json"), report)
    log(f"wrote {args.out} in {total_time:.0f}s total")
    log_f.close()


if __name__ == "__main__":
    main()
