"""
ex6_modern_gpt.py: ex4's character GPT trained with today's recipe (modded-nanogpt's speedrun, nanochat), each piece
a flag, so that every piece can be measured by taking it out; every flag off is ex4's model and optimizer exactly.

Changes from ex4_mqa_swiglu.py:
- RMSNorm in place of LayerNorm (--norm): RMSNorm, make_norm(), in Block and GPT.
- QK-norm (--qk_norm): queries and keys RMS-normalised per head, with learned gains, before the scores:
  CausalSelfAttention (q_norm, k_norm, qkv).
- ReLU^2 (--mlp relu2): MLP, c_proj(relu(c_fc(x))^2), ex1's 4 n_embd wide.
- Residual scaling (--residual_scale): x = a_l x + b_l x0 before block l, x0 the embeddings, learned scalars (a_l 1,
  b_l 0 at the start): Block.lambdas, Block.forward, GPT.forward.
- Zero-initialised output projections (--zero_init): every block starts as the identity; an untied head of its own
  (--untied_head), zero-initialised too; a tanh soft-cap on the logits (--softcap C): GPT.__init__, GPT.forward.
- Muon for the blocks' matrices, AdamW for the rest (--optimizer, --muon_lr): newton_schulz() in float32, Muon,
  MuonWithAdamW, GPT.configure_optimizer, train() (each group's lr_scale).
- A warmup, stable, decay schedule (--schedule wsd, --decay_frac): wsd_lr(), chosen in train().
- Settings for the CPU speedrun (benchmarks/bench_ex6.py), the fastest to val 1.90 found: 2 layers (ex4: 4), batch 24
  (12), 200 iterations (700), warmup 20 (100), learning rate 1e-2 to 1e-3 (3e-3 to 3e-4), evaluation every 50 (250).

Run:     python ex6_modern_gpt.py                   (the whole recipe)
One at a time: take one piece out (--norm layernorm, --no-qk_norm, --mlp swiglu, --no-residual_scale, --no-zero_init,
         --no-untied_head, --softcap 0, --optimizer adamw, --schedule cosine); all out, at ex4's settings, is ex4:
         python ex6_modern_gpt.py --norm layernorm --no-qk_norm --mlp swiglu --no-residual_scale --no-zero_init \
             --no-untied_head --softcap 0 --optimizer adamw --schedule cosine \
             --n_layer 4 --batch_size 12 --max_iters 700 --warmup_iters 100 --learning_rate 3e-3 --min_lr 3e-4 \
             --eval_interval 250
Sample:  python ex6_modern_gpt.py --prompt "ROMEO:"
Parent:  ex4_mqa_swiglu.py (diff -u ex4_mqa_swiglu.py ex6_modern_gpt.py)
Result:  RESULTS.md, "ex6_modern_gpt.py".
"""

import argparse
import csv
import inspect
import math
import os
import re
import signal
import sys
import tempfile
import time
import urllib.request
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from typing import Literal, get_args

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

SCRIPT = os.path.splitext(os.path.basename(__file__))[0]
DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
DATA_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


@dataclass
class Config:
    # I/O
    out_dir: str = f"out/{SCRIPT}"  # checkpoint and log.csv go here
    data: str = ""  # a local UTF-8 text file to train on; empty: TinyShakespeare, downloaded into data/
    resume: bool = False  # continue training from out_dir/ckpt.pt, the latest saved state
    overwrite: bool = False  # start over in an out_dir holding this script's checkpoint (replaces ckpt.pt and best.pt)
    eval_interval: int = 50  # evaluate and save ckpt.pt every this many iterations (best.pt when val improves)
    eval_iters: int = 200  # batches per split in each evaluation
    log_interval: int = 10  # print and log the training loss every this many iterations
    wandb: bool = False  # also log to Weights & Biases
    wandb_project: str = "gpt-ladder"  # wandb project name
    # model
    n_layer: int = 2  # transformer blocks
    n_head: int = 4  # attention heads per block
    n_embd: int = 128  # embedding width
    block_size: int = 64  # context length in tokens
    dropout: float = 0.0  # dropout probability (0.2 is a good value for the larger GPU model)
    bias: bool = False  # biases in Linear and LayerNorm layers
    flash: bool = True  # fused scaled_dot_product_attention instead of the explicit softmax(QK^T)V
    n_kv_head: int = 1  # key/value heads, each shared by n_head/n_kv_head query heads: 1 is MQA, n_head is MHA
    score: Literal["scaled_dot", "multiplicative", "additive"] = "scaled_dot"  # q.k/sqrt(hs), x A x or w.tanh(q + k)
    pos: Literal["rope", "learned", "sinusoidal", "none"] = "rope"  # rotary (q, k), ex1's table, sin/cos table or none
    window: int = 0  # sliding-window attention: a token sees itself and the window-1 tokens before it; 0: full causal
    window_impl: Literal["auto", "mask", "blocked"] = "auto"  # how a window is computed (auto: blocked if T >= 4 W)
    mlp: Literal["gelu", "quickgelu", "swiglu", "relu2"] = "relu2"  # ex1's, x sigmoid(1.702 x), gated SiLU, relu(x)^2
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"  # x / rms(x) * g, or ex4's LayerNorm (mean and variance)
    qk_norm: bool = True  # RMS-normalise each head's queries and keys (learned gains) before the scores
    residual_scale: bool = True  # x = a_l x + b_l x0 before block l (x0: the embeddings); learned, from 1 and 0
    zero_init: bool = True  # zero the output projections (c_proj) and an untied head: each block starts as the identity
    untied_head: bool = True  # an output head of its own instead of the token embeddings (weight tying)
    softcap: float = 15.0  # logits = softcap * tanh(logits / softcap), within +-softcap; 0: logits as they are
    # training
    seed: int = 1337  # seeds the weights, the batches, dropout and sampling
    batch_size: int = 24  # sequences per micro-batch
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    max_iters: int = 200  # optimizer steps
    learning_rate: float = 1e-2  # peak learning rate
    min_lr: float = 1e-3  # learning rate at the end of the decay
    warmup_iters: int = 20  # linear warmup steps
    lr_decay_iters: int = 0  # the decay ends here (cosine: its length); 0 means max_iters
    weight_decay: float = 0.1  # AdamW's and Muon's weight decay, applied to matrices only
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.99  # AdamW beta2 (0.99 since there are few tokens per step)
    grad_clip: float = 1.0  # clip the gradient norm to this; 0 disables
    optimizer: Literal["muon", "adamw"] = "muon"  # Muon for the blocks' matrices and AdamW for the rest, or AdamW alone
    muon_lr: float = 0.02  # Muon's peak learning rate, following the schedule as learning_rate does
    schedule: Literal["wsd", "cosine"] = "wsd"  # warmup, stable, linear decay to min_lr; or ex4's cosine decay
    decay_frac: float = 0.3  # --schedule wsd: the last fraction of lr_decay_iters (0: max_iters) that decays
    # system
    device: str = "auto"  # auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bfloat16 (else float16) on cuda, float32
    compile: bool = False  # torch.compile the model (worth it on a GPU)
    threads: int = 0  # CPU threads (torch.set_num_threads); 0: OMP_NUM_THREADS if set, else the cores idle at the start
    # sampling
    prompt: str = ""  # if set, skip training: load out_dir/best.pt and continue this text (again: one batch of them)
    prompt_file: str = ""  # like --prompt, one prompt a line: the prompts are left-padded into one batch
    num_samples: int = 1  # samples to draw
    max_new_tokens: int = 500  # tokens per sample
    temperature: float = 0.8  # <1 sharper, >1 more random
    top_k: int = 200  # sample only among the k most likely tokens; 0 for all
    kv_cache: bool = True  # generate with a key/value cache; --no-kv_cache recomputes the whole context every step

    def mistakes(self):
        """Settings no run can use, a message each (parse_args has refused every negative number already)."""
        ones = ["n_layer", "n_head", "n_kv_head", "n_embd", "block_size", "batch_size", "gradient_accumulation_steps"]
        ones += ["eval_interval", "eval_iters", "log_interval", "num_samples"]
        yield from (f"--{n} must be at least 1" for n in ones if getattr(self, n) < 1)
        yield from (f"--{n} must be below 1" for n in ("dropout", "beta1", "beta2") if getattr(self, n) >= 1)
        if self.n_embd % self.n_head:
            yield f"--n_embd {self.n_embd} must be divisible by --n_head {self.n_head}"
        if self.n_head % self.n_kv_head:
            yield f"--n_head {self.n_head} must be divisible by --n_kv_head {self.n_kv_head}"
        rotated = self.n_embd if self.score == "multiplicative" else self.n_embd // self.n_head  # RoPE's pairs
        if self.pos == "rope" and rotated % 2:
            yield f"--pos rope rotates pairs of channels: it needs an even width, not {rotated}"
        if self.pos == "sinusoidal" and self.n_embd % 2:
            yield f"--pos sinusoidal needs an even --n_embd, not {self.n_embd}"
        if self.score == "additive" and self.pos == "rope":
            yield "--score additive cannot see rotary positions (tanh(q + k) misses their angle); use another --pos"
        if self.qk_norm and self.score == "multiplicative":
            yield "--score multiplicative has no keys for --qk_norm to normalise (x A x); add --no-qk_norm"
        if self.learning_rate == 0:
            yield "--learning_rate must be above 0"
        if self.optimizer == "muon" and self.muon_lr == 0:
            yield "--muon_lr must be above 0 (or --optimizer adamw)"
        if self.decay_frac > 1:
            yield f"--decay_frac {self.decay_frac} is a fraction of the iterations: between 0 and 1"


RESUMED = ("n_layer", "n_head", "n_embd", "block_size", "bias", "data")  # --resume takes these from ckpt.pt
RESUMED += ("n_kv_head", "score", "pos", "window", "mlp")  # and this script's architecture switches
RESUMED += ("norm", "qk_norm", "residual_scale", "untied_head", "softcap", "optimizer")  # the recipe's, its optimizer


# ----------------------------------------------------------------------------------------------------------
# Data


def load_text(cfg):
    """The training text: --data, or TinyShakespeare (downloaded into data/ the first time)."""
    path = cfg.data or os.path.join(DATA_DIR, "tinyshakespeare.txt")
    if cfg.data and not os.path.isfile(path):
        die(f"--data {path}: " + ("a folder; give a UTF-8 text file" if os.path.isdir(path) else "no such file"))
    if not os.path.isfile(path):
        download(DATA_URL, path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError:
        die(f"{path} is not UTF-8 text")
    if "\0" in text:
        die(f"{path} looks like a binary file (it holds NUL characters); give a UTF-8 text file")
    return text


class CharTokenizer:
    name = "char"  # what a checkpoint's "tokenizer" says

    def __init__(self, chars):
        self.chars = list(chars)
        self.stoi = {c: i for i, c in enumerate(self.chars)}

    def encode(self, s):
        if bad := sorted(set(s) - self.stoi.keys()):
            die(f"character(s) {''.join(bad)!r} not in this model's vocabulary; use characters of its training text")
        return [self.stoi[c] for c in s]

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)


class DataLoader:
    """The corpus as one tensor of token ids; 90% train, 10% val; batches start at random offsets."""

    def __init__(self, ids, cfg, device):
        n = int(0.9 * len(ids))
        self.splits = {"train": ids[:n], "val": ids[n:]}
        for split, data in self.splits.items():  # a batch starts at a random offset: block_size + 1 tokens at least
            if len(data) <= cfg.block_size:
                die(f"the {split} split has {len(data)} tokens, too few for --block_size {cfg.block_size}; add text")
        self.cfg, self.device = cfg, device
        self.offsets = torch.arange(cfg.block_size + 1)

    def get_batch(self, split, generator):
        data = self.splits[split]
        ix = torch.randint(len(data) - self.cfg.block_size, (self.cfg.batch_size, 1), generator=generator)
        xy = data[ix + self.offsets]  # (B, T+1) gathered in one indexing op
        x, y = xy[:, :-1], xy[:, 1:]
        if self.device.type == "cuda":  # pinned memory lets the copy overlap with compute
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)


# ----------------------------------------------------------------------------------------------------------
# Model


def attention(q, k, v, mask=None, flash=True, dropout_p=0.0, scale=None, score_vector=None):
    """softmax(q k^T * scale) v, scale 1/sqrt(hs) unless given, for q (..., n_head, Tq, hs) and k, v (..., n_kv_head,
    Tk, hs): each key/value head serves a group of n_head/n_kv_head consecutive query heads. mask: True where allowed,
    (Tq, Tk) or (..., 1, Tq, Tk); None is causal (Tq == Tk), or one query that sees every key (Tq == 1).
    score_vector (n_head, hs): Bahdanau's additive scores w.tanh(q_t + k_j) in place of the dot product, written out
    (no fused kernel has them)."""
    if flash and score_vector is None:
        gqa = k.size(-3) != q.size(-3)
        if gqa and q.is_cuda and (mask is not None or q.dtype == torch.float32):  # CUDA's GQA kernels: 16 bits, no mask
            k, v = (t.repeat_interleave(q.size(-3) // t.size(-3), dim=-3) for t in (k, v))  # else: repeat
            gqa = False
        causal = mask is None and q.size(-2) > 1  # a single query sees every key: neither mask nor causal
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal, scale=scale, enable_gqa=gqa
        )
    *batch, H, Tq, hs = q.shape
    n_kv_head, Tk = k.size(-3), k.size(-2)
    if mask is None:
        mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tq)
    q = q.view(*batch, n_kv_head, H // n_kv_head, Tq, hs)  # the query heads in groups; k and v broadcast over a group
    k, v = k.unsqueeze(-3), v.unsqueeze(-3)
    if mask.dim() >= 3:  # (..., 1, Tq, Tk): also broadcast over the query heads of a group
        mask = mask.unsqueeze(-3)
    w = None if score_vector is None else score_vector.view(n_kv_head, H // n_kv_head, 1, hs)
    att = scores(q, k, scale, w).masked_fill(~mask, float("-inf"))
    att = F.dropout(F.softmax(att, dim=-1), dropout_p)
    return (att @ v).view(*batch, H, Tq, v.size(-1))


ADDITIVE_BLOCK = 1 << 22  # additive scores: numbers in one block of tanh(q_t + k_j)


def scores(q, k, scale=None, w=None):
    """Attention scores before the mask, (..., Tq, Tk) for q (..., Tq, hs) and k (..., Tk, hs): q.k * scale (1/sqrt(hs)
    unless given), or with w (..., 1, hs) Bahdanau's additive w.tanh(q_t + k_j). Its (Tq, Tk, hs) sum is made a block
    of queries at a time and remade in the backward pass (checkpoint) instead of kept, so memory holds one block."""
    if w is None:
        return (q @ k.transpose(-2, -1)) * (scale or 1 / math.sqrt(q.size(-1)))
    rows = max(1, ADDITIVE_BLOCK // (q[..., 0, 0].numel() * k.size(-2) * q.size(-1)))  # queries per block

    def block(qb):
        return (torch.tanh(qb.unsqueeze(-2) + k.unsqueeze(-3)) @ w.unsqueeze(-1)).squeeze(-1)

    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    return torch.cat(
        [checkpoint(block, qb, use_reentrant=False) if grad else block(qb) for qb in q.split(rows, dim=-2)], dim=-2
    )


def angles(pos, dim):
    """pos * 10000^(-2i/dim) for i < dim/2, (..., T, dim/2): the frequencies of both sinusoidal and rotary positions."""
    inv_freq = 10000.0 ** (-torch.arange(0, dim, 2, device=pos.device, dtype=torch.float32) / dim)
    return pos.float().unsqueeze(-1) * inv_freq


def sinusoidal(pos, dim):
    """The fixed encoding of "Attention Is All You Need": PE(p, 2i) = sin(p / 10000^(2i/dim)), PE(p, 2i+1) = cos."""
    angle = angles(pos, dim)
    return torch.stack([angle.sin(), angle.cos()], dim=-1).flatten(-2)  # sin at 2i, cos at 2i+1


def rotate(x, pos):
    """Rotary position embedding: rotate each pair (x_i, x_(i+hs/2)) of x (..., T, hs) by the angle p * 10000^(-2i/hs)
    for the positions p in pos (..., T); then q.k depends on the two positions only through their difference."""
    angle = angles(pos, x.size(-1))
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def window_mask(q_pos, k_pos, window):
    """(..., Tq, Tk) boolean mask, True where the query at q_pos may look at the key at k_pos: itself and earlier
    keys, only the window-1 before it when window > 0, never a negative position (padding, an empty cache slot).
    A padding query (negative position) sees only itself, so that no row of scores is all -inf."""
    q_pos, k_pos = q_pos.unsqueeze(-1), k_pos.unsqueeze(-2)
    ok = (k_pos <= q_pos) & (k_pos >= 0)
    if window:
        ok = ok & (k_pos > q_pos - window)
    return ok | ((q_pos < 0) & (k_pos == q_pos))


def blocked_window_attention(
    q, k, v, window, flash=True, dropout_p=0.0, scale=None, score_vector=None, pos=None, block=0
):
    """Sliding-window causal attention in time and memory proportional to T*W instead of T*T. The T queries are cut
    into blocks of b queries (block; by default W/4, at least 16); a query sees at most W-1 keys back, so a block needs
    only the W keys before it and its own b: all blocks at once, each a (b, W + b) attention with a band mask. The
    smaller b, the fewer masked keys are computed (W + b per query, W of them used), but the more blocks. Without
    padding, the first W queries are plain causal attention (their window holds every key before them) and the blocks
    after them all have the same band: one (b, W + b) mask, not one per block to make and read.
    q (B, n_head, T, hs), k, v (B, n_kv_head, T, hs); pos (B, T): the tokens' positions when rows are left-padded (a
    row's first real token is 0); None, or one row as CausalSelfAttention.forward passes it: 0 to T-1."""
    B, H, T, hs = q.shape
    W, b = window, block or min(window, max(16, window // 4))
    band = pos is None or pos.size(0) == 1  # no padding: every block after the first W queries sees the same band
    start, head = (W if band else 0), None  # the first query column in blocks, and the queries before it
    if band:  # causal attention: the first W queries' windows hold every key before them
        head = attention(q[:, :, :W], k[:, :, :W], v[:, :, :W], None, flash, dropout_p, scale, score_vector)
    if T <= start:
        return head
    n = -(-(T - start) // b)  # n blocks
    pad = start + n * b - T  # padding at the end of the last block
    q = F.pad(q[:, :, start:], (0, 0, 0, pad)).view(B, H, n, b, hs).transpose(1, 2).reshape(B * n, H, b, hs)
    # block i's keys and values: columns start + i*b - W to start + i*b + b - 1 (overlapping windows, copied); without
    # the causal head, W zeros in front for the first blocks
    k, v = (F.pad(t, (0, 0, W - start, pad)).unfold(2, W + b, b).permute(0, 2, 1, 4, 3) for t in (k, v))
    k, v = (t.reshape(B * n, -1, W + b, t.size(-1)) for t in (k, v))
    col = start + torch.arange(n * b, device=q.device).view(n, b)  # each query's column
    key_col = col[:, :1] - W + torch.arange(W + b, device=q.device)  # each block's key columns
    if band:
        mask = window_mask(col[0], key_col[0], window)  # (b, W + b), broadcast over the blocks
    else:
        shift = pos[:, :1].view(-1, 1, 1)  # a row's position minus its column: minus its padding
        mask = window_mask(col + shift, key_col + shift, window).view(B * n, 1, b, W + b)  # a mask per block
    y = attention(q, k, v, mask, flash, dropout_p, scale, score_vector)
    y = y.view(B, n, H, b, -1).transpose(1, 2).reshape(B, H, n * b, -1)[:, :, : T - start]
    return y if head is None else torch.cat([head, y], dim=2)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * g: LayerNorm without subtracting the mean and without a bias (Zhang and Sennrich
    2019; Llama, modded-nanogpt). In float32, as autocast runs LayerNorm, and returned in x's dtype."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x.float(), (x.size(-1),), self.weight, self.eps).type_as(x)


def make_norm(cfg, dim):
    """The norm before each sublayer and the head: RMSNorm, or ex4's LayerNorm."""
    return RMSNorm(dim) if cfg.norm == "rmsnorm" else nn.LayerNorm(dim, bias=cfg.bias)


class CausalSelfAttention(nn.Module):
    """One projection makes the n_head queries and the n_kv_head keys and values; each key/value head is shared by
    a group of n_head/n_kv_head query heads (grouped-query attention; multi-query when n_kv_head is 1).
    --score multiplicative: s(t, j) = x_t A x_j with a full n_embd x n_embd matrix A per head (Luong's "general"):
    the queries are x A, the one key head is x itself, and the projection makes only the values.
    --score additive: s(t, j) = w.tanh(q_t + k_j) with the usual queries and keys and a vector w per head (Bahdanau)."""

    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.n_kv_head, self.dropout, self.flash = cfg.n_head, cfg.n_kv_head, cfg.dropout, cfg.flash
        self.score, self.rope, self.window, self.window_impl = cfg.score, cfg.pos == "rope", cfg.window, cfg.window_impl
        hs = cfg.n_embd // cfg.n_head
        self.kv_size = cfg.n_kv_head * hs
        self.qk_size = 0 if cfg.score == "multiplicative" else cfg.n_embd + self.kv_size  # the values' come after
        self.c_attn = nn.Linear(cfg.n_embd, self.qk_size + self.kv_size, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        if cfg.score == "multiplicative":  # std 0.02^2: the scores of x A x start as small as those of x Wq^T Wk x
            self.A = nn.Parameter(torch.randn(cfg.n_head, cfg.n_embd, cfg.n_embd) * 0.02**2)
        if cfg.score == "additive":
            self.score_vector = nn.Parameter(torch.randn(cfg.n_head, hs) * 0.02)
        # QK-norm (Henry et al. 2020; modded-nanogpt's 15.2-minute record): every query and key of unit RMS times a
        # learned gain, so that the scores cannot grow with the weights
        self.q_norm, self.k_norm = (RMSNorm(hs) if cfg.qk_norm else None for _ in "qk")

    def qkv(self, x, pos):
        """The queries (B, n_head, T, hs), keys and values (B, n_kv_head, T, hs) of x (B, T, C) at positions pos
        (B or 1, T); multiplicative: the queries x A are n_embd wide and the one key head is x."""
        B, T, C = x.size()
        hs = C // self.n_head
        qk, v = self.c_attn(x).split([self.qk_size, self.kv_size], dim=2)
        v = v.view(B, T, self.n_kv_head, hs).transpose(1, 2)
        if self.score == "multiplicative":
            q, k = torch.einsum("btc,hcd->bhtd", x, self.A), x.unsqueeze(1)  # (B, n_head, T, C), (B, 1, T, C)
        else:
            # (B, T, heads * head_size) -> (B, heads, T, head_size): n_head query heads, then n_kv_head key heads
            qk = qk.view(B, T, self.n_head + self.n_kv_head, hs).transpose(1, 2)
            q, k = qk.split([self.n_head, self.n_kv_head], dim=1)
        if self.q_norm is not None:  # before the rotation, which keeps the norms
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope:
            q, k = rotate(q, pos.unsqueeze(1)), rotate(k, pos.unsqueeze(1))
        return q, k, v

    def forward(self, x, pos, cache=None):
        """pos (B or 1, T): the positions of x's tokens."""
        B, T, C = x.size()
        q, k, v = self.qkv(x, pos)
        q_pos = k_pos = pos
        own = cache is None or cache.pos == 0  # the keys are x's own tokens (no cache, or the prompt), not cached ones
        if cache is not None:
            k, v, k_pos = cache.update(k, v, pos)
        k = k.expand(-1, v.size(1), -1, -1)  # multiplicative: the one key head serves every value head
        dropout_p = self.dropout if self.training else 0.0
        scale = 1.0 if self.score == "multiplicative" else None  # A learns its own scale
        score_vector = self.score_vector if self.score == "additive" else None
        blocked = self.window_impl == "blocked" or (self.window_impl == "auto" and T >= 4 * self.window)
        if self.window and own and blocked:
            y = blocked_window_attention(q, k, v, self.window, self.flash, dropout_p, scale, score_vector, pos)
        else:
            # no window or padding, and x's own keys (the causal kernel) or one new token, which sees every cached
            # key: no mask to build
            causal = (own or T == 1) and not self.window and pos.size(0) == 1
            mask = None if causal else window_mask(q_pos, k_pos, self.window).unsqueeze(1)
            y = attention(q, k, v, mask, self.flash, dropout_p, scale, score_vector)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again
        return self.resid_dropout(self.c_proj(y))


def swiglu_hidden(n_embd):
    """SwiGLU has three matrices, GELU's MLP two of width 4 n_embd: 3 * 8/3 n_embd = 2 * 4 n_embd, rounded to 16."""
    return max(16, 16 * round(8 * n_embd / 3 / 16))


def quick_gelu(x):
    """GELU's sigmoid approximation (GPT-1, CLIP): x * sigmoid(1.702 x), within 0.02 of x * Phi(x)."""
    return x * torch.sigmoid(1.702 * x)


class MLP(nn.Module):
    """ReLU^2, c_proj(relu(c_fc(x))^2) (So et al. 2021, "Primer"; modded-nanogpt's 15.2-minute record; in nanochat it
    beat SwiGLU), or ex4's SwiGLU, GELU or QuickGELU."""

    def __init__(self, cfg):
        super().__init__()
        self.kind = cfg.mlp
        hidden = swiglu_hidden(cfg.n_embd) if self.kind == "swiglu" else 4 * cfg.n_embd
        self.c_fc = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias)  # "up"
        self.c_gate = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias) if self.kind == "swiglu" else None  # "gate"
        self.c_proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)  # "down"
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        if self.kind == "swiglu":
            h = F.silu(self.c_gate(x)) * self.c_fc(x)
        elif self.kind == "relu2":
            h = F.relu(self.c_fc(x)).square()
        else:
            h = quick_gelu(self.c_fc(x)) if self.kind == "quickgelu" else F.gelu(self.c_fc(x))
        return self.dropout(self.c_proj(h))


class KVCache:
    """One layer's keys and values during generation, for n_kv_head heads only (so MQA's cache is 1/n_head of MHA's).
    size slots: block_size, or with a window a rolling buffer of W slots where column c lives in slot c % W."""

    def __init__(self, size):
        self.size, self.pos = size, 0  # pos: tokens (columns) seen so far, the column of the next one
        self.k = self.v = self.k_pos = None  # allocated on first use, with the shape, dtype and device of the keys

    def update(self, k, v, pos):
        """Store the keys and values of the new tokens at positions pos (B or 1, T); return the keys, values and
        positions they may attend to."""
        B, T = k.size(0), k.size(2)
        assert self.pos == 0 or T == 1, "after the prompt, the cache takes one token at a time"
        if self.k is None:
            self.k, self.v = (t.new_zeros(B, t.size(1), self.size, t.size(3)) for t in (k, v))
            self.k_pos = torch.full((B, self.size), -1, device=k.device)  # the position in each slot; -1 empty
        keep = min(T, self.size)  # a prompt longer than the cache leaves only its last tokens
        slots = torch.arange(self.pos + T - keep, self.pos + T, device=k.device) % self.size
        self.k.index_copy_(2, slots, k[:, :, -keep:])
        self.v.index_copy_(2, slots, v[:, :, -keep:])
        self.k_pos.index_copy_(1, slots, pos[:, -keep:].expand(B, keep))
        prompt, self.pos = self.pos == 0, self.pos + T
        if prompt:  # its tokens see each other, computed as without a cache
            return k, v, pos
        n = min(self.pos, self.size)  # slots fill from the first: a new token sees the filled ones (its window)
        return self.k[:, :, :n], self.v[:, :, :n], self.k_pos[:, :n]

    def nbytes(self):
        return 0 if self.k is None else (self.k.numel() + self.v.numel()) * self.k.element_size()


class Block(nn.Module):
    """Pre-norm: normalise the input of each sublayer, keep the residual stream untouched."""

    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = make_norm(cfg, cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = make_norm(cfg, cfg.n_embd)
        self.mlp = MLP(cfg)
        # residual scaling (modded-nanogpt's 8.2-minute record, "embedding skip connections"): (a_l, b_l), learned;
        # (1, 0) is ex4's block
        self.lambdas = nn.Parameter(torch.tensor([1.0, 0.0])) if cfg.residual_scale else None

    def forward(self, x, pos, cache=None, x0=None):
        """x0: the embeddings, the first block's input, which residual scaling mixes into every block's."""
        if self.lambdas is not None:
            x = self.lambdas[0] * x + self.lambdas[1] * x0
        x = x + self.attn(self.ln_1(x), pos, cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg, vocab_size):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(vocab_size, cfg.n_embd)  # token embeddings
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.pos == "learned" else None  # ex1's position table
        # the longest context the model reads; None (any length) when nothing depends on absolute positions: rotary or
        # no positions, and a window
        self.max_len = None if cfg.pos in ("rope", "none") and cfg.window else cfg.block_size
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = make_norm(cfg, cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, vocab_size, bias=False)
        # untied (modded-nanogpt's 10.8-minute record): the head is a matrix of its own, not the embeddings'
        if not cfg.untied_head:
            self.wte.weight = self.lm_head.weight  # weight tying: one matrix embeds and un-embeds
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by 1/sqrt(2 * n_layer)
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))
            # zero-init (modded-nanogpt's 15.2-minute record): each block adds nothing to the residual stream at first,
            # and an untied head predicts the uniform distribution; drawn first all the same, so the rest is ex4's
            if cfg.zero_init and (name.endswith("c_proj.weight") or name == "lm_head.weight"):
                nn.init.zeros_(p)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self):
        return sum(p.numel() for p in self.parameters()) - (self.wpe.weight.numel() if self.wpe is not None else 0)

    def forward(self, idx, targets=None, caches=None, pad=None, unembed=None):
        """pad (B,): padding tokens on the left of each row of idx; positions count from a row's first real token.
        unembed (C, V): lm_head's weight transposed and stored so, which generate() un-embeds with on the CPU."""
        B, T = idx.size()
        start = caches[0].pos if caches else 0  # the column of idx's first token: the tokens already in the cache
        assert self.max_len is None or start + T <= self.max_len, (
            f"sequence of {start + T} tokens is longer than block_size {self.cfg.block_size}"
        )
        pos = torch.arange(start, start + T, device=idx.device).unsqueeze(0)  # (1, T); (B, T) with padding
        if pad is not None:
            pos = pos - pad.unsqueeze(1)
        x = self.wte(idx)
        if self.cfg.pos == "learned":
            x = x + self.wpe(pos.clamp(min=0))
        if self.cfg.pos == "sinusoidal":  # as in the paper, embeddings times sqrt(n_embd), or the table drowns them
            x = x * math.sqrt(self.cfg.n_embd) + sinusoidal(pos, self.cfg.n_embd)
        x = x0 = self.drop(x)
        for block, cache in zip(self.blocks, caches or [None] * len(self.blocks)):
            x = block(x, pos, cache, x0)
        if caches is not None and targets is None:  # generating: only the last token's logits are needed
            x = x[:, -1:]
        x = self.ln_f(x)
        logits = self.lm_head(x) if unembed is None else x @ unembed
        if self.cfg.softcap:  # tanh soft-cap (Bello et al. 2016, Gemma 2; modded-nanogpt's 8.2-minute record)
            logits = self.cfg.softcap * torch.tanh(logits / self.cfg.softcap)
        loss = (
            None
            if targets is None
            else F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        )
        return logits, loss

    def configure_optimizer(self, cfg, device_type):
        # Muon (Jordan et al. 2024; modded-nanogpt's 24.9-minute record) for the blocks' Linear weights, the hidden
        # matrices; AdamW for the rest: embeddings, head, gains and scalars
        hidden = [m.weight for m in self.blocks.modules() if isinstance(m, nn.Linear) and cfg.optimizer == "muon"]
        # weight decay on matrices (Linear weights, embeddings); not on biases and LayerNorm gains
        params = [p for p in self.parameters() if p.requires_grad and all(p is not h for h in hidden)]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        adamw = torch.optim.AdamW(
            groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=device_type in ("cuda", "cpu")
        )
        if not hidden:
            return adamw
        # lr_scale: train() sets each group's lr to the schedule's times it, so Muon runs at muon_lr at the peak
        muon = Muon([{"params": hidden, "lr_scale": cfg.muon_lr / cfg.learning_rate}], cfg.muon_lr, cfg.weight_decay)
        return MuonWithAdamW(muon, adamw)

    def estimate_mfu(self, tokens_per_sec, device):
        """Model FLOPs utilisation: achieved training FLOP/s over the GPU's peak bf16 FLOP/s (PaLM, appendix B)."""
        L, H, Q, T = self.cfg.n_layer, self.cfg.n_head, self.cfg.n_embd // self.cfg.n_head, self.cfg.block_size
        T = min(T, self.cfg.window or T)  # with a window, each query meets at most window keys
        flops_per_token = 6 * self.num_params() + 12 * L * H * Q * T
        name = torch.cuda.get_device_name(device)
        peak = next(
            (v for k, v in {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}.items() if k in name), 312e12
        )
        return flops_per_token * tokens_per_sec / peak

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=0, use_cache=True, pad=None):
        """Append max_new_tokens tokens to idx (B, T), each sampled from the model's next-token distribution.
        use_cache: feed only the newest token and keep the keys and values of the others in a KVCache per layer.
        pad (B,): prompts of different lengths, left-padded with that many tokens each."""
        caches, n = None, self.max_len  # the model sees at most block_size tokens (all of them with RoPE and a window)
        # one token's logits are a matrix-vector product with the head's (V, C) weight, which the CPU's BLAS (MKL) reads
        # about 1.5x faster stored transposed, (C, V) (benchmarks/bench_ex4.py generate): one copy per call
        unembed = self.lm_head.weight.t().contiguous() if idx.device.type == "cpu" else None
        for _ in range(max_new_tokens):
            cropped = 0 if n is None else max(0, idx.size(1) - n)  # the context's first column; padding goes first
            row_pad = None if pad is None else (pad - cropped).clamp(min=0)
            if use_cache and caches is not None and (n is None or caches[0].pos < n):
                logits, _ = self(idx[:, -1:], caches=caches, pad=row_pad, unembed=unembed)
            else:  # no cache, the prompt, or a full context that must be re-read from a later first token
                caches = [KVCache(self.cfg.window or self.cfg.block_size) for _ in self.blocks] if use_cache else None
                logits, _ = self(idx[:, cropped:], caches=caches, pad=row_pad, unembed=unembed)
            logits = logits[:, -1, :]
            if temperature == 0:  # greedy
                idx_next = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = float("-inf")
                idx_next = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx


# ----------------------------------------------------------------------------------------------------------
# Training


def newton_schulz(G, steps=5, eps=1e-7):
    """G = U S V^T made nearly orthogonal, U S' V^T with S' between about 0.7 and 1.2, by Keller Jordan's quintic
    Newton-Schulz iteration X <- a X + b (X X^T) X + c (X X^T)^2 X, in float32 (torch.optim.Muon's runs in bfloat16,
    many times slower on most CPUs). Its coefficients make small singular values grow fast rather than converge."""
    a, b, c = 3.4445, -4.7750, 2.0315
    tall = G.size(0) > G.size(1)
    X = G.float().T if tall else G.float()  # X X^T is the smaller Gram matrix
    X = X / X.norm().clamp(min=eps)  # the Frobenius norm bounds the largest singular value: all at most 1
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if tall else X


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton-Schulz (Jordan et al. 2024), for 2-D weights, as torch.optim.Muon with its
    defaults: a momentum buffer B <- mu B + (1 - mu) G, Nesterov's look-ahead (1 - mu) G + mu B orthogonalised, scaled
    by sqrt(max(1, rows / cols)) and subtracted times lr, after a decoupled weight decay W <- (1 - lr wd) W."""

    def __init__(self, params, lr=1e-3, weight_decay=0.1, momentum=0.95):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, mu = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"].lerp_(p.grad, 1 - mu)
                update = newton_schulz(p.grad.lerp(buf, mu)).to(p.dtype)
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update, alpha=-lr * math.sqrt(max(1, p.size(0) / p.size(1))))


class MuonWithAdamW:
    """Muon for the hidden matrices and AdamW for the rest, as one optimizer to train() and Run: their param groups,
    one step, one zero_grad, one state_dict that ckpt.pt holds and --resume restores."""

    def __init__(self, muon, adamw):
        self.muon, self.adamw = muon, adamw

    @property
    def param_groups(self):  # looked up each time: load_state_dict replaces the optimizers' groups
        return self.muon.param_groups + self.adamw.param_groups

    def step(self):
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none=True):
        self.muon.zero_grad(set_to_none)
        self.adamw.zero_grad(set_to_none)

    def state_dict(self):
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state):
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])


def wsd_lr(it, cfg):
    """Warmup, stable, decay (Hu et al. 2024, "MiniCPM"; the speedrun's schedule): get_lr's linear warmup, then
    learning_rate held, then a linear decay to min_lr over the last decay_frac of lr_decay_iters, then flat."""
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    decay_start = (1 - cfg.decay_frac) * decay_iters
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it >= decay_iters:
        return cfg.min_lr
    if it < decay_start:
        return cfg.learning_rate
    return cfg.learning_rate + (it - decay_start) / (decay_iters - decay_start) * (cfg.min_lr - cfg.learning_rate)


@torch.no_grad()
def estimate_loss(model, loader, cfg, autocast):
    """Mean loss over eval_iters batches per split; the same batches every time, so evaluations compare."""
    model.eval()
    out = {}
    for split in ("train", "val"):
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        losses = torch.zeros(cfg.eval_iters)
        for k in range(cfg.eval_iters):
            x, y = loader.get_batch(split, gen)
            with autocast:
                _, loss = model(x, y)
            losses[k] = loss.item()
        out[split] = losses.mean().item()
    model.train()
    return out


def train(cfg, model, loader, tok, device, autocast, ckpt=None):
    optimizer = model.configure_optimizer(cfg, device.type)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.dtype == "float16")  # float16 needs its loss scaled
    gen = torch.Generator().manual_seed(cfg.seed)  # draws the training batches
    tokens = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size
    # the bookkeeping around the step (shared section); on --resume it restores the optimizer and the random states
    run = Run(cfg, model, optimizer, gen, tokens, ckpt, extra=lambda: {"tokenizer": tok.name, "vocab": tok.chars})
    if cfg.compile:
        print("compiling the model (takes a minute)...")
        model = torch.compile(model)
    for it in range(run.iter_num, cfg.max_iters + 1):
        run.stop_if_requested(it)  # Ctrl-C or SIGTERM: save the state at this iteration and exit
        lr = get_lr(it, cfg) if cfg.schedule == "cosine" else wsd_lr(it, cfg)
        for group in optimizer.param_groups:  # Muon's group at muon_lr / learning_rate times the schedule
            group["lr"] = lr * group.get("lr_scale", 1.0)
        if it % cfg.eval_interval == 0 or it == cfg.max_iters:  # print, log, save ckpt.pt (best.pt when val improves)
            run.evaluate(it, lr, estimate_loss(model, loader, cfg, autocast))
        if it == cfg.max_iters:
            break

        # forward and backward, gradients summed over the micro-batches
        for micro in range(cfg.gradient_accumulation_steps):
            x, y = loader.get_batch("train", gen)  # on a GPU this overlaps with the previous step's kernels
            with autocast:
                _, loss = model(x, y)
            scaler.scale(loss / cfg.gradient_accumulation_steps).backward()  # the sum over micro-batches is the mean
        # step: clip the gradient norm, update the weights
        if cfg.grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        run.log(it, lr, loss)  # every log_interval iterations: a line and a row of log.csv
    return run.finish()


# ----------------------------------------------------------------------------------------------------------
# Sampling and main


def read_prompts(cfg, argv):
    """Every --prompt in argv (cfg.prompt holds only the last), then every line of --prompt_file that is not blank."""
    repeated = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    repeated.add_argument("--prompt", action="append", default=[])
    prompts = [p for p in repeated.parse_known_args(argv)[0].prompt if p]
    if cfg.prompt_file:
        if not os.path.isfile(cfg.prompt_file):
            die(f"--prompt_file {cfg.prompt_file}: no such file")
        try:
            with open(cfg.prompt_file, encoding="utf-8") as f:
                lines = [line for line in f.read().splitlines() if line.strip()]
        except UnicodeDecodeError:
            die(f"--prompt_file {cfg.prompt_file} is not UTF-8 text")
        if not lines:
            die(f"--prompt_file {cfg.prompt_file} holds no prompt (one a line, blank lines skipped)")
        prompts += lines
    return prompts


def sample(model, tok, cfg, device, autocast, prompts):
    """num_samples continuations of each prompt in one batch: shorter prompts are left-padded, the padding masked out
    of attention and positions counted from each prompt's first token, so a row is what its prompt alone gives."""
    rows = [tok.encode(p) for p in prompts for _ in range(cfg.num_samples)]
    T = max(len(r) for r in rows)
    pad = torch.tensor([T - len(r) for r in rows], device=device)
    idx = torch.tensor([[0] * (T - len(r)) + r for r in rows], dtype=torch.long, device=device)
    torch.manual_seed(cfg.seed)  # the same --seed draws the same samples
    model.eval()
    with autocast:
        out = model.generate(
            idx, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.kv_cache, pad if pad.any() else None
        )
    for i, (row, n) in enumerate(zip(out.tolist(), pad.tolist())):
        print(f"--- sample {i + 1} ---\n{tok.decode(row[n:])}")


def main(argv=None):
    cfg = parse_args(argv)
    device, autocast = setup_device(cfg)
    torch.manual_seed(cfg.seed)

    if cfg.prompt or cfg.prompt_file:  # sampling only: everything needed is in the checkpoint
        prompts = read_prompts(cfg, argv)
        ckpt = load_checkpoint(os.path.join(cfg.out_dir, "best.pt"), device)
        tok = CharTokenizer(ckpt["vocab"])
        model = GPT(Config(**ckpt["config"]), len(tok.chars)).to(device)
        model.load_state_dict(ckpt["model"])
        sample(model, tok, cfg, device, autocast, prompts)
        return

    ckpt = None
    if cfg.resume:
        ckpt = load_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"), device)
        resume_config(cfg, ckpt["config"], RESUMED, kept=("max_iters", "lr_decay_iters"))
    else:
        check_out_dir(cfg.out_dir, cfg.overwrite)
    text = load_text(cfg)
    tok = CharTokenizer(ckpt["vocab"] if ckpt else sorted(set(text)))
    ids = torch.tensor(tok.encode(text), dtype=torch.long)
    print(f"{len(text):,} characters, vocabulary of {len(tok.chars)}")
    loader = DataLoader(ids, cfg, device)

    model = GPT(cfg, len(tok.chars)).to(device)
    if ckpt:
        model.load_state_dict(ckpt["model"])
    print(f"{model.num_params() / 1e6:.2f}M parameters, device {device}, dtype {cfg.dtype}")
    with STOP:  # Ctrl-C: save and stop at the next iteration (twice: at once)
        train(cfg, model, loader, tok, device, autocast, ckpt)
    sample(model, tok, cfg, device, autocast, tok.chars[:1])  # start from the first character: a newline in Shakespeare


# ----------------------------------------------------------------------------------------------------------
# Downloading the data


def download(url, path):
    """Fetch url into path with a progress line; a half-finished download never takes path's name."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    print(f"downloading {url} -> {path}")
    try:
        with urllib.request.urlopen(url, timeout=30) as r, open(path + ".part", "wb") as f:
            total = int(r.headers.get("Content-Length") or 0)
            while chunk := r.read(1 << 20):
                f.write(chunk)
                print(f"\r  {f.tell() / 1e6:.1f} of {total / 1e6:.1f} MB", end="", flush=True)
    except OSError as e:
        die(f"could not download {url} ({getattr(e, 'reason', e)}); fetch it by hand, or pass --data PATH")
    print()
    os.replace(path + ".part", path)


# ==========================================================================================================
# The shared machinery, word for word the same in every script of the ladder (tests/test_skeleton.py checks),
# so that a diff between two scripts shows only techniques: flags, devices, checkpoints, stopping, the log.
# ==========================================================================================================


def die(msg):
    """A user error: one line on stderr, exit status 2, no traceback. Under torchrun rank 0 says it; the others wait
    first (torchrun ends every process once one exits), so they speak only about a mistake that rank 0 did not meet."""
    rank = int(os.environ.get("RANK", 0))
    if rank:
        time.sleep(10)
    print(f"error: {msg}" if rank == 0 else f"error (rank {rank}): {msg}", file=sys.stderr)
    sys.exit(2)


def integer(text):
    """An integer flag's value: 2000, 2_000 or 2e3, not 2.5."""
    value = float(text)
    if not value.is_integer():
        raise ValueError(text)
    return int(value)


def parse_args(argv=None):
    """Config from the command line: a flag per field, the field's comment its help, a Literal's values its choices.
    Every mistake ends in one error line: an unknown flag, a negative number, or one of Config.mistakes()."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(), allow_abbrev=False)
    parser.error = lambda msg: die(f"{msg} (see --help)")  # allow_abbrev=False: --lr is not --lr_decay_iters
    comments = dict(re.findall(r"^    (\w+): .*?  # (.*)$", inspect.getsource(Config), re.M))
    for f in fields(Config):
        if f.type is bool:  # --flag and --no-flag
            shown, kind = f"--{'' if f.default else 'no-'}{f.name}", dict(action=argparse.BooleanOptionalAction)
        else:
            shown, kind = repr(f.default), dict(type={int: integer, float: float}.get(f.type, str))
        choices = get_args(f.type) or None  # a Literal's values
        parser.add_argument(
            f"--{f.name}", default=f.default, choices=choices, help=f"{comments[f.name]} (default {shown})", **kind
        )
    unset = object()  # marks the flags not typed on the command line
    args = vars(parser.parse_args(argv, argparse.Namespace(**{f.name: unset for f in fields(Config)})))
    cfg = Config(**{k: v for k, v in args.items() if v is not unset})
    cfg.given = {k for k, v in args.items() if v is not unset}  # --resume checks these against the checkpoint
    for f in fields(Config):
        if f.type in (int, float) and getattr(cfg, f.name) < 0:
            die(f"--{f.name} {getattr(cfg, f.name)} must be >= 0")
    if "prompt" in cfg.given and not cfg.prompt.strip():
        die("--prompt is empty: give what the model should continue, or leave --prompt out to train")
    for mistake in cfg.mistakes():
        die(mistake)
    return cfg


def setup_device(cfg):
    """The device and the autocast context of cfg.device and cfg.dtype (their "auto" resolved in cfg)."""
    if cfg.device == "auto":
        cfg.device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(cfg.device)
    except RuntimeError:
        die(f"--device {cfg.device} is not a device; use auto, cpu, cuda, cuda:N or mps")
    if not {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}.get(device.type, True):
        die(f"--device {cfg.device}: {device.type.upper()} is not available on this machine; use --device cpu")
    if not cfg.threads:  # threads that wait for a core other work holds slow every step: take the free ones
        cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
        if os.environ.get("OMP_NUM_THREADS"):
            cfg.threads = int(os.environ["OMP_NUM_THREADS"])
        else:
            busy = busy_cores(cpus)
            cfg.threads = max(1, len(cpus) - round(busy))
            if device.type == "cpu":
                print(f"threads: {cfg.threads} ({len(cpus)} cores, {busy:.1f} of them busy; --threads N to choose)")
    torch.set_num_threads(cfg.threads)
    if cfg.dtype == "auto":
        cfg.dtype = "float32" if device.type != "cuda" else "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if cfg.dtype == "float16" and device.type == "cpu":
        die("--dtype float16 runs many times slower than float32 on the CPU; use float32 or bfloat16")
    if cfg.dtype == "bfloat16" and device.type == "cpu":
        print("warning: --dtype bfloat16 runs many times slower than float32 on most CPUs", file=sys.stderr)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls for whatever still runs in float32
        torch.backends.cudnn.allow_tf32 = True
    dtype = getattr(torch, cfg.dtype)
    autocast = nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)
    return device, autocast


def busy_cores(cpus, seconds=0.2):
    """How many of the cores cpus other work keeps busy: their idle time in /proc/stat over a moment (Linux); elsewhere
    the load average, which still counts a run that ended a minute ago."""

    def idle_and_total():
        with open("/proc/stat") as f:
            rows = [line.split() for line in f if line[:3] == "cpu" and line[3].isdigit()]
        ticks = [[int(t) for t in row[1:]] for row in rows if int(row[0][3:]) in cpus]
        return sum(t[3] + t[4] for t in ticks), sum(sum(t) for t in ticks)  # idle and iowait, all

    try:
        idle, total = idle_and_total()
        time.sleep(seconds)
        idle2, total2 = idle_and_total()
        return len(cpus) * (1 - (idle2 - idle) / max(1, total2 - total))
    except OSError:
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0


def get_lr(it, cfg):
    """Linear warmup, then cosine decay from learning_rate to min_lr over lr_decay_iters, then flat."""
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it >= decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


def load_checkpoint(path, device, scripts=(SCRIPT,)):
    """A checkpoint written by one of scripts: this one, or the script whose model a later stage starts from."""
    if not os.path.isfile(path):
        die(f"no checkpoint at {path}; train first (python {scripts[0]}.py), or give the folder or path a run wrote")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        die(f"{path} is not a readable checkpoint ({type(e).__name__})")
    if not isinstance(ckpt, dict) or ckpt.get("script") not in scripts:
        found, names = ckpt.get("script", "unknown") if isinstance(ckpt, dict) else "unknown", " or ".join(scripts)
        die(f"{path} holds a checkpoint of {found}, not of {names}; give one that python {scripts[0]}.py wrote")
    return ckpt


def save_checkpoint(path, state):
    """Write to a temporary file, then rename: a crash never leaves a half-written checkpoint, nor the temporary."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def check_out_dir(out_dir, overwrite):
    """A run that does not --resume writes into a folder it can write, and never replaces a checkpoint: this
    script's only with --overwrite, another script's never."""
    folder = os.path.abspath(out_dir)
    while not os.path.isdir(folder):  # the folder, or the one it will be made in
        if os.path.exists(folder):
            die(f"--out_dir {out_dir}: {folder} is a file, not a folder")
        folder = os.path.dirname(folder)
    try:  # a file written and removed: permissions, a read-only disk and the like all answer
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        die(f"--out_dir {out_dir}: {folder} is not writable ({e.strerror}); give a folder this run can write")
    for name in ("ckpt.pt", "best.pt"):
        path = os.path.join(out_dir, name)
        if not os.path.exists(path):
            continue
        try:
            old = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            script, what = old["script"], f"{old['script']} at iteration {old['iter_num']}"
        except Exception:
            script, what = None, "an unreadable checkpoint"
        if script not in (None, SCRIPT):
            die(f"{path} holds a checkpoint of {what}, which {SCRIPT} never overwrites; use another --out_dir")
        if not overwrite:
            die(f"{path} already holds {what}; continue it with --resume, use another --out_dir, or --overwrite it")


def resume_config(cfg, saved, names, kept=()):
    """--resume: the settings in names come from the checkpoint (a different value typed is a mistake); those in kept
    too, unless typed (a resumed run ends where it was to end, or where --max_iters now says)."""
    for name in names:
        if name not in saved:  # written before the flag existed: the setting it had is unknown
            die(f"the checkpoint has no --{name} (an older version wrote it); resume with that version, or start anew")
        if name in cfg.given and getattr(cfg, name) != saved[name]:
            die(f"--{name} {getattr(cfg, name)!r} differs from the checkpoint's {saved[name]!r}; leave it out")
        setattr(cfg, name, saved[name])
    for name in kept:
        if name not in cfg.given:
            setattr(cfg, name, saved[name])


class StopRequest:
    """Inside `with STOP:`, Ctrl-C or SIGTERM during training sets .requested: the loop saves the latest state at the
    start of the next iteration and exits. Outside a training loop, or a second time, it stops at once."""

    requested = training = False

    def __enter__(self):
        self.requested = False
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def __exit__(self, kind, error, traceback):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        if kind is KeyboardInterrupt:
            print("\ninterrupted; the checkpoints saved before are kept (continue with --resume)", file=sys.stderr)
            sys.exit(130)

    def handle(self, signum, frame):
        if self.requested or not self.training:
            raise KeyboardInterrupt
        self.requested = True
        name = signal.Signals(signum).name
        print(f"\n{name}: saving the latest state after this iteration (again to stop at once)", file=sys.stderr)


STOP = StopRequest()


class CSVLog:
    """out_dir/log.csv: a row per log line (the batch loss) and per evaluation (the estimates and the script's own
    metrics, its columns). Resuming, it keeps the first keep rows, those written before the checkpoint (None: all)."""

    def __init__(self, path, keep=0, columns=()):
        rows = []
        if keep != 0 and os.path.exists(path):
            with open(path, newline="") as f:
                rows = list(csv.DictReader(f))[:keep]
        self.f = open(path, "w", newline="")
        self.writer = csv.DictWriter(self.f, ["iter", "train_loss", "val_loss", "lr", "ms_per_iter", *columns])
        self.writer.writeheader()
        self.writer.writerows(rows)
        self.rows = len(rows)

    def write(self, **row):
        self.writer.writerow(row)
        self.f.flush()
        self.rows += 1


class Run:
    """A training loop's bookkeeping: evaluations that print, log and save ckpt.pt (the latest state) and best.pt (the
    lowest val loss), log lines, wandb, Ctrl-C, timing. ckpt: --resume's checkpoint, whose optimizer, batch generator
    and random states it restores; extra: what else a checkpoint holds (a function); log: a CSVLog to go on writing.
    Under torchrun, rank 0 alone writes files, and MFU is per GPU."""

    def __init__(self, cfg, model, optimizer, gen, tokens, ckpt=None, extra=dict, columns=(), log=None):
        self.cfg, self.model, self.optimizer, self.gen, self.extra = cfg, model, optimizer, gen, extra
        self.device, self.tokens = next(model.parameters()).device, tokens
        self.iter_num, self.best_val = 0, float("inf")
        if ckpt is not None:  # --resume: restore everything that shapes the next step
            optimizer.load_state_dict(ckpt["optimizer"])
            gen.set_state(ckpt["batch_rng"])
            torch.set_rng_state(ckpt["torch_rng"])
            if self.device.type == "cuda" and ckpt.get("cuda_rng") is not None:
                torch.cuda.set_rng_state(ckpt["cuda_rng"], self.device)
            self.iter_num, self.best_val = ckpt["iter_num"], ckpt["best_val_loss"]
            print(f"resuming from iter {self.iter_num} (best val {self.best_val:.4f})")
        self.writer, self.world = int(os.environ.get("RANK", 0)) == 0, int(os.environ.get("WORLD_SIZE", 1))
        os.makedirs(cfg.out_dir, exist_ok=True)
        path = os.path.join(cfg.out_dir, "log.csv") if self.writer else os.devnull
        self.csv = log or CSVLog(path, ckpt.get("log_rows") if ckpt else 0, columns)  # older checkpoints: keep all
        self.wandb = None
        if cfg.wandb:
            try:
                import wandb

                self.wandb = wandb
                wandb.init(project=cfg.wandb_project, name=cfg.out_dir, config=asdict(cfg))
            except Exception as e:
                die(f"--wandb: {str(e).splitlines()[0]}; run `wandb login`, or set WANDB_MODE=offline to log locally")
        print(f"tokens per iteration: {tokens:,}")
        self.t0 = self.t_start = time.time()
        self.dts = []
        STOP.training = True  # a first Ctrl-C now waits for the end of the iteration

    def state(self, it):
        """Everything --resume needs to continue at iteration it."""
        weights = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}
        progress = {"iter_num": it, "best_val_loss": self.best_val, "log_rows": self.csv.rows}
        cuda_rng = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        rngs = {"batch_rng": self.gen.get_state(), "torch_rng": torch.get_rng_state(), "cuda_rng": cuda_rng}
        return {"script": SCRIPT, "config": asdict(self.cfg), **weights, **progress, **rngs, **self.extra()}

    def save(self, it, best=False):
        """ckpt.pt, and with best best.pt (the model to sample from, without the optimizer); rank 0 alone."""
        path = os.path.join(self.cfg.out_dir, "ckpt.pt")
        if self.writer:
            if best:  # written first: killed in between, best.pt may be one evaluation ahead of ckpt.pt
                best_path = os.path.join(self.cfg.out_dir, "best.pt")
                save_checkpoint(best_path, {k: v for k, v in self.state(it).items() if k != "optimizer"})
                print(f"saved {best_path}")
            save_checkpoint(path, self.state(it))
        return path

    def stop_if_requested(self, it):
        """Ctrl-C or SIGTERM (in any process under torchrun): save the state at iteration it and exit."""
        if STOP.requested:
            path = self.save(it)
            print(f"stopped: {path} holds iteration {it}; continue with --resume", file=sys.stderr)
            sys.exit(130)

    def evaluate(self, it, lr, losses, **metrics):
        """Print and save the estimates (and the script's metrics); best.pt when val improves; then log them."""
        seconds = time.time() - self.t_start
        shown = "".join(f" | {k} {v:.4f}" for k, v in metrics.items())
        print(f"iter {it} | train {losses['train']:.4f} | val {losses['val']:.4f}{shown} | {seconds:.1f} s")
        best = losses["val"] < self.best_val
        self.best_val = min(self.best_val, losses["val"])
        self.save(it, best)  # before the row: resumed here, the run evaluates again and writes it again
        row = {"train_loss": losses["train"], "val_loss": losses["val"], **metrics}
        self.csv.write(iter=it, lr=f"{lr:.3e}", **{k: f"{v:.4f}" for k, v in row.items()})
        if self.wandb:
            self.wandb.log({"iter": it, "train/loss": losses["train"], "val/loss": losses["val"], "lr": lr, **metrics})
        self.t0 = time.time()  # keep evaluation out of the per-iteration timing

    def log(self, it, lr, loss):
        """The iteration's time, and every log_interval iterations a line and a row of log.csv."""
        t1 = time.time()
        dt, self.t0 = t1 - self.t0, t1
        self.dts.append(dt)
        if it % self.cfg.log_interval == 0:
            lossf = loss.item()  # waits for the GPU: only when logging
            line = f"iter {it} | loss {lossf:.4f} | {dt * 1000:.1f} ms | {self.tokens / dt / 1000:.1f}k tok/s"
            if loss.device.type == "cuda":
                line += f" | mfu {100 * self.model.estimate_mfu(self.tokens / self.world / dt, loss.device):.1f}%"
            print(line)
            self.csv.write(iter=it, train_loss=f"{lossf:.4f}", lr=f"{lr:.3e}", ms_per_iter=f"{dt * 1000:.2f}")

    def finish(self):
        """The run's summary line; closes log.csv and wandb. Returns the best val loss."""
        if self.dts:
            n, median, seconds = len(self.dts), sorted(self.dts)[len(self.dts) // 2] * 1000, time.time() - self.t_start
            print(f"done: {n} iterations in {seconds:.1f} s, median {median:.1f} ms/iter, best val {self.best_val:.4f}")
        self.csv.f.close()
        if self.wandb:
            self.wandb.finish()
        STOP.training = False
        return self.best_val


if __name__ == "__main__":
    main()
