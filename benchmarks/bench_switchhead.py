"""
SwitchHead against dense attention at matched parameters: val loss, attention cost, time and peak memory.

    python benchmarks/bench_switchhead.py --jobs 2         the full comparison: 3 models x 3 seeds x 2000 iterations
                                                           at block 256, two runs at a time with one thread each:
                                                           59 minutes on 2 CPU cores (the README's table)
    python benchmarks/bench_switchhead.py                  the same one run at a time, with all the cores (not timed)
    python benchmarks/bench_switchhead.py --seeds 1337 --max_iters 500
                                                           a reduced run, 3 runs of ~3 minutes (estimated)
    python benchmarks/bench_switchhead.py --quick          a check of the pipeline in about a minute (numbers
                                                           meaningless)
    python benchmarks/bench_switchhead.py --device cuda -- --compile
                                                           on a GPU; flags after -- go to every run

The models (ex1's CPU settings, 4 layers of width 128, batch 12, 2000 iterations, except block 256, where attention
is a large part of the cost; at block 64 the projections dominate and the models cannot be told apart):
  switchhead    --n_head 2 --n_experts 4 --moe_k 2: 2 heads of 24, sigmoid gates, 2 of 4 value and output experts
  dense 8-head  --n_experts 1 --n_head 8: heads of 16, the dense model with n_head * n_experts heads
  dense 2-head  --n_experts 1 --n_head 2: heads of 64, as few attention matrices as SwitchHead
Matched parameters: a dense attention layer has 4 d^2 parameters (q, k, v and output, d = n_embd) whatever its
number of heads, as long as heads * head size = d, so both dense models have exactly the same parameter count.
SwitchHead's layer has 2 d H D (queries, keys) + 2 H E d D (experts) + 2 H E d (routers) parameters; like the paper,
which matches by choosing d_head, its head size D is chosen to match: switchhead_moe.py's default head size is the
largest D with no more parameters than the dense layer, D = 24 here (63.5k against 65.5k per layer, 1% fewer
parameters in the whole model). MLPs, embeddings and everything else are identical.

Each run is a fresh process of switchhead_moe.py with its own --out_dir under out/bench_switchhead/; the numbers come
from its log.csv: the val loss of the last evaluation (after max_iters, over --eval_iters batches, the same batches
for every model and seed) and the median ms per iteration of the logged iterations (evaluations excluded).
Evaluations run only at the start and the end (--eval_interval = --max_iters). Attention MACs and memory per layer
come from the paper's accounting (switchhead_moe.attention_cost). Peak memory: on the CPU the maximum resident set
size of the whole process (from os.wait4, so it includes Python and torch themselves: the 'floor' line shows a
process that only imports torch); on CUDA torch.cuda.max_memory_allocated of the run.
"""

import argparse
import concurrent.futures
import os
import statistics
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import switchhead_moe as sh  # noqa: E402  (importing it trains nothing)
from common import read_log, run  # noqa: E402

MODELS = {
    "switchhead": ["--n_head", "2", "--n_experts", "4", "--moe_k", "2"],
    "dense 8-head": ["--n_experts", "1", "--n_head", "8"],
    "dense 2-head": ["--n_experts", "1", "--n_head", "2"],
}
# runs the script as __main__ in this process, then reports the GPU's peak memory
RUNNER = """import runpy, sys, torch
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
if torch.cuda.is_available():
    print(f"peak_cuda_bytes {torch.cuda.max_memory_allocated()}")
"""


def run_model(name, seed, args, extra, threads):
    out_dir = os.path.join(ROOT, "out", "bench_switchhead", f"{name.replace(' ', '_')}-{seed}")
    os.makedirs(out_dir, exist_ok=True)
    flags = MODELS[name] + [
        "--seed", str(seed), "--out_dir", out_dir, "--overwrite", "--max_iters", str(args.max_iters),
        "--block_size", str(args.block_size), "--eval_iters", str(args.eval_iters),
        "--eval_interval", str(max(1, args.max_iters)), "--device", args.device,
        "--max_new_tokens", "0", *extra,
    ]  # fmt: skip
    cmd = [sys.executable, "-c", RUNNER, os.path.join(ROOT, "switchhead_moe.py"), *flags]
    printed, _, rss_mb = run(cmd, threads, log_path=os.path.join(out_dir, "stdout.txt"))
    rows = read_log(out_dir)
    ms = [float(r["ms_per_iter"]) for r in rows if r["ms_per_iter"]]
    cuda = [line.split()[1] for line in printed.splitlines() if line.startswith("peak_cuda_bytes")]
    return {
        "val": float([r for r in rows if r["val_loss"]][-1]["val_loss"]),
        "ms": statistics.median(ms) if ms else float("nan"),
        "mem_mb": int(cuda[0]) / 2**20 if cuda else rss_mb,
        "cfg": sh.parse_args(flags),
        "vocab": len(torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=True)["vocab"]),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--seeds", type=int, nargs="+", default=[1337, 1338, 1339])
    parser.add_argument("--max_iters", type=int, default=2000)
    parser.add_argument("--block_size", type=int, default=256)
    parser.add_argument("--eval_iters", type=int, default=200, help="val batches in the final evaluation")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time, each with cores / jobs torch threads")
    parser.add_argument("--quick", action="store_true", help="1 seed, 10 iterations at block 32, 2 eval batches")
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    if args.quick:
        args.seeds, args.max_iters, args.block_size, args.eval_iters = args.seeds[:1], 10, 32, 2
    print(
        f"block {args.block_size}, {args.max_iters} iterations, {args.eval_iters} val batches, seeds {args.seeds}, "
        f"device {args.device} {' '.join(extra)}"
    )
    env = dict(os.environ)
    if args.jobs > 1:  # parallel runs at full threads each would thrash the cores
        env.setdefault("OMP_NUM_THREADS", str(max(1, os.cpu_count() // args.jobs)))
    print(
        f"(torch threads: OMP_NUM_THREADS={env.get('OMP_NUM_THREADS', 'unset')}, {os.cpu_count()} cores, {args.jobs} "
        "run(s) at a time)",
        flush=True,
    )
    _, _, floor = run([sys.executable, "-c", "import torch"])

    runs = [(name, seed) for name in args.models for seed in args.seeds]
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:  # threads only wait on the child processes
        futures = [pool.submit(run_model, name, seed, args, extra, env.get("OMP_NUM_THREADS")) for name, seed in runs]
        for f in concurrent.futures.as_completed(futures):
            (name, seed), r = runs[futures.index(f)], f.result()
            print(
                f"  {name:<13} seed {seed}: val {r['val']:.4f} | {r['ms']:.1f} ms/iter | peak {r['mem_mb']:.0f} MB",
                flush=True,
            )
    results = {}
    for (name, _), f in zip(runs, futures):
        results.setdefault(name, []).append(f.result())

    summary = {}
    for name, rs in results.items():
        cfg, vals = rs[0]["cfg"], [r["val"] for r in rs]
        macs, mem = sh.attention_cost(cfg.block_size, cfg.n_embd, cfg.n_head, cfg.head_size, cfg.n_experts, cfg.moe_k)
        summary[name] = {
            "cfg": cfg, "params": sh.GPT(cfg, rs[0]["vocab"]).num_params(), "macs": macs, "mem": mem,
            "val": statistics.mean(vals), "spread": max(vals) - min(vals),
            "ms": statistics.mean(r["ms"] for r in rs), "mb": statistics.mean(r["mem_mb"] for r in rs),
        }  # fmt: skip
    ref = summary.get("dense 8-head")
    pct = lambda a, key: f"({100 * a / ref[key]:.0f}%)" if ref else ""  # noqa: E731
    header = (
        f"{'model':<13} | {'heads':<12} | {'params':>7} | {'attn MACs':>14} | {'attn floats':>13} | "
        f"{'val mean':>8} | {'spread':>6} | {'ms/iter':>7} | {'peak MB':>7}"
    )
    print(f"\n{header}")
    for name, s in summary.items():
        cfg = s["cfg"]
        heads = f"{cfg.n_head}x{cfg.head_size}" + (f" E{cfg.n_experts} k{cfg.moe_k}" if cfg.n_experts > 1 else "")
        print(
            f"{name:<13} | {heads:<12} | {s['params'] / 1e6:6.3f}M | {s['macs'] / 1e6:6.1f}M "
            f"{pct(s['macs'], 'macs'):>6} | "
            f"{s['mem'] / 1e6:5.2f}M {pct(s['mem'], 'mem'):>6} | {s['val']:8.4f} | {s['spread']:6.4f} | "
            f"{s['ms']:7.1f} | {s['mb']:7.0f}"
        )
    print(f"{'floor':<13} | {'a process that only imports torch':<{len(header) - 26}} | {floor:7.0f}")
    print(
        "attention MACs and floats: one layer, by the paper's accounting, in % of the dense 8-head model; spread: max "
        "- min over seeds"
    )

    sw, d8, d2 = (summary.get(n) for n in ("switchhead", "dense 8-head", "dense 2-head"))
    if sw and d8:
        gap = 100 * (sw["val"] - d8["val"]) / d8["val"]
        print(
            f"\nSwitchHead vs dense 8-head: val loss {gap:+.2f}% (target within 1%: {'met' if gap <= 1 else 'missed'}),"
            f" attention MACs {100 * sw['macs'] / d8['macs']:.0f}% (target <= 50%), memory "
            f"{100 * sw['mem'] / d8['mem']:.0f}% (target <= 35%),"
            f" time per iteration {100 * sw['ms'] / d8['ms']:.0f}%,"
            f" peak memory {100 * sw['mb'] / d8['mb']:.0f}% (whole process)"
        )
    if sw and d2:
        margin, spread = d2["val"] - sw["val"], max(sw["spread"], d2["spread"])
        print(
            f"SwitchHead vs dense 2-head: val loss {abs(margin):.4f} {'lower' if margin > 0 else 'higher'}; it "
            f"{'beats' if margin > spread else 'does not beat'}"
            f" it by more than the seed spread ({spread:.4f}, the larger of the two)"
        )


if __name__ == "__main__":
    main()
