"""What the benchmark scripts share: a line naming the machine, Markdown tables for the README, running a script."""

import os
import platform
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def machine(threads=None):
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    n = threads or torch.get_num_threads()
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} cores, {n} torch threads{gpu}, torch {torch.__version__}, Python {platform.python_version()}"


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    print("\n".join(lines) + "\n", flush=True)


def run(cmd, threads=None, show=False):
    """Run cmd in the repository; show its output as it comes (raw, progress lines included) or keep it quiet.
    Returns its output and wall time; stops the benchmark if it fails."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    print("$ " + (f"OMP_NUM_THREADS={threads} " if threads else "") + " ".join(cmd), flush=True)
    t = time.time()
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = bytearray()
    while chunk := p.stdout.read1(1 << 16):
        out += chunk
        if show:
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
    p.wait()
    text = out.decode("utf-8", "replace")
    if p.returncode:
        sys.exit(f"failed with exit status {p.returncode}:\n{text[-3000:]}")
    return text, time.time() - t
