"""Shared test set-up: offline settings, one thread, the repository on sys.path, a small corpus, and user-error
checks."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmarks")]  # the scripts, and the benchmarks' common.py
from common import read_log  # noqa: E402 (log.csv read as the benchmarks read it)

os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
# one torch thread here and in every script a test starts: the models are tiny, and where other work holds a core,
# threads that wait for each other make the suite several times slower (README, "On a busy machine")
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# the ladder, base first; a test over every script takes its names from here
SCRIPTS = ["ex1_gpt", "ex2_addition", "ex3_pretrain_finetune", "ex4_mqa_swiglu", "rnn_lm", "switchhead_moe", "gan_text"]
SCRIPTS += ["flash_moe_finetune", "ex5_chain_of_thought", "ex6_modern_gpt"]

TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\n\nFirst Citizen:\nYou are all resolved rather to die than to famish?\n\n"
    "All:\nResolved. resolved.\n\n"
) * 40  # about 7,000 characters: enough for tiny models and both splits


@pytest.fixture(autouse=True)
def away_from_the_checkout(tmp_path_factory, monkeypatch):
    """Every test runs in a fresh empty folder: a default --out_dir (out/<script>) lands there, so the runs a reader
    made in the checkout (out/, data/) neither break a test nor get touched by one."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


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
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def assert_causal(model, vocab_size, T=16, t=9):
    """Changing every token from position t on leaves the logits before t unchanged (and does change the rest)."""
    idx = torch.randint(vocab_size, (2, T))
    changed = idx.clone()
    changed[:, t:] = (changed[:, t:] + 1) % vocab_size
    a, b = model(idx)[0], model(changed)[0]
    assert torch.allclose(a[:, :t], b[:, :t], atol=1e-6)
    assert not torch.allclose(a[:, t:], b[:, t:], atol=1e-3)  # the check can see a change


def losses(out_dir):
    """The losses of a run's log.csv, without the timings: equal for a resumed and an uninterrupted run."""
    return [(r["iter"], r["train_loss"], r["val_loss"]) for r in read_log(out_dir)]


def assert_repeatable_samples(main, out_dir, capsys, prompt="All:"):
    """Sampling from a checkpoint alone: two samples that continue the prompt, the same again with the same --seed."""
    draws = []
    for _ in range(2):
        main(
            [
                "--out_dir",
                out_dir,
                "--prompt",
                prompt,
                "--max_new_tokens",
                "40",
                "--num_samples",
                "2",
                "--device",
                "cpu",
            ]
        )
        draws.append(capsys.readouterr().out)
    assert draws[0] == draws[1] and draws[0].count("--- sample") == 2 and "\n" + prompt in draws[0]


@pytest.fixture
def gpt2_cache(monkeypatch, tmp_path_factory):
    """GPT-2's BPE offline: TIKTOKEN_CACHE_DIR as set (by .ci/run), or a temporary copy of ../shared/data/tiktoken_cache
    (tiktoken deletes a cached file whose hash does not match, so never the original)."""
    if not os.environ.get("TIKTOKEN_CACHE_DIR"):
        shared = os.path.join(ROOT, "..", "shared", "data", "tiktoken_cache")
        if not os.path.isdir(shared):
            pytest.skip(
                "GPT-2's BPE files are not available offline: set TIKTOKEN_CACHE_DIR, or provide "
                "../shared/data/tiktoken_cache"
            )
        copy = tmp_path_factory.mktemp("tiktoken_cache")
        for name in os.listdir(shared):
            shutil.copy(os.path.join(shared, name), copy)
        monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(copy))


def torchrun_and_single(tmp_path, worker_src, args):
    """Run the script worker_src under torchrun --nproc_per_node 2 (gloo, 1 thread each) into tmp_path/ddp and as one
    plain process into tmp_path/one; both must succeed. Returns the two out_dirs and the two completed processes."""
    worker = tmp_path / "worker.py"
    worker.write_text(worker_src)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    ddp, one = str(tmp_path / "ddp"), str(tmp_path / "one")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    p = subprocess.run(
        torchrun + [str(worker), *args, "--out_dir", ddp], capture_output=True, text=True, timeout=180, env=env
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    q = subprocess.run(
        [sys.executable, str(worker), *args, "--out_dir", one], capture_output=True, text=True, timeout=120, env=env
    )
    assert q.returncode == 0, q.stderr[-3000:]
    return ddp, one, p, q
