"""
ex5_chain_of_thought.py: the same GPT shows its work: a scratchpad before the answer, each step traced, and positions
that let it add numbers twice as long as any it was trained on.

Changes from ex2_addition.py:
- Multiplication beside addition (--task add|mul), operands of any length drawn by digit count (--train_digits 1-8)
  and scored on lengths never trained on (--test_digits 1-16): random_number, is_held_out on the pair, DataLoader
  draws fresh problems each batch and pads them with '.'.
- Three answer formats (--format, write()): direct, most significant digit first; reversed, ex2's; cot, the work
  before the answer (steps()), every number in it least significant digit first, the order carries go:
    add  457+168=0:7+8=5,1:5+6=2,1:4+1=6,0:0+0=0|5260.
         a step per column: carry in, ':', the two digits, '=', the sum's digit; the next step's carry is this one's
         carry out; after '|' the answer 625 (reversed, one digit longer than the operands), '.' ends it.
    mul  4572*168=8:67563>67563,6:023472>698013,1:0027540>6908670|6908670.
         a step per digit of 168: the digit, ':', 4572 times it shifted to its place (36576, 274320, 457200), '>',
         the running sum (36576, 310896, 768096); the last sum is the answer 768096.
- The prompt is masked from the loss as in ex2; the scratchpad, the answer and the closing '.' are learned.
- Positions that generalise (--pos, GPT.forward): learned, ex2's table; none; rope, ex4's rotate(); abacus (McLeish et
  al. 2024, places()): a digit's index is 1 + the power of ten it stands for, so digits that are added together share
  it, and in training every index is shifted by a random offset (--abacus_offset) so that indices past the trained
  lengths have been trained too; in the work, a token also gets its slot within its step, which tells apart the
  tokens of a step (they share its index).
- Exact match by operand length, teacher-forced (accuracy(), equal to greedy decoding, tested), at every evaluation
  (log.csv's acc_N columns) and at the end (report()), with, for cot, the step where wrong answers first go wrong.
- Tracing (--prompt 4572*168, trace()): the model's work greedy-decoded step by step, each step marked right or
  shown beside the true one, then the answer.

Run:     python ex5_chain_of_thought.py
Ask:     python ex5_chain_of_thought.py --prompt 4572*168    (traces the saved model's work)
Parent:  ex2_addition.py (diff -u ex2_addition.py ex5_chain_of_thought.py)
Result:  RESULTS.md, "ex5_chain_of_thought.py": 4x4 products with the work against the answer alone, in the same time;
         addition trained on 1-8 digits, scored at 1-24, with abacus against learned positions.
"""

import argparse
import csv
import functools
import inspect
import math
import os
import re
import signal
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from typing import Literal, get_args

import torch
import torch.nn as nn
from torch.nn import functional as F

SCRIPT = os.path.splitext(os.path.basename(__file__))[0]
VOCAB = "0123456789+*=:>,|."  # a digit's token id is the digit itself; '.' ends a problem and pads a batch
MAX_TOKENS = 4096  # the longest problem a run may ask for


@dataclass
class Config:
    # I/O
    out_dir: str = f"out/{SCRIPT}"  # checkpoint and log.csv go here
    task: Literal["add", "mul"] = "mul"  # addition or multiplication
    format: Literal["direct", "reversed", "cot"] = "cot"  # answer first digit first, last digit first, or work first
    train_digits: str = "4"  # operand lengths trained on: a digit count (3) or a range (1-8)
    test_digits: str = "4"  # operand lengths scored (both operands this long), may reach past train_digits
    resume: bool = False  # continue training from out_dir/ckpt.pt, the latest saved state
    overwrite: bool = False  # start over in an out_dir holding this script's checkpoint (replaces ckpt.pt and best.pt)
    eval_interval: int = 250  # evaluate and save ckpt.pt every this many iterations (best.pt when val improves)
    eval_iters: int = 10  # batches per split in each evaluation
    log_interval: int = 100  # print and log the training loss every this many iterations
    wandb: bool = False  # also log to Weights & Biases
    wandb_project: str = "gpt-ladder"  # wandb project name
    # model
    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # attention heads per block
    n_embd: int = 128  # embedding width
    dropout: float = 0.0  # dropout probability
    bias: bool = False  # biases in Linear and LayerNorm layers
    flash: bool = True  # fused scaled_dot_product_attention instead of the explicit softmax(QK^T)V
    pos: Literal["learned", "abacus", "none", "rope"] = "learned"  # position table, digit places, nothing, rotary
    abacus_offset: int = 16  # --pos abacus: training shifts every digit's index by a random 0..this
    # training
    seed: int = 1337  # seeds the weights, the batches, dropout and sampling
    batch_size: int = 128  # sequences per micro-batch
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    max_iters: int = 1500  # optimizer steps
    learning_rate: float = 3e-3  # peak learning rate
    min_lr: float = 3e-4  # learning rate at the end of the cosine decay
    warmup_iters: int = 100  # linear warmup steps
    lr_decay_iters: int = 0  # cosine decay length; 0 means max_iters
    weight_decay: float = 0.1  # AdamW weight decay, applied to matrices only
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.99  # AdamW beta2 (0.99 since there are few tokens per step)
    grad_clip: float = 1.0  # clip the gradient norm to this; 0 disables
    # system
    device: str = "auto"  # auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bfloat16 (else float16) on cuda, float32
    compile: bool = False  # torch.compile the model (worth it on a GPU)
    threads: int = 0  # CPU threads (torch.set_num_threads); 0: OMP_NUM_THREADS if set, else the cores idle at the start
    # sampling
    prompt: str = ""  # if set, skip training: load out_dir/best.pt and trace its work on this problem, e.g. 4572*168
    test_problems: int = 1000  # held-out problems scored at the end for each operand length
    eval_problems: int = 100  # held-out problems scored at every evaluation for each operand length

    @property
    def train_lengths(self):
        return digit_range(self.train_digits)

    @property
    def test_lengths(self):
        return digit_range(self.test_digits)

    @property
    def abacus_size(self):  # rows of the index and slot tables: the longest test problem's, the training ones shifted
        train, test = (places(max(n), max(n), self.task, self.format) for n in (self.train_lengths, self.test_lengths))
        return max(max(train)[0] + self.abacus_offset, max(test)[0]) + 1, max(o for _, o in train + test) + 1

    @property
    def block_size(self):  # the model reads the longest problem without its closing '.'
        n = max(self.train_lengths + self.test_lengths)
        return len(write(10**n - 1, 10**n - 1, self.task, self.format)) - 1

    def mistakes(self):
        """Settings no run can use, a message each (parse_args has refused every negative number already)."""
        ones = ["n_layer", "n_head", "n_embd", "batch_size", "gradient_accumulation_steps"]
        ones += ["eval_interval", "eval_iters", "log_interval", "test_problems", "eval_problems"]
        yield from (f"--{n} must be at least 1" for n in ones if getattr(self, n) < 1)
        yield from (f"--{n} must be below 1" for n in ("dropout", "beta1", "beta2") if getattr(self, n) >= 1)
        for name in ("train_digits", "test_digits"):
            if not digit_range(getattr(self, name)):
                yield f"--{name} {getattr(self, name)!r} must be a digit count like 3 or a range like 1-8, from 1 up"
        if self.train_lengths and self.test_lengths and self.block_size >= MAX_TOKENS:
            yield f"--train_digits and --test_digits make problems of {self.block_size + 1} tokens, over {MAX_TOKENS}"
        if self.n_embd % self.n_head:
            yield f"--n_embd {self.n_embd} must be divisible by --n_head {self.n_head}"
        if self.pos == "rope" and self.n_embd // self.n_head % 2:
            yield f"--pos rope rotates pairs of channels: it needs an even head width, not {self.n_embd // self.n_head}"
        if self.learning_rate == 0:
            yield "--learning_rate must be above 0"


RESUMED = ("n_layer", "n_head", "n_embd", "bias", "task", "format", "train_digits", "test_digits", "pos")


# ----------------------------------------------------------------------------------------------------------
# Data


def digit_range(text):
    """'3' -> [3], '1-8' -> [1, ..., 8]; [] for anything else (an empty range, 0 digits, not a number)."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", text)
    lo, hi = (int(m[1]), int(m[2] or m[1])) if m else (0, -1)
    return list(range(lo, hi + 1)) if lo >= 1 else []


def digits(n, width):
    """n's digits least significant first, zero-padded to width: digits(625, 4) == '5260'."""
    return str(n).zfill(width)[::-1]


def steps(a, b, task):
    """The scratchpad, one string a step; see the docstring at the top for the layout."""
    if task == "add":  # a column a step, from the ones: carry in, the two digits, the sum's digit
        width = max(len(str(a)), len(str(b))) + 1
        out, carry = [], 0
        for x, y in zip(digits(a, width), digits(b, width)):
            total = carry + int(x) + int(y)
            out.append(f"{carry}:{x}+{y}={total % 10}")
            carry = total // 10
        return out
    out, total = [], 0  # a digit of b a step, from the ones: a times it, shifted to its place, and the running sum
    for place, d in enumerate(reversed(str(b))):
        partial = a * int(d) * 10**place
        total += partial
        width = len(str(a)) + 1 + place  # wide enough for both
        out.append(f"{d}:{digits(partial, width)}>{digits(total, width)}")
    return out


def write(a, b, task, fmt):
    """A problem as the model reads and writes it: the prompt 'a+b=' (or 'a*b='), then the completion, ending '.'."""
    result, op = (a + b, "+") if task == "add" else (a * b, "*")
    width = max(len(str(a)), len(str(b))) + 1 if task == "add" else len(str(a)) + len(str(b))
    answer = str(result).zfill(width) if fmt == "direct" else digits(result, width)
    work = ",".join(steps(a, b, task)) + "|" if fmt == "cot" else ""
    return f"{a}{op}{b}={work}{answer}."


def prompt_length(a, b):
    """Tokens in the prompt 'a+b=': where the completion starts."""
    return len(str(a)) + len(str(b)) + 2


@functools.lru_cache(maxsize=None)
def places(la, lb, task, fmt):
    """The abacus positions of a problem with la- and lb-digit operands, (index, slot) for each token; the layout
    alone fixes them. Index: a digit's is 1 + the power of ten it stands for, so digits that are added together share
    it; every other token of a step gets the step's number (every token of an addition step: its column's); any other
    token 0. Slot: a token's place within its step, 0 outside the work: the tokens of an addition step share their
    index, and without positions nothing else would tell them apart."""
    text = write(10 ** (la - 1), 10 ** (lb - 1), task, fmt)
    index = [la - i for i in range(la)] + [0] + [lb - i for i in range(lb)] + [0]  # most significant first
    work, answer = text[la + lb + 2 :].split("|") if fmt == "cot" else ("", text[la + lb + 2 :])
    for k, step in enumerate(work.split(",") if work else [], start=1):
        if task == "add":  # carry, digits, sum digit and symbols: all on column k, and the ',' after them
            index += [k] * (len(step) + 1)
        else:  # the digit of b (place k), the partial product and the running sum (by place), symbols k
            w = len(step.split(">")[1])
            index += [k, k] + list(range(1, w + 1)) + [k] + list(range(1, w + 1)) + [k]
    slot = [0] * (la + lb + 2) + [i for step in (work.split(",") if work else []) for i in range(1, len(step) + 2)]
    if work:
        index[-1] = slot[-1] = 0  # '|'
    n = len(answer) - 1
    index += (list(range(n, 0, -1)) if fmt == "direct" else list(range(1, n + 1))) + [0]
    slot += [0] * len(answer)
    assert len(index) == len(slot) == len(text)
    return list(zip(index, slot))


def is_held_out(a, b):
    """A fixed tenth of all problems, picked by a hash of the pair: membership needs no table."""
    h = ((a * 0x9E3779B97F4A7C15) ^ b) * 0xBF58476D1CE4E5B9 % 2**64  # scatter the bits of both numbers
    return (h >> 32) % 10 == 0


def random_number(n, gen):
    """A uniformly drawn number of n digits (0 to 9 for one digit)."""
    d = torch.randint(0, 10, (n,), generator=gen).tolist()
    if n > 1:
        d[0] = 1 + torch.randint(0, 9, (1,), generator=gen).item()  # no leading zero
    return int("".join(map(str, d)))


class CharTokenizer:
    name = "char"  # what a checkpoint's "tokenizer" says

    def __init__(self, chars):
        self.chars = list(chars)
        self.ids = {c: i for i, c in enumerate(self.chars)}

    def encode(self, s):
        return [self.ids[c] for c in s]

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)


class DataLoader:
    """Fresh problems every batch: each operand's length drawn from --train_digits, held-out problems left out of
    training; the held-out ones of every --test_digits length, the same ones every time, are what is scored."""

    def __init__(self, cfg, tok, device):
        self.cfg, self.tok, self.device = cfg, tok, device

    def draw(self, la, lb, gen, held_out):
        while True:  # the held-out tenth is rejected in training, the other nine tenths when scoring
            a, b = random_number(la, gen), random_number(lb, gen)
            if is_held_out(a, b) == held_out:
                return a, b

    @functools.cache
    def test_problems(self, n, count):
        """count different held-out problems with two n-digit operands (all of them when there are fewer), the same
        every call: those of a smaller count are the first of a larger one."""
        gen = torch.Generator().manual_seed(n)
        if n <= 2:  # few enough to list (10 with one digit, 810 with two), in a fixed random order
            every = range(10 ** (n - 1) if n > 1 else 0, 10**n)
            listed = [(a, b) for a in every for b in every if is_held_out(a, b)]
            return [listed[i] for i in torch.randperm(len(listed), generator=gen)[:count].tolist()]
        problems = {}  # a dict keeps the order of drawing
        while len(problems) < count:
            problems[self.draw(n, n, gen, True)] = None
        return list(problems)

    def get_batch(self, split, generator, problems=None):
        """x, y and the abacus positions (B, T, 2) of a batch: random training problems, or the given ones."""
        if problems is None:
            lo, hi = self.cfg.train_lengths[0], self.cfg.train_lengths[-1]
            lengths = torch.randint(lo, hi + 1, (self.cfg.batch_size, 2), generator=generator).tolist()
            problems = [self.draw(la, lb, generator, split == "val") for la, lb in lengths]
        texts = [write(a, b, self.cfg.task, self.cfg.format) for a, b in problems]
        T = max(map(len, texts))
        ids = torch.full((len(texts), T), VOCAB.index("."))
        pos = torch.zeros((len(texts), T, 2), dtype=torch.long)
        y = torch.full((len(texts), T - 1), -1)
        for i, ((a, b), text) in enumerate(zip(problems, texts)):
            start = prompt_length(a, b)  # the prompt, masked from the loss
            ids[i, : len(text)] = torch.tensor(self.tok.encode(text))
            pos[i, : len(text)] = torch.tensor(places(len(str(a)), len(str(b)), self.cfg.task, self.cfg.format))
            y[i, start - 1 : len(text) - 1] = ids[i, start : len(text)]  # after the closing '.': padding, no loss
        if split == "train" and self.cfg.pos == "abacus":  # the same random shift for every digit of a problem
            shift = torch.randint(0, self.cfg.abacus_offset + 1, (len(texts), 1), generator=generator)
            pos[..., 0] = torch.where(pos[..., 0] > 0, pos[..., 0] + shift, 0)
        x = ids[:, :-1]
        return x.to(self.device), y.to(self.device), pos[:, :-1].to(self.device)


# ----------------------------------------------------------------------------------------------------------
# Model


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


class CausalSelfAttention(nn.Module):
    """All heads in one module: one projection makes q, k, v for every head at once."""

    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.dropout, self.flash, self.rope = cfg.n_head, cfg.dropout, cfg.flash, cfg.pos == "rope"
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
        if self.rope:  # the positions 0..T-1 rotate queries and keys
            pos = torch.arange(T, device=x.device)
            q, k = rotate(q, pos), rotate(k, pos)
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
        if cfg.pos == "learned":
            self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)  # learned position embeddings
        if cfg.pos == "abacus":  # an embedding per index (row 0: none; shifted ones included) and per slot
            self.abacus = nn.Embedding(cfg.abacus_size[0], cfg.n_embd)
            self.abacus_slot = nn.Embedding(cfg.abacus_size[1], cfg.n_embd)
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
        return sum(p.numel() for p in self.parameters()) - (self.wpe.weight.numel() if self.cfg.pos == "learned" else 0)

    def forward(self, idx, targets=None, places=None):
        """places (B, T, 2): the tokens' abacus indices and slots, for --pos abacus."""
        B, T = idx.size()
        assert T <= self.cfg.block_size, f"sequence of {T} tokens is longer than block_size {self.cfg.block_size}"
        x = self.wte(idx)
        if self.cfg.pos == "learned":
            x = x + self.wpe(torch.arange(T, device=idx.device))
        if self.cfg.pos == "abacus":
            x = x + self.abacus(places[..., 0]) + self.abacus_slot(places[..., 1])
        x = self.drop(x)
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
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=0, places=None):
        """Append max_new_tokens tokens to idx (B, T), each sampled from the model's next-token distribution; places:
        the abacus indices of the whole problem (its layout fixes them), for --pos abacus."""
        for _ in range(max_new_tokens):
            T = idx.size(1)
            logits, _ = self(idx, places=None if places is None else places[:T].expand(len(idx), T, 2))
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


@torch.no_grad()
def estimate_loss(model, loader, cfg, autocast):
    """Mean loss over eval_iters batches per split; the same batches every time, so evaluations compare."""
    model.eval()
    out = {}
    for split in ("train", "val"):
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        losses = torch.zeros(cfg.eval_iters)
        for k in range(cfg.eval_iters):
            x, y, places = loader.get_batch(split, gen)
            with autocast:
                _, loss = model(x, y, places)
            losses[k] = loss.item()
        out[split] = losses.mean().item()
    model.train()
    return out


def train(cfg, model, loader, tok, device, autocast, ckpt=None):
    optimizer = model.configure_optimizer(cfg, device.type)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.dtype == "float16")  # float16 needs its loss scaled
    gen = torch.Generator().manual_seed(cfg.seed)  # draws the training batches
    tokens = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size
    saved = {"tokenizer": tok.name, "vocab": tok.chars}  # what a checkpoint holds besides the training state
    # the bookkeeping around the step (shared section); on --resume it restores the optimizer and the random states
    columns = tuple(f"acc_{n}" for n in cfg.test_lengths)
    run = Run(cfg, model, optimizer, gen, tokens, ckpt, extra=lambda: saved, columns=columns)
    if cfg.compile:
        print("compiling the model (takes a minute)...")
        model = torch.compile(model)
    for it in range(run.iter_num, cfg.max_iters + 1):
        run.stop_if_requested(it)  # Ctrl-C or SIGTERM: save the state at this iteration and exit
        lr = get_lr(it, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if it % cfg.eval_interval == 0 or it == cfg.max_iters:  # print, log, save ckpt.pt (best.pt when val improves)
            scored = scores(model, loader, cfg, autocast, cfg.eval_problems)  # {n: (exact match, wrong problems)}
            accs = {f"acc_{n}": acc for n, (acc, _) in scored.items()}
            run.evaluate(it, lr, estimate_loss(model, loader, cfg, autocast), **accs)
            wrong = [step for _, wrong_at in scored.values() for step in wrong_at.values()]
            if cfg.format == "cot" and wrong:  # where the work first goes wrong, over every length
                print(f"  first wrong: {where_wrong(wrong)}")
        if it == cfg.max_iters:
            break

        # forward and backward, gradients summed over the micro-batches
        for micro in range(cfg.gradient_accumulation_steps):
            x, y, places = loader.get_batch("train", gen)
            with autocast:
                _, loss = model(x, y, places)
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
# Scoring, tracing and main


@torch.no_grad()
def accuracy(model, problems, loader, cfg, autocast):
    """Exact match of greedy decoding, from one forward pass per problem: greedy decoding writes the true completion
    (work, answer and '.') exactly when, fed the true completion, the model's likeliest next token is right at every
    position of it (at the first wrong one, greedy decoding would leave it), so no token-by-token decoding is needed.
    Also the wrong problems, each with where it first goes wrong: its step's number, or 0 in the answer."""
    model.eval()
    correct, wrong_at = 0, {}
    for i in range(0, len(problems), 1024):
        batch = problems[i : i + 1024]
        x, y, places = loader.get_batch("val", None, batch)
        with autocast:
            logits, _ = model(x, places=places)
        wrong = (logits.argmax(dim=-1) != y) & (y >= 0)
        correct += (~wrong.any(dim=1)).sum().item()
        for j in wrong.any(dim=1).nonzero()[:, 0].tolist():
            written = x[j, : wrong[j].nonzero()[0].item() + 1]  # the tokens before the first wrong one
            answering = cfg.format != "cot" or (written == VOCAB.index("|")).any().item()
            wrong_at[batch[j]] = 0 if answering else 1 + (written == VOCAB.index(",")).sum().item()
    model.train()
    return correct / len(problems), wrong_at


def scores(model, loader, cfg, autocast, count):
    """{n: (exact match, wrong problems)} for every --test_digits length n, on count held-out problems each."""
    return {n: accuracy(model, loader.test_problems(n, count), loader, cfg, autocast) for n in cfg.test_lengths}


def where_wrong(steps_wrong):
    """'step 3 40%, step 7 20%, answer 40%': where the wrong answers first went wrong."""
    counts = {k: steps_wrong.count(k) for k in sorted(set(steps_wrong), key=lambda k: k or math.inf)}
    shares = {k: 100 * c / len(steps_wrong) for k, c in counts.items()}
    return ", ".join(f"{f'step {k}' if k else 'answer'} {p:.{0 if p >= 1 else 1}f}%" for k, p in shares.items())


def report(model, loader, tok, cfg, device, autocast):
    """Exact match at every --test_digits length on --test_problems held-out problems each; for cot, where the wrong
    ones first went wrong; and a wrong answer at the shortest length with one, traced."""
    t, traced = time.time(), None
    print(f"exact match on held-out problems by operand length (trained on {cfg.train_digits} digits):")
    for n, (acc, wrong_at) in scores(model, loader, cfg, autocast, cfg.test_problems).items():
        where = f" | first wrong: {where_wrong(list(wrong_at.values()))}" if wrong_at and cfg.format == "cot" else ""
        print(f"  digits {n:3d}: {100 * acc:7.3f}% of {len(loader.test_problems(n, cfg.test_problems)):,}{where}")
        traced = traced or next(iter(wrong_at), None)  # at the shortest length with a mistake: where it breaks
    print(f"scored in {time.time() - t:.1f} s")
    if traced:
        print("a wrong answer, traced:")
        trace(model, tok, cfg, device, autocast, *traced)


def complete(model, tok, cfg, device, autocast, a, b):
    """What the model writes after a's and b's prompt, greedy-decoded token by token, up to its '.'."""
    text = write(a, b, cfg.task, cfg.format)
    start, la, lb = prompt_length(a, b), len(str(a)), len(str(b))
    idx = torch.tensor([tok.encode(text[:start])], device=device)
    model.eval()
    with autocast:
        out = model.generate(
            idx,
            len(text) - start,
            temperature=0,
            places=torch.tensor(places(la, lb, cfg.task, cfg.format), device=device),
        )
    written = tok.decode(out[0, start:].tolist())
    return written[: written.index(".") + 1] if "." in written else written


def explain(step, task):
    """A step in words: 'carry 1 + 5 + 6 -> 2' or 'x 6: 274320, sum 310896'; '' for one that does not parse."""
    m = re.fullmatch(r"(\d):(\d)\+(\d)=(\d)" if task == "add" else r"(\d):(\d+)>(\d+)", step)
    if not m:
        return ""
    if task == "add":
        return f"carry {m[1]} + {m[2]} + {m[3]} -> {m[4]}"
    return f"x {m[1]}: {int(m[2][::-1])}, sum {int(m[3][::-1])}"


def trace(model, tok, cfg, device, autocast, a, b):
    """The model's work on a problem, step by step, each marked right or shown beside the true one; then the answer."""
    start = prompt_length(a, b)
    true, written = write(a, b, cfg.task, cfg.format)[start:], complete(model, tok, cfg, device, autocast, a, b)
    print(f"{a}{'+' if cfg.task == 'add' else '*'}{b}={written}")
    # the work before '|' and the answer after it (without a '|', all of a cot completion is work)
    (work, answer), (true_work, true_answer) = (
        s.partition("|")[::2] if cfg.format == "cot" else ("", s) for s in (written, true)
    )
    mine, theirs = (w.split(",") if w else [] for w in (work, true_work))
    width = max(map(len, mine + theirs), default=0)
    for k in range(max(len(mine), len(theirs))):
        step, right = (s[k] if k < len(s) else "" for s in (mine, theirs))
        mark = "right" if step == right else f"wrong: should be {right} ({explain(right, cfg.task)})"
        print(f"  step {k + 1:2d}  {step:{width}}  {explain(step, cfg.task):30}  {mark}")

    def number(s):  # most significant digit first, without the '.' and leading zeros
        s = s.removesuffix(".") if cfg.format == "direct" else s.removesuffix(".")[::-1]
        return str(int(s)) if s.isdigit() else s

    mark = "right" if answer == true_answer else f"wrong: should be {number(true_answer)}"
    print(f"  answer   {number(answer)}  {mark}")


def sample(model, tok, cfg, device, autocast, prompt):
    """Trace the model's work on one problem typed as 4572*168."""
    op = "+" if cfg.task == "add" else "*"
    m = re.fullmatch(r"(\d+)\s*([+*])\s*(\d+)\s*=?", prompt.strip())
    if not m:
        die(f"--prompt {prompt!r} must look like 4572{op}168")
    if m[2] != op:
        die(f"--prompt {prompt!r}: the model in {cfg.out_dir} learned --task {cfg.task}; ask it a{op}b")
    a, b, longest = int(m[1]), int(m[3]), max(cfg.train_lengths + cfg.test_lengths)
    if max(len(str(a)), len(str(b))) > longest:
        die(
            f"--prompt {prompt!r}: the model reads operands of at most {longest} digits (the longest of its "
            f"--train_digits {cfg.train_digits} and --test_digits {cfg.test_digits}, which fix its block size)"
        )
    trace(model, tok, cfg, device, autocast, a, b)


def main(argv=None):
    cfg = parse_args(argv)
    device, autocast = setup_device(cfg)
    torch.manual_seed(cfg.seed)

    if cfg.prompt:  # tracing only: everything needed is in the checkpoint
        ckpt = load_checkpoint(os.path.join(cfg.out_dir, "best.pt"), device)
        tok = CharTokenizer(ckpt["vocab"])
        for name in RESUMED:
            setattr(cfg, name, ckpt["config"][name])
        model = GPT(cfg, len(tok.chars)).to(device)
        model.load_state_dict(ckpt["model"])
        sample(model, tok, cfg, device, autocast, cfg.prompt)
        return

    ckpt = None
    if cfg.resume:
        ckpt = load_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"), device)
        resume_config(cfg, ckpt["config"], RESUMED, kept=("max_iters", "lr_decay_iters"))
    else:
        check_out_dir(cfg.out_dir, cfg.overwrite)
    tok = CharTokenizer(VOCAB)
    loader = DataLoader(cfg, tok, device)
    example = write(*loader.test_problems(cfg.test_lengths[-1], 1)[0], cfg.task, cfg.format)
    print(f"operands of {cfg.train_digits} digits trained on, {cfg.test_digits} scored, e.g. {example}")

    model = GPT(cfg, len(tok.chars)).to(device)
    if ckpt:
        model.load_state_dict(ckpt["model"])
    print(f"{model.num_params() / 1e6:.2f}M parameters, device {device}, dtype {cfg.dtype}")
    with STOP:  # Ctrl-C: save and stop at the next iteration (twice: at once)
        train(cfg, model, loader, tok, device, autocast, ckpt)
        report(model, loader, tok, cfg, device, autocast)  # Ctrl-C twice while scoring: exit 130, no traceback


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
