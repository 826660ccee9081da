"""The shared skeleton holds in every script: --help lists every Config field with its default, and the code that
every script shares (checkpoints, resume, stopping, the schedule) is word for word ex1's, so diffs show techniques;
--threads sets torch's CPU threads."""

import importlib
import inspect
from dataclasses import MISSING, fields

import pytest
import torch

SCRIPTS = ["ex1_gpt", "ex2_addition", "ex3_pretrain_finetune", "ex4_mqa_swiglu", "rnn_lm", "switchhead_moe", "gan_text",
           "flash_moe_finetune"]  # fmt: skip
SHARED = ["save_checkpoint", "load_checkpoint", "check_out_dir", "resume_config", "StopRequest", "get_lr"]


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


@pytest.mark.parametrize("script", SCRIPTS[1:])
@pytest.mark.parametrize("name", SHARED)
def test_shared_code_is_ex1s(script, name):
    base, mod = importlib.import_module("ex1_gpt"), importlib.import_module(script)
    assert inspect.getsource(getattr(mod, name)) == inspect.getsource(getattr(base, name))


@pytest.mark.parametrize("script", SCRIPTS)
def test_threads_flag_sets_torch_threads(script):
    mod = importlib.import_module(script)
    before = torch.get_num_threads()
    try:
        mod.setup_device(mod.Config(device="cpu", threads=before + 1))
        assert torch.get_num_threads() == before + 1
        mod.setup_device(mod.Config(device="cpu"))  # 0, the default, leaves the count alone
        assert torch.get_num_threads() == before + 1
    finally:
        torch.set_num_threads(before)


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
