"""
bench_flash_moe_finetune.py: the numbers behind flash_moe_finetune.py, printed as Markdown tables for RESULTS.md.

Two parts; `all` runs both. Every table starts with the machine (CPU, threads, torch version).

  quality    The offline stand-in for "GPT-2 fine-tuned on WikiText-2" (no GPT-2 weights and no WikiText-2 train split
             here). 1. A small GPT-2-architecture model made by this repository: 4 layers, 4 heads, 128 wide, context
             128, GPT-2's BPE (7.2M parameters, 6.4M of them the tied embedding), pretrained by
             `ex3_pretrain_finetune.py --stage pretrain --tokenizer gpt2` for 800 iterations of 8 x 128 tokens on the
             first 5M tokens of the Project Gutenberg books (../shared/data/gutenberg/books, no Wikipedia), encoded once
             into data/ and reused later. 2. From its checkpoint, `flash_moe_finetune.py --init_from PATH`: the MLPs of
             layers 1 and 3 upcycled into 4 experts (top-2), fine-tuned 300 iterations of 8 x 128 tokens on WikiText-2's
             valid split (its last 10% held out for checkpoint selection), learning rate 1e-3. 3. The same fine-tune
             dense (--n_experts 1): the same iterations, batches and learning rate. Prints the test perplexity (all
             295,877 GPT-2 tokens of the test split; window 128, stride 64) before and after, per token and per word
             (WikiText's 245,569 words and line ends), the best val loss, ms/iter, and each expert's share of the test
             tokens. The before-perplexity of both runs is the same number: upcycling changes nothing before training.
  attention  ms per forward + backward of causal attention (batch 4, 4 heads of 32) on the CPU at T = 128 ... 1024:
             the fused scaled_dot_product_attention, the tiled FlashAttention of this script (blocks of 64), and the
             explicit softmax(QK^T)V. About half a minute.

Run on a quiet machine. On 2 CPU cores:
  python benchmarks/bench_flash_moe_finetune.py all      about 20-25 minutes, estimated (not run whole) from 1-thread
                                                    timings on a busy 2-core machine (1.35 s/iter dense, 2.1 s/iter MoE,
                                                    1.7k test tokens/s there) divided by 2-2.5: pretraining ~8 min, MoE
                                                    fine-tune ~7 min, dense ~6 min (each with two test perplexities of
                                                    ~1 min), attention ~0.5 min
  python benchmarks/bench_flash_moe_finetune.py quality  (--books, --wikitext, --shakespeare PATH; flags after -- go to
                                                    both fine-tunes)
  python benchmarks/bench_flash_moe_finetune.py attention
  python benchmarks/bench_flash_moe_finetune.py all --quick  a check of the script itself: tiny sizes, under a minute

With real GPT-2 weights (a machine that can download them; not measured here):
  python flash_moe_finetune.py --n_experts 1 --max_iters 0   zero-shot GPT-2 small on wikitext-2-raw-v1's test split
                                                             (window 1024, stride 512); the paper reports 29.41 per word
  python flash_moe_finetune.py                               upcycled to 4 experts in every other layer and fine-tuned
  python flash_moe_finetune.py --n_experts 1                 the dense fine-tune (HF's run_clm reaches about 20 per
                                                             token)
"""

import argparse
import os
import re
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, "..", "shared", "data")
OUT = os.path.join(ROOT, "out", "bench_flash_moe_finetune")

import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

sys.path.insert(0, ROOT)
import flash_moe_finetune as fm  # noqa: E402
from common import machine, run, table  # noqa: E402

# ----------------------------------------------------------------------------------------------------------
# Quality: a model of this repository, upcycled and fine-tuned on WikiText-2, against the dense fine-tune


def perplexities(text, when):
    """(per token, per word) from a 'test perplexity <when>: X per token (...), Y per word' line."""
    m = re.search(rf"test perplexity {re.escape(when)}: ([\d.]+) per token \([\d,]+ tokens\), ([\d.]+) per word", text)
    return float(m.group(1)), float(m.group(2))


def finetune(a, name, flags):
    out_dir = os.path.join(a.out, name)
    text, wall, _ = run(
        [sys.executable, os.path.join(ROOT, "flash_moe_finetune.py"), "--out_dir", out_dir, "--overwrite", *flags],
        show=True,
    )
    params = re.search(r"([\d.]+)M parameters \(([\d.]+)M used per token\)", text)
    done = re.search(r"done: (\d+) iterations in ([\d.]+) s, median ([\d.]+) ms/iter, best val ([\d.]+)", text)
    after = text.split("test perplexity after")[1].split("test perplexity per token")[0]  # with the experts' use
    return {
        "text": text,
        "wall": wall,
        "params": float(params.group(1)),
        "active": float(params.group(2)),
        "before": perplexities(text, "before fine-tuning"),
        "after": perplexities(text, "after fine-tuning (best val checkpoint)"),
        "iters": int(done.group(1)),
        "train_s": float(done.group(2)),
        "ms": float(done.group(3)),
        "val": float(done.group(4)),
        "usage": re.findall(r"  layer (\d+) expert use \(%\) \| mlp ([\d ]+)", after),
        "change": re.search(r"largest logit change ([\d.e+-]+)", text),
        "layers": (re.findall(r"upcycled the MLPs of layers ([\d, ]+) into", text) or ["-"])[0],
    }


def quality(a):
    a.out = os.path.join(OUT, "quick" if a.quick else "full")
    if a.quick:
        size = ["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "32", "--batch_size", "4"]
        pre_iters, ft_iters, every, evals, tokens = 30, 10, 10, 5, ["--pretrain_tokens", "200000"]
    else:
        size = ["--n_layer", "4", "--n_head", "4", "--n_embd", "128", "--block_size", "128", "--batch_size", "8"]
        pre_iters, ft_iters, every, evals, tokens = 800, 300, 100, 20, ["--pretrain_tokens", "5000000"]
    # 1. the starting model: pretrained by ex3 on the books with GPT-2's BPE
    base = os.path.join(a.out, "base")
    shakespeare = ["--data", a.shakespeare] if a.shakespeare else []
    text, pre_wall, _ = run([sys.executable, os.path.join(ROOT, "ex3_pretrain_finetune.py"), "--stage", "pretrain",
                             "--tokenizer", "gpt2", "--out_dir", base, "--overwrite", "--pretrain_data", a.books,
                             *tokens, *shakespeare, *size, "--max_iters", str(pre_iters),
                             "--eval_interval", str(pre_iters), "--eval_iters", str(evals), "--learning_rate", "1e-3",
                             "--min_lr", "1e-4", "--warmup_iters", str(pre_iters // 16), "--log_interval", str(every),
                             "--max_new_tokens", "30", "--device", "cpu"], show=True)  # fmt: skip
    pre_val = float(
        re.search(r"done: \d+ iterations in [\d.]+ s, median [\d.]+ ms/iter, best val ([\d.]+)", text).group(1)
    )
    corpus = re.search(r"pretraining corpus: ([\d,]+) tokens", text).group(1)
    # 2. and 3. fine-tuned on WikiText-2 with experts, and dense
    common = ["--init_from", os.path.join(base, "pretrain", "best.pt"), "--data", a.wikitext, "--train_split", "valid",
              "--max_iters", str(ft_iters), "--eval_interval", str(every), "--eval_iters", str(evals),
              "--log_interval", str(every), "--learning_rate", "1e-3", "--min_lr", "1e-4",
              "--warmup_iters", str(ft_iters // 10), "--dropout", "0", "--max_new_tokens", "60",
              "--device", "cpu"]  # fmt: skip
    common += (["--test_tokens", "5000"] if a.quick else []) + a.extra
    moe = finetune(a, "moe", common + ["--n_experts", "4", "--moe_k", "2", "--moe_layers", "odd"])
    dense = finetune(a, "dense", common + ["--n_experts", "1"])

    print(
        "\n### flash_moe_finetune.py: a model of this repository upcycled and fine-tuned on "
        f"WikiText-2{' (--quick)' if a.quick else ''}\n"
    )
    print(
        f"Machine: {machine()}. Command: python benchmarks/bench_flash_moe_finetune.py quality"
        + (" --quick." if a.quick else ".")
    )
    print(
        f"Starting model: {size[1]} layers, {size[3]} heads, {size[5]} wide, context {size[7]}, GPT-2's BPE; "
        "pretrained by ex3_pretrain_finetune.py "
        f"on {corpus} tokens of Project Gutenberg books, {pre_iters} iterations of {size[9]} x {size[7]} tokens, "
        f"val loss {pre_val:.4f} "
        f"({pre_wall / 60:.1f} min). Fine-tuned {ft_iters} iterations of {size[9]} x {size[7]} tokens on "
        "WikiText-2's valid split, "
        f"evaluated on its test split (window {size[7]}, stride {int(size[7]) // 2}).\n"
    )
    ppl = lambda p: f"{p[0]:.2f} / {p[1]:.2f}"  # noqa: E731
    table(
        ["model", "parameters (used per token)", "test perplexity per token / per word", "best val loss", "ms/iter",
         "training"],
        [
            ["pretrained, before fine-tuning", f"{dense['params']:.2f}M", ppl(dense["before"]), "-", "-", "-"],
            [f"upcycled (4 experts in layers {moe['layers']}, top-2), before fine-tuning",
             f"{moe['params']:.2f}M ({moe['active']:.2f}M)", ppl(moe["before"]), "-", "-", "-"],
            ["dense fine-tune", f"{dense['params']:.2f}M", f"**{ppl(dense['after'])}**", f"{dense['val']:.4f}",
             f"{dense['ms']:.0f}", f"{dense['train_s'] / 60:.1f} min"],
            ["MoE fine-tune (upcycled)", f"{moe['params']:.2f}M ({moe['active']:.2f}M)", f"**{ppl(moe['after'])}**",
             f"{moe['val']:.4f}", f"{moe['ms']:.0f}", f"{moe['train_s'] / 60:.1f} min"],
        ],
    )  # fmt: skip
    change = moe["change"].group(1) if moe["change"] else "?"
    print(
        f"Upcycling changed the logits by at most {change} (float rounding); "
        "fine-tuning lowered the test perplexity per token from "
        f"{moe['before'][0]:.2f} to {moe['after'][0]:.2f} with experts and to {dense['after'][0]:.2f} dense: "
        f"MoE minus dense {moe['after'][0] - dense['after'][0]:+.2f}.\n"
    )
    print(
        "Expert balance: each expert's share of the test split's routing choices after fine-tuning (largest/mean: 1 "
        "is perfectly even, 4 one expert takes all).\n"
    )
    shares = {layer: [int(p) for p in use.split()] for layer, use in moe["usage"]}  # % of each layer's choices, rounded
    rows = [[layer, " ".join(f"{p}%" for p in s), f"{max(s) * len(s) / sum(s):.2f}"] for layer, s in shares.items()]
    table(["layer", "expert shares", "largest/mean"], rows)
    samples = moe["text"].split("--- sample 1, starting model ---")[1]
    print("Samples after the MoE fine-tune (the same prompt and seed; WikiText's artefacts cleaned):\n")
    print(
        "```\n--- starting model ---"
        + samples.replace("--- sample 1, fine-tuned ---", "--- fine-tuned ---").rstrip()
        + "\n```\n",
        flush=True,
    )


# ----------------------------------------------------------------------------------------------------------
# Attention: fused, tiled and explicit on the CPU


def attention(a):
    lengths = (64, 128) if a.quick else (128, 256, 512, 1024)
    B, H, D, reps = 4, 4, 32, 3 if a.quick else 5

    def explicit(q, k, v):
        causal = torch.ones(q.size(2), q.size(2), dtype=torch.bool).tril()
        return F.softmax((q @ k.transpose(-2, -1) / D**0.5).masked_fill(~causal, float("-inf")), -1) @ v

    paths = {
        "fused": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "tiled (blocks of 64)": lambda q, k, v: fm.tiled_attention(q, k, v, 64),
        "explicit": explicit,
    }
    rows = []
    for T in lengths:
        q, k, v = (torch.randn(B, H, T, D, requires_grad=True) for _ in range(3))
        row = [T]
        for path in paths.values():
            times = []
            for _ in range(reps + 1):  # the first is a warm-up
                t = time.perf_counter()
                path(q, k, v).sum().backward()
                times.append(time.perf_counter() - t)
            row.append(f"{1000 * statistics.median(times[1:]):.1f}")
        rows.append(row)
    print(f"\n### flash_moe_finetune.py: causal attention on the CPU{' (--quick)' if a.quick else ''}\n")
    print(f"Machine: {machine()}. Forward + backward, batch {B}, {H} heads of {D}, float32, median of {reps}; ms.\n")
    table(["T"] + list(paths), rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("part", choices=["all", "quality", "attention"])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the script, not the numbers")
    parser.add_argument(
        "--books",
        default=os.path.join(SHARED, "gutenberg", "books"),
        help="the pretraining corpus (folder of .txt files)",
    )
    parser.add_argument(
        "--wikitext",
        default=os.path.join(SHARED, "wikitext-2"),
        help="a folder with WikiText-2's valid.txt and test.txt",
    )
    default_shakespeare = os.path.join(SHARED, "tinyshakespeare.txt")
    parser.add_argument(
        "--shakespeare",
        default=default_shakespeare if os.path.isfile(default_shakespeare) else "",
        help="TinyShakespeare, which ex3 reads; empty: ex3 downloads it",
    )
    a, extra = parser.parse_known_args()
    a.extra = [x for x in extra if x != "--"]
    for path, flag in ((a.books, "--books"), (a.wikitext, "--wikitext")):
        if a.part != "attention" and not os.path.isdir(path):
            sys.exit(f"no folder {path}; pass {flag} PATH")
    for part in ("quality", "attention") if a.part == "all" else (a.part,):
        globals()[part](a)


if __name__ == "__main__":
    main()
