"""ex2_addition.py: the problem layout (answer reversed), a held-out split disjoint from training, the prompt masked
from the loss, greedy-decoding accuracy (answers that are not numbers count as wrong), and runs through main with
--prompt, --resume, --test_problems and Ctrl-C."""

import os
import signal

import pytest
import torch
import torch.nn as nn
from torch.nn import functional as F

import ex2_addition as ex2
from conftest import losses, user_error

TOK = ex2.CharTokenizer(ex2.VOCAB)


def loader(digits, batch_size=64):
    return ex2.DataLoader(ex2.Config(digits=digits, batch_size=batch_size), torch.device("cpu"))


def test_problem_layout():
    rows = ex2.make_problems(torch.tensor([123 * 1000 + 456, 999 * 1000 + 999, 7]), 3)
    assert [TOK.decode(r.tolist()) for r in rows] == ["123+456=9750", "999+999=8991", "000+007=7000"]
    cfg = ex2.Config(digits=3)
    assert TOK.decode(rows[0, : cfg.answer_start].tolist()) == "123+456="  # the prompt ends where the answer starts
    assert ex2.answer(rows[0, cfg.answer_start :], TOK) == "579" and ex2.answer(rows[2, cfg.answer_start :], TOK) == "7"
    assert cfg.block_size == rows.shape[1] - 1


@pytest.mark.slow
@pytest.mark.parametrize("digits", [1, 3, 5])
def test_split_is_disjoint(digits):
    data = loader(digits)
    train, val = data.splits["train"], data.splits["val"]
    key = lambda rows: set(map(tuple, rows[:, : 2 * digits + 1].tolist()))  # noqa: E731  (the problem, not the answer)
    assert not key(train) & key(val)
    n = len(train) + len(val)
    assert n == min(10 ** (2 * digits), ex2.MAX_PROBLEMS)
    if digits > 1:
        assert 0.09 < len(val) / n < 0.11
    # the hash spreads the held-out problems over the whole range, not over one corner
    ids = torch.arange(10**6)
    held = ex2.is_held_out(ids)
    assert abs(held[ids % 2 == 0].float().mean() - held[ids % 2 == 1].float().mean()) < 0.005


def test_prompt_is_masked():
    data = loader(3)
    x, y = data.get_batch("train", torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (64, 11)
    assert (y[:, :7] == -1).all()  # "123+456" -> targets of the prompt are ignored
    assert (y[:, 7:-1] == x[:, 8:]).all() and (y[:, 7:] >= 0).all()  # the answer digits are predicted


class Oracle(nn.Module):
    """Adds the prompt's numbers and writes the answer reversed, except for problems whose first operand is 5."""

    def __init__(self, digits):
        super().__init__()
        self.digits = digits

    def answers(self, idx):
        d = self.digits
        place = 10 ** torch.arange(d - 1, -1, -1)
        a, b = (idx[:, :d] * place).sum(1), (idx[:, d + 1 : 2 * d + 1] * place).sum(1)
        total = torch.where(a == 5, a + b + 1, a + b)
        return total[:, None] // 10 ** torch.arange(d + 1) % 10

    def forward(self, idx):  # likeliest next tokens: its answer's digits after '='
        logits, after = torch.zeros(*idx.shape, len(ex2.VOCAB)), 2 * self.digits + 1
        logits[:, after:] = F.one_hot(self.answers(idx), len(ex2.VOCAB))[:, : idx.size(1) - after].float()
        return logits, None

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=0):
        return torch.cat([idx, self.answers(idx)], dim=1)


def test_accuracy_decoding():
    cfg = ex2.Config(digits=2)
    problems = ex2.make_problems(torch.arange(10**4), 2)
    acc, mistakes = ex2.accuracy(
        Oracle(2), problems, TOK, cfg, torch.device("cpu"), torch.autocast("cpu", enabled=False), show=3
    )
    assert acc == pytest.approx(1 - 100 / 10**4)
    assert mistakes == ["05+00=5 (model: 6)", "05+01=6 (model: 7)", "05+02=7 (model: 8)"]


@pytest.mark.slow
def test_one_forward_pass_scores_as_greedy_decoding_does(tmp_path, capsys):
    """A half-trained model (many mistakes, many right answers): accuracy() from one teacher-forced forward pass per
    problem counts exactly the problems that greedy decoding, token by token, answers right."""
    out = str(tmp_path / "half")
    ex2.main(ARGS + ["--max_iters", "150", "--eval_interval", "150", "--out_dir", out, "--test_problems", "10"])
    capsys.readouterr()
    ckpt = torch.load(os.path.join(out, "best.pt"), weights_only=True)
    cfg = ex2.Config(**ckpt["config"])
    model = ex2.GPT(cfg, len(ex2.VOCAB)).eval()
    model.load_state_dict(ckpt["model"])
    problems = ex2.make_problems(torch.arange(10**4), 2)
    no_autocast = torch.autocast("cpu", enabled=False)
    greedy = model.generate(problems[:, : cfg.answer_start], 3, temperature=0)  # before accuracy(): it ends in train()
    acc, _ = ex2.accuracy(model, problems, TOK, cfg, torch.device("cpu"), no_autocast)
    right = (greedy[:, cfg.answer_start :] == problems[:, cfg.answer_start :]).all(dim=1).sum().item() / 10**4
    assert 50 <= right * 10**4 <= 10**4 - 50, right  # a test of something: both kinds of answer are there
    assert acc == right


def always_plus(model):
    """Make the model write '+' at every position: ln_f's output becomes a constant that only the row of '+' sees."""
    with torch.no_grad():
        model.ln_f.weight.zero_()
        model.ln_f.bias.zero_()
        model.ln_f.bias[0] = 1.0
        model.lm_head.weight[ex2.VOCAB.index("+")] = 0.0
        model.lm_head.weight[ex2.VOCAB.index("+"), 0] = 100.0
    return model


def test_answer_that_is_not_a_number_counts_as_wrong():
    """An under-trained model may write '+' or '=' among the answer digits: wrong, and the mistake shows it."""
    cfg = ex2.Config(digits=2, n_layer=1, n_head=2, n_embd=16, bias=True)
    model = always_plus(ex2.GPT(cfg, len(ex2.VOCAB)))
    problems = ex2.make_problems(torch.arange(0, 10**4, 97), 2)
    no_autocast = torch.autocast("cpu", enabled=False)
    acc, mistakes = ex2.accuracy(model, problems, TOK, cfg, torch.device("cpu"), no_autocast, show=2)
    assert acc == 0 and mistakes == ["00+00=0 (model: +++)", "00+97=97 (model: +++)"]


ARGS = "--digits 2 --eval_iters 2 --log_interval 10 --batch_size 32 --device cpu --dropout 0.1".split()  # fmt: skip


def test_train_answer_resume(tmp_path, capsys):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    ex2.main(ARGS + ["--max_iters", "40", "--eval_interval", "15", "--out_dir", full])
    text = capsys.readouterr().out
    assert "held-out exact match" in text and "of 1,003 problems" in text  # every held-out problem by default
    assert torch.load(os.path.join(full, "ckpt.pt"), weights_only=True)["iter_num"] == 40  # the latest evaluation
    assert "optimizer" not in torch.load(os.path.join(full, "best.pt"), weights_only=True)

    # stop at 30, then resume to 40: the same losses as the uninterrupted run, dropout and all
    ex2.main(ARGS + ["--max_iters", "30", "--eval_interval", "15", "--out_dir", part])
    ex2.main(["--max_iters", "40", "--eval_interval", "15", "--resume", "--out_dir", part] + ARGS[2:])  # no --digits
    assert "resuming from iter 30" in capsys.readouterr().out
    assert losses(part) == losses(full)

    ex2.main(["--out_dir", full, "--prompt", "12+34"])
    line = capsys.readouterr().out.strip()
    assert line.startswith("12+34=") and line[6:].isdigit()
    assert "--prompt" in user_error(
        capsys, ex2.main, ["--out_dir", full, "--prompt", "123+4"]
    )  # 3 digits for a 2-digit model
    assert "--digits" in user_error(capsys, ex2.main, ["--digits", "0"])

    # --resume takes --digits from the checkpoint: another value typed is an error, not silently ignored
    line = user_error(capsys, ex2.main, ARGS[2:] + ["--digits", "3", "--resume", "--out_dir", full])
    assert "--digits 3" in line and "checkpoint's 2" in line
    # without --resume, a checkpoint in --out_dir is never replaced, unless --overwrite
    before = os.path.getmtime(os.path.join(full, "ckpt.pt"))
    assert "--overwrite" in user_error(capsys, ex2.main, ARGS + ["--max_iters", "1", "--out_dir", full])
    assert os.path.getmtime(os.path.join(full, "ckpt.pt")) == before
    ex2.main(ARGS + ["--max_iters", "1", "--out_dir", full, "--overwrite", "--test_problems", "10"])
    assert torch.load(os.path.join(full, "ckpt.pt"), weights_only=True)["iter_num"] == 1


def test_test_problems_and_prompt_that_is_not_a_number(tmp_path, capsys):
    """--test_problems and --train_problems set how many held-out and training problems are scored at the end;
    --prompt prints an answer that is not a number."""
    out = str(tmp_path / "o")
    ex2.main(["--digits", "1", "--n_layer", "1", "--n_head", "2", "--n_embd", "16", "--bias", "--batch_size", "8",
              "--max_iters", "2", "--eval_interval", "1", "--eval_iters", "1", "--device", "cpu", "--out_dir", out,
              "--test_problems", "5", "--train_problems", "7"])  # fmt: skip
    text = capsys.readouterr().out
    assert "% of 5 problems | train: " in text and "% of 7 |" in text  # not every one of the 10 held-out problems
    best = os.path.join(out, "best.pt")
    ckpt = torch.load(best, weights_only=True)
    model = ex2.GPT(ex2.Config(**ckpt["config"]), len(ex2.VOCAB))
    model.load_state_dict(ckpt["model"])
    ckpt["model"] = always_plus(model).state_dict()
    torch.save(ckpt, best)
    ex2.main(["--out_dir", out, "--prompt", "9+9", "--device", "cpu"])
    line = capsys.readouterr().out.strip()
    assert line.startswith("9+9=++ ") and "not a number" in line
    assert "--test_problems" in user_error(capsys, ex2.main, ["--test_problems", "-1", "--out_dir", str(tmp_path)])



@pytest.mark.slow
def test_sigint_saves_the_latest_state(tmp_path, capsys, monkeypatch):
    """Ctrl-C between evaluations: ckpt.pt holds the iteration reached, exit status 130; resumed, the losses of a run
    that was never stopped."""
    args = ARGS + ["--max_iters", "30", "--eval_interval", "100", "--test_problems", "10"]
    straight, stopped = str(tmp_path / "straight"), str(tmp_path / "stopped")
    ex2.main(args + ["--out_dir", straight])
    get_lr = ex2.get_lr

    def interrupt_at_7(it, cfg):
        if it == 7:
            os.kill(os.getpid(), signal.SIGINT)
        return get_lr(it, cfg)

    monkeypatch.setattr(ex2, "get_lr", interrupt_at_7)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        ex2.main(args + ["--out_dir", stopped])
    assert e.value.code == 130 and "ckpt.pt holds iteration 8; continue with --resume" in capsys.readouterr().err
    assert torch.load(os.path.join(stopped, "ckpt.pt"), weights_only=True)["iter_num"] == 8
    monkeypatch.setattr(ex2, "get_lr", get_lr)
    ex2.main(args + ["--out_dir", stopped, "--resume"])
    assert "resuming from iter 8" in capsys.readouterr().out
    assert losses(stopped) == losses(straight)
