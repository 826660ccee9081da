"""A reader's runs cannot break the tests: with a checkpoint in every script's default --out_dir of the folder the
suite runs from (as the README's commands leave them), the tests that use the default out_dir still pass."""

import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, SCRIPTS, TEXT

pytestmark = pytest.mark.slow  # the whole module: python -m pytest -m 'not slow' leaves it out


def test_tests_pass_beside_a_readers_out_dir(tmp_path):
    for script in SCRIPTS:  # what a reader's runs leave: out/<script>/ckpt.pt (ex3: one folder per stage)
        for sub in ("", "pretrain", "finetune", "scratch") if script == "ex3_pretrain_finetune" else ("",):
            os.makedirs(tmp_path / "out" / script / sub)
            torch.save({"script": script, "iter_num": 2000}, tmp_path / "out" / script / sub / "ckpt.pt")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "tinyshakespeare.txt").write_text(TEXT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    test = os.path.join(ROOT, "tests", "test_ex1.py")
    p = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stdout[-3000:]
    assert not (tmp_path / "out" / "ex1_gpt" / "best.pt").exists()  # nor did a test write into the reader's folder
