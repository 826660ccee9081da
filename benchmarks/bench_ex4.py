"""
bench_ex4.py: the numbers behind ex4_mqa_swiglu.py, printed as Markdown tables for RESULTS.md.

Eight parts; `all` runs them in turn. Every table starts with the machine (CPU, threads, torch version).

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
  kv         Against the number of key/value heads (1, 2, 3, 6 of 6 heads of 64): one attention layer's forward and
             forward+backward time (ex4.attention, the fused kernel with enable_gqa) and KV-cache bytes at T = 1k to
             8k; then generation tokens/s and KV-cache bytes of a 6-layer, 384-wide model (random weights), 256 new
             tokens with the cache, batch 1 and 8. The variants are interleaved, each cell the median of --kv_reps.
  additive   Peak memory and time of one attention layer (ex4's 4 heads of 32) with additive scores, made in query
             blocks as ex4 does and in one block, against scaled_dot written out, T = 256 to 2048.
  variants   TinyShakespeare, each run a subprocess (common.run) in out/bench_ex4/variants/<run>: ex4 at ex1's
             settings (2000 iterations, lr 1e-3) and architecture for MHA, GQA with 2 groups and MQA; then ex4's
             defaults and each new switch alone (--score, --pos, --mlp). Val loss, parameters, ms/iter, the samples
             of the position schemes, and a picture of the val losses.
  flex       ex4's blocked window against PyTorch's FlexAttention (flex_attention with a sliding-window block mask,
             torch.compile'd), forward under no_grad, T = 4k to 16k, W = 128 to 1024, B=1, 6 heads of 64, float32; the
             two outputs compared in every cell. Then forward+backward of the blocked window against full causal flash
             attention at T=8192, W=256 (FlexAttention has no backward on the CPU). Targets: ex4 at least as fast as
             FlexAttention in every cell, and forward+backward >= 5x faster than full causal attention.
  generate   Greedy generation, batch 1, with ex4's KV cache (ex4's GPT set to GPT-2's architecture) against Hugging
             Face's GPT2LMHeadModel.generate(use_cache=True), random weights, GPT-2's vocabulary, at 4 layers x 128 and
             12 layers x 768 (GPT-2 small's shape): tokens/s of each, interleaved. Target: ex4 at least as fast at both.
             Then one token's matrix-vector products with the weights stored (out, in) and (in, out).

Peak memory. CUDA: torch.cuda.max_memory_allocated over the call. CPU: each (variant, length) runs in a fresh
process that first warms up on a short sequence, then reads its peak resident set size (getrusage ru_maxrss)
before and after the call; the difference is the extra memory the call needed at its peak: inputs are already
there, gradients, saved activations and temporaries count. It is the operating system's view (pages touched),
rounded to what the allocator asked for, accurate to a few MB: fine for ratios of 20x, not for small differences.
Forward is measured under no_grad (inference), forward+backward with gradients (training). The additive part runs
its processes with MALLOC_MMAP_THRESHOLD_=65536, so that freed blocks go back to the system (see bench_additive).

Run on a quiet machine: the runs are timed one after another, so other work on the machine skews the comparison
(the iteration at which each training run reaches the target does not depend on load). On 2 CPU cores:
  python benchmarks/bench_ex4.py all                 the eight parts: about 30 minutes for the first three, +kv, ...
  python benchmarks/bench_ex4.py attention           (--lengths 512,1024,... --window 256 --max_gb 16)
  python benchmarks/bench_ex4.py cache               (--gen_tokens 1000 --gen_layers 2)
  python benchmarks/bench_ex4.py train               (--png benchmarks/pictures/ex4_train_curves.png)
  python benchmarks/bench_ex4.py kv --threads 1           14 minutes on a busy machine (--kv_lengths, --kv_reps 5)
  python benchmarks/bench_ex4.py additive --threads 1     8 minutes on a busy machine (--additive_lengths 256,...)
  python benchmarks/bench_ex4.py variants --threads 1     about 75 minutes on a busy machine (--seeds 1337,1,2)
  python benchmarks/bench_ex4.py flex --threads 1         5 minutes on a busy machine (--flex_lengths, --flex_windows)
  python benchmarks/bench_ex4.py generate --hf_reps 9    6 minutes (--threads 1, --hf_sizes, --hf_tokens 200)
  python benchmarks/bench_ex4.py all --quick         a check of the script itself: tiny sizes, a few minutes
Options: --threads N (torch threads; default all cores), --device cpu|cuda (attention, cache, kv, flex and generate),
--data PATH (train and variants: the text, when data/tinyshakespeare.txt is missing and there is no network).
"""

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import ex4_mqa_swiglu as ex4  # noqa: E402
from common import PICTURES, machine, read_log, run, table  # noqa: E402

VARIANTS = {  # name -> function of q, k, v (B, heads, T, head_size) and the window
    "full explicit": lambda q, k, v, W: ex4.attention(q, k, v, None, flash=False),
    "full flash": lambda q, k, v, W: ex4.attention(q, k, v, None, flash=True),
    "window mask explicit": lambda q, k, v, W: ex4.attention(q, k, v, window_mask(q, W), flash=False),
    "window mask flash": lambda q, k, v, W: ex4.attention(q, k, v, window_mask(q, W), flash=True),
    "window blocked explicit": lambda q, k, v, W: ex4.blocked_window_attention(q, k, v, W, flash=False),
    "window blocked flash": lambda q, k, v, W: ex4.blocked_window_attention(q, k, v, W, flash=True),
}
SCORES = {  # the additive part: Bahdanau's scores, in ex4's query blocks and (what the blocks avoid) in one block
    "full additive": lambda q, k, v, W: additive(q, k, v),
    "full additive, one block": lambda q, k, v, W: additive(q, k, v, one_block=True),
}
QUADRATIC_EXPLICIT = ("full explicit", "window mask explicit", "full additive")  # these hold T x T scores per head


def additive(q, k, v, one_block=False):
    """Causal attention with additive scores w.tanh(q_t + k_j), w a vector per head as in ex4's layer. one_block: the
    whole (T, T, hs) sum at once instead of ex4.ADDITIVE_BLOCK numbers at a time (set in the worker process only)."""
    if one_block:
        ex4.ADDITIVE_BLOCK = q.size(0) * q.size(1) * q.size(2) * k.size(2) * q.size(3)
    w = torch.full((q.size(1), q.size(3)), 0.02, device=q.device, requires_grad=q.requires_grad)
    return ex4.attention(q, k, v, None, flash=False, score_vector=w)


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
    fn = {**VARIANTS, **SCORES}[a.variant]
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

    small = inputs(min(a.T // 4, 2 * a.window))  # warm up: libraries, kernels, the allocator; not counted, so short
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


def need_gb(name, T, H, hs):
    """About the memory a variant's forward+backward needs, GB: an explicit one holds about four T x T float tensors per
    head; additive in one block about three (T, T, hs) ones."""
    if name == "full additive, one block":
        return 3 * H * T * T * hs * 4 / 2**30
    return 4 * H * T * T * 4 / 2**30 if name in QUADRATIC_EXPLICIT else 0.0


def measure(a, name, T, H, hs, n_kv_head, window, env=None):
    """One variant at one length in a fresh process (attention_worker, environment env): its times and peak memory, or
    None if skipped (too much memory) or failed. The worker warms up at min(T/4, 2 window)."""
    gb = need_gb(name, T, H, hs)
    if gb > a.max_gb:
        print(f"T={T:6d} {name:24s} skipped: needs about {gb:.0f} GB (--max_gb {a.max_gb})", flush=True)
        return None
    cmd = [sys.executable, __file__, "_attention", "--variant", name, "--T", str(T), "--window", str(window),
           "--heads", str(H), "--head_size", str(hs), "--n_kv_head", str(n_kv_head), "--device", a.device,
           "--threads", str(a.threads or 0), "--reps", str(a.reps), "--budget_s", str(a.budget_s)]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        print(f"T={T:6d} {name:24s} failed:\n{p.stderr[-2000:]}", flush=True)
        return None
    r = json.loads(p.stdout.strip().splitlines()[-1])
    print(
        f"T={T:6d} {name:24s} fwd {r['fwd_ms']:9.1f} ms {r['fwd_mb']:8.1f} MB | fwd+bwd "
        f"{r['fwd_bwd_ms']:9.1f} ms {r['fwd_bwd_mb']:8.1f} MB",
        flush=True,
    )
    return r


def bench_attention(a):
    W, H, hs = a.window, a.heads, a.head_size
    print(
        f"## Attention, B=1, {H} heads of {hs}, {a.n_kv_head} key/value heads, window {W}, {a.device}\n\nmachine: "
        f"{machine(a.threads)}\n"
    )
    results = {}
    for T in a.lengths:
        for name in a.variants:
            results[name, T] = measure(a, name, T, H, hs, a.n_kv_head, W)
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
                n_layer=L, n_head=H, n_embd=C, block_size=bs, n_kv_head=kv, window=window, pos="rope", mlp="swiglu"
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


OFF = ["--n_kv_head", "4", "--mlp", "gelu", "--pos", "learned", "--window", "0"]


def train_runs(a):
    w = str(a.train_window)
    runs = [
        ("ex1", "ex1_gpt.py", []),
        ("ex4, all off", "ex4_mqa_swiglu.py", OFF),
        ("ex4, MQA only", "ex4_mqa_swiglu.py", [*OFF, "--n_kv_head", "1"]),
        ("ex4, SwiGLU only", "ex4_mqa_swiglu.py", [*OFF, "--mlp", "swiglu"]),
        ("ex4, RoPE only", "ex4_mqa_swiglu.py", [*OFF, "--pos", "rope"]),
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
        *(["--data", a.data] if a.data else []),
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
            *(["--data", a.data] if a.data else []),
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
    plt = pyplot()
    if plt is None:
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
    save(fig, path)


# ----------------------------------------------------------------------------------------------------------
# Key/value heads: attention time, KV-cache bytes and generation speed against n_kv_head


def load():
    return "load average {:.1f} / {:.1f} / {:.1f} (1 / 5 / 15 min) at the start".format(*os.getloadavg())


def timed(device, f, *args):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    f(*args)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def interleaved(names, reps, measure_once):
    """measure_once(name) -> seconds, called reps times per name, the names in turn and their order reversed every
    other round, so that a change of load on the machine hits every name alike; the median of each name's times."""
    times = {n: [] for n in names}
    for rep in range(reps):
        for n in names if rep % 2 == 0 else names[::-1]:
            times[n].append(measure_once(n))
    return {n: statistics.median(t) for n, t in times.items()}


def bench_kv(a):
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    H, hs = a.heads, a.head_size
    kvs = [n for n in range(H, 0, -1) if H % n == 0]  # MHA first: the rows the others are compared with
    print(f"## Key/value heads: attention time and KV-cache bytes, B=1, {H} query heads of {hs}, causal, {a.device}\n\n"
          f"machine: {machine(a.threads)}, {load()}\n\nex4.attention(q, k, v): the fused scaled_dot_product_attention "
          "with enable_gqa (on the CPU its flash kernel, which reads each key/value head for its group of query "
          f"heads: nothing is repeated). Median of {a.kv_reps} calls per cell, the variants interleaved; the KV "
          "cache of one layer holding T tokens.\n")  # fmt: skip
    g = torch.Generator(device=device).manual_seed(0)
    att, rows = {}, []
    for T in a.kv_lengths:
        q = torch.randn(1, H, T, hs, generator=g, device=device, requires_grad=True)
        kv = {n: [torch.randn(1, n, T, hs, generator=g, device=device, requires_grad=True) for _ in "kv"] for n in kvs}

        def fwd(n):
            with torch.no_grad():
                ex4.attention(q, *kv[n])

        def fwd_bwd(n):
            q.grad = kv[n][0].grad = kv[n][1].grad = None
            ex4.attention(q, *kv[n]).sum().backward()

        for n in kvs:  # warm up
            fwd(n), fwd_bwd(n)
        ms = {f: interleaved(kvs, a.kv_reps, lambda n: 1000 * timed(device, f, n)) for f in (fwd, fwd_bwd)}
        for n in kvs:
            cache = ex4.KVCache(T)
            cache.update(*(t.detach() for t in kv[n]), torch.arange(T, device=device).unsqueeze(0))
            att[T, n] = ms[fwd][n], ms[fwd_bwd][n], cache.nbytes()
            f, b, c = att[T, n]
            rows.append([T, f"{n} ({mqa_name(n, H)})", f"{c / 2**20:.2f} MiB", f"{f:.1f}", f"{f / ms[fwd][H]:.2f}",
                         f"{b:.1f}", f"{b / ms[fwd_bwd][H]:.2f}"])  # fmt: skip
            print(f"T={T:5d} kv heads {n}: fwd {f:8.1f} ms | fwd+bwd {b:8.1f} ms | cache {c / 2**20:.2f} MiB")
    print()
    table(["T", "kv heads", "KV cache, 1 layer", "forward ms", f"x of {H}", "fwd+bwd ms", f"x of {H}"], rows)

    # generation with the cache, the same model but for n_kv_head
    L, C, bs, n_new = a.kv_layers, H * hs, a.gen_block_size, a.kv_tokens
    print(f"## Key/value heads: generation, {L} layers, {H} heads of {hs} ({C} wide), SwiGLU, RoPE, block_size {bs}, "
          f"random weights, a {a.gen_prompt}-token prompt, {n_new} new tokens with the KV cache, float32, "
          f"{a.device}\n\n"
          f"machine: {machine(a.threads)}, {load()}\n\ntok/s counts every row of the batch; median of {a.kv_reps} "
          f"generations per cell, the variants interleaved. The cache holds block_size slots per layer from the "
          "start (KVCache allocates them on the prompt).\n")  # fmt: skip
    models = {}
    for n in kvs:
        torch.manual_seed(0)
        cfg = ex4.Config(n_layer=L, n_head=H, n_embd=C, block_size=bs, n_kv_head=n, pos="rope", mlp="swiglu")
        models[n] = ex4.GPT(cfg, 65).to(device).eval()
    gen, rows = {}, []
    for B in (1, a.kv_batch):
        prompt = torch.randint(65, (B, a.gen_prompt), generator=torch.Generator().manual_seed(B)).to(device)

        def generate(n):
            torch.manual_seed(1)
            return timed(device, models[n].generate, prompt, n_new, 1.0, 0, True)

        for n in kvs:  # warm up
            models[n].generate(prompt, 5)
        secs = interleaved(kvs, a.kv_reps, generate)
        for n in kvs:
            caches = [ex4.KVCache(bs) for _ in models[n].blocks]  # what generate() allocates
            with torch.no_grad():
                models[n](prompt, caches=caches)
            tok_s = B * n_new / secs[n]
            gen[B, n] = tok_s, sum(c.nbytes() for c in caches)
            rows.append([B, f"{n} ({mqa_name(n, H)})", f"{models[n].num_params() / 1e6:.2f}M",
                         f"{gen[B, n][1] / 2**20:.1f} MiB", f"{tok_s:.0f}", f"{secs[H] / secs[n]:.2f}"])  # fmt: skip
            print(f"batch {B} kv heads {n}: {tok_s:7.1f} tok/s | cache {gen[B, n][1] / 2**20:.1f} MiB", flush=True)
    print()
    table(["batch", "kv heads", "parameters", f"KV cache, {L} layers", "tok/s", f"x of {H}"], rows)
    plot_kv(att, gen, a, kvs)


def mqa_name(n, H):
    return "MHA" if n == H else "MQA" if n == 1 else "GQA"


def plot_kv(att, gen, a, kvs):
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for c, T in enumerate(a.kv_lengths):
        axes[0].plot(kvs, [att[T, n][1] for n in kvs], marker="o", color=f"C{c}", label=f"T={T}")
        axes[0].plot(kvs, [att[T, n][0] for n in kvs], ":", marker="o", color=f"C{c}")
    axes[0].set(xlabel=f"key/value heads (of {a.heads} query heads)", ylabel="ms", yscale="log",
                title=f"One attention layer, B=1, {a.heads} heads of {a.head_size}\nsolid: forward+backward, dotted: "
                "forward")  # fmt: skip
    for B in (1, a.kv_batch):
        axes[1].plot(kvs, [gen[B, n][0] for n in kvs], marker="o", label=f"batch {B}")
    axes[1].set(xlabel="key/value heads", ylabel="generated tokens/s", ylim=(0, None),
                title=f"Generation with the KV cache, {a.kv_layers} layers")  # fmt: skip
    for ax in axes:
        ax.set_xticks(kvs)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save(fig, a.kv_png)


# ----------------------------------------------------------------------------------------------------------
# Additive scores: memory of the query blocks


def bench_additive(a):
    cfg = ex4.Config()  # ex4's layer: n_head heads of n_embd / n_head
    H, hs = cfg.n_head, cfg.n_embd // cfg.n_head
    names = ["full explicit", "full additive", "full additive, one block"]
    print(f"## Additive scores: one causal attention layer, B=1, {H} heads of {hs}, {a.device}\n\nmachine: "
          f"{machine(a.threads)}, {load()}\n\nfull explicit: scaled_dot written out (softmax(QK^T/sqrt(hs))V); full "
          f"additive: w.tanh(q_t + k_j) as ex4 makes it, {ex4.ADDITIVE_BLOCK:,} numbers of the (T, T, hs) sum at a "
          "time, remade in the backward pass; one block: the whole sum at once. Peak memory and time as in the "
          "attention part (a fresh process per cell, best of the timed calls), but with MALLOC_MMAP_THRESHOLD_=65536: "
          "glibc then maps every allocation over 64 KiB on its own and returns it when freed, so the peak resident "
          "size follows the tensors alive (by default glibc raises that threshold after the first free and keeps "
          "freed blocks in its heap, where the blocks' many same-sized temporaries fragment it and the peak grows "
          "as if they were all alive).\n")  # fmt: skip
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 16)}
    res = {(n, T): measure(a, n, T, H, hs, H, 32, env) for T in a.additive_lengths for n in names}  # warm-up T: 64
    rows = []
    for T in a.additive_lengths:
        cells = [T, f"{H * T * T * 4 / 2**20:.0f}", f"{H * T * T * hs * 4 / 2**20:,.0f}"]
        for n in names:
            r = res[n, T]
            cells.append("skipped" if r is None else f"{r['fwd_bwd_mb']:.0f} MB, {r['fwd_bwd_ms']:.0f} ms")
        rows.append(cells)
    print()
    table(["T", "T x T scores, MB", "(T, T, hs) sum, MB", *(f"{n}: fwd+bwd peak, time" for n in names)], rows)


# ----------------------------------------------------------------------------------------------------------
# Sliding window: ex4's blocked window against PyTorch's FlexAttention


def bench_flex(a):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    H, hs, reps = a.heads, a.head_size, a.flex_reps
    print(f"## Sliding window: ex4's blocked window against FlexAttention, B=1, {H} heads of {hs}, float32, "
          f"{a.device}\n\nmachine: {machine(a.threads)}, {load()}\n\nex4: ex4.blocked_window_attention(q, k, v, W) "
          "(flash, default blocks). FlexAttention: torch.compile(flex_attention) with create_block_mask(sliding "
          "window causal mask_mod), the block mask made once per cell and not timed. Forward under no_grad; median "
          f"of {reps} calls per cell, the two interleaved, after two warm-up calls (the first compiles, or loads "
          "inductor's cache from disk: its seconds are shown). same: torch.allclose of the two outputs (atol 1e-5, "
          "rtol 1e-4).\n")  # fmt: skip
    g = torch.Generator(device=device).manual_seed(0)
    rows, speedups = [], []
    for T in a.flex_lengths:
        q, k, v = (torch.randn(1, H, T, hs, generator=g, device=device) for _ in "qkv")
        for W in a.flex_windows:
            torch._dynamo.reset()  # a fresh compilation per cell, so dynamo's recompile limit is never reached
            block_mask = create_block_mask(lambda b, h, i, j: (j <= i) & (i - j < W), None, None, T, T, device=device)
            flex = torch.compile(flex_attention, dynamic=False)
            fns = {"ex4": lambda: ex4.blocked_window_attention(q, k, v, W),
                   "flex": lambda: flex(q, k, v, block_mask=block_mask)}  # fmt: skip
            with torch.no_grad():
                compile_s = timed(device, fns["flex"])
                out = {n: f() for n, f in fns.items()}
                same = torch.allclose(out["ex4"], out["flex"], atol=1e-5, rtol=1e-4)
                diff = (out["ex4"] - out["flex"]).abs().max().item()
                ms = interleaved(list(fns), reps, lambda n: 1000 * timed(device, fns[n]))
            speedups.append(ms["flex"] / ms["ex4"])
            rows.append([T, W, f"{ms['ex4']:.1f}", f"{ms['flex']:.1f}", f"{speedups[-1]:.2f}x",
                         "yes" if same else "NO", f"{diff:.1e}", f"{compile_s:.1f}"])  # fmt: skip
            print(f"T={T:6d} W={W:5d} ex4 {ms['ex4']:8.1f} ms | flex {ms['flex']:8.1f} ms | {speedups[-1]:.2f}x | "
                  f"same {same} (max diff {diff:.1e}) | compile {compile_s:.1f} s", flush=True)  # fmt: skip
    print()
    table(["T", "W", "ex4 blocked, ms", "FlexAttention compiled, ms", "ex4 / Flex speed (Flex ms / ex4 ms)", "same",
           "max abs diff", "Flex first call (compile), s"], rows)  # fmt: skip
    print(
        f"target: ex4's window at least as fast as compiled FlexAttention in the forward pass in every cell: "
        f"{'met' if min(speedups) >= 1 else 'NOT met'} (slowest cell {min(speedups):.2f}x)\n"
    )

    # training: FlexAttention has no backward on the CPU, so ex4's window against full causal attention
    T, W = (8192 if 8192 in a.flex_lengths else max(a.flex_lengths)), a.window
    q, k, v = (torch.randn(1, H, T, hs, generator=g, device=device, requires_grad=True) for _ in "qkv")
    fns = {"ex4 blocked window": lambda: ex4.blocked_window_attention(q, k, v, W),
           "full causal flash": lambda: ex4.attention(q, k, v)}  # fmt: skip

    def fwd_bwd(name):
        q.grad = k.grad = v.grad = None
        return 1000 * timed(device, lambda: fns[name]().sum().backward())

    for n in fns:  # warm up
        fwd_bwd(n)
    ms = interleaved(list(fns), reps, fwd_bwd)
    speedup = ms["full causal flash"] / ms["ex4 blocked window"]
    try:
        block_mask = create_block_mask(lambda b, h, i, j: (j <= i) & (i - j < W), None, None, T, T, device=device)
        flex_attention(q, k, v, block_mask=block_mask)
        flex_bwd = "runs"
    except NotImplementedError as e:
        flex_bwd = f"fails: NotImplementedError: {e}"
    print(f"### Forward+backward at T={T}, W={W} (median of {reps}, interleaved)\n")
    table(["variant", "forward+backward, ms"], [[n, f"{t:.1f}"] for n, t in ms.items()])
    print(f"target: ex4's window forward+backward >= 5x faster than full causal attention (flash "
          f"scaled_dot_product_attention): {speedup:.1f}x, {'met' if speedup >= 5 else 'NOT met'}. FlexAttention with "
          f"gradients on the CPU {flex_bwd}\n")  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# Generation: ex4's KV cache against Hugging Face's generate


def bench_generate(a):
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    n_new, n_prompt, V, bs = a.hf_tokens, a.gen_prompt, a.hf_vocab, a.hf_block_size
    print(f"## Generation: ex4's KV cache against Hugging Face generate, GPT-2's architecture, vocabulary {V:,}, "
          f"block_size {bs}, random weights, batch 1, greedy, a {n_prompt}-token prompt and {n_new} new tokens, "
          f"float32, {a.device}\n\nmachine: {machine(a.threads)}, {load()}\n\nex4: GPT(Config(pos='learned', "
          "mlp='gelu', n_kv_head=n_head, bias=True, window=0)).generate(prompt, N, temperature=0, use_cache=True): "
          "GPT-2's architecture (learned positions, GELU MLP 4x wide, multi-head attention, LayerNorm and Linear "
          "biases, tied embeddings; exact GELU where GPT-2 has the tanh approximation). Hugging Face: transformers "
          f"{transformers.__version__} GPT2LMHeadModel(GPT2Config(...)).generate(prompt, do_sample=False, "
          "use_cache=True, max_new_tokens=N), its eos token unset so that both always make N tokens. Median of "
          f"{a.hf_reps} generations per cell, the two interleaved, after warm-up generations. The weights "
          "differ (each model's own random initialisation), so the tokens differ; the work per step does not."
          "\n")  # fmt: skip

    rows, ratios = [], []
    for size in a.hf_sizes:
        L, H, C = (int(x) for x in size.split("x"))
        torch.manual_seed(0)
        cfg = ex4.Config(n_layer=L, n_head=H, n_embd=C, block_size=bs, n_kv_head=H, pos="learned", mlp="gelu",
                         bias=True, window=0)  # fmt: skip
        models = {"ex4": ex4.GPT(cfg, V).to(device).eval()}
        hf_cfg = GPT2Config(vocab_size=V, n_positions=bs, n_embd=C, n_layer=L, n_head=H, bos_token_id=None,
                            eos_token_id=None)  # no eos: both always make n_new tokens  # fmt: skip
        hf = GPT2LMHeadModel(hf_cfg).to(device).eval()
        models["HF"] = hf
        prompt = torch.randint(V, (1, n_prompt), generator=torch.Generator().manual_seed(1)).to(device)
        ones = torch.ones_like(prompt)
        gen = {
            "ex4": lambda n: models["ex4"].generate(prompt, n, temperature=0, use_cache=True),
            "HF": lambda n: hf.generate(prompt, attention_mask=ones, do_sample=False, use_cache=True, max_new_tokens=n),
        }
        for name, f in gen.items():  # warm up, and both make exactly n_new tokens
            assert f(5).shape == (1, n_prompt + 5), name
            assert f(n_new).shape == (1, n_prompt + n_new), name
        times = {n: [] for n in gen}  # every generation's seconds, for the ratio of each round

        def once(n):
            times[n].append(timed(device, gen[n], n_new))
            return times[n][-1]

        secs = interleaved(list(gen), a.hf_reps, once)
        tok_s = {n: n_new / s for n, s in secs.items()}
        ratios.append(tok_s["ex4"] / tok_s["HF"])
        rounds = sorted(h / e for e, h in zip(times["ex4"], times["HF"]))
        params = sum(p.numel() for p in hf.parameters())
        rows.append([f"{L} x {C} ({H} heads)", f"{params / 1e6:.1f}M", hf.config._attn_implementation,
                     f"{tok_s['ex4']:.1f}", f"{tok_s['HF']:.1f}", f"{ratios[-1]:.2f}x",
                     f"{rounds[0]:.2f} to {rounds[-1]:.2f}"])  # fmt: skip
        print(
            f"{L} layers x {C}: ex4 {tok_s['ex4']:7.1f} tok/s | HF {tok_s['HF']:7.1f} tok/s | {ratios[-1]:.2f}x "
            f"(rounds {rounds[0]:.2f} to {rounds[-1]:.2f})",
            flush=True,
        )
    print()
    table(["layers x width", "parameters", "HF attention", "ex4 tok/s", "HF generate tok/s",
           "ex4 / HF (medians)", "ex4 / HF, each round"], rows)  # fmt: skip
    print(
        f"target: ex4 at least as fast as generate(use_cache=True) at every size: "
        f"{'met' if min(ratios) >= 1 else 'NOT met'}\n"
    )
    matvec_layouts(a, device)


def matvec_layouts(a, device):
    """Why generate() un-embeds with a transposed copy: one token's matrix-vector products at the last of --hf_sizes
    with each weight stored (out, in), as nn.Linear keeps it, and (in, out). Every layer's matrices are used in turn,
    so that they are read from memory as in generation, not from the cache."""
    L, _, C = (int(n) for n in a.hf_sizes[-1].split("x"))
    V = a.hf_vocab
    g = torch.Generator(device=device).manual_seed(0)
    shapes = [(3 * C, C), (C, C), (4 * C, C), (C, 4 * C)]  # c_attn, c_proj, c_fc, mlp's c_proj: (out, in)
    out_in = {
        f"the blocks' {4 * L} matrices": [torch.randn(s, generator=g, device=device) for _ in range(L) for s in shapes],
        f"the logits, {C} -> {V:,}": [torch.randn(V, C, generator=g, device=device)],
    }
    x = {n: torch.randn(1, n, device=device) for n in (C, 4 * C)}
    layouts = {
        "(out, in): F.linear(x, W)": lambda ws: [F.linear(x[w.size(1)], w) for w in ws],
        "(in, out): x @ W_t": lambda ws: [x[w.size(0)] @ w for w in ws],
    }
    print(f"### One token's matrix-vector products, {C} wide, ms (median of 9, interleaved)\n")
    rows = []
    for what, ws in out_in.items():
        stored = dict(zip(layouts, (ws, [w.t().contiguous() for w in ws])))  # as made, and transposed
        secs = interleaved(list(layouts), 9, lambda n: timed(device, layouts[n], stored[n]))
        rows.append([what] + [f"{1e3 * secs[n]:.2f}" for n in layouts])
    table(["weights", *layouts], rows)
    print()


# ----------------------------------------------------------------------------------------------------------
# Training: key/value heads at ex1's settings, and each new switch at ex4's


EX1_SETTINGS = ["--max_iters", "2000", "--learning_rate", "1e-3", "--min_lr", "1e-4"]  # ex1's Config, in ex4
EX1_ARCH = ["--pos", "learned", "--mlp", "gelu", "--window", "0"]
SWITCHES = [[], ["--score", "multiplicative"], ["--score", "additive", "--pos", "learned"], ["--pos", "learned"],
            ["--pos", "sinusoidal"], ["--pos", "none"], ["--mlp", "gelu"], ["--mlp", "quickgelu"]]  # fmt: skip
QUICK = ["--n_layer", "1", "--n_embd", "32", "--block_size", "16", "--max_iters", "10", "--eval_interval", "5",
         "--eval_iters", "2", "--max_new_tokens", "40"]  # fmt: skip


def variant_runs(a):
    """(group, name, flags) of every run."""
    runs = [("kv", f"{mqa_name(n, 4)} (--n_kv_head {n})", [*EX1_SETTINGS, *EX1_ARCH, "--n_kv_head", str(n)])
            for n in (4, 2, 1)]  # fmt: skip
    runs += [("switch", " ".join(f) or "ex4 defaults", f) for f in SWITCHES]
    return [r for r in runs if r[1] in ("MHA (--n_kv_head 4)", "ex4 defaults", "--pos learned")] if a.quick else runs


def bench_variants(a):
    seeds = [int(s) for s in a.seeds.split(",")]
    print(f"## Training: key/value heads, score functions, positions and MLPs on TinyShakespeare, cpu\n\nmachine: "
          f"{machine(a.threads)}, {load()}\n\nEvery run: `python ex4_mqa_swiglu.py FLAGS --device cpu --seed S "
          f"--out_dir out/bench_ex4/variants/NAME --overwrite` with OMP_NUM_THREADS={a.threads or 'unset'}, one run "
          "at a time, its output in NAME.log; the rest of ex4's defaults (evaluation every 250 iterations on 200 "
          "batches). ms/iter: the run's median. Parameters as the script counts them (without a learned position "
          "table).\n")  # fmt: skip
    res = {}
    for group, name, flags in variant_runs(a):
        for seed in seeds:
            out_dir = os.path.join(a.out_dir, "variants", re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_"))
            out_dir += f"_seed{seed}" if len(seeds) > 1 else ""
            cmd = [sys.executable, "ex4_mqa_swiglu.py", *flags, *(QUICK if a.quick else []), "--device", "cpu",
                   "--seed", str(seed), "--out_dir", out_dir, "--overwrite"]  # fmt: skip
            cmd += ["--data", a.data] if a.data else []
            text, wall, _ = run(cmd, threads=a.threads, log_path=out_dir + ".log")  # the output, sample included
            vals = [float(r["val_loss"]) for r in read_log(out_dir) if r["val_loss"]]
            ms = float(re.search(r"median ([\d.]+) ms/iter", text)[1])
            sample = text.split("--- sample 1 ---\n", 1)[1][: a.sample_chars]
            res.setdefault((group, name), []).append((vals[-1], ms, wall, sample))
            print(f"  val {vals[-1]:.4f} | {ms:.1f} ms/iter | {wall:.0f} s", flush=True)
        weights = torch.load(os.path.join(out_dir, "best.pt"), map_location="cpu", weights_only=True)["model"]
        params = sum(w.numel() for k, w in weights.items() if k not in ("lm_head.weight", "wpe.weight"))  # tied: wte
        attn = sum(w.numel() for k, w in weights.items() if k.startswith("blocks.0.attn."))
        res[group, name].append((params, attn))
    print()
    titles = {
        "kv": "ex1's settings (2000 iterations, lr 1e-3) and architecture (--pos learned --mlp gelu), but for the "
        "key/value heads",
        "switch": "ex4's defaults (700 iterations, lr 3e-3; MQA, SwiGLU, RoPE), one switch changed",
    }
    for group, title in titles.items():
        print(f"### {title}\n")
        rows = []
        for (g, name), runs in res.items():
            if g != group:
                continue
            *runs, (params, attn) = runs
            val = statistics.mean(r[0] for r in runs)
            spread = f" ({', '.join(f'{r[0]:.4f}' for r in runs)})" if len(runs) > 1 else ""
            ms = statistics.median(r[1] for r in runs)
            rows.append([name, f"{val:.4f}{spread}", f"{params:,}", f"{attn:,}", f"{ms:.1f}"])
        table(["run", "val loss" + (f", mean of seeds {a.seeds}" if len(seeds) > 1 else ""), "parameters",
               "attention parameters per layer", "ms/iter"], rows)  # fmt: skip
    print("### Samples (the first characters of each run's final sample, first seed)\n")
    for (group, name), runs in res.items():
        if group == "switch" and name in ("ex4 defaults", "--pos learned", "--pos sinusoidal", "--pos none"):
            print(f"{name}{' (rope)' if name == 'ex4 defaults' else ''}:\n\n```\n{runs[0][3]}\n```\n")
    plot_variants(res, a.variants_png)


def plot_variants(res, path):
    plt = pyplot()
    if plt is None:
        return
    names = [f"{name}" for (_, name) in res]
    vals = [statistics.mean(r[0] for r in runs[:-1]) for runs in res.values()]
    colors = ["tab:blue" if g == "kv" else "tab:orange" for g, _ in res]
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(names) + 1.2))
    ax.barh(range(len(names)), vals, color=colors)
    for i, v in enumerate(vals):
        ax.text(v, i, f" {v:.3f}", va="center", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(min(vals) - 0.1, max(vals) + 0.08)
    ax.set(xlabel="val loss", title="TinyShakespeare; blue: ex1's settings, orange: ex4's defaults, one switch changed")
    ax.grid(alpha=0.3, axis="x")
    save(fig, path)


def pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): no picture")
        return None
    return plt


def save(fig, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    print(f"saved {path}\n")


# ----------------------------------------------------------------------------------------------------------


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0].strip(), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "part",
        choices=[*PARTS, "all", "_attention"],
        help="which benchmark (_attention: internal worker)",
    )
    p.add_argument(
        "--quick", action="store_true", help="tiny sizes: checks that the script works, the numbers mean nothing"
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0: torch's default (all cores)")
    p.add_argument("--device", default="cpu", help="attention and cache parts: cpu or cuda")
    p.add_argument("--lengths", default="512,1024,2048,4096,8192,16384", help="attention: sequence lengths")
    p.add_argument("--window", type=int, default=256, help="attention, flex's forward+backward: window W")
    p.add_argument("--heads", type=int, default=6, help="query heads (attention, cache and flex)")
    p.add_argument("--head_size", type=int, default=64, help="head size (attention, cache and flex)")
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
    p.add_argument("--gen_prompt", type=int, default=24, help="cache and generate: prompt tokens")
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
    p.add_argument("--data", default="", help="train, variants: the text (default: each script's, TinyShakespeare)")
    p.add_argument("--kv_lengths", default="1024,2048,4096,8192", help="kv: sequence lengths")
    p.add_argument("--kv_reps", type=int, default=5, help="kv: repeats per cell (the median is shown)")
    p.add_argument("--kv_layers", type=int, default=6, help="kv: layers of the generating model")
    p.add_argument("--kv_tokens", type=int, default=256, help="kv: new tokens per generation")
    p.add_argument("--kv_batch", type=int, default=8, help="kv: the larger batch (the other is 1)")
    p.add_argument("--kv_png", default=os.path.join(PICTURES, "ex4_kv_heads.png"), help="kv: the picture")
    p.add_argument("--additive_lengths", default="256,512,1024,2048", help="additive: sequence lengths")
    p.add_argument("--seeds", default="1337", help="variants: seeds, comma-separated (each run once per seed)")
    p.add_argument("--sample_chars", type=int, default=300, help="variants: characters shown of each sample")
    p.add_argument("--variants_png", default=os.path.join(PICTURES, "ex4_variants.png"), help="variants: the picture")
    p.add_argument("--flex_lengths", default="4096,8192,16384", help="flex: sequence lengths")
    p.add_argument("--flex_windows", default="128,256,512,1024", help="flex: windows")
    p.add_argument("--flex_reps", type=int, default=5, help="flex: calls per cell (the median is shown)")
    p.add_argument("--hf_sizes", default="4x4x128,12x12x768", help="generate: layers x heads x width, comma-separated")
    p.add_argument("--hf_vocab", type=int, default=50257, help="generate: vocabulary (GPT-2's)")
    p.add_argument("--hf_block_size", type=int, default=1024, help="generate: block_size (GPT-2's n_positions)")
    p.add_argument("--hf_tokens", type=int, default=200, help="generate: new tokens per generation")
    p.add_argument("--hf_reps", type=int, default=5, help="generate: generations per cell (the median is shown)")
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--T", type=int, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.lengths, a.kv_lengths, a.additive_lengths, a.flex_lengths, a.flex_windows = (
        [int(x) for x in s.split(",")]
        for s in (a.lengths, a.kv_lengths, a.additive_lengths, a.flex_lengths, a.flex_windows)
    )
    a.hf_sizes = a.hf_sizes.split(",")
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
        a.kv_lengths, a.kv_reps, a.kv_layers, a.kv_tokens, a.kv_batch = [64, 128], 2, 2, 20, 4
        a.additive_lengths, a.sample_chars = [64, 128], 40
        a.flex_lengths, a.flex_windows, a.flex_reps = [256, 512], [32, 64], 2
        a.hf_sizes, a.hf_vocab, a.hf_block_size, a.hf_tokens, a.hf_reps = ["1x2x32"], 500, 128, 20, 2
        a.out_dir, a.png = os.path.join(a.out_dir, "quick"), os.path.join(a.out_dir, "quick", "curves.png")
        a.kv_png, a.variants_png = (os.path.join(a.out_dir, f"{n}.png") for n in ("kv_heads", "variants"))
    for name, part in PARTS.items():
        if a.part in (name, "all"):
            part(a)


# the parts, in the order `all` runs them
PARTS = {"attention": bench_attention, "cache": bench_cache, "train": bench_train, "kv": bench_kv,
         "additive": bench_additive, "variants": bench_variants, "flex": bench_flex,
         "generate": bench_generate}  # fmt: skip


if __name__ == "__main__":
    main()
