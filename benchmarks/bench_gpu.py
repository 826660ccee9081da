"""
bench_gpu.py: every GPU measurement of RESULTS.md in one command, at --compile --dtype bfloat16 on one H100/H200.

Prints one Markdown table per part and writes them all, with the GPU's name, the command and the date, to --md
(default benchmarks/gpu_results.md), rewritten after every part, so a run stopped midway keeps what it measured.
Parts (--parts, comma-separated; they run in this order, each within its own time budget, all within --time_limit).
Every script runs as its own process, as a user runs it, through a small runner that prints
torch.cuda.max_memory_allocated at exit; the numbers come from the scripts' own log lines.

  ex1        ex1_gpt.py at nanoGPT's GPU settings (6 layers, 6 heads, 384 wide, block 256, batch 64, dropout 0.2,
             5000 iterations, lr decay over 5000, evaluation every 250 on 200 batches): final val loss, time to
             val <= 1.47, training and wall time, ms/iter, MFU, peak GPU memory. Target: final val <= 1.47 (nanoGPT:
             1.4697 in about 3 minutes on an A100).
  ex4        ex4_mqa_swiglu.py's defaults (MQA, SwiGLU, RoPE, lr 3e-3) at the same model size, at most --ex4_iters
             iterations (2500, half of ex1's; lr decay over as many), stopped (SIGTERM) at its first evaluation with
             val <= 1.47: the run's own elapsed seconds at that evaluation (compile and evaluations included, as for
             ex1). Target: at most half of ex1's time to val <= 1.47 (ex1's whole run if it never got there). Without
             part ex1 in the same command, ex1's numbers come from its last run's output in --out_root.
  gpt2       ex3_pretrain_finetune.py at GPT-2 small (12 layers, 12 heads, 768 wide, block 1024, batch 16, GPT-2 BPE,
             --stage pretrain on 1M tokens of the Gutenberg books), 50 iterations: tokens/s and MFU (medians from
             iteration 16 on: after compilation). Target: MFU >= 40% (nanoGPT: about 37% on an A100).
  attention  One attention call, forward + backward, B=1, 12 heads of 64, bf16, T = 4k, 8k, 16k, 32k: explicit
             softmax(QK^T)V (skipped where it would not fit), fused causal (scaled_dot_product_attention), ex4's
             sliding window (1024) as a mask and blocked, FlexAttention with a sliding-window block mask (compiled),
             flash_moe's tiled_attention (tiles of 1024) against the fused kernel, and whole attention layers, 768
             wide: SwitchHead (2 heads x 4 experts, top 2) against the dense 8-head layer. CUDA-event time (the best
             of up to 5 calls after a warm-up call) and peak memory above the inputs; OOM is caught and reported.
  scripts    Every script at a GPU-sized config for 30 iterations, not compiled and compiled: ms/iter, tokens/s, MFU
             (medians from iteration 10 on), peak GPU memory and the process's wall time. Configs: ex1, ex4, ex6
             (its whole recipe, Muon included), switchhead_moe and gan_text at nanoGPT's size, ex2 at that width with
             batch 512, rnn_lm a 2-layer LSTM of 1024, ex3 and flash_moe_finetune (from scratch, 4 experts in odd
             layers) at GPT-2 small. The compiled rows of ex1, ex4 and ex3 are the runs of parts ex1, ex4 and gpt2
             when those ran in the same command (the same configs). The other six compiled runs first fill
             inductor's caches on disk, one iteration each, all at once (--warm; started with the attention part,
             whose timings are GPU kernels), so the measured runs compile from the caches.

Expected times on one H100 (estimates from nanoGPT's published times and typical compile times, not yet measured):
ex1 about 150 s, ex4 about 100 s, gpt2 about 85 s, attention about 60 s (FlexAttention compiles twice), scripts
about 165 s (18 runs, of 8 to 20 s each, after the warm-up): about 9 minutes. Each part stops at its budget
(--budget_ex1 210, --budget_ex4 120, --budget_gpt2 100, --budget_attention 90; scripts gets what is left), and all
of them at --time_limit (480 s): a run still going is stopped (SIGTERM, then SIGKILL) and reported as such, a run
that cannot start in time is listed as skipped, so the last scripts rows may be missing after 8 minutes; rerun
them with --parts scripts (about 3 minutes).

  python benchmarks/bench_gpu.py                              everything, at most 8 minutes
  python benchmarks/bench_gpu.py --parts gpt2,attention       some parts
  python benchmarks/bench_gpu.py --tiny --md /tmp/gpu.md      every part at tiny sizes on the CPU, float32, each
                                                              script run once, torch.compile disabled (by
                                                              TORCH_COMPILE_DISABLE=1): a check of this script, the
                                                              numbers mean nothing
  python benchmarks/bench_gpu.py --pack data/gpu_bench        copy the data the GPU run needs into one folder

Data: TinyShakespeare (--data), the GPT-2 BPE files for tiktoken (--tiktoken_cache, copied to a temporary folder
given to the scripts as TIKTOKEN_CACHE_DIR; a TIKTOKEN_CACHE_DIR already set is used as it is), a folder of
Gutenberg books (--books) and a WikiText-2 folder holding valid.txt and test.txt (--wikitext), by default all under
--data_root: ../shared/data if it exists, else data/gpu_bench (what --pack writes). Nothing is downloaded. The runs'
checkpoints are deleted once read (--keep_checkpoints keeps them); their output stays in --out_root.
"""

import argparse
import atexit
import datetime
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from common import machine  # noqa: E402

PARTS = ("ex1", "ex4", "gpt2", "attention", "scripts")
TARGET_VAL, TARGET_MFU = 1.47, 40.0
SHARED = os.path.join(ROOT, "..", "shared", "data")
PACKED = os.path.join(ROOT, "data", "gpu_bench")
# runs a script as __main__ in this process, then reports the GPU's peak memory (also after sys.exit or SIGTERM)
RUNNER = """import runpy, sys, torch
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        print(f"peak_cuda_bytes {torch.cuda.max_memory_allocated()}", flush=True)
"""
ITER = re.compile(r"^iter (\d+) \| loss (\S+) \| ([\d.]+) ms \| ([\d.]+)k tok/s(?: \| mfu ([\d.]+)%)?", re.M)
EVAL = re.compile(r"^iter (\d+) \| train (\S+) \| val (\S+) \| (?:.*\| )?([\d.]+) s$", re.M)
ROUND = re.compile(r"^round (\d+) \|.* \| ([\d.]+) ms$", re.M)
PEAK = re.compile(r"^peak_cuda_bytes (\d+)$", re.M)
SHOWN = re.compile(r"^(iter \d+ \| train |round \d+ \| NLL|error|Traceback|\w*Error|compiling)")  # printed live

# model sizes: nanoGPT's Shakespeare GPU model, GPT-2 small, and a tiny one for --tiny
NANO = "--n_layer 6 --n_head 6 --n_embd 384 --block_size 256 --batch_size 64 --dropout 0.2".split()
GPT2 = "--n_layer 12 --n_head 12 --n_embd 768 --block_size 1024".split()
TINY = "--n_layer 1 --n_head 2 --n_embd 32 --block_size 32 --batch_size 4".split()
REUSED = {"ex1": "ex1", "ex4": "ex4", "ex3": "gpt2"}  # scripts whose compiled row is the run of a part


# ----------------------------------------------------------------------------------------------------------
# Running a script: a subprocess with a deadline, its output parsed


@dataclass
class Run:
    """One script run: its output and what it says."""

    name: str
    out_dir: str
    cmd: list = field(default_factory=list)
    text: str = ""
    wall: float = float("nan")
    rss_mb: float = float("nan")
    status: str = "ok"  # ok, stopped at target, stopped at time budget, skipped: ..., failed: ...

    @property
    def iters(self):  # (iteration, ms, k tokens/s, mfu % or None) of every log line
        return [(int(m[1]), float(m[3]), float(m[4]), float(m[5]) if m[5] else None) for m in ITER.finditer(self.text)]

    @property
    def evals(self):  # (iteration, train loss, val loss, elapsed s) of every evaluation line
        return [(int(m[1]), float(m[2]), float(m[3]), float(m[4])) for m in EVAL.finditer(self.text)]

    @property
    def peak_mb(self):  # GPU peak (max_memory_allocated), or None off the GPU
        m = PEAK.search(self.text)
        return int(m[1]) / 2**20 if m else None

    @property
    def ran(self):
        return not self.status.startswith(("skipped", "failed"))

    def steady(self, first):
        """Medians of ms/iter, k tokens/s and MFU over the log lines from iteration `first` on (all of them if none)."""
        rows = [r for r in self.iters if r[0] >= first] or self.iters
        if not rows:
            return None, None, None
        mfu = [r[3] for r in rows if r[3] is not None]
        return (
            statistics.median(r[1] for r in rows),
            statistics.median(r[2] for r in rows),
            statistics.median(mfu) if mfu else None,
        )

    def reached(self, target):
        """The first evaluation with val <= target, (iteration, val, elapsed s), or None."""
        return next(((it, val, s) for it, _, val, s in self.evals if val <= target), None)


def launch(name, script, flags, out_dir, deadline, env, stop=None):
    """Run `script flags --out_dir out_dir --overwrite` through RUNNER in its own process group, its output in
    out_dir/stdout.txt. SIGTERM to the script (it saves and exits) when stop(line) says so or at the deadline,
    SIGKILL to the whole group 30 s later; helper processes (compile workers) still holding the output open 5 s
    after the script exits are killed."""
    os.makedirs(out_dir, exist_ok=True)
    cmd = [sys.executable, "-c", RUNNER, os.path.join(ROOT, script), *flags, "--out_dir", out_dir, "--overwrite"]
    run = Run(name, out_dir, cmd)
    print(f"$ {script} {' '.join(flags)}", flush=True)
    left = deadline - time.time()
    if left < 1:
        run.status = "skipped: time budget"
        print("  skipped: no time left in this part's budget", flush=True)
        return run
    t0 = time.time()
    p = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    why, kill_at, done = [], [], threading.Event()

    def signal_group(sig):
        try:
            os.killpg(p.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def terminate(reason):  # the script saves its state and exits; its helpers go with the SIGKILL, if need be
        if not why:
            why.append(reason)
            kill_at.append(time.time() + 30)
            p.send_signal(signal.SIGTERM)

    def watch():  # runs until the output ends; the script is never reaped here, so its group id stays its own
        while not done.is_set():
            if os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                if not done.wait(5):
                    signal_group(signal.SIGKILL)  # the script has exited; helpers still hold its output open
                return
            if time.time() > deadline:
                terminate("stopped at time budget")
            if kill_at and time.time() > kill_at[0]:
                signal_group(signal.SIGKILL)
            done.wait(0.5)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    lines = []
    with open(os.path.join(out_dir, "stdout.txt"), "w") as log:
        for raw in iter(p.stdout.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\n")
            log.write(line + "\n")
            lines.append(line)
            if SHOWN.match(line):
                print("  " + line, flush=True)
            if stop and stop(line):
                terminate("stopped at target")
    done.set()
    watcher.join()
    _, status, usage = os.wait4(p.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    run.text, run.wall, run.rss_mb = "\n".join(lines) + "\n", time.time() - t0, usage.ru_maxrss / 1024
    if why:
        run.status = why[0]
    elif code != 0:
        run.status = f"failed: exit status {code}"
    if run.status.startswith("failed"):
        print(f"  {run.status}; the last lines of its output:\n" + "\n".join("  | " + x for x in lines[-40:]))
    ms, ktok, mfu = run.steady(10)
    speed = f", {ms:.1f} ms/iter, {ktok:.1f}k tok/s" + (f", MFU {mfu:.1f}%" if mfu is not None else "") if ms else ""
    print(f"  {run.status}: {run.wall:.0f} s{speed}", flush=True)
    return run


def child_env(a):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for k, v in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("WANDB_MODE", "disabled")):
        env.setdefault(k, v)
    if a.tiktoken_dir:
        env["TIKTOKEN_CACHE_DIR"] = a.tiktoken_dir
    if a.tiny:
        env["TORCH_COMPILE_DISABLE"] = "1"  # --compile is passed as on the GPU, and costs nothing
    return env


# ----------------------------------------------------------------------------------------------------------
# Output: Markdown for the terminal and the file


class Report:
    def __init__(self, path, header):
        self.path, self.parts = path, [header]

    def add(self, text):
        print(text, flush=True)
        self.parts.append(text)
        self.write()

    def write(self):
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(self.path, "w") as f:
            f.write("\n".join(self.parts).rstrip() + "\n")


def md_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]) + "\n"


def fmt(x, spec, unit="", missing="-"):
    return missing if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:{spec}}{unit}"


def mem(run):
    """Peak memory: the GPU's, else (on the CPU) the process's resident set."""
    if run.peak_mb is not None:
        return f"{run.peak_mb / 1024:.2f} GB"
    return fmt(run.rss_mb, ".0f", " MB RSS")


def val_verdict(val, target=TARGET_VAL):
    if val is None:
        return f"NOT met: no final val loss (target <= {target})"
    if val <= target:
        return f"met: final val {val:.4f} <= {target}"
    return f"NOT met: final val {val:.4f} is {val - target:.4f} above {target}"


def time_verdict(hit, ref_s, best_val, ran_s, target=TARGET_VAL):
    """ex4's time to the target against half of ex1's reference time ref_s. hit: (iteration, val, elapsed s) or None."""
    if ref_s is None:
        return "no ex1 time to compare with: run part ex1 (in the same command or before)"
    half = ref_s / 2
    if hit is None:
        best = f"best val {best_val:.4f}, {best_val - target:.4f} above {target}" if best_val is not None else "no val"
        return f"NOT met: val {target} not reached in {ran_s:.0f} s ({best}); the target was {half:.0f} s"
    pct = 100 * hit[2] / ref_s if ref_s > 0 else float("inf")  # ex1 can reach a --tiny target at 0.0 s
    if hit[2] <= half:
        return f"met: {hit[2]:.0f} s is {pct:.0f}% of ex1's {ref_s:.0f} s (target <= 50%)"
    return f"NOT met: {hit[2]:.0f} s is {pct:.0f}% of ex1's {ref_s:.0f} s, {hit[2] - half:.0f} s over the target of 50%"


def mfu_verdict(mfu, target=TARGET_MFU):
    if mfu is None:
        return f"NOT measured: MFU is printed on CUDA only (target >= {target:.0f}%)"
    if mfu >= target:
        return f"met: MFU {mfu:.1f}% >= {target:.0f}%"
    return f"NOT met: MFU {mfu:.1f}% is {target - mfu:.1f} points below {target:.0f}%"


# ----------------------------------------------------------------------------------------------------------
# Parts 1, 2 and 4: ex1 at nanoGPT's settings, ex4 to ex1's val, ex3 at GPT-2 small


def device_flags(a):
    """bfloat16 autocast on the GPU; --tiny runs float32 on the CPU (rnn_lm's LSTM has no bfloat16 kernel there)."""
    return ["--device", "cpu", "--dtype", "float32"] if a.tiny else ["--device", "cuda", "--dtype", "bfloat16"]


def ex1_flags(a):
    if a.tiny:
        size, n = TINY + "--eval_interval 8 --eval_iters 2 --log_interval 4".split(), "16"
    else:
        size, n = NANO, "5000"
    return size + ["--max_iters", n, "--lr_decay_iters", n, "--compile", "--max_new_tokens", "0", "--data", a.data]


def ex4_flags(a):
    n = str(a.ex4_iters)
    size = TINY + "--eval_interval 8 --eval_iters 2 --log_interval 4".split() if a.tiny else NANO
    return size + ["--max_iters", n, "--compile", "--max_new_tokens", "0", "--data", a.data]


def gpt2_flags(a):
    size = TINY[:8] if a.tiny else GPT2  # TINY without its batch size
    return size + [
        "--stage", "pretrain", "--tokenizer", "gpt2", "--batch_size", str(a.gpt2_batch), "--dropout", "0",
        "--data", a.data, "--pretrain_data", a.books, "--pretrain_tokens", str(a.pretrain_tokens),
        "--data_dir", os.path.join(a.out_root, "data"), "--max_new_tokens", "0",
    ]  # fmt: skip


def gpt2_run_flags(a):
    n = str(a.gpt2_iters)
    return gpt2_flags(a) + ["--max_iters", n, "--eval_interval", n, "--eval_iters", "1", "--log_interval", "1"]


def flag(flags, name, default):
    """The value of --name in a command's flags (the last one wins, as in argparse), else default."""
    values = [flags[i + 1] for i, f in enumerate(flags[:-1]) if f == name]
    return values[-1] if values else default


def how(a):
    return "float32 on the CPU, torch.compile disabled" if a.tiny else "--compile --dtype bfloat16"


def skip_first(n_iters):
    """Log lines before this iteration are left out of the medians: compilation and warm-up."""
    return min(100, max(1, n_iters // 3))


def ex1_reference(a, ctx):
    """ex1's run: from this command, else from the output of its last run in --out_root."""
    if "ex1" in ctx:
        return ctx["ex1"]
    path = os.path.join(a.out_root, "ex1", "stdout.txt")
    if os.path.exists(path):
        with open(path) as f:
            return Run("ex1", os.path.dirname(path), text=f.read(), status="ok (an earlier run)")
    return None


def part_ex1(a, ctx, report, deadline):
    flags = ex1_flags(a) + device_flags(a)
    run = ctx["ex1"] = launch("ex1", "ex1_gpt.py", flags, os.path.join(a.out_root, "ex1"), deadline, a.env)
    evals, n = run.evals, int(flags[flags.index("--max_iters") + 1])
    final = evals[-1] if evals else None
    hit = run.reached(a.target)
    ms, ktok, mfu = run.steady(skip_first(n))
    size = "tiny model" if a.tiny else "6 layers, 6 heads, 384 wide, block 256, batch 64, dropout 0.2"
    rows = [
        [
            "ex1_gpt.py",
            run.status,
            final[0] if final else "-",
            fmt(final[2] if final else None, ".4f"),
            fmt(min((e[2] for e in evals), default=None), ".4f"),
            f"iter {hit[0]}, {hit[2]:.0f} s" if hit else "not reached",
            fmt(final[3] if final else None, ".0f", " s"),
            fmt(run.wall, ".0f", " s"),
            fmt(ms, ".1f"),
            fmt(ktok, ",.1f", "k"),
            fmt(mfu, ".1f", "%"),
            mem(run),
        ]
    ]
    header = ["run", "status", "iters", "final val", "best val", f"val <= {a.target}", "training time", "wall time"]
    header += ["ms/iter", "tokens/s", "MFU", "peak memory"]
    report.add(
        f"## ex1 at nanoGPT's GPU settings\n\n{size}, {n} iterations, {how(a)}, evaluation every "
        f"{flag(flags, '--eval_interval', 250)} iterations on {flag(flags, '--eval_iters', 200)} batches. Training "
        "time: the run's elapsed seconds at its last evaluation (compile and "
        "evaluations included); wall time: the whole process. ms/iter, tokens/s, MFU: medians of the log lines.\n\n"
        + md_table(header, rows)
        + f"\nTarget val <= {a.target}: {val_verdict(final[2] if final else None, a.target)}.\n"
    )


def part_ex4(a, ctx, report, deadline):
    flags = ex4_flags(a) + device_flags(a)

    def stop(line):
        m = EVAL.match(line)
        return m is not None and float(m[3]) <= a.target

    out_dir = os.path.join(a.out_root, "ex4")
    run = ctx["ex4"] = launch("ex4", "ex4_mqa_swiglu.py", flags, out_dir, deadline, a.env, stop)
    ex1 = ex1_reference(a, ctx)
    ref_s, ref_what = None, ""
    if ex1 is not None and ex1.evals:
        ex1_hit = ex1.reached(a.target)
        ref_s = ex1_hit[2] if ex1_hit else ex1.evals[-1][3]
        ref_what = f"to val <= {a.target}" if ex1_hit else "its whole run: it never reached the target"
    hit, evals = run.reached(a.target), run.evals
    best = min((e[2] for e in evals), default=None)
    ms, ktok, mfu = run.steady(skip_first(a.ex4_iters))
    rows = [
        [
            "ex4_mqa_swiglu.py (MQA, SwiGLU, RoPE)",
            run.status,
            f"iter {hit[0]}, {hit[2]:.0f} s" if hit else "not reached",
            fmt(best, ".4f"),
            fmt(ref_s, ".0f", f" s, {ref_what}"),
            fmt(100 * hit[2] / ref_s if hit and ref_s else None, ".0f", "%"),
            fmt(ms, ".1f"),
            fmt(mfu, ".1f", "%"),
            mem(run),
        ]
    ]
    header = ["run", "status", f"val <= {a.target}", "best val", "ex1's time", "% of ex1's", "ms/iter", "MFU"]
    header.append("peak memory")
    ran_s = evals[-1][3] if evals else 0.0
    report.add(
        f"## ex4's defaults at the same model size: time to val {a.target}\n\nex4's defaults (--n_kv_head 1, --mlp "
        f"swiglu, --pos rope, --learning_rate 3e-3) with ex1's model-size flags, {how(a)}, at most {a.ex4_iters} "
        "iterations (lr decay over as many), stopped at the first evaluation that reaches the target. Times are the "
        "runs' own elapsed seconds at that evaluation (compile and evaluations included).\n\n"
        + md_table(header, rows)
        + f"\nTarget at most half of ex1's time: {time_verdict(hit, ref_s, best, ran_s, a.target)}.\n"
    )


def part_gpt2(a, ctx, report, deadline):
    flags = gpt2_run_flags(a) + ["--compile"] + device_flags(a)
    run = ctx["gpt2"] = launch("gpt2", "ex3_pretrain_finetune.py", flags, os.path.join(a.out_root, "gpt2"), deadline,
                               a.env)  # fmt: skip
    ms, ktok, mfu = run.steady(skip_first(a.gpt2_iters))
    params = re.search(r"^([\d.]+)M parameters", run.text, re.M)
    rows = [
        [
            "ex3_pretrain_finetune.py --stage pretrain --tokenizer gpt2",
            run.status,
            f"{params[1]}M" if params else "-",
            fmt(ms, ".1f"),
            fmt(ktok, ",.1f", "k"),
            fmt(mfu, ".1f", "%"),
            mem(run),
            fmt(run.wall, ".0f", " s"),
        ]
    ]
    size = "tiny model" if a.tiny else "GPT-2 small: 12 layers, 12 heads, 768 wide, block 1024"
    report.add(
        f"## ex3 at GPT-2 small size\n\n{size}, batch {a.gpt2_batch}, GPT-2 BPE, {how(a)}, "
        f"{a.gpt2_iters} iterations on {a.pretrain_tokens:,} tokens of the Gutenberg books; medians from iteration "
        f"{skip_first(a.gpt2_iters)} on. MFU: the script's estimate_mfu (PaLM's FLOPs per token over 989 TFLOP/s "
        "bf16 on H100/H200).\n\n"
        + md_table(["run", "status", "parameters", "ms/iter", "tokens/s", "MFU", "peak memory", "wall time"], rows)
        + f"\nTarget MFU >= {TARGET_MFU:.0f}%: {mfu_verdict(mfu)}.\n"
    )


# ----------------------------------------------------------------------------------------------------------
# Part 3: every script, compiled and not


def script_configs(a):
    """(name, script, flags without the iteration, device and compile flags) for every script, GPU-sized or tiny."""
    d = ["--data", a.data]
    wiki = ["--data", a.wikitext] + "--train_split valid --no-compare --init_from scratch".split()
    if a.tiny:
        return [
            ("ex1", "ex1_gpt.py", TINY + d),
            ("ex2", "ex2_addition.py", "--n_layer 1 --n_head 2 --n_embd 32 --batch_size 16 --digits 2 "
             "--test_problems 10".split()),
            ("ex3", "ex3_pretrain_finetune.py", gpt2_flags(a)),
            ("ex4", "ex4_mqa_swiglu.py", TINY + d),
            ("ex6", "ex6_modern_gpt.py", TINY + d),
            ("rnn_lm", "rnn_lm.py", "--n_embd 16 --n_hidden 32 --block_size 32 --batch_size 4".split() + d),
            ("switchhead_moe", "switchhead_moe.py", TINY + d),
            ("gan_text", "gan_text.py", TINY + d + "--seq_len 16 --d_embd 8 --d_hidden 16 --gan_batch_size 4 "
             "--eval_samples 4 --d_pretrain_iters 0 --adv_rounds 1 --adv_eval_interval 1".split()),
            ("flash_moe_finetune", "flash_moe_finetune.py", "--n_layer 2 --n_head 2 --n_embd 32 --block_size 32 "
             "--batch_size 2 --test_tokens 256".split() + wiki),
        ]  # fmt: skip
    return [
        ("ex1", "ex1_gpt.py", NANO + d),
        ("ex2", "ex2_addition.py", "--n_layer 6 --n_head 6 --n_embd 384 --batch_size 512 --test_problems 500".split()),
        ("ex3", "ex3_pretrain_finetune.py", gpt2_flags(a)),
        ("ex4", "ex4_mqa_swiglu.py", NANO + d),
        ("ex6", "ex6_modern_gpt.py", NANO + d),
        ("rnn_lm", "rnn_lm.py", "--n_layer 2 --n_embd 384 --n_hidden 1024 --block_size 256 --batch_size 64 "
         "--dropout 0.2".split() + d),
        ("switchhead_moe", "switchhead_moe.py", NANO + d),
        ("gan_text", "gan_text.py", NANO + d + "--seq_len 64 --d_pretrain_iters 2 --adv_rounds 4 "
         "--adv_eval_interval 4 --eval_samples 32".split()),
        ("flash_moe_finetune", "flash_moe_finetune.py", GPT2 + "--batch_size 8 --test_tokens 8192".split() + wiki),
    ]  # fmt: skip


def describe(flags):
    """A short description of a config: its model-size flags."""
    keys = ("n_layer", "n_head", "n_embd", "n_hidden", "block_size", "batch_size", "digits")
    got = {k: flags[flags.index(f"--{k}") + 1] for k in keys if f"--{k}" in flags}
    return ", ".join(f"{k} {v}" for k, v in got.items())


def iteration_flags(script, n, a):
    flags = ["--max_iters", str(n), "--eval_interval", str(n), "--eval_iters", "1", "--log_interval", "1"]
    if script != "ex2_addition.py":  # ex2 samples no text
        flags += ["--max_new_tokens", "0"]
    return flags + device_flags(a)


def reused(ctx):
    """The scripts whose compiled row is the run of a part that ran in this command (the same configs)."""
    return {name: ctx[part] for name, part in REUSED.items() if part in ctx and ctx[part].ran}


# the compile warm-up runs one iteration with the script's config; these flags cut its other GPU work
WARM_FLAGS = {
    "ex2": ["--test_problems", "10"],
    "gan_text": ["--d_pretrain_iters", "0", "--adv_rounds", "0", "--eval_samples", "4"],
    "flash_moe_finetune": ["--test_tokens", "2048"],
}


def start_warmup(a, ctx, deadline):
    """Start the compiled runs of the scripts part that no other part made, one iteration each, all at once: they
    fill inductor's caches on disk (FX graphs, Triton kernels), so the measured runs later compile from them. Threads,
    each waiting on its process; returns (threads, start time, how many) or None."""
    cold = [(name, script, flags) for name, script, flags in script_configs(a) if name not in reused(ctx)]
    if a.tiny or not a.warm or len(cold) < 2:
        return None
    deadline = min(deadline, time.time() + a.warm_budget)
    root = os.path.join(a.out_root, "scripts")
    threads = []
    for name, script, flags in cold:
        flags = flags + iteration_flags(script, 1, a) + ["--compile"] + WARM_FLAGS.get(name, [])
        args = (f"{name} warm-up", script, flags, os.path.join(root, f"{name}-warmup"), deadline, a.env)
        threads.append(threading.Thread(target=launch, args=args, daemon=True))
    print(f"starting the compile warm-up of {len(cold)} runs in parallel", flush=True)
    for t in threads:
        t.start()
    return threads, time.time(), len(cold)


def part_scripts(a, ctx, report, deadline):
    n, configs, reuse, part_start = a.script_iters, script_configs(a), reused(ctx), time.time()
    root = os.path.join(a.out_root, "scripts")
    runs = {}
    need_eager, need_compiled = (0, 0) if a.tiny else (10, 20)  # seconds a run needs at least, on an H100

    def run_one(name, script, flags, compiled):
        if deadline - time.time() < (need_compiled if compiled else need_eager):
            print(f"$ {script}: skipped, too little time left in the scripts part's budget", flush=True)
            return Run(name, "", status="skipped: time budget")
        extra = ["--compile"] if compiled else []
        out_dir = os.path.join(root, f"{name}-{'compiled' if compiled else 'eager'}")
        run = launch(name, script, flags + iteration_flags(script, n, a) + extra, out_dir, deadline, a.env)
        tidy(a, out_dir)
        return run

    warm, warm_note = ctx.pop("warmup", None), ""
    if warm is None and deadline - time.time() > need_compiled:
        warm = start_warmup(a, ctx, deadline)
    if warm is not None:  # nothing is measured before the warm-up is over
        threads, t0, count = warm
        for t in threads:
            t.join()
        tidy(a, root)
        ahead = part_start - t0  # started before this part: alongside the attention part
        warm_note = (
            f" The compile warm-up ({count} runs of one iteration each, in parallel) took {time.time() - t0:.0f} s"
        )
        warm_note += f", the first {ahead:.0f} s alongside the attention part." if ahead > 1 else "."
    for name, script, flags in configs:  # each script not compiled, then compiled
        if a.tiny and name in reuse:  # --tiny runs each script once: these ran in their parts, with these flags
            runs[name, False] = Run(name, "", status=f"skipped: --tiny, see part {REUSED[name]}")
        else:
            runs[name, False] = run_one(name, script, flags, False)
        if name in reuse:
            runs[name, True] = reuse[name]
        elif a.tiny:  # compile is disabled under --tiny: the row above again
            runs[name, True] = Run(name, "", status="skipped: --tiny, the row above with --compile")
        else:
            runs[name, True] = run_one(name, script, flags, True)

    rows = []
    for name, script, flags in configs:
        for compiled in (False, True):
            run = runs[name, compiled]
            first = skip_first(n)
            note = ""
            if compiled and name in reuse:
                first = skip_first(int(run.iters[-1][0]) if run.iters else n)
                note = f"the run of part {REUSED[name]}"
            rounds = [float(m[2]) for m in ROUND.finditer(run.text)]
            if rounds:
                note = f"adversarial round {statistics.median(rounds):.0f} ms"
            ms, ktok, mfu = run.steady(first) if run.ran else (None, None, None)
            rows.append(
                [
                    script,
                    describe(flags),
                    "yes" if compiled else "no",
                    run.status,
                    fmt(ms, ".1f"),
                    fmt(ktok, ",.1f", "k"),
                    fmt(mfu, ".1f", "%"),
                    mem(run) if run.ran else "-",
                    fmt(run.wall, ".0f", " s"),
                    note,
                ]
            )
    report.add(
        f"## Every script, compiled and not\n\n{n} iterations each (--log_interval 1, one evaluation of 1 batch at the "
        f"start and the end), {'float32 on the CPU' if a.tiny else '--dtype bfloat16'}; ms/iter, tokens/s and MFU are "
        "medians of the log lines from iteration "
        f"{skip_first(n)} on; wall time: the whole process, start-up, data and compilation included.{warm_note}\n\n"
        + md_table(
            [
                "script",
                "config",
                "compiled",
                "status",
                "ms/iter",
                "tokens/s",
                "MFU",
                "peak memory",
                "wall time",
                "note",
            ],
            rows,
        )
    )


# ----------------------------------------------------------------------------------------------------------
# Part 5: attention, forward and backward, against sequence length


def attention_variants(a, dev, dtype):
    """name -> (make, need): make(T) gives (fn, inputs), or a string saying why it cannot run; need(T) the bytes
    it needs beyond its inputs (about), to skip what would not fit."""
    import ex4_mqa_swiglu as ex4
    import flash_moe_finetune as fm
    import switchhead_moe as sh

    H, hs, W, C, tile = a.heads, a.head_size, a.window, a.layer_width, a.tile
    e = torch.finfo(dtype).bits // 8  # bytes per element
    compiled = {}

    def qkv(T):
        g = torch.Generator(device=dev).manual_seed(0)
        return [torch.randn(1, H, T, hs, device=dev, dtype=dtype, generator=g, requires_grad=True) for _ in range(3)]

    def explicit(T):
        return (lambda q, k, v: ex4.attention(q, k, v, None, flash=False)), qkv(T)

    def fused(T):
        return (lambda q, k, v: ex4.attention(q, k, v, None, flash=True)), qkv(T)

    def window_mask(T):
        pos = torch.arange(T, device=dev)
        mask = ex4.window_mask(pos, pos, W)
        return (lambda q, k, v: ex4.attention(q, k, v, mask, flash=True)), qkv(T)

    def window_blocked(T):
        return (lambda q, k, v: ex4.blocked_window_attention(q, k, v, W, flash=True)), qkv(T)

    def flex(T):
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        except ImportError:
            return f"unavailable: torch {torch.__version__} has no torch.nn.attention.flex_attention"

        def sliding(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & (q_idx - kv_idx < W)

        block_mask = create_block_mask(sliding, None, None, T, T, device=dev.type)
        if dev.type == "cuda":  # FlexAttention's fused kernel needs torch.compile (eager runs a slow reference)
            if "flex" not in compiled:  # one compiled function for every length
                compiled["flex"] = torch.compile(flex_attention)
            f = compiled["flex"]
        else:  # the CPU has no backward (time_call falls back to the forward) and no fused kernel: eager, as asked

            def f(*args, **kwargs):
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", "flex_attention called without torch.compile")
                    return flex_attention(*args, **kwargs)

        return (lambda q, k, v: f(q, k, v, block_mask=block_mask)), qkv(T)

    def tiled(T):
        return (lambda q, k, v: fm.tiled_attention(q, k, v, tile)), qkv(T)

    def layer(dense):
        def make(T):
            flags = ["--n_embd", str(C), "--block_size", str(T), "--dropout", "0", "--n_layer", "1"]
            flags += ["--n_head", "8", "--n_experts", "1"] if dense else ["--n_head", "2", "--n_experts", "4"]
            cfg = sh.parse_args(flags + ([] if dense else ["--moe_k", "2"]))
            module = (sh.CausalSelfAttention(cfg) if dense else sh.SwitchHeadAttention(cfg)).to(dev).train()
            x = torch.randn(1, T, C, device=dev, generator=torch.Generator(device=dev).manual_seed(0))
            x.requires_grad_()
            lowp = dtype != torch.float32

            def f(x):
                with torch.autocast(dev.type, dtype=dtype, enabled=lowp):
                    return module(x)

            return f, [x]

        return make

    return {
        "explicit softmax(QK^T)V, causal": (explicit, lambda T: T * T * (1 + 7 * H * e)),  # 7 T x T per head
        "fused causal (SDPA)": (fused, lambda T: 0),
        f"ex4 window {W}, as a mask (SDPA)": (window_mask, lambda T: T * T * (1 + 2 * e)),
        f"ex4 window {W}, blocked (SDPA)": (window_blocked, lambda T: 0),
        f"FlexAttention, sliding-window block mask {W}": (flex, lambda T: 0),
        f"flash_moe tiled_attention, tiles of {tile}": (tiled, lambda T: 6 * H * T * (T + tile)),  # float32 tiles
        f"dense attention layer, 8 heads, {C} wide": (layer(True), lambda T: 0),
        f"SwitchHead layer, 2 heads x 4 experts top-2, {C} wide": (layer(False), lambda T: 0),
    }


def time_call(fn, inputs, dev, reps, budget_s):
    """Forward + backward of fn(*inputs): the best time of up to reps calls after a warm-up call, in ms, and the
    peak memory of the warm-up call above what was allocated before it, in bytes (None off the GPU). Where the
    backward is not implemented (FlexAttention on the CPU), the forward alone, and says so."""
    cuda = dev.type == "cuda"

    def fwd_bwd():
        for t in inputs:
            t.grad = None
        fn(*inputs).float().sum().backward()

    def fwd():
        with torch.no_grad():
            fn(*(t.detach() for t in inputs))

    step, note = fwd_bwd, ""
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    try:
        step()
    except NotImplementedError as e:
        step, note = fwd, f"forward only ({str(e).split('.')[0]})"
        step()
    peak = torch.cuda.max_memory_allocated() - base if cuda else None
    times = []
    while len(times) < reps and sum(times) < budget_s:
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    return 1000 * min(times), peak, note


def part_attention(a, ctx, report, deadline):
    dev = torch.device("cpu" if a.tiny else "cuda")
    dtype = torch.float32 if a.tiny else torch.bfloat16
    variants = attention_variants(a, dev, dtype)
    cells, notes, noted = {}, [], set()
    for T in a.lengths:
        for name, (make, need) in variants.items():
            if time.time() > deadline:
                cells[name, T] = "skipped: time budget"
                continue
            if dev.type == "cuda":
                torch.cuda.empty_cache()
                free = torch.cuda.mem_get_info()[0]
                if need(T) > 0.9 * free:
                    cells[name, T] = f"skipped: needs ~{need(T) / 2**30:.0f} GB"
                    print(f"T={T:6d} {name}: skipped, needs about {need(T) / 2**30:.0f} GB", flush=True)
                    continue
            fn = inputs = None
            try:
                made = make(T)
                if isinstance(made, str):
                    cells[name, T] = made
                    continue
                fn, inputs = made
                ms, peak, note = time_call(fn, inputs, dev, a.reps, a.rep_budget_s)
                cells[name, T] = f"{ms:.2f} ms" + (f", {peak / 2**30:.2f} GB" if peak is not None else "")
                if note:
                    cells[name, T] += " (fwd only)"
                    if name not in noted:
                        noted.add(name)
                        notes.append(f"{name}: {note}")
            except torch.OutOfMemoryError:
                cells[name, T] = "out of memory"
            except (Exception, SystemExit) as e:  # one variant failing must not lose the others
                cells[name, T] = f"failed: {type(e).__name__}"
                notes.append(f"{name} at T={T}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
            del fn, inputs
            print(f"T={T:6d} {name}: {cells[name, T]}", flush=True)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    rows = [[name] + [cells.get((name, T), "-") for T in a.lengths] for name in variants]
    alongside = ""
    if ctx.get("warmup"):
        alongside = (
            " The scripts part's compile warm-up ran alongside, in other processes: mostly CPU work, with a few "
            "training steps on the GPU, hence the best of the calls."
        )
    what = "bf16 on the GPU" if dev.type == "cuda" else "float32 on the CPU (--tiny: times only)"
    timer = "CUDA events" if dev.type == "cuda" else "time.perf_counter"
    report.add(
        f"## Attention, forward + backward\n\nB=1, {a.heads} heads of {a.head_size}, {what}; the best of up to "
        f"{a.reps} calls after a warm-up call (which compiles FlexAttention), timed with {timer}; memory: the "
        "peak above the inputs, torch.cuda.max_memory_allocated. The last two rows are whole attention layers "
        f"(projections and routing included, input {a.layer_width} wide, autocast).{alongside}\n\n"
        + md_table(["variant"] + [f"T={T:,}" for T in a.lengths], rows)
        + ("".join(f"\n- {n}" for n in notes) + "\n" if notes else "")
    )


# ----------------------------------------------------------------------------------------------------------
# Data and main


def pack(a):
    """Copy what the GPU run reads into one folder (--pack DIR), small enough to travel with the repository."""
    src, dst = a.data_root, a.pack
    os.makedirs(os.path.join(dst, "gutenberg", "books"), exist_ok=True)
    shutil.copy(os.path.join(src, "tinyshakespeare.txt"), dst)
    for sub in ("tiktoken_cache", "wikitext-2"):
        shutil.copytree(os.path.join(src, sub), os.path.join(dst, sub), dirs_exist_ok=True)
    total, books = 0, os.path.join(src, "gutenberg", "books")
    for name in sorted(os.listdir(books)):
        if name.endswith(".txt") and total < a.pack_mb * 2**20:
            shutil.copy(os.path.join(books, name), os.path.join(dst, "gutenberg", "books"))
            total += os.path.getsize(os.path.join(books, name))
    for root, dirs, _ in os.walk(dst):  # copies of read-only files stay read-only: make them the user's
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o755)
    for root, _, files in os.walk(dst):
        for f in files:
            os.chmod(os.path.join(root, f), 0o644)
    print(f"packed into {dst}: TinyShakespeare, the GPT-2 BPE files, WikiText-2 and {total / 2**20:.1f} MB of books")


def tidy(a, root):
    """Delete the ckpt.pt and best.pt files under root (GPT-2-sized ones take GBs) once their runs have ended,
    unless --keep_checkpoints."""
    if a.keep_checkpoints:
        return
    for folder, _, files in os.walk(root):
        for f in files:
            if f.endswith(".pt"):
                os.remove(os.path.join(folder, f))


def check_inputs(a):
    """Everything the selected parts read must be there before anything runs."""
    need = []
    if {"ex1", "ex4", "gpt2", "scripts"} & set(a.parts):
        need.append(("--data", a.data, os.path.isfile))
    if {"gpt2", "scripts"} & set(a.parts):
        need.append(("--books", a.books, os.path.exists))
        if not os.environ.get("TIKTOKEN_CACHE_DIR"):
            need.append(("--tiktoken_cache", a.tiktoken_cache, os.path.isdir))
    if "scripts" in a.parts:
        need.append(("--wikitext", os.path.join(a.wikitext, "valid.txt"), os.path.isfile))
    for flag, path, ok in need:
        if not ok(path):
            sys.exit(f"error: {path} not found: give {flag}, or --data_root with the layout of ../shared/data")


def parse(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0].strip(), formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )  # fmt: skip
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from {', '.join(PARTS)}")
    p.add_argument("--tiny", action="store_true", help="every part at tiny sizes on the CPU: a check of this script")
    p.add_argument("--md", default=os.path.join(ROOT, "benchmarks", "gpu_results.md"), help="the Markdown file")
    p.add_argument("--out_root", default="", help="the runs' out_dirs; default out/bench_gpu (out/bench_gpu_tiny)")
    default_root = SHARED if os.path.isdir(SHARED) else PACKED
    p.add_argument("--data_root", default=default_root, help="a folder laid out as ../shared/data")
    p.add_argument("--data", default="", help="TinyShakespeare; default DATA_ROOT/tinyshakespeare.txt")
    p.add_argument("--books", default="", help="pretraining text for ex3; default DATA_ROOT/gutenberg/books")
    p.add_argument(
        "--wikitext", default="", help="WikiText-2 folder (valid.txt, test.txt); default DATA_ROOT/wikitext-2"
    )
    p.add_argument(
        "--tiktoken_cache", default="", help="GPT-2 BPE files for tiktoken; default DATA_ROOT/tiktoken_cache"
    )
    p.add_argument("--keep_checkpoints", action="store_true", help="keep the runs' ckpt.pt and best.pt")
    p.add_argument("--pack", default="", help="copy the data the GPU run needs into this folder, then stop")
    p.add_argument("--pack_mb", type=float, default=6, help="--pack: MB of books to copy")
    p.add_argument("--time_limit", type=float, default=0, help="seconds for all parts; default 480 (--tiny: 1200)")
    for part, s in (("ex1", 210), ("ex4", 120), ("gpt2", 100), ("attention", 90)):
        p.add_argument(f"--budget_{part}", type=float, default=s, help=f"seconds for part {part} at most")
    p.add_argument("--target", type=float, default=TARGET_VAL, help="the val loss of parts ex1 and ex4")
    p.add_argument("--ex4_iters", type=int, default=0, help="ex4: iterations at most; default 2500 (--tiny: 16)")
    p.add_argument("--gpt2_batch", type=int, default=0, help="gpt2: batch size; default 16 (--tiny: 2)")
    p.add_argument("--gpt2_iters", type=int, default=0, help="gpt2: iterations; default 50 (--tiny: 6)")
    p.add_argument("--pretrain_tokens", type=int, default=0, help="gpt2: tokens of the books; default 1M (--tiny: 20k)")
    p.add_argument("--script_iters", type=int, default=0, help="scripts: iterations; default 30 (--tiny: 6)")
    p.add_argument("--warm", action=argparse.BooleanOptionalAction, default=True,
                   help="scripts: fill the compile caches in parallel before the compiled runs")  # fmt: skip
    p.add_argument("--warm_budget", type=float, default=150, help="scripts: seconds for the compile warm-up at most")
    p.add_argument("--lengths", default="", help="attention: sequence lengths; default 4096,8192,16384,32768")
    p.add_argument("--heads", type=int, default=0, help="attention: heads; default 12 (--tiny: 2)")
    p.add_argument("--head_size", type=int, default=0, help="attention: head size; default 64 (--tiny: 16)")
    p.add_argument("--window", type=int, default=0, help="attention: sliding window; default 1024 (--tiny: 16)")
    p.add_argument("--tile", type=int, default=0, help="attention: tiled_attention's tile; default 1024 (--tiny: 16)")
    p.add_argument("--layer_width", type=int, default=0, help="attention: layers' width; default 768 (--tiny: 32)")
    p.add_argument("--reps", type=int, default=5, help="attention: timed calls at most, after a warm-up call")
    p.add_argument("--rep_budget_s", type=float, default=2.0, help="attention: seconds of timed calls at most")
    a = p.parse_args(argv)
    a.command = "python benchmarks/bench_gpu.py " + " ".join(sys.argv[1:] if argv is None else argv)
    a.parts = [x for x in a.parts.split(",") if x]
    bad = [x for x in a.parts if x not in PARTS]
    if bad:
        p.error(f"unknown part(s) {bad}; choose from {', '.join(PARTS)}")
    t = a.tiny
    defaults = dict(
        time_limit=1200 if t else 480, ex4_iters=16 if t else 2500, gpt2_batch=2 if t else 16,
        gpt2_iters=6 if t else 50, pretrain_tokens=20_000 if t else 1_000_000, script_iters=6 if t else 30,
        heads=2 if t else 12, head_size=16 if t else 64, window=16 if t else 1024, tile=16 if t else 1024,
        layer_width=32 if t else 768, lengths="64,128" if t else "4096,8192,16384,32768",
    )  # fmt: skip
    for k, v in defaults.items():
        if not getattr(a, k):
            setattr(a, k, v)
    a.lengths = [int(x) for x in str(a.lengths).split(",")]
    a.data = a.data or os.path.join(a.data_root, "tinyshakespeare.txt")
    if not os.path.isfile(a.data) and os.path.isfile(os.path.join(ROOT, "data", "tinyshakespeare.txt")):
        a.data = os.path.join(ROOT, "data", "tinyshakespeare.txt")  # the scripts' own download
    a.books = a.books or os.path.join(a.data_root, "gutenberg", "books")
    a.wikitext = a.wikitext or os.path.join(a.data_root, "wikitext-2")
    a.tiktoken_cache = a.tiktoken_cache or os.path.join(a.data_root, "tiktoken_cache")
    a.out_root = a.out_root or os.path.join(ROOT, "out", "bench_gpu_tiny" if t else "bench_gpu")
    return a


def main(argv=None):
    a = parse(argv)
    if a.pack:
        return pack(a)
    if not a.tiny and not torch.cuda.is_available():
        sys.exit("error: no CUDA device; this benchmark is for a GPU (--tiny checks it on the CPU)")
    check_inputs(a)
    a.tiktoken_dir = os.environ.get("TIKTOKEN_CACHE_DIR", "")
    if not a.tiktoken_dir and {"gpt2", "scripts"} & set(a.parts):
        # tiktoken deletes a cached file whose hash does not match: give the scripts a copy, never the original
        a.tiktoken_dir = tempfile.mkdtemp(prefix="tiktoken_cache-")
        atexit.register(shutil.rmtree, a.tiktoken_dir, ignore_errors=True)
        for name in os.listdir(a.tiktoken_cache):
            shutil.copy(os.path.join(a.tiktoken_cache, name), a.tiktoken_dir)
    a.env = child_env(a)
    t0 = time.time()
    deadline_all = t0 + a.time_limit
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    report = Report(
        a.md,
        f"# GPU benchmarks{' (--tiny: a check of the script on the CPU, the numbers mean nothing)' if a.tiny else ''}"
        f"\n\nMachine: {machine()}.\n\nDate: {date}. Command: `{a.command}` (parts {', '.join(a.parts)}, time limit "
        f"{a.time_limit:.0f} s).\n",
    )
    print(f"writing {a.md}\n", flush=True)
    ctx = {}
    for part in PARTS:  # in this order: the scripts part reuses the runs of ex1, ex4 and gpt2
        if part not in a.parts:
            continue
        start = time.time()
        budget = getattr(a, f"budget_{part}", None) if not a.tiny else None
        deadline = min(deadline_all, start + budget) if budget else deadline_all
        print(f"=== part {part}: {deadline - start:.0f} s at most", flush=True)
        if part == "attention" and "scripts" in a.parts:  # the warm-up compiles on the CPU while attention is timed
            ctx["warmup"] = start_warmup(a, ctx, deadline_all)
        try:
            globals()[f"part_{part}"](a, ctx, report, deadline)
        except Exception:  # a bug in one part must not cost the others their GPU time
            trace = traceback.format_exc()
            print(trace, flush=True)
            report.add(f"## Part {part} failed\n\n```\n{trace[-3000:]}```\n")
        if part != "attention":  # the warm-up may be running in out_root/scripts
            tidy(a, os.path.join(a.out_root, part))
        print(f"=== part {part} took {time.time() - start:.0f} s\n", flush=True)
    total = time.time() - t0
    report.add(f"All parts took {total:.0f} s ({total / 60:.1f} min).\n")
    summary = {k: {"status": r.status, "wall_s": round(r.wall, 1)} for k, r in ctx.items() if isinstance(r, Run)}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
