"""Nothing lost when a run is stopped: killed at random moments the checkpoint on disk always loads and --resume
continues from it; Ctrl-C or SIGTERM saves the latest state, and the resumed run gives the uninterrupted losses."""

import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import ex1_gpt as ex1
from conftest import ROOT, losses

pytestmark = pytest.mark.slow  # the whole module: python -m pytest -m 'not slow' leaves it out

TINY = ["--n_layer", "1", "--n_head", "2", "--n_embd", "16", "--block_size", "16", "--batch_size", "2",
        "--device", "cpu", "--eval_iters", "1", "--log_interval", "1", "--dropout", "0.1",
        "--max_new_tokens", "4"]  # fmt: skip


def start(args):
    """ex1 in a fresh interpreter, its output unbuffered so that the test can follow it line by line."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "ex1_gpt.py"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip


def wait_for(proc, pattern, timeout=120):
    """Read proc's output until a line matches pattern; returns the match."""
    t = time.time()
    for line in proc.stdout:
        if m := re.search(pattern, line):
            return m
        assert time.time() - t < timeout, f"no line matching {pattern!r}"
    raise AssertionError(f"the run ended before a line matching {pattern!r}: {proc.stderr.read()[-2000:]}")


def test_sigkill_at_random_moments(tmp_path, text_file):
    """A checkpoint every iteration, SIGKILL at random moments (many of them inside a save): every time, ckpt.pt and
    best.pt load, and the next --resume continues from the iteration ckpt.pt holds."""
    out = str(tmp_path / "out")
    rng, saved = random.Random(0), None
    for round_ in range(8):
        args = TINY + ["--data", text_file, "--out_dir", out, "--max_iters", "100000", "--eval_interval", "1"]
        proc = start(args + (["--resume"] if saved is not None else []))
        if saved is not None:
            assert int(wait_for(proc, r"resuming from iter (\d+)")[1]) == saved
        wait_for(proc, r"^iter \d+ \| loss")
        time.sleep(rng.uniform(0, 0.5))
        proc.kill()
        proc.wait()
        ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
        best = torch.load(os.path.join(out, "best.pt"), weights_only=True)
        # best.pt is written first: killed between the two writes, it may be one evaluation ahead of ckpt.pt
        assert ckpt["script"] == best["script"] == "ex1_gpt" and best["iter_num"] <= ckpt["iter_num"] + 1
        assert saved is None or ckpt["iter_num"] >= saved
        saved = ckpt["iter_num"]
    assert saved > 0


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_latest_state(sig, tmp_path, text_file, capsys):
    """Stopped between evaluations, the run saves the iteration it reached; resumed, it ends with exactly the losses
    of a run that was never stopped (dropout included)."""
    args = TINY + [
        "--data",
        text_file,
        "--max_iters",
        "100",
        "--eval_interval",
        "1000",
    ]  # evaluations at 0 and 100 only
    straight, stopped = str(tmp_path / "straight"), str(tmp_path / "stopped")
    ex1.main(args + ["--out_dir", straight])
    proc = start(args + ["--out_dir", stopped])
    wait_for(proc, r"^iter 5 \| loss")
    proc.send_signal(sig)
    assert proc.wait(timeout=60) == 130
    m = re.search(r"stopped: .*ckpt.pt holds iteration (\d+); continue with --resume", proc.stderr.read())
    assert m, "no line saying what was saved"
    it = int(m[1])
    assert 5 < it < 100 and torch.load(os.path.join(stopped, "ckpt.pt"), weights_only=True)["iter_num"] == it
    ex1.main(args + ["--out_dir", stopped, "--resume"])
    assert f"resuming from iter {it}" in capsys.readouterr().out
    assert losses(stopped) == losses(straight)
