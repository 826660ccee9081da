"""
bench_ex3.py: the numbers behind ex3_pretrain_finetune.py, printed as Markdown tables for RESULTS.md.

Three parts; `all` runs them in turn. Every table starts with the machine (CPU, threads, torch version).

  quality  `ex3_pretrain_finetune.py --stage all` at its defaults (ex1's CPU model: 4 layers, 4 heads, 128 wide,
           block 64, batch 12) with the offline stand-in corpus: pretrain 15,000 iterations on the Project Gutenberg
           books (../shared/data/gutenberg/books, about 71M characters, no Shakespeare), encoded once with
           TinyShakespeare's characters into data/ and reused later; then finetune 2,000 iterations on TinyShakespeare
           from the pretrained weights (lr 5e-4), against 2,000 iterations from scratch (ex1's recipe, lr 1e-3). Prints
           the Gutenberg val loss, the Shakespeare val loss before finetuning, after finetuning and from scratch.
           Target: finetuned at least 0.05 below from scratch. The run's own output is shown as it goes
           (out/bench_ex3/quality/<stage>/log.csv).
  ddp      Training tokens per second on the CPU at the same model size, one global batch of 2 x 12 x 64 tokens per
           step: one process with 1 thread, one process with all cores (or OMP_NUM_THREADS if set), and
           `torchrun --nproc_per_node 2` (gloo) with half as many threads each. 150 steps each (--log_interval 1);
           tok/s from the median ms/iter in log.csv after the first 10 steps. Also the largest loss difference between
           the one- and the two-process runs (the same batches).
  gpu      Only with CUDA: a GPT-2-small-sized model (12 layers, 12 heads, 768 wide, block 1024, batch 16, GPT-2 BPE:
           124M parameters) pretraining on the Gutenberg books with --compile and bfloat16: tokens/s and MFU (median
           over steps 20-60, after compilation), on one GPU and, with more than one, on all of them with torchrun.

Run on a quiet machine. On 2 CPU cores:
  python benchmarks/bench_ex3.py all         about 22 minutes (estimated from ex1's 44 ms/iter at this size on 2 cores):
                                             encoding the books ~10 s (once), quality ~19 min, ddp ~1.5 min
  python benchmarks/bench_ex3.py quality     (--books PATH --shakespeare PATH; flags after -- go to ex3,
                                             e.g. -- --max_iters 20000)
  python benchmarks/bench_ex3.py ddp
  python benchmarks/bench_ex3.py gpu         (skipped without CUDA)
  python benchmarks/bench_ex3.py all --quick a check of the script itself: tiny sizes, 2M characters of the books,
                                             ~1 minute
"""

import argparse
import os
import re
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, "..", "shared", "data")
SCRIPT = os.path.join(ROOT, "ex3_pretrain_finetune.py")
OUT = os.path.join(ROOT, "out", "bench_ex3")

import torch  # noqa: E402

from common import machine, read_log, run, table  # noqa: E402


def data_flags(a):
    flags = ["--pretrain_data", a.books]
    if a.shakespeare:
        flags += ["--data", a.shakespeare]
    return flags + (["--pretrain_tokens", "2000000"] if a.quick else [])


# ----------------------------------------------------------------------------------------------------------
# Quality: finetuned against from scratch


def quality(a):
    out_dir = os.path.join(OUT, "quality-quick" if a.quick else "quality")
    flags = ["--out_dir", out_dir, "--overwrite", "--log_interval", "100", "--device", "cpu"] + data_flags(a)
    if a.quick:
        flags += [
            "--n_layer",
            "2",
            "--n_embd",
            "64",
            "--max_iters",
            "300",
            "--finetune_iters",
            "100",
            "--eval_interval",
            "100",
            "--eval_iters",
            "20",
            "--max_new_tokens",
            "100",
        ]
    text, wall, _ = run([sys.executable, SCRIPT, "--stage", "all", *flags, *a.extra], a.threads, show=True)
    times = dict(re.findall(r"=== stage (\w+):.*?\ndone: \d+ iterations in ([\d.]+) s", text, re.S))
    evals = {
        s: [r for r in read_log(os.path.join(out_dir, s)) if r["val_loss"]] for s in ("pretrain", "finetune", "scratch")
    }
    best = {s: min(float(r["val_loss"]) for r in rows) for s, rows in evals.items()}
    iters = {s: int(rows[-1]["iter"]) for s, rows in evals.items()}
    before = float(evals["finetune"][0]["val_loss"])  # iteration 0 of finetuning: the pretrained model on Shakespeare
    corpus = re.search(r"pretraining corpus: ([\d,]+) tokens", text).group(1)
    dropped = re.search(r"([\d,]+) characters outside the vocabulary \(([\d.]+)%\)", text)
    print(
        "\n### ex3_pretrain_finetune.py: pretraining on the Gutenberg books, finetuning on "
        f"TinyShakespeare{' (--quick)' if a.quick else ''}\n"
    )
    print(
        f"Machine: {machine(a.threads)}. Command: python benchmarks/bench_ex3.py "
        f"quality{' --quick' if a.quick else ''}; wall time {wall / 60:.1f} min."
    )
    print(
        f"Pretraining corpus: {corpus} tokens"
        + (
            f" ({dropped.group(1)} characters, {dropped.group(2)}%, outside the Shakespeare vocabulary dropped)"
            if dropped
            else ""
        )
        + ".\n"
    )
    table(
        ["run", "iterations", "val loss (best)", "training time"],
        [
            [
                "pretrain on the Gutenberg books (val: held-out books)",
                iters["pretrain"],
                f"{best['pretrain']:.4f}",
                f"{float(times.get('pretrain', 'nan')):.0f} s",
            ],
            ["pretrained model on TinyShakespeare, before finetuning", 0, f"{before:.4f}", "-"],
            [
                "finetuned from the pretrained weights",
                iters["finetune"],
                f"**{best['finetune']:.4f}**",
                f"{float(times.get('finetune', 'nan')):.0f} s",
            ],
            [
                "from scratch, same iterations",
                iters["scratch"],
                f"**{best['scratch']:.4f}**",
                f"{float(times.get('scratch', 'nan')):.0f} s",
            ],
        ],
    )
    gain = best["scratch"] - best["finetune"]
    print(
        f"Pretraining lowers the finetuned val loss by {gain:.4f} (target: at least 0.05: "
        f"{'met' if gain >= 0.05 else 'NOT met'}).\n",
        flush=True,
    )


# ----------------------------------------------------------------------------------------------------------
# DDP on the CPU: tokens per second with one and two processes


def ddp(a):
    cores = int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 2)  # the cores this benchmark may use
    steps = 30 if a.quick else 150
    flags = ["--stage", "pretrain", "--max_iters", str(steps), "--eval_interval", str(steps), "--eval_iters", "1",
             "--log_interval", "1", "--gradient_accumulation_steps", "2", "--max_new_tokens", "1",
             "--device", "cpu"] + data_flags(a)  # fmt: skip
    if a.quick:
        flags += ["--n_layer", "2", "--n_embd", "64"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    threads = lambda n: f"{n} thread{'s' if n > 1 else ''}"  # noqa: E731
    half = max(cores // 2, 1)
    runs = [("1 process, 1 thread", [sys.executable], 1), (f"1 process, {threads(cores)}", [sys.executable], cores)]
    runs.append((f"2 processes (torchrun, gloo), {threads(half)} each", torchrun, half))
    rows, curves = [], []
    for i, (name, launcher, threads) in enumerate(runs):
        out_dir = os.path.join(OUT, f"ddp{'-quick' if a.quick else ''}-{i}")
        run(launcher + [SCRIPT, "--out_dir", out_dir, "--overwrite", *flags], threads)
        log = [r for r in read_log(os.path.join(out_dir, "pretrain")) if r["ms_per_iter"]]
        ms = statistics.median(float(r["ms_per_iter"]) for r in log[10:])
        rows.append([name, f"{ms:.1f}", f"{2 * 12 * 64 / ms:.1f}k"])
        curves.append([float(r["train_loss"]) for r in log])
    diff = max(abs(x - y) for x, y in zip(curves[1], curves[2]))
    print(f"\n### ex3_pretrain_finetune.py: DDP on the CPU{' (--quick)' if a.quick else ''}\n")
    quick = " --quick" if a.quick else ""
    model = "Tiny model, " if a.quick else "ex1 CPU model, "
    print(
        f"Machine: {machine(cores)}. Command: python benchmarks/bench_ex3.py ddp{quick}. {model}"
        f"global batch 2 x 12 x 64 = 1,536 tokens per step, {steps} steps, median after the first 10.\n"
    )
    table(["launch", "ms/iter", "tokens/s"], rows)
    print(
        f"Largest training-loss difference per step, 1 process against 2: {diff:.2e} (the same batches, so float "
        "rounding only).\n",
        flush=True,
    )


# ----------------------------------------------------------------------------------------------------------
# GPU: GPT-2-small with --compile and bfloat16


def gpu(a):
    if not torch.cuda.is_available():
        print("\n### gpu: skipped, no CUDA device\n", flush=True)
        return
    steps = 30 if a.quick else 60
    flags = ["--stage", "pretrain", "--tokenizer", "gpt2", "--n_layer", "12", "--n_head", "12", "--n_embd", "768",
             "--block_size", "1024", "--batch_size", "16", "--compile", "--dtype", "bfloat16",
             "--max_iters", str(steps), "--eval_interval", str(steps), "--eval_iters", "1", "--log_interval", "1",
             "--max_new_tokens", "1"] + data_flags(a)  # fmt: skip
    n = torch.cuda.device_count()
    launches = [("1 GPU", [sys.executable], 1)]
    if n > 1:
        launches.append(
            (
                f"{n} GPUs (torchrun, nccl)",
                [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n)],
                n,
            )
        )
    rows = []
    for name, launcher, procs in launches:
        out_dir = os.path.join(OUT, f"gpu-{procs}")
        text, _, _ = run(
            launcher
            + [SCRIPT, "--out_dir", out_dir, "--overwrite", "--gradient_accumulation_steps", str(procs), *flags]
        )
        steps_seen = [
            (int(i), float(t), float(m))
            for i, t, m in re.findall(
                r"iter (\d+) \| loss [\d.]+ \| [\d.]+ ms \| ([\d.]+)k tok/s \| mfu ([\d.]+)%", text
            )
        ]
        later = [s for s in steps_seen if s[0] >= min(20, steps // 2)]
        rows.append(
            [name, f"{statistics.median(s[1] for s in later):,.0f}k", f"{statistics.median(s[2] for s in later):.1f}%"]
        )
    print(f"\n### ex3_pretrain_finetune.py: GPT-2-small size on the GPU{' (--quick)' if a.quick else ''}\n")
    print(
        f"Machine: {machine()}. 124M parameters, block 1024, batch 16 per GPU, --compile, bfloat16; median over steps "
        f"{min(20, steps // 2)}-{steps}.\n"
    )
    table(["launch", "tokens/s", "MFU (per GPU, of 989 TFLOP/s bf16 on H100/H200)"], rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("part", choices=["all", "quality", "ddp", "gpu"])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the script, not the numbers")
    parser.add_argument(
        "--books",
        default=os.path.join(SHARED, "gutenberg", "books"),
        help="the pretraining corpus (folder of .txt files)",
    )
    default_shakespeare = os.path.join(SHARED, "tinyshakespeare.txt")
    parser.add_argument(
        "--shakespeare",
        default=default_shakespeare if os.path.isfile(default_shakespeare) else "",
        help="TinyShakespeare; empty: ex3 downloads it",
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="OMP_NUM_THREADS for the quality run (default: all cores)"
    )
    a, extra = parser.parse_known_args()
    a.extra = [x for x in extra if x != "--"]
    if not os.path.isdir(a.books):
        sys.exit(f"no folder {a.books}; pass --books PATH to a folder of .txt files")
    for part in ("quality", "ddp", "gpu") if a.part == "all" else (a.part,):
        globals()[part](a)


if __name__ == "__main__":
    main()
