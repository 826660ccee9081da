"""
bench_ex5.py: ex5_chain_of_thought.py's two measurements, each configuration a run of the script as a user would start
it, with the same wall-clock training budget as the others it is compared with.

  1. Chain of thought where it matters: multiplication of 3x3 and 4x4 digits, --format direct, reversed and cot,
     exact match on 10,000 held-out problems.
  2. Length generalisation: addition trained on 1-8 digit operands, scored at every length 1-24 (1,000 held-out
     problems each): --pos abacus and learned, --format reversed and cot.

The budget counts training steps only: a short calibration run (30 iterations) measures each configuration's median
ms/iter, and the real run gets the --max_iters that fill the budget (evaluations are outside it). Runs go two at a
time, one thread each (--jobs, --threads), into out/bench_ex5/<name>; the script's own report gives the figures.

Run:    python benchmarks/bench_ex5.py                  (about 90 minutes on 2 CPU cores)
        python benchmarks/bench_ex5.py --collect        (the tables again, from the runs' saved output)
        python benchmarks/bench_ex5.py --only mul       (the first measurement alone: about 45 minutes)
Check:  python benchmarks/bench_ex5.py --quick          (2 s budgets, tiny scoring: checks the plumbing)
It prints markdown tables for RESULTS.md and draws benchmarks/pictures/ex5_length.png.
"""

import argparse
import json
import os
import re
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor

from common import PICTURES, ROOT, machine, run, table

SCRIPT = os.path.join(ROOT, "ex5_chain_of_thought.py")
MUL = [  # name, flags, budget in seconds
    (f"mul{n}-{fmt}", ["--task", "mul", "--train_digits", str(n), "--test_digits", str(n), "--format", fmt], budget)
    for n, budget in ((3, 300), (4, 1200))
    for fmt in ("direct", "reversed", "cot")
]
MUL_MODEL = ["--n_layer", "4", "--n_embd", "128", "--batch_size", "128", "--test_problems", "10000"]
LENGTH = [
    (
        f"add-{pos}-{fmt}",
        ["--task", "add", "--train_digits", "1-8", "--test_digits", "1-24", "--pos", pos, "--format", fmt],
        1200,
    )
    for pos, fmt in (("abacus", "reversed"), ("abacus", "cot"), ("learned", "reversed"), ("learned", "cot"))
]
LENGTH_MODEL = ["--n_layer", "4", "--n_embd", "64", "--batch_size", "128", "--test_problems", "1000"]


def start(name, flags, out, threads, extra=()):
    cmd = [sys.executable, SCRIPT, "--out_dir", os.path.join(out, name), "--overwrite", *flags, *extra]
    text, seconds, _ = run(cmd, threads=threads, log_path=os.path.join(out, name + ".txt"))
    return text, seconds


def ms_per_iter(text):
    return float(re.search(r"median ([\d.]+) ms/iter", text)[1])


def scores(text):
    """{digits: (exact match %, problems, where wrong)} from the script's report."""
    found = re.findall(r"digits +(\d+): +([\d.]+)% of ([\d,]+)(?: \| first wrong: (.*))?", text)
    return {int(n): (float(acc), int(count.replace(",", "")), where) for n, acc, count, where in found}


def measure(configs, model, args, out):
    """Calibrate, then run every configuration for its budget."""
    calib = ["--max_iters", "30", "--eval_interval", "1000", "--test_problems", "10", "--eval_problems", "10"]
    with ThreadPoolExecutor(args.jobs) as pool:
        timed = pool.map(lambda c: start(c[0] + "-calib", c[1] + model, out, args.threads, calib), configs)
        plans = []
        for (name, flags, budget), (text, _) in zip(configs, timed):
            iters = max(10, int((2 if args.quick else budget) * 1000 / ms_per_iter(text)))
            extra = ["--max_iters", str(iters), "--eval_interval", str(max(10, iters // 5))]
            extra += ["--test_problems", "20", "--eval_problems", "5"] if args.quick else []
            plans.append((name, flags + model + extra))
        list(pool.map(lambda p: start(p[0], p[1], out, args.threads), plans))


def collect(configs, out, quick):
    """{name: result} read back from each run's output and its calibration's."""
    results = {}
    for name, flags, budget in configs:
        with open(os.path.join(out, name + ".txt")) as f:
            text = f.read()
        with open(os.path.join(out, name + "-calib.txt")) as f:
            calib_ms = ms_per_iter(f.read())
        iters, seconds = re.search(r"done: (\d+) iterations in ([\d.]+) s", text).groups()
        results[name] = dict(
            flags=flags, budget=2 if quick else budget, iters=int(iters), calib_ms=calib_ms, ms=ms_per_iter(text),
            seconds=float(seconds), scores=scores(text),
        )  # fmt: skip
    return results


def mul_table(results):
    rows = []
    for name, r in results.items():
        (acc, count, where), = r["scores"].values()  # fmt: skip
        budget = f"{r['budget'] / 60:.0f} min = {r['iters']} x {r['calib_ms']:.0f} ms"
        rows.append([f"`{name}`", budget, f"{r['seconds']:.0f} s", f"{acc:.2f}% of {count:,}", where or "-"])
    table(["run", "budget = iterations x calibrated ms", "training took", "exact match", "first wrong step"], rows)


def length_table(results):
    lengths = sorted(next(iter(results.values()))["scores"])
    shown = [n for n in lengths if n in (1, 2, 4, 8, 9, 10, 11, 12, 16, 20, 24)]
    rows = [
        [f"`{name}`", f"{r['iters']} x {r['calib_ms']:.0f} ms"] + [f"{r['scores'][n][0]:.1f}" for n in shown]
        for name, r in results.items()
    ]
    table(["run", "iterations x calibrated ms"] + [f"{n} digits" for n in shown], rows)
    for name, r in results.items():
        holds = [n for n in lengths if all(r["scores"][m][0] >= 99 for m in lengths if 2 <= m <= n)]
        print(f"{name}: at least 99% from 2 up to {max(holds, default=1)} digits (1 digit: 10 problems)")


def picture(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, r in results.items():
        lengths = sorted(r["scores"])
        ax.plot(lengths, [r["scores"][n][0] for n in lengths], marker="o", ms=3, label=name.removeprefix("add-"))
    ax.axvspan(0.5, 8.5, color="0.92", label="trained lengths")
    ax.set_xlabel("digits in each operand")
    ax.set_ylabel("exact match on held-out problems (%)")
    ax.set_title("Addition trained on 1-8 digit operands: accuracy by length")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["mul", "length"], help="one measurement alone")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each run")
    parser.add_argument("--quick", action="store_true", help="2 s budgets and tiny scoring: checks the plumbing")
    parser.add_argument("--collect", action="store_true", help="no runs: the tables from the runs' saved output")
    args = parser.parse_args()
    out = os.path.join(ROOT, "out", "bench_ex5" + ("_quick" if args.quick else ""))
    os.makedirs(out, exist_ok=True)
    print(f"machine: {machine(args.threads)}; {args.jobs} runs at once")
    results = {}
    for part, configs, model in (("mul", MUL, MUL_MODEL), ("length", LENGTH, LENGTH_MODEL)):
        if args.only in (None, part):
            if not args.collect:
                measure(configs, model, args, out)
            results[part] = collect(configs, out, args.quick)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    if "mul" in results:
        mul_table(results["mul"])
    if "length" in results:
        length_table(results["length"])
        picture(results["length"], os.path.join(out if args.quick else PICTURES, "ex5_length.png"))
    ms = [r["ms"] / r["calib_ms"] for part in results.values() for r in part.values()]
    print(f"real runs' ms/iter over their calibration's: median {statistics.median(ms):.2f}")


if __name__ == "__main__":
    main()
