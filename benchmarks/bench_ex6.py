"""
bench_ex6.py: the speedrun behind ex6_modern_gpt.py: seconds of training to val loss 1.90 on TinyShakespeare, ex6's
recipe against ex1 and ex4 at their defaults, then the recipe with each of its pieces taken out alone.

The work is fixed: TinyShakespeare (--data), ex1's split, val loss as ex1 estimates it (200 batches, --eval_iters),
target 1.90 (--target). Everything else about ex6 is free: its defaults, or --ex6_flags "..." to tune them. Every run
is the script as a user starts it, in its own process (bench_gpu's launch()), in --out_dir/NAME_seedS (default
out/bench_ex6; its stdout.txt, log.csv and status.json; checkpoints deleted), on the CPU, one run at a time, with
--threads 2 (and OMP_NUM_THREADS), --log_interval 1 and an evaluation every --eval_interval iterations for ex6 (200
iterations long), every --ex4_eval_interval for ex4 (700) and every --ex1_eval_interval for ex1 (2000). The runs go
round-robin over the configurations, seed by seed, the order reversed every other seed, so that a change of load hits
all of them alike.

Time comes from each run's own log.csv, as bench_ex4's train part counts it: the sum of the per-iteration times
(ms_per_iter; evaluations and checkpoints excluded) up to the first evaluation with val <= 1.90, so it is rounded up
to an evaluation. ex1 and ex4 are stopped there (SIGTERM: the script saves and exits). ex6's runs train on to their
last iteration: its val loss is the record table's fixed budget (ex6's 200 iterations, the end of its schedule), and
the table also gives the val loss at a fixed time, the full recipe's median time to 1.90 (--budget_s). Every run is
stopped at --cap_s seconds of wall time at most.

It prints Markdown tables for RESULTS.md, each with the machine line: ex1, ex4 and ex6 side by side (time to 1.90
for each seed and the median; target: ex6 in at most half of ex4's time), and the record table (the full recipe,
then each piece out: time to 1.90 and val loss at the fixed budgets, median and spread over the seeds). It draws val
loss against training seconds, ex1, ex4 and ex6 together, into benchmarks/pictures/ex6_speedrun.png (matplotlib).

  python benchmarks/bench_ex6.py --data ../shared/data/tinyshakespeare.txt      12 configurations x 3 seeds: about
        80 minutes on 2 idle cores, most of it evaluations (ex1 about 3 minutes a run, ex4 3, ex6 2)
  python benchmarks/bench_ex6.py --configs ex1,ex4,ex6                           the headline alone: about 25 min
  python benchmarks/bench_ex6.py --ex6_flags "--learning_rate 2e-2 --max_iters 150"   ex6 tuned (every ex6 run)
  python benchmarks/bench_ex6.py --collect                  no runs: the tables and picture from the runs' output
  python benchmarks/bench_ex6.py --quick                    tiny models, 2 seeds, 8 runs on 1 thread, about 30 s:
                                                            a check of this script, the numbers mean nothing
"""

import argparse
import datetime
import json
import math
import os
import shlex
import statistics
import sys
import time
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench_ex4 import load, pyplot, read_run, save  # noqa: E402
from bench_gpu import EVAL, launch  # noqa: E402

from common import PICTURES, machine, table  # noqa: E402

SHARED_DATA = os.path.join(ROOT, "..", "shared", "data", "tinyshakespeare.txt")
# each piece of ex6's recipe taken out alone: the flag that gives ex4's choice back (all of them together: ex4)
PIECES = {
    "norm": ["--norm", "layernorm"],
    "qk_norm": ["--no-qk_norm"],
    "mlp": ["--mlp", "swiglu"],
    "zero_init": ["--no-zero_init"],
    "untied_head": ["--no-untied_head"],
    "softcap": ["--softcap", "0"],
    "residual_scale": ["--no-residual_scale"],
    "optimizer": ["--optimizer", "adamw"],
    "schedule": ["--schedule", "cosine"],
}
# name -> (script, flags): ex1 and ex4 at their defaults, ex6's whole recipe, then each piece out
CONFIGS = {"ex1": ("ex1_gpt.py", []), "ex4": ("ex4_mqa_swiglu.py", []), "ex6": ("ex6_modern_gpt.py", [])}
CONFIGS.update({f"ex6-{piece}": ("ex6_modern_gpt.py", flags) for piece, flags in PIECES.items()})
STOPPED_AT_TARGET = ("ex1", "ex4")  # the references; ex6's runs go on to their last iteration (the fixed budget)
# --quick: tiny models that move within 30 iterations (a short warmup), in every script
QUICK = "--n_layer 1 --n_head 2 --n_embd 32 --block_size 16 --batch_size 4 --max_iters 30 --warmup_iters 2".split()
# the benchmark's defaults, then --quick's
DEFAULTS = dict(seeds="1337,1338,1339", configs=",".join(CONFIGS), eval_interval=10, ex4_eval_interval=25,
                ex1_eval_interval=100, eval_iters=200, target=1.90, threads=2, cap_s=1200)  # fmt: skip
QUICK_DEFAULTS = dict(seeds="1,2", configs="ex1,ex4,ex6,ex6-optimizer", eval_interval=5, ex4_eval_interval=5,
                      ex1_eval_interval=5, eval_iters=2, target=3.8, threads=1, cap_s=60)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# Running: one configuration at one seed, in the interleaved order


def order(names, seeds):
    """(name, seed) in the order they run: every configuration for a seed, then the next seed; every other seed in
    reverse, so that a drift in the machine's load does not always hit the same configurations first."""
    return [(n, s) for i, s in enumerate(seeds) for n in (names if i % 2 == 0 else names[::-1])]


def run_dir(a, name, seed):
    return os.path.join(a.out_dir, f"{name}_seed{seed}")


def fixed_flags(a, seed):
    """What every run has: the data, the evaluation, the log, the seed, the CPU and its threads, no sample."""
    fixed = ["--eval_iters", str(a.eval_iters), "--log_interval", "1", "--seed", str(seed), "--device", "cpu"]
    fixed += ["--threads", str(a.threads), "--max_new_tokens", "0"]
    return fixed + (["--data", a.data] if a.data else [])


def run_flags(a, name, seed):
    """The flags of one run but --out_dir: ex6's tuning (--ex6_flags), the piece taken out, --quick's sizes, then the
    evaluation interval and the flags every run has."""
    script, flags = CONFIGS[name]
    tuned = a.ex6_flags if script == "ex6_modern_gpt.py" else []
    intervals = {"ex1_gpt.py": a.ex1_eval_interval, "ex4_mqa_swiglu.py": a.ex4_eval_interval}
    interval = intervals.get(script, a.eval_interval)
    return [*tuned, *flags, *(QUICK if a.quick else []), "--eval_interval", str(interval), *fixed_flags(a, seed)]


def run_one(a, name, seed):
    """Run one configuration at one seed (stopped at the target if it is a reference, at --cap_s in any case); keep
    its status beside its output and log.csv, delete its checkpoints."""
    script = CONFIGS[name][0]
    out_dir = run_dir(a, name, seed)

    def reached(line):
        m = EVAL.match(line)
        return name in STOPPED_AT_TARGET and m is not None and float(m[3]) <= a.target

    remove(out_dir, "status.json", "log.csv")  # an earlier run's, which a failed start would leave to be read
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(a.threads)}
    run = launch(name, script, run_flags(a, name, seed), out_dir, time.time() + a.cap_s, env, reached)
    with open(os.path.join(out_dir, "status.json"), "w") as f:
        json.dump({"status": run.status, "wall_s": round(run.wall, 1)}, f)
    remove(out_dir, "ckpt.pt", "best.pt")


def remove(folder, *names):
    for name in names:
        if os.path.exists(os.path.join(folder, name)):
            os.remove(os.path.join(folder, name))


def read(a, name, seed):
    """One run from its folder: {status, evals: [(iteration, val, training s, elapsed s)], ms: median ms/iter}, or
    None if it has not run (or left no log)."""
    out_dir = run_dir(a, name, seed)
    try:
        with open(os.path.join(out_dir, "status.json")) as f:
            status = json.load(f)["status"]
        with open(os.path.join(out_dir, "stdout.txt")) as f:
            evals, ms = read_run(out_dir, f.read())
    except (OSError, ValueError, KeyError):
        return None
    return {"status": status, "evals": evals, "ms": ms} if evals else None


# ----------------------------------------------------------------------------------------------------------
# Reading the runs: time to the target, val loss at the budgets


def reach(evals, target):
    """(iteration, training seconds) at the first evaluation with val <= target, or None."""
    return next(((it, s) for it, v, s, _ in evals if v <= target), None)


def seconds(run, target):
    """Training seconds to the target; inf where the run never got there."""
    hit = reach(run["evals"], target)
    return hit[1] if hit else math.inf


def val_at(evals, budget_s):
    """The val loss of the last evaluation at or before budget_s seconds of training, or None."""
    before = [v for _, v, s, _ in evals if s <= budget_s]
    return before[-1] if before else None


def spread(xs, spec, unit=""):
    """'median (min to max)' of xs (one value alone); inf is a run that did not reach the target."""

    def show(x):
        return "not reached" if math.isinf(x) else f"{x:{spec}}{unit}"

    xs = sorted(xs)
    if not xs:
        return "-"
    reached = sum(not math.isinf(x) for x in xs)
    text = show(statistics.median(xs)) + (f" ({show(xs[0])} to {show(xs[-1])})" if len(xs) > 1 else "")
    return text + (f", {reached} of {len(xs)} seeds" if 0 < reached < len(xs) else "")


def ratio(x, y):
    """x / y; nan where either is not reached or y is 0 (a target reached before the first step)."""
    return x / y if math.isfinite(x) and math.isfinite(y) and y > 0 else math.nan


def percent(r):
    return "-" if math.isnan(r) else f"{100 * r:.0f}%"


def statuses(runs):
    return ", ".join(f"{status} {n}" for status, n in Counter(r["status"] for r in runs.values()).items())


def median_seconds(runs, target):
    return statistics.median(seconds(r, target) for r in runs.values()) if runs else math.inf


# ----------------------------------------------------------------------------------------------------------
# Tables and the picture


def headline_row(a, name, runs, ex4_s):
    hits = {seed: reach(r["evals"], a.target) for seed, r in runs.items()}
    each = "; ".join(f"{seed}: " + (f"{h[1]:.1f} s (iter {h[0]})" if h else "not reached") for seed, h in hits.items())
    mine = median_seconds(runs, a.target)
    share = percent(ratio(mine, ex4_s))
    best = statistics.mean(min(e[1] for e in r["evals"]) for r in runs.values())
    ms = statistics.median(r["ms"] for r in runs.values())
    flags = " ".join(a.ex6_flags) if name == "ex6" and a.ex6_flags else "defaults"
    times = spread([seconds(r, a.target) for r in runs.values()], ".1f", " s")
    return [f"{CONFIGS[name][0]} ({flags})", each, times, share, f"{best:.4f}", f"{ms:.1f}", statuses(runs)]


def headline(a, results):
    """ex1, ex4 and ex6 side by side, each seed's time to the target, and the verdict on ex6's target."""
    ex4_s = median_seconds(results.get("ex4", {}), a.target)
    rows = [headline_row(a, n, results[n], ex4_s) for n in ("ex1", "ex4", "ex6") if results.get(n)]
    if not rows:
        return
    print(f"### ex1, ex4 and ex6 side by side\n\nTraining seconds (the sum of log.csv's ms_per_iter: evaluations "
          f"excluded) to the first evaluation with val <= {a.target:.2f}, each seed, and their median (min to max). "
          "ex1 and ex4 stop there; best val: the lowest evaluation of each run, mean over the seeds.\n")  # fmt: skip
    table(["run", f"training s to val <= {a.target:.2f}, each seed", "median (min to max)", "of ex4's median",
           "best val", "ms/iter (median)", "runs"], rows)  # fmt: skip
    print(verdict(a, results) + "\n")


def verdict(a, results):
    """ex6's target: val <= target in at most half of ex4's time (medians over the seeds), and each seed's ratio."""
    ex4, ex6 = results.get("ex4", {}), results.get("ex6", {})
    if not ex4 or not ex6:
        return "Target (ex6 in at most half of ex4's time): not measured, it needs runs of both"
    t4, t6 = median_seconds(ex4, a.target), median_seconds(ex6, a.target)
    said = f"Target: ex6 reaches val {a.target:.2f} in at most half of ex4's time (medians over the seeds): "
    if math.isinf(t6):
        return said + f"NOT met: ex6 did not reach {a.target:.2f} in most seeds"
    if math.isinf(t4):  # ex4 had not got there after all of its training: its time is at least that
        t4 = statistics.median(r["evals"][-1][2] for r in ex4.values())
        ok = t6 <= t4 / 2
        return said + f"{'met' if ok else 'not known'}: ex6 {t6:.1f} s; ex4 had not reached it after {t4:.1f} s"
    pairs = [(s, ratio(seconds(ex6[s], a.target), seconds(ex4[s], a.target))) for s in ex6 if s in ex4]
    each = ", ".join(f"seed {s} {percent(r)}" for s, r in pairs)
    against = f"{t6:.1f} s against {t4:.1f} s, {percent(ratio(t6, t4))} ({each})"
    return said + ("met: " if t6 <= t4 / 2 else "NOT met: ") + against


def time_budget(a, results):
    """The record's fixed time budget, seconds of training, and what it is: --budget_s, else the full recipe's median
    time to the target, else (it never got there) its median training time."""
    full = results.get("ex6", {})
    if a.budget_s or not full:
        return a.budget_s, "--budget_s"
    t = median_seconds(full, a.target)
    if math.isfinite(t):
        return t, "the full recipe's median time to the target"
    return statistics.median(r["evals"][-1][2] for r in full.values()), "the full recipe's median training time"


def record_row(a, name, runs, full_s, budget_s):
    times = [seconds(r, a.target) for r in runs.values()]
    slower = ratio(statistics.median(times), full_s)
    last = spread([r["evals"][-1][1] for r in runs.values()], ".4f")
    iters = "/".join(str(i) for i in sorted({r["evals"][-1][0] for r in runs.values()}))
    at = [v for r in runs.values() if (v := val_at(r["evals"], budget_s)) is not None]
    ms = statistics.median(r["ms"] for r in runs.values())
    flags = " ".join(CONFIGS[name][1]) or "the whole recipe"
    slower = "-" if math.isnan(slower) else f"{slower:.2f}"
    return [flags, spread(times, ".1f", " s"), slower, f"{last} (iter {iters})", spread(at, ".4f"), f"{ms:.1f}",
            statuses(runs)]  # fmt: skip


def record(a, results):
    """The full recipe, then each piece taken out: time to the target, val loss at the last iteration (the fixed
    iteration budget) and at a fixed number of training seconds (the fixed time budget)."""
    names = [n for n in CONFIGS if n.startswith("ex6") and results.get(n)]
    if not names:
        return
    budget_s, what = time_budget(a, results)
    full_s = median_seconds(results.get("ex6", {}), a.target)
    rows = [record_row(a, name, results[name], full_s, budget_s) for name in names]
    print(f"### The record: ex6's recipe, each piece taken out alone\n\nTime: training seconds (evaluations excluded) "
          f"to the first evaluation with val <= {a.target:.2f}; seeds {', '.join(map(str, a.seeds))}: median (min to "
          f"max). Fixed budgets: each run's last iteration (the end of its schedule) and {budget_s:.1f} s of training "
          f"({what}).\n")  # fmt: skip
    table(["run", f"time to val <= {a.target:.2f}", "x the whole recipe's", "val at the last iteration",
           f"val at {budget_s:.1f} s", "ms/iter", "runs"], rows)  # fmt: skip


def plot(a, results):
    """Val loss against training seconds: ex1, ex4 and ex6 (every seed); beside it ex6's runs, first seed."""
    plt = pyplot()
    if plt is None or not any(results.values()):
        return
    fig, axes = plt.subplots(1, 2, figsize=(14, 5), sharey=True)
    for name, color in (("ex1", "tab:blue"), ("ex4", "tab:orange"), ("ex6", "tab:green")):
        for i, r in enumerate(results.get(name, {}).values()):
            xs, ys = [e[2] for e in r["evals"]], [e[1] for e in r["evals"]]
            axes[0].plot(xs, ys, color=color, marker=".", linewidth=1.2, label=None if i else name)
    for name in (n for n in CONFIGS if n.startswith("ex6") and results.get(n)):
        r = next(iter(results[name].values()))
        xs, ys = [e[2] for e in r["evals"]], [e[1] for e in r["evals"]]
        if name == "ex6":
            axes[1].plot(xs, ys, color="black", linewidth=2.5, label="the whole recipe")
        else:
            axes[1].plot(xs, ys, linewidth=1, label=" ".join(CONFIGS[name][1]))
    vals = [e[1] for runs in results.values() for r in runs.values() for e in r["evals"]]
    for ax, title in zip(axes, ("ex1, ex4 and ex6 at their defaults, every seed", "ex6, each piece taken out")):
        ax.axhline(a.target, color="gray", linestyle="--", linewidth=0.8)
        ax.set_ylim(min(vals) - 0.03, min(max(vals), min(vals) + 0.8))  # the end of the descent
        ax.set(xlabel="training seconds (evaluations excluded)", ylabel="val loss", title=title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save(fig, a.png)


# ----------------------------------------------------------------------------------------------------------


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(), allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    default_data = SHARED_DATA if os.path.isfile(SHARED_DATA) else ""
    p.add_argument("--data", default=default_data, help="TinyShakespeare (empty: the scripts' own download)")
    p.add_argument("--seeds", help=f"comma-separated; default {DEFAULTS['seeds']}")
    p.add_argument("--configs", help=f"comma-separated, from {', '.join(CONFIGS)}; default all")
    p.add_argument(
        "--ex6_flags", default="", help='flags for every ex6 run, before the piece taken out ("--max_iters 500")'
    )
    p.add_argument("--target", type=float, help="the val loss to reach; default 1.90")
    p.add_argument("--eval_interval", type=int, help="ex6's evaluation interval; default 10")
    p.add_argument("--ex4_eval_interval", type=int, help="ex4's evaluation interval; default 25")
    p.add_argument("--ex1_eval_interval", type=int, help="ex1's evaluation interval; default 100")
    p.add_argument("--eval_iters", type=int, help="batches per evaluation and split; default 200 (ex1's)")
    p.add_argument("--threads", type=int, help="torch threads of each run; default 2")
    p.add_argument("--cap_s", type=float, help="stop a run after this many seconds of wall time; default 1200")
    p.add_argument("--budget_s", type=float, default=0, help="record: val loss at this many training seconds; "
                   "0: the full recipe's median time to the target")  # fmt: skip
    p.add_argument("--out_dir", default=os.path.join(ROOT, "out", "bench_ex6"), help="the runs' folders go here")
    p.add_argument("--png", default=os.path.join(PICTURES, "ex6_speedrun.png"), help="the picture")
    p.add_argument("--collect", action="store_true", help="no runs: the tables and picture from the runs' output")
    p.add_argument("--quick", action="store_true", help="tiny models, 2 seeds, 4 configurations: a check of this")
    a = p.parse_args(argv)
    for k, v in (QUICK_DEFAULTS if a.quick else DEFAULTS).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.quick:
        a.out_dir = os.path.join(a.out_dir, "quick")
        a.png = os.path.join(a.out_dir, "ex6_speedrun.png")
    a.seeds = [int(s) for s in a.seeds.split(",")]
    a.configs = [c for c in a.configs.split(",") if c]
    bad = [c for c in a.configs if c not in CONFIGS]
    if bad:
        p.error(f"unknown configuration(s) {bad}; choose from {', '.join(CONFIGS)}")
    a.ex6_flags = shlex.split(a.ex6_flags)
    a.data = os.path.abspath(a.data) if a.data else ""  # the runs start in the repository
    a.command = "python benchmarks/bench_ex6.py " + " ".join(sys.argv[1:] if argv is None else argv)
    return a


def header(a):
    """The section's title, the machine and the commands; written beside the runs, so that --collect shows the
    machine and the command that made them."""
    path = os.path.join(a.out_dir, "header.md")
    if a.collect and os.path.exists(path):
        with open(path) as f:
            return f.read()
    quick = " (--quick: the numbers mean nothing)" if a.quick else ""
    every = " ".join(fixed_flags(a, "S"))
    out = os.path.relpath(a.out_dir, ROOT) if a.out_dir.startswith(ROOT + os.sep) else a.out_dir
    text = (f"## ex6: the speedrun to val {a.target:.2f} on TinyShakespeare{quick}\n\nmachine: {machine(a.threads)}, "
            f"{load()}; {datetime.date.today():%B %Y}\n\n`{a.command}`\n\nEvery run, one at a time: `python SCRIPT "
            f"FLAGS --eval_interval N {every} --out_dir {out}/NAME_seedS --overwrite` (N: ex6 {a.eval_interval}, "
            f"ex4 {a.ex4_eval_interval}, ex1 {a.ex1_eval_interval}; ex6: FLAGS start with --ex6_flags: "
            f"{' '.join(a.ex6_flags) or 'none'}).\n")  # fmt: skip
    if not a.collect:
        os.makedirs(a.out_dir, exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
    return text


def main(argv=None):
    a = parse(argv)
    print(header(a), flush=True)
    if not a.collect:
        runs = order(a.configs, a.seeds)
        for i, (name, seed) in enumerate(runs):
            print(f"[{i + 1}/{len(runs)}] {name}, seed {seed}", flush=True)
            run_one(a, name, seed)
        print()
    results = {name: {} for name in a.configs}
    for name in a.configs:
        for seed in a.seeds:
            if (r := read(a, name, seed)) is not None:
                results[name][seed] = r
    headline(a, results)
    record(a, results)
    plot(a, results)


if __name__ == "__main__":
    main()
