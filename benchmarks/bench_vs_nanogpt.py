"""
Time per iteration of ex1_gpt.py against nanoGPT's train.py at nanoGPT's CPU settings, interleaved; the share of the
CPU's float32 matmul peak that each reaches; the same under load.

    git clone https://github.com/karpathy/nanoGPT /tmp/nanoGPT
    python /tmp/nanoGPT/data/shakespeare_char/prepare.py
    python benchmarks/bench_vs_nanogpt.py --nanogpt /tmp/nanoGPT --iters 300 --rounds 8
    python benchmarks/bench_vs_nanogpt.py --nanogpt /tmp/nanoGPT --busy 1 --threads 2 1     one core kept busy

Both run the same model (4 layers, 4 heads, 128 wide, block 64, batch 12, float32, no compile) in turns, so a busy
machine slows both alike. Each cell is the median ms per iteration of one run, evaluations and the first 5
iterations excluded; the ratio ex1/nanoGPT is taken within each round, and its median and range over the rounds
are the comparison. --threads runs every round once per thread count (ex1's --threads, OMP_NUM_THREADS for
nanoGPT); --busy K keeps K other processes spinning on the cores the whole time (another user's job). The peak is
the median rate of a 1024 x 1024 float32 matmul at the same thread count, measured before the rounds (under the
same load); an iteration does 6 N + 12 L H Q T floating-point operations per token (nanoGPT's estimate_mfu).
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from common import machine, table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = (
    "--n_layer=4 --n_head=4 --n_embd=128 --block_size=64 --batch_size=12 --dropout=0.0 --learning_rate=1e-3".split()
)
PARAMS = 4 * 12 * 128 * 128 + 65 * 128  # N without position embeddings (nanoGPT's count): blocks and the tied wte
FLOPS_PER_ITER = (6 * PARAMS + 12 * 4 * 4 * 32 * 64) * 64 * 12  # per token, times block_size x batch_size tokens


def ex1_ms(iters, nanogpt, out_dir, threads):
    text = os.path.join(nanogpt, "data", "shakespeare_char", "input.txt")  # the text nanoGPT's prepare.py read
    cmd = [sys.executable, os.path.join(ROOT, "ex1_gpt.py"), *SHARED, f"--data={text}", f"--max_iters={iters}",
           "--eval_interval=100000", "--eval_iters=1", "--log_interval=1", "--max_new_tokens=0", "--device=cpu",
           f"--out_dir={out_dir}", "--overwrite", f"--threads={threads}"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return [float(m) for m in re.findall(r"^iter \d+ \| loss [\d.]+ \| ([\d.]+) ms", out, re.M)]


def nanogpt_ms(iters, path, out_dir, threads):
    cmd = [sys.executable, "train.py", "config/train_shakespeare_char.py", *SHARED, f"--max_iters={iters}",
           f"--lr_decay_iters={iters}", "--eval_interval=100000", "--eval_iters=1", "--log_interval=1", "--device=cpu",
           "--compile=False", f"--out_dir={out_dir}"]  # fmt: skip
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": str(threads or os.cpu_count())}
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=path, env=env).stdout
    return [float(m) for m in re.findall(r"^iter \d+: loss [\d.]+, time ([\d.]+)ms", out, re.M)]


def matmul_gflops(threads, n=1024, reps=30):
    """The CPU's float32 matmul rate at this thread count: the median of reps products of two n x n matrices."""
    torch.set_num_threads(threads or os.cpu_count())
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times) / 1e9


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--nanogpt", required=True, help="a nanoGPT checkout with data/shakespeare_char prepared")
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--threads", type=int, nargs="+", default=[0], help="torch threads per run; 0: one per core")
    parser.add_argument("--busy", type=int, default=0, help="other processes kept spinning during the measurement")
    args = parser.parse_args()
    if not os.path.isfile(os.path.join(args.nanogpt, "data", "shakespeare_char", "train.bin")):
        sys.exit(f"error: {args.nanogpt}/data/shakespeare_char/train.bin is missing; run its prepare.py first")
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    try:
        tmp = tempfile.mkdtemp()
        print(f"{machine()}; {args.busy} other busy processes; {args.iters} iterations a run\n")
        summary = []
        for threads in args.threads:
            peak = matmul_gflops(threads)
            rows, ex1_all, nano_all, ratios = [], [], [], []
            for r in range(args.rounds):
                a = statistics.median(ex1_ms(args.iters, args.nanogpt, os.path.join(tmp, "ex1"), threads)[5:])
                b = statistics.median(nanogpt_ms(args.iters, args.nanogpt, os.path.join(tmp, "nano"), threads)[5:])
                ex1_all.append(a)
                nano_all.append(b)
                ratios.append(a / b)
                rows.append((r + 1, f"{a:.1f}", f"{b:.1f}", f"{a / b:.3f}"))
                print(f"threads {threads or os.cpu_count()}, round {r + 1}: {a:.1f} / {b:.1f} ms", flush=True)
            print(f"\nthreads: {threads or os.cpu_count()}")
            table(("round", "ex1 ms/iter", "nanoGPT ms/iter", "ex1 / nanoGPT"), rows)
            share = [FLOPS_PER_ITER / (statistics.median(x) / 1e3) / 1e9 / peak for x in (ex1_all, nano_all)]
            summary.append((
                threads or os.cpu_count(), args.busy, f"{statistics.median(ex1_all):.1f}",
                f"{statistics.median(nano_all):.1f}",
                f"{statistics.median(ratios):.3f} ({min(ratios):.3f} to {max(ratios):.3f})", f"{peak:.0f}",
                f"{100 * share[0]:.0f}% / {100 * share[1]:.0f}%",
            ))  # fmt: skip
        print(f"summary over {args.rounds} rounds ({FLOPS_PER_ITER / 1e9:.2f} GFLOP per iteration)")
        table(("threads", "busy", "ex1 ms/iter", "nanoGPT ms/iter", "ratio: median (range)", "matmul peak GFLOP/s",
               "share of peak: ex1 / nanoGPT"), summary)  # fmt: skip
    finally:
        for p in spinners:
            p.kill()


if __name__ == "__main__":
    main()
