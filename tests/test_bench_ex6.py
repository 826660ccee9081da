"""benchmarks/bench_ex6.py, the speedrun of ex6 against ex1 and ex4, checked without its long runs: every command line
it builds is one its script accepts, each piece taken out changes that piece alone, the runs interleave, the tables
and the verdict come out right from made-up logs, and --quick runs end to end."""

import math
import os
import sys
from dataclasses import asdict

import pytest

import ex1_gpt
import ex4_mqa_swiglu
import ex6_modern_gpt
from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import bench_ex6  # noqa: E402

MODULES = {"ex1_gpt.py": ex1_gpt, "ex4_mqa_swiglu.py": ex4_mqa_swiglu, "ex6_modern_gpt.py": ex6_modern_gpt}
# every piece out: ex4's choices (tests/test_ex6.py's OFF)
EX4 = dict(norm="layernorm", qk_norm=False, mlp="swiglu", residual_scale=False, zero_init=False, untied_head=False,
           softcap=0.0, optimizer="adamw", schedule="cosine")  # fmt: skip


def parsed(a, name, seed=1):
    script = bench_ex6.CONFIGS[name][0]
    return asdict(MODULES[script].parse_args(bench_ex6.run_flags(a, name, seed) + ["--out_dir", "x"]))


@pytest.mark.parametrize("quick", [[], ["--quick"]], ids=["full", "quick"])
def test_every_run_parses_and_each_piece_changes_one_field(quick):
    """Each configuration's command line is accepted by its script's own parser, with the fixed work (200 batches per
    evaluation, the data, the seed); each piece taken out changes that one field of ex6's Config, to ex4's value."""
    a = bench_ex6.parse(quick + ["--data", "x.txt", "--ex6_flags", "--max_iters 500"])
    full = parsed(a, "ex6")
    assert full["max_iters"] == (30 if quick else 500) and full["data"] == os.path.abspath("x.txt")
    assert full["eval_iters"] == (2 if quick else 200) and full["eval_interval"] == (5 if quick else 10)
    for name in bench_ex6.CONFIGS:
        cfg = parsed(a, name)
        assert cfg["device"] == "cpu" and cfg["threads"] == (1 if quick else 2) and cfg["max_new_tokens"] == 0
        if name.startswith("ex6-"):
            piece = name[4:]
            assert {k for k in cfg if cfg[k] != full[k]} == {piece}, name
            assert cfg[piece] == EX4[piece]
    assert parsed(a, "ex1")["eval_interval"] == (5 if quick else 100) and parsed(a, "ex1")["max_iters"] != 500
    assert parsed(a, "ex4")["eval_interval"] == (5 if quick else 25)
    assert set(EX4) == set(bench_ex6.PIECES)


def test_runs_interleave_seed_by_seed():
    assert bench_ex6.order(["a", "b", "c"], [1, 2, 3]) == [
        ("a", 1), ("b", 1), ("c", 1), ("c", 2), ("b", 2), ("a", 2), ("a", 3), ("b", 3), ("c", 3)
    ]  # fmt: skip


def fake(vals, ms=100.0, every=10, status="ok"):
    """A run whose evaluations, every `every` iterations of ms milliseconds, gave vals."""
    evals = [(i * every, v, i * every * ms / 1000, 0.0) for i, v in enumerate(vals)]
    return {"status": status, "evals": evals, "ms": ms}


def test_time_to_target_budgets_and_spread():
    run = fake([2.5, 2.0, 1.95, 1.90, 1.85])
    assert bench_ex6.reach(run["evals"], 1.90) == (30, 3.0)
    assert bench_ex6.seconds(fake([2.5, 1.95]), 1.90) == math.inf
    assert bench_ex6.val_at(run["evals"], 2.5) == 1.95 and bench_ex6.val_at(run["evals"], -1) is None
    assert bench_ex6.spread([3.0, 1.0, 2.0], ".1f", " s") == "2.0 s (1.0 s to 3.0 s)"
    assert bench_ex6.spread([3.0, math.inf, 2.0], ".1f", " s") == "3.0 s (2.0 s to not reached), 2 of 3 seeds"
    assert bench_ex6.spread([1.5], ".2f") == "1.50"


def test_tables_and_verdict(capsys):
    """ex6 in 40% of ex4's time meets the target; the record table has the whole recipe, then each piece out."""
    a = bench_ex6.parse(["--seeds", "1,2", "--configs", "ex1,ex4,ex6,ex6-softcap"])
    results = {
        "ex1": {1: fake([2.5, 2.0, 1.95], status="ok"), 2: fake([2.5, 1.9], status="stopped at target")},
        "ex4": {s: fake([2.5, 2.2, 2.0, 1.95, 1.9], status="stopped at target") for s in (1, 2)},
        "ex6": {1: fake([2.5, 1.9, 1.8]), 2: fake([2.5, 1.95, 1.85, 1.80])},
        "ex6-softcap": {1: fake([2.5, 2.0, 1.9]), 2: fake([2.5, 2.0, 1.95, 1.9])},
    }
    bench_ex6.headline(a, results)
    bench_ex6.record(a, results)
    out = capsys.readouterr().out
    verdict = "Target: ex6 reaches val 1.90 in at most half of ex4's time (medians over the seeds): met: 1.5 s against "
    assert verdict + "4.0 s, 38% (seed 1 25%, seed 2 50%)" in out
    assert "| ex1_gpt.py (defaults) | 1: not reached; 2: 1.0 s (iter 10) | not reached (1.0 s to not reached)" in out
    assert "| ok 1, stopped at target 1 |" in out
    whole = "| the whole recipe | 1.5 s (1.0 s to 2.0 s) | 1.00 | 1.8000 (1.8000 to 1.8000) (iter 20/30) |"
    assert whole + " 1.9250 (1.9000 to 1.9500) | 100.0 | ok 2 |" in out  # val at the whole recipe's median time
    assert "| --softcap 0 | 2.5 s (2.0 s to 3.0 s) | 1.67 |" in out
    assert "| val at 1.5 s |" in out and "1.5 s of training (the full recipe's median time to the target)" in out
    ex4_late = {**results, "ex4": {s: fake([2.5, 2.2, 2.1, 2.0, 1.95]) for s in (1, 2)}}
    assert bench_ex6.verdict(a, ex4_late).endswith(": met: ex6 1.5 s; ex4 had not reached it after 4.0 s")
    ex4_early = {**results, "ex4": {s: fake([2.5, 2.0, 1.95]) for s in (1, 2)}}
    assert bench_ex6.verdict(a, ex4_early).endswith(": not known: ex6 1.5 s; ex4 had not reached it after 2.0 s")
    ex6_slow = {**results, "ex6": {s: fake([2.5, 2.2, 2.1, 2.0, 1.95, 1.9]) for s in (1, 2)}}
    assert ": NOT met: 5.0 s against 4.0 s, 125%" in bench_ex6.verdict(a, ex6_slow)


@pytest.mark.slow
def test_quick_run_end_to_end(tmp_path, text_file, capsys):
    """--quick on a small text: the references stop at the target (SIGTERM), ex6 trains on to its last iteration, the
    tables and the picture are made, the checkpoints deleted; --collect makes the same tables from the saved output."""
    flags = ["--quick", "--configs", "ex4,ex6", "--seeds", "1", "--data", text_file, "--out_dir", str(tmp_path)]
    bench_ex6.main(flags + ["--target", "3.0"])
    out = capsys.readouterr().out
    runs = tmp_path / "quick"
    assert sorted(p.name for p in runs.iterdir()) == ["ex4_seed1", "ex6_seed1", "ex6_speedrun.png", "header.md"]
    assert not list(runs.glob("*/*.pt"))
    ex4, ex6 = bench_ex6.read(bench_ex6.parse(flags), "ex4", 1), bench_ex6.read(bench_ex6.parse(flags), "ex6", 1)
    assert ex4["status"] == "stopped at target" and ex4["evals"][-1][1] <= 3.0
    assert ex6["status"] == "ok" and ex6["evals"][-1][0] == 30
    tables = out[out.index("### ex1, ex4 and ex6") :]
    assert "| the whole recipe |" in tables and "Target: ex6 reaches val 3.0" in tables
    bench_ex6.main(flags + ["--target", "3.0", "--collect"])
    again = capsys.readouterr().out
    assert again[again.index("### ex1, ex4 and ex6") :] == tables
    assert "## ex6: the speedrun" in again and "--collect" not in again.split("\n\n")[2]  # the run's own header
