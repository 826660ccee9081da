"""bfloat16 autocast, as a GPU runs it, proved on the CPU: for every script, training through `main` with
`--dtype bfloat16` logs losses close to float32's (the same seed, data and batches), and the checkpoint it writes
(float32 weights, as autocast keeps them) resumes with `--resume --dtype float32` and samples with
`--prompt ... --dtype float32`.

Each case trains N iterations under bfloat16, resumes for N more in float32, and compares every loss of its log.csv
with a float32 run of 2N iterations. The tolerance, TOL = 0.1 nats: bfloat16 keeps 8 significant bits (7 stored), a
relative rounding error of up to 2^-8 (0.4%) per rounding. Autocast runs the matrix multiplications in it; their float32
accumulation and the float32 softmax, LayerNorm and loss keep the error from growing with the width, so a loss of
about 3.5 nats moves by a few thousandths at first (measured: at most 0.008 over the bfloat16 iterations), and the
AdamW steps that follow at a learning rate of 1e-2 carry the difference on; a router that picks another expert, or
a GAN that samples other sequences, makes it jump (measured: at most 0.048 by iteration 2N, SwitchHead). 0.1 leaves
a margin of two over that, while a model that breaks under bfloat16 (an overflow, a lost mask, a mixed-dtype
bug) is off by more: the untrained loss is ln(vocabulary size) and these steps lower it by about 0.5 nats. The runs
must also differ somewhere: that is the proof that autocast ran in bfloat16 at all."""

import math
import os

import pytest
import torch

import ex1_gpt as ex1
import ex2_addition as ex2
import ex3_pretrain_finetune as ex3
import ex4_mqa_swiglu as ex4
import ex5_chain_of_thought as ex5
import flash_moe_finetune as fm
import gan_text as gan
import rnn_lm
import switchhead_moe as sh
from conftest import read_log

pytestmark = pytest.mark.slow  # the whole module: python -m pytest -m 'not slow' leaves it out

TOL = 0.1  # nats: the largest difference allowed between a loss logged after bfloat16 training and float32's
N = 4  # iterations under bfloat16, then N more in float32 after --resume
WIKI = " = Lobster = \n \n The lobster is a red animal . It 's highly esteemed , and the crab is green .\n"

# Every run: a constant learning rate (min_lr = learning_rate, no warmup), so that the schedule does not depend on
# the number of iterations, and evaluations at 0, N and 2N.
FLAT = ["--device", "cpu", "--learning_rate", "1e-2", "--min_lr", "1e-2", "--warmup_iters", "0", "--eval_interval",
        str(N), "--eval_iters", "2", "--log_interval", "1"]  # fmt: skip
GPT = ["--data", "{text}", "--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "16", "--batch_size",
       "4", "--dropout", "0.1", "--max_new_tokens", "10"]  # fmt: skip
RNN = "--data {text} --n_embd 16 --n_hidden 32 --block_size 16 --batch_size 4 --max_new_tokens 10".split()  # fmt: skip
SAMPLE = "--- sample 1 ---\nAll:"  # what sampling prints for the prompt "All:"


# name: (script, its arguments, the flag that sets the number of iterations, the log's folder under --out_dir, a
# prompt, what sampling from it prints)
CASES = {
    "ex1": (ex1, GPT, "--max_iters", "", "All:", SAMPLE),
    "ex2": (ex2, ["--digits", "2", "--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--batch_size", "16",
                  "--dropout", "0.1", "--test_problems", "10"], "--max_iters", "", "12+34", "12+34="),
    "ex5-cot-abacus": (ex5, ["--task", "add", "--train_digits", "1-2", "--test_digits", "1-2", "--pos", "abacus",
                             "--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--batch_size", "16", "--dropout",
                             "0.1", "--test_problems", "10"], "--max_iters", "", "12+34", "12+34="),
    "ex3": (ex3, GPT + ["--stage", "scratch"], "--finetune_iters", "scratch", "All:", SAMPLE),
    "ex4": (ex4, GPT, "--max_iters", "", "All:", SAMPLE),  # MQA, SwiGLU, RoPE
    "ex4-gqa-window": (ex4, GPT + ["--n_head", "4", "--n_kv_head", "2", "--window", "4"], "--max_iters", "", "All:",
                       SAMPLE),
    "rnn_lm-lstm": (rnn_lm, RNN + ["--cell", "lstm", "--n_layer", "2", "--dropout", "0.1"], "--max_iters", "",
                    "All:", SAMPLE),
    "rnn_lm-elman": (rnn_lm, RNN + ["--cell", "elman"], "--max_iters", "", "All:", SAMPLE),
    "switchhead_moe": (sh, GPT + ["--head_size", "8"], "--max_iters", "", "All:", SAMPLE),
    "gan_text": (gan, GPT + ["--head_size", "8", "--seq_len", "12", "--d_embd", "8", "--d_hidden", "16",
                             "--gan_batch_size", "4", "--eval_samples", "6", "--max_iters", str(N),
                             "--d_pretrain_iters", "2", "--adv_eval_interval", str(N), "--rollouts", "1",
                             "--mle_weight", "0.5", "--adv_learning_rate", "1e-3"], "--adv_rounds", "", "All:",
                 SAMPLE),  # MLE, then the discriminator, then the rounds: N rounds in bfloat16, N in float32
    "flash_moe_finetune": (fm, ["--data", "{wiki}", "--init_from", "scratch", "--n_layer", "2", "--n_head", "2",
                                "--n_embd", "16", "--block_size", "16", "--batch_size", "2", "--n_experts", "4",
                                "--moe_layers", "all", "--test_tokens", "200", "--max_new_tokens", "10"],
                           "--max_iters", "", "The lobster", "--- sample 1, fine-tuned ---\nThe lobster"),
}  # fmt: skip


@pytest.fixture
def wikitext(tmp_path):
    """A folder of WikiText-style splits for flash_moe_finetune."""
    folder = tmp_path / "wikitext"
    folder.mkdir()
    for i, split in enumerate(("train", "valid", "test")):
        (folder / f"{split}.txt").write_text(WIKI.replace("Lobster", f"Lobster {i}") * 30, encoding="utf-8")
    return str(folder)


def logged_losses(out_dir):
    """Every loss in log.csv, in order, each with its row: ((phase, iter, column), value)."""
    return [((r.get("phase", ""), r["iter"], k), float(r[k]))
            for r in read_log(out_dir) for k in ("train_loss", "val_loss", "d_loss") if r.get(k)]  # fmt: skip


@pytest.mark.parametrize("name", CASES)
def test_bfloat16_close_to_float32_resumes_and_samples_in_float32(name, tmp_path, text_file, wikitext, request, capsys):
    if name == "flash_moe_finetune":
        request.getfixturevalue("gpt2_cache")  # GPT-2's BPE offline, or a skip
    script, args, iters, sub, prompt, sampled = CASES[name]
    args = FLAT + [a.format(text=text_file, wiki=wikitext) for a in args]
    f32, bf16 = str(tmp_path / "f32"), str(tmp_path / "bf16")
    script.main(args + [iters, str(2 * N), "--out_dir", f32, "--dtype", "float32"])
    script.main(args + [iters, str(N), "--out_dir", bf16, "--dtype", "bfloat16"])
    assert "dtype bfloat16" in capsys.readouterr().out

    # the checkpoint: written under bfloat16, its weights in float32
    ckpt = torch.load(os.path.join(bf16, sub, "ckpt.pt"), weights_only=True)
    assert ckpt["config"]["dtype"] == "bfloat16"
    assert all(v.dtype == torch.float32 for v in ckpt["model"].values() if v.is_floating_point())

    # it resumes in float32 for N more iterations
    script.main(args + [iters, str(2 * N), "--out_dir", bf16, "--resume", "--dtype", "float32"])
    out = capsys.readouterr().out
    assert "resum" in out and "dtype float32" in out

    # its log (N iterations under bfloat16, N in float32) against the float32 run's, loss by loss
    ref, got = logged_losses(os.path.join(f32, sub)), logged_losses(os.path.join(bf16, sub))
    assert [k for k, _ in got] == [k for k, _ in ref] and len(ref) >= 2 * N
    worst = max(abs(a - b) for (_, a), (_, b) in zip(got, ref))
    assert 0 < worst <= TOL and all(math.isfinite(v) for _, v in got), [(k, a, b) for (k, a), (_, b) in zip(got, ref)]

    # and it samples in float32
    more = (["--stage", "scratch"] if sub else []) + ([] if script in (ex2, ex5) else ["--max_new_tokens", "10"])
    script.main(["--out_dir", bf16, "--prompt", prompt, "--dtype", "float32", "--device", "cpu"] + more)
    assert sampled in capsys.readouterr().out
