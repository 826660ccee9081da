"""ex1_gpt.py: causal attention (explicit equals fused), the initial loss, weight tying, the learning-rate schedule,
a run that trains, samples and resumes with the uninterrupted losses, and its user errors."""

import math
import os

import pytest
import torch

import ex1_gpt as ex1
from conftest import assert_causal, assert_repeatable_samples, losses, read_log, run_script, user_error

TINY = "--n_layer 2 --n_head 2 --n_embd 32 --block_size 16 --batch_size 4 --device cpu --eval_iters 2".split()


def tiny_model(**overrides):
    cfg = ex1.Config(n_layer=2, n_head=4, n_embd=32, block_size=16, **overrides)
    torch.manual_seed(0)
    return ex1.GPT(cfg, vocab_size=11).eval()


@pytest.mark.parametrize("flash", [True, False])
def test_causal(flash):
    model = tiny_model(flash=flash)
    assert_causal(model, 11)


def test_flash_equals_explicit():
    explicit, flash = tiny_model(flash=False), tiny_model(flash=True)
    flash.load_state_dict(explicit.state_dict())
    idx = torch.randint(11, (3, 16))
    assert torch.allclose(explicit(idx)[0], flash(idx)[0], atol=1e-5)


def test_initial_loss_is_uniform_guess():
    model = tiny_model()
    idx = torch.randint(11, (8, 16))
    _, loss = model(idx, torch.randint(11, (8, 16)))
    assert abs(loss.item() - math.log(11)) < 0.05


def test_weight_tying_and_param_count():
    model = tiny_model()
    assert model.wte.weight is model.lm_head.weight
    blocks = 2 * (4 * 32 * 32 + 8 * 32 * 32 + 2 * 32)  # attn qkv+proj, mlp, two LayerNorm gains
    assert model.num_params() == 11 * 32 + blocks + 32  # + final LayerNorm


def test_lr_schedule():
    cfg = ex1.Config(learning_rate=1.0, min_lr=0.1, warmup_iters=10, max_iters=110)
    lrs = [ex1.get_lr(it, cfg) for it in range(120)]
    assert lrs[0] < lrs[5] < lrs[9] < 1.0  # warmup rises
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.55)  # halfway down the cosine
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[110] == lrs[119] == pytest.approx(0.1)


def test_train_sample_resume(tmp_path, text_file, capsys):
    flags = "--learning_rate 1e-2 --dropout 0.1 --eval_interval 10 --log_interval 1 --lr_decay_iters 20".split()
    common = TINY + ["--data", text_file] + flags
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    ex1.main(common + ["--out_dir", full, "--max_iters", "20", "--max_new_tokens", "30"])
    out = capsys.readouterr().out
    assert "--- sample 1 ---" in out and os.path.exists(os.path.join(full, "ckpt.pt"))
    assert float(read_log(full)[-1]["val_loss"]) < math.log(len(set(open(text_file).read())))

    # stop at 10, then resume to 20: the same losses as the uninterrupted run, dropout and all
    ex1.main(common + ["--out_dir", part, "--max_iters", "10"])
    ex1.main(common + ["--out_dir", part, "--max_iters", "20", "--resume"])
    assert "resuming from iter 10" in capsys.readouterr().out
    assert losses(part) == losses(full)

    assert_repeatable_samples(ex1.main, full, capsys)  # sampling from the checkpoint alone

    # resumed without --max_iters, a finished run stays finished: it ends where it was to end, at 20
    ex1.main(common + ["--out_dir", full, "--resume"])
    assert "resuming from iter 20" in capsys.readouterr().out and read_log(full)[-1]["iter"] == "20"


def test_download_when_offline(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ex1, "DATA_DIR", str(tmp_path))
    monkeypatch.setattr(ex1, "DATA_URL", "http://127.0.0.1:9/input.txt")  # nothing listens on port 9
    line = user_error(capsys, ex1.main, TINY + ["--out_dir", str(tmp_path / "o")])
    assert "could not download" in line and "--data" in line
    assert not os.listdir(tmp_path)  # no half-written file left behind


def test_user_errors(tmp_path, text_file, capsys):
    assert "no such file" in user_error(capsys, ex1.main, TINY + ["--data", str(tmp_path / "missing.txt")])
    assert "divisible" in user_error(capsys, ex1.main, TINY + ["--n_embd", "30", "--n_head", "4"])
    assert "--dropout" in user_error(capsys, ex1.main, TINY + ["--dropout", "1.5"])
    assert "at least 1" in user_error(capsys, ex1.main, TINY + ["--n_head", "0"])
    assert "invalid int" in user_error(capsys, ex1.main, ["--n_layer", "four"])
    assert "no checkpoint" in user_error(capsys, ex1.main, ["--out_dir", str(tmp_path), "--prompt", "hi"])
    out = str(tmp_path / "o")
    ex1.main(
        TINY
        + ["--data", text_file, "--out_dir", out, "--max_iters", "2", "--eval_interval", "1", "--max_new_tokens", "1"]
    )
    assert "'Z'" in user_error(capsys, ex1.main, ["--out_dir", out, "--prompt", "Zounds"])  # no Z in the tiny text
    ckpt = torch.load(os.path.join(out, "best.pt"), weights_only=True)
    ckpt["script"] = "ex2_addition"
    torch.save(ckpt, os.path.join(out, "best.pt"))
    assert "ex2_addition" in user_error(capsys, ex1.main, ["--out_dir", out, "--prompt", "All"])


@pytest.mark.slow
def test_user_error_from_the_command_line(tmp_path):
    """As a user sees it: one line on stderr, exit status 2, no traceback."""
    p = run_script("ex1_gpt.py", "--data", str(tmp_path / "nope.txt"))
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "Traceback" not in p.stderr
    assert "--data" in p.stderr
