"""
Train one of the scripts with several seeds and print a table: wall time, median ms per iteration, val loss.

    python benchmarks/bench_train.py ex1_gpt.py --seeds 1337 1338 1339
    python benchmarks/bench_train.py ex2_addition.py --seeds 1337 1338
    python benchmarks/bench_train.py ex1_gpt.py --seeds 1337 -- --n_layer 6 --n_embd 384
        (flags after -- go to the script)

Each run is a fresh process with --out_dir out/bench/<script>-<seed>; its log.csv gives the numbers, and
any line the script prints about exact match (ex2) is shown too. Wall time includes start-up and evaluations.
"""

import argparse
import os
import statistics
import sys

from common import ROOT, read_log, run


def run_seed(script, seed, extra):
    out_dir = os.path.join(ROOT, "out", "bench", f"{os.path.splitext(script)[0]}-{seed}")
    text, wall, _ = run(
        [sys.executable, os.path.join(ROOT, script), "--seed", str(seed), "--out_dir", out_dir, "--overwrite", *extra]
    )
    rows = read_log(out_dir)
    evals = [r for r in rows if r["val_loss"]]
    ms = [float(r["ms_per_iter"]) for r in rows if r["ms_per_iter"]]
    notes = [line.strip() for line in text.splitlines() if "exact match" in line]
    return {
        "seed": seed, "wall_s": wall, "ms_iter": statistics.median(ms) if ms else float("nan"),
        "final_val": float(evals[-1]["val_loss"]), "best_val": min(float(r["val_loss"]) for r in evals), "notes": notes,
    }  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("script")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1337])
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    print(
        f"{args.script} {' '.join(extra)}  (torch threads: {os.environ.get('OMP_NUM_THREADS', 'default')}, "
        f"{os.cpu_count()} cores)"
    )
    print(f"{'seed':>6} | {'wall s':>7} | {'ms/iter':>7} | {'final val':>9} | {'best val':>8}")
    results = []
    for seed in args.seeds:
        r = run_seed(args.script, seed, extra)
        results.append(r)
        print(
            f"{r['seed']:>6} | {r['wall_s']:7.1f} | {r['ms_iter']:7.1f} | {r['final_val']:9.4f} | {r['best_val']:8.4f}",
            flush=True,
        )
        for note in r["notes"]:
            print(f"       {note}")
    if len(results) > 1:
        vals = [r["final_val"] for r in results]
        print(
            f"{'mean':>6} | {statistics.mean(r['wall_s'] for r in results):7.1f} | "
            f"{statistics.mean(r['ms_iter'] for r in results):7.1f} | {statistics.mean(vals):9.4f} | spread "
            f"{max(vals) - min(vals):.4f}"
        )


if __name__ == "__main__":
    main()
