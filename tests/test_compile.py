"""What `--compile` captures: every script's model, in every configuration a flag selects, compiled by TorchDynamo.

Each case compiles the training forward with `torch.compile(model, backend=..., fullgraph=True)`, with a backend
that runs the captured graph as it is (as backend="eager" does: Dynamo's capture without generated code, about a
second a case), and runs the backward through it; the compiled model must compute the loss and gradients the model
computes. fullgraph=True makes anything Dynamo cannot capture an error (a branch on a tensor's value, an nn.LSTM
without allow_rnn). It does not catch an `.item()` or a `.tolist()`: under fullgraph PyTorch 2.13 captures those as
data-dependent values, where `--compile` (no fullgraph) breaks the graph; so the captured graph must also hold no
data-dependent value. Expert routing splits the tokens by expert with a `.tolist()` of their counts: the scripts
with experts turn on capture_scalar_outputs under `--compile`, so those tests capture the same way and also check,
with `torch._dynamo.explain` (which compiles as `--compile` does), that no graph break is left.
nn.LSTM and nn.GRU are captured only with `torch._dynamo.config.allow_rnn = True`; without it (PyTorch's default,
what the scripts run today) Dynamo stops at the recurrent layer, pinned below as well. The last test trains ex1
through `main` with `--compile` (inductor, generating C++ on the CPU) and compares its losses with the uncompiled
run's."""

import copy
import re
from collections import Counter
from dataclasses import replace

import pytest
import torch
import torch._dynamo as dynamo
import torch._inductor.config
from torch._dynamo.utils import counters
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

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

V = 11  # vocabulary size of the test models
B, T = 2, 16  # batch and sequence length: block_size of every test model


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every case compiles from scratch: no cached graph or recompile limit carries over from another case."""
    dynamo.reset()
    yield
    dynamo.reset()


def batch(vocab_size=V, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(vocab_size, (B, T), generator=g), torch.randint(vocab_size, (B, T), generator=g)


def fresh(make, seed=0):
    torch.manual_seed(seed)
    return make().train()


def forward_backward(model, args, kwargs, seed):
    """The training step's forward and backward; returns the loss and the gradients."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout masks in both runs
    out = model(*args, **kwargs)
    loss = out[1]
    loss.backward()
    return loss.detach(), [p.grad for p in model.parameters() if p.grad is not None]


class Capture:
    """A torch.compile backend that runs each captured graph as it is (as backend="eager" does) and keeps it."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward

    def data_dependent(self):
        """The nodes whose value or shape depends on tensor data (an .item(), a .tolist(), torch.bincount). With
        fullgraph=True Dynamo captures them (PyTorch 2.13 turns capture_scalar_outputs on for it); `--compile`, which
        does not ask for fullgraph, breaks the graph at each."""
        return [n.format_node() for gm in self.graphs for n in gm.graph.nodes
                if free_unbacked_symbols(n.meta.get("example_value"))]  # fmt: skip


def compile_whole(fn):
    """A model (or function) compiled into one graph, or an error; returns the compiled one and the Capture."""
    capture = Capture()
    return torch.compile(fn, backend=capture, fullgraph=True), capture


def assert_compiles_whole(make, args, kwargs=None):
    """One graph for the training forward (fullgraph=True raises at anything Dynamo cannot capture), holding no
    data-dependent value (each would be a break under --compile), a backward through it, and the same loss and
    gradients as the uncompiled model."""
    kwargs = kwargs or {}
    model = fresh(make)
    ref_loss, ref_grads = forward_backward(model, args, kwargs, seed=1)
    compiled, capture = compile_whole(model)
    loss, grads = forward_backward(compiled, args, kwargs, seed=1)
    assert len(capture.graphs) == 1 and capture.data_dependent() == []
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert len(grads) == len(ref_grads) > 0
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def breaks(model, *args, **kwargs):
    """torch._dynamo.explain, which compiles as --compile does (no fullgraph): the number of graphs, of graph breaks,
    and the break reasons counted by the operator they name (else by their first line)."""
    dynamo.reset()
    e = dynamo.explain(model)(*args, **kwargs)
    ops = [re.search(r"Operator `([\w.]+)`", r.reason) for r in e.break_reasons]
    reasons = Counter(m[1] if m else r.reason.splitlines()[0] for m, r in zip(ops, e.break_reasons))
    return e.graph_count, e.graph_break_count, reasons


def assert_experts_compile_whole(make, args):
    """With capture_scalar_outputs, as --compile sets it for the scripts with experts: one graph for the training
    forward (with its backward, equal to the uncompiled model's) and for the eval forward (which counts the experts'
    usage); explain, compiling as --compile does, finds no break."""
    with dynamo.config.patch(capture_scalar_outputs=True):
        model = fresh(make)
        ref_loss, ref_grads = forward_backward(model, args, {}, seed=1)
        compiled, capture = compile_whole(model)
        loss, grads = forward_backward(compiled, args, {}, seed=1)
        assert len(capture.graphs) == 1
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
        assert breaks(model, *args)[:2] == (1, 0)
        with torch.no_grad():
            assert breaks(model.eval(), *args)[:2] == (1, 0)


# ----------------------------------------------------------------------------------------------------------
# The checks can fail


def test_the_checks_see_a_new_break(monkeypatch):
    """An `.item()` in a forward is a graph break under --compile (explain counts it) and a data-dependent node under
    fullgraph=True; a branch on a tensor's value cannot be captured at all."""
    make = lambda: ex1.GPT(ex1.Config(n_layer=1, n_head=2, n_embd=16, block_size=T), V)  # noqa: E731
    forward = ex1.MLP.forward
    monkeypatch.setattr(ex1.MLP, "forward", lambda self, x: forward(self, x) * (1 + 0 * x.sum().item()))
    with pytest.raises(AssertionError):
        assert_compiles_whole(make, batch())
    graphs, n_breaks, _ = breaks(fresh(make), *batch())
    assert graphs >= 2 and n_breaks >= 1
    monkeypatch.setattr(ex1.MLP, "forward", lambda self, x: forward(self, x) if x.sum() > 0 else x)
    dynamo.reset()
    with pytest.raises(dynamo.exc.Unsupported):
        assert_compiles_whole(make, batch())


# ----------------------------------------------------------------------------------------------------------
# The GPTs of ex1, ex2 and ex3: explicit and fused attention


@pytest.mark.parametrize("flash", [True, False], ids=["fused", "explicit"])
def test_ex1(flash):
    cfg = ex1.Config(n_layer=2, n_head=2, n_embd=16, block_size=T, dropout=0.1, flash=flash)
    assert_compiles_whole(lambda: ex1.GPT(cfg, V), batch())


@pytest.mark.parametrize("flash", [True, False], ids=["fused", "explicit"])
def test_ex2_masked_targets(flash):
    cfg = ex2.Config(digits=2, n_layer=2, n_head=2, n_embd=16, dropout=0.1, flash=flash)
    x, y = (torch.randint(len(ex2.VOCAB), (B, cfg.block_size)) for _ in "xy")
    y[:, : cfg.answer_start - 1] = -1  # the prompt is not scored
    assert_compiles_whole(lambda: ex2.GPT(cfg, len(ex2.VOCAB)), (x, y))


@pytest.mark.parametrize("pos", ["abacus", "rope", "learned", "none"])
def test_ex5_positions(pos):
    cfg = ex5.Config(task="add", format="cot", train_digits="1-2", n_layer=2, n_head=2, n_embd=16, dropout=0.1, pos=pos)
    loader = ex5.DataLoader(cfg, ex5.CharTokenizer(ex5.VOCAB), torch.device("cpu"))
    x, y, places = loader.get_batch("train", torch.Generator().manual_seed(0))
    assert_compiles_whole(lambda: ex5.GPT(cfg, len(ex5.VOCAB)), (x, y), dict(places=places))


@pytest.mark.parametrize("vocab_size,flash", [(V, True), (V, False), (50257, True)],
                         ids=["char-fused", "char-explicit", "gpt2-bpe-fused"])  # fmt: skip
def test_ex3(vocab_size, flash):
    cfg = ex3.Config(n_layer=2, n_head=2, n_embd=16, block_size=T, dropout=0.1, flash=flash)
    assert_compiles_whole(lambda: ex3.GPT(cfg, vocab_size), batch(vocab_size))


# ----------------------------------------------------------------------------------------------------------
# ex4: MQA/GQA, SwiGLU, RoPE, the window mask, the blocked window, the KV-cache step

EX4 = {
    "mqa-swiglu-rope": dict(),  # the defaults
    "gqa": dict(n_kv_head=2),
    "mha-gelu-learned-positions": dict(n_kv_head=4, mlp="gelu", pos="learned"),
    "window-mask": dict(window=4, window_impl="mask"),
    "window-blocked": dict(window=4, window_impl="blocked"),
    "window-blocked-padded": dict(window=6, window_impl="blocked"),  # T is not a multiple of the window
}
EX4_CASES = [(name, True) for name in EX4] + [(name, False) for name in ("gqa", "window-mask", "window-blocked")]


@pytest.mark.parametrize("name,flash", EX4_CASES, ids=[f"{n}-{'fused' if f else 'explicit'}" for n, f in EX4_CASES])
def test_ex4(name, flash):
    cfg = ex4.Config(n_layer=2, n_head=4, n_embd=16, block_size=T, dropout=0.1, flash=flash, **EX4[name])
    assert_compiles_whole(lambda: ex4.GPT(cfg, V), batch())


def assert_cached_step_compiles_whole(model, make_cache):
    """One cached decode step, as generate() takes it: the newest token through the model, the keys and values of
    a 9-token prompt in a cache per layer. The same logits as uncompiled, and the cache updated."""
    idx = batch()[0]
    with torch.no_grad():
        caches = [make_cache() for _ in model.blocks]
        model(idx[:, :9], caches=caches)  # the prompt
        twin = copy.deepcopy(caches)
        ref, _ = model(idx[:, 9:10], caches=caches)
        compiled, capture = compile_whole(model)
        got, _ = compiled(idx[:, 9:10], caches=twin)
    assert len(capture.graphs) == 1 and capture.data_dependent() == []
    torch.testing.assert_close(got, ref)
    assert twin[0].pos == caches[0].pos == 10 and torch.equal(twin[-1].k, caches[-1].k)


@pytest.mark.parametrize("name", ["mqa-swiglu-rope", "mha-gelu-learned-positions", "window-mask"])
def test_ex4_kv_cache_step(name):
    """With a window the cache is a rolling buffer of window slots, which the prompt has already wrapped."""
    cfg = ex4.Config(n_layer=2, n_head=4, n_embd=16, block_size=T, **EX4[name])
    model = fresh(lambda: ex4.GPT(cfg, V)).eval()
    assert_cached_step_compiles_whole(model, lambda: ex4.KVCache(cfg.window or cfg.block_size))


# ----------------------------------------------------------------------------------------------------------
# rnn_lm: Elman (slide, tanh), LSTM, GRU, bidirectional, stateful

RNN_T = 8  # the recurrence is unrolled step by step: a short sequence keeps the graph small


def rnn(cell, activation="slide", bidirectional=False):
    cfg = rnn_lm.Config(cell=cell, activation=activation, bidirectional=bidirectional, n_layer=2, n_embd=8,
                        n_hidden=12, block_size=RNN_T, dropout=0.1)  # fmt: skip
    return lambda: rnn_lm.RNNLM(cfg, V)


def rnn_batch():
    return tuple(t[:, :RNN_T] for t in batch())


@pytest.mark.parametrize("activation,bidirectional", [("slide", False), ("tanh", False), ("slide", True)],
                         ids=["slide", "tanh", "slide-bidirectional"])  # fmt: skip
def test_rnn_elman(activation, bidirectional):
    """The hand-written Elman recurrence: Dynamo unrolls the loop over time into one graph."""
    assert_compiles_whole(rnn("elman", activation, bidirectional), rnn_batch())


@pytest.mark.parametrize("cell,bidirectional", [("lstm", False), ("gru", False), ("lstm", True)],
                         ids=["lstm", "gru", "lstm-bidirectional"])  # fmt: skip
def test_rnn_torch_cells_with_allow_rnn(cell, bidirectional):
    with dynamo.config.patch(allow_rnn=True):
        assert_compiles_whole(rnn(cell, bidirectional=bidirectional), rnn_batch())


@pytest.mark.parametrize("cell", ["elman", "lstm"])
def test_rnn_stateful(cell):
    """--stateful: the state of the last batch goes in (LSTM's as an (h, c) pair)."""
    shape = (2, B, 12)
    state = torch.randn(shape) if cell == "elman" else (torch.randn(shape), torch.randn(shape))
    with dynamo.config.patch(allow_rnn=True):
        assert_compiles_whole(rnn(cell), rnn_batch(), dict(state=state))


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_rnn_torch_cells_without_allow_rnn(cell):
    """PyTorch's default (allow_rnn=False), which --compile uses today: Dynamo captures the embedding and dropout
    (one graph of 2 operations) and stops at `self.rnn(x, state)`; the LSTM or GRU, the output layer and the loss
    run uncompiled. explain reports this as one graph, no break, and one 'step_unsupported' reason."""
    with dynamo.config.patch(allow_rnn=False):
        model = fresh(rnn(cell))
        with pytest.raises(dynamo.exc.Unsupported, match="RNN, GRU, or LSTM"):
            torch.compile(model, backend="eager", fullgraph=True)(*rnn_batch())
        dynamo.reset()
        e = dynamo.explain(model)(*rnn_batch())
    assert (e.graph_count, e.graph_break_count, [len(ops) for ops in e.ops_per_graph]) == (1, 0, [2])
    assert [r.reason for r in e.break_reasons] == ["step_unsupported"]


# ----------------------------------------------------------------------------------------------------------
# switchhead_moe: dense attention, SwitchHead with sigmoid and softmax gates


@pytest.mark.parametrize("flash", [True, False], ids=["fused", "explicit"])
def test_switchhead_dense(flash):
    cfg = sh.Config(n_layer=2, n_head=2, n_embd=16, head_size=8, n_experts=1, block_size=T, dropout=0.1, flash=flash)
    assert_compiles_whole(lambda: sh.GPT(cfg, V), batch())


# Expert routing: expert_matmul splits the rows of each expert by their counts (.tolist(), a data-dependent size).
# --compile turns on capture_scalar_outputs for the scripts with experts, so those sizes stay inside the graph, and
# the counts come from index_add_ (torch.bincount's output length would depend on the data: a break).
SWITCHHEAD = {"sigmoid": dict(gate="sigmoid", moe_k=2), "softmax": dict(gate="softmax", moe_k=1)}


@pytest.mark.parametrize("gate", SWITCHHEAD)
def test_switchhead_experts(gate):
    cfg = sh.Config(n_layer=2, n_head=2, n_embd=16, head_size=4, n_experts=4, block_size=T, dropout=0.1,
                    **SWITCHHEAD[gate])  # fmt: skip
    assert_experts_compile_whole(lambda: sh.GPT(cfg, V), batch())


# ----------------------------------------------------------------------------------------------------------
# gan_text: the generator (dense, SwitchHead, the KV-cache step) and the LSTM discriminator


def gan_cfg(**kw):
    return gan.Config(**{**dict(n_layer=2, n_head=2, n_embd=16, head_size=4, block_size=T, d_embd=8, d_hidden=16,
                                dropout=0.1), **kw})  # fmt: skip


@pytest.mark.parametrize("flash", [True, False], ids=["fused", "explicit"])
def test_gan_generator_dense(flash):
    cfg = gan_cfg(n_experts=1, head_size=8, flash=flash)
    assert_compiles_whole(lambda: gan.GPT(cfg, V), batch())


def test_gan_generator_experts():
    """The SwitchHead generator (the default), MLE phase: expert_matmul is switchhead_moe's."""
    assert_experts_compile_whole(lambda: gan.GPT(gan_cfg(), V), batch())


def test_gan_generator_kv_cache_step():
    """The GAN's inner loop, for the dense generator."""
    model = fresh(lambda: gan.GPT(gan_cfg(n_experts=1, head_size=8), V)).eval()
    assert_cached_step_compiles_whole(model, lambda: gan.KVCache(T))


def test_gan_discriminator():
    """The LSTM discriminator: D(x), and its loss forward and backward, with allow_rnn (without it Dynamo stops at
    the LSTM, as in rnn_lm)."""
    torch.manual_seed(0)
    disc = gan.Discriminator(gan_cfg(), V)
    real, fake = batch()
    ref = gan.discriminator_loss(disc, real, fake)
    ref.backward()
    ref_grads = [p.grad.clone() for p in disc.parameters()]
    disc.zero_grad(set_to_none=True)
    with dynamo.config.patch(allow_rnn=True):
        loss_fn, capture = compile_whole(gan.discriminator_loss)
        loss = loss_fn(disc, real, fake)
        loss.backward()
        d, capture_d = compile_whole(disc)
        torch.testing.assert_close(d(real), disc(real))
    assert len(capture.graphs) == len(capture_d.graphs) == 1
    assert capture.data_dependent() == capture_d.data_dependent() == []
    torch.testing.assert_close(loss, ref)
    for p, r in zip(disc.parameters(), ref_grads):
        torch.testing.assert_close(p.grad, r)


# ----------------------------------------------------------------------------------------------------------
# flash_moe_finetune: dense with fused, tiled and explicit attention; upcycled experts


@pytest.mark.parametrize("attention", ["fused", "tiled", "explicit"])
def test_flash_moe_dense(attention):
    cfg = fm.Config(n_layer=2, n_head=2, n_embd=16, block_size=T, n_experts=1, attention=attention, flash_block=4)
    assert_compiles_whole(lambda: fm.GPT(cfg, V), batch())


# MoE.forward counts the tokens of each expert with index_add_ and splits them with .tolist(), as expert_matmul does.
@pytest.mark.parametrize("moe_k", [2, 1])
def test_flash_moe_upcycled(moe_k):
    cfg = fm.Config(n_layer=2, n_head=2, n_embd=16, block_size=T, n_experts=4, moe_k=moe_k)

    def make():
        model = fm.GPT(replace(cfg, n_experts=1), V)
        fm.upcycle(model, cfg, batch()[0])  # the dense MLPs of --moe_layers become experts, as main does
        assert len(model.moes()) == 1
        return model

    assert_experts_compile_whole(make, batch())


# ----------------------------------------------------------------------------------------------------------
# One real compile: ex1 through main with --compile (inductor on the CPU)


def test_ex1_main_compiled_equals_uncompiled(tmp_path, text_file, capsys, monkeypatch):
    """A few iterations compiled by inductor log the losses of the uncompiled run. Inductor fuses operations and
    changes the order of float32 sums, so the two runs may differ in the last bits; after 8 AdamW steps that stays
    far below 1e-3, while a wrong kernel or a wrongly captured graph changes the loss by much more (the losses fall
    by 0.5 over these steps). Both runs log 4 decimals: they may also differ by one in the last. Inductor draws
    dropout's random numbers its own way; fallback_random makes it draw eager PyTorch's, so the masks are the same."""
    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)
    args = ["--data", text_file, "--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--block_size", "16",
            "--batch_size", "4", "--device", "cpu", "--eval_iters", "2", "--max_iters", "8", "--eval_interval", "4",
            "--log_interval", "1", "--learning_rate", "1e-2", "--warmup_iters", "0", "--dropout", "0.1",
            "--max_new_tokens", "5"]  # fmt: skip
    plain, compiled = str(tmp_path / "plain"), str(tmp_path / "compiled")
    ex1.main(args + ["--out_dir", plain])
    counters.clear()
    ex1.main(args + ["--out_dir", compiled, "--compile"])
    assert "compiling the model" in capsys.readouterr().out
    assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"]  # training and evaluation
    a, b = read_log(plain), read_log(compiled)
    assert [r["iter"] for r in a] == [r["iter"] for r in b] and len(a) == 11  # 8 steps, 3 evaluations
    for r, s in zip(a, b):
        for k in ("train_loss", "val_loss"):
            assert (r[k] == "") == (s[k] == "")
            if r[k]:
                assert abs(float(r[k]) - float(s[k])) <= 1e-3, (r, s)
    assert float(a[-1]["val_loss"]) < float(a[0]["val_loss"]) - 0.2  # it learned: a difference would show
