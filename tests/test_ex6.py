"""ex6_modern_gpt.py: each piece of the recipe (RMSNorm, QK-norm, ReLU^2, residual scaling, zero-init, an untied head,
the soft-cap, Muon, the WSD schedule) does what it claims, and with every piece off the script is ex4."""

import os
import shlex
from dataclasses import asdict

import pytest
import torch
from torch.nn import functional as F

import ex4_mqa_swiglu as ex4
import ex6_modern_gpt as ex6
from conftest import assert_causal, assert_repeatable_samples, losses, read_log, user_error

V = 65  # vocabulary size of the test models
SIZE = dict(n_layer=2, n_head=4, n_embd=32, block_size=32)
# every piece of the recipe off: ex4's model, optimizer and schedule (mlp: ex4's default, SwiGLU)
OFF = dict(norm="layernorm", qk_norm=False, mlp="swiglu", residual_scale=False, zero_init=False, untied_head=False,
           softcap=0.0, optimizer="adamw", schedule="cosine")  # fmt: skip
# the docstring's command with every piece out at ex4's settings (its lines after "is ex4:"), less "python ex6..."
OFF_FLAGS = shlex.split(ex6.__doc__.split("is ex4:\n")[1].split("\nSample:")[0].replace("\\\n", " "))[2:]
# ex4's defaults where ex6's differ (the speedrun's settings; OFF and SIZE go over them)
EX4_SETTINGS = {k: v for k, v in asdict(ex4.Config()).items() if k != "out_dir" and getattr(ex6.Config(), k) != v}


def tiny(**kw):
    return ex6.Config(**{**SIZE, **kw})


def model(seed=0, **kw):
    torch.manual_seed(seed)
    return ex6.GPT(tiny(**kw), V)


def batch(seed=0, B=3, T=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(V, (B, T), generator=g), torch.randint(V, (B, T), generator=g)


# ----------------------------------------------------------------------------------------------------------
# Every piece off is ex4


@pytest.mark.parametrize(
    "arch",
    [dict(), dict(n_kv_head=2, mlp="gelu", pos="learned", bias=True),
     dict(mlp="quickgelu", score="multiplicative", window=8, dropout=0.1)],
    ids=["ex4-defaults", "gqa-gelu-learned-bias", "quickgelu-multiplicative-window-dropout"],
)  # fmt: skip
def test_every_piece_off_is_ex4(arch):
    """The same seed draws the same weights (same names, same values), the same logits and loss, and three steps of
    each model's own configure_optimizer at ex4's schedule leave the same weights, bit for bit."""
    torch.manual_seed(0)
    ref = ex4.GPT(ex4.Config(**{**SIZE, **arch}), V).train()
    torch.manual_seed(0)
    ours = ex6.GPT(tiny(**{**EX4_SETTINGS, **OFF, **SIZE, **arch}), V).train()
    a, b = ref.state_dict(), ours.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    start = a["lm_head.weight"].clone()
    opt_ref, opt_ours = ref.configure_optimizer(ref.cfg, "cpu"), ours.configure_optimizer(ours.cfg, "cpu")
    assert type(opt_ours) is torch.optim.AdamW
    settings = [
        [{k: len(v) if k == "params" else v for k, v in g.items()} for g in o.param_groups] for o in (opt_ref, opt_ours)
    ]
    assert settings[0] == settings[1]
    ref.cfg.warmup_iters = ours.cfg.warmup_iters = 2  # the steps' learning rates differ
    x, y = batch()
    for it in range(3):
        out = []
        for m, opt, lr in ((ref, opt_ref, ex4.get_lr(it, ref.cfg)), (ours, opt_ours, ex6.get_lr(it, ours.cfg))):
            for group in opt.param_groups:
                group["lr"] = lr
            torch.manual_seed(100 + it)  # the same dropout masks
            logits, loss = m(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            out.append((logits, loss))
        assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])
        assert all(torch.equal(p, q) for p, q in zip(ref.parameters(), ours.parameters()))
    assert not torch.equal(start, ref.lm_head.weight)  # the steps moved the weights


def test_the_docstrings_every_piece_out_is_ex4s_config():
    ours, ref = asdict(ex6.parse_args(OFF_FLAGS)), asdict(ex4.Config())
    del ours["out_dir"], ref["out_dir"]
    assert {k: ours[k] for k in ref} == ref and {k: ours[k] for k in OFF} == OFF


def test_every_flag_off_trains_and_samples_as_ex4(text_file, tmp_path, capsys):
    """Through main, with the flags the docstring gives: ex4's log (losses and learning rates), weights and sample."""
    args = [*SMALL, "--data", text_file, "--max_iters", "8", "--warmup_iters", "2", "--max_new_tokens", "30"]
    runs = {}
    for name, mod, flags in (("ex4", ex4, []), ("ex6", ex6, OFF_FLAGS)):
        out = str(tmp_path / name)
        mod.main([*flags, *args, "--out_dir", out])  # the test's sizes and lengths over the docstring's
        sample = capsys.readouterr().out.split("--- sample 1 ---\n")[1]
        log = [{k: v for k, v in row.items() if k != "ms_per_iter"} for row in read_log(out)]
        runs[name] = log, sample, torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    (log4, sample4, ckpt4), (log6, sample6, ckpt6) = runs["ex4"], runs["ex6"]
    assert log4 == log6 and len(log4) > 8 and sample4 == sample6
    assert all(torch.equal(ckpt4["model"][k], ckpt6["model"][k]) for k in ckpt4["model"])


# ----------------------------------------------------------------------------------------------------------
# RMSNorm, QK-norm, ReLU^2


def test_rmsnorm_is_its_formula():
    norm = ex6.make_norm(tiny(), 32)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(32) + 0.5)
    x = torch.randn(4, 7, 32) + 3  # a mean far from 0: RMSNorm keeps it, LayerNorm subtracts it
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), expected)
    assert not torch.allclose(norm(x), F.layer_norm(x, (32,), norm.weight), atol=1e-2)
    assert norm(x.bfloat16()).dtype == torch.bfloat16  # computed in float32, returned in x's dtype
    assert torch.equal(norm(x.bfloat16()), norm(x.bfloat16().float()).bfloat16())
    assert isinstance(ex6.make_norm(tiny(norm="layernorm"), 32), torch.nn.LayerNorm)
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in model().modules())  # the recipe has none left


@pytest.mark.parametrize("n_kv_head", [2, 1])
def test_qk_norm_gives_unit_rms_queries_and_keys_times_their_gains(n_kv_head):
    """Each head's query and key vectors have RMS 1 times the learned gains (before the rotation; rotary keeps norms,
    so after it too with gains of 1); without QK-norm they do not."""
    x = torch.randn(2, 9, 32) * 5
    for pos in ("none", "rope"):
        attn = ex6.CausalSelfAttention(tiny(n_kv_head=n_kv_head, pos=pos))
        if pos == "none":
            with torch.no_grad():
                attn.q_norm.weight.copy_(torch.rand_like(attn.q_norm.weight) + 0.5)
                attn.k_norm.weight.copy_(torch.rand_like(attn.k_norm.weight) + 0.5)
        q, k, _ = attn.qkv(x, torch.arange(9).unsqueeze(0))
        assert q.shape[1] == 4 and k.shape[1] == n_kv_head
        for t, norm in ((q, attn.q_norm), (k, attn.k_norm)):
            rms = (t / norm.weight).pow(2).mean(-1).sqrt() if pos == "none" else t.pow(2).mean(-1).sqrt()
            torch.testing.assert_close(rms, torch.ones_like(rms), atol=1e-4, rtol=0)
    attn = ex6.CausalSelfAttention(tiny(n_kv_head=2, qk_norm=False))
    assert attn.q_norm is None
    q, k, _ = attn.qkv(x, torch.arange(9).unsqueeze(0))
    assert (q.pow(2).mean(-1).sqrt() - 1).abs().max() > 0.1


def test_relu2_is_its_formula():
    mlp = ex6.MLP(tiny(mlp="relu2"))
    assert mlp.c_gate is None and mlp.c_fc.weight.shape == (128, 32)  # ex1's two matrices, 4 n_embd wide
    x = torch.randn(5, 32)
    expected = F.relu(x @ mlp.c_fc.weight.T).pow(2) @ mlp.c_proj.weight.T
    torch.testing.assert_close(mlp(x), expected)
    assert not torch.allclose(mlp(x), F.relu(x @ mlp.c_fc.weight.T) @ mlp.c_proj.weight.T, atol=1e-4)


# ----------------------------------------------------------------------------------------------------------
# Zero-init, residual scaling, the untied head, the soft-cap


def test_zero_init_makes_every_block_the_identity():
    m = model()
    x, pos = torch.randn(2, 16, 32), torch.arange(16).unsqueeze(0)
    for block in m.blocks:
        assert torch.equal(block(x, pos, x0=torch.randn_like(x)), x)  # a_l = 1, b_l = 0, projections zero
    logits = m(batch()[0])[0]
    assert torch.equal(logits, torch.zeros_like(logits))  # the zero head: every token equally likely
    nonzero = model(zero_init=False)
    assert not torch.equal(nonzero.blocks[0](x, pos, x0=x), x)
    tied = model(untied_head=False)  # zero-init leaves a tied head alone: it is the token embeddings
    assert tied.lm_head.weight is tied.wte.weight and tied.wte.weight.abs().min() > 0


def test_residual_scaling_mixes_the_embeddings_into_every_block():
    """At the start (1, 0) it is the block without it; with (a, b) set, the block reads a x + b x0."""
    plain, scaled = model(residual_scale=False, zero_init=False), model(zero_init=False)
    assert torch.equal(plain.blocks[1].mlp.c_fc.weight, scaled.blocks[1].mlp.c_fc.weight)  # the same draws
    idx = batch()[0]
    torch.testing.assert_close(plain(idx)[0], scaled(idx)[0], atol=0, rtol=0)
    x, x0, pos = torch.randn(2, 16, 32), torch.randn(2, 16, 32), torch.arange(16).unsqueeze(0)
    with torch.no_grad():
        scaled.blocks[1].lambdas.copy_(torch.tensor([0.5, 2.0]))
    torch.testing.assert_close(scaled.blocks[1](x, pos, x0=x0), plain.blocks[1](0.5 * x + 2.0 * x0, pos))
    assert not torch.allclose(scaled(idx)[0], plain(idx)[0], atol=1e-4)
    # x0 is the embeddings: with (a, b) = (0, 1) the last block starts afresh from them, and the first block's
    # weights no longer matter
    with torch.no_grad():
        scaled.blocks[1].lambdas.copy_(torch.tensor([0.0, 1.0]))
        before = scaled(idx)[0]
        scaled.blocks[0].mlp.c_fc.weight.normal_()
    torch.testing.assert_close(scaled(idx)[0], before, atol=0, rtol=0)


def test_softcap_bounds_the_logits():
    capped, raw = model(softcap=2.0), model(softcap=0.0)
    with torch.no_grad():
        capped.lm_head.weight.normal_(std=5.0)
    raw.load_state_dict(capped.state_dict())
    idx = batch()[0]
    big, logits = raw(idx)[0], capped(idx)[0]
    assert big.abs().max() > 10 and logits.abs().max() <= 2.0 and logits.abs().max() > 1.9
    torch.testing.assert_close(logits, 2.0 * torch.tanh(big / 2.0))
    assert model().cfg.softcap == 15.0


def test_untied_head_is_a_matrix_of_its_own():
    m = model()
    assert m.lm_head.weight is not m.wte.weight and m.lm_head.weight.abs().max() == 0
    assert m.wte.weight.abs().min() > 0  # the embeddings keep their random start


@pytest.mark.parametrize("kw", [dict(), dict(zero_init=False, n_kv_head=2, window=6)])
def test_causal_and_cached_generation_equals_recomputing(kw):
    m = model(**kw).eval()
    if not kw:  # the recipe starts with zero projections and head: give them weights, or every logit is 0
        with torch.no_grad():
            for name, p in m.named_parameters():
                if p.abs().max() == 0:
                    p.normal_(std=0.2)
    assert_causal(m, V, T=32, t=20)
    prompt = batch(seed=1, B=2, T=5)[0]
    greedy = [m.generate(prompt, 40, temperature=0, use_cache=c) for c in (True, False)]
    assert torch.equal(greedy[0], greedy[1]) and len(set(greedy[0][0].tolist())) > 3


# ----------------------------------------------------------------------------------------------------------
# Muon


def test_newton_schulz_orthogonalises():
    """The output keeps G's singular vectors (U^T O V is diagonal) and moves every singular value of a random
    rectangular matrix near 1: the quintic iteration gives about 0.68 to 1.14 (it trades exactness for speed)."""
    g = torch.Generator().manual_seed(0)
    for shape in ((128, 512), (300, 64)):
        G = torch.randn(*shape, generator=g) * 0.01
        ortho = ex6.newton_schulz(G)
        assert ortho.shape == G.shape and ortho.dtype == torch.float32
        s = torch.linalg.svdvals(ortho)
        assert 0.65 < s.min() and s.max() < 1.2, (s.min(), s.max())
        assert torch.linalg.svdvals(G).max() / torch.linalg.svdvals(G).min() > 2  # G itself is far from it
        U, _, Vh = torch.linalg.svd(G, full_matrices=False)
        D = U.T @ ortho @ Vh.T
        torch.testing.assert_close(D, torch.diag(torch.diag(D)), atol=1e-4, rtol=0)


@pytest.mark.parametrize("shape", [(64, 32), (32, 64)])
def test_muon_matches_torch_optim_muon(shape):
    """Three steps of ours and of torch.optim.Muon (its defaults: Nesterov, momentum 0.95, the update scaled by
    sqrt(max(1, rows/cols)), weight decay) on the same gradients: the same updates within bfloat16's rounding (torch's
    Newton-Schulz runs in bfloat16: about 2% of the update's norm)."""
    g = torch.Generator().manual_seed(0)
    start = torch.randn(*shape, generator=g) * 0.1
    theirs, ours = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    opts = torch.optim.Muon([theirs], lr=0.02, weight_decay=0.1), ex6.Muon([ours], lr=0.02, weight_decay=0.1)
    for _ in range(3):
        grad = torch.randn(*shape, generator=g)
        before = theirs.detach().clone()
        with torch.no_grad():  # from the same point each step: only the update differs
            ours.copy_(theirs)
        for p, opt in zip((theirs, ours), opts):
            p.grad = grad.clone()
            opt.step()
        u_theirs, u_ours = before - theirs.detach(), before - ours.detach()
        assert (u_ours - u_theirs).norm() / u_theirs.norm() < 0.03
    buffers = [opt.state[p]["momentum_buffer"] for p, opt in zip((theirs, ours), opts)]
    torch.testing.assert_close(buffers[0], buffers[1])


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    m = model()
    opt = m.configure_optimizer(m.cfg, "cpu")
    muon = {id(p) for g in opt.muon.param_groups for p in g["params"]}
    adamw = {id(p) for g in opt.adamw.param_groups for p in g["params"]}
    names = {id(p): n for n, p in m.named_parameters()}
    assert not muon & adamw and muon | adamw == set(names)
    assert sorted({names[i].split(".", 2)[2] for i in muon}) == [
        "attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"]  # fmt: skip
    assert {"wte.weight", "lm_head.weight", "blocks.0.lambdas", "ln_f.weight"} <= {names[i] for i in adamw}
    assert [g["lr"] for g in opt.param_groups] == [0.02, 1e-2, 1e-2]
    assert opt.param_groups[0]["lr_scale"] == pytest.approx(0.02 / 1e-2)


def test_wsd_schedule():
    cfg = tiny(max_iters=100, warmup_iters=10, decay_frac=0.3, learning_rate=1.0, min_lr=0.1)
    lrs = [ex6.wsd_lr(it, cfg) for it in range(101)]
    assert lrs[:10] == [ex6.get_lr(it, cfg) for it in range(10)]  # ex4's warmup
    assert lrs[10:71] == [1.0] * 61  # stable until the last 30%
    assert lrs[85] == pytest.approx(1.0 - 0.9 / 2) and lrs[100] == 0.1  # then linear down to min_lr
    assert all(a > b for a, b in zip(lrs[70:], lrs[71:]))
    assert ex6.wsd_lr(120, cfg) == 0.1
    assert ex6.wsd_lr(99, tiny(max_iters=100, warmup_iters=10, decay_frac=0.0)) == 1e-2  # no decay at all


# ----------------------------------------------------------------------------------------------------------
# Through main


SMALL = ["--device", "cpu", "--n_layer", "2", "--n_head", "4", "--n_embd", "32", "--block_size", "32", "--batch_size",
         "4", "--eval_interval", "5", "--eval_iters", "2", "--log_interval", "1"]  # fmt: skip
# a schedule that max_iters does not move (it ends at lr_decay_iters): a run stopped at 10 and resumed to 16 has the
# uninterrupted run's learning rates, the decay (from 8) included
SCHEDULE = ["--warmup_iters", "2", "--lr_decay_iters", "16", "--decay_frac", "0.5", "--dropout", "0.1"]


def test_smoke_and_muon_state_survives_resume(text_file, tmp_path, capsys):
    out, straight = str(tmp_path / "out"), str(tmp_path / "straight")
    ex6.main([*SMALL, *SCHEDULE, "--data", text_file, "--out_dir", out, "--max_iters", "10", "--max_new_tokens", "40"])
    printed = capsys.readouterr().out
    assert len(printed.split("--- sample 1 ---\n")[1]) > 40 and os.path.isfile(os.path.join(out, "best.pt"))
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    muon, adamw = ckpt["optimizer"]["muon"], ckpt["optimizer"]["adamw"]
    assert ckpt["iter_num"] == 10 and len(muon["state"]) == 8  # 4 matrices a block
    assert all(s["momentum_buffer"].abs().max() > 0 for s in muon["state"].values())
    cfg = ex6.Config(**ckpt["config"])
    lr = ex6.wsd_lr(10, cfg)  # decaying: Muon's follows at muon_lr / learning_rate times it
    assert lr < cfg.learning_rate and adamw["param_groups"][0]["lr"] == lr
    assert muon["param_groups"][0]["lr"] == pytest.approx(lr * cfg.muon_lr / cfg.learning_rate)

    resume = [*SMALL, *SCHEDULE, "--out_dir", out, "--max_iters", "16", "--resume", "--max_new_tokens", "5"]
    assert "--optimizer 'adamw' differs" in user_error(capsys, ex6.main, resume + ["--optimizer", "adamw"])
    assert "--softcap 0.0 differs" in user_error(capsys, ex6.main, resume + ["--softcap", "0"])
    ex6.main(resume)
    assert "resuming from iter 10" in capsys.readouterr().out
    ex6.main([*SMALL, *SCHEDULE, "--data", text_file, "--out_dir", straight, "--max_iters", "16",
              "--max_new_tokens", "5"])  # fmt: skip
    capsys.readouterr()
    assert losses(out) == losses(straight) and len(losses(out)) > 16
    a, b = (torch.load(os.path.join(d, "ckpt.pt"), weights_only=True) for d in (out, straight))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(
        torch.equal(a["optimizer"]["muon"]["state"][i]["momentum_buffer"], s["momentum_buffer"])
        for i, s in b["optimizer"]["muon"]["state"].items()
    )
    assert_repeatable_samples(ex6.main, out, capsys)


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--decay_frac", "1.5"], "--decay_frac"),
        (["--softcap", "-1"], "--softcap"),
        (["--muon_lr", "0"], "--muon_lr"),
        (["--mlp", "relu3"], "--mlp"),
        (["--norm", "batchnorm"], "--norm"),
        (["--optimizer", "sgd"], "--optimizer"),
        (["--schedule", "linear"], "--schedule"),
        (["--score", "multiplicative"], "--no-qk_norm"),  # with the default QK-norm
    ],
)
def test_user_errors(flags, words, text_file, tmp_path, capsys):
    line = user_error(capsys, ex6.main, [*SMALL, *flags, "--data", text_file, "--out_dir", str(tmp_path)])
    assert words in line


# ----------------------------------------------------------------------------------------------------------
# Compile and bfloat16


@pytest.mark.slow
def test_compiles_without_graph_breaks():
    """The whole recipe's training forward, captured by TorchDynamo in one graph (explain compiles as --compile does),
    and through it the loss and gradients of the model itself."""
    import torch._dynamo as dynamo

    m = model(dropout=0.1, n_kv_head=2, window=8).train()
    x, y = batch()
    dynamo.reset()
    explained = dynamo.explain(m)(x, y)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    results = []
    for run in (torch.compile(m, backend="eager", fullgraph=True), m):
        dynamo.reset()
        m.zero_grad(set_to_none=True)
        torch.manual_seed(0)  # the same dropout masks
        loss = run(x, y)[1]
        loss.backward()
        results.append([loss.detach()] + [p.grad for p in m.parameters()])
    dynamo.reset()
    assert all(g is not None for g in results[0])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


@pytest.mark.slow
def test_bfloat16_trains_close_to_float32(text_file, tmp_path):
    runs = []
    for dtype in ("bfloat16", "float32"):
        out = str(tmp_path / dtype)
        ex6.main([*SMALL, "--data", text_file, "--out_dir", out, "--max_iters", "6", "--dtype", dtype,
                  "--learning_rate", "1e-2", "--warmup_iters", "0", "--max_new_tokens", "5"])  # fmt: skip
        runs.append([float(r["train_loss"]) for r in read_log(out) if r["train_loss"]])
    assert len(runs[0]) == len(runs[1]) > 6
    assert max(abs(a - b) for a, b in zip(*runs)) < 0.1 and runs[0] != runs[1]
