"""flash_moe_finetune.py: GPT-2's weights (and ex3's checkpoints) loaded exactly, upcycling that changes nothing, tiled
and fused attention equal to explicit attention, the router's losses, the sampling controls, sliding-window
perplexity, and runs through main: checkpoints, Ctrl-C and resume, --data and --data_dir, user errors, offline, and
under torchrun."""

import copy
import inspect
import math
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, replace
from operator import attrgetter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.nn import functional as F

import flash_moe_finetune as fm
from conftest import ROOT, assert_causal, losses, torchrun_and_single, user_error

TINY = ["--init_from", "scratch", "--n_layer", "2", "--n_head", "2", "--n_embd", "16", "--block_size", "16",
        "--batch_size", "2", "--device", "cpu", "--eval_iters", "2", "--max_new_tokens", "8", "--test_tokens", "300",
        "--learning_rate", "1e-2", "--warmup_iters", "0"]  # fmt: skip
WIKI = (
    " = Lobster = \n \n The lobster is a <unk> animal . It 's red @-@ tipped , 1 @,@ 000 g ( 3 @.@ 5 lb ) "
    'and " highly esteemed " .\n'
)
CPU = torch.device("cpu")


@pytest.fixture
def wikitext(tmp_path):
    """A folder of WikiText-style splits, about 1,500 GPT-2 tokens each."""
    folder = tmp_path / "wikitext"
    folder.mkdir()
    for i, split in enumerate(("train", "valid", "test")):
        (folder / f"{split}.txt").write_text(
            (WIKI.replace("Lobster", f"Lobster {i}") + " The crab is green .\n") * 25, encoding="utf-8"
        )
    return str(folder)


def tiny_cfg(**kw):
    return fm.Config(**{"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 16, "dropout": 0.0, **kw})


def perturbed(model, scale=0.05):
    """model with every parameter moved off its initial value: biases and LayerNorms no longer 0 and 1."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model


@pytest.mark.parametrize("attention", ["fused", "tiled", "explicit"])
def test_causal(attention):
    torch.manual_seed(0)
    assert_causal(fm.GPT(tiny_cfg(attention=attention, flash_block=4, n_experts=4, moe_layers="all"), 11).eval(), 11)


# ----------------------------------------------------------------------------------------------------------
# GPT-2's weights


@pytest.mark.slow
def test_hugging_face_gpt2_converted_gives_the_same_logits(monkeypatch):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = perturbed(
        transformers.GPT2LMHeadModel(
            transformers.GPT2Config(vocab_size=101, n_positions=24, n_embd=32, n_layer=3, n_head=4)
        )
    ).eval()
    idx = torch.randint(101, (2, 24))
    with torch.no_grad():
        theirs = hf(idx).logits
    # through --init_from gpt2, with the download replaced by this model; --block_size 16 crops the position embeddings
    monkeypatch.setattr(transformers.GPT2LMHeadModel, "from_pretrained", classmethod(lambda cls, name: hf))
    monkeypatch.setattr(fm, "hub_unreachable", lambda: "")
    for block_size in (0, 16):
        cfg = fm.Config(init_from="gpt2", block_size=block_size)
        model = fm.start_model(cfg, SimpleNamespace(vocab_size=101), CPU).eval()
        assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.bias, cfg.gelu, cfg.block_size) == (
            3,
            4,
            32,
            True,
            "tanh",
            block_size or 24,
        )
        assert model.lm_head.weight is model.wte.weight  # still tied
        with torch.no_grad():
            ours, _ = model(idx[:, : cfg.block_size])
        assert (ours - theirs[:, : cfg.block_size]).abs().max() < 1e-4


def test_untied_hugging_face_embeddings_are_refused(monkeypatch, capsys):
    """Loaded as tied, the output matrix would be the input one: logits off by about 10. One line instead."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=101, n_positions=24, n_embd=32, n_layer=1, n_head=4)
    config.tie_word_embeddings = False
    hf = transformers.GPT2LMHeadModel(config).eval()
    assert not torch.equal(hf.lm_head.weight, hf.transformer.wte.weight)  # really untied
    monkeypatch.setattr(transformers.GPT2LMHeadModel, "from_pretrained", classmethod(lambda cls, name: hf))
    monkeypatch.setattr(fm, "hub_unreachable", lambda: "")
    line = user_error(capsys, fm.start_model, fm.Config(init_from="gpt2"), SimpleNamespace(vocab_size=101), CPU)
    assert "tie_word_embeddings=False" in line


def no_hub(tmp_path):
    """os.environ without the Hugging Face offline variables, its cache empty (HF_HOME), the Hub at a port where nothing
    listens (HF_ENDPOINT): unreachable even on a machine that is online."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    }
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        env["HF_ENDPOINT"] = f"http://127.0.0.1:{s.getsockname()[1]}"
    return {**env, "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}


OFFLINE = """
import sys
sys.path.insert(0, {root!r})
import flash_moe_finetune as fm
fm.DATA_DIR = {data!r}
fm.main(sys.argv[1:])
"""


@pytest.mark.slow
@pytest.mark.parametrize("what", ["init_from gpt2", "wikitext download"])
def test_offline_without_the_hugging_face_variables_fails_at_once(what, tmp_path, wikitext, gpt2_cache):
    """No network and no HF_HUB_OFFLINE: one line within seconds, not half a minute of retries (as a user runs it)."""
    env = no_hub(tmp_path)
    args = ["--init_from", "gpt2", "--data", wikitext] if what == "init_from gpt2" else TINY
    code = OFFLINE.format(root=ROOT, data=str(tmp_path / "data"))

    def timed(*cmd):
        t0 = time.time()
        p = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, timeout=180, env=env)
        return p, time.time() - t0

    # the time to start Python and import what the run imports, on this machine now (the tests share 2 busy cores)
    _, imports = timed("-c", "import torch, tiktoken, " + ("huggingface_hub" if "gpt2" in what else "datasets"))
    p, seconds = timed("-c", code, *args, "--out_dir", str(tmp_path / "o"))
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(err) == 1 and err[0].startswith("error: "), p.stderr
    assert "127.0.0.1 does not answer" in err[0] and ("--init_from PATH" if "gpt2" in what else "--data ") in err[0]
    assert seconds < imports + 10, (seconds, imports)  # the retries took 26-28 s


@pytest.mark.slow
def test_offline_gpt2_loads_from_the_hugging_face_cache(tmp_path, wikitext, gpt2_cache):
    """No network and no HF_HUB_OFFLINE, but the weights were downloaded once: they load from the cache."""
    transformers = pytest.importorskip("transformers")
    repo = tmp_path / "hf" / "hub" / "models--gpt2"  # the layout of the Hugging Face cache
    config = transformers.GPT2Config(vocab_size=50257, n_positions=32, n_embd=16, n_layer=2, n_head=2)
    transformers.GPT2LMHeadModel(config).save_pretrained(repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    env = no_hub(tmp_path)
    args = ["--init_from", "gpt2", "--data", wikitext, "--device", "cpu", "--max_iters", "0", "--n_experts", "1",
            "--test_tokens", "100", "--out_dir", str(tmp_path / "o")]  # fmt: skip
    script = os.path.join(ROOT, "flash_moe_finetune.py")
    p = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "loading gpt2 from the Hugging Face cache (127.0.0.1 does not answer)" in p.stdout
    assert "test perplexity before" in p.stdout


def test_init_from_an_ex3_gpt2_checkpoint(tmp_path, gpt2_cache):
    """ex3's --tokenizer gpt2 checkpoints: ex1's parameter names, no biases, the exact GELU (kept: not GPT-2's tanh)."""
    import ex3_pretrain_finetune as ex3

    torch.manual_seed(0)
    cfg3 = ex3.Config(n_layer=2, n_head=2, n_embd=16, block_size=16, tokenizer="gpt2")
    ex3_model = perturbed(ex3.GPT(cfg3, 50257), 0.3).eval()  # large weights: the two GELUs differ by ~1e-3 here
    path = str(tmp_path / "best.pt")
    torch.save(
        {
            "script": "ex3_pretrain_finetune",
            "model": ex3_model.state_dict(),
            "config": asdict(cfg3),
            "tokenizer": "gpt2",
            "vocab": None,
        },
        path,
    )
    cfg = fm.Config(init_from=path, n_experts=4)
    model = fm.start_model(cfg, fm.GPT2Tokenizer(), CPU).eval()
    assert (cfg.n_layer, cfg.n_embd, cfg.bias, cfg.gelu, cfg.block_size, cfg.n_experts) == (
        2,
        16,
        False,
        "none",
        16,
        4,
    ) and not model.moes()
    idx = torch.randint(50257, (2, 16))
    with torch.no_grad():
        assert (model(idx)[0] - ex3_model(idx)[0]).abs().max() < 1e-5
        model.blocks[0].mlp.gelu = "tanh"
        assert (model(idx)[0] - ex3_model(idx)[0]).abs().max() > 1e-4  # the check can see the GELU


# ----------------------------------------------------------------------------------------------------------
# Upcycling and the router


@pytest.mark.parametrize("k", [1, 2])
def test_upcycled_model_equals_the_dense_one(k):
    torch.manual_seed(0)
    cfg = tiny_cfg(n_experts=4, moe_k=k, moe_layers="all", bias=True)
    dense = perturbed(fm.GPT(replace(cfg, n_experts=1), 50)).eval()
    x = torch.randint(50, (4, 16))
    with torch.no_grad():
        reference, _ = dense(x)
        model = copy.deepcopy(dense)
        fm.upcycle(model, cfg, x[:1])
        assert len(model.moes()) == 2 and model.num_params() > dense.num_params()
        assert (model.eval()(x)[0] - reference).abs().max() < 1e-5
        assert all((m.usage > 0).sum() >= 2 for m in model.moes())  # the tokens are spread over the experts


def router_grads(k, identical=True, balance_coef=0.0):
    torch.manual_seed(0)
    cfg = tiny_cfg(n_experts=4, moe_k=k, moe_layers="all", balance_coef=balance_coef, z_coef=0.0)
    model = perturbed(fm.GPT(replace(cfg, n_experts=1), 50))
    x, y = torch.randint(50, (4, 16)), torch.randint(50, (4, 16))
    fm.upcycle(model, cfg, x[:1])
    if not identical:
        with torch.no_grad():
            model.moes()[0].experts[1].c_fc.weight.mul_(1.5)
    model.train()
    _, loss = model(x, y)
    loss.backward()
    expert_grad = max(e.c_fc.weight.grad.abs().max().item() for m in model.moes() for e in m.experts)
    return max(m.router.weight.grad.abs().max().item() for m in model.moes()), expert_grad


def test_with_identical_experts_the_router_gets_no_gradient_from_the_lm_loss():
    router, experts = router_grads(k=2)
    assert experts > 1e-3 and router < 1e-6 * experts  # renormalised weights sum to 1: nothing to learn yet
    assert router_grads(k=2, identical=False)[0] > 1e-5  # once the experts differ, it does
    assert router_grads(k=2, balance_coef=0.01)[0] > 1e-5  # the load-balancing loss reaches it from the start
    assert router_grads(k=1)[0] > 1e-5  # top-1: p / p.detach() is 1, with p's gradient


def test_load_balancing_and_z_loss():
    """load_balancing_loss is switchhead_moe's, called with the k choices in place of its heads: probs (N, 1, E),
    chosen (N, k). The mean over the choices is E * sum_i f_i * P_i with f_i the share of all N * k choices."""
    import switchhead_moe

    assert inspect.getsource(fm.load_balancing_loss) == inspect.getsource(switchhead_moe.load_balancing_loss)
    E = 4
    uniform = torch.full((12, 1, E), 1 / E)
    for chosen in (torch.randint(E, (12, 2)), torch.zeros(12, 1, dtype=torch.long)):  # any routing
        assert fm.load_balancing_loss(uniform, chosen).item() == pytest.approx(1.0, abs=1e-6)
    one_hot = F.one_hot(torch.zeros(12, 1, dtype=torch.long), E).float()
    assert fm.load_balancing_loss(one_hot, torch.zeros(12, 1, dtype=torch.long)).item() == pytest.approx(
        E
    )  # all on expert 0
    probs, chosen = F.softmax(torch.randn(50, E), dim=-1), torch.randint(E, (50, 2))
    f = torch.bincount(chosen.flatten(), minlength=E).float() / chosen.numel()
    expected = E * (f * probs.mean(0)).sum().item()
    assert fm.load_balancing_loss(probs[:, None], chosen).item() == pytest.approx(expected, rel=1e-6)
    assert fm.router_z_loss(torch.zeros(9, E)).item() == pytest.approx(math.log(E) ** 2, abs=1e-6)
    assert fm.router_z_loss(torch.full((9, E), 3.0)).item() == pytest.approx((3 + math.log(E)) ** 2, abs=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Flash attention


@pytest.mark.parametrize(
    "B,H,T,D,block", [(2, 3, 1, 8, 16), (2, 3, 37, 8, 16), (1, 2, 64, 16, 16), (3, 1, 20, 4, 7), (1, 4, 5, 32, 8)]
)
def test_tiled_and_fused_attention_equal_explicit_attention(B, H, T, D, block):
    torch.manual_seed(T)
    q, k, v = (torch.randn(B, H, T, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
    explicit = F.softmax((q @ k.transpose(-2, -1) / math.sqrt(D)).masked_fill(~mask, float("-inf")), dim=-1) @ v
    g = torch.randn_like(explicit)
    want = torch.autograd.grad(explicit, (q, k, v), g)
    for out in (fm.tiled_attention(q, k, v, block), F.scaled_dot_product_attention(q, k, v, is_causal=True)):
        assert (out - explicit).abs().max() < 1e-5
        for a, b in zip(torch.autograd.grad(out, (q, k, v), g), want):
            assert (a - b).abs().max() < 1e-5


def test_attention_flag_switches_the_model_path():
    torch.manual_seed(0)
    models = {
        a: fm.GPT(tiny_cfg(attention=a, flash_block=5, block_size=23), 31).eval()
        for a in ("fused", "tiled", "explicit")
    }
    for m in models.values():
        m.load_state_dict(models["explicit"].state_dict())
    x = torch.randint(31, (2, 23))
    with torch.no_grad():
        ref = models["explicit"](x)[0]
        assert (models["tiled"](x)[0] - ref).abs().max() < 1e-5 and (models["fused"](x)[0] - ref).abs().max() < 1e-5


# ----------------------------------------------------------------------------------------------------------
# Sampling


class Stub(fm.GPT):
    """A 'model' whose next-token logits follow a table: after token a, table[a] gets 10 (without an entry, `second`
    does), `second` 5, every other token -20."""

    def __init__(self, vocab_size, table, second):
        super().__init__(fm.Config(n_layer=1, n_head=1, n_embd=4, block_size=64, n_experts=1), vocab_size)
        self.table, self.second, self.vocab_size = table, second, vocab_size

    def forward(self, idx, targets=None, start=0):
        logits = torch.full((idx.size(0), idx.size(1) - start, self.vocab_size), -20.0)
        logits[:, -1, self.second] = 5.0
        for b, last in enumerate(idx[:, -1].tolist()):
            logits[b, -1, self.table.get(last, self.second)] = 10.0
        return logits, None


def test_banned_words_never_appear(gpt2_cache):
    tok = fm.GPT2Tokenizer()
    unk = tok.encode(" <unk>")  # three tokens: ' <', 'unk', '>'
    assert len(unk) == 3 and tuple(unk) in fm.banned_sequences("<unk>, nothing", tok)
    the = tok.encode(" the")[0]
    model = Stub(
        tok.vocab_size, {the: unk[0], unk[0]: unk[1], unk[1]: unk[2], unk[2]: unk[0]}, the
    )  # writes ' <unk>' forever
    idx = torch.tensor([tok.encode("It was")] * 2)
    assert "<unk>" in tok.decode(model.generate(idx, 12, temperature=0)[0].tolist())  # the check can see it
    ban = [list(s) for s in fm.banned_sequences("<unk>", tok)]
    for temperature in (0, 1.0):
        torch.manual_seed(0)
        for row in model.generate(idx, 12, temperature=temperature, top_k=2, ban=ban).tolist():
            assert "<unk>" not in tok.decode(row) and " <unk" in tok.decode(
                row
            )  # it tried, and the last token was refused
    # a one-token word is refused everywhere, though it is the model's favourite
    out = model.generate(idx, 12, temperature=0, ban=[[unk[0]]]).tolist()
    assert all(unk[0] not in row[2:] for row in out)


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.05, 0.5, 0.15, 0.3]]))
    for p, kept in ((0.4, {1}), (0.7, {1, 3}), (0.9, {1, 2, 3}), (0.99, {0, 1, 2, 3})):
        assert set(torch.isfinite(fm.top_p_filter(logits, p))[0].nonzero().flatten().tolist()) == kept


def test_repetition_penalty():
    model = Stub(20, {1: 7, 7: 7}, 3)  # always favours token 7 (10), then token 3 (5)

    def greedy(penalty):
        return model.generate(torch.tensor([[1]]), 2, temperature=0, repetition_penalty=penalty)[0].tolist()

    assert greedy(1.0) == [1, 7, 7] and greedy(2.5) == [1, 7, 3]  # 10 / 2.5 < 5: once written, 7 loses to the runner-up


def test_clean_wikitext():
    assert (
        fm.clean_wikitext(WIKI)
        == '= Lobster =\n\nThe lobster is a animal. It\'s red-tipped, 1,000 g (3.5 lb) and "highly esteemed".\n'
    )


# ----------------------------------------------------------------------------------------------------------
# Perplexity


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    cfg = tiny_cfg(block_size=16, batch_size=3, test_stride=5)
    model = fm.GPT(cfg, 37)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # zero logits everywhere
    ids = np.random.default_rng(0).integers(0, 37, 101).astype(np.uint16)
    ppl, nll, n = fm.perplexity(model, ids, cfg, CPU, nullcontext())
    assert n == 100 and ppl == pytest.approx(37, rel=1e-5) and nll == pytest.approx(100 * math.log(37), rel=1e-5)


def test_sliding_window_scores_each_token_once_with_its_context():
    """Stride 1: every token is predicted from the block_size tokens before it (all of them near the start)."""
    torch.manual_seed(0)
    cfg = tiny_cfg(block_size=8, batch_size=4, test_stride=1)
    model = fm.GPT(cfg, 23).eval()
    ids = np.random.default_rng(1).integers(0, 23, 30).astype(np.uint16)
    t = torch.from_numpy(ids.astype(np.int64))
    with torch.no_grad():
        brute = sum(F.cross_entropy(model(t[None, max(0, i - 8) : i])[0][0, -1], t[i]).item() for i in range(1, 30))
    ppl, nll, n = fm.perplexity(model, ids, cfg, CPU, nullcontext())
    assert n == 29 and nll == pytest.approx(brute, rel=1e-5)
    assert fm.perplexity(model, ids, replace(cfg, test_stride=3), CPU, nullcontext())[2] == 29


# ----------------------------------------------------------------------------------------------------------
# Runs through main


def test_smoke_upcycle_finetune_evaluate_sample_resume(tmp_path, wikitext, gpt2_cache, capsys, monkeypatch):
    out, part = str(tmp_path / "out"), str(tmp_path / "part")
    args = TINY + ["--n_experts", "4", "--moe_layers", "all", "--eval_interval", "3", "--log_interval", "1"]
    args += ["--max_iters", "6"]
    fm.main(args + ["--data", wikitext, "--out_dir", out])
    text = capsys.readouterr().out
    assert "upcycled the MLPs of layers 0, 1 into 4 experts each, top-2" in text
    change = float(text.split("largest logit change ")[1].split()[0])
    assert change < 1e-5
    before = float(text.split("test perplexity before fine-tuning: ")[1].split()[0])
    after = float(text.split("test perplexity after fine-tuning (best val checkpoint): ")[1].split()[0])
    assert after < before  # it learned the repeated text
    assert text.count("  layer 1 expert use (%) | mlp ") >= 4  # at each evaluation and each perplexity
    assert "--- sample 1, starting model ---" in text and "--- sample 1, fine-tuned ---" in text
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)  # the latest state, whatever the val loss
    assert ckpt["iter_num"] == 6 and "optimizer" in ckpt
    assert (
        ckpt["tokenizer"] == "gpt2"
        and ckpt["config"]["n_experts"] == 4
        and "blocks.0.mlp.experts.3.c_fc.weight" in ckpt["model"]
    )
    assert "optimizer" not in torch.load(os.path.join(out, "best.pt"), weights_only=True)  # the model to sample from

    # Ctrl-C during iteration 4: ckpt.pt holds iteration 5, and --resume (the data flag from the checkpoint) ends with
    # the uninterrupted run's losses, dropout and all
    get_lr = fm.get_lr
    ctrl_c = lambda it, cfg: (it == 4 and os.kill(os.getpid(), signal.SIGINT), get_lr(it, cfg))[1]  # noqa: E731
    monkeypatch.setattr(fm, "get_lr", ctrl_c)
    with pytest.raises(SystemExit) as e:
        fm.main(args + ["--data", wikitext, "--out_dir", part])
    assert e.value.code == 130
    assert f"stopped: {part}{os.sep}ckpt.pt holds iteration 5; continue with --resume" in capsys.readouterr().err
    monkeypatch.setattr(fm, "get_lr", get_lr)
    line = user_error(capsys, fm.main, args + ["--out_dir", part, "--resume", "--data", str(tmp_path)])
    assert "differs from the checkpoint's" in line
    fm.main(args + ["--out_dir", part, "--resume"])
    assert "resuming from iter 5" in capsys.readouterr().out
    assert losses(part) == losses(out)

    # a new run never replaces a checkpoint without --overwrite; a zero-shot run writes none, so it may share the folder
    assert "--overwrite" in user_error(capsys, fm.main, args + ["--data", wikitext, "--out_dir", out])
    fm.main(TINY + ["--data", wikitext, "--out_dir", out, "--max_iters", "0"])
    # sampling alone: the best checkpoint and the model it started from, cleaned, <unk> banned
    os.remove(os.path.join(out, "ckpt.pt"))
    capsys.readouterr()
    fm.main(["--out_dir", out, "--prompt", "The lobster", "--max_new_tokens", "12", "--device", "cpu", "--top_k", "0"])
    text = capsys.readouterr().out
    assert (
        "--- sample 1, starting model ---\nThe lobster" in text and "--- sample 1, fine-tuned ---\nThe lobster" in text
    )
    assert "<unk>" not in text


@pytest.mark.slow
def test_a_resumed_run_says_where_its_first_perplexity_was_measured(tmp_path, wikitext, gpt2_cache, capsys):
    """A resumed run first scores its checkpoint's model, not the model fine-tuning started from: neither its lines nor
    the closing comparison call that 'before fine-tuning'."""
    args = TINY + ["--data", wikitext, "--out_dir", str(tmp_path / "o"), "--n_experts", "1", "--eval_interval", "2"]
    args += ["--no-compare"]
    fm.main(args + ["--max_iters", "2"])
    assert "test perplexity before fine-tuning: " in capsys.readouterr().out
    fm.main(args + ["--max_iters", "4", "--resume"])
    text = capsys.readouterr().out
    assert "before fine-tuning" not in text
    first = float(text.split("test perplexity at iter 2, where this run resumed: ")[1].split()[0])
    after = float(text.split("test perplexity after fine-tuning (best val checkpoint): ")[1].split()[0])
    assert f"test perplexity per token: {first:.2f} at iter 2, where this run resumed | {after:.2f} after" in text


def test_test_tokens_limits_the_scoring_and_the_quick_try_uses_it(tmp_path, wikitext, gpt2_cache, capsys):
    """--test_tokens N scores only the first N tokens of the test split: scoring all of it, twice, made a 40-step run
    take 7 minutes on 2 CPU cores. The docstring's quick try uses it."""
    line = next(line for line in fm.__doc__.splitlines() if "--max_iters 40" in line)
    cfg = fm.parse_args(shlex.split(line.split("flash_moe_finetune.py")[1].split("(")[0]))
    assert cfg.max_iters == 40 and 0 < cfg.test_tokens <= 20000
    args = TINY + ["--data", wikitext, "--out_dir", str(tmp_path / "o"), "--max_iters", "0", "--n_experts", "1"]
    scored = []
    for n in ("300", "0"):
        fm.main(args + ["--test_tokens", n])
        scored.append(int(re.search(r"per token \(([\d,]+) tokens\)", capsys.readouterr().out)[1].replace(",", "")))
    assert scored[0] == 299 and scored[1] > 1000  # the whole test split, about 1,500 tokens


def test_zero_shot_and_dense(tmp_path, wikitext, gpt2_cache, capsys):
    fm.main(
        TINY
        + [
            "--data",
            wikitext,
            "--out_dir",
            str(tmp_path / "o"),
            "--n_experts",
            "1",
            "--max_iters",
            "0",
            "--attention",
            "tiled",
        ]
    )
    text = capsys.readouterr().out
    assert (
        "test perplexity before fine-tuning" in text and "upcycled" not in text and "tokens per iteration" not in text
    )
    assert not os.path.exists(tmp_path / "o" / "ckpt.pt")


@pytest.mark.slow
def test_user_errors(tmp_path, wikitext, gpt2_cache, capsys, monkeypatch):
    base = TINY + ["--data", wikitext, "--out_dir", str(tmp_path / "o")]
    # offline (HF_HUB_OFFLINE=1, HF_DATASETS_OFFLINE=1 in conftest), or without transformers: one line naming the flag
    # to use instead
    line = user_error(capsys, fm.main, base + ["--init_from", "gpt2"])
    assert "gpt2" in line and "--init_from PATH" in line and "--init_from scratch" in line
    monkeypatch.setattr(fm, "DATA_DIR", str(tmp_path / "data"))  # no WikiText cached there
    line = user_error(capsys, fm.main, TINY + ["--out_dir", str(tmp_path / "o")])
    assert "wikitext-2-raw-v1" in line and "--data " in line
    assert not os.path.exists(tmp_path / "data" / "wikitext-2-raw-v1")  # nothing half-written
    os.remove(os.path.join(wikitext, "train.txt"))
    assert "--train_split valid" in user_error(capsys, fm.main, base)
    base += ["--train_split", "valid"]
    assert "--moe_k" in user_error(capsys, fm.main, base + ["--moe_k", "5"])
    assert "--moe_layers" in user_error(capsys, fm.main, base + ["--moe_layers", "0,7"])
    assert "--train_split" in user_error(capsys, fm.main, base + ["--train_split", "test"])
    assert "--attention" in user_error(capsys, fm.main, base + ["--attention", "sparse"])
    assert "no such file" in user_error(capsys, fm.main, base + ["--init_from", "gpt-2"])
    ex3_gpt2, ex3_char = str(ex3_checkpoint(tmp_path, "gpt2")), str(ex3_checkpoint(tmp_path, "char"))
    line = user_error(capsys, fm.main, base + ["--block_size", "32", "--init_from", ex3_gpt2])
    assert "longer than the context" in line
    assert "character vocabulary" in user_error(capsys, fm.main, base + ["--init_from", ex3_char])
    for script in ("switchhead_moe", "ex1_gpt"):  # load_checkpoint(path, device, scripts): this script's and ex3's only
        line = user_error(capsys, fm.main, base + ["--init_from", str(ex3_checkpoint(tmp_path, "gpt2", script))])
        assert f"holds a checkpoint of {script}, not of flash_moe_finetune or ex3_pretrain_finetune" in line


@pytest.mark.slow
def test_data_is_wikitext_and_data_dir_the_downloads(tmp_path, wikitext, gpt2_cache, capsys, monkeypatch):
    """--data: a folder holding the splits, read where it is. --data_dir: where a download goes and is found again
    (ex3's meaning); offline with nothing there, the error names --data."""
    downloads = tmp_path / "downloads"
    shutil.copytree(wikitext, downloads / "wikitext-2-raw-v1")  # as a first run's download leaves it
    monkeypatch.setattr(fm, "DATA_DIR", str(tmp_path / "empty"))
    args = TINY + ["--max_iters", "0", "--n_experts", "1", "--out_dir", str(tmp_path / "o")]
    capsys.readouterr()
    fm.main(args + ["--data_dir", str(downloads)])
    assert f"WikiText-2 from {downloads / 'wikitext-2-raw-v1'}: " in capsys.readouterr().out
    fm.main(args + ["--data", wikitext, "--data_dir", str(tmp_path / "nowhere")])  # --data is read in place
    assert f"WikiText-2 from {wikitext}: " in capsys.readouterr().out
    line = user_error(capsys, fm.main, args + ["--data_dir", str(tmp_path / "nowhere")])
    assert "could not download" in line and "--data with a folder" in line
    assert not os.path.exists(tmp_path / "nowhere" / "wikitext-2-raw-v1")


def test_every_bad_data_folder_is_one_line(tmp_path, wikitext, gpt2_cache, capsys):
    base = TINY + ["--out_dir", str(tmp_path / "o"), "--data"]
    assert "no such folder" in user_error(capsys, fm.main, base + [str(tmp_path / "missing")])
    assert "is a file" in user_error(capsys, fm.main, base + [os.path.join(wikitext, "train.txt")])
    for name, content, says in [
        ("valid.txt", None, "no valid.txt"),
        ("train.txt", b"", "the train split has 0 tokens, too few for --block_size 16"),
        ("test.txt", b" = A = \n", "the test split has"),
        ("train.txt", WIKI.encode() + b"\0\0\0", "binary"),
        ("valid.txt", "caf\u00e9 ".encode("latin-1") * 100, "not UTF-8"),
    ]:
        folder = tmp_path / f"case-{name}-{len(content or b'')}"
        folder.mkdir()
        for split in ("train", "valid", "test"):
            if split + ".txt" != name:
                (folder / f"{split}.txt").write_text(WIKI * 25, encoding="utf-8")
            elif content is not None:
                (folder / name).write_bytes(content)
        assert says in user_error(capsys, fm.main, base + [str(folder)])


def test_init_from_a_folder(capsys):
    """(test_user_errors runs the mistakes every script shares; test_skeleton checks --help)"""
    assert "is a folder" in user_error(capsys, fm.parse_args, ["--init_from", ROOT])


def ex3_checkpoint(tmp_path, tokenizer, script="ex3_pretrain_finetune"):
    """A checkpoint as ex3 writes it (ex1's architecture and config fields): block 16, no biases."""
    cfg = tiny_cfg(n_embd=16, bias=False)
    path = tmp_path / f"{script}-{tokenizer}.pt"
    model = fm.GPT(cfg, 50257)
    config = {k: v for k, v in asdict(cfg).items() if k in ("n_layer", "n_head", "n_embd", "block_size", "bias")}
    ckpt = {"script": script, "model": model.state_dict(), "config": config, "tokenizer": tokenizer, "vocab": None}
    torch.save(ckpt, path)
    return path


# ----------------------------------------------------------------------------------------------------------
# Distributed data parallel

WORKER = """
import os, sys
sys.path.insert(0, {root!r})
import torch
import flash_moe_finetune as fm

models = []
TRAIN = fm.train
fm.train = lambda cfg, model, *a, **k: (models.append(model), TRAIN(cfg, model, *a, **k))[1]
fm.main(sys.argv[1:])
out = sys.argv[sys.argv.index("--out_dir") + 1]
torch.save(models[0].state_dict(), os.path.join(out, "rank" + os.environ.get("RANK", "0") + ".pt"))
"""


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(tmp_path, wikitext, gpt2_cache):
    """torchrun --nproc_per_node 2 on the CPU (gloo) with experts: an expert no token of a rank's micro-batch chose
    still takes part in the all-reduce; the weights end identical on both ranks and equal to one process's."""
    args = TINY + ["--data", wikitext, "--n_experts", "8", "--moe_k", "1", "--gradient_accumulation_steps", "2",
                   "--max_iters", "3", "--eval_interval", "3", "--max_new_tokens", "1", "--no-compare",
                   "--dropout", "0"]  # fmt: skip
    ddp, one, p, q = torchrun_and_single(tmp_path, WORKER.format(root=ROOT), args)
    assert (
        p.stdout.count("test perplexity before") == 1 and "2 processes x 1 micro-batches" in p.stdout
    )  # only rank 0 prints
    after = "test perplexity after fine-tuning (best val checkpoint): "
    ppl = lambda out: float(out.split(after)[1].split()[0])  # noqa: E731
    assert ppl(p.stdout) == pytest.approx(ppl(q.stdout), rel=1e-4)  # each process scored half of the windows
    r0, r1, single = (
        torch.load(os.path.join(d, f), weights_only=True)
        for d, f in ((ddp, "rank0.pt"), (ddp, "rank1.pt"), (one, "rank0.pt"))
    )
    for name, w in r0.items():
        assert torch.equal(w, r1[name]), name
        assert torch.allclose(w, single[name], atol=1e-5), name


def torchrun(worker, args):
    """torchrun --nproc_per_node 2 on the CPU (gloo, 1 thread each), whatever the outcome: the completed process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)


def test_ddp_code_is_ex3s():
    """Distributed data parallel is ex3's, word for word: a diff between the two scripts shows only the technique."""
    import ex3_pretrain_finetune as ex3

    for name in ("setup_ddp", "stop_together", "local_rank_zero_first", "DataLoader.get_batch"):
        assert inspect.getsource(attrgetter(name)(fm)) == inspect.getsource(attrgetter(name)(ex3)), name


GRAD_ACCUM = "--gradient_accumulation_steps 1 must be a multiple of 2"


def test_ddp_flags_are_checked_before_the_process_group(monkeypatch, capsys):
    """Under torchrun every process exits with 2 before joining the process group; rank 0 prints the line at once, the
    others only after a wait (in which torchrun, seeing rank 0 exit, ends them)."""
    waits = []
    monkeypatch.setattr(fm.time, "sleep", waits.append)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("LOCAL_RANK", rank)
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            fm.main(["--device", "cpu"])  # --gradient_accumulation_steps 1 cannot be shared by 2 processes
        err = capsys.readouterr().err
        line = f"error: {GRAD_ACCUM}\n" if rank == "0" else f"error (rank 1): {GRAD_ACCUM}\n"
        assert e.value.code == 2 and err == line and not torch.distributed.is_initialized()
    assert waits == [10]  # rank 1 waited, rank 0 did not


STOP_WORKER = """
import os, sys
sys.path.insert(0, {root!r})
import flash_moe_finetune as fm

get_lr = fm.get_lr
def get_lr_stopping(it, cfg):  # as if Ctrl-C reached rank 1 alone, during iteration 2
    if it == 2 and os.environ["RANK"] == "1":
        fm.STOP.requested = True
    return get_lr(it, cfg)
fm.get_lr = get_lr_stopping
fm.main(sys.argv[1:])
"""


@pytest.mark.slow
def test_torchrun_stops_every_rank_at_the_same_iteration(tmp_path, wikitext, gpt2_cache):
    """A stop request on one rank stops all of them at the top of the next iteration; rank 0 saves that state."""
    worker, out = tmp_path / "worker.py", str(tmp_path / "out")
    worker.write_text(STOP_WORKER.format(root=ROOT))
    args = ["--data", wikitext, "--gradient_accumulation_steps", "2", "--max_iters", "6", "--eval_interval", "5"]
    p = torchrun(worker, TINY + args + ["--no-compare", "--out_dir", out])
    assert p.returncode != 0 and p.stderr.count("stopped: ") == 1, p.stderr[-3000:]
    assert f"stopped: {out}{os.sep}ckpt.pt holds iteration 3; continue with --resume" in p.stderr
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["iter_num"] == 3
    assert 'flash_moe_finetune.py", line' not in p.stderr  # no traceback from a worker (torchrun adds its own report)


@pytest.mark.slow
def test_torchrun_user_errors_are_one_line(tmp_path, wikitext, gpt2_cache):
    """Under torchrun a bad flag (checked before the process group) and bad data (found by the first process, after
    it): rank 0 alone prints the line, once, every process exits, and none prints a traceback."""
    script = os.path.join(ROOT, "flash_moe_finetune.py")
    args = TINY + ["--data", wikitext, "--out_dir", str(tmp_path / "o")]
    p = torchrun(script, args)  # --gradient_accumulation_steps 1 for 2 processes
    errors = [line for line in p.stderr.splitlines() if "error: " in line]
    assert p.returncode != 0 and errors == [f"error: {GRAD_ACCUM}"]
    assert 'flash_moe_finetune.py", line' not in p.stderr  # no traceback from a worker (torchrun adds its own report)
    with open(os.path.join(wikitext, "test.txt"), "ab") as f:
        f.write(b"\0")
    p = torchrun(script, args + ["--gradient_accumulation_steps", "2"])
    errors = [line for line in p.stderr.splitlines() if "error: " in line]
    assert p.returncode != 0 and len(errors) == 1 and "binary" in errors[0]
    assert 'flash_moe_finetune.py", line' not in p.stderr
