"""
bench_ex4.py: the numbers behind ex4_mqa_swiglu.py, printed as Markdown tables for the README.

Three parts; `all` runs them in turn. Every table starts with the machine (CPU, threads, torch version).

  attention  One attention layer, B=1, 6 heads of 64, against sequence length (512 to 16k): full causal explicit
             (softmax(QK^T)V written out), full causal flash (scaled_dot_product_attention), the sliding window as a
             mask (explicit and flash) and blocked (explicit and flash); forward and forward+backward time and peak
             memory. Target at T=8192, W=256: blocked uses >= 20x less peak memory than full explicit attention and
             runs forward+backward >= 5x faster than full causal flash attention.
  cache      KV-cache bytes and generation tokens/s with and without the cache, for MHA, GQA and MQA, with and
             without a window: a 2-layer, 6-head, 384-wide RoPE model (random weights: speed does not depend on
             them), block_size 1024, window 256, a 24-token prompt and 1,000 new tokens. Target: the cache >= 5x
             faster. The cached and recomputed texts are compared (the same seed must give the same tokens).
  train      TinyShakespeare at the ex1 CPU model size: ex1 at its defaults, then ex4 with every switch off (ex1's
             architecture on ex4's schedule), each switch alone, and ex4's defaults (MQA + SwiGLU + RoPE), and all
             with a window. Every run is a subprocess writing out/bench_ex4/<run>/log.csv; val loss comes from
             there, time is the sum of the per-iteration times in log.csv (--log_interval 1), i.e. training time
             without the evaluations, which cost the same per evaluation in every run. Also the elapsed time
             including evaluations, from each run's printed eval lines. Target: ex4's defaults reach val 1.89
             (ex1's 2000-iteration result) in at most 40% of ex1's time. Saves val loss against time as a PNG
             (needs matplotlib: pip install matplotlib).

Peak memory. CUDA: torch.cuda.max_memory_allocated over the call. CPU: each (variant, length) runs in a fresh
process that first warms up on a short sequence, then reads its peak resident set size (getrusage ru_maxrss)
before and after the call; the difference is the extra memory the call needed at its peak: inputs are already
there, gradients, saved activations and temporaries count. It is the operating system's view (pages touched),
rounded to what the allocator asked for, accurate to a few MB: fine for ratios of 20x, not for small differences.
Forward is measured under no_grad (inference), forward+backward with gradients (training).

Run on a quiet machine: the runs are timed one after another, so other work on the machine skews the comparison
(the iteration at which each training run reaches the target does not depend on load). On 2 CPU cores:
  python benchmarks/bench_ex4.py all                 about 30 minutes: attention ~5, cache ~10, train ~13
  python benchmarks/bench_ex4.py attention           (--lengths 512,1024,... --window 256 --max_gb 16)
  python benchmarks/bench_ex4.py cache               (--gen_tokens 1000 --gen_layers 2)
  python benchmarks/bench_ex4.py train               (--png benchmarks/pictures/ex4_train_curves.png)
  python benchmarks/bench_ex4.py all --quick         a check of the script itself: tiny sizes, about a minute
Options: --threads N (torch threads; default all cores), --device cpu|cuda (attention and cache parts).
"""

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import ex4_mqa_swiglu as ex4  # noqa: E402
from common import PICTURES, machine, read_log, table  # noqa: E402

VARIANTS = {  # name -> function of q, k, v (B, heads, T, head_size) and the window
    "full explicit": lambda q, k, v, W: ex4.attention(q, k, v, None, flash=False),
    "full flash": lambda q, k, v, W: ex4.attention(q, k, v, None, flash=True),
    "window mask explicit": lambda q, k, v, W: ex4.attention(q, k, v, window_mask(q, W), flash=False),
    "window mask flash": lambda q, k, v, W: ex4.attention(q, k, v, window_mask(q, W), flash=True),
    "window blocked explicit": lambda q, k, v, W: ex4.blocked_window_attention(q, k, v, W, flash=False),
    "window blocked flash": lambda q, k, v, W: ex4.blocked_window_attention(q, k, v, W, flash=True),
}
QUADRATIC_EXPLICIT = ("full explicit", "window mask explicit")  # these hold T x T scores per head


def window_mask(q, W):
    pos = torch.arange(q.size(-2), device=q.device)
    return ex4.window_mask(pos, pos, W)


# ----------------------------------------------------------------------------------------------------------
# Attention: time and peak memory against sequence length


def peak_mb(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB on Linux, bytes on macOS
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def attention_worker(a):
    """One variant at one length in this process; prints one JSON line."""
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    fn = VARIANTS[a.variant]
    g = torch.Generator(device=device).manual_seed(0)

    def inputs(T):
        shapes = [(1, a.heads, T, a.head_size)] + [(1, a.n_kv_head, T, a.head_size)] * 2
        return [torch.randn(s, generator=g, device=device, requires_grad=True) for s in shapes]

    def fwd(q, k, v):
        with torch.no_grad():
            fn(q, k, v, a.window)

    def fwd_bwd(q, k, v):
        for t in (q, k, v):
            t.grad = None
        fn(q, k, v, a.window).sum().backward()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    small = inputs(min(a.T, 2 * a.window))  # warm up: libraries, kernels, the allocator; not counted
    fwd(*small), fwd_bwd(*small)
    del small
    q, k, v = inputs(a.T)
    out, base = (
        {},
        peak_mb(device),
    )  # CPU: the peak so far never goes down, so forward+backward's is measured from here too
    for name, f in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated() / 2**20
        sync()
        t0 = time.perf_counter()
        f(q, k, v)
        sync()
        first = time.perf_counter() - t0
        out[f"{name}_mb"] = peak_mb(device) - base
        times = [first]  # the first call is the warm-up at this length; time more calls when they are short
        while len(times) < a.reps and sum(times) < a.budget_s:
            t0 = time.perf_counter()
            f(q, k, v)
            sync()
            times.append(time.perf_counter() - t0)
        out[f"{name}_ms"] = 1000 * (min(times[1:]) if len(times) > 1 else first)
    print(json.dumps(out))


def bench_attention(a):
    W, H, hs = a.window, a.heads, a.head_size
    print(
        f"## Attention, B=1, {H} heads of {hs}, {a.n_kv_head} key/value heads, window {W}, {a.device}\n\nmachine: "
        f"{machine(a.threads)}\n"
    )
    results = {}
    for T in a.lengths:
        for name in a.variants:
            need_gb = (
                4 * H * T * T * 4 / 2**30
            )  # explicit forward+backward holds about four T x T float tensors per head
            if name in QUADRATIC_EXPLICIT and need_gb > a.max_gb:
                results[name, T] = None
                print(f"T={T:6d} {name:24s} skipped: needs about {need_gb:.0f} GB (--max_gb {a.max_gb})", flush=True)
                continue
            cmd = [sys.executable, __file__, "_attention", "--variant", name, "--T", str(T), "--window", str(W),
                   "--heads", str(H), "--head_size", str(hs), "--n_kv_head", str(a.n_kv_head), "--device", a.device,
                   "--threads", str(a.threads or 0), "--reps", str(a.reps), "--budget_s", str(a.budget_s)]  # fmt: skip
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode != 0:
                print(f"T={T:6d} {name:24s} failed:\n{p.stderr[-2000:]}", flush=True)
                results[name, T] = None
                continue
            r = results[name, T] = json.loads(p.stdout.strip().splitlines()[-1])
            print(
                f"T={T:6d} {name:24s} fwd {r['fwd_ms']:9.1f} ms {r['fwd_mb']:8.1f} MB | fwd+bwd "
                f"{r['fwd_bwd_ms']:9.1f} ms {r['fwd_bwd_mb']:8.1f} MB",
                flush=True,
            )
    print()
    for key, title, fmt in (
        ("ms", "time, ms: forward / forward+backward", "{:.1f}"),
        ("mb", "peak memory, MB: forward / forward+backward", "{:.0f}"),
    ):
        print(f"### Attention {title}\n")
        rows = []
        for T in a.lengths:
            cells = []
            for name in a.variants:
                r = results.get((name, T))
                cells.append(
                    "skipped" if r is None else f"{fmt.format(r['fwd_' + key])} / {fmt.format(r['fwd_bwd_' + key])}"
                )
            rows.append([T, *cells])
        table(["T", *a.variants], rows)
    T = 8192 if 8192 in a.lengths else max(a.lengths)
    full_x, full_f = results.get(("full explicit", T)), results.get(("full flash", T))
    for name in ("window blocked flash", "window blocked explicit"):
        b = results.get((name, T))
        if b and full_x and full_f:
            mem = full_x["fwd_bwd_mb"] / max(b["fwd_bwd_mb"], 1e-9)
            speed = full_f["fwd_bwd_ms"] / b["fwd_bwd_ms"]
            mem_met = "met" if mem >= 20 else "NOT met"
            speed_met = "met" if speed >= 5 else "NOT met"
            print(
                f"T={T}, W={W}, {name}: {mem:.1f}x less peak memory than full explicit (target >= 20x: {mem_met}), "
                f"forward+backward {speed:.1f}x faster than full causal flash (target >= 5x: {speed_met})"
            )
    print()


# ----------------------------------------------------------------------------------------------------------
# KV cache: bytes and generation speed


def bench_cache(a):
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    H, C, L, bs, W = a.heads, a.heads * a.head_size, a.gen_layers, a.gen_block_size, a.gen_window
    print(f"## Generation, {L} layers, {H} heads of {a.head_size}, block_size {bs}, {a.gen_prompt}-token prompt, "
          f"{a.gen_tokens} new tokens, float32, {a.device}\n\nmachine: {machine(a.threads)}\n")  # fmt: skip
    rows = []
    for window in (0, W):
        for kv, label in ((H, "MHA"), (2, "GQA"), (1, "MQA")):
            cfg = ex4.Config(
                n_layer=L, n_head=H, n_embd=C, block_size=bs, n_kv_head=kv, window=window, rope=True, mlp="swiglu"
            )
            torch.manual_seed(0)
            model = ex4.GPT(cfg, 65).to(device).eval()
            prompt = torch.randint(65, (1, a.gen_prompt), device=device)
            res = {}
            for use_cache in (True, False):
                model.generate(prompt, 5, use_cache=use_cache)  # warm-up
                torch.manual_seed(1)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                out = model.generate(prompt, a.gen_tokens, temperature=1.0, top_k=0, use_cache=use_cache)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                res[use_cache] = (a.gen_tokens / (time.perf_counter() - t0), out)
            slots = window or bs
            caches = [ex4.KVCache(slots) for _ in model.blocks]  # what generate() allocates
            with torch.no_grad():
                model(prompt, caches=caches)
            cache_bytes = sum(c.nbytes() for c in caches)
            same = torch.equal(res[True][1], res[False][1])
            speedup = res[True][0] / res[False][0]
            name = f"{label} ({kv} kv head{'s' if kv > 1 else ''})" + (f", window {window}" if window else "")
            rows.append(
                [
                    name,
                    f"{cache_bytes / 2**10:,.0f} KiB ({slots} slots)",
                    f"{res[True][0]:.0f}",
                    f"{res[False][0]:.1f}",
                    f"{speedup:.1f}x",
                    "yes" if same else "NO",
                ]
            )
            print(
                f"{name:32s} cache {cache_bytes / 2**10:8.0f} KiB | cached {res[True][0]:7.1f} tok/s | recomputed "
                f"{res[False][0]:7.1f} tok/s | {speedup:5.1f}x | same tokens: {same}",
                flush=True,
            )
    print()
    table(["attention", "KV cache (all layers)", "cached tok/s", "recomputed tok/s", "speed-up", "same tokens"], rows)
    print(
        "target: cached generation >= 5x faster than recomputing: "
        + ("met" if all(float(r[4][:-1]) >= 5 for r in rows) else "NOT met")
        + "\n"
    )


# ----------------------------------------------------------------------------------------------------------
# Training: ex4's switches one at a time, against ex1


OFF = ["--n_kv_head", "4", "--mlp", "gelu", "--no-rope", "--window", "0"]


def train_runs(a):
    w = str(a.train_window)
    runs = [
        ("ex1", "ex1_gpt.py", []),
        ("ex4, all off", "ex4_mqa_swiglu.py", OFF),
        ("ex4, MQA only", "ex4_mqa_swiglu.py", [*OFF, "--n_kv_head", "1"]),
        ("ex4, SwiGLU only", "ex4_mqa_swiglu.py", [*OFF, "--mlp", "swiglu"]),
        ("ex4, RoPE only", "ex4_mqa_swiglu.py", [*OFF, "--rope"]),
        (f"ex4, window {w} only", "ex4_mqa_swiglu.py", [*OFF, "--window", w]),
        ("ex4 defaults (MQA+SwiGLU+RoPE)", "ex4_mqa_swiglu.py", []),
        (f"ex4 defaults + window {w}", "ex4_mqa_swiglu.py", ["--window", w]),
    ]
    if a.quick:
        runs = [
            (n, s, f + (["--max_iters", "40"] if s.startswith("ex1") else ["--max_iters", "20"]))
            for n, s, f in runs[:2] + runs[-2:]
        ]
    return runs


def read_run(out_dir, stdout):
    """Evaluations (iter, val, training seconds so far, elapsed seconds so far) from log.csv and the printed eval
    lines."""
    rows = read_log(out_dir)
    elapsed = {
        int(m[1]): float(m[2])
        for m in re.finditer(r"^iter (\d+) \| train [\d.]+ \| val [\d.]+ \| ([\d.]+) s$", stdout, re.M)
    }
    evals, train_s, ms = [], 0.0, []
    for r in rows:
        if r["ms_per_iter"]:
            train_s += float(r["ms_per_iter"]) / 1000
            ms.append(float(r["ms_per_iter"]))
        if r["val_loss"]:
            evals.append((int(r["iter"]), float(r["val_loss"]), train_s, elapsed.get(int(r["iter"]), float("nan"))))
    return evals, sorted(ms)[len(ms) // 2] if ms else float("nan")


def bench_train(a):
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)} if a.threads else dict(os.environ)
    common = [
        "--device",
        "cpu",
        "--log_interval",
        "1",
        "--eval_interval",
        str(a.eval_interval),
        "--eval_iters",
        str(a.eval_iters),
        "--max_new_tokens",
        "0",
    ]
    if a.quick:
        common = [
            "--device",
            "cpu",
            "--log_interval",
            "1",
            "--eval_interval",
            "10",
            "--eval_iters",
            "5",
            "--max_new_tokens",
            "0",
        ]
    print(
        "## Training on TinyShakespeare, ex1's CPU model (4 layers, 4 heads, 128 wide, block 64, batch 12), "
        f"cpu\n\nmachine: {machine(a.threads)}\n"
    )
    print(f"every run: {' '.join(common)} (time = sum of per-iteration times in log.csv, evaluations excluded)\n")
    results = {}
    for name, script, flags in train_runs(a):
        out_dir = os.path.join(a.out_dir, re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_"))
        cmd = [sys.executable, os.path.join(ROOT, script), *common, "--out_dir", out_dir, "--overwrite", *flags]
        print(f"{name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.time()
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        if p.returncode != 0:
            print(f"  failed:\n{p.stderr[-2000:]}")
            continue
        evals, median_ms = read_run(out_dir, p.stdout)
        results[name] = (evals, median_ms, time.time() - t0, flags)
        print(f"  final val {evals[-1][1]:.4f}, best {min(e[1] for e in evals):.4f}, {evals[-1][0]} iterations, "
              f"{evals[-1][2]:.1f} s training, {time.time() - t0:.1f} s in all", flush=True)  # fmt: skip
    if "ex1" not in results:
        return
    ex1_evals = results["ex1"][0]
    ex1_final, ex1_time = ex1_evals[-1][1], ex1_evals[-1][2]
    targets = [a.target] + ([ex1_final] if abs(ex1_final - a.target) > 1e-4 else [])

    def reach(evals, target):
        return next(((it, s) for it, v, s, _ in evals if v <= target), None)

    rows = []
    for name, (evals, median_ms, wall, flags) in results.items():
        cells = [
            name,
            evals[-1][0],
            f"{median_ms:.1f}",
            f"{min(e[1] for e in evals):.4f}",
            f"{evals[-1][2]:.0f}",
            f"{evals[-1][3]:.0f}",
        ]
        for t in targets:
            hit = reach(evals, t)
            cells.append(
                "not reached" if hit is None else f"iter {hit[0]}, {hit[1]:.0f} s ({100 * hit[1] / ex1_time:.0f}%)"
            )
        rows.append(cells)
    print()
    table(
        [
            "run",
            "iters",
            "ms/iter",
            "best val",
            "train s",
            "elapsed s",
            *(f"val <= {t:.4f}: when (% of ex1's {ex1_time:.0f} s)" for t in targets),
        ],
        rows,
    )
    d = results.get("ex4 defaults (MQA+SwiGLU+RoPE)")
    if d:
        hit = reach(d[0], a.target)
        ok = hit is not None and hit[1] <= 0.4 * ex1_time
        print(
            f"target: ex4's defaults reach val {a.target} in <= 40% of ex1's time ({0.4 * ex1_time:.0f} s): "
            f"{'met' if ok else 'NOT met'}\n"
        )
    plot(results, a.png, a.target)


def plot(results, path, target):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): no picture")
        return
    # against iterations (the same on any machine, however busy) and against training time
    fig, axes = plt.subplots(1, 2, figsize=(14, 5), sharey=True)
    vals = [e[1] for evals, *_ in results.values() for e in evals]
    for ax, x, xlabel in zip(axes, (0, 2), ("iteration", "training time, s (evaluations excluded)")):
        for name, (evals, *_) in results.items():
            ax.plot(
                [e[x] for e in evals],
                [e[1] for e in evals],
                marker=".",
                label=name,
                linewidth=2.5 if name == "ex1" or name.startswith("ex4 defaults (") else 1.2,
            )
        ax.axhline(target, color="gray", linestyle="--", linewidth=0.8)
        ax.set_ylim(
            min(vals) - 0.03, min(max(vals), min(vals) + 0.8)
        )  # the interesting part: the last 0.8 of the descent
        ax.set(xlabel=xlabel, ylabel="val loss", title="TinyShakespeare, ex1's CPU model size")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    print(f"saved {path}")


# ----------------------------------------------------------------------------------------------------------


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0].strip(), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "part",
        choices=["attention", "cache", "train", "all", "_attention"],
        help="which benchmark (_attention: internal worker)",
    )
    p.add_argument(
        "--quick", action="store_true", help="tiny sizes: checks that the script works, the numbers mean nothing"
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0: torch's default (all cores)")
    p.add_argument("--device", default="cpu", help="attention and cache parts: cpu or cuda")
    p.add_argument("--lengths", default="512,1024,2048,4096,8192,16384", help="attention: sequence lengths")
    p.add_argument("--window", type=int, default=256, help="attention: window W")
    p.add_argument("--heads", type=int, default=6, help="query heads (attention and cache)")
    p.add_argument("--head_size", type=int, default=64, help="head size (attention and cache)")
    p.add_argument("--n_kv_head", type=int, default=6, help="attention: key/value heads (6: ordinary multi-head)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="attention: which variants, comma-separated")
    p.add_argument(
        "--max_gb", type=float, default=16, help="attention: skip explicit T x T variants needing more memory than this"
    )
    p.add_argument("--reps", type=int, default=5, help="attention: timed calls at most (best of), after the first")
    p.add_argument(
        "--budget_s", type=float, default=2.0, help="attention: stop timing a variant after this many seconds"
    )
    p.add_argument("--gen_tokens", type=int, default=1000, help="cache: new tokens")
    p.add_argument("--gen_prompt", type=int, default=24, help="cache: prompt tokens")
    p.add_argument("--gen_layers", type=int, default=2, help="cache: layers")
    p.add_argument(
        "--gen_block_size", type=int, default=1024, help="cache: block_size (must hold the prompt and the new tokens)"
    )
    p.add_argument("--gen_window", type=int, default=256, help="cache: window of the windowed rows")
    p.add_argument("--train_window", type=int, default=32, help="train: window of the windowed runs")
    p.add_argument("--eval_interval", type=int, default=100, help="train: evaluate every this many iterations")
    p.add_argument("--eval_iters", type=int, default=200, help="train: batches per evaluation (ex1's default)")
    p.add_argument("--target", type=float, default=1.89, help="train: the val loss to reach")
    p.add_argument(
        "--out_dir", default=os.path.join(ROOT, "out", "bench_ex4"), help="train: the runs' out_dirs go under this"
    )
    p.add_argument("--png", default=os.path.join(PICTURES, "ex4_train_curves.png"), help="train: the picture")
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--T", type=int, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.lengths = [int(x) for x in a.lengths.split(",")]
    a.variants = a.variants.split(",")
    bad = [v for v in a.variants if v not in VARIANTS]
    if bad:
        p.error(f"unknown variant(s) {bad}; choose from {list(VARIANTS)}")
    if a.part == "_attention":
        return attention_worker(a)
    if a.quick:
        a.lengths, a.window, a.reps, a.budget_s = [128, 512], 32, 2, 0.2
        a.gen_tokens, a.gen_layers, a.gen_block_size, a.gen_window, a.heads, a.head_size = 40, 1, 128, 16, 4, 16
        a.n_kv_head = a.heads
        a.out_dir, a.png = os.path.join(a.out_dir, "quick"), os.path.join(a.out_dir, "quick", "curves.png")
    if a.part in ("attention", "all"):
        bench_attention(a)
    if a.part in ("cache", "all"):
        bench_cache(a)
    if a.part in ("train", "all"):
        bench_train(a)


if __name__ == "__main__":
    main()
