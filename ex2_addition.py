"""
ex2_addition.py: the same GPT learns integer addition, with the answer's digits written backwards.

Changes from ex1_gpt.py:
- Addition problems instead of a text (--digits): VOCAB, Config.answer_start and Config.block_size, is_held_out (a
  fixed tenth never trained on), make_problems, a DataLoader of whole problems; CharTokenizer only decodes.
- The answer's digits reversed (make_problems): "123+456=9750", least significant first, the order in which carries
  are worked out, so each digit depends only on digits the model has already written.
- The prompt masked from the loss with -1 (DataLoader.get_batch): only the answer is learned.
- Greedy decoding and exact-match accuracy (--test_problems, --train_problems): answer() and accuracy() at every
  evaluation (log.csv's val_acc) and in report() at the end; sample() answers --prompt 123+456.
- The explicit attention by default (--no-flash): the problems are 11 tokens long, where it is faster than the fused
  kernel on the CPU.

Run:     python ex2_addition.py
Ask:     python ex2_addition.py --prompt 123+456    (answers from the saved checkpoint)
Parent:  ex1_gpt.py (diff -u ex1_gpt.py ex2_addition.py)
Result:  100% exact match on all 100,001 held-out 3-digit problems in about a minute on 2 CPU cores (RESULTS.md).
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
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from typing import Literal, get_args

import torch
import torch.nn as nn
from torch.nn import functional as F

SCRIPT = os.path.splitext(os.path.basename(__file__))[0]
VOCAB = "0123456789+="  # a digit's token id is the digit itself
MAX_PROBLEMS = 10**6  # with more possible problems than this (digits > 3), a random sample of this many is used


@dataclass
class Config:
    # I/O
    out_dir: str = f"out/{SCRIPT}"  # checkpoint and log.csv go here
    digits: int = 3  # digits in each operand
    resume: bool = False  # continue training from out_dir/ckpt.pt, the latest saved state
    overwrite: bool = False  # start over in an out_dir holding this script's checkpoint (replaces ckpt.pt and best.pt)
    eval_interval: int = 500  # evaluate and save ckpt.pt every this many iterations (best.pt when val improves)
    eval_iters: int = 10  # batches per split in each evaluation
    log_interval: int = 100  # print and log the training loss every this many iterations
    wandb: bool = False  # also log to Weights & Biases
    wandb_project: str = "gpt-ladder"  # wandb project name
    # model
    n_layer: int = 2  # transformer blocks
    n_head: int = 4  # attention heads per block
    n_embd: int = 64  # embedding width
    dropout: float = 0.0  # dropout probability
    bias: bool = False  # biases in Linear and LayerNorm layers
    flash: bool = False  # fused scaled_dot_product_attention instead of the explicit softmax(QK^T)V (slower at T=11)
    # training
    seed: int = 1337  # seeds the weights, the batches, dropout and sampling
    batch_size: int = 256  # sequences per micro-batch
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
    prompt: str = ""  # if set, skip training: load out_dir/best.pt and answer this problem, e.g. 123+456
    test_problems: int = 0  # held-out problems scored at the end; 0 for all of them
    train_problems: int = 10_000  # training problems scored at the end beside them (memorised or learned?); 0: none

    @property
    def answer_start(self):  # index of the first answer token: a, '+', b and '=' come before it
        return 2 * self.digits + 2

    @property
    def block_size(self):  # the model reads a problem without its last answer digit: digits + 1 answer digits
        return self.answer_start + self.digits

    def mistakes(self):
        """Settings no run can use, a message each (parse_args has refused every negative number already)."""
        ones = ["n_layer", "n_head", "n_embd", "batch_size", "gradient_accumulation_steps"]
        ones += ["eval_interval", "eval_iters", "log_interval"]
        yield from (f"--{n} must be at least 1" for n in ones if getattr(self, n) < 1)
        yield from (f"--{n} must be below 1" for n in ("dropout", "beta1", "beta2") if getattr(self, n) >= 1)
        if not 1 <= self.digits <= 9:  # a problem's id, a * 10^digits + b, must fit in 64 bits
            yield f"--digits {self.digits} must be between 1 and 9"
        if self.n_embd % self.n_head:
            yield f"--n_embd {self.n_embd} must be divisible by --n_head {self.n_head}"
        if self.learning_rate == 0:
            yield "--learning_rate must be above 0"


RESUMED = ("n_layer", "n_head", "n_embd", "bias", "digits")  # --resume takes these from ckpt.pt


# ----------------------------------------------------------------------------------------------------------
# Data


class CharTokenizer:
    name = "char"  # what a checkpoint's "tokenizer" says

    def __init__(self, chars):
        self.chars = list(chars)

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)


def is_held_out(ids):
    """A fixed tenth of all problems, picked by a hash of the problem id: membership needs no table."""
    h = ids * -7046029254386353131  # multiply by 2^64 / golden ratio (wrapping): scatters the bits
    h = h ^ (h >> 29)
    return (h >> 32) % 10 == 0


def make_problems(ids, digits):
    """Problem ids (a * 10^digits + b) -> token rows: a, '+', b, '=', then a + b reversed, zero-padded."""
    a, b = ids[:, None] // 10**digits, ids[:, None] % 10**digits
    most_first = 10 ** torch.arange(digits - 1, -1, -1)
    least_first = 10 ** torch.arange(digits + 1)
    plus, equals = torch.full_like(a, VOCAB.index("+")), torch.full_like(a, VOCAB.index("="))
    return torch.cat([a // most_first % 10, plus, b // most_first % 10, equals, (a + b) // least_first % 10], dim=1)


class DataLoader:
    """Every problem (or a sample of MAX_PROBLEMS), split by is_held_out; batches are random problems."""

    def __init__(self, cfg, device):
        n = 10 ** (2 * cfg.digits)
        if n <= MAX_PROBLEMS:
            ids = torch.arange(n)
        else:  # the same sample every run
            ids = torch.randint(n, (MAX_PROBLEMS,), generator=torch.Generator().manual_seed(0))
        problems, held_out = make_problems(ids, cfg.digits), is_held_out(ids)
        self.splits = {"train": problems[~held_out], "val": problems[held_out]}
        self.cfg, self.device = cfg, device

    def get_batch(self, split, generator):
        data = self.splits[split]
        xy = data[torch.randint(len(data), (self.cfg.batch_size,), generator=generator)]
        x, y = xy[:, :-1], xy[:, 1:].clone()
        y[:, : self.cfg.answer_start - 1] = -1  # the prompt is given, not predicted: no loss there
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
    saved = {"tokenizer": tok.name, "vocab": tok.chars}  # what a checkpoint holds besides the training state
    # the bookkeeping around the step (shared section); on --resume it restores the optimizer and the random states
    run = Run(cfg, model, optimizer, gen, tokens, ckpt, extra=lambda: saved, columns=("val_acc",))
    if cfg.compile:
        print("compiling the model (takes a minute)...")
        model = torch.compile(model)
    for it in range(run.iter_num, cfg.max_iters + 1):
        run.stop_if_requested(it)  # Ctrl-C or SIGTERM: save the state at this iteration and exit
        lr = get_lr(it, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if it % cfg.eval_interval == 0 or it == cfg.max_iters:  # print, log, save ckpt.pt (best.pt when val improves)
            acc, _ = accuracy(model, loader.splits["val"][:1000], tok, cfg, device, autocast)  # a quick look
            run.evaluate(it, lr, estimate_loss(model, loader, cfg, autocast), val_acc=acc)
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


def answer(tokens, tok):
    """Answer tokens, least significant digit first -> the number they spell, as text. An under-trained model may
    write '+' or '=' among them: then the text as written (read backwards, like a number), which is not a number."""
    text = tok.decode(tokens.flip(0).tolist())
    return str(int(text)) if text.isdigit() else text


@torch.no_grad()
def accuracy(model, problems, tok, cfg, device, autocast, show=0):
    """Exact match of greedy decoding, from one forward pass per problem: greedy decoding writes the true answer
    exactly when, fed the true answer, the model's likeliest next token is right at every answer position (at the
    first wrong one, greedy decoding would leave it), so no token-by-token decoding is needed. In batches; up to
    `show` mistakes, greedy-decoded."""
    model.eval()
    start, correct, mistakes = cfg.answer_start, 0, []
    for batch in problems.split(4096):
        batch = batch.to(device)
        with autocast:
            logits, _ = model(batch[:, :-1])
        ok = (logits[:, start - 1 :].argmax(dim=-1) == batch[:, start:]).all(dim=1)
        correct += ok.sum().item()
        wrong = batch[~ok][: show - len(mistakes)]
        if len(wrong):
            with autocast:
                out = model.generate(wrong[:, :start], cfg.digits + 1, temperature=0)
            for row, pred in zip(wrong, out):
                problem = tok.decode(row[: start - 1].tolist())
                mistakes.append(f"{problem}={answer(row[start:], tok)} (model: {answer(pred[start:], tok)})")
    model.train()
    return correct / len(problems), mistakes


def sample(model, tok, cfg, device, autocast, prompt):
    """Answer one problem typed as 123+456, by greedy decoding."""
    m = re.fullmatch(rf"(\d{{1,{cfg.digits}}})\+(\d{{1,{cfg.digits}}})", prompt.strip())
    if not m:
        die(f"--prompt {prompt!r} must look like 123+456, at most {cfg.digits} digits each (the model's --digits)")
    problem = make_problems(torch.tensor([int(m[1]) * 10**cfg.digits + int(m[2])]), cfg.digits).to(device)
    start = cfg.answer_start
    model.eval()
    with autocast:
        out = model.generate(problem[:, :start], cfg.digits + 1, temperature=0)
    written = answer(out[0, start:], tok)
    note = "" if written.isdigit() else "  (not a number: '+' or '=' among the answer digits; train longer)"
    print(f"{int(m[1])}+{int(m[2])}={written}{note}")


def report(model, loader, tok, cfg, device, autocast):
    """Exact match over every held-out problem (or --test_problems of them) and over --train_problems training
    problems, with a few mistakes."""
    t = time.time()
    val = loader.splits["val"]
    if cfg.test_problems:  # a random sample: the first ones all start with small numbers
        val = val[torch.randperm(len(val))[: cfg.test_problems]]
    val_acc, mistakes = accuracy(model, val, tok, cfg, device, autocast, show=5)
    train = loader.splits["train"][torch.randperm(len(loader.splits["train"]))[: cfg.train_problems]]
    train_acc, _ = accuracy(model, train, tok, cfg, device, autocast) if len(train) else (float("nan"), [])
    print(
        f"held-out exact match: {100 * val_acc:.3f}% of {len(val):,} problems | train: {100 * train_acc:.3f}% of "
        f"{len(train):,} | {time.time() - t:.1f} s"
    )
    for line in mistakes:
        print(f"  mistake: {line}")
    return val_acc, train_acc


def main(argv=None):
    cfg = parse_args(argv)
    device, autocast = setup_device(cfg)
    torch.manual_seed(cfg.seed)

    if cfg.prompt:  # sampling only: everything needed is in the checkpoint
        ckpt = load_checkpoint(os.path.join(cfg.out_dir, "best.pt"), device)
        tok = CharTokenizer(ckpt["vocab"])
        cfg.digits = ckpt["config"]["digits"]
        model = GPT(Config(**ckpt["config"]), len(tok.chars)).to(device)
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
    loader = DataLoader(cfg, device)
    train_set, val_set = loader.splits["train"], loader.splits["val"]
    print(f"{len(train_set):,} training problems, {len(val_set):,} held out, e.g. {tok.decode(val_set[0].tolist())}")

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
