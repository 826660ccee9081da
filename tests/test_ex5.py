"""ex5_chain_of_thought.py: the scratchpads add and multiply right, the prompt alone is masked, abacus indices, tracing
marks the wrong step, one teacher-forced pass scores as greedy decoding does, and runs through main: train, trace,
resume exactly, and one-line errors."""

import os
import random
import re

import pytest
import torch

import ex5_chain_of_thought as ex5
from conftest import losses, read_log, user_error

TOK = ex5.CharTokenizer(ex5.VOCAB)
CPU = torch.device("cpu")
NO_AUTOCAST = torch.autocast("cpu", enabled=False)


def read_back(a, b, task, fmt):
    """Parse a written problem back, checking every step against arithmetic done here; returns the answer."""
    text = ex5.write(a, b, task, fmt)
    prompt, completion = text.split("=", 1)
    assert prompt == f"{a}{'+' if task == 'add' else '*'}{b}" and completion.endswith(".")
    if fmt == "direct":
        return int(completion[:-1])
    work, _, answer = completion[:-1].rpartition("|")
    steps = work.split(",") if work else []
    if task == "add":
        carry = 0
        for k, step in enumerate(steps):
            c, x, y, s = map(int, re.fullmatch(r"(\d):(\d)\+(\d)=(\d)", step).groups())
            assert (c, x, y) == (carry, a // 10**k % 10, b // 10**k % 10)  # carry in, and the column's digits
            assert s == (c + x + y) % 10
            carry = (c + x + y) // 10
        assert carry == 0 and len(steps) == (max(len(str(a)), len(str(b))) + 1 if fmt == "cot" else 0)
    else:
        total = 0
        for k, step in enumerate(steps):
            d, partial, running = re.fullmatch(r"(\d):(\d+)>(\d+)", step).groups()
            assert int(d) == b // 10**k % 10 and int(partial[::-1]) == a * int(d) * 10**k  # the shifted partial
            total += int(partial[::-1])
            assert int(running[::-1]) == total
        assert len(steps) == (len(str(b)) if fmt == "cot" else 0)
    return int(answer[::-1])


@pytest.mark.parametrize("task", ["add", "mul"])
@pytest.mark.parametrize("fmt", ["direct", "reversed", "cot"])
def test_scratchpad_reads_back_to_the_answer(task, fmt):
    rng = random.Random(0)
    for _ in range(2000):
        a, b = (rng.randrange(10 ** rng.randint(0, 12)) for _ in range(2))
        assert read_back(a, b, task, fmt) == (a + b if task == "add" else a * b), (a, b)


def test_layouts_from_the_docstring():
    assert ex5.write(457, 168, "add", "cot") == "457+168=0:7+8=5,1:5+6=2,1:4+1=6,0:0+0=0|5260."
    assert ex5.write(4572, 168, "mul", "cot") == "4572*168=8:67563>67563,6:023472>698013,1:0027540>6908670|6908670."
    assert ex5.write(457, 168, "add", "direct") == "457+168=0625."
    assert ex5.write(457, 168, "add", "reversed") == "457+168=5260."
    assert ex5.__doc__.count("457+168=0:7+8=5,1:5+6=2,1:4+1=6,0:0+0=0|5260.") == 1


def indices(*problem):
    return [i for i, _ in ex5.places(*problem)]


def test_abacus_indices_of_a_hand_written_problem():
    # 45+168=0:5+8=3,1:4+6=1,1:0+1=2,0:0+0=0|3120.   digits of a place share its index, the steps their column's
    assert ex5.write(45, 168, "add", "cot") == "45+168=0:5+8=3,1:4+6=1,1:0+1=2,0:0+0=0|3120."
    assert indices(2, 3, "add", "cot") == [2, 1, 0, 3, 2, 1, 0] + [1] * 8 + [2] * 8 + [3] * 8 + [4] * 7 + [
        0,
        1,
        2,
        3,
        4,
        0,
    ]
    slots = [s for _, s in ex5.places(2, 3, "add", "cot")]  # a token's place in its step tells the step's apart
    assert slots == [0] * 7 + list(range(1, 9)) * 3 + list(range(1, 8)) + [0] * 6
    assert indices(2, 3, "add", "direct") == [2, 1, 0, 3, 2, 1, 0, 4, 3, 2, 1, 0]  # 45+168=0213.
    assert {s for _, s in ex5.places(2, 3, "add", "direct")} == {0}
    # 12*34=4:840>840,3:0630>8040|8040.   the digit of 34 and the symbols of its step: the step's number; the
    # products' digits: their places
    assert ex5.write(12, 34, "mul", "cot") == "12*34=4:840>840,3:0630>8040|8040."
    step1, step2 = [1, 1, 1, 2, 3, 1, 1, 2, 3, 1], [2, 2, 1, 2, 3, 4, 2, 1, 2, 3, 4, 0]
    assert indices(2, 2, "mul", "cot") == [2, 1, 0, 2, 1, 0] + step1 + step2 + [1, 2, 3, 4, 0]
    # training shifts every index of a problem by the same offset; zeros and slots stay as they are
    cfg = ex5.Config(task="add", format="cot", train_digits="2-3", pos="abacus", abacus_offset=7, batch_size=64)
    x, y, places = ex5.DataLoader(cfg, TOK, CPU).get_batch("train", torch.Generator().manual_seed(0))
    shifts = set()
    for row, p in zip(x, places):
        a, b = map(int, re.match(r"(\d+)\+(\d+)", TOK.decode(row.tolist())).groups())
        plain = torch.tensor(ex5.places(len(str(a)), len(str(b)), "add", "cot")[: len(row)])
        shift = (p[: len(plain), 0] - plain[:, 0])[plain[:, 0] > 0].unique()
        assert len(shift) == 1 and (p[: len(plain), 0][plain[:, 0] == 0] == 0).all()
        assert (p[: len(plain), 1] == plain[:, 1]).all()
        shifts.add(shift.item())
    assert shifts == set(range(8))  # every offset from 0 to --abacus_offset is drawn
    _, _, val_places = ex5.DataLoader(cfg, TOK, CPU).get_batch("val", torch.Generator().manual_seed(0))
    assert val_places[..., 0].max() <= 4  # scoring: no shift


def test_prompt_is_masked_and_the_work_is_not():
    cfg = ex5.Config(task="mul", format="cot", train_digits="1-4", batch_size=32)
    x, y, _ = ex5.DataLoader(cfg, TOK, CPU).get_batch("train", torch.Generator().manual_seed(0))
    for row, target in zip(x, y):
        text = TOK.decode(row.tolist()) + "."  # the longest problem's '.' is its last target, not in x
        start, end = text.index("=") + 1, text.index(".") + 1  # the completion is text[start:end]
        assert (target[: start - 1] == -1).all() and (target[end - 1 :] == -1).all()  # prompt, and padding after '.'
        assert TOK.decode(target[start - 1 : end - 1].tolist()) == text[start:end]  # work, answer and '.' learned
    lengths = {TOK.decode(r.tolist()).index("*") for r in x}
    assert lengths == {1, 2, 3, 4}  # operands of every trained length


def test_training_never_sees_a_held_out_problem():
    cfg = ex5.Config(task="add", format="reversed", train_digits="2", test_digits="2", batch_size=256)
    loader = ex5.DataLoader(cfg, TOK, CPU)
    gen = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(20):
        x, _, _ = loader.get_batch("train", gen)
        seen |= {tuple(map(int, re.match(r"(\d+)\+(\d+)", TOK.decode(r.tolist())).groups())) for r in x}
    held_out = set(loader.test_problems(2, 100))
    assert not seen & held_out and len(held_out) == 100 and len(seen) > 3000
    assert all(ex5.is_held_out(a, b) for a, b in held_out) and not any(ex5.is_held_out(a, b) for a, b in seen)
    assert 0.09 < sum(ex5.is_held_out(a, b) for a in range(10, 100) for b in range(10, 100)) / 8100 < 0.11


class Scripted(torch.nn.Module):
    """A model that writes a given completion for every problem: to test tracing without training."""

    def __init__(self, completion):
        super().__init__()
        self.completion = completion

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=0, places=None):
        return torch.cat([idx, torch.tensor([TOK.encode(self.completion)])], dim=1)


def test_trace_marks_the_corrupted_step(capsys):
    cfg = ex5.Config(task="mul", format="cot")
    true = ex5.write(4572, 168, "mul", "cot")[9:]  # 8:67563>67563,6:023472>698013,1:0027540>6908670|6908670.
    wrong = true.replace("6:023472>698013", "6:023472>698113")
    ex5.trace(Scripted(wrong), TOK, cfg, CPU, NO_AUTOCAST, 4572, 168)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "4572*168=" + wrong
    assert "step  1" in lines[1] and lines[1].endswith("right")
    assert "step  2" in lines[2] and "wrong: should be 6:023472>698013" in lines[2]
    assert lines[3].endswith("right") and "answer" in lines[4] and "768096  right" in lines[4]
    ex5.trace(Scripted(true.replace("|6908670", "|6908671")), TOK, cfg, CPU, NO_AUTOCAST, 4572, 168)
    lines = capsys.readouterr().out.splitlines()
    assert all(line.endswith("right") for line in lines[1:4]) and "wrong: should be 768096" in lines[4]
    ex5.trace(Scripted("8:67563>67563,6:02347"), TOK, cfg, CPU, NO_AUTOCAST, 4572, 168)  # stopped in step 2, no '|'
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].endswith("right") and "6:02347 " in lines[2] and "should be 6:023472>698013" in lines[2]
    assert "should be 1:0027540>6908670" in lines[3] and "wrong: should be 768096" in lines[4]


ARGS = "--eval_iters 2 --log_interval 10 --batch_size 32 --n_layer 2 --n_embd 32 --device cpu".split()  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(
    "fmt, pos, iters", [("cot", "abacus", 500), ("reversed", "rope", 1000), ("direct", "learned", 600)]
)
def test_one_forward_pass_scores_as_greedy_decoding_does(tmp_path, capsys, fmt, pos, iters):
    """A half-trained model (many mistakes, many right answers): accuracy() from one teacher-forced forward pass per
    problem counts exactly the problems that greedy decoding, token by token, writes right, and finds where the
    wrong ones first go wrong."""
    out = str(tmp_path / "half")
    args = ["--task", "add", "--train_digits", "1-2", "--test_digits", "1-3", "--format", fmt, "--pos", pos]
    args += ["--n_embd", "64", "--batch_size", "64", "--max_iters", str(iters), "--eval_interval", str(iters)]
    ex5.main(ARGS + args + ["--out_dir", out, "--test_problems", "5"])
    capsys.readouterr()
    ckpt = torch.load(os.path.join(out, "best.pt"), weights_only=True)
    cfg = ex5.Config(**ckpt["config"])
    model = ex5.GPT(cfg, len(ex5.VOCAB))
    model.load_state_dict(ckpt["model"])
    loader = ex5.DataLoader(cfg, TOK, CPU)
    problems = loader.test_problems(2, 150) + loader.test_problems(3, 50)
    greedy = {p: ex5.complete(model, TOK, cfg, CPU, NO_AUTOCAST, *p) for p in problems}
    acc, wrong_at = ex5.accuracy(model, problems, loader, cfg, NO_AUTOCAST)
    truth = {p: ex5.write(*p, "add", fmt).split("=", 1)[1] for p in problems}
    wrong = {p for p in problems if greedy[p] != truth[p]}
    assert 5 <= len(wrong) <= len(problems) - 5, len(wrong)  # a test of something: both kinds of answer are there
    assert set(wrong_at) == wrong and acc == (len(problems) - len(wrong)) / len(problems)
    for p in wrong:  # the first wrong step, read from greedy decoding's output
        first = next(i for i, (c, t) in enumerate(zip(greedy[p] + "?", truth[p])) if c != t)
        before = truth[p][:first]
        assert wrong_at[p] == (0 if fmt != "cot" or "|" in before else 1 + before.count(","))


def test_train_trace_resume(tmp_path, capsys):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    args = ARGS + [
        "--task",
        "mul",
        "--train_digits",
        "1-2",
        "--test_digits",
        "1-3",
        "--pos",
        "abacus",
        "--dropout",
        "0.1",
    ]
    ex5.main(args + ["--max_iters", "30", "--eval_interval", "15", "--out_dir", full, "--test_problems", "20"])
    text = capsys.readouterr().out
    assert re.search(r"digits   3: +[\d.]+% of 20 \| first wrong: step 1", text)
    assert "a wrong answer, traced:" in text and re.search(r"\n  first wrong: step 1 \d+%", text)  # at evaluations
    assert [r["acc_3"] for r in read_log(full) if r["acc_3"]] == ["0.0000"] * 3  # every evaluation, every length
    assert torch.load(os.path.join(full, "ckpt.pt"), weights_only=True)["iter_num"] == 30

    # stop at 20, then resume to 30: the same losses as the uninterrupted run, dropout, abacus offsets and all
    ex5.main(args + ["--max_iters", "20", "--eval_interval", "15", "--out_dir", part, "--test_problems", "20"])
    ex5.main(ARGS + ["--max_iters", "30", "--eval_interval", "15", "--resume", "--out_dir", part, "--dropout", "0.1"])
    assert "resuming from iter 20" in capsys.readouterr().out
    assert losses(part) == losses(full)

    ex5.main(["--out_dir", full, "--prompt", "35*7"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("35*7=") and "step  1" in lines[1] and lines[-1].startswith("  answer")
    assert "learned --task mul" in user_error(capsys, ex5.main, ["--out_dir", full, "--prompt", "35+7"])
    assert "at most 3 digits" in user_error(capsys, ex5.main, ["--out_dir", full, "--prompt", "1234*5"])
    assert "must look like" in user_error(capsys, ex5.main, ["--out_dir", full, "--prompt", "12-5"])
    line = user_error(capsys, ex5.main, ARGS + ["--task", "add", "--resume", "--out_dir", full])
    assert "--task 'add'" in line and "checkpoint's 'mul'" in line


@pytest.mark.parametrize(
    "args, words",
    [
        (["--task", "sub"], "--task: invalid choice"),
        (["--format", "scratch"], "--format: invalid choice"),
        (["--test_digits", "0"], "--test_digits '0' must be a digit count"),
        (["--train_digits", "5-3"], "--train_digits '5-3'"),
        (["--train_digits", "three"], "--train_digits 'three'"),
        (["--test_digits", "1-900"], "over 4096"),
        (["--pos", "rope", "--n_embd", "6", "--n_head", "2"], "even head width"),
    ],
)
def test_bad_settings_are_one_line(capsys, args, words):
    assert words in user_error(capsys, ex5.main, args)
