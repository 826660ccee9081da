"""
ex3_pretrain_finetune.py: ex1's GPT pretrained on a large corpus in TinyShakespeare's vocabulary, then finetuned on it.

Changes from ex1_gpt.py:
- Stages, each with its checkpoint and log in out_dir/<stage> (--stage, --finetune_iters, --finetune_learning_rate):
  pretrain on a large corpus; finetune its weights on TinyShakespeare; scratch, the same budget from random weights
  (ex1's recipe); all runs the three and compares them: stage_checkpoints, check_vocabulary, run_stage, main.
- The pretraining corpus (--pretrain_data, --pretrain_tokens, --data_dir, --unknown): FineWeb-Edu streamed through
  `datasets`, or local text files, encoded in TinyShakespeare's vocabulary once into a uint16 memmap under data/ and
  read at random offsets, so that it need not fit in memory: CharTokenizer.encode_corpus, DataLoader, and after main
  pretrain_files, read_documents, stream_web_text, write_corpus, prepare_pretrain_data.
- GPT-2's BPE instead of characters (--tokenizer gpt2, as flash_moe_finetune.py's models need): GPT2Tokenizer.
- Distributed data parallel under torchrun: one process per device (nccl on GPUs, gloo on the CPU), each computing its
  share of a step's micro-batches, gradients all-reduced once per step; rank 0 alone logs and saves, and the losses
  are one process's. On several machines each encodes its own corpus, and --resume needs out_dir on shared storage:
  DataLoader.get_batch, GPT.estimate_mfu, train, setup_ddp, stop_together, local_rank_zero_first, main.
- LoRA in the finetune stage (Hu et al. 2021, arXiv 2106.09685; --lora_rank, --lora_alpha, --lora_targets,
  --lora_dropout): the pretrained weights frozen, the Linear layers of attention and of the MLPs given a trainable
  low-rank update (alpha / r) B A beside them, B zero at first, so that finetuning starts from the pretrained model
  exactly. Checkpoints keep only what trains, with the pretrained checkpoint's path and the sha256 of its weights
  (refused on other weights); --lora_merge folds the updates into best.pt's weights as merged.pt, an ordinary
  checkpoint: the LoRA section, load_model, run_stage.

Run:     python ex3_pretrain_finetune.py --pretrain_data ../shared/data/gutenberg/books   (CPU, about 20 min)
Web:     python ex3_pretrain_finetune.py               (first streams 100M characters of FineWeb-Edu into data/)
1 node:  torchrun --standalone --nproc_per_node 8 ex3_pretrain_finetune.py --stage pretrain --tokenizer gpt2 \
             --n_layer 12 --n_head 12 --n_embd 768 --block_size 1024 --batch_size 16 --gradient_accumulation_steps 32 \
             --learning_rate 6e-4 --min_lr 6e-5 --warmup_iters 700 --max_iters 5000 --pretrain_tokens 1000000000 \
             --compile
2 nodes: the same flags after  torchrun --nnodes 2 --node_rank 0 (1 on the second) --nproc_per_node 8 \
             --master_addr IP_OF_NODE_0 --master_port 29500 ex3_pretrain_finetune.py
LoRA:    python ex3_pretrain_finetune.py --stage finetune --lora_rank 8 --finetune_learning_rate 3e-3 --overwrite
Sample:  python ex3_pretrain_finetune.py --prompt "ROMEO:" --num_samples 3     (--stage picks the checkpoint)
Parent:  ex1_gpt.py (diff -u ex1_gpt.py ex3_pretrain_finetune.py)
Result:  RESULTS.md, "ex3_pretrain_finetune.py" (benchmarks/bench_ex3.py, benchmarks/bench_lora.py).
"""

import argparse
import atexit
import csv
import hashlib
import inspect
import json
import math
import os
import re
import signal
import socket
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, fields, replace
from datetime import timedelta
from typing import Literal, get_args

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

SCRIPT = os.path.splitext(os.path.basename(__file__))[0]
DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
DATA_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
# Parquet files on the Hub: streams with current datasets, no loading script
WEB_DATASET = ("HuggingFaceFW/fineweb-edu", "sample-10BT")
STAGES = ("pretrain", "finetune", "scratch")
# curly apostrophes and dashes, when the vocabulary lacks them
SUBSTITUTES = {"\u2019": "'", "\u2018": "'", "\u2014": "-", "\u2013": "-"}


@dataclass
class Config:
    # I/O
    out_dir: str = f"out/{SCRIPT}"  # each stage writes its checkpoint and log.csv to out_dir/<stage>
    data: str = ""  # finetuning text: a local UTF-8 file (its characters are the vocabulary); empty: TinyShakespeare
    pretrain_data: str = ""  # text files or folders of .txt files to pretrain on, comma-separated; empty: FineWeb-Edu
    pretrain_tokens: int = 100_000_000  # encode at most this many tokens of the pretraining corpus; 0: all of it
    data_dir: str = ""  # downloads and the encoded pretraining corpus go here; empty: data/ next to this script
    tokenizer: Literal["char", "gpt2"] = "char"  # char: the finetuning text's characters; gpt2: GPT-2's BPE (tiktoken)
    unknown: str = ""  # char tokenizer: the vocabulary character that replaces characters outside it; empty: drop them
    stage: Literal["pretrain", "finetune", "scratch", "all"] = "all"  # scratch: finetune's run from random weights
    resume: bool = False  # continue the stage from out_dir/<stage>/ckpt.pt, the latest saved state (all: those begun)
    overwrite: bool = False  # start over in an out_dir holding this script's checkpoints (replaces ckpt.pt and best.pt)
    eval_interval: int = 500  # evaluate and save ckpt.pt every this many iterations (best.pt when val improves)
    eval_iters: int = 200  # batches per split in each evaluation
    log_interval: int = 10  # print and log the training loss every this many iterations
    wandb: bool = False  # also log to Weights & Biases
    wandb_project: str = "gpt-ladder"  # wandb project name
    # model
    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # attention heads per block
    n_embd: int = 128  # embedding width
    block_size: int = 64  # context length in tokens
    dropout: float = 0.0  # dropout probability (0.2 is a good value for the larger GPU model)
    bias: bool = False  # biases in Linear and LayerNorm layers
    flash: bool = True  # fused scaled_dot_product_attention instead of the explicit softmax(QK^T)V
    # training
    seed: int = 1337  # seeds the weights, the batches, dropout and sampling
    batch_size: int = 12  # sequences per micro-batch
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step, over all processes
    max_iters: int = 15000  # optimizer steps of pretraining
    learning_rate: float = 1e-3  # peak learning rate of pretraining and of the from-scratch run
    min_lr: float = 1e-4  # learning rate at the end of the cosine decay
    warmup_iters: int = 100  # linear warmup steps
    lr_decay_iters: int = 0  # pretraining's cosine decay length; 0: max_iters (other stages decay over finetune_iters)
    weight_decay: float = 0.1  # AdamW weight decay, applied to matrices only
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.99  # AdamW beta2 (0.99 since there are few tokens per step)
    grad_clip: float = 1.0  # clip the gradient norm to this; 0 disables
    finetune_iters: int = 2000  # optimizer steps of finetuning, and of the from-scratch run it is compared with
    finetune_learning_rate: float = 5e-4  # peak learning rate of finetuning (from scratch uses learning_rate)
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
    prompt: str = ""  # if set, skip training: load the --stage best.pt (all: finetune) and continue this text
    num_samples: int = 1  # samples to draw
    max_new_tokens: int = 500  # tokens per sample
    temperature: float = 0.8  # <1 sharper, >1 more random
    top_k: int = 200  # sample only among the k most likely tokens; 0 for all

    def mistakes(self):
        """Settings no run can use, a message each (parse_args has refused every negative number already)."""
        ones = ["n_layer", "n_head", "n_embd", "block_size", "batch_size", "gradient_accumulation_steps"]
        ones += ["eval_interval", "eval_iters", "log_interval", "num_samples"]
        yield from (f"--{n} must be at least 1" for n in ones if getattr(self, n) < 1)
        below_one = ("dropout", "beta1", "beta2", "lora_dropout")
        yield from (f"--{n} must be below 1" for n in below_one if getattr(self, n) >= 1)
        if self.n_embd % self.n_head:
            yield f"--n_embd {self.n_embd} must be divisible by --n_head {self.n_head}"
        above_zero = ("learning_rate", "finetune_learning_rate", "lora_alpha")
        yield from (f"--{n} must be above 0" for n in above_zero if getattr(self, n) == 0)
        if self.lora_rank and self.stage not in ("finetune", "all"):
            yield f"--lora_rank gives adapters to the finetune stage, not --stage {self.stage}; use finetune or all"
        if len(self.unknown) > 1:
            yield f"--unknown {self.unknown!r} must be one character, or empty to drop unknown characters"


RESUMED = ("n_layer", "n_head", "n_embd", "block_size", "bias", "data")  # --resume takes these from ckpt.pt
LORA = ("lora_rank", "lora_alpha", "lora_targets")  # the adapters' shape, which --resume takes from ckpt.pt too
RESUMED += ("pretrain_data", "pretrain_tokens", "data_dir", "tokenizer", "unknown") + LORA  # and the corpus's flags


# ----------------------------------------------------------------------------------------------------------
# Data


def load_text(cfg):
    """The finetuning text: --data, or TinyShakespeare (downloaded into --data_dir the first time)."""
    path = cfg.data or os.path.join(cfg.data_dir or DATA_DIR, "tinyshakespeare.txt")
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

    def __init__(self, chars, unknown=""):
        self.chars = list(chars)
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.vocab_size = len(self.chars)
        self.start = "".join(self.chars[:1])  # sampling starts from the first character: a newline in Shakespeare
        if unknown and unknown not in self.stoi:
            die(f"--unknown {unknown!r} is not in the vocabulary; use one of its characters, e.g. --unknown ' '")
        self.unknown = unknown
        # bulk encoding of the pretraining corpus: one lookup per Unicode code point, -1 outside the vocabulary
        self.lut = np.full(0x110000, -1, dtype=np.int32)
        self.lut[[ord(c) for c in self.chars]] = np.arange(len(self.chars))
        subs = {c: self.stoi[s] for c, s in SUBSTITUTES.items() if c not in self.stoi and s in self.stoi}
        self.lut[[ord(c) for c in subs]] = list(subs.values())
        self.substituted = np.array([ord(c) for c in subs], dtype=np.uint32)
        # between documents: an empty line
        self.separator = np.array([self.stoi["\n"]] * 2 if "\n" in self.stoi else [], dtype=np.int32)

    def encode(self, s):
        if bad := sorted(set(s) - self.stoi.keys()):
            die(f"character(s) {''.join(bad)!r} not in this model's vocabulary; use characters of its training text")
        return [self.stoi[c] for c in s]

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)

    def encode_corpus(self, text, stats):
        """Any text, in bulk: curly apostrophes and dashes become ' and -, every other character outside the vocabulary
        is dropped (or becomes --unknown); stats counts the characters, the substitutions and each unknown character."""
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        ids = self.lut[codes]
        stats["characters"] += len(codes)
        stats["substituted"] += int(np.isin(codes, self.substituted).sum())
        bad = ids < 0
        if bad.any():
            for c, k in zip(*np.unique(codes[bad], return_counts=True)):
                stats["unknown"][chr(c)] = stats["unknown"].get(chr(c), 0) + int(k)
            if self.unknown:
                ids[bad] = self.stoi[self.unknown]
            else:
                ids = ids[~bad]
        return ids


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
            die(f"could not load GPT-2's BPE through tiktoken ({type(e).__name__}); {fix}, or use --tokenizer char")
        self.vocab_size = self.enc.n_vocab  # 50257, which fits in uint16
        self.separator = np.array([self.enc.eot_token], dtype=np.int32)  # <|endoftext|> between documents, as GPT-2's

    def encode(self, s):
        return self.enc.encode_ordinary(s)

    def decode(self, ids):
        return self.enc.decode(ids)

    def encode_corpus(self, text, stats):
        stats["characters"] += len(text)
        return np.array(self.enc.encode_ordinary(text), dtype=np.int32)


def get_tokenizer(name, chars, unknown=""):
    return GPT2Tokenizer() if name == "gpt2" else CharTokenizer(chars, unknown)


class DataLoader:
    """The corpus as a numpy array of token ids, or a memmap on disk; 90% train, 10% val; batches at random offsets."""

    def __init__(self, ids, cfg, device):
        n = int(0.9 * len(ids))
        self.splits = {"train": ids[:n], "val": ids[n:]}
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
        self.n_head, self.dropout, self.flash = cfg.n_head, cfg.dropout, cfg.flash
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
        if self.flash:
            y = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
            )
        else:
            att = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))
            att = att.masked_fill(~self.mask[:T, :T], float("-inf"))
            att = self.attn_dropout(F.softmax(att, dim=-1))
            y = att @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm: normalise the input of each sublayer, keep the residual stream untouched."""

    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg, vocab_size):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(vocab_size, cfg.n_embd)  # token embeddings
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)  # learned position embeddings
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
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

    def num_params(self):
        return sum(p.numel() for p in self.parameters()) - self.wpe.weight.numel()

    def forward(self, idx, targets=None):
        B, T = idx.size()
        assert T <= self.cfg.block_size, f"sequence of {T} tokens is longer than block_size {self.cfg.block_size}"
        x = self.drop(self.wte(idx) + self.wpe(torch.arange(T, device=idx.device)))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        loss = (
            None
            if targets is None
            else F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        )
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
        flops_per_token = 6 * self.num_params() + 12 * L * H * Q * T
        name = torch.cuda.get_device_name(device)
        peak = next(
            (v for k, v in {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}.items() if k in name), 312e12
        )
        return flops_per_token * tokens_per_sec / peak

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=0):
        """Append max_new_tokens tokens to idx (B, T), each sampled from the model's next-token distribution."""
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.cfg.block_size :])  # the model sees at most block_size tokens
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


# ----------------------------------------------------------------------------------------------------------
# Training


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
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    accum = cfg.gradient_accumulation_steps // world_size  # this process's micro-batches per step
    # the bookkeeping around the step (shared section); on --resume it restores the optimizer and the random states.
    # A checkpoint holds saved_weights(run.model), the model itself (not compiled, not DDP): with LoRA what trains
    vocab = {"tokenizer": tok.name, "vocab": tok.chars}
    run = Run(cfg, model, optimizer, gen, tokens, ckpt, extra=lambda: {**vocab, **saved_weights(run.model)})
    if cfg.compile:
        print("compiling the model (takes a minute)...")
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
# Stages


def stage_checkpoints(cfg, stages, device):
    """Before any data is read or any stage trains. With --resume: each stage's ckpt.pt (--stage all: only the stages
    begun), from which the run takes its data and architecture flags. Without: no stage folder this run will write may
    hold a checkpoint (check_out_dir)."""
    if not cfg.resume:
        for stage in stages:
            check_out_dir(os.path.join(cfg.out_dir, stage), cfg.overwrite)
        return {}
    ckpts = {}
    for stage in stages:
        path = os.path.join(cfg.out_dir, stage, "ckpt.pt")
        if cfg.stage != "all" or os.path.exists(path):  # --stage all: a stage not begun starts from the beginning
            ckpts[stage] = load_checkpoint(path, device)
    if not ckpts:  # --stage all --resume with no stage begun
        load_checkpoint(os.path.join(cfg.out_dir, stages[0], "ckpt.pt"), device)
    for ckpt in reversed(ckpts.values()):  # the first stage's flags; a typed value must match every stage's
        resume_config(cfg, ckpt["config"], RESUMED, kept=("max_iters", "lr_decay_iters", "finetune_iters"))
    for stage in stages if cfg.stage == "all" else ():  # say which stages continue, before any trains
        begun = f"continues from iteration {ckpts[stage]['iter_num']}" if stage in ckpts else None
        print(f"--resume: stage {stage} {begun or 'has no ckpt.pt yet: it starts from the beginning'}")
    return ckpts


def check_vocabulary(ckpt, path, tok):
    if (ckpt.get("tokenizer"), ckpt.get("vocab")) != (tok.name, tok.chars):
        old = f"--tokenizer {ckpt.get('tokenizer')}, or another --data"
        die(f"{path} was trained with another vocabulary ({old}); use the same ones, or another --out_dir")


def load_model(cfg, ckpt, path, vocab_size, device):
    """A GPT with the weights of the checkpoint ckpt at path (none: random ones). A LoRA checkpoint's model is the
    pretrained checkpoint it names with its adapters, refused when that checkpoint is missing or its weights are not
    the ones the adapters were trained on."""
    model = GPT(cfg, vocab_size).to(device)
    if ckpt and "lora_base" in ckpt:
        base = ckpt["lora_base"]["path"]
        if not os.path.isfile(base):
            die(f"{path} holds adapters for {base}, which is missing; put it back, or finetune again")
        model.load_state_dict(load_checkpoint(base, device)["model"])
        add_lora(model, cfg, base)
        load_adapters(model, ckpt, path)
    elif ckpt:
        model.load_state_dict(ckpt["model"])
    return model


def run_stage(stage, cfg, tok, ids, device, autocast, ckpt=None):
    """One stage in out_dir/<stage>, continuing from ckpt (its ckpt.pt) under --resume; returns its best val loss and
    its model. pretrain: the large corpus from random weights. finetune: Shakespeare from out_dir/pretrain/best.pt at
    finetune_learning_rate for finetune_iters. scratch: the same budget from random weights at the pretraining
    learning rate: ex1's recipe."""
    cfg = replace(cfg, out_dir=os.path.join(cfg.out_dir, stage))
    if stage != "pretrain":
        cfg.max_iters, cfg.lr_decay_iters = cfg.finetune_iters, 0
    if stage == "finetune":
        cfg.learning_rate = cfg.finetune_learning_rate
    init, init_path = ckpt, os.path.join(cfg.out_dir, "ckpt.pt")
    if stage == "finetune" and not ckpt:  # the pretrained weights; the optimizer starts afresh
        init_path = os.path.join(os.path.dirname(cfg.out_dir), "pretrain", "best.pt")
        if not os.path.isfile(init_path):
            die(f"no checkpoint at {init_path}; run --stage pretrain first, or give the --out_dir that holds pretrain/")
        init = load_checkpoint(init_path, device)
    if init:
        check_vocabulary(init, init_path, tok)
        saved = Config(**init["config"])
        arch = ("n_layer", "n_head", "n_embd", "block_size", "bias") + (LORA if ckpt else ())
        for name in arch:  # the architecture comes from the checkpoint, and a resumed stage's adapters too
            setattr(cfg, name, getattr(saved, name))
    origin = f", from {init_path}" if init else ""
    print(f"=== stage {stage}: {cfg.max_iters} iterations at learning rate {cfg.learning_rate:g}{origin}")
    loader = DataLoader(ids, cfg, device)
    model = load_model(cfg, init, init_path, tok.vocab_size, device)
    if stage == "finetune" and cfg.lora_rank and not ckpt:  # LoRA: only the adapters train (resumed: they are there)
        add_lora(model, cfg, init_path)
    print(f"{model.num_params() / 1e6:.2f}M parameters{lora_note(model)}, device {device}, dtype {cfg.dtype}")
    return train(cfg, model, loader, tok, device, autocast, ckpt), model


# ----------------------------------------------------------------------------------------------------------
# Sampling and main


def sample(model, tok, cfg, device, autocast, prompt):
    idx = torch.tensor([tok.encode(prompt)] * cfg.num_samples, dtype=torch.long, device=device)
    torch.manual_seed(cfg.seed)  # the same --seed draws the same samples
    model.eval()
    with autocast:
        out = model.generate(idx, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k)
    for i, row in enumerate(out.tolist()):
        print(f"--- sample {i + 1} ---\n{tok.decode(row)}")


def main(argv=None):
    cfg = parse_args(argv)
    rank = setup_ddp(cfg)  # under torchrun: before setup_device, which takes the GPU it picks
    device, autocast = setup_device(cfg)
    torch.manual_seed(cfg.seed + rank)  # other dropout masks on each rank; DDP gives every rank rank 0's weights

    if cfg.prompt or cfg.lora_merge:  # sampling or merging only: the checkpoint (and the pretrained one LoRA's names)
        path = os.path.join(cfg.out_dir, "finetune" if cfg.stage == "all" else cfg.stage, "best.pt")
        ckpt = load_checkpoint(path, device)
        tok = get_tokenizer(ckpt["tokenizer"], ckpt["vocab"])
        model = load_model(Config(**ckpt["config"]), ckpt, path, tok.vocab_size, device)
        if cfg.lora_merge:
            save_merged(model, ckpt, path)
        if cfg.prompt:
            sample(model, tok, cfg, device, autocast, cfg.prompt)
        return

    stages = STAGES if cfg.stage == "all" else (cfg.stage,)
    ckpts = stage_checkpoints(cfg, stages, device)
    with local_rank_zero_first(device):  # under torchrun one process per machine downloads and encodes
        text = load_text(cfg)
        tok = get_tokenizer(cfg.tokenizer, sorted(set(text)), cfg.unknown)
        ids = np.array(tok.encode(text), dtype=np.uint16)
        print(f"{len(text):,} characters, vocabulary of {tok.vocab_size}")
        for stage, ckpt in ckpts.items():  # every resumed stage now, not after hours of training the stages before it
            check_vocabulary(ckpt, os.path.join(cfg.out_dir, stage, "ckpt.pt"), tok)
        if cfg.stage == "all":
            DataLoader(ids, cfg, device)  # a finetuning text too short fails now, not after pretraining
        corpus = prepare_pretrain_data(cfg, tok) if "pretrain" in stages else None

    best, models = {}, {}
    with STOP:  # Ctrl-C in training saves the state after the iteration (a second one, or elsewhere: at once)
        for stage in stages:
            data = corpus if stage == "pretrain" else ids
            best[stage], models[stage] = run_stage(stage, cfg, tok, data, device, autocast, ckpts.get(stage))
        if cfg.stage == "all":
            name = os.path.basename(cfg.data) if cfg.data else "TinyShakespeare"
            ft, sc = best["finetune"], best["scratch"]
            gains = f"finetuned {ft:.4f} | from scratch {sc:.4f} | pretraining gains {sc - ft:.4f}"
            print(f"best val loss on {name} after {cfg.finetune_iters} iterations: {gains}")
        if rank == 0:
            sample(models.get("finetune", models[stage]), tok, cfg, device, autocast, tok.start)


# ----------------------------------------------------------------------------------------------------------
# Downloading the data, and the pretraining corpus


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


def pretrain_files(cfg):
    """--pretrain_data: comma-separated files and folders; a folder gives every .txt file under it, in sorted order."""
    files = []
    for p in filter(None, (s.strip() for s in cfg.pretrain_data.split(","))):
        if os.path.isdir(p):
            found = sorted(os.path.join(d, f) for d, _, names in os.walk(p) for f in names if f.endswith(".txt"))
            if not found:
                die(f"--pretrain_data {p}: no .txt files in this folder")
            files += found
        elif os.path.isfile(p):
            files.append(p)
        else:
            die(f"--pretrain_data {p}: no such file or folder")
    return files


def read_documents(files):
    """Each file's text in pieces of at most 16M characters, then None (the end of a document). A Project Gutenberg
    book loses its header and licence: the text outside its '*** START OF' and '*** END OF' lines."""
    for path in files:
        try:
            with open(path, encoding="utf-8-sig") as f:  # text mode: \r\n becomes \n
                first = True
                while piece := f.read(1 << 24):
                    if first and (i := piece.find("*** START OF")) >= 0:
                        piece = piece[piece.find("\n", i) + 1 :]
                    first, end = False, piece.find("*** END OF")
                    yield piece if end < 0 else piece[:end]
                    if end >= 0:
                        break
        except UnicodeDecodeError:
            die(f"{path} is not UTF-8 text")
        yield None


def stream_web_text():
    """FineWeb-Edu's documents, each followed by None, streamed: only what is read is downloaded."""
    name, config = WEB_DATASET
    fix = "pass --pretrain_data with local text files or folders instead"
    hub = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    if not any(os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HTTPS_PROXY", "https_proxy")):
        port = hub.port or (443 if hub.scheme == "https" else 80)
        try:  # offline, datasets retries for half a minute before it fails: ask the Hub first, for 3 s
            socket.create_connection((hub.hostname, port), timeout=3).close()
        except OSError as e:
            die(f"could not reach {hub.hostname} to stream {name} ({e}); {fix}")
    try:
        from datasets import load_dataset
    except ImportError:
        die(f"streaming {name} needs the datasets package (pip install datasets); or {fix}")
    print(f"streaming {name} ({config}) through datasets")
    try:
        for row in load_dataset(name, name=config, split="train", streaming=True):
            yield row["text"]
            yield None
    except Exception as e:  # offline (HF_DATASETS_OFFLINE=1 included), the Hub unreachable, a connection lost midway
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        die(f"could not stream {name} ({type(e).__name__}: {reason}); {fix}")


def write_corpus(docs, tok, cfg, path, n_files=0):
    """Encode docs (text pieces; None ends a document) into path as uint16 ids, with a progress line; the file takes
    its name only when complete, after its statistics in path.json."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    print(f"encoding the pretraining corpus with the {tok.name} tokenizer -> {path}")
    stats, n_docs, t_print = {"tokens": 0, "characters": 0, "substituted": 0, "unknown": {}}, 0, 0.0
    total = f" of {n_files}" if n_files else ""
    cap = f" (at most {cfg.pretrain_tokens / 1e6:,.1f}M)" if cfg.pretrain_tokens else ""

    def show():
        print(f"\r  {n_docs:,}{total} documents, {stats['tokens'] / 1e6:,.1f}M tokens{cap}", end="", flush=True)

    tmp = f"{path}.{os.getpid()}.part"
    try:
        with open(tmp, "wb") as f:
            for piece in docs:
                ids = tok.separator if piece is None else tok.encode_corpus(piece, stats)
                n_docs += piece is None
                if cfg.pretrain_tokens:
                    ids = ids[: cfg.pretrain_tokens - stats["tokens"]]
                f.write(ids.astype(np.uint16).tobytes())
                stats["tokens"] += len(ids)
                if time.time() - t_print > 0.5:
                    show()
                    t_print = time.time()
                if cfg.pretrain_tokens and stats["tokens"] >= cfg.pretrain_tokens:
                    break
        show()
        print()
        with open(path.removesuffix(".bin") + ".json", "w") as f:
            json.dump(stats, f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def prepare_pretrain_data(cfg, tok):
    """The pretraining corpus as a read-only uint16 memmap: encoded once into
    data/pretrain-<source>-<tokenizer>-<key>.bin, where the key hashes everything that shapes it (the files' names,
    sizes and times, the vocabulary, --unknown, --pretrain_tokens), and reused by later runs."""
    if cfg.pretrain_data:
        files = pretrain_files(cfg)
        source = [(os.path.abspath(p), os.path.getsize(p), int(os.path.getmtime(p))) for p in files]
        docs = read_documents(files)
    else:  # a generator: nothing is fetched unless the file must be written
        source, docs = list(WEB_DATASET), stream_web_text()
    key = hashlib.sha1(json.dumps([source, tok.name, tok.chars, cfg.unknown, cfg.pretrain_tokens]).encode())
    name = f"pretrain-{'local' if cfg.pretrain_data else 'fineweb-edu'}-{tok.name}-{key.hexdigest()[:10]}.bin"
    path = os.path.join(cfg.data_dir or DATA_DIR, name)
    meta_path = path.removesuffix(".bin") + ".json"
    if os.path.exists(path) and os.path.exists(meta_path):
        print(f"reusing {path}")
    else:
        write_corpus(docs, tok, cfg, path, len(source) if cfg.pretrain_data else 0)
    with open(meta_path) as f:
        meta = json.load(f)
    print(f"pretraining corpus: {meta['tokens']:,} tokens from {meta['characters']:,} characters")
    if meta["substituted"]:
        print(f"  {meta['substituted']:,} curly apostrophes and dashes written as ' and -")
    if n_unknown := sum(meta["unknown"].values()):
        common = ", ".join(f"{c!r} {k:,}" for c, k in sorted(meta["unknown"].items(), key=lambda ck: -ck[1])[:8])
        fate = f"replaced by {cfg.unknown!r}" if cfg.unknown else "dropped"
        share = f"{100 * n_unknown / meta['characters']:.2f}%"
        print(f"  {n_unknown:,} characters outside the vocabulary ({share}) {fate}; most common: {common}")
    if meta["tokens"] < 10 * (cfg.block_size + 1):  # the val split, a tenth, must hold a block
        die(f"{meta['tokens']:,} pretraining tokens are too few for --block_size {cfg.block_size}; add text")
    return np.memmap(path, dtype=np.uint16, mode="r")


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
