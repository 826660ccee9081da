"""
rnn_lm.py: the same character-level language model with the transformer replaced by a recurrent network.

Changes from ex1_gpt.py:
- RNNLM replaces GPT: token embeddings, a recurrent network (--cell elman|lstm|gru, --n_hidden), an output layer.
  Elman writes out h_t = act(W_hh h_{t-1} + W_hx x_t + b_h), act slide(a) = min(1, max(0, a)) or tanh (--activation);
  LSTM and GRU are torch.nn's. forward also returns the state; generate reads the prompt once, then a step per token.
- --bidirectional also reads every sequence backwards: it sees the next token, so its loss collapses, and its samples
  are nonsense (BIDIRECTIONAL_NOTE says so).
- --stateful (truncated BPTT): row b of every batch continues stream b where the last one stopped
  (DataLoader.next_chunk); train() carries the state over, detached, and saves it in the checkpoint.

Run:     python rnn_lm.py                           (2000 iterations of a 0.8M-parameter LSTM on the CPU)
Cells:   python rnn_lm.py --cell elman --n_hidden 832 [--activation tanh]   or   --cell gru --n_hidden 472  (0.80M each)
Leak:    python rnn_lm.py --bidirectional --out_dir out/rnn_lm_bidirectional
Sample:  python rnn_lm.py --prompt "ROMEO:" --num_samples 3
Parent:  ex1_gpt.py (diff -u ex1_gpt.py rnn_lm.py)
Result:  in 90 s of training on one core, LSTM val 1.594 against 2.186 for ex1's transformer (RESULTS.md).
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
    eval_interval: int = 250  # evaluate and save ckpt.pt every this many iterations (best.pt when val improves)
    eval_iters: int = 200  # batches per split in each evaluation
    log_interval: int = 10  # print and log the training loss every this many iterations
    wandb: bool = False  # also log to Weights & Biases
    wandb_project: str = "gpt-ladder"  # wandb project name
    # model
    cell: Literal["elman", "lstm", "gru"] = "lstm"  # elman (written out by hand), lstm or gru (torch.nn's)
    activation: Literal["slide", "tanh"] = "slide"  # the Elman cell's nonlinearity: slide (min(1, max(0, a))) or tanh
    n_layer: int = 1  # stacked recurrent layers
    n_embd: int = 64  # token embedding width: the input x_t of the first layer
    n_hidden: int = 408  # hidden state size per layer and direction (408: 0.80M parameters with lstm, as ex1)
    block_size: int = 64  # tokens per training sequence: backpropagation through time runs over this many steps
    dropout: float = 0.0  # dropout on the embeddings, between layers and before the output layer
    bidirectional: bool = False  # also read each sequence backwards; sees the next token, so it is not a language model
    stateful: bool = False  # each batch row resumes where the last one stopped, hidden state carried (truncated BPTT)
    # training
    seed: int = 1337  # seeds the weights, the batches, dropout and sampling
    batch_size: int = 12  # sequences per micro-batch
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    max_iters: int = 2000  # optimizer steps
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
    prompt: str = ""  # if set, skip training: load out_dir/best.pt and continue this text
    num_samples: int = 1  # samples to draw
    max_new_tokens: int = 500  # tokens per sample
    temperature: float = 0.8  # <1 sharper, >1 more random
    top_k: int = 200  # sample only among the k most likely tokens; 0 for all

    def mistakes(self):
        """Settings no run can use, a message each (parse_args has refused every negative number already)."""
        ones = ["n_layer", "n_embd", "n_hidden", "block_size", "batch_size", "gradient_accumulation_steps"]
        ones += ["eval_interval", "eval_iters", "log_interval", "num_samples"]
        yield from (f"--{n} must be at least 1" for n in ones if getattr(self, n) < 1)
        yield from (f"--{n} must be below 1" for n in ("dropout", "beta1", "beta2") if getattr(self, n) >= 1)
        if self.learning_rate == 0:
            yield "--learning_rate must be above 0"


# --resume takes these from ckpt.pt
RESUMED = ("cell", "activation", "n_layer", "n_embd", "n_hidden", "bidirectional", "data")


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
    """The corpus as one tensor of token ids; 90% train, 10% val; batches start at random offsets,
    or with --stateful, row b of every training batch is the next chunk of stream b (the b-th slice of train)."""

    def __init__(self, ids, cfg, device):
        n = int(0.9 * len(ids))
        self.splits = {"train": ids[:n], "val": ids[n:]}
        for split, data in self.splits.items():  # a batch starts at a random offset: block_size + 1 tokens at least
            if len(data) <= cfg.block_size:
                die(f"the {split} split has {len(data)} tokens, too few for --block_size {cfg.block_size}; add text")
        self.cfg, self.device = cfg, device
        self.offsets = torch.arange(cfg.block_size + 1)
        if cfg.stateful:
            length = n // cfg.batch_size
            if length <= cfg.block_size:
                need = cfg.batch_size * (cfg.block_size + 1)
                die(f"--stateful needs {need} train tokens (--batch_size x (--block_size + 1)), it has {n}; add text")
            # (B, length): row b is stream b, read on where it stopped
            self.streams = ids[: length * cfg.batch_size].view(cfg.batch_size, length)
            self.pos = 0  # where the next chunk starts in every stream

    def get_batch(self, split, generator):
        data = self.splits[split]
        ix = torch.randint(len(data) - self.cfg.block_size, (self.cfg.batch_size, 1), generator=generator)
        xy = data[ix + self.offsets]  # (B, T+1) gathered in one indexing op
        return self.to_device(xy)

    def next_chunk(self):
        """--stateful: the next block_size tokens of every stream; restart is True when the streams start over."""
        restart = self.pos + self.cfg.block_size + 1 > self.streams.size(1)
        if restart:
            self.pos = 0
        xy = self.streams[:, self.pos : self.pos + self.cfg.block_size + 1]
        self.pos += self.cfg.block_size  # the next chunk's first input is this chunk's last target
        return *self.to_device(xy), restart

    def to_device(self, xy):
        x, y = xy[:, :-1], xy[:, 1:]
        if self.device.type == "cuda":  # pinned memory lets the copy overlap with compute
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)


# ----------------------------------------------------------------------------------------------------------
# Model


def slide(a):
    """min(1, max(0, a)): linear inside (0, 1), flat outside; the gradient is 1 strictly inside (0, 1), 0 elsewhere."""
    return F.hardtanh(a, 0.0, 1.0)


class ElmanLayer(nn.Module):
    """One layer, one direction: h_t = act(W_hh h_{t-1} + W_hx x_t + b_h), the recurrence written out."""

    def __init__(self, n_in, n_hidden, activation):
        super().__init__()
        k = 1 / math.sqrt(n_hidden)  # the initialisation of nn.RNN: uniform(-k, k)
        self.W_hx = nn.Parameter(torch.empty(n_hidden, n_in).uniform_(-k, k))
        self.W_hh = nn.Parameter(torch.empty(n_hidden, n_hidden).uniform_(-k, k))
        self.b_h = nn.Parameter(torch.zeros(n_hidden))
        self.act = slide if activation == "slide" else torch.tanh

    def forward(self, x, h):
        """x (B, T, n_in), h (B, n_hidden): the state before x[:, 0] -> h_t for every t, (B, T, n_hidden)."""
        a = x @ self.W_hx.T + self.b_h  # the input's share of every step, all T at once: one big matmul
        hs = []
        for t in range(x.size(1)):  # only the recurrence is sequential
            h = self.act(a[:, t] + h @ self.W_hh.T)
            hs.append(h)
        return torch.stack(hs, dim=1)


class Elman(nn.Module):
    """Stacked, optionally bidirectional Elman layers, called like nn.LSTM and nn.GRU with batch_first=True:
    x (B, T, n_in), h_0 (n_layer * directions, B, n_hidden) or None -> the last layer's h_t
    (B, T, directions * n_hidden), and every layer's last state in h_0's shape."""

    def __init__(self, n_in, n_hidden, n_layer, dropout, bidirectional, activation):
        super().__init__()
        self.directions, self.n_hidden = 2 if bidirectional else 1, n_hidden
        # layer l, direction d is layers[l * directions + d], as torch orders h_0
        self.layers = nn.ModuleList(
            ElmanLayer(n_in if i < self.directions else self.directions * n_hidden, n_hidden, activation)
            for i in range(n_layer * self.directions)
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, h0=None):
        if h0 is None:
            h0 = x.new_zeros(len(self.layers), x.size(0), self.n_hidden)
        h_last = []
        for i in range(0, len(self.layers), self.directions):
            if i:
                x = self.dropout(x)  # between layers, as in nn.LSTM
            out = []
            for d in range(self.directions):  # d = 1 runs the same recurrence over the reversed sequence
                h = self.layers[i + d](x.flip(1) if d else x, h0[i + d])
                h_last.append(h[:, -1])
                out.append(h.flip(1) if d else h)
            x = torch.cat(out, dim=-1)
        return x, torch.stack(h_last)


def detach(state):
    """Cut the graph behind a recurrent state (a tensor, or LSTM's (h, c)); the values stay."""
    return tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()


class RNNLM(nn.Module):
    """Embedding -> recurrent layers -> output projection; the state after a sequence summarises all of it."""

    def __init__(self, cfg, vocab_size):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(vocab_size, cfg.n_embd)  # token embeddings: the x_t the recurrence reads
        self.drop = nn.Dropout(cfg.dropout)
        sizes = cfg.n_embd, cfg.n_hidden, cfg.n_layer  # of x_t, of h_t, and the number of stacked layers
        if cfg.cell == "elman":
            self.rnn = Elman(*sizes, cfg.dropout, cfg.bidirectional, cfg.activation)
        else:
            rnn = nn.LSTM if cfg.cell == "lstm" else nn.GRU
            dropout = cfg.dropout if cfg.n_layer > 1 else 0.0  # torch's acts between layers: with one, it would warn
            self.rnn = rnn(*sizes, batch_first=True, dropout=dropout, bidirectional=cfg.bidirectional)
        self.lm_head = nn.Linear((2 if cfg.bidirectional else 1) * cfg.n_hidden, vocab_size)  # y_t = W_yh h_t + b_y

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, targets=None, state=None):
        """-> logits, loss, and the state after the last token (None as input: start from zeros)."""
        x = self.drop(self.wte(idx))
        if x.device.type == "cpu" and isinstance(self.rnn, nn.RNNBase):  # oneDNN has no bfloat16 LSTM/GRU on many CPUs
            with torch.autocast("cpu", enabled=False):
                h, state = self.rnn(x.float(), state)  # h: the last layer's h_t at every position
        else:
            h, state = self.rnn(x, state)
        logits = self.lm_head(self.drop(h))
        loss = (
            None
            if targets is None
            else F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        )
        return logits, loss, state

    def configure_optimizer(self, cfg, device_type):
        # weight decay on matrices (Linear and recurrent weights, embeddings); not on biases
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
        flops_per_token = 6 * self.num_params()  # every weight is used once per token; there is no attention term
        name = torch.cuda.get_device_name(device)
        peak = next(
            (v for k, v in {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}.items() if k in name), 312e12
        )
        return flops_per_token * tokens_per_sec / peak

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=0):
        """Append max_new_tokens tokens to idx (B, T), each sampled from the model's next-token distribution."""
        state = None  # the recurrent state after the tokens read so far
        for _ in range(max_new_tokens):
            if self.cfg.bidirectional:  # the backward direction reads from the end, which moves: nothing to carry
                logits, _, _ = self(idx[:, -self.cfg.block_size :])
            else:  # the prompt once, then one token a step: the state carries everything before it
                logits, _, state = self(idx if state is None else idx[:, -1:], state=state)
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
                _, loss, _ = model(x, y)  # from the zero state, with or without --stateful
            losses[k] = loss.item()
        out[split] = losses.mean().item()
    model.train()
    return out


def train(cfg, model, loader, tok, device, autocast, ckpt=None):
    optimizer = model.configure_optimizer(cfg, device.type)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.dtype == "float16")  # float16 needs its loss scaled
    gen = torch.Generator().manual_seed(cfg.seed)  # draws the training batches
    tokens = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size
    hidden = None  # --stateful: the recurrent state at the end of the last chunk, carried into the next

    def extra():  # ckpt.pt holds the vocabulary, and with --stateful where the streams are and the state carried
        stream = {"pos": loader.pos, "hidden": hidden} if cfg.stateful else None
        return {"tokenizer": tok.name, "vocab": tok.chars, "stream": stream}

    # the bookkeeping around the step (shared section); on --resume it restores the optimizer and the random states
    run = Run(cfg, model, optimizer, gen, tokens, ckpt, extra=extra)
    # and the streams where they were, unless --batch_size changed: then they start over
    if ckpt and cfg.stateful and ckpt["stream"] and ckpt["config"]["batch_size"] == cfg.batch_size:
        loader.pos, hidden = ckpt["stream"]["pos"], ckpt["stream"]["hidden"]
    if cfg.stateful:
        print(f"stateful: {cfg.batch_size} streams of {loader.streams.size(1):,} tokens, {cfg.block_size} at a time")
    if cfg.compile:
        print("compiling the model (takes a minute)...")
        model = torch.compile(model)
    for it in range(run.iter_num, cfg.max_iters + 1):
        run.stop_if_requested(it)  # Ctrl-C or SIGTERM: save the state at this iteration and exit
        lr = get_lr(it, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if it % cfg.eval_interval == 0 or it == cfg.max_iters:  # print, log, save ckpt.pt (best.pt when val improves)
            run.evaluate(it, lr, estimate_loss(model, loader, cfg, autocast))
        if it == cfg.max_iters:
            break

        # forward and backward, gradients summed over the micro-batches
        for micro in range(cfg.gradient_accumulation_steps):
            if cfg.stateful:  # row b goes on where it stopped, from the state it ended in
                x, y, restart = loader.next_chunk()
                hidden = None if restart else hidden
            else:
                x, y = loader.get_batch("train", gen)  # on a GPU this overlaps with the previous step's kernels
            with autocast:
                _, loss, last = model(x, y, hidden)
            scaler.scale(loss / cfg.gradient_accumulation_steps).backward()  # the sum over micro-batches is the mean
            if cfg.stateful:  # truncated BPTT: the values go on into the next chunk, the gradient stops here
                hidden = detach(last)
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


def sample(model, tok, cfg, device, autocast, prompt):
    idx = torch.tensor([tok.encode(prompt)] * cfg.num_samples, dtype=torch.long, device=device)
    torch.manual_seed(cfg.seed)  # the same --seed draws the same samples
    model.eval()
    with autocast:
        out = model.generate(idx, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k)
    for i, row in enumerate(out.tolist()):
        print(f"--- sample {i + 1} ---\n{tok.decode(row)}")


BIDIRECTIONAL_NOTE = (
    "note: --bidirectional has read token t+1 (backwards) when it predicts it: its loss collapses, "
    "but it is not a language model and its samples are nonsense"
)


def main(argv=None):
    cfg = parse_args(argv)
    device, autocast = setup_device(cfg)
    torch.manual_seed(cfg.seed)

    if cfg.prompt:  # sampling only: everything needed is in the checkpoint
        ckpt = load_checkpoint(os.path.join(cfg.out_dir, "best.pt"), device)
        tok = CharTokenizer(ckpt["vocab"])
        model = RNNLM(Config(**ckpt["config"]), len(tok.chars)).to(device)
        model.load_state_dict(ckpt["model"])
        if model.cfg.bidirectional:
            print(BIDIRECTIONAL_NOTE)
        sample(model, tok, cfg, device, autocast, cfg.prompt)
        return

    ckpt = None
    if cfg.resume:
        ckpt = load_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"), device)
        resume_config(cfg, ckpt["config"], RESUMED, kept=("max_iters", "lr_decay_iters"))
    else:
        check_out_dir(cfg.out_dir, cfg.overwrite)
    if cfg.bidirectional and cfg.stateful:  # checked here: --resume takes --bidirectional from the checkpoint
        die("--bidirectional cannot be --stateful: the backward direction has no state to carry; drop one of them")
    text = load_text(cfg)
    tok = CharTokenizer(ckpt["vocab"] if ckpt else sorted(set(text)))
    ids = torch.tensor(tok.encode(text), dtype=torch.long)
    print(f"{len(text):,} characters, vocabulary of {len(tok.chars)}")
    loader = DataLoader(ids, cfg, device)

    model = RNNLM(cfg, len(tok.chars)).to(device)
    if ckpt:
        model.load_state_dict(ckpt["model"])
    print(f"{model.num_params() / 1e6:.2f}M parameters, device {device}, dtype {cfg.dtype}")
    if cfg.bidirectional:
        print(BIDIRECTIONAL_NOTE)
    with STOP:  # Ctrl-C in training saves the state after the iteration (a second one, or elsewhere: at once)
        train(cfg, model, loader, tok, device, autocast, ckpt)
        sample(model, tok, cfg, device, autocast, tok.chars[0])  # the first character: a newline in Shakespeare


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
