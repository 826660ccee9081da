"""
flash_moe_finetune.py: GPT-2's MLPs upcycled to mixtures of experts, fine-tuned on WikiText-2 with flash attention.

Changes from ex3_pretrain_finetune.py:
- WikiText-2 in GPT-2's BPE in place of the pretraining corpus and the stages (--data, --data_dir, --train_split):
  one fine-tuning run in out_dir, scored by sliding-window test perplexity before and after it (--test_stride,
  --test_tokens): load_wikitext, DataLoader, perplexity, report_perplexity, main; after main hub_unreachable,
  download_wikitext.
- Attention by the fused kernel, by FlashAttention's algorithm written out (blocks of keys, a running max and a
  running sum) or explicitly (--attention in place of ex3's --flash; --flash_block): CausalSelfAttention,
  tiled_attention.
- Sparse upcycling (Komatsuzaki et al. 2022, arXiv 2212.05055; --n_experts, --moe_k, --moe_layers): each chosen
  layer's MLP copied into experts behind a new top-k router whose weights are renormalised, so the upcycled model
  computes what the dense one did; a load-balancing loss and a router z-loss (--balance_coef, --z_coef); each
  expert's use printed: load_balancing_loss, router_z_loss, MoE, Block, moe_layer_ids, GPT, upcycle, reset_usage,
  expert_usage, estimate_loss, train.
- Generation tools (--top_p, --repetition_penalty, --ban, --clean, --compare): the starting and the fine-tuned model
  continue the same prompt with the same seed, WikiText's artefacts cleaned: GPT.generate, top_p_filter,
  clean_wikitext, banned_sequences, sample.
- The starting model (--init_from: gpt2, gpt2-medium, -large or -xl through transformers, Conv1D matrices transposed;
  a best.pt of ex3 --tokenizer gpt2 or of this script; or scratch; --gelu): checkpoint_weights, start_model,
  load_model; after main from_hf, hf_weights.
- LoRA (ex3's) on the upcycled model: each expert gets adapters of its own, through which the copies move apart, and
  the new routers train whole; a LoRA checkpoint is no starting model (its merged.pt is): lora_start, load_model.

Run:       python flash_moe_finetune.py              (GPT-2 small, 4 experts in every other layer, 1000 steps of
                                                     8 x 1024 tokens: a GPU; downloads GPT-2 and WikiText-2 once)
Try:       python flash_moe_finetune.py --max_iters 40 --test_tokens 20000   (a CPU run: the test perplexities score
                                                     the first 20,000 test tokens, not all 290,000, twice)
Zero-shot: python flash_moe_finetune.py --n_experts 1 --max_iters 0   (GPT-2's WikiText-2 test perplexity, no training)
Dense:     python flash_moe_finetune.py --n_experts 1                 (the same fine-tune without experts)
LoRA:      python flash_moe_finetune.py --lora_rank 8 --learning_rate 1e-3   (adapters on frozen GPT-2 weights)
8 GPUs:    torchrun --standalone --nproc_per_node 8 flash_moe_finetune.py --init_from gpt2-medium \
               --gradient_accumulation_steps 8 --compile
Offline:   python flash_moe_finetune.py --init_from out/ex3_pretrain_finetune/pretrain/best.pt \
               --data ../shared/data/wikitext-2 --train_split valid       (a GPT-2-architecture model of ex3)
Sample:    python flash_moe_finetune.py --prompt "The castle was built in" --num_samples 2
Parent:    ex3_pretrain_finetune.py (diff -u ex3_pretrain_finetune.py flash_moe_finetune.py)
Result:    RESULTS.md, "flash_moe_finetune.py" (benchmarks/bench_flash_moe_finetune.py).
"""

import argparse
import atexit
import csv
import hashlib
import inspect
import itertools
import math
import os
import re
import signal
import socket
import sys
import tempfile
import time
import urllib.parse
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, fields, replace
from datetime import timedelta
from functools import cache
from typing import Literal, get_args

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

SCRIPT = os.path.splitext(os.path.basename(__file__))[0]
DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
WIKITEXT = ("Salesforce/wikitext", "wikitext-2-raw-v1")  # Parquet files on the Hub, through datasets
SPLITS = {"train": "train", "valid": "validation", "test": "test"}  # our name of each split: its name in datasets
GPT2_MODELS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")  # 124M, 350M, 774M, 1558M parameters
DENSE = ("n_layer", "n_head", "n_embd", "block_size", "bias", "gelu")  # the architecture a starting model fixes
EXPERTS = ("n_experts", "moe_k", "moe_layers")  # and its experts, where it is a checkpoint of this script that has them


@dataclass
class Config:
    # I/O
    out_dir: str = f"out/{SCRIPT}"  # checkpoint and log.csv go here
    data: str = ""  # a folder holding WikiText-2's train.txt, valid.txt, test.txt; empty: wikitext-2-raw-v1, downloaded
    data_dir: str = ""  # downloads go here (WikiText-2 in wikitext-2-raw-v1/); empty: data/ next to this script
    train_split: Literal["train", "valid"] = "train"  # valid where train.txt is missing (its last tenth is then val)
    init_from: str = "gpt2"  # gpt2, gpt2-medium/-large/-xl, PATH (best.pt of ex3 --tokenizer gpt2 or of this), scratch
    resume: bool = False  # continue training from out_dir/ckpt.pt, the latest saved state
    overwrite: bool = False  # start over in an out_dir holding this script's checkpoint (replaces ckpt.pt and best.pt)
    eval_interval: int = 100  # evaluate and save ckpt.pt every this many iterations (best.pt when val improves)
    eval_iters: int = 20  # batches per split in each evaluation
    log_interval: int = 10  # print and log the training loss every this many iterations
    wandb: bool = False  # also log to Weights & Biases
    wandb_project: str = "gpt-ladder"  # wandb project name
    # model
    n_layer: int = 4  # transformer blocks (--init_from scratch; otherwise the starting model's)
    n_head: int = 4  # attention heads per block (scratch only)
    n_embd: int = 128  # embedding width (scratch only)
    block_size: int = 0  # context length; 0: the starting model's (GPT-2: 1024, scratch: 128); less crops positions
    dropout: float = 0.1  # dropout probability (GPT-2's)
    bias: bool = True  # biases in Linear and LayerNorm layers (scratch only; GPT-2 has them)
    gelu: Literal["tanh", "none"] = "tanh"  # GELU (scratch only): tanh, GPT-2's approximation; none, ex3's exact one
    attention: Literal["fused", "tiled", "explicit"] = "fused"  # SDPA kernel, FlashAttention written out, or explicit
    flash_block: int = 64  # queries and keys per tile of --attention tiled
    # mixture of experts
    n_experts: int = 4  # experts per upcycled MLP, each a copy of it; 1: no experts (the dense fine-tune)
    moe_k: int = 2  # experts each token is sent to (--top_k is the sampling flag)
    moe_layers: str = "odd"  # layers to upcycle: odd (1, 3, 5, ...: every other layer), all, or indices such as 0,2,5
    balance_coef: float = 0.01  # weight of the load-balancing loss (Switch Transformer), summed over the MoE layers
    z_coef: float = 0.001  # weight of the router z-loss (ST-MoE), summed over the MoE layers
    # training
    seed: int = 1337  # seeds the weights, the batches, dropout and sampling
    batch_size: int = 8  # sequences per micro-batch
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step, over all processes
    max_iters: int = 1000  # optimizer steps; 0: only measure the starting model's test perplexity
    learning_rate: float = 1e-4  # peak learning rate (fine-tuning: well below pretraining's)
    min_lr: float = 1e-5  # learning rate at the end of the cosine decay
    warmup_iters: int = 100  # linear warmup steps
    lr_decay_iters: int = 0  # cosine decay length; 0 means max_iters
    weight_decay: float = 0.1  # AdamW weight decay, applied to matrices only
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.99  # AdamW beta2 (0.99 since there are few tokens per step)
    grad_clip: float = 1.0  # clip the gradient norm to this; 0 disables
    test_stride: int = 0  # test perplexity: block_size windows this far apart score only new tokens; 0: block_size // 2
    test_tokens: int = 0  # measure the test perplexity on the first this many tokens of the test split; 0: all of it
    # LoRA
    lora_rank: int = 0  # finetune low-rank adapters of this rank (LoRA) on frozen pretrained weights; 0: every weight
    lora_alpha: float = 16.0  # the adapters' output is scaled by lora_alpha / lora_rank
    lora_targets: Literal["attn", "mlp", "attn,mlp"] = "attn,mlp"  # Linear layers given adapters: attention's, MLPs'
    lora_dropout: float = 0.0  # dropout on the adapters' input
    lora_merge: bool = False  # skip training: write best.pt with its adapters folded into the weights as merged.pt
    # system
    device: str = "auto"  # auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bfloat16 (else float16) on cuda, float32
    compile: bool = False  # torch.compile the model (worth it on a GPU)
    threads: int = 0  # CPU threads (torch.set_num_threads); 0: OMP_NUM_THREADS if set, else the cores idle at the start
    # sampling
    prompt: str = ""  # if set, skip training: load out_dir/best.pt and continue this text with it and the initial model
    num_samples: int = 1  # samples to draw from each model
    max_new_tokens: int = 100  # tokens per sample
    temperature: float = 0.8  # <1 sharper, >1 more random
    top_k: int = 50  # sample only among the k most likely tokens; 0 for all
    top_p: float = 0.95  # and only among the fewest likeliest tokens with total probability top_p (nucleus); 1 for all
    repetition_penalty: float = 1.2  # as in CTRL: divide seen tokens' logits by this (multiply negative ones); 1: off
    ban: str = "<unk>"  # comma-separated words never to generate (each with and without a leading space)
    clean: bool = True  # print samples with WikiText's artefacts undone (@-@, @,@, spaces before punctuation, <unk>)
    compare: bool = True  # also sample from the starting model, with the same prompt and seed

    def mistakes(self):
        """Settings no run can use, a message each (parse_args has refused every negative number already)."""
        ones = ["n_layer", "n_head", "n_embd", "flash_block", "n_experts", "moe_k", "batch_size"]
        ones += ["gradient_accumulation_steps", "eval_interval", "eval_iters", "log_interval", "num_samples"]
        yield from (f"--{n} must be at least 1" for n in ones if getattr(self, n) < 1)
        below_one = ("dropout", "beta1", "beta2", "lora_dropout")
        yield from (f"--{n} must be below 1" for n in below_one if getattr(self, n) >= 1)
        if self.n_embd % self.n_head:
            yield f"--n_embd {self.n_embd} must be divisible by --n_head {self.n_head}"
        if self.n_experts > 1 and self.moe_k > self.n_experts:
            yield f"--moe_k {self.moe_k} must be at most --n_experts {self.n_experts}"
        above_zero = ("learning_rate", "lora_alpha", "top_p", "repetition_penalty")
        yield from (f"--{n} must be above 0" for n in above_zero if getattr(self, n) == 0)
        if self.top_p > 1:
            yield f"--top_p {self.top_p} must be at most 1"
        if os.path.isdir(self.init_from):
            yield f"--init_from {self.init_from} is a folder; give a checkpoint file in it, such as its best.pt"
        elif self.init_from not in GPT2_MODELS + ("scratch",) and not os.path.isfile(self.init_from):
            yield f"--init_from {self.init_from}: no such file; give gpt2(-medium, -large, -xl), scratch or a best.pt"


RESUMED = ("n_layer", "n_head", "n_embd", "block_size", "bias", "data")  # --resume takes these from ckpt.pt
LORA = ("lora_rank", "lora_alpha", "lora_targets")  # the adapters' shape, which --resume takes from ckpt.pt too
RESUMED += ("gelu", *EXPERTS, "init_from", "data_dir", "train_split") + LORA  # the experts' and the data's flags


# ----------------------------------------------------------------------------------------------------------
# Data


def load_text(path):
    """The text of one split's file."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError:
        die(f"{path} is not UTF-8 text")
    if "\0" in text:
        die(f"{path} looks like a binary file (it holds NUL characters); give a UTF-8 text file")
    return text


class GPT2Tokenizer:
    """GPT-2's byte-pair encoding through tiktoken: every text encodes, nothing is dropped."""

    name, chars, start = "gpt2", None, "\n"

    def __init__(self):
        try:
            import tiktoken

            # downloads two files into tiktoken's cache (TIKTOKEN_CACHE_DIR) once
            self.enc = tiktoken.get_encoding("gpt2")
        except Exception as e:
            fix = "pip install tiktoken and connect once, or set TIKTOKEN_CACHE_DIR to its cached files"
            die(f"could not load GPT-2's BPE through tiktoken ({type(e).__name__}); {fix}")
        self.vocab_size = self.enc.n_vocab  # 50257, which fits in uint16

    def encode(self, s):
        return self.enc.encode_ordinary(s)

    def decode(self, ids):
        return self.enc.decode(ids)


def load_wikitext(cfg, tok):
    """The splits as arrays of GPT-2 token ids: train (--train_split), val (valid, or the last 10% of the training split
    when that is valid) and test (its first --test_tokens); and the number of words in the test split. Files in the
    --data folder may be named train.txt or wiki.train.tokens / wiki.train.raw."""
    folder = cfg.data or os.path.join(cfg.data_dir or DATA_DIR, WIKITEXT[1])
    if cfg.data and os.path.isfile(folder):
        die(f"--data {folder} is a file; give the folder holding WikiText-2's train.txt, valid.txt and test.txt")
    if cfg.data and not os.path.isdir(folder):
        die(f"--data {folder}: no such folder")

    def find(split):  # train.txt, or the name in WikiText's own archives: wiki.train.tokens or wiki.train.raw
        paths = [os.path.join(folder, name) for name in (f"{split}.txt", f"wiki.{split}.tokens", f"wiki.{split}.raw")]
        return next((path for path in paths if os.path.isfile(path)), None)

    if not cfg.data and not all(find(s) for s in SPLITS):
        download_wikitext(folder)
    texts = {}
    for split in (cfg.train_split, "valid", "test"):
        path = find(split)
        if path is None:
            hint = "; fine-tune on the valid split with --train_split valid" if split == "train" else ""
            die(f"no {split}.txt (nor wiki.{split}.tokens or wiki.{split}.raw) in {folder}{hint}")
        texts[split] = load_text(path)
    ids = {split: np.array(tok.encode(text), dtype=np.uint16) for split, text in texts.items()}
    if cfg.train_split == "valid":  # no train split: hold out the end of the valid split for checkpoint selection
        n = int(0.9 * len(ids["valid"]))
        ids["train"], ids["valid"] = ids["valid"][:n], ids["valid"][n:]
    splits = {"train": ids["train"], "val": ids["valid"], "test": ids["test"][: cfg.test_tokens or None]}
    test_text = tok.decode(splits["test"].tolist()) if cfg.test_tokens else texts["test"]
    words = len(test_text.split()) + test_text.count("\n")  # WikiText's words and line ends: the GPT-2 paper's unit
    sizes = ", ".join(f"{split} {len(data):,}" for split, data in splits.items())
    print(f"WikiText-2 from {folder}: {sizes} tokens (train: {cfg.train_split})")
    return splits, words


class DataLoader:
    """Each split an array of token ids (train, val, and test for perplexity); batches start at random offsets."""

    def __init__(self, splits, cfg, device):
        self.splits = splits
        for split, data in self.splits.items():  # a batch starts at a random offset: block_size + 1 tokens at least
            if len(data) <= cfg.block_size:
                die(f"the {split} split has {len(data)} tokens, too few for --block_size {cfg.block_size}; add text")
        self.cfg, self.device = cfg, device
        self.offsets = torch.arange(cfg.block_size + 1)

    def get_batch(self, split, generator, rank=0, world_size=1):
        """Under DDP every rank draws the offsets of every rank's micro-batch from the same generator and keeps its own:
        together the ranks train on exactly the micro-batches one process would."""
        data = self.splits[split]
        shape = (world_size, self.cfg.batch_size, 1)  # one rank's offsets after another
        ix = torch.randint(len(data) - self.cfg.block_size, shape, generator=generator)[rank]
        xy = torch.from_numpy(data[(ix + self.offsets).numpy()].astype(np.int64))  # (B, T+1) in one indexing op
        x, y = xy[:, :-1], xy[:, 1:]
        if self.device.type == "cuda":  # pinned memory lets the copy overlap with compute
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)


# ----------------------------------------------------------------------------------------------------------
# Model


class CausalSelfAttention(nn.Module):
    """All heads in one module: one projection makes q, k, v for every head at once."""

    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.dropout, self.attention, self.block = cfg.n_head, cfg.dropout, cfg.attention, cfg.flash_block
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.attn_dropout = nn.Dropout(cfg.dropout)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        # lower-triangular mask: position t may attend to positions 0..t
        self.register_buffer(
            "mask", torch.tril(torch.ones(cfg.block_size, cfg.block_size, dtype=torch.bool)), persistent=False
        )

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_size)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if self.attention == "fused":  # FlashAttention's kernel where the device has one
            y = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
            )
        elif self.attention == "tiled":  # the same algorithm, written out
            y = tiled_attention(q, k, v, self.block, self.dropout if self.training else 0.0)
        else:
            att = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))
            att = att.masked_fill(~self.mask[:T, :T], float("-inf"))
            att = self.attn_dropout(F.softmax(att, dim=-1))
            y = att @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again
        return self.resid_dropout(self.c_proj(y))


def tiled_attention(q, k, v, block, dropout=0.0):
    """Causal attention by FlashAttention's algorithm (Dao et al. 2022, arXiv 2205.14135), (B, H, T, D) -> (B, H, T, D),
    without forming the T x T matrix of scores. For each block of queries the blocks of keys up to the diagonal are
    visited in turn, keeping per query the running max m of its scores, the running sum denom of exp(score - m) and
    the running sum acc of exp(score - m) * value; when a block raises the max, the sums so far are rescaled by
    exp(m_old - m_new). At the end acc / denom is softmax(scores) @ V exactly. The fused kernel does this in on-chip
    memory; here each tile is a few PyTorch operations, to read (autograd keeps the tiles, so it saves no memory)."""
    T, scale = q.size(2), 1.0 / math.sqrt(q.size(-1))
    pos = torch.arange(T, device=q.device)
    out = []
    for i in range(0, T, block):  # a block of queries
        qi = q[:, :, i : i + block].float() * scale
        m = qi.new_full((*qi.shape[:-1], 1), float("-inf"))  # running max of each query's scores
        denom = qi.new_zeros((*qi.shape[:-1], 1))  # running sum of exp(score - m)
        acc = torch.zeros_like(qi)  # running sum of exp(score - m) * value
        for j in range(0, i + block, block):  # blocks of keys up to the diagonal: later ones are masked entirely
            s = qi @ k[:, :, j : j + block].float().transpose(-2, -1)  # (B, H, queries, keys)
            if j == i:  # the diagonal block: a query sees the keys at or before it
                s = s.masked_fill(pos[j : j + block] > pos[i : i + block, None], float("-inf"))
            m_new = torch.maximum(m, s.amax(-1, keepdim=True))
            p = torch.exp(s - m_new)
            rescale = torch.exp(m - m_new)  # 0 on the first block, where m is -inf
            denom = denom * rescale + p.sum(-1, keepdim=True)
            acc = acc * rescale + (F.dropout(p, dropout) if dropout else p) @ v[:, :, j : j + block].float()
            m = m_new
        out.append(acc / denom)
    return torch.cat(out, dim=2).to(q.dtype)


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)
        self.gelu = cfg.gelu

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate=self.gelu)))


def load_balancing_loss(probs, idx):
    """Switch Transformer's auxiliary loss E * sum_i f_i * P_i, per head, averaged over heads.
    probs (..., H, E): router probabilities; idx (..., H): the expert each token was sent to. f_i is the
    fraction of tokens sent to expert i, P_i the mean probability given to it: 1 when both are uniform,
    E when every token goes to one expert with probability 1."""
    E = probs.size(-1)
    f = F.one_hot(idx, E).flatten(0, -3).float().mean(0)  # (H, E)
    P = probs.flatten(0, -3).mean(0)
    return (E * (f * P).sum(-1)).mean()


def router_z_loss(logits):
    """ST-MoE's router z-loss (Zoph et al. 2022, eq. 5): the mean squared log-sum-exp of the router logits, which keeps
    them small (a bf16 softmax of large logits is inexact). Zero logits give (ln E)^2."""
    return torch.logsumexp(logits, dim=-1).square().mean()


class MoE(nn.Module):
    """n_experts MLPs and a router: each token goes to the moe_k experts with the largest router probabilities, and
    their outputs are summed, weighted by those probabilities renormalised to sum to 1 over the chosen experts.
    Upcycled from an MLP (from_dense), every expert is a copy of it, so the layer computes what the MLP did."""

    def __init__(self, cfg):
        super().__init__()
        self.n_experts, self.moe_k = cfg.n_experts, cfg.moe_k
        self.router = nn.Linear(cfg.n_embd, cfg.n_experts, bias=False)
        nn.init.normal_(self.router.weight, mean=0.0, std=0.02)  # random: the copies get different tokens, move apart
        self.experts = nn.ModuleList(MLP(cfg) for _ in range(cfg.n_experts))
        self.register_buffer("usage", torch.zeros(cfg.n_experts, dtype=torch.long), persistent=False)  # in eval mode
        self.balance_loss = self.z_loss = 0.0  # the auxiliary losses of the last forward

    @classmethod
    def from_dense(cls, mlp, cfg):
        """Sparse upcycling: n_experts copies of a trained MLP and a new router."""
        moe = cls(cfg).to(next(mlp.parameters()).device)
        for expert in moe.experts:
            expert.load_state_dict(mlp.state_dict())
        return moe

    def forward(self, x):
        B, T, C = x.size()
        x = x.reshape(B * T, C)
        logits = self.router(x).float()  # (N, E): softmax and z-loss in float32, also under autocast
        probs = F.softmax(logits, dim=-1)
        top_p, chosen = probs.topk(self.moe_k, dim=-1)  # (N, k)
        # the chosen experts' weights sum to 1, so copies of one MLP add up to it. With k = 1 that weight is the
        # constant 1 and the router would get no gradient: p / p.detach() is 1 too, but its gradient is that of p
        weights = top_p / (top_p.sum(-1, keepdim=True) if self.moe_k > 1 else top_p.detach())
        # the k choices take the place of SwitchHead's heads: the mean over them counts every choice in f
        self.balance_loss, self.z_loss = load_balancing_loss(probs[:, None], chosen), router_z_loss(logits)
        # tokens per expert; index_add_ rather than bincount keeps torch.compile in one graph
        flat = chosen.flatten()
        per_expert = torch.zeros(self.n_experts, dtype=torch.long, device=x.device)
        per_expert.index_add_(0, flat, torch.ones_like(flat))
        if not self.training:
            self.usage += per_expert
        # dispatch: the N * k choices sorted by expert, so that each expert runs once, on all of its tokens
        order = flat.argsort()
        counts = per_expert.tolist()  # the group sizes (one wait for the GPU)
        tokens, gates = (order // self.moe_k).split(counts), weights.flatten()[order].split(counts)
        out = torch.zeros_like(x)
        # an expert no token chose runs on 0 rows: a zero gradient, still in the graph (DDP)
        for expert, t, g in zip(self.experts, tokens, gates):
            out.index_add_(0, t, expert(x[t]) * g[:, None].to(x.dtype))
        return out.view(B, T, C)


class Block(nn.Module):
    """Pre-LayerNorm: normalise the input of each sublayer, keep the residual stream untouched."""

    def __init__(self, cfg, moe=False):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MoE(cfg) if moe else MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


def moe_layer_ids(cfg):
    """The layers --moe_layers names: odd (1, 3, 5, ...: every other layer, as in GShard and Switch), all, or
    indices."""
    if cfg.n_experts == 1:
        return []
    if cfg.moe_layers in ("odd", "all"):
        return list(range(1 if cfg.moe_layers == "odd" else 0, cfg.n_layer, 2 if cfg.moe_layers == "odd" else 1))
    try:
        ids = sorted({int(s) for s in cfg.moe_layers.split(",")})
    except ValueError:
        die(f"--moe_layers {cfg.moe_layers} is not odd, all, or comma-separated layer indices")
    if not all(0 <= i < cfg.n_layer for i in ids):
        die(f"--moe_layers {cfg.moe_layers}: this model's {cfg.n_layer} layers are numbered 0 to {cfg.n_layer - 1}")
    return ids


class GPT(nn.Module):
    def __init__(self, cfg, vocab_size):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(vocab_size, cfg.n_embd)  # token embeddings
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)  # learned position embeddings
        self.drop = nn.Dropout(cfg.dropout)
        moe = moe_layer_ids(cfg)
        self.blocks = nn.ModuleList(Block(cfg, i in moe) for i in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight  # weight tying: one matrix embeds and un-embeds
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by 1/sqrt(2 * n_layer)
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def moes(self):
        return [block.mlp for block in self.blocks if isinstance(block.mlp, MoE)]

    def num_params(self, active=False):
        """Parameters without the position embeddings; active=True: only those one token uses (moe_k of the experts)."""
        n = sum(p.numel() for p in self.parameters()) - self.wpe.weight.numel()
        if active:
            n -= sum((m.n_experts - m.moe_k) * sum(p.numel() for p in m.experts[0].parameters()) for m in self.moes())
        return n

    def forward(self, idx, targets=None, start=0):
        """start: positions before it are only context (a sliding window's, or sampling's): no logits, no loss there."""
        B, T = idx.size()
        assert T <= self.cfg.block_size, f"sequence of {T} tokens is longer than block_size {self.cfg.block_size}"
        x = self.drop(self.wte(idx) + self.wpe(torch.arange(T, device=idx.device)))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x[:, start:]))
        loss = (
            None
            if targets is None
            else F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets[:, start:].reshape(-1), ignore_index=-1)
        )
        if loss is not None and self.training:  # the auxiliary losses of every MoE layer, as in Switch and ST-MoE
            for m in self.moes():
                loss = loss + self.cfg.balance_coef * m.balance_loss + self.cfg.z_coef * m.z_loss
        return logits, loss

    def configure_optimizer(self, cfg, device_type):
        # weight decay on matrices (Linear weights, embeddings); not on biases and LayerNorm gains
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(
            groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=device_type in ("cuda", "cpu")
        )

    def estimate_mfu(self, tokens_per_sec, device):
        """Model FLOPs utilisation: achieved training FLOP/s over the GPU's peak bf16 FLOP/s (PaLM, appendix B)."""
        L, H, Q, T = self.cfg.n_layer, self.cfg.n_head, self.cfg.n_embd // self.cfg.n_head, self.cfg.block_size
        flops_per_token = 6 * self.num_params(active=True) + 12 * L * H * Q * T
        name = torch.cuda.get_device_name(device)
        peak = next(
            (v for k, v in {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}.items() if k in name), 312e12
        )
        return flops_per_token * tokens_per_sec / peak

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0, ban=()):
        """Append max_new_tokens tokens to idx (B, T), each sampled from the model's next-token distribution after a
        repetition penalty, banned sequences (ban: lists of token ids), temperature, top-k and top-p, in this order."""
        for _ in range(max_new_tokens):
            context = idx[:, -self.cfg.block_size :]  # the model sees at most block_size tokens
            logits, _ = self(context, start=context.size(1) - 1)  # the logits of the last position only
            logits = logits[:, -1, :].float()
            if repetition_penalty != 1.0:  # CTRL (Keskar et al. 2019): every token already in the text is less likely
                seen = logits.gather(1, idx)
                logits.scatter_(1, idx, torch.where(seen > 0, seen / repetition_penalty, seen * repetition_penalty))
            for seq in ban:  # a banned sequence loses its last token wherever the tokens before it were just generated
                prefix = torch.tensor(seq[:-1], device=idx.device)
                if idx.size(1) >= len(prefix):
                    hit = (idx[:, idx.size(1) - len(prefix) :] == prefix).all(dim=1)
                    logits[hit, seq[-1]] = float("-inf")
            if temperature == 0:  # greedy
                idx_next = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = float("-inf")
                if top_p < 1.0:
                    logits = top_p_filter(logits, top_p)
                idx_next = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx


def top_p_filter(logits, p):
    """Nucleus sampling (Holtzman et al. 2020): keep the smallest set of most likely tokens whose probabilities sum to
    at least p, -inf for the rest. logits (B, V)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = F.softmax(sorted_logits, dim=-1)
    before = probs.cumsum(dim=-1) - probs  # the mass of the more likely tokens
    sorted_logits[before >= p] = float("-inf")  # p was reached without this token: drop it (the first always stays)
    return logits.scatter(-1, order, sorted_logits)


def upcycle(model, cfg, x):
    """Replace the MLP of each layer in --moe_layers by n_experts copies of it and a router; x, a batch of token ids,
    shows that the logits did not change."""
    if cfg.n_experts == 1 or model.moes():
        return
    with torch.no_grad():
        dense, _ = model.eval()(x)
        before = model.num_params()
        for i in moe_layer_ids(cfg):
            model.blocks[i].mlp = MoE.from_dense(model.blocks[i].mlp, cfg)
        model.cfg = cfg
        diff = (model.eval()(x)[0] - dense).abs().max().item()
    model.train()
    layers = ", ".join(map(str, moe_layer_ids(cfg)))
    what = f"the MLPs of layers {layers} into {cfg.n_experts} experts each, top-{cfg.moe_k}"
    sizes = f"{before / 1e6:.2f}M -> {model.num_params() / 1e6:.2f}M parameters"
    print(f"upcycled {what}: {sizes}; largest logit change {diff:.1e}")


# ----------------------------------------------------------------------------------------------------------
# LoRA: low-rank adapters on frozen weights


class LoRALinear(nn.Module):
    """A frozen nn.Linear and a trainable low-rank update beside it (Hu et al. 2021, arXiv 2106.09685):
    y = base(x) + (alpha / r) * B(A(dropout(x))). A (r x in) starts random, Kaiming-uniform (nn.Linear's
    initialisation, as in the paper's code and peft); B (out x r) starts at zero, so the layer first computes exactly
    what base does, and training moves W by the rank-r matrix (alpha / r) B A alone."""

    def __init__(self, base, rank, alpha, dropout):
        super().__init__()
        self.base, self.scale = base, alpha / rank
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=base.weight.device)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=base.weight.device)
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.base(x) + self.scale * self.lora_B(self.lora_A(self.dropout(x)))

    @torch.no_grad()
    def merged(self):
        """base with the update folded into its weight, W + (alpha / r) B A: the same layer as a plain nn.Linear."""
        self.base.weight += self.scale * self.lora_B.weight @ self.lora_A.weight
        return self.base


# what each --lora_targets name adapts: these Linear layers of every module of this class
LORA_TARGETS = {"attn": (CausalSelfAttention, ("c_attn", "c_proj")), "mlp": (MLP, ("c_fc", "c_proj"))}


def add_lora(model, cfg, base, train=()):
    """LoRA: freeze every weight of model and wrap the Linear layers --lora_targets names in LoRALinear adapters, which
    train, with the modules in train (new ones, which no pretrained checkpoint holds). model.lora_base names what the
    adapters apply to: base (the pretrained checkpoint's path or name) and the sha256 of the frozen weights, which a
    LoRA checkpoint keeps in their place."""
    model.requires_grad_(False)
    for target in cfg.lora_targets.split(","):
        cls, names = LORA_TARGETS[target]
        for module in [m for m in model.modules() if isinstance(m, cls)]:
            for name in names:
                adapter = LoRALinear(getattr(module, name), cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout)
                setattr(module, name, adapter)
    for module in train:
        module.requires_grad_(True)
    sha = hashlib.sha256()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            sha.update(f"{name} {tuple(p.shape)} {p.dtype}".encode())
            sha.update(p.detach().flatten().view(torch.uint8).cpu().numpy())
    model.lora_base = {"path": base, "sha256": sha.hexdigest()}


def load_adapters(model, ckpt, path):
    """Into model, given adapters by add_lora, what a LoRA checkpoint (at path) trained; refused in one line when the
    frozen weights of model are not the ones it was trained on."""
    if model.lora_base["sha256"] != ckpt["lora_base"]["sha256"]:
        fix = "put back the pretrained checkpoint they were trained on, or finetune again"
        die(f"{path} holds adapters for other weights than {model.lora_base['path']} (their sha256 differs); {fix}")
    model.load_state_dict({**model.state_dict(), **ckpt["model"]})


def saved_weights(model):
    """What a checkpoint keeps of model: its state dict; with adapters only what trains, and lora_base, which names the
    frozen weights in their place."""
    if not hasattr(model, "lora_base"):
        return {"model": model.state_dict()}
    trains = {name for name, p in model.named_parameters() if p.requires_grad}
    return {"model": {k: v for k, v in model.state_dict().items() if k in trains}, "lora_base": model.lora_base}


def lora_note(model):
    """The start-up line's account of a model with adapters: what trains, of how many parameters."""
    if not hasattr(model, "lora_base"):
        return ""
    trains = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    share = f"{trains:,} of {total:,} parameters train ({100 * trains / total:.2f}%)"
    return f", LoRA rank {model.cfg.lora_rank} on {model.cfg.lora_targets}: {share}"


def save_merged(model, ckpt, path):
    """--lora_merge: model, built from the LoRA checkpoint ckpt at path, with every adapter folded into its layer, saved
    beside it as merged.pt: an ordinary checkpoint of the same model, which samples and starts runs without LoRA."""
    if "lora_base" not in ckpt:
        die(f"{path} holds no adapters (its run had no --lora_rank): there is nothing to merge")
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, LoRALinear):
                setattr(module, name, child.merged())
    del model.lora_base
    merged = os.path.join(os.path.dirname(path), "merged.pt")
    state = {k: v for k, v in ckpt.items() if k != "lora_base"}
    save_checkpoint(merged, {**state, "model": model.state_dict(), "config": {**ckpt["config"], "lora_rank": 0}})
    print(f"saved {merged}: the model of {path}, its adapters folded into the weights")


def lora_start(model, cfg):
    """--lora_rank: adapters (add_lora) on the upcycled starting model. An upcycled layer's experts are MLPs, each with
    adapters of its own, through which the copies move apart; its router, new, trains whole."""
    add_lora(model, cfg, cfg.init_from, [moe.router for moe in model.moes()])


# ----------------------------------------------------------------------------------------------------------
# Training


def reset_usage(model):
    """Zero every MoE layer's count of its experts' choices (made in eval mode, in MoE.forward)."""
    for m in model.modules():
        if isinstance(m, MoE):
            m.usage.zero_()


def expert_usage(model):
    """One line per layer: how often each expert was chosen in the last evaluation, in % of its layer's choices."""
    lines = []
    for i, block in enumerate(model.blocks):
        if isinstance(block.mlp, MoE):
            usage = block.mlp.usage
            share = (100 * usage / usage.sum(-1, keepdim=True).clamp(min=1)).round().long().tolist()
            lines.append(f"  layer {i} expert use (%) | mlp {' '.join(f'{p:3d}' for p in share)}")
    return lines


@torch.no_grad()
def estimate_loss(model, loader, cfg, autocast):
    """Mean loss over eval_iters batches per split; the same batches every time, so evaluations compare."""
    model.eval()
    out = {}
    for split in ("train", "val"):
        reset_usage(model)  # count the experts' choices afresh: what is left at the end is the val split's
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
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    accum = cfg.gradient_accumulation_steps // world_size  # this process's micro-batches per step
    # the bookkeeping around the step (shared section); on --resume it restores the optimizer and the random states.
    # A checkpoint holds saved_weights(run.model), the model itself (not compiled, not DDP): with LoRA what trains
    vocab = {"tokenizer": tok.name, "vocab": tok.chars}
    run = Run(cfg, model, optimizer, gen, tokens, ckpt, extra=lambda: {**vocab, **saved_weights(run.model)})
    if cfg.compile:
        print("compiling the model (takes a minute)...")
        torch._dynamo.config.capture_scalar_outputs = True  # the experts' group sizes stay inside the graph
        model = torch.compile(model)
    eval_model = model  # evaluation runs outside DDP: every rank scores the same batches, with no communication
    if world_size > 1:  # DDP copies rank 0's weights to every rank
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    for it in range(run.iter_num, cfg.max_iters + 1):
        if world_size > 1:  # Ctrl-C or SIGTERM to any process: every rank stops at this iteration, rank 0 saves
            stop_together(run, it, device)
        else:
            run.stop_if_requested(it)  # Ctrl-C or SIGTERM: save the state at this iteration and exit
        lr = get_lr(it, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if it % cfg.eval_interval == 0 or it == cfg.max_iters:  # print, log, save ckpt.pt (best.pt when val improves)
            run.evaluate(it, lr, estimate_loss(eval_model, loader, cfg, autocast))
            for line in expert_usage(run.model):
                print(line)
        if it == cfg.max_iters:
            break

        # forward and backward, gradients summed over this process's micro-batches (DDP averages over the processes)
        step_loss = torch.zeros((), device=device)  # the mean over the micro-batches, which the log shows
        for micro in range(accum):
            x, y = loader.get_batch("train", gen, rank, world_size)  # on a GPU this overlaps with the last kernels
            sync = world_size == 1 or micro == accum - 1  # DDP all-reduces the gradients once, in the last backward
            with nullcontext() if sync else model.no_sync():
                with autocast:
                    _, loss = model(x, y)
                scaler.scale(loss / accum).backward()  # the sum over micro-batches is the mean
            step_loss += loss.detach() / accum
        # step: clip the gradient norm, update the weights
        if cfg.grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if world_size > 1 and it % cfg.log_interval == 0:  # log the mean over every process's micro-batches
            dist.all_reduce(step_loss)
            step_loss /= world_size
        run.log(it, lr, step_loss)  # every log_interval iterations: a line and a row of log.csv
    return run.finish()


def setup_ddp(cfg):
    """Under torchrun (which sets RANK, LOCAL_RANK, WORLD_SIZE): join the process group, one process per device: with
    --device auto or cuda and GPUs at hand, GPU LOCAL_RANK (nccl), which setup_device then takes; else the CPU (gloo).
    Every process but rank 0 prints nothing and logs nothing. Returns this process's rank: 0 without torchrun."""
    if "RANK" not in os.environ:
        return 0
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if cfg.gradient_accumulation_steps % world_size:  # it counts the micro-batches of all processes
        die(f"--gradient_accumulation_steps {cfg.gradient_accumulation_steps} must be a multiple of {world_size}")
    if cfg.device in ("auto", "cuda") and torch.cuda.is_available():  # a GPU per process
        gpus, per_node = torch.cuda.device_count(), int(os.environ["LOCAL_WORLD_SIZE"])
        if per_node > gpus:  # the same verdict on every rank
            die(f"torchrun --nproc_per_node {per_node}: this machine has {gpus} GPU(s)")
        cfg.device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(cfg.device)
    backend = "nccl" if cfg.device.startswith("cuda") and torch.cuda.is_available() else "gloo"
    # the others wait while the first process on their machine downloads and encodes the data: allow an hour
    dist.init_process_group(backend, timeout=timedelta(minutes=60))
    atexit.register(dist.destroy_process_group)  # however the process ends: exiting with a live group can abort
    if rank:
        sys.stdout, cfg.wandb = open(os.devnull, "w"), False
    accum = cfg.gradient_accumulation_steps // world_size
    print(f"DDP ({backend}): {world_size} processes x {accum} micro-batches per step")
    return rank


def stop_together(run, it, device):
    """Under torchrun, run.stop_if_requested(it): Ctrl-C or SIGTERM to any process (an all-reduce of STOP.requested)
    stops every rank at this iteration, rank 0 saving, and none exits before it has saved, since torchrun ends every
    process once one exits."""
    stop = torch.tensor(float(STOP.requested), device=device)
    dist.all_reduce(stop, op=dist.ReduceOp.MAX)
    if not stop.item():
        return
    try:
        if dist.get_rank() == 0:
            STOP.requested = True
            run.stop_if_requested(it)  # saves, says so and exits
    finally:
        dist.barrier()
    sys.exit(130)


@contextmanager
def local_rank_zero_first(device):
    """Under torchrun the first process on each machine runs the block (download, encoding) before the others, which
    then find its files and reuse them; if it stops (a user error), the others exit too, with its status 2."""
    first = int(os.environ.get("LOCAL_RANK", 0)) == 0
    done = torch.ones((), device=device)  # becomes 0 where a first process failed
    if dist.is_initialized() and not first:
        dist.all_reduce(done, op=dist.ReduceOp.MIN)  # waits for the first processes
        if not done.item():
            sys.exit(2)  # the first process said why
    try:
        yield
    except BaseException:
        done.zero_()
        raise
    finally:
        if dist.is_initialized() and first:
            dist.all_reduce(done, op=dist.ReduceOp.MIN)  # lets the others go on


# ----------------------------------------------------------------------------------------------------------
# The starting model (GPT-2's weights, a checkpoint, or a small GPT-2 from scratch), and test perplexity


def checkpoint_weights(path, device):
    """A checkpoint of ex3 --tokenizer gpt2 or of this script: its architecture and state dict. ex3's GPT is ex1's,
    parameter for parameter, with the exact GELU and no experts; this script's checkpoints say what they have."""
    ckpt = load_checkpoint(path, device, scripts=(SCRIPT, "ex3_pretrain_finetune"))
    if ckpt.get("tokenizer") != "gpt2":
        die(f"{path} was trained with a character vocabulary, not GPT-2's BPE; train one with ex3 --tokenizer gpt2")
    if "lora_base" in ckpt:
        die(f"{path} holds LoRA adapters, not a whole model; start from the merged.pt that --lora_merge writes")
    saved = {"gelu": "none", "n_experts": 1, "moe_k": 1, "moe_layers": "odd", **ckpt["config"]}  # ex3's lacks these
    return {name: saved[name] for name in DENSE + EXPERTS}, ckpt["model"], ckpt["model"]["lm_head.weight"].size(0)


def start_model(cfg, tok, device):
    """The model fine-tuning starts from, the same every call (seeded); sets cfg's architecture to it. Dense, unless
    it is a checkpoint of this script that has experts (they are kept)."""
    torch.manual_seed(cfg.seed)
    if cfg.init_from == "scratch":
        cfg.block_size = cfg.block_size or 128
        return GPT(replace(cfg, n_experts=1), tok.vocab_size).to(device)
    if cfg.init_from in GPT2_MODELS:
        arch, sd, vocab_size = hf_weights(cfg.init_from)
    else:
        arch, sd, vocab_size = checkpoint_weights(cfg.init_from, device)
    if vocab_size != tok.vocab_size:
        die(f"--init_from {cfg.init_from} has a vocabulary of {vocab_size}, not GPT-2's {tok.vocab_size}")
    context, arch["block_size"] = arch["block_size"], cfg.block_size or arch["block_size"]
    if arch["block_size"] > context:
        die(f"--block_size {cfg.block_size} is longer than the context of the starting model ({context} tokens)")
    for name in DENSE + (EXPERTS if arch["n_experts"] > 1 else ()):  # experts: only a checkpoint's, if it has any
        setattr(cfg, name, arch[name])
    model = GPT(replace(cfg, n_experts=arch["n_experts"]), tok.vocab_size).to(device)
    model.load_state_dict({**sd, "wpe.weight": sd["wpe.weight"][: cfg.block_size]})  # a shorter context: the first
    return model


def load_model(cfg, ckpt, path, tok, device):
    """The model of the checkpoint ckpt at path; none: the starting model (start_model), upcycled, with adapters under
    --lora_rank. A LoRA checkpoint's model is the starting model it names, upcycled, with its adapters and routers,
    refused when the starting model's weights are not the ones they were trained on."""
    if ckpt and "lora_base" not in ckpt:
        model = GPT(cfg, tok.vocab_size).to(device)
        model.load_state_dict(ckpt["model"])
        return model
    model = start_model(cfg, tok, device)
    upcycle(model, cfg, torch.arange(cfg.block_size, device=device)[None])  # any tokens show that no logit changed
    if cfg.lora_rank:
        lora_start(model, cfg)
    if ckpt:
        load_adapters(model, ckpt, path)
    return model


def window_stride(cfg):
    """The test windows' distance: --test_stride, or half a window; at most a window, at least one token."""
    return min(cfg.test_stride or cfg.block_size // 2, cfg.block_size) or 1


@torch.no_grad()
def perplexity(model, ids, cfg, device, autocast):
    """exp(mean loss) over every token of ids after the first, with a sliding window: windows of block_size tokens
    test_stride apart, each scoring only the tokens that no earlier window scored (the first window all of its own), so
    every token is predicted once, with at least block_size - test_stride tokens of context where the text allows.
    Under DDP each process scores a share of the windows. Returns (perplexity, total loss in nats, tokens scored)."""
    T, stride = cfg.block_size, window_stride(cfg)
    windows, done = [], 0  # (start, length, new tokens); done: the targets ids[1 : done + 1] are already scored
    for s in range(0, len(ids) - 1, stride):
        length = min(T, len(ids) - 1 - s)
        windows.append((s, length, s + length - done))
        done = s + length
        if done == len(ids) - 1:
            break
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    model.eval()
    reset_usage(model)
    nll = torch.zeros((), dtype=torch.float64, device=device)
    for (length, new), group in itertools.groupby(windows[rank::world_size], key=lambda w: w[1:]):  # batched by shape
        starts = np.array([w[0] for w in group])
        for b in range(0, len(starts), cfg.batch_size):
            xy = ids[starts[b : b + cfg.batch_size, None] + np.arange(length + 1)]
            xy = torch.from_numpy(xy.astype(np.int64)).to(device)
            with autocast:
                _, loss = model(xy[:, :-1], xy[:, 1:], start=length - new)
            nll += loss.double() * new * len(xy)
    if dist.is_initialized():
        dist.all_reduce(nll)
    model.train()
    return math.exp(nll.item() / (len(ids) - 1)), nll.item(), len(ids) - 1


def report_perplexity(model, ids, words, cfg, device, autocast, when):
    """Print the test perplexity per token and per word (words: those of the test split, as load_wikitext counts
    them), and where the model has experts, their use on the test split."""
    t0 = time.time()
    ppl, nll, n = perplexity(model, ids, cfg, device, autocast)
    per_word = f"{math.exp(nll / words):.2f} per word ({words:,})"
    window = f"window {cfg.block_size}, stride {window_stride(cfg)} | {time.time() - t0:.1f} s"
    print(f"test perplexity {when}: {ppl:.2f} per token ({n:,} tokens), {per_word} | {window}")
    for line in expert_usage(model):
        print(line)
    return ppl


# ----------------------------------------------------------------------------------------------------------
# Sampling and main


def clean_wikitext(text):
    """WikiText's tokenisation undone for reading: 1 @,@ 000 -> 1,000, well @-@ known -> well-known, 3 @.@ 5 -> 3.5,
    no space before closing punctuation or after opening brackets, it 's -> it's, " quoted " -> "quoted", <unk>
    removed."""
    text = re.sub(r" @(.)@ ", r"\1", text)
    text = re.sub(r" ?<unk>", "", text)
    text = re.sub(r" ([.,;:!?%)\]}]|'s\b|'t\b|'re\b|'ve\b|'ll\b|'d\b|'m\b)", r"\1", text)
    text = re.sub(r"([(\[{$]) ", r"\1", text)
    text = re.sub(r'" ([^"\n]*?) "', r'"\1"', text)
    return re.sub(r"(?m)^ +| +$", "", re.sub(r"  +", " ", text))


def banned_sequences(words, tok):
    """The token sequences --ban forbids: each comma-separated word, with and without a leading space."""
    words = filter(None, (s.strip() for s in words.split(",")))
    return [seq for w in words for seq in {tuple(tok.encode(w)), tuple(tok.encode(" " + w))}]


def sample(model, tok, cfg, device, autocast, prompt):
    """The fine-tuned model continues the prompt, after the model it started from (--compare), with the same seed."""
    idx = torch.tensor([tok.encode(prompt)] * cfg.num_samples, dtype=torch.long, device=device)
    ban = [list(seq) for seq in banned_sequences(cfg.ban, tok)]
    start = {"starting model": start_model(replace(model.cfg), tok, device)} if cfg.compare else {}
    for name, m in {**start, "fine-tuned": model}.items():
        torch.manual_seed(cfg.seed)  # the same --seed draws the same samples
        m.eval()
        with autocast:
            out = m.generate(
                idx, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p, cfg.repetition_penalty, ban
            )
        for i, row in enumerate(out.tolist()):
            text = tok.decode(row)
            print(f"--- sample {i + 1}, {name} ---\n{clean_wikitext(text) if cfg.clean else text}")


def main(argv=None):
    cfg = parse_args(argv)
    rank = setup_ddp(cfg)  # under torchrun: before setup_device, which takes the GPU it picks
    device, autocast = setup_device(cfg)
    tok = GPT2Tokenizer()

    if cfg.prompt or cfg.lora_merge:  # sampling or merging only: the checkpoint (and the starting model LoRA's names)
        path = os.path.join(cfg.out_dir, "best.pt")
        ckpt = load_checkpoint(path, device)
        model = load_model(Config(**ckpt["config"]), ckpt, path, tok, device)
        if cfg.lora_merge:
            save_merged(model, ckpt, path)
        if cfg.prompt:
            sample(model, tok, cfg, device, autocast, cfg.prompt)
        return

    ckpt, ckpt_path = None, os.path.join(cfg.out_dir, "ckpt.pt")
    if cfg.resume:
        ckpt = load_checkpoint(ckpt_path, device)
        resume_config(cfg, ckpt["config"], RESUMED, kept=("max_iters", "lr_decay_iters"))
    elif cfg.max_iters:  # a zero-shot run (--max_iters 0) writes no checkpoint
        check_out_dir(cfg.out_dir, cfg.overwrite)
    with local_rank_zero_first(device):  # under torchrun one process per machine downloads; the others reuse its files
        model = load_model(cfg, ckpt, ckpt_path, tok, device)  # the same on every rank (seeded)
        splits, words = load_wikitext(cfg, tok)
    loader = DataLoader(splits, cfg, device)
    torch.manual_seed(cfg.seed + rank)  # other dropout masks on each rank; DDP gives every rank rank 0's weights
    used = f"{model.num_params(active=True) / 1e6:.2f}M used per token"
    print(f"{model.num_params() / 1e6:.2f}M parameters ({used}){lora_note(model)}, device {device}, dtype {cfg.dtype}")
    # a resumed run starts from its checkpoint's model: that is what its first perplexity measures
    start = f"at iter {ckpt['iter_num']}, where this run resumed" if ckpt else "before fine-tuning"
    first = report_perplexity(model, splits["test"], words, cfg, device, autocast, start)
    if cfg.max_iters == 0 and not ckpt:  # zero-shot: the starting model's perplexity only
        return
    with STOP:  # Ctrl-C in training saves the state after the iteration (a second one, or elsewhere: at once)
        train(cfg, model, loader, tok, device, autocast, ckpt)
        if dist.is_initialized():
            dist.barrier()  # rank 0 has written best.pt
        best = load_checkpoint(os.path.join(cfg.out_dir, "best.pt"), device)  # the lowest val loss
        model.load_state_dict({**model.state_dict(), **best["model"]})  # a LoRA checkpoint's holds only what trains
        end = "after fine-tuning (best val checkpoint)"
        after = report_perplexity(model, splits["test"], words, cfg, device, autocast, end)
        print(f"test perplexity per token: {first:.2f} {start} | {after:.2f} after fine-tuning")
        if rank == 0:
            sample(model, tok, cfg, device, autocast, tok.start)


# ----------------------------------------------------------------------------------------------------------
# Downloading: the Hub, WikiText-2, GPT-2's weights


@cache
def hub_unreachable():
    """The Hugging Face Hub's host if it does not answer within 3 s, else "". Offline, datasets and transformers retry
    for half a minute before they fail; told so (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE, set here before they are
    imported) they load what they cached and fail at once on the rest."""
    hub = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    if not any(os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HTTPS_PROXY", "https_proxy")):
        port = hub.port or (443 if hub.scheme == "https" else 80)
        try:  # offline, datasets retries for half a minute before it fails: ask the Hub first, for 3 s
            socket.create_connection((hub.hostname, port), timeout=3).close()
        except OSError:
            os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
            return hub.hostname
    return ""


def download_wikitext(folder):
    """WikiText-2 through datasets, each split written once into folder as a text file (a row of the dataset a line)."""
    name, config = WIKITEXT
    fix = "pass --data with a folder holding WikiText-2's train.txt, valid.txt and test.txt"
    offline = hub_unreachable()  # before datasets is imported: it reads HF_DATASETS_OFFLINE then
    try:
        from datasets import load_dataset
    except ImportError:
        die(f"downloading {config} needs the datasets package (pip install datasets); or {fix}")
    print(f"downloading {name} ({config}) through datasets -> {folder}")
    try:
        ds = load_dataset(name, config)
    except Exception as e:  # offline (HF_DATASETS_OFFLINE=1 included), the Hub unreachable
        reason = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
        if offline:
            reason = f"{offline} does not answer, and datasets has not cached it"
        die(f"could not download {name} ({config}) ({reason}); {fix}")
    os.makedirs(folder, exist_ok=True)
    for split, hf_split in SPLITS.items():
        path = os.path.join(folder, f"{split}.txt")
        with open(path + ".part", "w", encoding="utf-8") as f:
            f.write("".join(row.rstrip("\n") + "\n" for row in ds[hf_split]["text"]))
        os.replace(path + ".part", path)


def from_hf(hf):
    """A transformers GPT2LMHeadModel as (architecture, state dict, vocabulary size) for GPT. GPT-2's Conv1D layers keep
    their weights as (in, out), a Linear as (out, in): the four matrices of each block are transposed; every name loses
    'transformer.'."""
    c = hf.config
    gelu = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}.get(c.activation_function)
    width, eps, scaled = (c.n_inner or 4 * c.n_embd) == 4 * c.n_embd, c.layer_norm_epsilon == 1e-5, c.scale_attn_weights
    if gelu is None or not (width and eps and scaled) or c.scale_attn_by_inverse_layer_idx:
        die("this GPT-2 configuration's activation, MLP width, LayerNorm epsilon or attention scaling is not GPT-2's")
    if not c.tie_word_embeddings:  # GPT ties them: loading it would replace one matrix by the other
        die("this GPT-2 configuration has untied input and output embeddings (tie_word_embeddings=False): not GPT-2's")
    arch = dict(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, block_size=c.n_positions, bias=True, gelu=gelu)
    sd = {}
    for name, w in hf.state_dict().items():
        if name.split(".")[-2:] in (["attn", "bias"], ["attn", "masked_bias"]):
            continue  # the causal-mask buffers of older transformers versions
        name = re.sub(r"^h\.", "blocks.", re.sub(r"^transformer\.", "", name))
        if re.search(r"\.(c_attn|c_proj|c_fc)\.weight$", name):
            w = w.t()
        sd[name] = w.float().contiguous()
    sd.setdefault("lm_head.weight", sd["wte.weight"])  # tied
    return {**arch, "n_experts": 1}, sd, c.vocab_size


def hf_weights(name):
    """OpenAI's GPT-2 through transformers, downloaded into the Hugging Face cache once."""
    fix = "start from a checkpoint of this repository (--init_from PATH) or random weights (--init_from scratch)"
    offline = hub_unreachable()
    if offline:  # say so now if it was never downloaded, rather than after importing transformers
        try:
            from huggingface_hub import try_to_load_from_cache

            if not isinstance(try_to_load_from_cache(name, "config.json"), str):
                die(f"could not load --init_from {name}: {offline} does not answer, and it is not cached; {fix}")
        except ImportError:
            pass  # nor is transformers: said below
    try:
        from transformers import GPT2LMHeadModel
    except ImportError:
        die(f"--init_from {name} needs the transformers package (pip install transformers); or {fix}")
    print(f"loading {name} from the Hugging Face {f'cache ({offline} does not answer)' if offline else 'Hub'}")
    try:
        hf = GPT2LMHeadModel.from_pretrained(name)
    except OSError as e:  # offline (HF_HUB_OFFLINE=1 included), the Hub unreachable
        reason = (str(e).strip().splitlines() or [""])[0][:150]
        die(f"could not load --init_from {name} ({type(e).__name__}: {reason}); connect once to cache it, or {fix}")
    return from_hf(hf)


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
