"""
gan_text.py: a text GAN. The SwitchHead GPT of switchhead_moe.py is the generator, an LSTM classifier the discriminator,
and the generator learns from the discriminator through REINFORCE (SeqGAN, Yu, Zhang, Wang, Yu, AAAI 2017).

Three phases, each with its own step count. 1. MLE pre-training of the generator (--max_iters). 2. Pre-training of the
discriminator (--d_pretrain_iters): D(x), the probability that x is real text, is trained with L_D = -mean(log D(real)
+ log(1 - D(fake))) on --seq_len-token sequences of the corpus and sequences the generator samples from a real first
token. 3. Adversarial rounds (--adv_rounds) of --g_steps generator steps and --d_steps discriminator steps. A generator
step rewards its samples with r = D(x) (a number: no gradient reaches D), subtracts a baseline b (the running mean of
the reward) and minimises L_G = -mean((r - b) * sum_t log p(x_t | x_<t)): samples that fool D become likelier.
--rollouts N gives every token its own reward, the mean D of N Monte-Carlo completions of its prefix (SeqGAN). Every
evaluation prints the generator's NLL on held-out text, D's accuracy on held-out real and fresh fake text, BLEU-2/3/4
of the samples against held-out text (quality) and their self-BLEU-4 (diversity: 1 when all samples are alike).
ckpt.pt is the latest state of whichever phase wrote it; best.pt, what --prompt samples from, is the best-val model in
the MLE phase and the latest generator in the GAN phases: a GAN has no best model. --oracle replaces the text by
SeqGAN's synthetic data: the true distribution is an LSTM with N(0, 1) parameters (the oracle), every sequence the
start token 0 and --seq_len tokens, and NLL-oracle, the oracle's NLL per token of fresh samples, measures quality.

Changes from switchhead_moe.py (and --block_size 64, --temperature 1, the distribution the GAN trains):
- --init_from: scratch runs phase 1, switchhead_moe's loop (train()); PATH starts from a switchhead_moe.py best.pt.
- --seq_len: the sequences the GAN samples and judges; DataLoader.get_text draws the real ones.
- --oracle and its flags: Oracle, OracleData, OracleTokenizer (tokens as numbers), oracle_data; NLL-oracle (Oracle.nll)
  replaces BLEU in evaluate_samples and held_out, and train() reports it at every evaluation too.
- cached sampling, the GAN's inner loop: ex4's KVCache, cached() in both attention modules; GPT.generate feeds one
  token at a time, and with given completes prefixes of different lengths at once; complete() calls it.
- the discriminator (--d_embd, --d_hidden, --d_learning_rate, --d_steps): Discriminator, discriminator_loss,
  discriminator_step.
- REINFORCE (--g_steps, --adv_learning_rate, --baseline_decay, --mle_weight: an MLE loss on a real batch added,
  --gan_batch_size): token_logprobs, reinforce_loss, generator_step; --rollouts: rollout_rewards.
- quality and diversity (--eval_samples, --adv_eval_interval): References, bleu, self_bleu, text_metrics.
- the phases in one --out_dir, each on the shared Run: PhaseLog (log.csv's phase column), train_gan (gan_step,
  evaluate_gan, optimizer_step; Optimizers: both as Run's one); main runs them in turn, and --resume keeps
  --d_pretrain_iters and --adv_rounds as it keeps --max_iters.

Run:     python gan_text.py                      (MLE 2000 iterations, D 200 steps, 150 rounds, all at 64 characters)
Oracle:  python gan_text.py --oracle --seq_len 20 --block_size 20   (SeqGAN: vocabulary 5,000, LSTM of 32, 10,000 seqs)
Init:    python switchhead_moe.py --block_size 64 && python gan_text.py --init_from out/switchhead_moe/best.pt
Compare: python benchmarks/bench_gan_text.py         (MLE only vs adversarial, temperatures, quality-diversity picture)
         python benchmarks/bench_gan_text.py oracle  (NLL-oracle and held-out NLL through MLE and the GAN's rounds)
Sample:  python gan_text.py --prompt "ROMEO:" --num_samples 3
Parent:  switchhead_moe.py (diff -u switchhead_moe.py gan_text.py)
Result:  no better than temperature-tuned MLE (equal BLEU-4 at equal self-BLEU, worse NLL); 18 min, 1 core (RESULTS.md).
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
from collections import Counter
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from typing import Literal, get_args

import torch
import torch.nn as nn
from torch.nn import functional as F

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
    init_from: str = "scratch"  # scratch (MLE pre-training here) or a switchhead_moe.py best.pt (its architecture wins)
    eval_interval: int = 250  # evaluate and save ckpt.pt every this many iterations (best.pt when val improves)
    eval_iters: int = 200  # batches per split in each evaluation
    log_interval: int = 10  # print and log the training loss every this many iterations
    wandb: bool = False  # also log to Weights & Biases
    wandb_project: str = "gpt-ladder"  # wandb project name
    # model
    n_layer: int = 4  # transformer blocks
    n_head: int = 2  # attention heads per block: attention matrices computed per layer
    n_embd: int = 128  # embedding width
    head_size: int = 0  # q/k/v width per head; 0: n_embd // n_head (dense), else the widest within dense's parameters
    n_experts: int = 4  # value experts and output experts per head; 1: dense multi-head attention (the baseline)
    moe_k: int = 0  # experts each token uses per head and projection; 0: 2, or 1 with --gate softmax (its arg-max)
    gate: Literal["sigmoid", "softmax"] = "sigmoid"  # sigmoid: SwitchHead's top moe_k, unnormalised; softmax: arg-max
    balance_coef: float = 0.01  # weight of the load-balancing loss (--gate softmax only)
    expert_dropout: float = 0.0  # training: each expert left out of each token's choice with this probability
    pos: Literal["rope", "learned"] = "rope"  # positions: rotary, on queries and keys, or learned (ex1's table)
    rope_fraction: float = 0.5  # --pos rope: the share of each head's channels rotated; the rest carry no position
    init: Literal["switchhead", "gpt2"] = "switchhead"  # switchhead: std 1/sqrt(n_layer * fan-in); gpt2: ex1's 0.02
    router_renorm: bool = True  # start every router row (one per expert) at the same norm
    block_size: int = 64  # context length in tokens (64 as in ex1: the GAN samples seq_len tokens, cheap at this size)
    dropout: float = 0.0  # dropout probability (0.2 is a good value for the larger GPU model)
    bias: bool = False  # biases in Linear and LayerNorm layers
    flash: bool = True  # fused scaled_dot_product_attention instead of the explicit softmax(QK^T)V
    # training
    seed: int = 1337  # seeds the weights, the batches, dropout and sampling
    batch_size: int = 12  # sequences per micro-batch
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    max_iters: int = 2000  # optimizer steps
    learning_rate: float = 1e-3  # peak learning rate
    min_lr: float = 1e-4  # learning rate at the end of the cosine decay
    warmup_iters: int = 100  # linear warmup steps
    lr_decay_iters: int = 0  # cosine decay length; 0 means max_iters
    weight_decay: float = 0.1  # AdamW weight decay, applied to matrices only
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.99  # AdamW beta2 (0.99 since there are few tokens per step)
    grad_clip: float = 1.0  # clip the gradient norm to this; 0 disables
    # GAN
    seq_len: int = 64  # tokens per sequence the GAN samples and judges, at most block_size (--oracle: after token 0)
    d_embd: int = 64  # discriminator: embedding width
    d_hidden: int = 128  # discriminator: LSTM hidden units
    d_learning_rate: float = 1e-2  # discriminator: Adam learning rate
    d_pretrain_iters: int = 200  # phase 2: discriminator steps before the adversarial rounds
    adv_rounds: int = 150  # phase 3: adversarial rounds of g_steps generator steps, then d_steps discriminator steps
    g_steps: int = 1  # generator (REINFORCE) steps per round
    d_steps: int = 3  # discriminator steps per round
    gan_batch_size: int = 64  # sequences per generator or discriminator step (real and fake each)
    adv_learning_rate: float = 3e-5  # generator learning rate in the adversarial rounds, constant
    rollouts: int = 0  # Monte-Carlo completions per prefix for per-token rewards (SeqGAN); 0: one per sequence, D(x)
    baseline_decay: float = 0.9  # the baseline b follows the mean reward: b <- decay * b + (1 - decay) * mean(r)
    mle_weight: float = 0.0  # weight of an MLE loss on a real batch added to each generator step; 0: pure REINFORCE
    adv_eval_interval: int = 25  # evaluate and save ckpt.pt and best.pt every this many D pre-training steps or rounds
    eval_samples: int = 128  # sequences sampled per eval for D accuracy, BLEU and self-BLEU or NLL-oracle (same draws)
    # oracle (SeqGAN's synthetic data)
    oracle: bool = False  # train on samples of a random LSTM (the oracle) instead of text; NLL-oracle measures quality
    oracle_vocab: int = 5000  # --oracle: the oracle's vocabulary, also the generator's (SeqGAN: 5,000)
    oracle_embd: int = 32  # --oracle: the oracle LSTM's embedding width and hidden units (SeqGAN: 32)
    oracle_seed: int = 0  # --oracle: draws the oracle's N(0, 1) parameters and its samples, whatever --seed
    oracle_train: int = 10000  # --oracle: training sequences sampled from the oracle; a tenth as many are held out
    # system
    device: str = "auto"  # auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bfloat16 (else float16) on cuda, float32
    compile: bool = False  # torch.compile the model (worth it on a GPU)
    threads: int = 0  # CPU threads (torch.set_num_threads); 0: OMP_NUM_THREADS if set, else the cores idle at the start
    # sampling
    prompt: str = ""  # if set, skip training: load out_dir/best.pt and continue this text
    num_samples: int = 1  # samples to draw
    max_new_tokens: int = 500  # tokens per sample
    temperature: float = 1.0  # <1 sharper, >1 more random (1: the distribution the GAN trains)
    top_k: int = 200  # sample only among the k most likely tokens; 0 for all

    def __post_init__(self):
        """--head_size 0 and --moe_k 0 resolved, so that the checkpoint records what was used; head_size stays 0 where
        the other flags leave no width (mistakes() says why)."""
        if self.head_size == 0 and min(self.n_embd, self.n_head, self.n_experts) >= 1:
            if self.n_experts > 1:
                self.head_size = max(0, matched_head_size(self.n_embd, self.n_head, self.n_experts))
            elif self.n_embd % self.n_head == 0:
                self.head_size = self.n_embd // self.n_head
        self.moe_k = self.moe_k or (1 if self.gate == "softmax" else 2)

    def mistakes(self):
        """Settings no run can use, a message each (parse_args has refused every negative number already)."""
        ones = ["n_layer", "n_head", "n_embd", "block_size", "batch_size", "gradient_accumulation_steps"]
        ones += ["eval_interval", "eval_iters", "log_interval", "num_samples", "n_experts"]
        ones += ["d_embd", "d_hidden", "gan_batch_size", "adv_eval_interval", "oracle_embd"]  # and the GAN's
        yield from (f"--{n} must be at least 1" for n in ones if getattr(self, n) < 1)
        yield from (f"--{n} must be below 1" for n in ("dropout", "beta1", "beta2") if getattr(self, n) >= 1)
        if self.head_size == 0 and self.n_experts == 1:  # __post_init__ found no head width
            yield f"--n_embd {self.n_embd} must be divisible by --n_head {self.n_head}, or give --head_size"
        elif self.head_size == 0:
            yield f"--n_head {self.n_head} with --n_experts {self.n_experts} leaves no head width; give --head_size"
        if self.learning_rate == 0:
            yield "--learning_rate must be above 0"
        if self.expert_dropout >= 1:
            yield "--expert_dropout must be below 1"
        if self.n_experts > 1 and self.moe_k > self.n_experts:
            yield f"--moe_k {self.moe_k} must be at most --n_experts {self.n_experts}"
        if self.n_experts > 1 and self.gate == "softmax" and self.moe_k != 1:
            yield f"--gate softmax sends each token to its arg-max expert: leave out --moe_k {self.moe_k} (or give 1)"
        if not 0 < self.rope_fraction <= 1:
            yield f"--rope_fraction {self.rope_fraction} must be in (0, 1]"
        if self.pos == "rope" and self.head_size < 2:
            yield "--pos rope rotates pairs of channels, and a head of 1 has none; use --pos learned or --head_size 2"
        yield from (f"--{n} must be above 0" for n in ("d_learning_rate", "adv_learning_rate") if getattr(self, n) == 0)
        if self.seq_len < 2:
            yield f"--seq_len {self.seq_len} must be at least 2: a given first token and one sampled"
        if self.baseline_decay >= 1:
            yield "--baseline_decay must be below 1"
        if self.eval_samples < 2:
            yield "--eval_samples must be at least 2 (self-BLEU compares samples)"
        if self.oracle_vocab < 2 or self.oracle_train < 10:
            yield "--oracle_vocab must be at least 2 and --oracle_train at least 10 (a tenth as many are held out)"
        if self.oracle and (self.data or self.init_from != "scratch"):
            yield "--oracle samples its data and trains its generator from scratch: leave out --data and --init_from"
        if self.resume and self.init_from != "scratch":
            yield "--resume continues this script's checkpoint, --init_from PATH starts from switchhead_moe's: give one"


RESUMED = ("n_layer", "n_head", "n_embd", "block_size", "bias", "data")  # --resume takes these from ckpt.pt
RESUMED += ("head_size", "n_experts", "moe_k", "gate", "pos", "rope_fraction")  # and SwitchHead's architecture
GENERATOR = tuple(name for name in RESUMED if name != "data")  # --init_from takes these from switchhead_moe's best.pt
# and the GAN's: its data (--oracle), where the generator started, the discriminator's architecture
RESUMED += ("oracle", "oracle_vocab", "oracle_embd", "oracle_seed", "oracle_train", "init_from", "d_embd", "d_hidden")
KEPT = ("max_iters", "lr_decay_iters", "d_pretrain_iters", "adv_rounds")  # --resume keeps these too, unless typed


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

    def get_text(self, split, n, generator):
        """n real sequences of seq_len tokens from split, at random offsets: what the discriminator learns to call real.
        Every split is long enough: it holds block_size + 1 tokens (checked above) and seq_len <= block_size."""
        data = self.splits[split]
        ix = torch.randint(len(data) - self.cfg.seq_len + 1, (n, 1), generator=generator)
        return data[ix + torch.arange(self.cfg.seq_len)].to(self.device)


class Oracle(nn.Module):
    """SeqGAN's synthetic true distribution (--oracle): an LSTM language model, embedding, LSTM, linear, softmax, with
    every parameter drawn from N(0, 1) by its own generator seeded with --oracle_seed, so the same oracle whatever
    --seed. nn.LSTM's second bias (b_hh) is zero: SeqGAN's cell has one bias per gate. A sequence starts from the
    start token 0, fed as the first input as in SeqGAN's target LSTM; the oracle then samples seq_len tokens."""

    def __init__(self, cfg):
        super().__init__()
        self.wte = nn.Embedding(cfg.oracle_vocab, cfg.oracle_embd)
        self.lstm = nn.LSTM(cfg.oracle_embd, cfg.oracle_embd, batch_first=True)
        self.head = nn.Linear(cfg.oracle_embd, cfg.oracle_vocab)
        gen = torch.Generator().manual_seed(cfg.oracle_seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                p.copy_(torch.zeros_like(p) if name == "lstm.bias_hh_l0" else torch.randn(p.shape, generator=gen))

    def forward(self, idx):
        """The next-token logits (B, T, V) after each token of idx (B, T), from a zero state; float32 always."""
        with torch.autocast(idx.device.type, enabled=False):
            return self.head(self.lstm(self.wte(idx))[0])

    @torch.no_grad()
    def sample(self, n, seq_len, generator, chunk=1000):
        """n sequences (n, seq_len + 1), the start token 0 and seq_len tokens drawn one at a time, on the CPU,
        chunk sequences at a time (the softmax over the vocabulary is the memory). Each token is drawn by inverting
        the cumulative distribution at a uniform number: over 5,000 tokens torch.multinomial is ten times slower."""
        out = []
        for rows in range(0, n, chunk):
            seqs, state = torch.zeros(min(chunk, n - rows), 1, dtype=torch.long), None
            for _ in range(seq_len):
                h, state = self.lstm(self.wte(seqs[:, -1:]), state)
                cdf = F.softmax(self.head(h[:, -1]), dim=-1).cumsum(-1)
                u = torch.rand(len(seqs), 1, generator=generator) * cdf[:, -1:]
                seqs = torch.cat((seqs, torch.searchsorted(cdf, u)), dim=1)
            out.append(seqs)
        return torch.cat(out)

    @torch.no_grad()
    def nll(self, seqs, chunk=256):
        """NLL-oracle, SeqGAN's measure of quality: the oracle's negative log-likelihood of the tokens of seqs (B, T)
        after their first (the start token), per token in nats (SeqGAN divides by sequence length and batch)."""
        total = 0.0
        for rows in seqs.split(chunk):
            logp = F.log_softmax(self(rows[:, :-1]), dim=-1).gather(-1, rows[:, 1:, None])
            total -= logp.sum().item()
        return total / seqs[:, 1:].numel()


class OracleData:
    """--oracle's data, in DataLoader's place: oracle_train sequences sampled from the oracle for training and a tenth
    as many held out (val), drawn once, from --oracle_seed. A row is the start token and seq_len tokens; a batch's
    inputs are rows without their last token, its targets rows without their first: the generator learns every
    token from the start token on, as the oracle draws them."""

    def __init__(self, oracle, cfg, device):
        n = cfg.oracle_train
        rows = oracle.sample(n + n // 10, cfg.seq_len, torch.Generator().manual_seed(cfg.oracle_seed + 1))
        self.oracle, self.splits = oracle, {"train": rows[:n], "val": rows[n:]}
        self.cfg, self.device = cfg, device

    def get_batch(self, split, generator):
        rows = self.get_text(split, self.cfg.batch_size, generator)
        return rows[:, :-1], rows[:, 1:]

    def get_text(self, split, n, generator):
        """n sequences of split at random (with replacement), each the start token and seq_len tokens."""
        data = self.splits[split]
        return data[torch.randint(len(data), (n,), generator=generator)].to(self.device)


class OracleTokenizer(CharTokenizer):
    """--oracle's tokens are the numbers 0 .. V - 1, written as text separated by spaces: --prompt "0 17 4051"."""

    name = "oracle"

    def encode(self, s):
        if bad := sorted(set(s.split()) - self.stoi.keys()):
            die(f"token(s) {' '.join(bad)} not in the oracle's vocabulary; give numbers 0 to {len(self.chars) - 1}")
        return [self.stoi[w] for w in s.split()]

    def decode(self, ids):
        return " ".join(self.chars[i] for i in ids)


def oracle_data(cfg, device):
    """--oracle: the oracle, the loader of its samples and the tokenizer of its tokens 0 .. V - 1."""
    oracle = Oracle(cfg)
    loader = OracleData(oracle, cfg, device)
    oracle.to(device)
    tok = OracleTokenizer([str(i) for i in range(cfg.oracle_vocab)])
    train, val = len(loader.splits["train"]), len(loader.splits["val"])
    entropy, uniform = oracle.nll(loader.splits["val"].to(device)), math.log(cfg.oracle_vocab)
    print(
        f"oracle: LSTM of {cfg.oracle_embd}, vocabulary of {cfg.oracle_vocab}, seed {cfg.oracle_seed}; {train:,} "
        f"training and {val:,} held-out sequences of the start token and {cfg.seq_len} tokens; their NLL-oracle (the "
        f"oracle's entropy per token) {entropy:.4f}, a uniform generator's NLL of them {uniform:.4f}"
    )
    return loader, tok


# ----------------------------------------------------------------------------------------------------------
# Model


def attention(q, k, v, mask=None, flash=True, dropout_p=0.0):
    """softmax(q k^T / sqrt(hs)) v for q (..., n_head, Tq, hs) and k, v (..., n_head, Tk, hs), fused or written out as
    in ex1. mask: True where allowed, (Tq, Tk) or (..., 1, Tq, Tk); None is causal (Tq == Tk)."""
    if flash:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=mask is None)
    Tq, Tk, hs = q.size(-2), k.size(-2), q.size(-1)
    if mask is None:
        mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril()
    att = (q @ k.transpose(-2, -1)) / math.sqrt(hs)
    att = att.masked_fill(~mask, float("-inf"))
    att = F.dropout(F.softmax(att, dim=-1), dropout_p)
    return att @ v


def angles(pos, dim):
    """pos * 10000^(-2i/dim) for i < dim/2, (..., T, dim/2): the frequencies of both sinusoidal and rotary positions."""
    inv_freq = 10000.0 ** (-torch.arange(0, dim, 2, device=pos.device, dtype=torch.float32) / dim)
    return pos.float().unsqueeze(-1) * inv_freq


def rotate(x, pos):
    """Rotary position embedding: rotate each pair (x_i, x_(i+hs/2)) of x (..., T, hs) by the angle p * 10000^(-2i/hs)
    for the positions p in pos (..., T); then q.k depends on the two positions only through their difference."""
    angle = angles(pos, x.size(-1))
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def rope_channels(cfg):
    """--pos rope: how many of each head's query and key channels rotate, rope_fraction of head_size rounded down to
    whole pairs, at least one pair; 0 with learned positions."""
    return max(2, 2 * int(cfg.rope_fraction * cfg.head_size / 2)) if cfg.pos == "rope" else 0


def rotate_first(x, pos, n):
    """rotate() on the first n channels of x (B, H, T, hs) at positions pos (B or 1, T; None: 0 .. T-1), the others
    unchanged: they match queries to keys by content whatever the distance (the official SwitchHead rotates half)."""
    pos = torch.arange(x.size(2), device=x.device).unsqueeze(0) if pos is None else pos
    return torch.cat([rotate(x[..., :n], pos.unsqueeze(1)), x[..., n:]], dim=-1)


class KVCache:
    """One layer's keys and values during generation (ex4's cache): size slots, block_size, filled from the first;
    GPT.generate starts new caches once they are full."""

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


def cached(cache, k, v):
    """Keys and values (B, H, T, D) through a layer's KVCache when sampling, and the mask attention() needs: x's own
    keys, causal (None), without a cache and for the prompt; for one new token, every filled slot of the cache."""
    if cache is None:
        return k, v, None
    prompt, T = cache.pos == 0, k.size(2)
    k, v, k_pos = cache.update(k, v, torch.arange(cache.pos, cache.pos + T, device=k.device).unsqueeze(0))
    return k, v, None if prompt else (k_pos >= 0)[:, None, None]


class CausalSelfAttention(nn.Module):
    """Dense attention, the baseline (--n_experts 1): one projection makes q, k, v for every head at once."""

    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.head_size, self.dropout, self.flash = cfg.n_head, cfg.head_size, cfg.dropout, cfg.flash
        self.rotated = rope_channels(cfg)
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_head * cfg.head_size, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_head * cfg.head_size, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, pos=None, cache=None):
        """pos (1, T): the positions of x's tokens; None: 0 .. T-1."""
        B, T, C = x.size()
        H, D = self.n_head, self.head_size
        q, k, v = self.c_attn(x).split(H * D, dim=2)
        # (B, T, H * D) -> (B, H, T, D)
        q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in (q, k, v))
        if self.rotated:
            q, k = rotate_first(q, pos, self.rotated), rotate_first(k, pos, self.rotated)
        k, v, mask = cached(cache, k, v)
        y = attention(q, k, v, mask, self.flash, self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, H * D)  # heads side by side again
        return self.resid_dropout(self.c_proj(y))


def expert_matmul(x, w, idx, gates, src, dst, n_dst):
    """Mixture of linear experts: every choice n adds gates[n] * x[src[n]] @ w[idx[n]] into row dst[n] of the result.
    x (rows, a), w (n_experts, a, b), idx and gates (N choices, any shape), src, dst (N,) -> (n_dst, b). The choices
    are grouped by expert with one sort, and each expert multiplies its rows in one matmul: the loop runs over experts,
    never tokens. An expert that no choice names takes part with zero rows, and gets exactly zero gradient."""
    idx, gates = idx.flatten(), gates.flatten()
    order = idx.argsort()
    # the group sizes (one wait for the GPU); index_add_ rather than bincount keeps torch.compile in one graph
    counts = torch.zeros(w.size(0), dtype=torch.long, device=idx.device).index_add_(0, idx, torch.ones_like(idx))
    rows, g = x[src[order]], gates[order, None]
    if x.size(1) <= w.size(2):  # scale the narrower side by the gates: the same result, fewer multiplications
        rows = rows * g
    out = torch.cat([r @ w[e] for e, r in enumerate(rows.split(counts.tolist()))])
    if x.size(1) > w.size(2):
        out = out * g
    return out.new_zeros(n_dst, out.size(1)).index_add(0, dst[order], out)


def load_balancing_loss(probs, idx):
    """Switch Transformer's auxiliary loss E * sum_i f_i * P_i, per head, averaged over heads.
    probs (..., H, E): router probabilities; idx (..., H): the expert each token was sent to. f_i is the
    fraction of tokens sent to expert i, P_i the mean probability given to it: 1 when both are uniform,
    E when every token goes to one expert with probability 1."""
    E = probs.size(-1)
    f = F.one_hot(idx, E).flatten(0, -3).float().mean(0)  # (H, E)
    P = probs.flatten(0, -3).mean(0)
    return (E * (f * P).sum(-1)).mean()


@torch.no_grad()
def renorm_rows(w):
    """Rescale every row of a router's weight w (one row per expert) to the same norm, the root mean square of their
    norms, so that w's overall scale stays: no expert starts with a longer row that wins the choice for most tokens."""
    norms = w.norm(dim=-1, keepdim=True)
    w.mul_(norms.pow(2).mean().sqrt() / norms)


class SwitchHeadAttention(nn.Module):
    """SwitchHead: n_head heads, each with dense queries and keys and n_experts value and output experts, of which
    every token uses moe_k, weighted by their gates. One attention matrix per head, however many experts."""

    def __init__(self, cfg):
        super().__init__()
        H, E, D, C = cfg.n_head, cfg.n_experts, cfg.head_size, cfg.n_embd
        self.n_head, self.n_experts, self.moe_k, self.head_size, self.gate = H, E, cfg.moe_k, D, cfg.gate
        self.dropout, self.flash, self.expert_dropout = cfg.dropout, cfg.flash, cfg.expert_dropout
        self.rotated = rope_channels(cfg)
        self.c_attn = nn.Linear(C, 2 * H * D, bias=cfg.bias)  # queries and keys, dense
        self.v_router = nn.Linear(C, H * E, bias=False)  # reads a source token: which experts make its value
        self.o_router = nn.Linear(C, H * E, bias=False)  # reads a destination token: which experts project its result
        self.v_experts = nn.Parameter(torch.randn(H, E, C, D) * 0.02)
        # residual projections, as c_proj
        self.o_experts = nn.Parameter(torch.randn(H, E, D, C) * 0.02 / math.sqrt(2 * cfg.n_layer))
        self.bias = nn.Parameter(torch.zeros(C)) if cfg.bias else None
        self.resid_dropout = nn.Dropout(cfg.dropout)
        # the experts' choices, counted in eval mode (value and output routers, per head); head h's experts: h*E ...
        self.register_buffer("usage", torch.zeros(2, H, E, dtype=torch.long), persistent=False)
        self.register_buffer("first_expert", torch.arange(H).view(1, 1, H, 1) * E, persistent=False)
        self.aux_loss = 0.0  # the load-balancing loss of the last training forward (--gate softmax)

    def route(self, router, x, which):
        """The experts chosen for each token and head, (B, T, H, k) indices into the head's experts, and their gates."""
        B, T, _ = x.size()
        logits = choice = router(x).view(B, T, self.n_head, self.n_experts)
        if self.training and self.expert_dropout:  # some experts left out of the choice, so idle ones get picked
            choice = logits.masked_fill(torch.rand_like(logits) < self.expert_dropout, float("-inf"))
        if self.gate == "sigmoid":  # every expert has its own gate in (0, 1): the k largest are used, unnormalised
            idx = choice.topk(self.moe_k, dim=-1).indices
            gates = torch.sigmoid(logits.gather(-1, idx))
        else:  # softmax: the experts compete; the arg-max one is used, scaled by its probability
            probs = F.softmax(logits, dim=-1)
            idx = choice.argmax(dim=-1, keepdim=True)
            gates = probs.gather(-1, idx)
            if self.training:
                self.aux_loss = self.aux_loss + load_balancing_loss(probs, idx[..., 0]) / 2  # mean of the two routers
        if not self.training:
            chosen = (idx + self.first_expert).flatten()
            self.usage[which].view(-1).index_add_(0, chosen, torch.ones_like(chosen))
        return gates, idx + self.first_expert  # indices into all H * E experts of the layer

    def forward(self, x, pos=None, cache=None):
        """pos (1, T): the positions of x's tokens; None: 0 .. T-1."""
        B, T, C = x.size()
        H, D, k = self.n_head, self.head_size, self.moe_k
        self.aux_loss = 0.0
        q, key = self.c_attn(x).split(H * D, dim=2)
        q, key = (t.view(B, T, H, D).transpose(1, 2) for t in (q, key))  # (B, H, T, D)
        if self.rotated:
            q, key = rotate_first(q, pos, self.rotated), rotate_first(key, pos, self.rotated)
        per_token = torch.arange(B * T, device=x.device).repeat_interleave(H * k)  # the token of each choice
        per_head = torch.arange(B * T * H, device=x.device).repeat_interleave(k)  # its (token, head) pair
        # values: for each source token and head, the gate-weighted sum of its k chosen value experts
        gates, idx = self.route(self.v_router, x, 0)
        v = expert_matmul(x.reshape(B * T, C), self.v_experts.flatten(0, 1), idx, gates, per_token, per_head, B * T * H)
        v = v.view(B, T, H, D).transpose(1, 2)
        key, v, mask = cached(cache, key, v)  # values cached after their experts
        y = attention(q, key, v, mask, self.flash, self.dropout if self.training else 0.0)  # H attention matrices
        # output: for each destination token, every head's result through that token's k chosen output experts, summed
        gates, idx = self.route(self.o_router, x, 1)
        y = y.transpose(1, 2).reshape(B * T * H, D)  # every (token, head) pair's result
        y = expert_matmul(y, self.o_experts.flatten(0, 1), idx, gates, per_head, per_token, B * T)
        y = y.view(B, T, C)
        if self.bias is not None:
            y = y + self.bias
        return self.resid_dropout(y)


def matched_head_size(d, n_head, n_experts):
    """The largest head width at which SwitchHead's attention has no more parameters than a dense layer (4 d^2):
    2 d H D for queries and keys, 2 H E d D for the experts, 2 H E d for the routers."""
    return (4 * d * d - 2 * n_head * n_experts * d) // (2 * d * n_head * (1 + n_experts))


def attention_cost(T, d, n_head, head_size, n_experts=1, k=1, xl=False):
    """Multiply-accumulates and memory (floats) of one attention layer on T tokens, by the paper's formulas
    (SwitchHead, appendix; get_attention_flops/get_attention_mem in paper/common.py of robertcsordas/moe_attention).
    n_experts=1 is dense attention. xl=True is the paper's Transformer XL setting (T more keys from the memory,
    relative positions), in which it quotes 453.4M MACs and 3.46M floats for d=412, 10 heads of 41, T=256, and
    170.4M and 0.76M with 2 heads of 76, 5 experts, top-2; this script's models are xl=False."""
    H, D = n_head, head_size
    S = 2 * T if xl else T  # keys each query sees
    macs = 2 * H * D * T * S  # scores q.k and the weighted sum of the values
    mem = 2 * H * T * S  # the attention matrix, before and after the softmax
    if n_experts == 1:
        macs += 4 * T * d * H * D  # q, k, v and output projections
        mem += 4 * T * H * D
        if xl:  # Transformer XL's extra terms, as the paper counts them
            macs += 2 * S * d * H * D
            mem += 2 * S * H * D
    else:
        macs += (2 + 2 * k) * T * d * H * D  # dense q and k; k value and k output experts per head
        macs += 2 * H * k * T * D  # weighting the chosen experts by their gates
        macs += 2 * n_experts * d * S  # the two routers, as published (E d per token, not H E d: +1.2% in its example)
        mem += 4 * T * H * D + 2 * n_experts * S
        if xl:
            macs += 2 * T * d * H * D
            mem += 2 * T * H * D
    return macs, mem


def cost_report(cfg, model):
    """The start-up lines: one attention layer of this model, and of the dense model with n_head * n_experts heads."""
    T, d, H, E, D = cfg.block_size, cfg.n_embd, cfg.n_head, cfg.n_experts, cfg.head_size
    n = sum(p.numel() for p in model.blocks[0].attn.parameters())
    macs, mem = attention_cost(T, d, H, D, E, cfg.moe_k)
    line = f"attention per layer at T={T} (the paper's accounting): {macs / 1e6:.1f}M MACs, {mem / 1e6:.2f}M floats, "
    line += f"{n / 1e3:.1f}k parameters"
    if E == 1:
        return f"{line} (dense, {H} heads of {D})"
    dense_macs, dense_mem = attention_cost(T, d, H * E, d / (H * E), 1)
    return (
        f"{line} (SwitchHead, {H} heads of {D}, {E} experts, top-{cfg.moe_k}, {cfg.gate} gate)\n"
        f"dense, {H * E} heads of {d / (H * E):g}: {dense_macs / 1e6:.1f}M MACs, {dense_mem / 1e6:.2f}M floats, "
        f"{4 * d * d / 1e3:.1f}k parameters -> SwitchHead needs {100 * macs / dense_macs:.0f}% of its MACs and "
        f"{100 * mem / dense_mem:.0f}% of its memory"
    )


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
        self.attn = CausalSelfAttention(cfg) if cfg.n_experts == 1 else SwitchHeadAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x, pos, cache=None):
        x = x + self.attn(self.ln_1(x), pos, cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg, vocab_size):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(vocab_size, cfg.n_embd)  # token embeddings
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.pos == "learned" else None  # ex1's position table
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight  # weight tying: one matrix embeds and un-embeds
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by 1/sqrt(2 * n_layer)
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))
        if cfg.init == "switchhead":
            self.fan_in_init(1 / math.sqrt(cfg.n_layer))
        for m in self.modules():
            if isinstance(m, SwitchHeadAttention) and cfg.router_renorm:
                renorm_rows(m.v_router.weight)
                renorm_rows(m.o_router.weight)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @torch.no_grad()
    def fan_in_init(self, scale):
        """The official SwitchHead initialisation: every matrix in the blocks drawn with std scale / sqrt(its inputs),
        scale = 1/sqrt(n_layer); an output expert's inputs are all heads' results, n_head * head_size, as c_proj's.
        The embeddings (tied with lm_head) keep std 0.02."""
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, mean=0.0, std=scale / math.sqrt(m.in_features))
            if isinstance(m, SwitchHeadAttention):
                nn.init.normal_(m.v_experts, mean=0.0, std=scale / math.sqrt(m.v_experts.size(2)))
                nn.init.normal_(m.o_experts, mean=0.0, std=scale / math.sqrt(m.n_head * m.head_size))

    def num_params(self, active=False):
        """Parameters without the position embeddings; active=True: only those one token uses (moe_k of the experts)."""
        n = sum(p.numel() for p in self.parameters()) - (self.wpe.weight.numel() if self.wpe is not None else 0)
        c = self.cfg
        if active and c.n_experts > 1:  # less the idle experts: n_experts - moe_k value and output experts per head
            n -= c.n_layer * 2 * c.n_head * (c.n_experts - c.moe_k) * c.n_embd * c.head_size
        return n

    def forward(self, idx, targets=None, caches=None):
        B, T = idx.size()
        start = caches[0].pos if caches else 0  # the position of idx's first token: the tokens already in the cache
        assert start + T <= self.cfg.block_size, f"{start + T} tokens are more than block_size {self.cfg.block_size}"
        pos = torch.arange(start, start + T, device=idx.device).unsqueeze(0)  # (1, T)
        x = self.drop(self.wte(idx) + (self.wpe(pos) if self.wpe is not None else 0))
        for block, cache in zip(self.blocks, caches or [None] * len(self.blocks)):
            x = block(x, pos, cache)
        logits = self.lm_head(self.ln_f(x))
        loss = (
            None
            if targets is None
            else F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        )
        if loss is not None and self.training and self.cfg.n_experts > 1 and self.cfg.gate == "softmax":
            # the load-balancing losses, one per layer, as in Switch
            loss = loss + self.cfg.balance_coef * sum(block.attn.aux_loss for block in self.blocks)
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
        L, H, Q, T = self.cfg.n_layer, self.cfg.n_head, self.cfg.head_size, self.cfg.block_size
        flops_per_token = 6 * self.num_params(active=True) + 12 * L * H * Q * T
        name = torch.cuda.get_device_name(device)
        peak = next(
            (v for k, v in {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}.items() if k in name), 312e12
        )
        return flops_per_token * tokens_per_sec / peak

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=0, given=None):
        """Append max_new_tokens tokens to idx (B, T), each sampled from the model's next-token distribution. It is
        the GAN's inner loop: only the newest token is fed, the keys and values of the others wait in a KVCache per
        layer. given (B,): row b keeps only its first given[b] tokens of idx and samples the rest of idx too, so that
        prefixes of different lengths are completed together (SeqGAN's rollouts); None: all of idx is kept."""
        T, n = idx.size(1), self.cfg.block_size  # the model sees at most block_size tokens
        given = torch.full((idx.size(0),), T, device=idx.device) if given is None else given
        out, caches = idx[:, : int(given.min())], None
        for t in range(out.size(1), T + max_new_tokens):
            if caches is not None and caches[0].pos < n:
                logits, _ = self(out[:, -1:], caches=caches)
            else:  # the prompt, or a full context that must be re-read from a later first token
                caches = [KVCache(n) for _ in self.blocks]
                logits, _ = self(out[:, -n:], caches=caches)
            logits = logits[:, -1, :]
            if temperature == 0:  # greedy
                idx_next = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = float("-inf")
                idx_next = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            if t < T:  # a position of idx: the rows whose given prefix holds it keep their token
                idx_next = torch.where(given[:, None] > t, idx[:, t : t + 1], idx_next)
            out = torch.cat((out, idx_next), dim=1)
        return out


# ----------------------------------------------------------------------------------------------------------
# GAN: the discriminator, rewards and the generator's REINFORCE loss


class Discriminator(nn.Module):
    """An LSTM classifier: embedding, LSTM, linear, sigmoid. D(x) is the probability that the token sequence x (B, T)
    is real text; logit(x) is the same number before the sigmoid. The linear layer reads the LSTM's outputs
    max-pooled over time, as SeqGAN's CNN discriminator pools its features: every position gets a gradient, not only
    through the last hidden state. It is small and runs in float32 even under autocast."""

    def __init__(self, cfg, vocab_size):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, cfg.d_embd)
        self.lstm = nn.LSTM(cfg.d_embd, cfg.d_hidden, batch_first=True)
        self.head = nn.Linear(cfg.d_hidden, 1)

    def logit(self, idx):
        with torch.autocast(idx.device.type, enabled=False):
            out, _ = self.lstm(self.wte(idx))  # (B, T, d_hidden)
            return self.head(out.max(dim=1).values).squeeze(-1)

    def forward(self, idx):
        return torch.sigmoid(self.logit(idx))

    def configure_optimizer(self, cfg):
        return torch.optim.Adam(self.parameters(), lr=cfg.d_learning_rate, betas=(cfg.beta1, cfg.beta2))


def discriminator_loss(disc, real, fake):
    """L_D = -mean(log D(real) + log(1 - D(fake))), from the logits z: log D = log sigmoid(z),
    log(1 - D) = log sigmoid(-z)."""
    return -(F.logsigmoid(disc.logit(real)) + F.logsigmoid(-disc.logit(fake))).mean()


@torch.no_grad()
def complete(model, seqs, given, temperature=1.0):
    """Sample the tokens of seqs (B, T) after the first given ones (a number, or one per row, at least 1) from the
    generator, keeping the given ones: the GAN's fakes (given 1: a real first token) and SeqGAN's rollouts (given
    t + 1: a sampled prefix). Eval mode: dropout does not change the distribution. Returns a new tensor."""
    training = model.training
    model.eval()
    seqs = model.generate(seqs, 0, temperature, given=torch.as_tensor(given, device=seqs.device).expand(seqs.size(0)))
    model.train(training)
    return seqs


@torch.no_grad()
def rollout_rewards(model, disc, seqs, n_rollouts, temperature=1.0):
    """SeqGAN's per-token rewards, (B, T) -> (B, T - 1): token t (t = 1 .. T - 1; token 0 was given) is rewarded with
    the mean D of n_rollouts completions of its prefix x_0 .. x_t, the last token with D(x) itself. A token that
    makes a good sequence likely gets a high reward even when the rest of this sample went wrong. The completions of
    all T - 2 prefixes are sampled together, one rollout at a time."""
    B, T = seqs.shape
    given = torch.arange(2, T, device=seqs.device).repeat_interleave(B)  # row j * B + b: x_0 .. x_{j + 1} of sequence b
    prefixes = seqs.repeat(T - 2, 1)
    rewards = sum(disc(complete(model, prefixes, given, temperature)).view(T - 2, B) for _ in range(n_rollouts))
    return torch.cat((rewards.T / n_rollouts, disc(seqs)[:, None]), dim=1)


def token_logprobs(model, seqs):
    """log p(x_t | x_<t) of every token after the first, (B, T) -> (B, T - 1)."""
    logits, _ = model(seqs[:, :-1])
    return F.log_softmax(logits.float(), dim=-1).gather(-1, seqs[:, 1:, None]).squeeze(-1)


def reinforce_loss(logp, rewards, baseline):
    """L_G = -mean((r - b) * sum_t log p(x_t | x_<t)): a sample rewarded above the baseline becomes likelier, one
    below it less likely. rewards (B,), one per sequence, weight all its tokens; (B, T - 1), one per token (rollouts),
    each its own token. They are detached: the generator's loss never reaches the discriminator's parameters."""
    advantage = (rewards - baseline).detach()
    if advantage.dim() == 1:
        advantage = advantage[:, None]
    return -(advantage * logp).sum(1).mean()


# ----------------------------------------------------------------------------------------------------------
# Metrics: BLEU (quality) and self-BLEU (diversity), on words


def words(text):
    """BLEU's tokens: words and punctuation marks."""
    return re.findall(r"\w+|[^\w\s]", text)


def ngram_counts(tokens, n):
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


class References:
    """A set of reference texts (token lists), ready for sentence BLEU (Papineni et al. 2002) against all of them:
    for every n-gram its largest count in any one reference, how many references have that count, and the next
    largest count (so that self-BLEU can leave a sample out of its own references), and the reference lengths."""

    def __init__(self, refs, max_n=4):
        self.lengths = Counter(len(r) for r in refs)
        self.best = [{} for _ in range(max_n + 1)]  # best[n][ngram] = [largest count, references with it, next largest]
        for ref in refs:
            for n in range(1, max_n + 1):
                for g, c in ngram_counts(ref, n).items():
                    b = self.best[n].get(g)
                    if b is None:
                        self.best[n][g] = [c, 1, 0]
                    elif c > b[0]:
                        self.best[n][g] = [c, 1, b[0]]
                    elif c == b[0]:
                        b[1] += 1
                    elif c > b[2]:
                        b[2] = c

    def bleu(self, hyp, n, leave_out=False):
        """Sentence BLEU-n of hyp (a token list): the geometric mean of the clipped 1..n-gram precisions, uniform
        weights, times the brevity penalty against the closest reference length. Smoothed as NLTK's method1
        (Chen and Cherry 2014): a precision with no match counts 0.1 matches. leave_out: hyp is one of the
        references and is not counted as its own (self-BLEU)."""
        log_p = 0.0
        for k in range(1, n + 1):
            counts = ngram_counts(hyp, k)
            matched = 0
            for g, c in counts.items():
                top, n_top, second = self.best[k].get(g, (0, 0, 0))
                matched += min(c, second if leave_out and c == top and n_top == 1 else top)
            log_p += math.log((matched or 0.1) / max(1, sum(counts.values()))) / n
        lengths = self.lengths - Counter([len(hyp)]) if leave_out else self.lengths
        closest = min(lengths, key=lambda r: (abs(r - len(hyp)), r))  # ties: the shorter reference
        penalty = 1.0 if len(hyp) > closest else math.exp(1 - closest / len(hyp)) if hyp else 0.0
        return penalty * math.exp(log_p)


def bleu(hyps, refs, n):
    """BLEU-n of each hypothesis against all the references, averaged (as Texygen, Zhu et al. 2018). Token lists."""
    refs = refs if isinstance(refs, References) else References(refs, n)
    return sum(refs.bleu(h, n) for h in hyps) / len(hyps)


def self_bleu(samples, n):
    """Self-BLEU-n: the BLEU-n of each sample against all the others, averaged; 1 when they are all the same."""
    refs = References(samples, n)
    return sum(refs.bleu(s, n, leave_out=True) for s in samples) / len(samples)


def text_metrics(texts, refs):
    """BLEU-2/3/4 of the texts against refs (References of held-out text) and their self-BLEU-4."""
    hyps = [words(t) for t in texts]
    return {**{f"bleu{n}": bleu(hyps, refs, n) for n in (2, 3, 4)}, "self_bleu4": self_bleu(hyps, 4)}


# ----------------------------------------------------------------------------------------------------------
# Training


def reset_usage(model):
    """Zero every SwitchHead layer's count of its experts' choices (made in eval mode, in route)."""
    for m in model.modules():
        if isinstance(m, SwitchHeadAttention):
            m.usage.zero_()


def expert_usage(model):
    """One line per layer: how often each expert was chosen in the last evaluation, in % of its head's choices."""
    lines = []
    for i, block in enumerate(model.blocks):
        if isinstance(block.attn, SwitchHeadAttention):
            usage = block.attn.usage
            share = (100 * usage / usage.sum(-1, keepdim=True).clamp(min=1)).round().long().tolist()
            value, output = (" / ".join(" ".join(f"{p:3d}" for p in head) for head in side) for side in share)
            lines.append(f"  layer {i} expert use (% per head, heads split by /) | value {value} | output {output}")
    return lines


def dead_experts(model, share=0.05):
    """The experts chosen by fewer than share of the tokens in the last evaluation (its val split), each as (layer,
    "value" or "output", head, expert, its share of the tokens); an even share is moe_k / n_experts."""
    dead = []
    for i, block in enumerate(model.blocks):
        if isinstance(block.attn, SwitchHeadAttention):
            usage = block.attn.usage
            shares = usage / (usage.sum(-1, keepdim=True) / block.attn.moe_k).clamp(min=1)  # k choices per token
            for side, head, expert in (shares < share).nonzero().tolist():
                dead.append((i, ("value", "output")[side], head, expert, shares[side, head, expert].item()))
    return dead


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


def train(cfg, model, disc, loader, tok, device, autocast, ckpt=None):
    """Phase 1: MLE pre-training of the generator, switchhead_moe.py's loop; its checkpoints hold D too, untrained."""
    optimizer = model.configure_optimizer(cfg, device.type)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.dtype == "float16")  # float16 needs its loss scaled
    gen = torch.Generator().manual_seed(cfg.seed)  # draws the training batches
    tokens = cfg.gradient_accumulation_steps * cfg.batch_size * (cfg.seq_len if cfg.oracle else cfg.block_size)

    def extra():  # what the checkpoint holds besides Run's: the phase, and D (untrained) as in every phase's
        return {"tokenizer": tok.name, "vocab": tok.chars, "phase": "mle", "discriminator": disc.state_dict()}

    log = PhaseLog(cfg, "mle", ckpt["log_rows"] if ckpt else 0)
    # the bookkeeping around the step (shared section); on --resume it restores the optimizer and the random states
    run = Run(cfg, model, optimizer, gen, tokens, ckpt, extra, log=log)
    oracle, real_eval = held_out(loader, tok, cfg) if cfg.oracle else (None, None)
    if cfg.compile:
        print("compiling the model (takes a minute)...")
        torch._dynamo.config.capture_scalar_outputs = True  # the experts' group sizes stay inside the graph
        model = torch.compile(model)
    for it in range(run.iter_num, cfg.max_iters + 1):
        run.stop_if_requested(it)  # Ctrl-C or SIGTERM: save the state at this iteration and exit
        lr = get_lr(it, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if it % cfg.eval_interval == 0 or it == cfg.max_iters:  # print, log, save ckpt.pt (best.pt when val improves)
            # --oracle: NLL-oracle, which val loss does not show (first: the experts' use printed is the val split's)
            metrics = evaluate_samples(model, None, real_eval, oracle, tok, cfg, autocast)[0] if oracle else {}
            run.evaluate(it, lr, estimate_loss(model, loader, cfg, autocast), **metrics)
            for line in expert_usage(model):
                print(line)
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
    best_val = run.finish()
    if cfg.n_experts > 1:  # from the last evaluation's count
        dead, n = dead_experts(model), 2 * cfg.n_layer * cfg.n_head * cfg.n_experts
        listed = "".join(f" | layer {i} {side} head {h} expert {e} {100 * f:.1f}%" for i, side, h, e, f in dead)
        print(f"dead experts (chosen by < 5% of the val tokens): {len(dead)} of {n}{listed}")
    return best_val


def optimizer_step(optimizer, params, cfg, scaler=None):
    """train()'s update for the GAN's steps: clip the gradient norm, update the weights, zero the gradients; scaler:
    the GradScaler that scaled the loss (None: the loss was not scaled)."""
    scaler = scaler or torch.amp.GradScaler(enabled=False)
    if cfg.grad_clip:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def discriminator_step(model, disc, d_optimizer, real, cfg, autocast=nullcontext()):
    """One step of D on the real sequences (B, T) and as many fakes, sampled without a gradient. Returns L_D."""
    with autocast:
        fake = complete(model, real, 1)
    loss = discriminator_loss(disc, real, fake)
    loss.backward()
    optimizer_step(d_optimizer, disc.parameters(), cfg)
    return loss.item()


def generator_step(model, disc, optimizer, real, cfg, baseline, autocast=nullcontext(), scaler=None, mle_batch=None):
    """One REINFORCE step of the generator: fakes sampled from the real sequences' first tokens, rewarded by D
    (per token with --rollouts), the baseline subtracted, L_G minimised (plus mle_weight times the MLE loss on
    mle_batch). Returns the new baseline (the running mean of the reward) and this batch's mean reward."""
    with autocast:
        fake = complete(model, real, 1)
        with torch.no_grad():  # the rewards are numbers: no gradient flows into D
            rewards = rollout_rewards(model, disc, fake, cfg.rollouts) if cfg.rollouts else disc(fake)
        reward = rewards.mean().item()
        b = reward if baseline is None else baseline  # the first batch is its own baseline
        loss = reinforce_loss(token_logprobs(model, fake), rewards, b)
        if mle_batch is not None:
            loss = loss + cfg.mle_weight * model(*mle_batch)[1]
    (loss if scaler is None else scaler.scale(loss)).backward()  # a GradScaler for float16
    optimizer_step(optimizer, model.parameters(), cfg, scaler)
    return cfg.baseline_decay * b + (1 - cfg.baseline_decay) * reward, reward


@torch.no_grad()
def evaluate_samples(model, disc, real, refs, tok, cfg, autocast, temperature=1.0):
    """One fake per held-out real sequence (B, T), from its first token, and what they measure: BLEU-2/3/4 against
    refs, self-BLEU-4 and, given disc, D's accuracy on the real and the fake ones; with --oracle, refs is the Oracle
    and NLL-oracle replaces BLEU. The same random draws at every call, kept apart from training's. Returns the metrics
    and the fakes."""
    with torch.random.fork_rng(devices=[real.device] if real.device.type == "cuda" else []):
        torch.manual_seed(cfg.seed + 2)
        with autocast:
            fake = complete(model, real, 1, temperature)
    if isinstance(refs, Oracle):  # synthetic data: the true distribution scores the fakes itself
        out = {"nll_oracle": refs.nll(fake)}
    else:
        out = text_metrics([tok.decode(row) for row in fake.tolist()], refs)
    if disc is not None:
        out["d_acc_real"] = (disc(real) > 0.5).float().mean().item()
        out["d_acc_fake"] = (disc(fake) < 0.5).float().mean().item()
    return out, fake


def held_out(loader, tok, cfg):
    """What evaluations measure against: BLEU's references, the val split cut into seq_len pieces (as words), or with
    --oracle the Oracle, and eval_samples val sequences at fixed random offsets, whose first tokens start the fakes."""
    real = loader.get_text("val", cfg.eval_samples, torch.Generator().manual_seed(cfg.seed + 1))
    if cfg.oracle:
        return loader.oracle, real
    refs = References([words(tok.decode(piece.tolist())) for piece in loader.splits["val"].split(cfg.seq_len)])
    return refs, real


def gan_step(run, phase, disc, loader, baseline, autocast, scaler):
    """A step of phase 2, one discriminator step, or a round of phase 3: g_steps REINFORCE steps of the generator, then
    d_steps of the discriminator; run holds the generator, both optimizers and the batch generator. Returns D's mean
    loss, the baseline and the last generator step's mean reward (None in phase 2)."""
    model, optimizers, gen, cfg = run.model, run.optimizer, run.gen, run.cfg
    reward = None
    if phase == "adversarial":
        for _ in range(cfg.g_steps):
            mle_batch = loader.get_batch("train", gen) if cfg.mle_weight else None
            real = loader.get_text("train", cfg.gan_batch_size, gen)
            g_opt = optimizers.generator
            baseline, reward = generator_step(model, disc, g_opt, real, cfg, baseline, autocast, scaler, mle_batch)
    d_losses = []
    for _ in range(cfg.d_steps if phase == "adversarial" else 1):
        real = loader.get_text("train", cfg.gan_batch_size, gen)
        d_losses.append(discriminator_step(model, disc, optimizers.discriminator, real, cfg, autocast))
    return sum(d_losses) / len(d_losses) if d_losses else float("nan"), baseline, reward


def evaluate_gan(run, disc, loader, held, tok, autocast, label, it, lr):
    """An evaluation of phase 2 or 3 (label: its lines' first word): the generator's NLL, D's accuracy, the samples'
    quality and diversity against held (held_out's), printed and logged; ckpt.pt and best.pt saved, best.pt the latest
    generator: a GAN has no best model (no one number ranks its generators)."""
    model, cfg, phase, (refs, real) = run.model, run.cfg, run.csv.phase, held
    losses = estimate_loss(model, loader, cfg, autocast)
    m, _ = evaluate_samples(model, disc, real, refs, tok, cfg, autocast)
    if cfg.oracle:
        quality = f"NLL-oracle {m['nll_oracle']:.4f}"
    else:
        quality = f"BLEU-2/3/4 {m['bleu2']:.3f} {m['bleu3']:.3f} {m['bleu4']:.3f} | self-BLEU-4 {m['self_bleu4']:.3f}"
    nll = f"NLL train {losses['train']:.4f} val {losses['val']:.4f}"
    accuracy = f"D accuracy real {100 * m['d_acc_real']:.1f}% fake {100 * m['d_acc_fake']:.1f}%"
    print(f"{label} {it} | {nll} | {accuracy} | {quality} | {time.time() - run.t_start:.1f} s")
    # ckpt.pt and best.pt, before the row as in Run.evaluate: resumed here, the run evaluates again and writes it again
    run.save(it, best=True)
    row = {"train_loss": losses["train"], "val_loss": losses["val"], **m}
    run.csv.write(iter=it, lr=f"{lr:.3e}", **{k: f"{v:.4f}" for k, v in row.items()})
    if run.wandb:
        run.wandb.log({f"{phase}/{k}": v for k, v in {"iter": it, "val_nll": losses["val"], **m}.items()})


def train_gan(cfg, model, disc, loader, tok, device, autocast, best_val, ckpt=None):
    """Phases 2 and 3, discriminator pre-training, then adversarial rounds, on one Run, each phase counting its steps
    from 0. An evaluation every adv_eval_interval steps or rounds saves ckpt.pt and best.pt, both with best_val, the MLE
    phase's best val loss. ckpt: --resume's, of phase 2 or 3."""
    g_optimizer = model.configure_optimizer(cfg, device.type)
    for group in g_optimizer.param_groups:
        group["lr"] = cfg.adv_learning_rate
    optimizers = Optimizers(g_optimizer, disc.configure_optimizer(cfg))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.dtype == "float16")  # float16 needs its loss scaled
    gen = torch.Generator().manual_seed(cfg.seed + 3)  # draws the real sequences and batches of phases 2 and 3
    phase, baseline = (ckpt["phase"], ckpt["baseline"]) if ckpt else ("d_pretrain", None)
    # log.csv goes on after the checkpoint's rows, or after all the MLE phase wrote (none with --init_from)
    log = PhaseLog(cfg, phase, ckpt["log_rows"] if ckpt else None if cfg.init_from == "scratch" else 0)

    def extra():  # what the checkpoint holds besides Run's: the phase, D, the baseline
        gan = {"phase": log.phase, "discriminator": disc.state_dict(), "baseline": baseline}
        return {"tokenizer": tok.name, "vocab": tok.chars, **gan}

    run = Run(cfg, model, optimizers, gen, cfg.gan_batch_size * cfg.seq_len, ckpt, extra, log=log)
    run.best_val = best_val
    held = held_out(loader, tok, cfg)
    rewards = f"per token, {cfg.rollouts} rollouts per prefix" if cfg.rollouts else "per sequence, D(x)"
    batch = f"{cfg.gan_batch_size} real and {cfg.gan_batch_size} fake per step"
    print(f"GAN on sequences of {cfg.seq_len} tokens, {batch}; rewards {rewards}")
    # each phase: its name (in log.csv and the checkpoint), its lines' first word, its steps and its learning rate
    phases = [("d_pretrain", "d-pretrain", cfg.d_pretrain_iters, cfg.d_learning_rate)]
    phases += [("adversarial", "round", cfg.adv_rounds, cfg.adv_learning_rate)]
    for name, label, steps, lr in phases[1 if phase == "adversarial" else 0 :]:
        log.phase, t0 = name, time.time()
        for it in range(run.iter_num if name == phase else 0, steps + 1):
            run.stop_if_requested(it)  # Ctrl-C or SIGTERM: save the state at this step and exit
            # evaluate and save (round 0 holds the models of the end of phase 2, evaluated there)
            if (it == steps or it % cfg.adv_eval_interval == 0) and not (name == "adversarial" and it == 0):
                evaluate_gan(run, disc, loader, held, tok, autocast, label, it, lr)
                t0 = time.time()  # keep evaluation out of the per-step timing
            if it == steps:
                break
            d_loss, baseline, reward = gan_step(run, name, disc, loader, baseline, autocast, scaler)
            t1 = time.time()
            dt, t0 = t1 - t0, t1
            if it % cfg.log_interval == 0:  # a line and a row of log.csv
                shown = "" if reward is None else f" | reward {reward:.4f} (baseline {baseline:.4f})"
                print(f"{label} {it} | D loss {d_loss:.4f}{shown} | {dt * 1000:.1f} ms")
                row = {"d_loss": f"{d_loss:.4f}", "reward": "" if reward is None else f"{reward:.4f}"}
                log.write(iter=it, lr=f"{lr:.3e}", ms_per_iter=f"{dt * 1000:.2f}", **row)
    run.finish()


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
    device, autocast = setup_device(cfg)
    torch.manual_seed(cfg.seed)

    if cfg.prompt:  # sampling only: everything needed is in the checkpoint
        ckpt = load_checkpoint(os.path.join(cfg.out_dir, "best.pt"), device)
        tok = (OracleTokenizer if ckpt["tokenizer"] == OracleTokenizer.name else CharTokenizer)(ckpt["vocab"])
        model = GPT(Config(**ckpt["config"]), len(tok.chars)).to(device)
        model.load_state_dict(ckpt["model"])
        sample(model, tok, cfg, device, autocast, cfg.prompt)
        return

    ckpt = init = None
    if cfg.resume:
        ckpt = load_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"), device)
        resume_config(cfg, ckpt["config"], RESUMED, kept=KEPT)
    else:
        check_out_dir(cfg.out_dir, cfg.overwrite)
        if cfg.init_from != "scratch":  # the generator of switchhead_moe.py: its architecture and vocabulary
            init = load_checkpoint(cfg.init_from, device, scripts=("switchhead_moe",))
            for name in GENERATOR:
                setattr(cfg, name, init["config"][name])
            val = init["best_val_loss"]
            print(f"generator from {cfg.init_from} (iter {init['iter_num']}, val {val:.4f}): no MLE pre-training here")
    if cfg.seq_len > cfg.block_size:
        die(f"--seq_len {cfg.seq_len} is longer than the generator's --block_size {cfg.block_size}; use at most that")
    source = ckpt or init  # the vocabulary, the generator's weights and the MLE phase's best val loss
    if cfg.oracle:  # SeqGAN's synthetic data: sampled from the oracle
        loader, tok = oracle_data(cfg, device)
    else:
        text = load_text(cfg)
        tok = CharTokenizer(source["vocab"] if source else sorted(set(text)))
        ids = torch.tensor(tok.encode(text), dtype=torch.long)
        print(f"{len(text):,} characters, vocabulary of {len(tok.chars)}")
        loader = DataLoader(ids, cfg, device)

    model = GPT(cfg, len(tok.chars)).to(device)
    disc = Discriminator(cfg, len(tok.chars)).to(device)
    if source:
        model.load_state_dict(source["model"])
    if ckpt:
        disc.load_state_dict(ckpt["discriminator"])
    used = f"{model.num_params(active=True) / 1e6:.2f}M used per token"
    print(f"{model.num_params() / 1e6:.2f}M parameters ({used}), device {device}, dtype {cfg.dtype}")
    d_params = sum(p.numel() for p in disc.parameters())
    print(f"discriminator: {d_params / 1e6:.2f}M parameters (embedding {cfg.d_embd}, LSTM {cfg.d_hidden})")
    print(cost_report(cfg, model))
    phase = ckpt["phase"] if ckpt else "d_pretrain" if init else "mle"
    with STOP:  # Ctrl-C: save and stop at the next iteration (twice: at once)
        if phase == "mle":
            best_val = train(cfg, model, disc, loader, tok, device, autocast, ckpt)
        else:  # the MLE phase's best val loss, switchhead_moe's or the checkpoint's: every later checkpoint carries it
            best_val = source["best_val_loss"]
        if phase != "adversarial":
            print("samples of the MLE generator, before the adversarial rounds:")
            sample(model, tok, cfg, device, autocast, tok.chars[0])
        train_gan(cfg, model, disc, loader, tok, device, autocast, best_val, None if phase == "mle" else ckpt)
    print("samples after the adversarial rounds:")
    sample(model, tok, cfg, device, autocast, tok.chars[0])  # start from the first character: a newline in Shakespeare


# ----------------------------------------------------------------------------------------------------------
# The phases' bookkeeping: one log.csv, two optimizers


class PhaseLog:
    """log.csv of every phase, each row with the phase that wrote it: a CSVLog (its rows and f) to Run, a new one per
    Run, going on after the rows before it. The GAN phases add D's loss and accuracy, the reward, BLEU and self-BLEU,
    or with --oracle NLL-oracle (which the MLE phase's evaluations report too)."""

    COLUMNS = "phase d_loss reward d_acc_real d_acc_fake bleu2 bleu3 bleu4 self_bleu4 nll_oracle".split()

    def __init__(self, cfg, phase, keep):
        os.makedirs(cfg.out_dir, exist_ok=True)
        self.csv, self.phase = CSVLog(os.path.join(cfg.out_dir, "log.csv"), keep, self.COLUMNS), phase

    def __getattr__(self, name):  # rows and f, which Run reads: the CSVLog's
        return getattr(self.csv, name)

    def write(self, **row):
        self.csv.write(phase=self.phase, **row)


class Optimizers:
    """The GAN phases' two optimizers, the generator's and the discriminator's, as the one that Run saves in ckpt.pt
    (not in best.pt) and restores on --resume."""

    def __init__(self, generator, discriminator):
        self.generator, self.discriminator = generator, discriminator

    def state_dict(self):
        return {"generator": self.generator.state_dict(), "discriminator": self.discriminator.state_dict()}

    def load_state_dict(self, state):
        self.generator.load_state_dict(state["generator"])
        self.discriminator.load_state_dict(state["discriminator"])


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
