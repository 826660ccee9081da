"""
SwitchHead against dense attention at matched parameters: val loss, attention cost, time and peak memory, dead experts;
the ablation of the official recipe; one attention layer's cost against the context length.

    python benchmarks/bench_switchhead_moe.py --jobs 2       the comparison: SwitchHead (sigmoid and softmax gates) and
                                                           the dense 8-head and 2-head models, 3 seeds x 2000
                                                           iterations at block 256, two runs at a time, one thread each
    python benchmarks/bench_switchhead_moe.py --ablation --seeds 1337 --max_iters 500 --eval_iters 50 \
        --usage_interval 100
                                                           the official recipe, each of its pieces taken out, the old
                                                           recipe, dense models with both; expert use over training
                                                           (benchmarks/pictures/switchhead_expert_usage.png)
    python benchmarks/bench_switchhead_moe.py --scaling        one attention layer, forward and backward, explicit
                                                           attention, at T = 256 .. 2048: time and memory
    python benchmarks/bench_switchhead_moe.py --quick          a check of the pipeline in about a minute (numbers
                                                           meaningless)
    python benchmarks/bench_switchhead_moe.py --device cuda -- --compile
                                                           on a GPU; flags after -- go to every run
--reuse reads runs already finished under out/bench_switchhead_moe/ with the same flags instead of running them again.

The models (ex1's CPU settings, 4 layers of width 128, batch 12, 2000 iterations, except block 256, where attention
is a large part of the cost; at block 64 the projections dominate and the models cannot be told apart); every run
gives its whole recipe explicitly (OFFICIAL: switchhead_moe.py's defaults; OLD: the recipe before them):
  switchhead          --n_head 2 --n_experts 4: 2 heads of 24, sigmoid gates, 2 of 4 value and output experts
  softmax gate        the same with --gate softmax: the arg-max expert and the load-balancing loss
  dense 8-head        --n_experts 1 --n_head 8: heads of 16, the dense model with n_head * n_experts heads
  dense 2-head        --n_experts 1 --n_head 2: heads of 64, as few attention matrices as SwitchHead
  old recipe, dense 8-head old, dense 2-head old: --pos learned --init gpt2 --no-router_renorm (the README's first
                      table: --models "old recipe" "dense 8-head old" "dense 2-head old" --jobs 2)
  no rope, no fan-in init, no router renorm: the official recipe less one piece; expert dropout 0.1: plus one
Matched parameters: a dense attention layer has 4 d^2 parameters (q, k, v and output, d = n_embd) whatever its
number of heads, as long as heads * head size = d, so both dense models have exactly the same parameter count.
SwitchHead's layer has 2 d H D (queries, keys) + 2 H E d D (experts) + 2 H E d (routers) parameters; like the paper,
which matches by choosing d_head, its head size D is chosen to match: switchhead_moe.py's default head size is the
largest D with no more parameters than the dense layer, D = 24 here (63.5k against 65.5k per layer, 1% fewer
parameters in the whole model). MLPs, embeddings and everything else are identical.

Each run is a fresh process of switchhead_moe.py with its own --out_dir under out/bench_switchhead_moe/; the numbers
come from its log.csv: the val loss of the last evaluation (after max_iters, over --eval_iters batches, the same batches
for every model and seed) and the median ms per iteration of the logged iterations (evaluations excluded), and from
its output: the dead experts (chosen by fewer than 5% of the val tokens at the end) and, for --usage_model, the
expert use of every evaluation. Evaluations run only at the start and the end (--eval_interval = --max_iters), except
for --usage_model with --usage_interval: they draw their batches from their own generator, so they change nothing.
Attention MACs and memory per layer come from the paper's accounting (switchhead_moe.attention_cost). Peak memory:
on the CPU the maximum resident set size of the whole process (from os.wait4, so it includes Python and torch
themselves: the 'floor' line shows a process that only imports torch); on CUDA torch.cuda.max_memory_allocated.
"""

import argparse
import concurrent.futures
import os
import re
import statistics
import sys
from dataclasses import asdict

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import switchhead_moe as sh  # noqa: E402  (importing it trains nothing)
from common import PICTURES, machine, read_log, run, table  # noqa: E402

SWITCHHEAD = ["--n_head", "2", "--n_experts", "4"]
# the official implementation's recipe (RobertCsordas/switchhead), switchhead_moe.py's defaults, given explicitly
OFFICIAL = "--init switchhead --router_renorm --pos rope --rope_fraction 0.5 --expert_dropout 0".split()
OLD = "--init gpt2 --no-router_renorm --pos learned --expert_dropout 0".split()  # the recipe before issue 17
MODELS = {  # argparse keeps the last of a repeated flag: an entry changes one piece of OFFICIAL by appending it
    "switchhead": SWITCHHEAD + OFFICIAL,
    "softmax gate": SWITCHHEAD + OFFICIAL + ["--gate", "softmax"],
    "dense 8-head": ["--n_experts", "1", "--n_head", "8"] + OFFICIAL,
    "dense 2-head": ["--n_experts", "1", "--n_head", "2"] + OFFICIAL,
    "old recipe": SWITCHHEAD + OLD,
    "dense 8-head old": ["--n_experts", "1", "--n_head", "8"] + OLD,
    "dense 2-head old": ["--n_experts", "1", "--n_head", "2"] + OLD,
    "no rope": SWITCHHEAD + OFFICIAL + ["--pos", "learned"],
    "no fan-in init": SWITCHHEAD + OFFICIAL + ["--init", "gpt2"],
    "no router renorm": SWITCHHEAD + OFFICIAL + ["--no-router_renorm"],
    "expert dropout 0.1": SWITCHHEAD + OFFICIAL + ["--expert_dropout", "0.1"],
    "all rotated": SWITCHHEAD + OFFICIAL + ["--rope_fraction", "1"],
}
COMPARISON = ["switchhead", "softmax gate", "dense 8-head", "dense 2-head"]
ABLATION = ["switchhead", "dense 8-head", "old recipe", "dense 8-head old", "no rope", "no fan-in init",
            "no router renorm", "expert dropout 0.1", "softmax gate"]  # fmt: skip
# runs the script as __main__ in this process, then reports the GPU's peak memory
RUNNER = """import runpy, sys, torch
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
if torch.cuda.is_available():
    print(f"peak_cuda_bytes {torch.cuda.max_memory_allocated()}")
"""


def run_model(name, seed, args, extra, threads):
    out_dir = os.path.join(ROOT, "out", "bench_switchhead_moe", f"{name.replace(' ', '_')}-{seed}")
    os.makedirs(out_dir, exist_ok=True)
    # evaluations do not change a run (their batches have their own generator): the usage picture's run has more
    every = args.usage_interval if name == args.usage_model and args.usage_interval else max(1, args.max_iters)
    flags = MODELS[name] + [
        "--seed", str(seed), "--out_dir", out_dir, "--overwrite", "--max_iters", str(args.max_iters),
        "--block_size", str(args.block_size), "--eval_iters", str(args.eval_iters),
        "--eval_interval", str(every), "--device", args.device, "--max_new_tokens", "0", *extra,
    ]  # fmt: skip
    cmd = [sys.executable, "-c", RUNNER, os.path.join(ROOT, "switchhead_moe.py"), *flags]
    log_path = os.path.join(out_dir, "stdout.txt")
    if args.reuse and finished(out_dir, flags):
        with open(log_path) as f:
            printed, rss_mb = f.read(), float("nan")  # the peak memory of a process long gone is not kept
        print(f"reusing {out_dir}")
    else:
        printed, _, rss_mb = run(cmd, threads, log_path=log_path)
    rows = read_log(out_dir)
    ms = [float(r["ms_per_iter"]) for r in rows if r["ms_per_iter"]]
    cuda = [line.split()[1] for line in printed.splitlines() if line.startswith("peak_cuda_bytes")]
    dead = re.search(r"^dead experts .*?: (\d+) of (\d+)", printed, re.M)
    cfg, usage = sh.parse_args(flags), usage_over_training(printed)
    last = [p for sides in usage[max(usage)].values() for side in sides for head in side for p in head] if usage else []
    return {
        "val": float([r for r in rows if r["val_loss"]][-1]["val_loss"]),
        "ms": statistics.median(ms) if ms else float("nan"),
        "mem_mb": int(cuda[0]) / 2**20 if cuda else rss_mb,
        "cfg": cfg,
        "vocab": len(torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=True)["vocab"]),
        "dead": f"{dead[1]}/{dead[2]}" if dead else "-",
        "least": f"{cfg.moe_k * min(last)}%" if last else "-",  # of the tokens: the printed shares are of choices
        "usage": usage,
    }


def finished(out_dir, flags):
    """Does out_dir hold a finished run (its output ends with the sample, its checkpoint at max_iters) of these flags?
    Flags that do not change the result (device, dtype, threads, the evaluation interval) may differ."""
    try:
        with open(os.path.join(out_dir, "stdout.txt")) as f:
            done = "--- sample 1 ---" in f.read()
        saved = torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=True, map_location="cpu")
    except OSError:
        return False
    cfg, free = asdict(sh.parse_args(flags)), ("device", "dtype", "threads", "eval_interval")
    same = all(saved["config"].get(k) == v for k, v in cfg.items() if k not in free)
    return done and same and saved["iter_num"] == cfg["max_iters"]


def usage_over_training(printed):
    """From a run's output: for every evaluation, its iteration and each layer's expert use (% of its head's choices),
    as {iteration: {layer: (value (H, E), output (H, E))}}."""
    usage, it = {}, None
    for line in printed.splitlines():
        if m := re.match(r"iter (\d+) \| train", line):
            it = int(m[1])
        elif m := re.match(r"  layer (\d+) expert use .*\| value (.*) \| output (.*)$", line):
            side = lambda text: [[int(p) for p in head.split()] for head in text.split("/")]  # noqa: E731
            usage.setdefault(it, {})[int(m[1])] = (side(m[2]), side(m[3]))
    return usage


def usage_picture(usage, cfg, path):
    """Expert use over training: one panel per layer and router, a row per head and expert, a column per evaluation;
    the colour is the share of the tokens that chose the expert (an even share is moe_k / n_experts)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    iters = sorted(usage)
    H, E, k = cfg.n_head, cfg.n_experts, cfg.moe_k
    fig, axes = plt.subplots(cfg.n_layer, 2, figsize=(11, 1.0 + 1.6 * cfg.n_layer * H * E / 8), squeeze=False,
                             sharex=True)  # fmt: skip
    for layer in range(cfg.n_layer):
        for side, name in enumerate(("value", "output")):
            grid = [[k * usage[it][layer][side][h][e] for it in iters] for h in range(H) for e in range(E)]
            ax = axes[layer][side]
            im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=100, interpolation="nearest")
            for r, row in enumerate(grid):  # mark the dead: chosen by fewer than 5% of the tokens
                for c, v in enumerate(row):
                    if v < 5:
                        ax.text(c, r, "x", ha="center", va="center", color="white", fontsize=7)
            ax.set_yticks(range(H * E), [f"h{h} e{e}" for h in range(H) for e in range(E)], fontsize=7)
            ax.set_xticks(range(len(iters)), [str(it) for it in iters], fontsize=7)
            ax.set_title(f"layer {layer}, {name} experts", fontsize=9)
    for ax in axes[-1]:
        ax.set_xlabel("iteration")
    fig.colorbar(im, ax=axes, label="% of the val tokens choosing the expert (x: under 5%)", shrink=0.6)
    fig.suptitle(f"SwitchHead expert use over training ({H} heads, {E} experts, top-{k}, {cfg.gate} gate)")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    print(f"saved {path}")


# one attention layer, forward and backward, in a fresh process per size (the peak is the process's high-water mark)
LAYER = """import resource, statistics, sys, time, torch
sys.path.insert(0, sys.argv[1])
import switchhead_moe as sh
flags, T, B, reps = sys.argv[2].split(), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
cfg = sh.parse_args(flags + ["--block_size", str(T), "--no-flash"])
attn = sh.Block(cfg).attn
x, pos = torch.randn(B, T, cfg.n_embd, requires_grad=True), torch.arange(T).unsqueeze(0)
weights = {p.untyped_storage().data_ptr() for p in attn.parameters()}
saved = {}  # what the forward keeps for the backward: every saved tensor's storage, once, weights left out
def pack(t):
    if t.untyped_storage().data_ptr() not in weights:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return t
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
    attn(x, pos).square().mean().backward()  # also the warm-up
times = []
for _ in range(reps):
    t = time.perf_counter()
    attn(x, pos).square().mean().backward()
    times.append(time.perf_counter() - t)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(f"result {statistics.median(times) * 1000:.1f} {sum(saved.values()) / 2**20:.1f} {peak / 1024:.1f}")
"""


def scaling(args):
    """(a) One attention layer, explicit attention (the T x T matrices stored), forward and backward, against T."""
    print(f"one attention layer, forward + backward, explicit attention, batch {args.scaling_batch}, 1 thread; time: "
          f"the median of {args.scaling_reps} after a warm-up; saved: the tensors the forward keeps for the backward "
          "(weights excepted); RSS: how much the process's peak resident memory grew over all the steps (the "
          "allocator's doing as much as the layer's)")  # fmt: skip
    names = ("switchhead", "dense 8-head", "dense 2-head")
    results = {}
    for name in names:
        for T in args.lengths:
            cmd = [sys.executable, "-c", LAYER, ROOT, " ".join(MODELS[name]), str(T), str(args.scaling_batch),
                   str(args.scaling_reps)]  # fmt: skip
            printed, _, _ = run(cmd, threads=1)
            results[name, T] = [float(v) for v in printed.split("result ")[1].split()]
            print(f"  {name:<12} T={T:5d}: {results[name, T][0]:8.1f} ms, saved {results[name, T][1]:7.1f} MB",
                  flush=True)  # fmt: skip
    rows = []
    for T in args.lengths:
        (sw_ms, sw_mb, _), (d8_ms, d8_mb, _), (d2_ms, d2_mb, _) = (results[n, T] for n in names)
        macs = [sh.attention_cost(T, 128, *hs) for hs in ((2, 24, 4, 2), (8, 16), (2, 64))]
        rows.append([T, f"{sw_ms:.1f}", f"{d8_ms:.1f}", f"{d2_ms:.1f}", f"{100 * sw_ms / d8_ms:.0f}%",
                     f"{sw_mb:.1f}", f"{d8_mb:.1f}", f"{d2_mb:.1f}", f"{100 * sw_mb / d8_mb:.0f}%",
                     f"{100 * macs[0][0] / macs[1][0]:.0f}%", f"{100 * macs[0][1] / macs[1][1]:.0f}%"])  # fmt: skip
    table(["T", "SwitchHead ms", "dense 8-head ms", "dense 2-head ms", "time SH / 8-head", "SwitchHead saved MB",
           "dense 8-head saved MB", "dense 2-head saved MB", "saved SH / 8-head", "MACs SH / 8-head (accounting)",
           "floats SH / 8-head (accounting)"], rows)  # fmt: skip
    print(f"RSS peak growth, MB, at T = {' / '.join(map(str, args.lengths))}: " + ", ".join(
        f"{n} " + " / ".join(f"{results[n, T][2]:.0f}" for T in args.lengths) for n in names))  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--seeds", type=int, nargs="+", default=[1337, 1338, 1339])
    parser.add_argument("--max_iters", type=int, default=2000)
    parser.add_argument("--block_size", type=int, default=256)
    parser.add_argument("--eval_iters", type=int, default=200, help="val batches in the final evaluation")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--models", nargs="+", default=COMPARISON, choices=list(MODELS))
    parser.add_argument("--ablation", action="store_true", help="--models " + " / ".join(ABLATION))
    parser.add_argument("--usage_interval", type=int, default=0, help="evaluate --usage_model every this many "
                        "iterations and draw its expert use over training (the picture; 0: no picture)")  # fmt: skip
    parser.add_argument("--usage_model", default="switchhead", choices=list(MODELS))
    parser.add_argument("--reuse", action="store_true", help="read a run that out/bench_switchhead_moe already holds, "
                        "finished with the same flags, instead of running it again (to complete an interrupted "
                        "benchmark, or print its table again)")  # fmt: skip
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time, each with cores / jobs torch threads")
    parser.add_argument("--quick", action="store_true", help="1 seed, 10 iterations at block 32, 2 eval batches")
    parser.add_argument("--scaling", action="store_true", help="instead: one layer's time and memory against T")
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048], help="--scaling: T")
    parser.add_argument("--scaling_batch", type=int, default=1, help="--scaling: sequences per batch")
    parser.add_argument("--scaling_reps", type=int, default=3, help="--scaling: timed repetitions per size")
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    if args.scaling:
        print(machine(1))
        return scaling(args)
    if args.ablation:
        args.models = ABLATION
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
                f"  {name:<18} seed {seed}: val {r['val']:.4f} | {r['ms']:.1f} ms/iter | peak {r['mem_mb']:.0f} MB | "
                f"dead experts {r['dead']}",
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
            "vals": vals, "val": statistics.mean(vals), "spread": max(vals) - min(vals),
            "ms": statistics.mean(r["ms"] for r in rs), "mb": statistics.mean(r["mem_mb"] for r in rs),
            "dead": " / ".join(r["dead"] for r in rs), "least": " / ".join(r["least"] for r in rs),
        }  # fmt: skip
    ref = summary.get("dense 8-head") or summary.get("dense 8-head old")
    pct = lambda a, key: f" ({100 * a / ref[key]:.0f}%)" if ref else ""  # noqa: E731
    rows = []
    for name, s in summary.items():
        cfg = s["cfg"]
        heads = f"{cfg.n_head} of {cfg.head_size}" + (
            f", {cfg.n_experts} experts, top-{cfg.moe_k} {cfg.gate}" if cfg.n_experts > 1 else ""
        )
        recipe = f"{cfg.pos}{f' {cfg.rope_fraction:g}' if cfg.pos == 'rope' else ''}, init {cfg.init}" + (
            f", renorm {'on' if cfg.router_renorm else 'off'}, expert dropout {cfg.expert_dropout:g}"
            if cfg.n_experts > 1
            else ""
        )
        rows.append([name, heads, recipe, f"{s['params'] / 1e6:.3f}M",
                     f"{s['macs'] / 1e6:.1f}M{pct(s['macs'], 'macs')}", f"{s['mem'] / 1e6:.2f}M{pct(s['mem'], 'mem')}",
                     " / ".join(f"{v:.4f}" for v in s["vals"]), f"{s['val']:.4f}", f"{s['spread']:.4f}",
                     f"{s['ms']:.1f}", f"{s['mb']:.0f}", s["dead"], s["least"]])  # fmt: skip
    print()
    table(["model", "heads", "recipe", "params", "attention MACs", "attention floats",
           f"val loss, seeds {' / '.join(map(str, args.seeds))}", "mean", "spread", "ms/iter", "peak MB",
           "dead experts", "least-used expert"], rows)  # fmt: skip
    print(f"floor: a process that only imports torch takes {floor:.0f} MB")
    print(
        "attention MACs and floats: one layer, by the paper's accounting, in % of the dense 8-head model; spread: max "
        "- min over seeds; dead experts: chosen by < 5% of the val tokens at the end, of all the value and output "
        "experts, per seed; least-used expert: the share of the val tokens choosing it at the end (rounded to the "
        "printed % of its head's choices; an even share is moe_k / n_experts)"
    )

    def dense(n_head, sw):  # the dense model with n_head heads trained with sw's positions and initialisation
        return next((s for s in summary.values() if s["cfg"].n_experts == 1 and s["cfg"].n_head == n_head
                     and (s["cfg"].pos, s["cfg"].init) == (sw["cfg"].pos, sw["cfg"].init)), None)  # fmt: skip

    for name, sw in summary.items():
        d8, d2 = dense(8, sw), dense(2, sw)
        if sw["cfg"].n_experts == 1 or not (d8 or d2):
            continue
        print()
        if d8:
            gap = 100 * (sw["val"] - d8["val"]) / d8["val"]
            print(
                f"{name} vs dense 8-head: val loss {gap:+.2f}% (target within 1%: {'met' if gap <= 1 else 'missed'}),"
                f" attention MACs {100 * sw['macs'] / d8['macs']:.0f}% (target <= 50%), memory "
                f"{100 * sw['mem'] / d8['mem']:.0f}% (target <= 35%),"
                f" time per iteration {100 * sw['ms'] / d8['ms']:.0f}%,"
                f" peak memory {100 * sw['mb'] / d8['mb']:.0f}% (whole process)"
            )
        if d2:
            margin, spread = d2["val"] - sw["val"], max(sw["spread"], d2["spread"])
            print(
                f"{name} vs dense 2-head: val loss {abs(margin):.4f} {'lower' if margin > 0 else 'higher'}; it "
                f"{'beats' if margin > spread else 'does not beat'}"
                f" it by more than the seed spread ({spread:.4f}, the larger of the two)"
            )
    if args.usage_interval and args.usage_model in results:
        usage = results[args.usage_model][0]["usage"]
        path = os.path.join(ROOT, "out", "bench_switchhead_moe") if args.quick else PICTURES
        usage_picture(usage, summary[args.usage_model]["cfg"], os.path.join(path, "switchhead_expert_usage.png"))


if __name__ == "__main__":
    main()
