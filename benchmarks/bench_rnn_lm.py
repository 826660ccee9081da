"""
bench_rnn_lm.py: rnn_lm.py's cells against ex1_gpt.py's transformer on TinyShakespeare, at the same parameter count and
the same wall-clock training budget on the CPU; then the bidirectional LSTM's collapsing loss next to the LSTM's.

Every model is a subprocess of its script with its own flags, as a user would run it:
  1. ex1_gpt.py at its defaults (0.80M parameters) sets the target parameter count.
  2. Each recurrent cell (Elman-slide, Elman-tanh, LSTM, GRU; one layer, rnn_lm's defaults otherwise) gets the
     --n_hidden that brings it closest to that count.
  3. A short calibration run measures each model's median ms/iter; the real run then gets the --max_iters that
     fill the budget, so that every model finishes its whole warmup-and-cosine schedule within the same time.
     The budget counts training steps only: evaluation (200 batches per split, at the start and the end, the same
     batches for every model) and sampling are outside it, and shown in the wall-time column.
  4. rnn_lm.py --bidirectional with the LSTM's settings and iterations: its train and val loss next to the LSTM's,
     and a sample of each.
Results come from each run's out_dir/log.csv and its printed sample; runs go to out/bench_rnn_lm/<name>.

Run:    python benchmarks/bench_rnn_lm.py                 (budget 90 s per model: about 15 minutes on 2 CPU cores)
        python benchmarks/bench_rnn_lm.py --budget 60     (shorter)   --threads 2   (pin the threads of every run)
Check:  python benchmarks/bench_rnn_lm.py --quick         (3 s budgets, tiny evaluations: checks the plumbing,
                                                       about 1-2 minutes)
It prints a markdown table for RESULTS.md.
"""

import argparse
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import ex1_gpt  # noqa: E402
import rnn_lm  # noqa: E402
from common import read_log, run  # noqa: E402

CELLS = [  # name, rnn_lm flags (n_hidden is added to match the parameter count)
    ("Elman-slide", ["--cell", "elman", "--activation", "slide"]),
    ("Elman-tanh", ["--cell", "elman", "--activation", "tanh"]),
    ("LSTM", ["--cell", "lstm"]),
    ("GRU", ["--cell", "gru"]),
]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    p.add_argument("--budget", type=float, default=90.0, help="seconds of training steps per model (default 90)")
    p.add_argument(
        "--eval_iters", type=int, default=200, help="batches per split in the evaluations (default 200, as ex1)"
    )
    p.add_argument("--calibrate_iters", type=int, default=30, help="iterations of each timing run (default 30)")
    p.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS for every run; 0 leaves it alone (default)")
    p.add_argument(
        "--data",
        default=os.path.join(ROOT, "data", "tinyshakespeare.txt"),
        help="the text file (default data/tinyshakespeare.txt)",
    )
    p.add_argument("--out", default=os.path.join(ROOT, "out", "bench_rnn_lm"), help="parent of every run's out_dir")
    p.add_argument(
        "--quick",
        action="store_true",
        help="3 s budgets, 5 eval batches, 5 timing iterations: only checks that it all runs",
    )
    args = p.parse_args()
    if args.quick:
        args.budget, args.eval_iters, args.calibrate_iters = 3.0, 5, 5
    if not os.path.isfile(args.data):
        sys.exit(f"error: no data file at {args.data}; run python ex1_gpt.py once to download it, or pass --data")
    return args


def vocab_size(path):
    with open(path, encoding="utf-8") as f:
        return len(set(f.read()))


def matching_hidden(flags, target, vocab):
    """The --n_hidden whose rnn_lm model (flags otherwise at the defaults) has the parameter count closest to target."""
    cfg = rnn_lm.parse_args(flags)

    def params(h):
        cfg.n_hidden = h
        return rnn_lm.RNNLM(cfg, vocab).num_params()

    return min(range(8, 2049, 8), key=lambda h: abs(params(h) - target)), params


def run_script(script, flags, out_dir, threads):
    """Run a script to completion; returns (its output, wall seconds). Stops the benchmark if the run fails."""
    text, wall, _ = run([sys.executable, os.path.join(ROOT, script), *flags, "--device", "cpu", "--out_dir", out_dir,
                         "--overwrite"], threads)  # fmt: skip
    return text, wall


def summary(out_dir):
    """The last evaluation of a run and its median ms per iteration (the first fifth, warm-up, left out)."""
    rows = read_log(out_dir)
    evals = [r for r in rows if r["val_loss"]]
    ms = [float(r["ms_per_iter"]) for r in rows if r["ms_per_iter"]]
    return {
        "iters": int(evals[-1]["iter"]),
        "train": float(evals[-1]["train_loss"]),
        "val": float(evals[-1]["val_loss"]),
        "ms": statistics.median(ms[len(ms) // 5 :]) if ms else float("nan"),
    }


def first_sample(stdout):
    return stdout.split("--- sample 1 ---\n", 1)[1].split("\n--- sample 2 ---", 1)[0].rstrip("\n")


def bench(name, script, flags, args, max_new_tokens=0, iters=0):
    """Time a few iterations, then train for as many as fit args.budget (or for iters); returns the real run's
    results."""
    base = os.path.join(args.out, name.lower())
    common = [*flags, "--data", args.data, "--eval_iters", str(args.eval_iters)]
    if not iters:
        run_script(
            script,
            [
                *common,
                "--max_iters",
                str(args.calibrate_iters),
                "--eval_interval",
                str(10**9),
                "--eval_iters",
                "1",
                "--log_interval",
                "1",
                "--max_new_tokens",
                "0",
            ],
            base + "_timing",
            args.threads,
        )
        iters = max(1, int(args.budget * 1000 / summary(base + "_timing")["ms"]))
    stdout, wall = run_script(
        script,
        [
            *common,
            "--max_iters",
            str(iters),
            "--eval_interval",
            str(iters),
            "--log_interval",
            "10",
            "--max_new_tokens",
            str(max_new_tokens),
        ],
        base,
        args.threads,
    )
    return {"name": name, "flags": " ".join(flags), "wall": wall, "sample": first_sample(stdout), **summary(base)}


def main():
    args = parse_args()
    vocab = vocab_size(args.data)
    target = ex1_gpt.GPT(ex1_gpt.Config(), vocab).num_params()
    print(
        f"target: ex1_gpt's {target / 1e6:.3f}M parameters; budget {args.budget:g} s of training per model", flush=True
    )

    models = [("ex1_gpt.py", "Transformer (ex1)", [], target)]
    for name, flags in CELLS:
        hidden, params = matching_hidden(flags, target, vocab)
        models.append(("rnn_lm.py", name, [*flags, "--n_hidden", str(hidden)], params(hidden)))
    results = []
    for script, name, flags, params in models:
        r = bench(name, script, flags, args, max_new_tokens=300 if name == "LSTM" else 0)
        results.append({**r, "params": params})
        print(
            f"  {name}: {r['iters']} iterations at {r['ms']:.1f} ms, val {r['val']:.4f}, {r['wall']:.0f} s wall",
            flush=True,
        )
    lstm = next(r for r in results if r["name"] == "LSTM")
    bi = bench(
        "LSTM-bidirectional",
        "rnn_lm.py",
        [*lstm["flags"].split(), "--bidirectional"],
        args,
        max_new_tokens=300,
        iters=lstm["iters"],
    )
    bi_params = rnn_lm.RNNLM(rnn_lm.parse_args([*lstm["flags"].split(), "--bidirectional"]), vocab).num_params()

    print(
        f"\n## Same parameter count (~{target / 1e6:.2f}M), same training budget ({args.budget:g} s of steps per "
        f"model), CPU, OMP_NUM_THREADS={args.threads or os.environ.get('OMP_NUM_THREADS', 'unset')}\n"
    )
    print("| model | flags | params | iterations in the budget | ms/iter | train s | val loss | train loss | wall s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['name']} | `{r['flags'] or 'defaults'}` | {r['params'] / 1e6:.2f}M | {r['iters']} | {r['ms']:.1f} "
            f"| {r['iters'] * r['ms'] / 1000:.0f} | {r['val']:.4f} | {r['train']:.4f} | {r['wall']:.0f} |"
        )
    print("\n## Bidirectional: it sees the next token, so its loss collapses; it is not a language model\n")
    print("| model | params | iterations | ms/iter | train loss | val loss |")
    print("|---|---|---|---|---|---|")
    print(
        f"| LSTM | {lstm['params'] / 1e6:.2f}M | {lstm['iters']} | {lstm['ms']:.1f} | {lstm['train']:.4f} | "
        f"{lstm['val']:.4f} |"
    )
    print(
        f"| LSTM `--bidirectional` | {bi_params / 1e6:.2f}M | {bi['iters']} | {bi['ms']:.1f} | {bi['train']:.4f} | "
        f"{bi['val']:.4f} |"
    )
    for name, r in (("LSTM", lstm), ("LSTM --bidirectional", bi)):
        print(f"\nSample, {name}:\n```\n{r['sample']}\n```")


if __name__ == "__main__":
    main()
