"""switchhead_moe.py: the fast SwitchHead path equals an explicit loop over tokens and experts, one expert with unit
gates is multi-head attention and --n_experts 1 is ex1, attention() written out equals the fused kernel, the model
is causal, permuting experts changes nothing, each token uses exactly k experts and idle ones get no gradient, the
paper's cost accounting and the parameter counts, the load-balancing loss, and train, resume and sample through main."""

import inspect
import math
import os
import re

import pytest
import torch
from torch.nn import functional as F

import ex1_gpt as ex1
import ex4_mqa_swiglu as ex4
import switchhead_moe as sh
from conftest import assert_causal, assert_repeatable_samples, losses, read_log, user_error

TINY = "--n_layer 2 --n_head 2 --n_embd 32 --block_size 16 --batch_size 4 --device cpu --eval_iters 2".split()


def make_attn(n_embd=16, n_head=2, head_size=5, n_experts=4, moe_k=2, gate="sigmoid", flash=True, seed=0):
    cfg = sh.Config(
        n_layer=2,
        n_embd=n_embd,
        n_head=n_head,
        head_size=head_size,
        n_experts=n_experts,
        moe_k=moe_k,
        gate=gate,
        flash=flash,
        block_size=16,
        pos="learned",  # no rotation inside the module: the experts alone
    )
    torch.manual_seed(seed)
    attn = sh.SwitchHeadAttention(cfg).eval()
    with torch.no_grad():  # larger router weights than at init, so the choice of experts matters
        attn.v_router.weight.normal_()
        attn.o_router.weight.normal_()
    return attn


def at(x):
    """The positions of x's tokens, (1, T), as GPT.forward passes them to the attention modules."""
    return torch.arange(x.size(1)).unsqueeze(0)


def tiny_model(**overrides):
    cfg = sh.Config(
        **{
            "n_layer": 2,
            "n_head": 2,
            "n_embd": 32,
            "head_size": 8,
            "n_experts": 4,
            "moe_k": 2,
            "block_size": 16,
            **overrides,
        }
    )
    torch.manual_seed(0)
    return sh.GPT(cfg, vocab_size=11).eval()


def explicit_attention(attn, x):
    """SwitchHead written out: loops over batch, heads, tokens and the chosen experts, no fast path."""
    B, T, C = x.shape
    H, E, D, k = attn.n_head, attn.n_experts, attn.head_size, attn.moe_k
    q, key = (x @ attn.c_attn.weight.T).split(H * D, dim=2)
    v_logits = (x @ attn.v_router.weight.T).view(B, T, H, E)
    o_logits = (x @ attn.o_router.weight.T).view(B, T, H, E)
    out = torch.zeros(B, T, C)
    for b in range(B):
        for h in range(H):
            v = torch.zeros(T, D)
            for t in range(T):  # each source token's value: its k largest-gated value experts, sigmoid gates
                for e in sorted(range(E), key=lambda e: -v_logits[b, t, h, e].item())[:k]:
                    v[t] += torch.sigmoid(v_logits[b, t, h, e]) * (x[b, t] @ attn.v_experts[h, e])
            qh, kh = q[b, :, h * D : (h + 1) * D], key[b, :, h * D : (h + 1) * D]
            scores = (qh @ kh.T / math.sqrt(D)).masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
            y = F.softmax(scores, dim=-1) @ v
            for t in range(T):  # each destination token's output: its k largest-gated output experts
                for e in sorted(range(E), key=lambda e: -o_logits[b, t, h, e].item())[:k]:
                    out[b, t] += torch.sigmoid(o_logits[b, t, h, e]) * (y[t] @ attn.o_experts[h, e])
    return out


@pytest.mark.parametrize("flash", [True, False])
def test_fast_path_equals_explicit_loop(flash):
    attn = make_attn(flash=flash)
    x = torch.randn(2, 7, 16)
    with torch.no_grad():
        assert torch.allclose(attn(x, at(x)), explicit_attention(attn, x), atol=1e-5)


@pytest.mark.parametrize("mask", [None, "band"])
def test_attention_written_out_equals_the_fused_kernel(mask):
    q, k, v = torch.randn(3, 2, 2, 7, 5).unbind(0)  # (B, H, T, hs)
    if mask == "band":  # True where allowed: each query sees itself and the two keys before it
        pos = torch.arange(7)
        mask = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - 3)
    fused, explicit = sh.attention(q, k, v, mask, flash=True), sh.attention(q, k, v, mask, flash=False)
    assert torch.allclose(fused, explicit, atol=1e-6)
    if mask is None:  # None is causal: the first query sees only the first key
        assert torch.allclose(explicit[:, :, 0], v[:, :, 0], atol=1e-6)


def test_all_experts_is_the_full_sigmoid_weighted_sum():
    attn = make_attn(n_experts=3, moe_k=3)
    B, T, C, H, E, D = 2, 6, 16, 2, 3, 5
    x = torch.randn(B, T, C)
    with torch.no_grad():
        gv = torch.sigmoid(attn.v_router(x).view(B, T, H, E))
        go = torch.sigmoid(attn.o_router(x).view(B, T, H, E))
        v = torch.einsum("bthe,btc,hecd->bhtd", gv, x, attn.v_experts)
        q, key = attn.c_attn(x).split(H * D, dim=2)
        q, key = (t.view(B, T, H, D).transpose(1, 2) for t in (q, key))
        y = F.scaled_dot_product_attention(q, key, v, is_causal=True)  # (B, H, T, D)
        expected = torch.einsum("bthe,bhtd,hedc->btc", go, y, attn.o_experts)
        assert torch.allclose(attn(x, at(x)), expected, atol=1e-5)


def test_one_expert_with_gates_fixed_at_one_is_multi_head_attention(monkeypatch):
    attn = make_attn(n_embd=16, n_head=2, head_size=8, n_experts=1, moe_k=1)
    route = attn.route
    monkeypatch.setattr(attn, "route", lambda *a: (lambda gates, idx: (torch.ones_like(gates), idx))(*route(*a)))
    mha = ex1.CausalSelfAttention(ex1.Config(n_embd=16, n_head=2, block_size=16)).eval()  # the parent's attention
    with torch.no_grad():
        v = attn.v_experts[:, 0].permute(0, 2, 1).reshape(16, 16)  # head h's value rows h*8 .. h*8+7
        mha.c_attn.weight.copy_(torch.cat([attn.c_attn.weight, v]))
        mha.c_proj.weight.copy_(attn.o_experts[:, 0].reshape(16, 16).T)
        x = torch.randn(3, 9, 16)
        assert torch.allclose(attn(x, at(x)), mha(x), atol=1e-5)


def test_dense_baseline_is_ex1():
    dense = tiny_model(n_experts=1, n_head=4, head_size=8, pos="learned")
    parent = ex1.GPT(ex1.Config(n_layer=2, n_head=4, n_embd=32, block_size=16), vocab_size=11).eval()
    dense.load_state_dict(parent.state_dict())
    idx = torch.randint(11, (2, 16))
    assert torch.equal(dense(idx)[0], parent(idx)[0])


@pytest.mark.parametrize("gate,k", [("sigmoid", 2), ("softmax", 1)])
def test_causal(gate, k):
    model = tiny_model(gate=gate, moe_k=k)
    assert_causal(model, 11)


def test_permuting_experts_with_their_router_rows_changes_nothing():
    attn = make_attn()
    x = torch.randn(2, 8, 16)
    with torch.no_grad():
        before = attn(x, at(x))
        H, E = 2, 4
        perm = torch.tensor([2, 0, 3, 1])
        for router, experts in ((attn.v_router, attn.v_experts), (attn.o_router, attn.o_experts)):
            router.weight.copy_(router.weight.view(H, E, -1)[:, perm].reshape(H * E, -1))
            experts.copy_(experts[:, perm])
        after = attn(x, at(x))
        assert torch.allclose(before, after, atol=1e-6)
        attn.v_experts.copy_(attn.v_experts[:, perm])  # the check can see a change: experts alone moved
        assert not torch.allclose(before, attn(x, at(x)), atol=1e-3)


@pytest.mark.parametrize("gate,k", [("sigmoid", 1), ("sigmoid", 2), ("sigmoid", 3), ("softmax", 1)])
def test_each_token_and_head_uses_exactly_k_experts(gate, k):
    attn = make_attn(n_experts=5, moe_k=k, gate=gate)
    x = torch.randn(1, 6, 16)
    y = attn(x, at(x))
    # the first token sees only itself: its output depends on its own k value and k output experts per head
    y[0, 0].sum().backward()
    for experts in (attn.v_experts, attn.o_experts):
        used = (experts.grad.flatten(2) != 0).any(-1)  # (H, E)
        assert used.sum(-1).tolist() == [k, k]
    # and every token's choices, as counted for the eval log: k per token and head
    assert attn.usage.sum(-1).tolist() == [[6 * k] * 2] * 2


def test_unchosen_experts_get_exactly_zero_gradient():
    attn = make_attn(n_experts=8, moe_k=1).train()
    x = torch.randn(1, 3, 16)
    attn(x, at(x)).pow(2).sum().backward()
    with torch.no_grad():  # which experts did the batch choose? (recomputed, as in the explicit loop)
        chosen_v = F.one_hot(attn.v_router(x).view(1, 3, 2, 8).argmax(-1), 8).sum((0, 1)).bool()
        chosen_o = F.one_hot(attn.o_router(x).view(1, 3, 2, 8).argmax(-1), 8).sum((0, 1)).bool()
    for experts, chosen in ((attn.v_experts, chosen_v), (attn.o_experts, chosen_o)):
        assert (~chosen).any()  # 3 tokens, 8 experts: some are idle
        grad_norms = experts.grad.flatten(2).abs().sum(-1)
        assert (grad_norms[~chosen] == 0).all()
        assert (grad_norms[chosen] > 0).all()
    for router, chosen in ((attn.v_router, chosen_v), (attn.o_router, chosen_o)):  # sigmoid: idle router rows too
        assert (router.weight.grad.view(2, 8, -1)[~chosen] == 0).all()


def test_accounting_reproduces_the_paper():
    # SwitchHead paper, Transformer XL with d_model=412 at T=256: dense 10 heads of 41; SwitchHead 2 heads of 76, E=5,
    # k=2
    macs, mem = sh.attention_cost(256, 412, 10, 41, xl=True)
    assert (round(macs / 1e6, 1), round(mem / 1e6, 2)) == (453.4, 3.46)
    macs, mem = sh.attention_cost(256, 412, 2, 76, n_experts=5, k=2, xl=True)
    assert (round(macs / 1e6, 1), round(mem / 1e6, 2)) == (170.4, 0.76)


def test_accounting_of_this_model_scales_with_its_parts():
    T, d = 256, 128
    dense, dense_mem = sh.attention_cost(T, d, 8, 16)
    assert dense == 4 * T * d * d + 2 * T * T * d  # projections plus the two T x T products
    assert dense_mem - sh.attention_cost(T, d, 4, 32)[1] == 2 * T * T * 4  # four fewer attention matrices
    k1, k2 = sh.attention_cost(T, d, 2, 24, 4, 1)[0], sh.attention_cost(T, d, 2, 24, 4, 2)[0]
    assert k2 - k1 == 2 * T * d * 2 * 24 + 2 * 2 * T * 24  # one more value and output expert per head and token


@pytest.mark.parametrize("n_embd,n_head,n_experts", [(128, 2, 4), (64, 2, 5), (96, 3, 2)])
def test_parameter_count(n_embd, n_head, n_experts):
    d, H, E = n_embd, n_head, n_experts
    formula = lambda D: 2 * d * H * D + 2 * H * E * d * D + 2 * H * E * d  # noqa: E731  q, k; experts; routers
    D = sh.matched_head_size(d, H, E)
    assert formula(D) <= 4 * d * d < formula(D + 1)  # the largest width with no more parameters than dense
    attn = sh.SwitchHeadAttention(sh.Config(n_embd=d, n_head=H, n_experts=E, head_size=D))
    assert sum(p.numel() for p in attn.parameters()) == formula(D)
    cfg = sh.parse_args(["--n_embd", str(d), "--n_head", str(H), "--n_experts", str(E)])
    assert cfg.head_size == D  # the default


def test_whole_model_parameter_count():
    moe, dense = tiny_model(), tiny_model(n_experts=1, n_head=8, head_size=4)  # 2 layers, d=32: 2 heads of 8, E=4, k=2
    switchhead = 2 * 32 * 2 * 8 + 2 * 2 * 4 * 32 * 8 + 2 * 2 * 4 * 32  # q, k; value and output experts; routers
    assert dense.num_params() - moe.num_params() == 2 * (4 * 32 * 32 - switchhead)
    assert (
        moe.num_params() - moe.num_params(active=True) == 2 * 2 * 2 * (4 - 2) * 32 * 8
    )  # layers, v and o, heads, idle experts


def test_load_balancing_loss():
    E, H = 4, 2
    uniform = torch.full((50, H, E), 1 / E)
    assert sh.load_balancing_loss(uniform, torch.randint(E, (50, H))).item() == pytest.approx(1.0)
    one_expert = F.one_hot(torch.full((50, H), 2), E).float()
    assert sh.load_balancing_loss(one_expert, torch.full((50, H), 2)).item() == pytest.approx(E)
    # and the model adds balance_coef * (one per layer) to the training loss, not to the evaluation loss
    model = tiny_model(gate="softmax", moe_k=1, balance_coef=0.5)
    idx, targets = torch.randint(11, (4, 16)), torch.randint(11, (4, 16))
    _, eval_loss = model(idx, targets)
    model.train()
    _, train_loss = model(idx, targets)
    aux = sum(block.attn.aux_loss for block in model.blocks)
    assert 0 < aux.item() <= 2 * 4  # two layers, each at most E (collapsed)
    assert train_loss.item() == pytest.approx(eval_loss.item() + 0.5 * aux.item(), abs=1e-5)


def test_softmax_gate_means_one_expert():
    assert sh.parse_args(["--gate", "softmax"]).moe_k == 1  # no --moe_k needed
    assert sh.parse_args(["--gate", "softmax", "--moe_k", "1"]).moe_k == 1
    assert sh.parse_args([]).moe_k == 2  # the sigmoid gate's top-2
    assert sh.parse_args(["--moe_k", "0"]).moe_k == 2  # 0, the default: the gate's own


def test_rope_is_ex4s_on_the_first_channels_and_sees_only_distances():
    for name in ("angles", "rotate"):  # one name per idea: ex4's functions, word for word
        assert inspect.getsource(getattr(sh, name)) == inspect.getsource(getattr(ex4, name))
    x, pos = torch.randn(2, 3, 7, 10), torch.arange(7).unsqueeze(0)
    out = sh.rotate_first(x, pos, 4)
    assert torch.equal(out[..., 4:], x[..., 4:])  # the channels past the first 4 carry no position
    assert torch.allclose(out[..., :4], ex4.rotate(x[..., :4], pos.unsqueeze(1)))
    assert not torch.allclose(out[..., :4], x[..., :4])
    cfg = sh.parse_args(["--n_embd", "16", "--n_head", "2", "--head_size", "10"])  # defaults: rope, half of 10: 4
    assert (cfg.pos, sh.rope_channels(cfg)) == ("rope", 4)
    assert sh.rope_channels(sh.parse_args(["--rope_fraction", "1", "--head_size", "10"])) == 10
    assert sh.rope_channels(sh.parse_args(["--rope_fraction", "0.05", "--head_size", "10"])) == 2  # at least a pair
    assert sh.rope_channels(sh.parse_args(["--pos", "learned"])) == 0
    for n_experts in (4, 1):  # both attention modules: shifting every position changes nothing, stretching does
        attn = sh.Block(sh.Config(n_embd=16, n_head=2, head_size=8, n_experts=n_experts, block_size=16)).attn.eval()
        with torch.no_grad():
            x = torch.randn(2, 9, 16)
            y = attn(x, at(x))
            assert torch.equal(y, attn(x))  # no positions given: 0 .. T-1
            assert torch.allclose(y, attn(x, at(x) + 5), rtol=1e-4, atol=1e-7)
            assert not torch.allclose(y, attn(x, 2 * at(x)), rtol=1e-2, atol=0)
    model = tiny_model()  # rope by default: no position table, still causal
    assert model.wpe is None and model.num_params() == sum(p.numel() for p in model.parameters())
    assert_causal(model, 11)


def test_fan_in_init():
    big = dict(n_layer=4, n_embd=64, head_size=16, n_experts=4, router_renorm=False)
    model = tiny_model(**big)
    attn, mlp = model.blocks[0].attn, model.blocks[0].mlp
    scale = 1 / math.sqrt(4)  # 1/sqrt(n_layer)
    for w, fan_in in ((attn.c_attn.weight, 64), (attn.v_router.weight, 64), (attn.v_experts, 64),
                      (attn.o_experts, 2 * 16), (mlp.c_fc.weight, 64), (mlp.c_proj.weight, 256)):  # fmt: skip
        assert w.std().item() == pytest.approx(scale / math.sqrt(fan_in), rel=0.1)
    assert model.wte.weight.std().item() == pytest.approx(0.02, rel=0.1)  # the embeddings keep GPT-2's
    gpt2 = tiny_model(**big, init="gpt2").blocks[0]
    assert gpt2.attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert gpt2.mlp.c_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(8), rel=0.1)


def test_router_rows_start_at_the_same_norm():
    on = tiny_model(n_embd=64, head_size=16).blocks[1].attn
    off = tiny_model(n_embd=64, head_size=16, router_renorm=False).blocks[1].attn  # the same draws, as drawn
    for a, b in ((on.v_router.weight, off.v_router.weight), (on.o_router.weight, off.o_router.weight)):
        norms, drawn = a.norm(dim=-1), b.norm(dim=-1)
        assert torch.allclose(norms, norms.mean().expand_as(norms), rtol=1e-5)
        assert drawn.max() / drawn.min() > 1.05  # as drawn, they differ: the check can fail
        assert a.norm().item() == pytest.approx(b.norm().item(), rel=1e-5)  # the overall scale stays
        assert torch.allclose(a / norms[:, None], b / drawn[:, None], atol=1e-6)  # and every row's direction


@pytest.mark.parametrize("gate,k", [("sigmoid", 2), ("softmax", 1)])
def test_expert_dropout_picks_neglected_experts_in_training_only(gate, k):
    attn = make_attn(n_embd=16, n_experts=4, moe_k=k, gate=gate)
    attn.expert_dropout = 0.5
    x = torch.randn(4, 64, 16)
    x[..., 0] = 10.0  # a constant channel: the router's rows decide the choice for every token
    with torch.no_grad():
        attn.v_router.weight.zero_()
        attn.v_router.weight[:, 0] = torch.tensor([1.0, 0.9, -1.0, -1.1] * 2)  # experts 0 (and 1) always win
        logits = attn.v_router(x).view(4, 64, 2, 4)
        _, idx = attn.eval().route(attn.v_router, x, 0)
        assert set((idx % 4).unique().tolist()) == set(range(k))  # eval: never the neglected ones
        gates, idx = attn.train().route(attn.v_router, x, 0)
    chosen = torch.bincount((idx % 4).flatten(), minlength=4) / idx.numel()
    assert (chosen[2:] > 0.02).all()  # training: experts 2 and 3 are picked when the winners are dropped
    assert (idx.diff(dim=-1) != 0).all()  # still k different experts per token and head
    probs = torch.sigmoid(logits) if gate == "sigmoid" else F.softmax(logits, dim=-1)
    assert torch.allclose(gates, probs.gather(-1, idx - attn.first_expert))  # gates are the undropped scores


def test_dead_experts():
    model = tiny_model()  # 2 layers, 2 heads of 4 experts, top-2
    for block in model.blocks:
        block.attn.usage.fill_(50)  # 100 tokens per head, every expert chosen by half of them
    model.blocks[1].attn.usage[1, 0] = torch.tensor([4, 96, 96, 4])  # layer 1, output head 0: experts 0 and 3 at 4%
    model.blocks[0].attn.usage[0, 1] = torch.tensor([5, 95, 50, 50])  # 5% is alive
    dead = sh.dead_experts(model)
    assert [d[:4] for d in dead] == [(1, "output", 0, 0), (1, "output", 0, 3)]
    assert [d[4] for d in dead] == pytest.approx([0.04, 0.04])  # their share of the tokens


def test_train_sample_resume(tmp_path, text_file, capsys):
    flags = "--learning_rate 1e-2 --dropout 0.1 --eval_interval 5 --log_interval 1 --lr_decay_iters 10".split()
    common = TINY + ["--data", text_file] + flags
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    sh.main(common + ["--out_dir", full, "--max_iters", "10", "--max_new_tokens", "30"])
    out = capsys.readouterr().out
    assert "--- sample 1 ---" in out and os.path.exists(os.path.join(full, "ckpt.pt"))
    assert torch.load(os.path.join(full, "best.pt"), weights_only=True)["iter_num"] == 10  # sampling reads best.pt
    assert "needs" in out and "% of its MACs" in out  # the accounting against the dense 8-head model
    assert out.count("layer 1 expert use") == 3  # at iterations 0, 5 and 10
    assert out.count("dead experts (chosen by < 5% of the val tokens): ") == 1  # at the end, of 2 * 2 * 2 * 4
    assert re.search(r"dead experts .*: \d+ of 32", out)
    assert float(read_log(full)[-1]["val_loss"]) < math.log(len(set(open(text_file).read())))

    # stop at 5, then resume to 10: the same losses as the uninterrupted run, dropout and routing and all
    sh.main(common + ["--out_dir", part, "--max_iters", "5"])
    training = ["--device", "cpu", "--eval_iters", "2", "--batch_size", "4", "--learning_rate", "1e-2", "--dropout",
                "0.1", "--eval_interval", "5", "--log_interval", "1", "--lr_decay_iters", "10"]  # fmt: skip
    resume = training + ["--out_dir", part, "--max_iters", "10", "--resume"]
    assert "--n_experts 3 differs from the checkpoint's 4" in user_error(capsys, sh.main, resume + ["--n_experts", "3"])
    sh.main(resume)  # no architecture and no --data: both come from ckpt.pt (the default data would be a download)
    assert "resuming from iter 5" in capsys.readouterr().out
    assert losses(part) == losses(full)

    assert_repeatable_samples(sh.main, full, capsys)  # sampling from the checkpoint alone


@pytest.mark.parametrize("flags", [["--gate", "softmax"], ["--n_experts", "1", "--n_head", "4"]])
def test_softmax_and_dense_variants_train(tmp_path, text_file, capsys, flags):
    out = str(tmp_path / "o")
    sh.main(
        TINY
        + flags
        + [
            "--data",
            text_file,
            "--out_dir",
            out,
            "--max_iters",
            "4",
            "--eval_interval",
            "4",
            "--max_new_tokens",
            "5",
            "--learning_rate",
            "1e-2",
            "--warmup_iters",
            "1",
        ]
    )
    printed = capsys.readouterr().out
    assert "--- sample 1 ---" in printed and ("expert use" in printed) == ("softmax" in flags)
    assert float(read_log(out)[-1]["val_loss"]) < float(read_log(out)[0]["val_loss"])


@pytest.mark.slow
def test_user_errors(tmp_path, text_file, capsys):
    assert "--moe_k 5" in user_error(capsys, sh.main, TINY + ["--n_experts", "4", "--moe_k", "5"])
    assert "--moe_k 3" in user_error(capsys, sh.main, TINY + ["--n_experts", "2", "--moe_k", "3"])
    assert "--moe_k 2" in user_error(capsys, sh.main, TINY + ["--gate", "softmax", "--moe_k", "2"])
    assert "--expert_dropout" in user_error(capsys, sh.main, TINY + ["--expert_dropout", "1"])
    assert "--pos" in user_error(capsys, sh.main, TINY + ["--pos", "sinusoidal"])
    assert "--rope_fraction" in user_error(capsys, sh.main, TINY + ["--rope_fraction", "1.5"])
    assert "pairs of channels" in user_error(capsys, sh.main, TINY + ["--head_size", "1"])
    assert "--init" in user_error(capsys, sh.main, TINY + ["--init", "xavier"])
    assert "--gate" in user_error(capsys, sh.main, TINY + ["--gate", "relu"])
    assert "--n_experts" in user_error(capsys, sh.main, TINY + ["--n_experts", "0"])
    assert "--balance_coef" in user_error(capsys, sh.main, TINY + ["--balance_coef", "-1"])
    assert "divisible" in user_error(capsys, sh.main, TINY + ["--n_experts", "1", "--n_head", "3"])
    assert "--head_size" in user_error(capsys, sh.main, TINY + ["--n_embd", "8", "--n_head", "4", "--n_experts", "8"])
    assert "no checkpoint" in user_error(capsys, sh.main, ["--out_dir", str(tmp_path), "--prompt", "hi"])
    data = ["--data", text_file, "--out_dir", str(tmp_path / "o")]
    assert "--n_embd" in user_error(
        capsys, sh.main, TINY + data + ["--n_embd", "-1", "--head_size", "8"]
    )  # not a traceback
