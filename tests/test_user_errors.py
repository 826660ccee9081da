"""Every script, the same list of user mistakes: each ends with exit status 2 and one `error:` line on stderr (no
traceback), and the checkpoint that was in --out_dir before is byte for byte unchanged."""

import importlib
import os
import shutil
from dataclasses import fields

import pytest
import torch

from conftest import ROOT, TEXT, user_error

GPT = "--n_layer 1 --n_head 2 --n_embd 16 --block_size 16 --batch_size 2 --max_new_tokens 4".split()
COMMON = ["--device", "cpu", "--eval_iters", "1"]
# per script: the flags of a tiny run, the data flag (None: no data file), the checkpoint's folder inside --out_dir,
# and a --prompt the script cannot take
FOLDER_DATA = {"flash_moe_finetune"}  # --data is a folder of WikiText-2's three splits
SCRIPTS = {
    "ex1_gpt": (GPT, "--data", "", "Zounds"),
    "ex2_addition": (
        "--n_layer 1 --n_head 2 --n_embd 16 --batch_size 8 --digits 1 --test_problems 3".split(),
        None,
        "",
        "1x+2",
    ),
    "ex5_chain_of_thought": (
        "--n_layer 1 --n_head 2 --n_embd 16 --batch_size 8 --train_digits 1 --test_digits 1 --test_problems 3".split(),
        None,
        "",
        "1x+2",
    ),
    "ex3_pretrain_finetune": (GPT + ["--stage", "scratch", "--finetune_iters", "1"], "--data", "scratch", "Zounds"),
    "ex4_mqa_swiglu": (GPT + ["--n_kv_head", "1"], "--data", "", "Zounds"),
    "ex6_modern_gpt": (GPT + ["--n_kv_head", "1"], "--data", "", "Zounds"),
    "rnn_lm": (
        "--n_layer 1 --n_embd 8 --n_hidden 16 --block_size 16 --batch_size 2 --max_new_tokens 4".split(),
        "--data",
        "",
        "Zounds",
    ),
    "switchhead_moe": (GPT, "--data", "", "Zounds"),
    "gan_text": (
        GPT
        + [
            "--seq_len",
            "8",
            "--d_embd",
            "4",
            "--d_hidden",
            "8",
            "--gan_batch_size",
            "2",
            "--eval_samples",
            "2",
            "--d_pretrain_iters",
            "1",
            "--adv_rounds",
            "1",
            "--adv_eval_interval",
            "1",
        ],
        "--data",
        "",
        "Zounds",
    ),  # fmt: skip
    "flash_moe_finetune": (
        GPT + ["--init_from", "scratch", "--moe_layers", "all", "--test_tokens", "100"],
        "--data",
        "",
        None,
    ),
}
SHORT = TEXT[:120]  # the train split holds a batch of block_size + 1 tokens, the val split (12 characters) does not
BAD_DATA = {
    "empty": b"",
    "binary": b"\0\1\2 binary \0" * 40,
    "not_utf8": "caf\u00e9 cr\u00e8me ".encode("latin-1") * 40,
    "short": SHORT.encode(),
}


def numeric_flags(script):
    return [f.name for f in fields(importlib.import_module(script).Config) if f.type in (int, float)]


def write_data(folder, script, content):
    """A --data value holding content: a text file, or a folder of WikiText-2's three splits."""
    os.makedirs(folder, exist_ok=True)
    if script in FOLDER_DATA:
        for split in ("train", "valid", "test"):
            with open(os.path.join(folder, f"{split}.txt"), "wb") as f:
                f.write(content)
        return folder
    path = os.path.join(folder, "text.txt")
    with open(path, "wb") as f:
        f.write(content)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real checkpoint of each script (one iteration), made once; each test works on a copy."""
    if not os.environ.get("TIKTOKEN_CACHE_DIR"):  # flash_moe_finetune needs GPT-2's BPE files offline
        shared = os.path.join(ROOT, "..", "shared", "data", "tiktoken_cache")
        if os.path.isdir(shared):
            os.environ["TIKTOKEN_CACHE_DIR"] = shutil.copytree(shared, str(tmp_path_factory.mktemp("bpe") / "cache"))
    made = {}

    def make(script):
        if script == "flash_moe_finetune" and not os.environ.get("TIKTOKEN_CACHE_DIR"):
            pytest.skip("GPT-2's BPE files are not available offline: set TIKTOKEN_CACHE_DIR")
        if script not in made:
            args, data_flag, _, _ = SCRIPTS[script]
            root = tmp_path_factory.mktemp(script)
            data = [data_flag, write_data(str(root / "data"), script, (TEXT * 2).encode())] if data_flag else []
            out = str(root / "out")
            importlib.import_module(script).main(
                args + COMMON + data + ["--max_iters", "1", "--eval_interval", "1", "--out_dir", out]
            )
            made[script] = (out, data)
        return made[script]

    return make


@pytest.fixture
def setup(trained, tmp_path):
    """For a script: its module, the tiny-run flags plus --out_dir (a copy of a trained run), the checkpoint folder,
    and a check that every checkpoint file in it is unchanged."""

    def make(script):
        args, data_flag, sub, _ = SCRIPTS[script]
        out, data = trained(script)
        copy = shutil.copytree(out, str(tmp_path / "out"))
        folder = os.path.join(copy, sub)
        before = {n: open(os.path.join(folder, n), "rb").read() for n in os.listdir(folder) if n.endswith(".pt")}
        assert {"ckpt.pt", "best.pt"} <= before.keys()

        def unchanged():
            after = {n: open(os.path.join(folder, n), "rb").read() for n in os.listdir(folder) if n.endswith(".pt")}
            assert after == before, "a checkpoint in --out_dir was changed"

        return (
            importlib.import_module(script),
            args + COMMON + ["--max_iters", "1", "--out_dir", copy],
            data,
            folder,
            unchanged,
        )

    return make


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("case", ["missing", "folder", *BAD_DATA])
def test_bad_data(script, case, setup, tmp_path, capsys):
    data_flag = SCRIPTS[script][1]
    if data_flag is None:
        pytest.skip(f"{script} makes its own data")
    mod, argv, _, _, unchanged = setup(script)
    if case == "missing":
        value, expect = str(tmp_path / "missing"), "no such"
    elif case == "folder":  # the wrong kind of path: a folder for a file, a file for a folder
        value = (
            write_data(str(tmp_path / "wrong"), "ex1_gpt", TEXT.encode()) if script in FOLDER_DATA else str(tmp_path)
        )
        expect = "folder"
    else:
        value, expect = write_data(str(tmp_path / case), script, BAD_DATA[case]), ""
        if case == "short" and script in FOLDER_DATA:  # a long train split, a valid split of about 10 tokens
            write_data(value, script, (TEXT * 2).encode())
            with open(os.path.join(value, "valid.txt"), "w") as f:
                f.write(SHORT[:40])
    line = user_error(capsys, mod.main, argv + ["--overwrite", data_flag, value])
    assert expect in line
    unchanged()


@pytest.mark.slow
@pytest.mark.parametrize("script,flag", [(s, f) for s in SCRIPTS for f in numeric_flags(s)])
def test_numeric_flag_out_of_range(script, flag, setup, capsys):
    mod, argv, data, _, unchanged = setup(script)
    assert f"--{flag}" in user_error(capsys, mod.main, argv + data + ["--overwrite", f"--{flag}", "-1"])
    unchanged()


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_mistakes_about_flags_and_devices(script, setup, capsys):
    mod, argv, data, _, unchanged = setup(script)
    assert "--max_iter" in user_error(
        capsys, mod.main, argv + data + ["--overwrite", "--max_iter", "5"]
    )  # no prefix matching
    assert "--lr" in user_error(capsys, mod.main, argv + data + ["--overwrite", "--lr", "100"])
    assert "float16" in user_error(capsys, mod.main, argv + data + ["--overwrite", "--dtype", "float16"])
    if not torch.cuda.is_available():
        assert "CUDA" in user_error(capsys, mod.main, argv + data + ["--overwrite", "--device", "cuda"])
    if not torch.backends.mps.is_available():
        assert "MPS" in user_error(capsys, mod.main, argv + data + ["--overwrite", "--device", "mps"])
    assert "invalid integer value: '2.5'" in user_error(capsys, mod.main, argv + data + ["--max_iters", "2.5"])
    assert "--prompt is empty" in user_error(capsys, mod.main, argv + ["--prompt", ""])  # not a training run
    bad_prompt = SCRIPTS[script][3]
    if bad_prompt:
        user_error(capsys, mod.main, argv + ["--prompt", bad_prompt])
    unchanged()


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_out_dir_that_cannot_be_one(script, setup, tmp_path, capsys):
    """--out_dir naming a file, a folder inside a file, or one where nothing can be written ends in one line."""
    mod, argv, data, _, _ = setup(script)
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    for out in (a_file, a_file / "sub"):
        assert "is a file, not a folder" in user_error(capsys, mod.main, argv + data + ["--out_dir", str(out)])
    if os.path.isdir("/proc/self"):  # a folder nobody can write in, not even root
        assert "is not writable" in user_error(capsys, mod.main, argv + data + ["--out_dir", "/proc/self/out"])
    assert a_file.read_text() == "not a folder"


@pytest.mark.parametrize("script", SCRIPTS)
def test_checkpoint_already_there(script, setup, capsys):
    mod, argv, data, folder, unchanged = setup(script)
    line = user_error(capsys, mod.main, argv + data)
    assert f"{script} at iteration 1" in line and "--resume" in line and "--out_dir" in line and "--overwrite" in line
    unchanged()


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_another_scripts_checkpoint(script, setup, capsys):
    mod, argv, data, folder, unchanged = setup(script)
    other = "ex2_addition" if script != "ex2_addition" else "ex1_gpt"
    for name in ("ckpt.pt", "best.pt"):
        ckpt = torch.load(os.path.join(folder, name), weights_only=True)
        torch.save({**ckpt, "script": other}, os.path.join(folder, name))
    before = {n: open(os.path.join(folder, n), "rb").read() for n in ("ckpt.pt", "best.pt")}
    assert other in user_error(capsys, mod.main, argv + ["--resume"])
    assert other in user_error(capsys, mod.main, argv + data + ["--overwrite"])  # never overwritten, not even so
    assert other in user_error(capsys, mod.main, argv + ["--prompt", "1+1" if script == "ex2_addition" else "A"])
    assert before == {n: open(os.path.join(folder, n), "rb").read() for n in ("ckpt.pt", "best.pt")}


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_truncated_checkpoint(script, setup, capsys):
    mod, argv, data, folder, _ = setup(script)
    for name in ("ckpt.pt", "best.pt"):
        path = os.path.join(folder, name)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    before = {n: open(os.path.join(folder, n), "rb").read() for n in ("ckpt.pt", "best.pt")}
    assert "not a readable checkpoint" in user_error(capsys, mod.main, argv + ["--resume"])
    assert "not a readable checkpoint" in user_error(
        capsys, mod.main, argv + ["--prompt", "1+1" if script == "ex2_addition" else "A"]
    )
    assert "unreadable" in user_error(capsys, mod.main, argv + data)  # without --overwrite it is left alone too
    assert before == {n: open(os.path.join(folder, n), "rb").read() for n in ("ckpt.pt", "best.pt")}


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_wandb_without_login(script, setup, tmp_path, monkeypatch, capsys):
    mod, argv, data, _, unchanged = setup(script)
    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    for var in ("HOME", "WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR"):
        monkeypatch.setenv(var, str(tmp_path))  # no stored login
    line = user_error(capsys, mod.main, argv + data + ["--overwrite", "--wandb"])
    assert "wandb login" in line and "WANDB_MODE=offline" in line
    unchanged()
