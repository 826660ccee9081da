"""Shared test set-up: offline settings, the repository on sys.path, a small corpus, and user-error checks."""

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", WANDB_MODE="disabled")

TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\n\nFirst Citizen:\nYou are all resolved rather to die than to famish?\n\n"
    "All:\nResolved. resolved.\n\n"
) * 40  # about 7,000 characters: enough for tiny models and both splits


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text(TEXT, encoding="utf-8")
    return str(path)


def user_error(capsys, fn, *args):
    """Run fn(*args); it must end as a user error: exit status 2 and one line on stderr. Returns that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        fn(*args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def run_script(script, *args, env=None):
    """Run a script in a fresh interpreter (as a user would) and return the completed process."""
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})


def assert_causal(model, vocab_size, T=16, t=9):
    """Changing every token from position t on leaves the logits before t unchanged (and does change the rest)."""
    idx = torch.randint(vocab_size, (2, T))
    changed = idx.clone()
    changed[:, t:] = (changed[:, t:] + 1) % vocab_size
    a, b = model(idx)[0], model(changed)[0]
    assert torch.allclose(a[:, :t], b[:, :t], atol=1e-6)
    assert not torch.allclose(a[:, t:], b[:, t:], atol=1e-3)  # the check can see a change
