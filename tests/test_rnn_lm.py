"""rnn_lm.py: the hand-written Elman cell, causality (and the bidirectional leak), sampling with a carried state,
--stateful truncated BPTT, and smoke runs through main for every cell, with checkpoint, resume and --prompt."""

import os
import signal

import pytest
import torch

import rnn_lm
from conftest import TEXT, read_log, user_error

TINY = ["--device", "cpu", "--n_layer", "1", "--n_embd", "16", "--n_hidden", "32", "--block_size", "16",
        "--batch_size", "4", "--max_iters", "4", "--eval_interval", "2", "--eval_iters", "2", "--log_interval", "1",
        "--warmup_iters", "1", "--max_new_tokens", "20"]  # fmt: skip
CELLS = [("elman", "slide"), ("elman", "tanh"), ("lstm", "slide"), ("gru", "slide")]


def make_model(cell, activation="slide", bidirectional=False, n_layer=2):
    torch.manual_seed(0)
    cfg = rnn_lm.Config(
        cell=cell,
        activation=activation,
        bidirectional=bidirectional,
        n_layer=n_layer,
        n_embd=8,
        n_hidden=12,
        block_size=16,
    )
    return rnn_lm.RNNLM(cfg, 11).eval()


# ----------------------------------------------------------------------------------------------------------
# The Elman cell


@pytest.mark.parametrize("activation", ["slide", "tanh"])
def test_elman_layer_equals_step_by_step_loop(activation):
    torch.manual_seed(0)
    layer = rnn_lm.ElmanLayer(5, 7, activation)
    with torch.no_grad():
        for p in layer.parameters():  # b_h starts at zero; give every parameter a part to play
            p.normal_()
    x, h0 = torch.randn(3, 6, 5), torch.rand(3, 7)
    out = layer(x, h0)
    act = (
        (lambda a: torch.minimum(torch.ones_like(a), torch.maximum(torch.zeros_like(a), a)))
        if activation == "slide"
        else torch.tanh
    )
    for b in range(3):
        h = h0[b]
        for t in range(6):
            h = act(layer.W_hh @ h + layer.W_hx @ x[b, t] + layer.b_h)
            torch.testing.assert_close(out[b, t], h)


def test_elman_stack_equals_torch_rnn():
    """With tanh, two layers, both directions: the same numbers as nn.RNN given the same weights."""
    torch.manual_seed(0)
    ours = rnn_lm.Elman(5, 7, n_layer=2, dropout=0.0, bidirectional=True, activation="tanh")
    ref = torch.nn.RNN(5, 7, num_layers=2, nonlinearity="tanh", batch_first=True, bidirectional=True)
    with torch.no_grad():
        for layer in range(2):
            for d, suffix in enumerate(["", "_reverse"]):
                cell = ours.layers[2 * layer + d]
                getattr(ref, f"weight_ih_l{layer}{suffix}").copy_(cell.W_hx)
                getattr(ref, f"weight_hh_l{layer}{suffix}").copy_(cell.W_hh)
                getattr(ref, f"bias_ih_l{layer}{suffix}").normal_()
                cell.b_h.copy_(getattr(ref, f"bias_ih_l{layer}{suffix}"))
                getattr(ref, f"bias_hh_l{layer}{suffix}").zero_()
    x, h0 = torch.randn(3, 6, 5), torch.randn(4, 3, 7)
    out, h_n = ours(x, h0)
    out_ref, h_n_ref = ref(x, h0)
    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(h_n, h_n_ref)


def test_slide_stays_in_unit_interval_and_passes_gradient_only_inside():
    a = torch.tensor([-3.0, -1e-3, 0.0, 1e-3, 0.5, 0.999, 1.0, 1.001, 5.0], requires_grad=True)
    y = rnn_lm.slide(a)
    y.sum().backward()
    torch.testing.assert_close(y, torch.tensor([0.0, 0.0, 0.0, 1e-3, 0.5, 0.999, 1.0, 1.0, 1.0]))
    torch.testing.assert_close(a.grad, torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]))
    # and every state of a slide Elman network, with large weights and inputs, lies in [0, 1]
    layer = rnn_lm.ElmanLayer(5, 7, "slide")
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(std=2.0)
    h = layer(3 * torch.randn(4, 20, 5), torch.zeros(4, 7))
    assert h.min() >= 0 and h.max() <= 1
    assert (h == 0).any() and (h == 1).any() and ((h > 0) & (h < 1)).any()  # all three regimes were exercised


# ----------------------------------------------------------------------------------------------------------
# Causality, and the leak of the bidirectional model


def earlier_logits_change(model, t=7):
    """Change every token from position t on; do the logits before t change?"""
    torch.manual_seed(1)
    idx = torch.randint(11, (2, 12))
    idx2 = idx.clone()
    idx2[:, t:] = (idx[:, t:] + torch.randint(1, 11, idx[:, t:].shape)) % 11  # every later token differs
    logits, _, _ = model(idx)
    logits2, _, _ = model(idx2)
    assert not torch.allclose(logits[:, t:], logits2[:, t:])  # the change did reach the model
    return not torch.allclose(logits[:, :t], logits2[:, :t], rtol=0, atol=1e-6)


@pytest.mark.parametrize("cell,activation", CELLS)
def test_unidirectional_is_causal_bidirectional_is_not(cell, activation):
    assert not earlier_logits_change(make_model(cell, activation))
    assert earlier_logits_change(make_model(cell, activation, bidirectional=True))


# ----------------------------------------------------------------------------------------------------------
# Sampling with the recurrent state


@pytest.mark.parametrize("cell,activation", CELLS)
def test_stepping_with_state_equals_running_the_whole_prefix(cell, activation):
    model = make_model(cell, activation)
    idx = torch.randint(11, (2, 30))  # longer than block_size: a recurrent model has no context limit
    with torch.no_grad():
        logits, _, state = model(idx[:, :5])
        for t in range(5, 30):
            full, _, _ = model(idx[:, : t + 1])
            logits, _, state = model(idx[:, t : t + 1], state=state)
            torch.testing.assert_close(torch.softmax(logits[:, -1], -1), torch.softmax(full[:, -1], -1))


@pytest.mark.parametrize("cell,activation", CELLS)
def test_generate_reads_the_prompt_once_then_one_token_per_step(cell, activation, monkeypatch):
    model = make_model(cell, activation)
    lengths, forward = [], rnn_lm.RNNLM.forward
    monkeypatch.setattr(
        rnn_lm.RNNLM, "forward", lambda self, idx, *a, **k: lengths.append(idx.size(1)) or forward(self, idx, *a, **k)
    )
    prompt = torch.randint(11, (2, 5))
    out = model.generate(prompt, 20, temperature=0)
    assert lengths[0] == 5 and set(lengths[1:]) == {1}
    with torch.no_grad():  # greedy: every new token is the argmax given the whole prefix, recomputed
        for t in range(5, 25):
            full, _, _ = forward(model, out[:, :t])
            assert torch.equal(out[:, t], full[:, -1].argmax(-1))


# ----------------------------------------------------------------------------------------------------------
# --stateful


def states(state):
    return list(state) if isinstance(state, tuple) else [state]


@pytest.mark.parametrize("cell", ["elman", "lstm"])  # LSTM's state is a pair (h, c)
def test_stateful_carries_the_state_and_detaches_it(cell, text_file, tmp_path, monkeypatch):
    calls, forward = [], rnn_lm.RNNLM.forward

    def spy(self, idx, targets=None, state=None):
        logits, loss, last = forward(self, idx, targets, state)
        calls.append((self.training, idx.clone(), state, last))
        return logits, loss, last

    monkeypatch.setattr(rnn_lm.RNNLM, "forward", spy)
    rnn_lm.main(
        [
            *TINY,
            "--cell",
            cell,
            "--stateful",
            "--max_iters",
            "5",
            "--eval_interval",
            "100",
            "--max_new_tokens",
            "0",
            "--data",
            text_file,
            "--out_dir",
            str(tmp_path),
        ]
    )
    train = [c for c in calls if c[0]]
    assert len(train) == 5
    assert train[0][2] is None  # the first chunk starts from zeros
    for (_, _, _, last), (_, _, state, _) in zip(train, train[1:]):
        for before, carried in zip(states(last), states(state)):
            assert before.grad_fn is not None  # the state out of a chunk is part of that chunk's graph...
            assert torch.equal(carried, before)  # ...its values go on into the next chunk...
            assert carried.grad_fn is None and not carried.requires_grad  # ...but not its graph: no gradient flows back
    assert all(c[2] is None for c in calls if not c[0])  # evaluation starts from zeros
    # row b of consecutive batches is one contiguous stretch of text: the b-th quarter of the training split
    vocab = sorted(set(TEXT))
    ids = torch.tensor([vocab.index(c) for c in TEXT])
    n = int(0.9 * len(ids)) // 4
    seen = torch.cat([c[1] for c in train], dim=1)
    for b in range(4):
        assert torch.equal(seen[b], ids[b * n : b * n + 5 * 16])


def test_stateful_streams_start_over_at_their_end():
    cfg = rnn_lm.Config(stateful=True, batch_size=2, block_size=8)
    loader = rnn_lm.DataLoader(torch.arange(100), cfg, torch.device("cpu"))  # 90 training tokens: 2 streams of 45
    starts = []
    for _ in range(7):
        x, y, restart = loader.next_chunk()
        assert torch.equal(y[:, :-1], x[:, 1:])
        starts.append((x[0, 0].item(), x[1, 0].item(), restart))
    assert starts == [
        (0, 45, False),
        (8, 53, False),
        (16, 61, False),
        (24, 69, False),
        (32, 77, False),
        (0, 45, True),
        (8, 53, False),
    ]


# ----------------------------------------------------------------------------------------------------------
# Through main: every cell, bidirectional, checkpoint, --prompt, --resume, errors


@pytest.mark.parametrize(
    "flags",
    [
        ["--cell", "elman"],
        ["--cell", "elman", "--activation", "tanh"],
        ["--cell", "lstm", "--n_layer", "2", "--dropout", "0.1"],
        ["--cell", "gru", "--stateful"],
        ["--cell", "lstm", "--bidirectional"],
    ],
)
def test_smoke(flags, text_file, tmp_path, capsys):
    out_dir = str(tmp_path / "out")
    rnn_lm.main([*TINY, *flags, "--data", text_file, "--out_dir", out_dir])
    out = capsys.readouterr().out
    assert os.path.isfile(os.path.join(out_dir, "ckpt.pt")) and os.path.isfile(os.path.join(out_dir, "best.pt"))
    assert "--- sample 1 ---" in out
    assert ("not a language model" in out) == ("--bidirectional" in flags)
    rows = read_log(out_dir)
    assert [r["iter"] for r in rows if r["val_loss"]] == ["0", "2", "4"]
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])  # it learned something
    rnn_lm.main(
        ["--device", "cpu", "--out_dir", out_dir, "--prompt", "First", "--num_samples", "2", "--max_new_tokens", "30"]
    )
    out = capsys.readouterr().out
    samples = out.split("--- sample ")[1:]
    assert len(samples) == 2
    for s in samples:
        text = s.split("\n", 1)[1][:-1]  # what follows "1 ---", less print's newline
        assert text.startswith("First") and len(text) == 5 + 30
    assert ("not a language model" in out) == ("--bidirectional" in flags)


@pytest.mark.parametrize(
    "flags", [["--cell", "lstm"], ["--cell", "elman", "--stateful"], ["--cell", "lstm", "--stateful"]]
)
def test_resume_continues_exactly(flags, text_file, tmp_path):
    common = [
        *TINY,
        *flags,
        "--data",
        text_file,
        "--eval_interval",
        "3",
        "--lr_decay_iters",
        "6",
        "--learning_rate",
        "1e-2",
        "--max_new_tokens",
        "0",
    ]
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    rnn_lm.main([*common, "--max_iters", "6", "--out_dir", straight])
    rnn_lm.main([*common, "--max_iters", "3", "--out_dir", resumed])
    assert torch.load(os.path.join(resumed, "ckpt.pt"), weights_only=True)["iter_num"] == 3
    rnn_lm.main([*common, "--max_iters", "6", "--out_dir", resumed, "--resume"])

    def losses(out_dir):  # not the timings
        return [(r["iter"], r["train_loss"], r["val_loss"], r["lr"]) for r in read_log(out_dir)]

    assert losses(straight) == losses(resumed) != []
    a = torch.load(os.path.join(straight, "ckpt.pt"), weights_only=True)["model"]
    b = torch.load(os.path.join(resumed, "ckpt.pt"), weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


STOP_FLAGS = [["--cell", "lstm", "--stateful"], ["--cell", "elman", "--stateful"], ["--cell", "gru", "--dropout", ".1"]]


@pytest.mark.parametrize("flags", STOP_FLAGS)
def test_stop_between_evaluations_saves_the_stream_and_resumes_exactly(flags, text_file, tmp_path, monkeypatch, capsys):
    """Ctrl-C at iteration 3 saves iteration 4, between evaluations: with --stateful, ckpt.pt must hold where the
    streams are and the state carried into the next chunk, or the resumed run reads other text from another state."""
    common = [*TINY, *flags, "--data", text_file, "--eval_interval", "3", "--max_iters", "6", "--max_new_tokens", "0"]
    straight, stopped = str(tmp_path / "straight"), str(tmp_path / "stopped")
    rnn_lm.main([*common, "--out_dir", straight])
    get_lr = rnn_lm.get_lr

    def ctrl_c_at_3(it, cfg):
        return (it == 3 and os.kill(os.getpid(), signal.SIGINT)) or get_lr(it, cfg)

    monkeypatch.setattr(rnn_lm, "get_lr", ctrl_c_at_3)
    with pytest.raises(SystemExit) as e:
        rnn_lm.main([*common, "--out_dir", stopped])
    assert e.value.code == 130 and "ckpt.pt holds iteration 4; continue with --resume" in capsys.readouterr().err
    ckpt = torch.load(os.path.join(stopped, "ckpt.pt"), weights_only=True)
    assert ckpt["iter_num"] == 4
    if "--stateful" in flags:
        assert ckpt["stream"]["pos"] == 4 * 16 and all(s.size(1) == 4 for s in states(ckpt["stream"]["hidden"]))
    monkeypatch.setattr(rnn_lm, "get_lr", get_lr)
    rnn_lm.main([*common, "--out_dir", stopped, "--resume"])
    assert "resuming from iter 4" in capsys.readouterr().out

    def losses(out_dir):
        return [(r["iter"], r["train_loss"], r["val_loss"], r["lr"]) for r in read_log(out_dir)]

    assert losses(straight) == losses(stopped)


@pytest.mark.slow
def test_ckpt_at_every_evaluation_best_when_val_improves(text_file, tmp_path, monkeypatch, capsys):
    vals = iter([2.0, 1.0, 3.0, 2.0])  # iterations 0, 2, 4: the best is at 2, the latest at 4; then a new run's 0
    monkeypatch.setattr(rnn_lm, "estimate_loss", lambda *a: {"train": 1.0, "val": next(vals)})
    out = str(tmp_path / "out")
    rnn_lm.main([*TINY, "--stateful", "--data", text_file, "--out_dir", out])
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    best = torch.load(os.path.join(out, "best.pt"), weights_only=True)
    assert (ckpt["iter_num"], ckpt["stream"]["pos"], best["iter_num"], best["best_val_loss"]) == (4, 64, 2, 1.0)
    assert "optimizer" in ckpt and "optimizer" not in best
    line = user_error(capsys, rnn_lm.main, [*TINY, "--data", text_file, "--out_dir", out])  # a new run leaves it alone
    assert "rnn_lm at iteration 4" in line and "--overwrite" in line
    rnn_lm.main([*TINY, "--max_iters", "0", "--data", text_file, "--out_dir", out, "--overwrite"])
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["iter_num"] == 0


def test_resume_takes_architecture_and_data_from_the_checkpoint(text_file, tmp_path, capsys):
    out = str(tmp_path / "out")
    rnn_lm.main([*TINY, "--cell", "gru", "--n_layer", "2", "--data", text_file, "--out_dir", out])
    # neither the cell nor the data typed again (the default data would be a download): both come from ckpt.pt
    resume = ["--device", "cpu", "--out_dir", out, "--resume", "--eval_iters", "2", "--max_new_tokens", "0"]
    rnn_lm.main([*resume, "--max_iters", "6"])
    assert "resuming from iter 4" in capsys.readouterr().out
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["iter_num"] == 6
    other = tmp_path / "other.txt"
    other.write_text(TEXT.upper())
    for flag, value in [("--cell", "lstm"), ("--n_hidden", "64"), ("--data", str(other))]:
        line = user_error(capsys, rnn_lm.main, [*resume, "--max_iters", "8", flag, value])
        assert f"{flag} " in line and "differs from the checkpoint" in line


def test_resume_of_a_bidirectional_checkpoint_refuses_stateful(text_file, tmp_path, capsys):
    """--resume takes --bidirectional from the checkpoint, so --stateful alone must meet the same check."""
    out = str(tmp_path / "out")
    rnn_lm.main(
        [*TINY, "--bidirectional", "--max_iters", "2", "--max_new_tokens", "0", "--data", text_file, "--out_dir", out]
    )
    line = user_error(
        capsys, rnn_lm.main, ["--device", "cpu", "--out_dir", out, "--resume", "--stateful", "--max_iters", "4"]
    )
    assert "--bidirectional cannot be --stateful" in line
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["iter_num"] == 2  # the checkpoint is untouched


@pytest.mark.parametrize(
    "flags,words",
    [
        (["--cell", "transformer"], "--cell: invalid choice: 'transformer'"),
        (["--activation", "relu"], "--activation: invalid choice: 'relu'"),
        (["--bidirectional", "--stateful"], "--bidirectional cannot be --stateful"),
        (["--n_hidden", "0"], "--n_hidden"),
        (["--stateful", "--batch_size", "500"], "--stateful needs"),
        (["--data", "SHORT", "--block_size", "64"], "the val split has 60 tokens"),  # passed the old whole-text check
        (["--data", "SHORT", "--block_size", "8", "--stateful", "--batch_size", "64"], "--stateful needs"),
    ],
)
def test_user_errors(flags, words, text_file, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text(TEXT[:600])
    flags = [str(short) if f == "SHORT" else f for f in flags]
    line = user_error(capsys, rnn_lm.main, [*TINY, "--data", text_file, *flags, "--out_dir", str(tmp_path / "out")])
    assert words in line


def test_prompt_errors(text_file, tmp_path, capsys):
    assert "no checkpoint" in user_error(
        capsys, rnn_lm.main, ["--device", "cpu", "--out_dir", str(tmp_path), "--prompt", "First"]
    )
    rnn_lm.main([*TINY, "--max_iters", "0", "--data", text_file, "--out_dir", str(tmp_path)])
    assert "not in this model's vocabulary" in user_error(
        capsys, rnn_lm.main, ["--device", "cpu", "--out_dir", str(tmp_path), "--prompt", "First~"]
    )
