"""
The README's quick start, `python ex2_addition.py`, timed on an idle machine and on a half-busy one (one other process
spinning on a core, as another user's job would), where it runs with both threads (--threads 2, PyTorch's own default
and this repository's before --threads 0 took the free cores) and with --threads 0 (the default: the cores the load
average leaves free).

    python benchmarks/bench_quick_start.py --rounds 2          about 12 minutes on 2 CPU cores

Each round: the busy runs in turns, --threads 2 then the default; then the idle run, the spinner stopped. Start it on an
idle machine. Prints each run's wall time, its median ms per
iteration, the threads it took and its held-out exact match, then the ratios to the idle run.
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

from common import ROOT, machine, run, table

SCRIPT = os.path.join(ROOT, "ex2_addition.py")


def quick_start(out_dir, flags):
    """One run of the quick start into out_dir: its wall seconds, median ms/iter, threads and exact match."""
    env_threads = os.environ.pop("OMP_NUM_THREADS", None)  # the default must decide from the load, as for a reader
    try:
        text, seconds, _ = run([sys.executable, SCRIPT, "--out_dir", out_dir, *flags])
    finally:
        if env_threads is not None:
            os.environ["OMP_NUM_THREADS"] = env_threads
    median = re.search(r"median ([\d.]+) ms/iter", text)[1]
    match = re.search(r"held-out exact match: ([\d.]+%)", text)[1]
    threads = re.search(r"threads: (\d+) ", text)
    return seconds, float(median), threads[1] if threads else flags[-1], match


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    print(machine(2) + "\n", flush=True)
    rows, idle, busy = [], [], {"--threads 2": [], "default": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            try:
                time.sleep(1)  # under way before the run looks for idle cores
                for name, flags in (("--threads 2", ["--threads", "2"]), ("default", [])):
                    result = quick_start(os.path.join(tmp, f"busy{r}-{len(rows)}"), flags)
                    busy[name].append(result[0])
                    rows.append((r + 1, "half-busy", name, *result))
            finally:
                spinner.kill()
            result = quick_start(os.path.join(tmp, f"idle{r}"), [])
            idle.append(result[0])
            rows.append((r + 1, "idle", "default", *result))
    table(
        ("round", "machine", "threads flag", "wall s", "median ms/iter", "threads", "held-out exact match"),
        [(r, m, f, f"{s:.1f}", f"{ms:.1f}", t, e) for r, m, f, s, ms, t, e in rows],
    )
    base = statistics.median(idle)
    for name, times in busy.items():
        print(
            f"half-busy, {name}: median {statistics.median(times):.1f} s, {statistics.median(times) / base:.2f} "
            f"times the idle run's median {base:.1f} s"
        )


if __name__ == "__main__":
    main()
