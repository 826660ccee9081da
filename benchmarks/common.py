"""What the benchmark scripts share: a line naming the machine, Markdown tables for RESULTS.md, running a script and
reading its log.csv."""

import csv
import os
import platform
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PICTURES = os.path.join(ROOT, "benchmarks", "pictures")  # every picture RESULTS.md shows


def machine(threads=None):
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    n = threads or torch.get_num_threads()
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (
        f"{cpu}, {os.cpu_count()} cores, {n} torch threads{gpu}, torch {torch.__version__}, "
        f"Python {platform.python_version()}"
    )


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    print("\n".join(lines) + "\n", flush=True)


def run(cmd, threads=None, show=False, log_path=None, cwd=ROOT, check=True):
    """Run cmd (in the repository unless cwd says otherwise); show its output as it comes (raw, progress lines
    included) or keep it quiet, and copy it into log_path if given. Returns its output, wall seconds and the process's
    peak resident memory in MB; with check, a failure stops the benchmark (else the output says what happened)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    print("$ " + (f"OMP_NUM_THREADS={threads} " if threads else "") + " ".join(cmd), flush=True)
    t = time.time()
    p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = bytearray()
    while chunk := p.stdout.read1(1 << 16):
        out += chunk
        if show:
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    text = out.decode("utf-8", "replace")
    if log_path:
        with open(log_path, "w") as f:
            f.write(text)
    if check and p.returncode:
        sys.exit(f"failed with exit status {p.returncode}:\n{text[-3000:]}")
    return text, time.time() - t, usage.ru_maxrss / 1024  # ru_maxrss is in kB on Linux


def read_log(out_dir):
    """The rows of a run's log.csv, as dictionaries of strings."""
    with open(os.path.join(out_dir, "log.csv"), newline="") as f:
        return list(csv.DictReader(f))
