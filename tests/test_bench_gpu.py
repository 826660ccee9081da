"""benchmarks/bench_gpu.py, the one command for every GPU measurement, checked on the CPU: the whole run at tiny sizes
(every part writes its table), the scripts part's GPU path with fake runs, the time budgets, the stop signals and the
verdicts printed when a target is missed."""

import os
import subprocess
import sys
import time

import pytest

from conftest import ROOT, TEXT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import bench_gpu  # noqa: E402

pytestmark = pytest.mark.slow  # the whole module: python -m pytest -m 'not slow' leaves it out

PART_TITLES = (
    "## ex1 at nanoGPT's GPU settings",
    "## ex4's defaults at the same model size",
    "## ex3 at GPT-2 small size",
    "## Attention, forward + backward",
    "## Every script, compiled and not",
)


def small_data(tmp_path):
    """TinyShakespeare, a pretraining corpus and WikiText-2 stand-ins, small enough for tiny models."""
    text = tmp_path / "shakespeare.txt"
    text.write_text(TEXT, encoding="utf-8")
    books = tmp_path / "books"
    books.mkdir()
    (books / "book.txt").write_text("*** START OF THE BOOK ***\n" + TEXT * 3 + "*** END OF THE BOOK ***\n")
    wiki = tmp_path / "wikitext-2"
    wiki.mkdir()
    (wiki / "valid.txt").write_text(TEXT)
    (wiki / "test.txt").write_text(TEXT[:3000])
    return ["--data", str(text), "--books", str(books), "--wikitext", str(wiki)]


def test_tiny_run_writes_every_table(tmp_path, gpt2_cache):
    """`bench_gpu.py --tiny`: every part runs every script it runs on the GPU, with the same flags but the model size,
    and writes its table; nothing fails. --target 10 is reached at the first evaluation, so ex4's run is stopped
    there by SIGTERM, as on the GPU when it reaches 1.47."""
    md = tmp_path / "gpu.md"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_gpu.py"), "--tiny", "--md", str(md)]
    cmd += ["--out_root", str(tmp_path / "out"), "--target", "10", *small_data(tmp_path)]
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    report = md.read_text()
    for title in PART_TITLES:
        assert title in report and title in p.stdout, title
    assert "Machine: " in report and "Command: `python benchmarks/bench_gpu.py --tiny" in report
    assert "failed" not in report and "skipped: time budget" not in report, report
    assert "| ex4_mqa_swiglu.py (MQA, SwiGLU, RoPE) | stopped at target |" in report
    assert "Target val <= 10.0: met" in report
    rows = [line for line in report.splitlines() if line.startswith("| ") and ".py" in line.split("|")[1]]
    assert len(rows) == 3 + 18  # ex1, ex4, ex3 at GPT-2 size, and every script compiled and not
    print(f"bench_gpu.py --tiny took {time.time() - t0:.0f} s")


# ----------------------------------------------------------------------------------------------------------
# The scripts part as it runs on a GPU, with fake runs


def fake_text(name, compiled):
    lines = ["iter 0 | train 4.1000 | val 4.1000 | 0.1 s", "iter 0 | loss 4.1000 | 900.0 ms | 1.0k tok/s | mfu 1.0%"]
    ms = 10.0 if compiled else 20.0
    lines += [f"iter {i} | loss 3.0000 | {ms} ms | {1000 / ms:.1f}k tok/s | mfu {300 / ms:.1f}%" for i in range(1, 30)]
    if name == "gan_text":
        lines += [f"round {i} | D loss 0.6000 | reward 0.5000 (baseline 0.5000) | 50.0 ms" for i in range(4)]
    return "\n".join(lines + ["peak_cuda_bytes 2147483648"]) + "\n"


@pytest.fixture
def gpu_args(tmp_path, monkeypatch):
    """Arguments as on a GPU, and a fake launch() that records each run instead of starting it."""
    a = bench_gpu.parse(["--md", str(tmp_path / "gpu.md"), "--out_root", str(tmp_path / "out"), "--data", "x.txt"])
    a.env, calls = {}, []

    def launch(name, script, flags, out_dir, deadline, env, stop=None):
        calls.append((name, script, flags))
        return bench_gpu.Run(name, out_dir, text=fake_text(name, "--compile" in flags), wall=5.0, rss_mb=100.0)

    monkeypatch.setattr(bench_gpu, "launch", launch)
    return a, calls


def test_scripts_part_on_a_gpu(gpu_args):
    """Without --tiny: every script runs uncompiled; the compiled rows of ex1, ex4 and ex3 are the runs of parts ex1,
    ex4 and gpt2; the other six first run one compiled iteration each (the compile warm-up), then are measured."""
    a, calls = gpu_args
    ctx = {part: bench_gpu.Run(part, "", text=fake_text(part, True), wall=60.0) for part in ("ex1", "ex4", "gpt2")}
    report = bench_gpu.Report(a.md, "# test\n")
    bench_gpu.part_scripts(a, ctx, report, time.time() + 1000)
    eager = [c for c in calls if "--compile" not in c[2]]
    warm = [c for c in calls if c[0].endswith("warm-up")]
    measured = [c for c in calls if "--compile" in c[2] and not c[0].endswith("warm-up")]
    assert len(eager) == 9 and all("--device" in c[2] and "cuda" in c[2] and "bfloat16" in c[2] for c in calls)
    cold = ["ex2", "ex6", "rnn_lm", "switchhead_moe", "gan_text", "flash_moe_finetune"]
    assert sorted(c[0] for c in measured) == sorted(cold)
    assert sorted(c[0].split()[0] for c in warm) == sorted(cold)
    assert all(bench_gpu.flag(c[2], "--max_iters", None) == "1" for c in warm)
    assert all(bench_gpu.flag(c[2], "--max_iters", None) == "30" for c in eager + measured)
    table = open(a.md).read()
    rows = [line for line in table.splitlines() if line.startswith("| ") and ".py" in line]
    assert len(rows) == 18
    assert sum("the run of part" in r for r in rows) == 3
    compiled = [r for r in rows if "| yes |" in r and "the run of part" not in r]
    assert all("| 10.0 | 100.0k | 30.0% | 2.00 GB | 5 s |" in r for r in compiled), compiled
    assert "adversarial round 50 ms" in table
    assert "The compile warm-up (6 runs of one iteration each, in parallel) took 0 s." in table
    gan = [c[2] for c in warm if c[0].startswith("gan_text")][0]
    assert bench_gpu.flag(gan, "--adv_rounds", None) == "0"  # the warm-up only compiles


def test_warmup_alongside_the_attention_part(gpu_args):
    """main() starts the warm-up with the attention part; the scripts part waits for it, then measures."""
    a, calls = gpu_args
    ctx = {}
    ctx["warmup"] = bench_gpu.start_warmup(a, ctx, time.time() + 1000)
    time.sleep(1.5)  # the attention part
    bench_gpu.part_scripts(a, ctx, bench_gpu.Report(a.md, "# test\n"), time.time() + 1000)
    assert len([c for c in calls if c[0].endswith("warm-up")]) == 9  # nothing reused: no other part ran
    assert "the first 2 s alongside the attention part." in open(a.md).read()


def test_scripts_part_out_of_time(gpu_args):
    """Past its deadline the part starts nothing, and still writes its table, every row marked as skipped."""
    a, calls = gpu_args
    report = bench_gpu.Report(a.md, "# test\n")
    bench_gpu.part_scripts(a, {}, report, time.time() - 1)
    assert calls == []
    rows = [line for line in open(a.md).read().splitlines() if line.startswith("| ") and ".py" in line]
    assert len(rows) == 18 and all("skipped: time budget" in r for r in rows)


def test_part_ex1_and_gpt2_report_targets(gpu_args, monkeypatch):
    """The ex1 and gpt2 tables from CUDA output: val, time to target, MFU and peak memory, and the verdicts."""
    a, _ = gpu_args
    text = "".join(f"iter {i} | train 1.6 | val {1.6 - i / 50000:.4f} | {i / 25:.1f} s\n" for i in range(0, 5001, 250))
    text += "".join(f"iter {i} | loss 1.5 | 20.0 ms | 819.2k tok/s | mfu 12.0%\n" for i in range(0, 5000, 10))
    text += "peak_cuda_bytes 3221225472\n"
    monkeypatch.setattr(bench_gpu, "launch", lambda *args, **kw: bench_gpu.Run("ex1", "", text=text, wall=190.0))
    ctx, report = {}, bench_gpu.Report(a.md, "# test\n")
    bench_gpu.part_ex1(a, ctx, report, time.time() + 100)
    bench_gpu.part_gpt2(a, ctx, report, time.time() + 100)
    out = open(a.md).read()
    assert "| 5000 | 1.5000 | 1.5000 | not reached | 200 s | 190 s | 20.0 | 819.2k | 12.0% | 3.00 GB |" in out
    assert "Target val <= 1.47: NOT met: final val 1.5000 is 0.0300 above 1.47." in out
    assert "Target MFU >= 40%: NOT met: MFU 12.0% is 28.0 points below 40%." in out


def test_verdicts_say_by_how_much():
    assert bench_gpu.val_verdict(1.4650) == "met: final val 1.4650 <= 1.47"
    assert bench_gpu.val_verdict(1.5) == "NOT met: final val 1.5000 is 0.0300 above 1.47"
    assert bench_gpu.mfu_verdict(43.2) == "met: MFU 43.2% >= 40%"
    assert bench_gpu.mfu_verdict(None).startswith("NOT measured")
    hit = (2000, 1.469, 70.0)  # ex4 reached 1.47 at iteration 2000, after 70 s
    assert bench_gpu.time_verdict(hit, 160.0, 1.46, 70.0) == "met: 70 s is 44% of ex1's 160 s (target <= 50%)"
    late = bench_gpu.time_verdict((2500, 1.468, 100.0), 160.0, 1.468, 100.0)
    assert late == "NOT met: 100 s is 62% of ex1's 160 s, 20 s over the target of 50%"
    never = bench_gpu.time_verdict(None, 160.0, 1.4912, 120.0)
    assert never == "NOT met: val 1.47 not reached in 120 s (best val 1.4912, 0.0212 above 1.47); the target was 80 s"
    assert bench_gpu.time_verdict(hit, None, 1.46, 70.0).startswith("no ex1 time")
    assert (
        bench_gpu.time_verdict(hit, 0.0, 1.46, 70.0)
        == "NOT met: 70 s is inf% of ex1's 0 s, 70 s over the target of 50%"
    )


def test_parse_defaults_and_errors(capsys):
    a = bench_gpu.parse([])
    assert (a.time_limit, a.lengths, a.heads, a.script_iters, a.ex4_iters) == (
        480,
        [4096, 8192, 16384, 32768],
        12,
        30,
        2500,
    )
    t = bench_gpu.parse(["--tiny", "--parts", "attention"])
    assert t.parts == ["attention"] and t.lengths == [64, 128] and t.time_limit == 1200
    with pytest.raises(SystemExit):
        bench_gpu.parse(["--parts", "ex1,gpu"])
    assert "unknown part(s) ['gpu']" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------
# launch(): the deadline, the stop signal and helper processes that outlive a script


def test_launch_stops_at_the_deadline_and_when_asked(tmp_path):
    """A run past its deadline gets SIGTERM (then SIGKILL); a stop(line) that says yes sends SIGTERM at once; a helper
    process left holding the output open does not keep launch() waiting."""
    script = tmp_path / "slow.py"
    script.write_text(
        "import subprocess, sys, time\n"
        "print('iter 0 | train 3.0000 | val 2.0000 | 0.1 s', flush=True)\n"
        "if '--helper' in sys.argv:\n"
        "    subprocess.Popen(['sleep', '60'])  # inherits stdout, as compile workers do\n"
        "    sys.exit(0)\n"
        "time.sleep(60)\n"
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.time()
    run = bench_gpu.launch("slow", str(script), [], str(tmp_path / "a"), time.time() + 15, env)
    assert run.status == "stopped at time budget" and time.time() - t0 < 50
    assert run.evals == [(0, 3.0, 2.0, 0.1)]
    t0 = time.time()
    run = bench_gpu.launch("slow", str(script), [], str(tmp_path / "b"), time.time() + 60, env, lambda x: "val" in x)
    assert run.status == "stopped at target" and time.time() - t0 < 30
    t0 = time.time()
    run = bench_gpu.launch("slow", str(script), ["--helper"], str(tmp_path / "c"), time.time() + 60, env)
    assert run.status == "ok" and time.time() - t0 < 30
    past = bench_gpu.launch("slow", str(script), [], str(tmp_path / "d"), time.time() - 1, env)
    assert past.status == "skipped: time budget" and not past.ran


def test_gpu_flags_parse_in_every_script(gpu_args):
    """The GPU-sized command lines (not run here) are accepted by each script's own parser: no typo in a flag, no value
    out of range."""
    import importlib

    a, _ = gpu_args
    commands = [
        ("ex1_gpt", bench_gpu.ex1_flags(a)),
        ("ex4_mqa_swiglu", bench_gpu.ex4_flags(a)),
        ("ex3_pretrain_finetune", bench_gpu.gpt2_run_flags(a) + ["--compile"]),
    ]
    for name, script, flags in bench_gpu.script_configs(a):
        for warm in ([], ["--compile"] + bench_gpu.WARM_FLAGS.get(name, [])):
            commands.append((script[:-3], flags + bench_gpu.iteration_flags(script, 30, a) + warm))
    for module, flags in commands:
        cfg = importlib.import_module(module).parse_args(flags + bench_gpu.device_flags(a) + ["--out_dir", "x"])
        assert cfg.device == "cuda" and cfg.dtype == "bfloat16", module
    assert len(commands) == 3 + 18


def test_pack_copies_what_the_gpu_run_reads(tmp_path):
    src, dst = tmp_path / "shared", tmp_path / "packed"
    for sub in ("tiktoken_cache", "wikitext-2", "gutenberg/books"):
        (src / sub).mkdir(parents=True)
    (src / "tinyshakespeare.txt").write_text(TEXT)
    (src / "tiktoken_cache" / "abc").write_text("bpe")
    (src / "wikitext-2" / "valid.txt").write_text(TEXT)
    (src / "wikitext-2" / "test.txt").write_text(TEXT)
    for i in range(5):
        (src / "gutenberg" / "books" / f"book{i}.txt").write_text("x" * 600_000)
    bench_gpu.main(["--pack", str(dst), "--data_root", str(src), "--pack_mb", "1"])
    a = bench_gpu.parse(["--data_root", str(dst)])
    assert os.path.isfile(a.data) and os.path.isfile(os.path.join(a.tiktoken_cache, "abc"))
    assert os.path.isfile(os.path.join(a.wikitext, "test.txt"))
    assert sorted(os.listdir(a.books)) == ["book0.txt", "book1.txt"]  # just over --pack_mb


def test_a_failing_part_leaves_the_others(tmp_path, monkeypatch):
    """An exception in one part is written into the report, and the next part still runs."""

    def broken(a, ctx, report, deadline):
        raise RuntimeError("a bug")

    monkeypatch.setattr(bench_gpu, "part_ex1", broken)
    md, text = tmp_path / "gpu.md", tmp_path / "text.txt"
    text.write_text(TEXT)
    flags = ["--tiny", "--parts", "ex1,attention", "--md", str(md), "--data", str(text), "--lengths", "32"]
    bench_gpu.main(flags + ["--reps", "1"])
    report = md.read_text()
    assert "## Part ex1 failed" in report and "RuntimeError: a bug" in report
    assert "## Attention, forward + backward" in report and "All parts took" in report
