"""ex3_pretrain_finetune.py: the corpus encoding, DDP equal to one process, finetuning from the pretrained weights."""

import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from contextlib import nullcontext

import numpy as np
import pytest
import torch

import ex3_pretrain_finetune as ex3
from conftest import ROOT, TEXT, assert_causal, read_log, torchrun_and_single, user_error

TINY = [
    "--n_layer",
    "2",
    "--n_head",
    "2",
    "--n_embd",
    "32",
    "--block_size",
    "16",
    "--batch_size",
    "4",
    "--device",
    "cpu",
    "--eval_iters",
    "2",
    "--max_new_tokens",
    "20",
]
BOOK = (
    "Produced by a volunteer.\n\n*** START OF THE PROJECT GUTENBERG EBOOK {n} ***\n{body}\n"
    "*** END OF THE PROJECT GUTENBERG EBOOK {n} ***\nThe licence.\n"
)


@pytest.fixture
def corpus(tmp_path):
    """A folder of two small 'Gutenberg books' written in the words of the tiny Shakespeare text (its vocabulary)."""
    words, rng = TEXT.split(), random.Random(0)
    folder = tmp_path / "books"
    folder.mkdir()
    for n in range(2):
        body = "\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(150))
        (folder / f"book{n}.txt").write_text(BOOK.format(n=n, body=body), encoding="utf-8")
    return str(folder)


def losses(out_dir):
    return [(int(r["iter"]), float(r["train_loss"]), float(r["val_loss"] or "nan")) for r in read_log(out_dir)]


def test_causal():
    torch.manual_seed(0)
    assert_causal(ex3.GPT(ex3.Config(n_layer=2, n_head=4, n_embd=32, block_size=16), 11).eval(), 11)


# ----------------------------------------------------------------------------------------------------------
# The pretraining corpus in the Shakespeare vocabulary


def test_corpus_encoding_unknown_characters_round_trip_and_reuse(tmp_path, capsys, monkeypatch):
    books = tmp_path / "books"
    books.mkdir()
    (books / "a.txt").write_text(
        BOOK.format(n=1, body="hear me speak\u2019s caf\u00e9 \u201cAll\u201d 42"), encoding="utf-8"
    )
    with open(books / "b.txt", "w", encoding="utf-8", newline="") as f:
        f.write("You are all resolved \u2014 speak.\r\nFirst\r\n")  # no Gutenberg markers, Windows line ends
    (books / "notes.md").write_text("not a .txt file: skipped")
    tok = ex3.CharTokenizer(sorted(set(TEXT + "'-")))  # the vocabulary has ' and -, but no digits, quotes or accents

    cfg = ex3.Config(pretrain_data=str(books), data_dir=str(tmp_path / "data"), block_size=1)
    ids = ex3.prepare_pretrain_data(cfg, tok)
    out = capsys.readouterr().out
    assert isinstance(ids, np.memmap) and ids.dtype == np.uint16
    # header and licence cut, \u2019 and \u2014 written as ' and -, the accent, the quotes and the digits dropped, \r\n
    # -> \n
    expected = "hear me speak's caf All \n\n\n" + "You are all resolved - speak.\nFirst\n\n\n"
    assert tok.decode(ids.tolist()) == expected
    assert "2 curly apostrophes and dashes" in out
    assert "5 characters outside the vocabulary" in out and "dropped" in out and "'\u00e9' 1" in out
    assert f"{len(expected):,} tokens" in out

    # a second run reuses the file: nothing is encoded again
    monkeypatch.setattr(ex3, "write_corpus", lambda *a: pytest.fail("encoded again"))
    again = ex3.prepare_pretrain_data(cfg, tok)
    assert "reusing" in capsys.readouterr().out and np.array_equal(again, ids)
    monkeypatch.undo()

    # --unknown ' ': each unknown character becomes one space (a new file); --pretrain_tokens caps the corpus
    spaced = ex3.prepare_pretrain_data(
        ex3.Config(pretrain_data=str(books), data_dir=str(tmp_path / "data"), block_size=1, unknown=" "),
        ex3.CharTokenizer(tok.chars, " "),
    )
    assert (
        tok.decode(spaced.tolist()).startswith("hear me speak's caf   All    \n\n\n")
        and "replaced by ' '" in capsys.readouterr().out
    )
    capped = ex3.prepare_pretrain_data(
        ex3.Config(pretrain_data=str(books), data_dir=str(tmp_path / "data"), block_size=1, pretrain_tokens=20), tok
    )
    assert tok.decode(capped.tolist()) == expected[:20]
    assert len(os.listdir(tmp_path / "data")) == 6  # three corpora, each a .bin and its .json; no .part left


@pytest.mark.slow
def test_web_text_unreachable_fails_fast(tmp_path, text_file):
    """Without the Hugging Face offline variables and with no way to the Hub, streaming FineWeb-Edu fails within seconds
    with one line (datasets alone retries for half a minute first)."""
    unset = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    with socket.socket() as s:  # a port nothing listens on: the Hub is unreachable even on a machine that is online
        s.bind(("127.0.0.1", 0))
        env["HF_ENDPOINT"] = f"http://127.0.0.1:{s.getsockname()[1]}"
    t = time.time()
    subprocess.run([sys.executable, "-c", "import ex3_pretrain_finetune"], cwd=ROOT, env=env, check=True)
    t_import, t = time.time() - t, time.time()  # importing torch takes seconds on a busy machine: not counted
    args = TINY + [
        "--data",
        text_file,
        "--data_dir",
        str(tmp_path),
        "--out_dir",
        str(tmp_path / "o"),
        "--stage",
        "pretrain",
    ]
    p = subprocess.run(
        [sys.executable, "ex3_pretrain_finetune.py", *args], cwd=ROOT, capture_output=True, text=True, env=env
    )
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(err) == 1 and err[0].startswith("error: could not reach 127.0.0.1"), p.stderr[
        -2000:
    ]
    assert "--pretrain_data" in err[0] and time.time() - t - t_import < 10


@pytest.mark.slow
def test_web_text_offline_names_the_local_fix(tmp_path, text_file, capsys):
    """Without --pretrain_data the corpus is streamed through datasets; offline (HF_DATASETS_OFFLINE=1) that is one
    error line."""
    line = user_error(
        capsys,
        ex3.main,
        TINY
        + ["--data", text_file, "--data_dir", str(tmp_path), "--out_dir", str(tmp_path / "o"), "--stage", "pretrain"],
    )
    assert "fineweb-edu" in line and "--pretrain_data" in line
    assert not [f for f in os.listdir(tmp_path) if f.endswith((".bin", ".part"))]  # nothing half-written left behind


# ----------------------------------------------------------------------------------------------------------
# Stages


@pytest.mark.slow
def test_finetune_starts_from_the_pretrained_weights(tmp_path, text_file, corpus, capsys):
    out = str(tmp_path / "out")
    common = TINY + [
        "--data",
        text_file,
        "--pretrain_data",
        corpus,
        "--data_dir",
        str(tmp_path / "data"),
        "--out_dir",
        out,
    ]
    ex3.main(
        common + "--stage pretrain --max_iters 40 --eval_interval 40 --learning_rate 1e-2 --warmup_iters 5".split()
    )
    ex3.main(common + ["--stage", "finetune", "--finetune_iters", "2", "--eval_interval", "1"])
    ex3.main(common + ["--stage", "scratch", "--finetune_iters", "2", "--eval_interval", "1"])

    # the finetune stage's first evaluation: the loss on the finetuning text of the pretrained model it starts from
    ckpt = torch.load(os.path.join(out, "pretrain", "best.pt"), weights_only=True)
    cfg, tok = ex3.Config(**ckpt["config"]), ex3.CharTokenizer(ckpt["vocab"])
    loader = ex3.DataLoader(np.array(tok.encode(TEXT), dtype=np.uint16), cfg, torch.device("cpu"))
    pretrained = ex3.GPT(cfg, tok.vocab_size)
    pretrained.load_state_dict(ckpt["model"])
    expected = ex3.estimate_loss(pretrained, loader, cfg, nullcontext())
    first = losses(os.path.join(out, "finetune"))[0]
    assert first[0] == 0  # log.csv holds 4 decimals
    assert first[1] == pytest.approx(expected["train"], abs=1e-4)
    assert first[2] == pytest.approx(expected["val"], abs=1e-4)
    # ... not a random model's: the from-scratch stage starts near ln(vocabulary), far above
    scratch = losses(os.path.join(out, "scratch"))[0]
    assert scratch[2] == pytest.approx(math.log(tok.vocab_size), abs=0.1)
    assert first[2] < scratch[2] - 0.5


def test_stage_all_smoke_stop_and_resume(tmp_path, text_file, corpus, capsys, monkeypatch):
    common = TINY + [
        "--data",
        text_file,
        "--pretrain_data",
        corpus,
        "--data_dir",
        str(tmp_path / "data"),
        "--learning_rate",
        "1e-2",
        "--log_interval",
        "1",
    ]
    uncounted = common + ["--eval_interval", "10", "--finetune_learning_rate", "5e-3"]
    common = uncounted + ["--max_iters", "20", "--lr_decay_iters", "20", "--finetune_iters", "10"]  # --resume keeps
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    ex3.main(common + ["--out_dir", full])
    out = capsys.readouterr().out
    assert (
        "=== stage pretrain" in out
        and "=== stage finetune" in out
        and "=== stage scratch" in out
        and "--- sample 1 ---" in out
    )
    summary = next(
        line for line in out.splitlines() if line.startswith("best val loss on tiny.txt after 10 iterations")
    )
    finetuned, scratch = (float(summary.split(word)[1].split()[0]) for word in ("finetuned", "from scratch"))
    for stage in ex3.STAGES:  # ckpt.pt: the last evaluation; best.pt: the best one, without the optimizer
        ckpt, best = (torch.load(os.path.join(full, stage, f), weights_only=True) for f in ("ckpt.pt", "best.pt"))
        assert (
            ckpt["iter_num"] == (20 if stage == "pretrain" else 10) and "optimizer" in ckpt and "optimizer" not in best
        )
    assert finetuned == pytest.approx(min(r[2] for r in losses(os.path.join(full, "finetune"))), abs=1e-4)
    assert scratch == pytest.approx(min(r[2] for r in losses(os.path.join(full, "scratch"))), abs=1e-4)

    # resumed without the iteration counts, a finished run stays finished: every stage ends where it was to end
    logs = {stage: read_log(os.path.join(full, stage)) for stage in ex3.STAGES}
    bests = {stage: open(os.path.join(full, stage, "best.pt"), "rb").read() for stage in ex3.STAGES}
    ex3.main(uncounted + ["--out_dir", full, "--resume"])
    out = capsys.readouterr().out
    assert "resuming from iter 20" in out and out.count("resuming from iter 10") == 2
    assert logs == {stage: read_log(os.path.join(full, stage)) for stage in ex3.STAGES}
    assert bests == {stage: open(os.path.join(full, stage, "best.pt"), "rb").read() for stage in ex3.STAGES}

    # SIGTERM during pretraining: ckpt.pt keeps the iteration reached, the later stages never start
    get_lr = ex3.get_lr
    monkeypatch.setattr(
        ex3, "get_lr", lambda it, cfg: (it == 13 and os.kill(os.getpid(), signal.SIGTERM)) or get_lr(it, cfg)
    )
    with pytest.raises(SystemExit) as e:
        ex3.main(common + ["--out_dir", part])
    monkeypatch.undo()
    said = f"stopped: {os.path.join(part, 'pretrain', 'ckpt.pt')} holds iteration 14; continue with --resume"
    assert e.value.code == 130 and said in capsys.readouterr().err and sorted(os.listdir(part)) == ["pretrain"]
    # --stage all --resume says what each stage does, then gives the uninterrupted run's losses in every stage
    ex3.main(common + ["--out_dir", part, "--resume"])
    out = capsys.readouterr().out
    said = (
        "--resume: stage pretrain continues from iteration 14\n--resume: stage finetune has no ckpt.pt yet: it starts"
    )
    assert said in out and out.index(said) < out.index("=== stage pretrain") and "resuming from iter 14" in out
    for stage in ex3.STAGES:  # as text: nan-free
        logged = [
            [(r["iter"], r["train_loss"], r["val_loss"]) for r in read_log(os.path.join(d, stage))]
            for d in (part, full)
        ]
        assert logged[0] == logged[1], stage

    # sampling reads the finetune stage's best.pt alone
    os.remove(os.path.join(full, "finetune", "ckpt.pt"))
    ex3.main(["--out_dir", full, "--prompt", "All:", "--max_new_tokens", "10", "--device", "cpu"])
    assert "--- sample 1 ---\nAll:" in capsys.readouterr().out


def test_a_new_run_checks_every_stage_folder_first(tmp_path, text_file, corpus, capsys):
    """Without --resume, --stage all refuses a checkpoint in any stage's folder at once, before it reads any data: not
    after pretraining, and not by replacing it."""
    out, scratch = str(tmp_path / "out"), os.path.join(tmp_path, "out", "scratch", "ckpt.pt")
    ex3.main(TINY + ["--out_dir", out, "--data", text_file, "--stage", "scratch", "--finetune_iters", "1"])
    before = open(scratch, "rb").read()
    missing = str(tmp_path / "missing.txt")
    line = user_error(capsys, ex3.main, TINY + ["--out_dir", out, "--data", missing, "--pretrain_data", corpus])
    assert scratch in line and "at iteration 1" in line and "--overwrite" in line
    assert os.listdir(out) == ["scratch"] and open(scratch, "rb").read() == before


@pytest.mark.slow
def test_resume_takes_the_data_flags_from_the_checkpoint(tmp_path, text_file, corpus, capsys):
    """--resume reads the data the run was started with (typing nothing, or the same values), and refuses another."""
    out, other = str(tmp_path / "out"), str(tmp_path / "other.txt")
    args = TINY + ["--out_dir", out, "--stage", "pretrain", "--eval_interval", "2"]
    ex3.main(args + ["--data", text_file, "--pretrain_data", corpus, "--data_dir", str(tmp_path / "data"),
                     "--unknown", " ", "--pretrain_tokens", "5000", "--max_iters", "2"])  # fmt: skip
    capsys.readouterr()
    ex3.main(
        args + ["--max_iters", "4", "--resume", "--pretrain_data", corpus]
    )  # without --data: the TinyShakespeare download
    out_text = capsys.readouterr().out
    assert "resuming from iter 2" in out_text and "reusing" in out_text and "encoding" not in out_text
    open(other, "w").write(TEXT)
    conflicts = {"--data": other, "--pretrain_data": other, "--pretrain_tokens": "4000", "--data_dir": str(tmp_path),
                 "--tokenizer": "gpt2", "--unknown": "-", "--n_embd": "64"}  # fmt: skip
    for flag, value in conflicts.items():
        line = user_error(capsys, ex3.main, args + ["--max_iters", "6", "--resume", flag, value])
        assert line.startswith(f"error: {flag} ") and "differs from the checkpoint's" in line


def test_gpt2_tokenizer(tmp_path, text_file, corpus, capsys, gpt2_cache):
    import tiktoken

    out = str(tmp_path / "out")
    tiny = "--n_layer 1 --n_head 2 --n_embd 16 --block_size 16 --batch_size 2 --device cpu --eval_iters 1".split()
    tiny += ["--data", text_file, "--pretrain_data", corpus, "--data_dir", str(tmp_path / "data"), "--out_dir", out]
    ex3.main(tiny + ["--tokenizer", "gpt2", "--max_iters", "2", "--finetune_iters", "1", "--max_new_tokens", "5"])
    assert "--- sample 1 ---" in capsys.readouterr().out
    ckpt = torch.load(os.path.join(out, "finetune", "ckpt.pt"), weights_only=True)
    assert ckpt["tokenizer"] == "gpt2" and ckpt["vocab"] is None and ckpt["model"]["lm_head.weight"].shape[0] == 50257
    # the memmap decodes to the books' texts, each ended by <|endoftext|>
    (name,) = [f for f in os.listdir(tmp_path / "data") if f.endswith(".bin")]
    ids = np.memmap(tmp_path / "data" / name, dtype=np.uint16, mode="r")
    bodies = [
        open(os.path.join(corpus, f), encoding="utf-8").read().split("***\n")[1].split("*** END")[0]
        for f in sorted(os.listdir(corpus))
    ]
    assert tiktoken.get_encoding("gpt2").decode(ids.tolist()) == "".join(b + "<|endoftext|>" for b in bodies)
    ex3.main(["--out_dir", out, "--prompt", "ROMEO:", "--max_new_tokens", "3", "--device", "cpu"])
    assert "--- sample 1 ---\nROMEO:" in capsys.readouterr().out


@pytest.mark.slow
def test_user_errors(tmp_path, text_file, corpus, capsys):
    base = TINY + ["--data", text_file, "--data_dir", str(tmp_path / "data")]
    assert "--stage" in user_error(capsys, ex3.main, base + ["--stage", "everything"])
    assert "--tokenizer" in user_error(capsys, ex3.main, base + ["--tokenizer", "bpe"])
    assert "one character" in user_error(capsys, ex3.main, base + ["--unknown", "ab"])
    assert "'Z'" in user_error(
        capsys, ex3.main, base + ["--unknown", "Z", "--pretrain_data", corpus]
    )  # no Z in the tiny text
    assert "no such file or folder" in user_error(
        capsys, ex3.main, base + ["--pretrain_data", str(tmp_path / "missing")]
    )
    (tmp_path / "empty").mkdir()
    assert "no .txt files" in user_error(capsys, ex3.main, base + ["--pretrain_data", str(tmp_path / "empty")])
    out = str(tmp_path / "out")
    line = user_error(capsys, ex3.main, base + ["--stage", "finetune", "--out_dir", out])
    assert "no checkpoint" in line and "pretrain" in line and "--stage" in line
    ex3.main(
        base
        + [
            "--stage",
            "pretrain",
            "--pretrain_data",
            corpus,
            "--out_dir",
            out,
            "--max_iters",
            "1",
            "--max_new_tokens",
            "1",
        ]
    )
    other = tmp_path / "other.txt"
    other.write_text(TEXT + "Zounds!\n", encoding="utf-8")  # one more character: another vocabulary
    line = user_error(capsys, ex3.main, TINY + ["--data", str(other), "--stage", "finetune", "--out_dir", out])
    assert "another vocabulary" in line


# ----------------------------------------------------------------------------------------------------------
# Distributed data parallel

WORKER = """
import os, sys
sys.path.insert(0, {root!r})
import torch
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
import ex3_pretrain_finetune as ex3

allreduces, models = [0], []


class CountingDDP(ex3.DDP):  # counts the gradient all-reduces (one per bucket per synchronised backward)
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_comm_hook(None, self.count)

    @staticmethod
    def count(state, bucket):
        allreduces[0] += 1
        return default_hooks.allreduce_hook(state, bucket)


def train(cfg, model, *args, **kwargs):
    models.append(model)
    return TRAIN(cfg, model, *args, **kwargs)


ex3.DDP, TRAIN, ex3.train = CountingDDP, ex3.train, train
ex3.main(sys.argv[1:])
out = sys.argv[sys.argv.index("--out_dir") + 1]
torch.save(
    {{"params": models[0].state_dict(), "allreduces": allreduces[0]}},
    os.path.join(out, "rank" + os.environ.get("RANK", "0") + ".pt"),
)
"""


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(tmp_path, text_file, corpus):
    """torchrun --nproc_per_node 2 on the CPU (gloo): parameters identical across ranks, the loss curve of one process
    with the same global batch (4 micro-batches: 2 per rank), and one gradient all-reduce per step, not per
    micro-batch."""
    steps = 5
    args = TINY + ["--data", text_file, "--pretrain_data", corpus, "--data_dir", str(tmp_path / "data"),
                   "--stage", "pretrain", "--max_iters", str(steps), "--warmup_iters", "0",
                   "--eval_interval", str(steps), "--log_interval", "1", "--gradient_accumulation_steps", "4",
                   "--learning_rate", "1e-2", "--max_new_tokens", "5"]  # fmt: skip
    ddp, one, p, q = torchrun_and_single(tmp_path, WORKER.format(root=ROOT), args)
    assert p.stdout.count("iter 0 | train") == 1 and "2 processes x 2 micro-batches" in p.stdout  # only rank 0 prints
    assert "reusing" in q.stdout  # the corpus torchrun's rank 0 encoded

    a, b = losses(os.path.join(ddp, "pretrain")), losses(os.path.join(one, "pretrain"))
    assert [r[0] for r in a] == [r[0] for r in b] and len(a) == steps + 2  # a loss every step, and two evaluations
    assert np.allclose(np.array(a)[:, 1:], np.array(b)[:, 1:], atol=2e-4, rtol=0, equal_nan=True)  # log.csv: .4f
    assert a[-1][2] < a[0][2] - 0.1  # it did train
    r0, r1, single = (
        torch.load(os.path.join(d, f), weights_only=True)
        for d, f in ((ddp, "rank0.pt"), (ddp, "rank1.pt"), (one, "rank0.pt"))
    )
    for name, p0 in r0["params"].items():
        assert torch.equal(p0, r1["params"][name]), name
        assert torch.allclose(p0, single["params"][name], atol=1e-5), name
    # the tiny model's gradients fit in one DDP bucket: one all-reduce per step; without no_sync it would be two
    assert r0["allreduces"] == r1["allreduces"] == steps and single["allreduces"] == 0
    assert os.path.exists(os.path.join(ddp, "pretrain", "ckpt.pt")) and not os.path.exists(
        os.path.join(ddp, "pretrain", "ckpt.pt.tmp")
    )


def torchrun_env():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


@pytest.mark.slow
def test_torchrun_mistake_is_one_line(tmp_path, text_file):
    """Under torchrun a bad flag (found before the process group starts) and a missing data file (found after) each give
    one error line, rank 0's, even when rank 0 starts last, and no traceback from the script. torchrun then prints its
    own ChildFailedError report, traceback included, as it does whenever a process fails: a script cannot stop that."""
    # rank 0 late: the others must not end the run (torchrun stops all) before it says why
    worker = tmp_path / "worker.py"
    worker.write_text(f"import os, sys, time\nsys.path.insert(0, {ROOT!r})\n"
                      "time.sleep(3 if os.environ['RANK'] == '0' else 0)\n"
                      "import ex3_pretrain_finetune as ex3\nex3.main(sys.argv[1:])\n")  # fmt: skip
    missing = TINY + [
        "--data",
        str(tmp_path / "missing.txt"),
        "--stage",
        "scratch",
        "--gradient_accumulation_steps",
        "2",
    ]
    for args, expect in [
        (["--n_layer", "0"], "--n_layer"),
        (missing + ["--out_dir", str(tmp_path / "o")], "no such file"),
    ]:
        p = subprocess.run(
            TORCHRUN + [str(worker), *args], capture_output=True, text=True, timeout=180, env=torchrun_env()
        )
        errors = [line for line in (p.stdout + p.stderr).splitlines() if "error: " in line]
        assert p.returncode != 0 and len(errors) == 1, p.stderr[-3000:]
        assert errors[0].startswith("error: ") and expect in errors[0]
        assert 'ex3_pretrain_finetune.py", line' not in p.stderr  # a traceback from the script would name its lines
        assert "exitcode  : 2" in p.stderr


@pytest.mark.slow
def test_torchrun_sigterm_to_one_process_stops_every_rank(tmp_path, text_file, corpus, capsys):
    """SIGTERM to one process of two: both stop at the top of the same iteration, rank 0 saves it in ckpt.pt, and
    --resume (here in one process) continues to the losses of a run that was never stopped."""
    worker = tmp_path / "worker.py"  # writes its process id to pid<RANK>
    worker.write_text(f"import os, sys\nsys.path.insert(0, {ROOT!r})\nimport ex3_pretrain_finetune as ex3\n"
                      f"open(os.path.join({str(tmp_path)!r}, 'pid' + os.environ['RANK']), "
                      "'w').write(str(os.getpid()))\n"
                      "ex3.main(sys.argv[1:])\n")  # fmt: skip
    args = TINY + ["--data", text_file, "--pretrain_data", corpus, "--data_dir", str(tmp_path / "data"),
                   "--stage", "pretrain", "--warmup_iters", "0", "--lr_decay_iters", "50", "--eval_interval", "1000",
                   "--log_interval", "1", "--gradient_accumulation_steps", "2", "--learning_rate", "1e-2",
                   "--max_new_tokens", "5"]  # fmt: skip
    stopped, straight = str(tmp_path / "stopped"), str(tmp_path / "straight")
    cmd = TORCHRUN + [str(worker), *args, "--max_iters", "100000", "--out_dir", stopped]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=torchrun_env())
    try:
        assert any(line.startswith("iter 3 | loss") for line in proc.stdout), proc.stderr.read()[-3000:]
        os.kill(int((tmp_path / "pid1").read_text()), signal.SIGTERM)  # rank 1 alone
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    stops = re.findall(r"stopped: (.*) holds iteration (\d+); continue with --resume", err)
    assert len(stops) == 1 and stops[0][0] == os.path.join(stopped, "pretrain", "ckpt.pt"), err[-3000:]
    it = int(stops[0][1])
    assert it > 3 and torch.load(stops[0][0], weights_only=True)["iter_num"] == it and "exitcode  : 130" in err

    ex3.main(args + ["--max_iters", str(it + 3), "--out_dir", stopped, "--resume"])
    assert f"resuming from iter {it}" in capsys.readouterr().out
    ex3.main(args + ["--max_iters", str(it + 3), "--out_dir", straight])
    a, b = losses(os.path.join(stopped, "pretrain")), losses(os.path.join(straight, "pretrain"))
    assert [r[0] for r in a] == [r[0] for r in b] == [0] + list(range(it + 3)) + [it + 3]
    assert np.allclose(np.array(a)[:, 1:], np.array(b)[:, 1:], atol=2e-4, rtol=0, equal_nan=True)  # log.csv: .4f
