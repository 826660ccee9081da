"""
Time per iteration of ex1_gpt.py against nanoGPT's train.py at nanoGPT's CPU settings, interleaved.

    git clone https://github.com/karpathy/nanoGPT /tmp/nanoGPT
    python /tmp/nanoGPT/data/shakespeare_char/prepare.py
    python benchmarks/bench_vs_nanogpt.py --nanogpt /tmp/nanoGPT --iters 300 --rounds 3

Both run the same model (4 layers, 4 heads, 128 wide, block 64, batch 12, float32, no compile) in turns,
so a busy machine slows both alike. The table gives each run's median ms per iteration, evaluations excluded.
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = (
    "--n_layer=4 --n_head=4 --n_embd=128 --block_size=64 --batch_size=12 --dropout=0.0 --learning_rate=1e-3".split()
)


def ex1_ms(iters, out_dir):
    cmd = [sys.executable, os.path.join(ROOT, "ex1_gpt.py"), *SHARED, f"--max_iters={iters}", "--eval_interval=100000",
           "--eval_iters=1", "--log_interval=1", "--max_new_tokens=0", "--device=cpu", f"--out_dir={out_dir}",
           "--overwrite"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return [float(m) for m in re.findall(r"^iter \d+ \| loss [\d.]+ \| ([\d.]+) ms", out, re.M)]


def nanogpt_ms(iters, path, out_dir):
    cmd = [sys.executable, "train.py", "config/train_shakespeare_char.py", *SHARED, f"--max_iters={iters}",
           f"--lr_decay_iters={iters}", "--eval_interval=100000", "--eval_iters=1", "--log_interval=1", "--device=cpu",
           "--compile=False", f"--out_dir={out_dir}"]  # fmt: skip
    out = subprocess.run(
        cmd, capture_output=True, text=True, check=True, cwd=path, env={**os.environ, "WANDB_MODE": "disabled"}
    ).stdout
    return [float(m) for m in re.findall(r"^iter \d+: loss [\d.]+, time ([\d.]+)ms", out, re.M)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--nanogpt", required=True, help="a nanoGPT checkout with data/shakespeare_char prepared")
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not os.path.isfile(os.path.join(args.nanogpt, "data", "shakespeare_char", "train.bin")):
        sys.exit(f"error: {args.nanogpt}/data/shakespeare_char/train.bin is missing; run its prepare.py first")
    tmp = tempfile.mkdtemp()
    print(f"{'round':>5} | {'ex1 ms/iter':>11} | {'nanoGPT ms/iter':>15}")
    ex1_all, nano_all = [], []
    for r in range(args.rounds):
        a = ex1_ms(args.iters, os.path.join(tmp, "ex1"))[5:]  # skip warm-up iterations
        b = nanogpt_ms(args.iters, args.nanogpt, os.path.join(tmp, "nano"))[5:]
        ex1_all += a
        nano_all += b
        print(f"{r + 1:>5} | {statistics.median(a):11.1f} | {statistics.median(b):15.1f}", flush=True)
    print(f"{'all':>5} | {statistics.median(ex1_all):11.1f} | {statistics.median(nano_all):15.1f}")


if __name__ == "__main__":
    main()
