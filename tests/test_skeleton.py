"""The shared skeleton holds in every script: the machinery below the fence is ex1's, character for character, so
that diffs show only techniques; nothing is defined twice, and no function is longer than 60 lines; --help lists every
Config field with its default; --threads sets torch's CPU threads, by default the free cores."""

import ast
import importlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import MISSING, fields

import pytest
import torch

from conftest import ROOT, SCRIPTS

FENCE = "# " + "=" * 106 + "\n"  # the shared section runs from the first such line to the end of the file


def source(script):
    with open(os.path.join(ROOT, f"{script}.py"), encoding="utf-8") as f:
        return f.read()


def shared_section(script):
    text = source(script)
    assert FENCE in text, f"{script}.py has no shared section"
    return text[text.index(FENCE) :]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_lists_every_flag_with_its_default(script, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping inside a flag's help
    mod = importlib.import_module(script)
    with pytest.raises(SystemExit) as e:
        mod.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for f in fields(mod.Config):
        assert f"--{f.name}" in text, f"--{f.name} is missing from --help"
        if f.type is bool:
            assert f"--no-{f.name}" in text and f"(default --{'' if f.default else 'no-'}{f.name})" in text
        elif f.default is not MISSING:
            assert f"(default {f.default!r})" in text, f"--{f.name} shows no default"


def difference(base, mine):
    """Where two shared sections differ (the first line that does), or None when they are the same text."""
    a, b = base.splitlines(keepends=True), mine.splitlines(keepends=True)
    for n, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"line {n + 1} of the section:\n{y!r}\nex1_gpt.py has\n{x!r}"
    return None if len(a) == len(b) else f"{len(b)} lines, ex1_gpt.py's {len(a)}"


@pytest.mark.parametrize("script", SCRIPTS[1:])
def test_shared_section_is_ex1s(script):
    assert difference(shared_section("ex1_gpt"), shared_section(script)) is None


@pytest.mark.parametrize("where", [0.1, 0.5, 0.99])
def test_one_changed_character_is_a_difference(where):
    section = shared_section("ex1_gpt")
    i = next(i for i in range(int(where * len(section)), len(section)) if section[i].isalpha())
    changed = section[:i] + section[i].swapcase() + section[i + 1 :]
    assert difference(section, changed) is not None and difference(section, section + "\n") is not None


@pytest.mark.parametrize("script", SCRIPTS)
def test_defined_once_and_functions_short(script):
    """Above the fence, the script's own code; nothing there is defined again below it; no function over 60 lines."""
    tree = ast.parse(source(script))
    names = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    assert len(names) == len(set(names)), f"defined twice: {sorted({n for n in names if names.count(n) > 1})}"
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            assert length <= 60, f"{script}.{node.name} is {length} lines long"


@pytest.mark.parametrize("script", SCRIPTS)
def test_threads_typed_or_from_the_free_cores(script, monkeypatch, capsys):
    """--threads N sets N; 0 takes OMP_NUM_THREADS, else the cores other work leaves idle (at least one)."""
    mod = importlib.import_module(script)
    before = torch.get_num_threads()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    try:
        for threads, omp, busy, expect in [(3, "", 0.0, 3), (0, "2", 0.0, 2), (0, "", 1.4, 3), (0, "", 3.8, 1)]:
            monkeypatch.setenv("OMP_NUM_THREADS", omp)
            monkeypatch.setattr(mod, "busy_cores", lambda cpus: busy if cpus == {0, 1, 2, 3} else None)
            mod.setup_device(mod.Config(device="cpu", threads=threads))
            assert torch.get_num_threads() == expect
            said = capsys.readouterr().out  # the start-up line, where the idle cores decided
            assert (f"threads: {expect} (4 cores, {busy:.1f} of them busy" in said) == (not threads and not omp)
    finally:
        torch.set_num_threads(before)


def test_a_spinning_process_is_a_busy_core():
    cpus = os.sched_getaffinity(0)
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        busy = importlib.import_module("ex1_gpt").busy_cores(cpus, seconds=0.5)
    finally:
        spinner.kill()
    assert 0.7 <= busy <= len(cpus) + 0.01


@pytest.mark.parametrize("script", SCRIPTS)
def test_resume_from_a_checkpoint_without_a_setting(script, capsys):
    """A checkpoint written before a flag existed is refused in one line, not with a KeyError."""
    mod = importlib.import_module(script)
    cfg = mod.Config()
    cfg.given = set()
    saved = {"n_layer": cfg.n_layer + 1}
    mod.resume_config(cfg, saved, ["n_layer"])
    assert cfg.n_layer == saved["n_layer"]
    with pytest.raises(SystemExit) as e:
        mod.resume_config(cfg, saved, ["n_layer", "n_embd"])
    assert e.value.code == 2 and "the checkpoint has no --n_embd" in capsys.readouterr().err


def test_integer_flags_take_exponents_and_underscores():
    cfg = importlib.import_module("ex1_gpt").parse_args(["--max_iters", "1e3", "--batch_size", "2_000"])
    assert (cfg.max_iters, cfg.batch_size) == (1000, 2000)


def test_bfloat16_on_the_cpu_warns(capsys):
    ex1 = importlib.import_module("ex1_gpt")
    ex1.setup_device(ex1.Config(device="cpu", dtype="bfloat16", threads=torch.get_num_threads()))
    assert "warning: --dtype bfloat16 runs many times slower" in capsys.readouterr().err


def test_an_interrupted_save_keeps_the_old_checkpoint_and_no_temporary(tmp_path, monkeypatch):
    """A second Ctrl-C inside torch.save: the checkpoint before stays, and no ckpt.pt.tmp is left behind."""
    ex1 = importlib.import_module("ex1_gpt")

    def interrupted(state, path):
        with open(path, "wb") as f:
            f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    target = tmp_path / "ckpt.pt"
    target.write_bytes(b"the checkpoint before")
    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ex1.save_checkpoint(str(target), {})
    assert target.read_bytes() == b"the checkpoint before" and os.listdir(tmp_path) == ["ckpt.pt"]


def test_ctrl_c_outside_a_training_loop_stops_at_once(capsys):
    """Where no loop checks for the request (loading data, sampling), one Ctrl-C ends the run: exit 130, no trace."""
    ex1 = importlib.import_module("ex1_gpt")
    with pytest.raises(SystemExit) as e:
        with ex1.STOP:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
    assert e.value.code == 130 and "interrupted" in capsys.readouterr().err and not ex1.STOP.requested
