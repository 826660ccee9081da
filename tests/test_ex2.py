import os

import pytest
import torch
import torch.nn as nn

import ex2_addition as ex2
from conftest import user_error

TOK = ex2.CharTokenizer(ex2.VOCAB)


def loader(digits, batch_size=64):
    return ex2.DataLoader(ex2.Config(digits=digits, batch_size=batch_size), torch.device("cpu"))


def test_problem_layout():
    rows = ex2.make_problems(torch.tensor([123 * 1000 + 456, 999 * 1000 + 999, 7]), 3)
    assert [TOK.decode(r.tolist()) for r in rows] == ["123+456=9750", "999+999=8991", "000+007=7000"]
    assert ex2.answer(rows[0, 8:], TOK) == 579
    assert ex2.Config(digits=3).block_size == rows.shape[1] - 1


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

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=0):
        d = self.digits
        place = 10 ** torch.arange(d - 1, -1, -1)
        a, b = (idx[:, :d] * place).sum(1), (idx[:, d + 1 : 2 * d + 1] * place).sum(1)
        total = torch.where(a == 5, a + b + 1, a + b)
        return torch.cat([idx, total[:, None] // 10 ** torch.arange(d + 1) % 10], dim=1)


def test_accuracy_decoding():
    cfg = ex2.Config(digits=2)
    problems = ex2.make_problems(torch.arange(10**4), 2)
    acc, mistakes = ex2.accuracy(Oracle(2), problems, TOK, cfg, torch.device("cpu"), torch.autocast("cpu", enabled=False), show=3)
    assert acc == pytest.approx(1 - 100 / 10**4)
    assert mistakes == ["05+00=5 (model: 6)", "05+01=6 (model: 7)", "05+02=7 (model: 8)"]


def test_train_answer_resume(tmp_path, capsys):
    out = str(tmp_path / "o")
    args = ["--digits", "2", "--max_iters", "30", "--eval_interval", "15", "--eval_iters", "2", "--log_interval", "10", "--batch_size", "32", "--device", "cpu", "--out_dir", out]
    ex2.main(args)
    text = capsys.readouterr().out
    assert "held-out exact match" in text and os.path.exists(os.path.join(out, "ckpt.pt"))
    ex2.main(args[:-4] + ["--max_iters", "40", "--resume", "--out_dir", out])
    assert "resuming from iter 30" in capsys.readouterr().out
    ex2.main(["--out_dir", out, "--prompt", "12+34"])
    line = capsys.readouterr().out.strip()
    assert line.startswith("12+34=") and line[6:].isdigit()
    assert "--prompt" in user_error(capsys, ex2.main, ["--out_dir", out, "--prompt", "123+4"])  # 3 digits for a 2-digit model
    assert "--digits" in user_error(capsys, ex2.main, ["--digits", "0"])
