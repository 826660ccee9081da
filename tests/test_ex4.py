"""ex4_mqa_swiglu.py: grouped-query attention, SwiGLU, RoPE, sliding windows and the KV cache do what they claim."""

import math
import os

import pytest
import torch
from torch.nn import functional as F

import ex1_gpt as ex1
import ex4_mqa_swiglu as ex4
from conftest import assert_causal, losses, user_error

V = 65  # vocabulary size of the test models
OFF = dict(n_kv_head=4, mlp="gelu", pos="learned", window=0)  # every switch off: ex1's architecture


def tiny(**kw):
    return ex4.Config(**{**dict(n_layer=2, n_head=4, n_embd=32, block_size=32), **kw})


def model(seed=0, **kw):
    torch.manual_seed(seed)
    return ex4.GPT(tiny(**kw), V).eval()


def qkv(B, H, n_kv_head, T, hs, seed):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(B, H, T, hs, generator=g),
        torch.randn(B, n_kv_head, T, hs, generator=g),
        torch.randn(B, n_kv_head, T, hs, generator=g),
    )


# ----------------------------------------------------------------------------------------------------------
# Grouped-query attention


@pytest.mark.parametrize("flash", [True, False])
@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_gqa_equals_mha_with_repeated_key_value_weights(flash, n_kv_head):
    """ex4's attention with n_kv_head heads equals ex1's multi-head attention whose key and value weights are those
    of the group's shared head, repeated for each query head of the group (for n_kv_head == n_head: the same
    weights)."""
    cfg = tiny(n_kv_head=n_kv_head, pos="learned", flash=flash)
    torch.manual_seed(0)
    gqa = ex4.CausalSelfAttention(cfg)
    mha = ex1.CausalSelfAttention(ex1.Config(n_head=4, n_embd=32, block_size=32, flash=flash))
    C, hs, group = 32, 8, 4 // n_kv_head
    wq, wk, wv = gqa.c_attn.weight.detach().split([C, n_kv_head * hs, n_kv_head * hs])
    repeat = lambda w: w.view(n_kv_head, hs, C).repeat_interleave(group, dim=0).reshape(C, C)  # noqa: E731
    with torch.no_grad():
        mha.c_attn.weight.copy_(torch.cat([wq, repeat(wk), repeat(wv)]))
        mha.c_proj.weight.copy_(gqa.c_proj.weight)
    x, pos = torch.randn(3, 20, C), torch.arange(20).unsqueeze(0)
    torch.testing.assert_close(gqa(x, pos), mha(x), atol=1e-6, rtol=1e-5)
    if n_kv_head == 2:  # groups are consecutive query heads: alternating them (0, 1, 0, 1) is another model
        with torch.no_grad():
            mha.c_attn.weight.copy_(torch.cat([wq, wk.repeat(group, 1), wv.repeat(group, 1)]))
        assert not torch.allclose(gqa(x, pos), mha(x), atol=1e-4)


def test_all_switches_off_is_ex1():
    """With every switch off, ex4's whole model is ex1's: ex1's weights load as they are and give the same logits."""
    torch.manual_seed(0)
    ref = ex1.GPT(ex1.Config(n_layer=2, n_head=4, n_embd=32, block_size=32), V).eval()
    ours = model(**OFF)
    ours.load_state_dict(ref.state_dict())
    idx = torch.randint(V, (2, 32))
    torch.testing.assert_close(ours(idx)[0], ref(idx)[0], atol=1e-6, rtol=1e-5)


def test_kv_heads_shrink_the_projection_and_the_cache():
    """The key/value projection and the cache hold n_kv_head heads: MQA's are 1/n_head of MHA's."""
    sizes, cache_bytes = {}, {}
    for k in (4, 2, 1):
        m = model(n_kv_head=k, window=0)
        caches = [ex4.KVCache(32) for _ in m.blocks]
        m(torch.randint(V, (1, 5)), caches=caches)
        sizes[k] = m.blocks[0].attn.c_attn.weight.shape[0] - 32
        cache_bytes[k] = sum(c.nbytes() for c in caches)
        assert caches[0].k.shape == (1, k, 32, 8)
    assert sizes == {4: 64, 2: 32, 1: 16}
    assert (
        cache_bytes[4] == 2 * cache_bytes[2] == 4 * cache_bytes[1] == 2 * 2 * 4 * 32 * 8 * 4
    )  # layers, k and v, heads, slots, hs, fp32


# ----------------------------------------------------------------------------------------------------------
# SwiGLU


def test_swiglu_is_gated_and_matches_gelu_parameters():
    gelu, swiglu = ex4.MLP(tiny(n_embd=128, mlp="gelu")), ex4.MLP(tiny(n_embd=128))
    n_gelu, n_swiglu = (sum(p.numel() for p in m.parameters()) for m in (gelu, swiglu))
    assert abs(n_swiglu - n_gelu) / n_gelu < 0.05, (n_swiglu, n_gelu)
    assert ex4.swiglu_hidden(128) == 336 and ex4.swiglu_hidden(384) == 1024
    x = torch.randn(4, 128)
    up, gate, down = swiglu.c_fc.weight, swiglu.c_gate.weight, swiglu.c_proj.weight
    torch.testing.assert_close(swiglu(x), (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T)
    with torch.no_grad():  # the gate multiplies: closed (silu(0) = 0), nothing passes; an ungated SiLU MLP would
        swiglu.c_gate.weight.zero_()
    assert swiglu(x).abs().max() == 0


# ----------------------------------------------------------------------------------------------------------
# Rotary position embeddings


def test_rope_scores_depend_only_on_distance_and_norms_are_kept():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(16, generator=g, dtype=torch.float64), torch.randn(16, generator=g, dtype=torch.float64)
    rot = lambda x, p: ex4.rotate(x.view(1, 1, 1, 16), torch.tensor([p])).view(16)  # noqa: E731
    for m, n, shift in [(0, 0, 7), (5, 2, 100), (3, 9, 1000), (40, 1, 4000)]:
        score = rot(q, m) @ rot(k, n)
        torch.testing.assert_close(
            rot(q, m + shift) @ rot(k, n + shift), score, atol=1e-4, rtol=1e-4
        )  # angles are float32
        assert not torch.allclose(rot(q, m) @ rot(k, n + 1), score, atol=1e-3)  # but the distance itself matters
    x = torch.randn(2, 3, 50, 16, generator=g, dtype=torch.float64)
    torch.testing.assert_close(ex4.rotate(x, torch.arange(17, 67)).norm(dim=-1), x.norm(dim=-1))
    assert not torch.allclose(ex4.rotate(x, torch.arange(17, 67)), x)


def test_rope_replaces_the_position_table():
    assert model(pos="rope").wpe is None and model(pos="learned").wpe is not None
    assert not any("wpe" in name for name in model(pos="rope").state_dict())


# ----------------------------------------------------------------------------------------------------------
# Sliding window


def test_window_implementations_agree():
    """Blocked, masked-explicit and masked-flash windowed attention agree for random T, W, batch and heads."""
    g = torch.Generator().manual_seed(0)
    for trial in range(25):
        B, T, W = (int(torch.randint(lo, hi, (1,), generator=g)) for lo, hi in ((1, 4), (1, 90), (1, 40)))
        n_kv_head = (1, 2, 4)[trial % 3]
        q, k, v = qkv(B, 4, n_kv_head, T, 8, seed=trial)
        pos = torch.arange(T)
        ref = ex4.attention(q, k, v, ex4.window_mask(pos, pos, W), flash=False)
        for y in (
            ex4.attention(q, k, v, ex4.window_mask(pos, pos, W), flash=True),
            ex4.blocked_window_attention(q, k, v, W, flash=True),
            ex4.blocked_window_attention(q, k, v, W, flash=False),
            ex4.blocked_window_attention(q, k, v, W, block=max(1, W // 4)),  # blocks of fewer queries than W
            ex4.blocked_window_attention(q, k, v, W, block=7, flash=False),
        ):
            torch.testing.assert_close(y, ref, atol=2e-6, rtol=1e-5, msg=f"B={B} T={T} W={W} n_kv_head={n_kv_head}")
    # and the window is not full causal attention
    q, k, v = qkv(1, 4, 1, 40, 8, seed=0)
    assert not torch.allclose(ex4.blocked_window_attention(q, k, v, 8), ex4.attention(q, k, v))


@pytest.mark.parametrize("flash", [True, False])
@pytest.mark.parametrize("impl", ["mask", "blocked"])
def test_window_gradient_is_exactly_zero_beyond_the_window(flash, impl):
    """Output t depends on inputs t-W+1..t: the gradient from every other input is exactly zero."""
    W, T, t = 5, 37, 23
    attn = ex4.CausalSelfAttention(tiny(window=W, window_impl=impl, flash=flash, n_kv_head=2))
    x = torch.randn(2, T, 32, requires_grad=True)
    attn(x, torch.arange(x.size(1)).unsqueeze(0))[:, t].sum().backward()
    seen = x.grad.abs().sum(dim=(0, 2)) != 0
    assert seen.tolist() == [t - W < s <= t for s in range(T)]


@pytest.mark.parametrize(
    "kw",
    [dict(), dict(window=4), dict(window=4, window_impl="blocked", flash=False), dict(**OFF),
     dict(score="multiplicative"), dict(score="additive", pos="none", window=4, window_impl="blocked"),
     dict(pos="sinusoidal", mlp="quickgelu")],
)  # fmt: skip
def test_causality(kw):
    """Changing tokens after position t changes no logit at positions <= t."""
    assert_causal(model(**kw), V, T=32, t=20)


# ----------------------------------------------------------------------------------------------------------
# Generation with a key/value cache


CACHE_CASES = [
    dict(n_kv_head=4),  # MHA
    dict(n_kv_head=2),  # GQA
    dict(n_kv_head=1),  # MQA
    dict(n_kv_head=4, window=6),
    dict(n_kv_head=2, window=6),
    dict(n_kv_head=1, window=6),
    dict(n_kv_head=2, pos="learned"),  # learned positions
    dict(n_kv_head=1, pos="learned", window=6),
    dict(n_kv_head=2, score="multiplicative"),
    dict(n_kv_head=1, score="multiplicative", window=6),
    dict(n_kv_head=2, score="additive", pos="learned"),
    dict(n_kv_head=2, score="additive", pos="none", window=6),
    dict(n_kv_head=1, pos="sinusoidal"),
]


@pytest.mark.slow
@pytest.mark.parametrize("kw", CACHE_CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_cached_generation_equals_recomputing(kw):
    """Greedy tokens are the same with and without the cache; each step's logits agree within 1e-5. With RoPE and a
    window, generation runs past block_size (32) through the rolling buffer; otherwise the context is cropped."""
    m = model(**kw)
    prompt = torch.randint(V, (2, 7), generator=torch.Generator().manual_seed(1))
    n_new = 60  # past block_size (32)
    greedy = [m.generate(prompt, n_new, temperature=0, use_cache=c) for c in (True, False)]
    assert torch.equal(greedy[0], greedy[1])
    sampled = []
    for c in (True, False):
        torch.manual_seed(2)
        sampled.append(m.generate(prompt, n_new, temperature=1.0, use_cache=c))
    assert torch.equal(sampled[0], sampled[1]) and len(set(sampled[0][0].tolist())) > 10
    cached = sampled[0]

    # step by step, logits of cached steps against a full recomputation
    caches = [ex4.KVCache(kw.get("window") or 32) for _ in m.blocks]
    limit = n_new if m.max_len is None else 32 - 7
    with torch.no_grad():
        logits = m(cached[:, :7], caches=caches)[0][:, -1]
        for i in range(7, 7 + limit):
            full = m(cached[:, :i])[0][:, -1]
            torch.testing.assert_close(logits, full, atol=1e-5, rtol=0)
            logits = m(cached[:, i : i + 1], caches=caches)[0][:, -1]
    if kw.get("window"):
        assert caches[0].k.size(2) == kw["window"]  # the rolling buffer holds W positions, however long the text


@pytest.mark.parametrize("kw", [dict(n_kv_head=1), dict(n_kv_head=1, window=6)])
def test_one_token_prompt(kw):
    m = model(**kw)
    out = []
    for c in (True, False):
        torch.manual_seed(3)
        out.append(m.generate(torch.tensor([[5]]), 40, temperature=1.0, use_cache=c))
    assert torch.equal(out[0], out[1])


@pytest.mark.parametrize("flash", [True, False])
def test_one_query_without_a_mask_sees_every_key(flash):
    """mask=None is causal for Tq == Tk, but a single query (a cached step) sees every key, grouped heads too."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, heads, T, 8, generator=g) for heads, T in ((4, 1), (2, 5), (2, 5)))
    every = torch.ones(1, 5, dtype=torch.bool)
    torch.testing.assert_close(ex4.attention(q, k, v, None, flash), ex4.attention(q, k, v, every, flash))
    q = torch.randn(2, 4, 5, 8, generator=g)
    torch.testing.assert_close(ex4.attention(q, k, v, None, flash), ex4.attention(q, k, v, None, not flash))


def test_generate_unembeds_with_the_transposed_weight():
    """generate()'s (C, V) copy of the tied weight gives lm_head's logits, and the greedy tokens of forward()."""
    m = model(n_kv_head=1)
    idx = torch.randint(V, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        unembed = m.lm_head.weight.t().contiguous()
        torch.testing.assert_close(m(idx, unembed=unembed)[0], m(idx)[0])
        greedy = idx
        for _ in range(6):
            greedy = torch.cat([greedy, m(greedy)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(m.generate(idx, 6, temperature=0), greedy)


def test_unbounded_only_with_rope_and_window():
    assert model(window=6).max_len is None
    assert model(window=0).max_len == 32 and model(pos="learned", window=6).max_len == 32
    with pytest.raises(AssertionError):
        model(window=0)(torch.zeros(1, 33, dtype=torch.long))
    assert model(window=6)(torch.zeros(1, 100, dtype=torch.long))[0].shape == (1, 100, V)


# ----------------------------------------------------------------------------------------------------------
# Score functions: scaled dot product, multiplicative (x A x), additive (w.tanh(q + k))


@pytest.mark.parametrize("flash", [True, False])
@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_multiplicative_with_factored_matrix_is_scaled_dot(flash, n_kv_head):
    """With A = W_q^T W_k / sqrt(hs) for each head (W_k: its group's key head), multiplicative attention is the
    scaled dot product exactly: dot-product attention is multiplicative attention whose matrix has rank hs."""
    kw = dict(n_kv_head=n_kv_head, pos="learned", flash=flash)
    dot, mult = model(**kw).double(), model(**kw, score="multiplicative").double()
    C, hs, H = 32, 8, 4
    state = {k: v for k, v in dot.state_dict().items() if "c_attn" not in k}
    with torch.no_grad():
        for block, ref in zip(mult.blocks, dot.blocks):
            wq, wk, wv = ref.attn.c_attn.weight.split([C, n_kv_head * hs, n_kv_head * hs])
            wq, wk = wq.view(H, hs, C), wk.view(n_kv_head, hs, C).repeat_interleave(H // n_kv_head, dim=0)
            block.attn.A.copy_(wq.transpose(1, 2) @ wk / hs**0.5)
            block.attn.c_attn.weight.copy_(wv)
    mult.load_state_dict(state, strict=False)
    idx = torch.randint(V, (2, 32))
    torch.testing.assert_close(mult(idx)[0], dot(idx)[0], atol=1e-10, rtol=0)
    assert mult.blocks[0].attn.A.numel() == H * C * C  # against W_q and W_k's (C + n_kv_head hs) C
    with torch.no_grad():
        mult.blocks[0].attn.A.add_(torch.randn(H, C, C, dtype=torch.float64) * 1e-2)  # a full-rank A: another model
    assert not torch.allclose(mult(idx)[0], dot(idx)[0], atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("block", [1 << 22, 7 * 4 * 3])  # one block, and 7 queries a block
def test_additive_scores_equal_a_plain_loop(block, monkeypatch):
    """s(t, j) = w_h . tanh(q_t + k_j) for every head h, query t and key j, and the attention through it, against
    loops over them; the blocks of queries (and the checkpoint in the backward pass) change nothing."""
    monkeypatch.setattr(ex4, "ADDITIVE_BLOCK", block)
    H, n_kv_head, T, hs = 4, 2, 19, 3
    q, k, v = (t.double().requires_grad_() for t in qkv(2, H, n_kv_head, T, hs, seed=0))
    w = torch.randn(H, hs, dtype=torch.float64, requires_grad=True)
    y = ex4.attention(q, k, v, flash=True, score_vector=w)  # additive is always written out
    ref = torch.zeros_like(y)
    for b in range(2):
        for h in range(H):
            g = h // (H // n_kv_head)
            s = torch.stack([torch.stack([w[h] @ torch.tanh(q[b, h, t] + k[b, g, j]) for j in range(T)])
                             for t in range(T)])  # fmt: skip
            s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
            ref[b, h] = F.softmax(s, dim=-1) @ v[b, g]
    torch.testing.assert_close(y, ref, atol=1e-12, rtol=0)
    grads = torch.autograd.grad(y.square().sum(), (q, k, v, w))
    for a, b in zip(grads, torch.autograd.grad(ref.square().sum(), (q, k, v, w))):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


@pytest.mark.parametrize("score", ["scaled_dot", "multiplicative", "additive"])
def test_every_score_works_with_the_window_both_ways(score):
    """The blocked window (time T*W) and the band mask give the same logits for every score function."""
    kw = dict(score=score, pos="none" if score == "additive" else "rope", n_kv_head=2, window=5)
    idx = torch.randint(V, (2, 32))
    masked, blocked = (model(**kw, window_impl=impl)(idx)[0] for impl in ("mask", "blocked"))
    torch.testing.assert_close(blocked, masked, atol=1e-5, rtol=0)


def raw_scores(attn, x):
    """A module's scores before the mask, (B, n_head, T, T), for MHA modules."""
    pos = torch.arange(x.size(1)).unsqueeze(0)
    q, k, _ = attn.qkv(x, pos)
    k = k.expand(-1, q.size(1), -1, -1)
    if attn.score == "additive":
        return ex4.scores(q, k, w=attn.score_vector.unsqueeze(1))
    return ex4.scores(q, k, 1.0 if attn.score == "multiplicative" else None)


@pytest.mark.parametrize(
    "score,pos",
    [("scaled_dot", "none"), ("scaled_dot", "rope"), ("multiplicative", "learned"), ("additive", "learned")],
)
def test_scores_are_symmetric_when_query_and_key_maps_agree(score, pos):
    """s(t, j) = s(j, t) for every input when W_q^T W_k is symmetric: W_q = W_k (dot, additive) or A = A^T
    (multiplicative), with rotary positions too (R(j - t) transposed is R(t - j)). The attention weights are still not
    symmetric: the causal mask zeroes one triangle, and softmax normalises rows, not columns."""
    attn = ex4.CausalSelfAttention(tiny(score=score, pos=pos, n_kv_head=4)).double()
    x = torch.randn(2, 12, 32, dtype=torch.float64)
    assert not torch.allclose(raw_scores(attn, x), raw_scores(attn, x).transpose(-2, -1), atol=1e-6)
    with torch.no_grad():
        if score == "multiplicative":
            attn.A.copy_(attn.A + attn.A.transpose(1, 2))
        else:
            attn.c_attn.weight[32:64].copy_(attn.c_attn.weight[:32])  # W_k = W_q
    s = raw_scores(attn, x)
    torch.testing.assert_close(s, s.transpose(-2, -1), atol=1e-12, rtol=0)
    causal = torch.ones(12, 12, dtype=torch.bool).tril()
    for weights in (F.softmax(s.masked_fill(~causal, float("-inf")), dim=-1), F.softmax(s, dim=-1)):
        assert not torch.allclose(weights, weights.transpose(-2, -1), atol=1e-3)


# ----------------------------------------------------------------------------------------------------------
# Positions: sinusoidal and none; QuickGELU


def test_sinusoidal_is_the_papers_formula():
    pe = ex4.sinusoidal(torch.arange(60), 32)
    for p in (0, 1, 7, 59):
        for i in (0, 1, 5, 15):
            assert pe[p, 2 * i].item() == pytest.approx(math.sin(p / 10000 ** (2 * i / 32)), abs=1e-5)
            assert pe[p, 2 * i + 1].item() == pytest.approx(math.cos(p / 10000 ** (2 * i / 32)), abs=1e-5)
    assert model(pos="sinusoidal").wpe is None  # a fixed table: nothing to learn


@pytest.mark.parametrize("pos", ["none", "learned", "sinusoidal", "rope"])
def test_without_positions_only_causality_orders_the_tokens(pos):
    """With --pos none, one layer's output at t is a function of the set of tokens up to t: shuffling the tokens before
    t leaves it unchanged. With two layers it changes, only through causality: the earlier positions' states, which
    t attends to, each saw another prefix. Every position scheme changes it with one layer already."""
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(V, (1, 20), generator=g)
    shuffled = idx.clone()
    shuffled[0, :15] = idx[0, torch.randperm(15, generator=g)]
    for n_layer in (1, 2):
        m = model(pos=pos, n_layer=n_layer)
        same = torch.allclose(m(idx)[0][0, 15], m(shuffled)[0][0, 15], atol=1e-5)
        assert same == (pos == "none" and n_layer == 1), (pos, n_layer)


def test_quickgelu_is_its_formula_and_close_to_gelu():
    x = torch.linspace(-8, 8, 100001, dtype=torch.float64)
    torch.testing.assert_close(ex4.quick_gelu(x), x * torch.sigmoid(1.702 * x))
    gap = (ex4.quick_gelu(x) - F.gelu(x)).abs().max().item()
    assert 0.015 < gap < 0.025, gap  # within 0.02 of GELU, but not GELU
    mlp = ex4.MLP(tiny(mlp="quickgelu"))
    h = torch.randn(3, 32)
    torch.testing.assert_close(mlp(h), mlp.c_proj(ex4.quick_gelu(mlp.c_fc(h))))


# ----------------------------------------------------------------------------------------------------------
# Padding: prompts of different lengths in one batch


PAD_CASES = [
    dict(pos="learned"),
    dict(pos="sinusoidal", n_kv_head=2),
    dict(pos="rope"),
    dict(pos="rope", window=5, window_impl="mask"),
    dict(pos="rope", window=5, window_impl="blocked"),
    dict(pos="learned", window=5, window_impl="blocked"),
    dict(pos="none", window=5),
    dict(score="multiplicative", pos="rope"),
    dict(score="additive", pos="sinusoidal", window=5, window_impl="blocked"),
]


@pytest.mark.slow
@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("kw", PAD_CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_a_padded_batch_gives_what_each_prompt_alone_gives(kw, use_cache):
    """Left-padded prompts of 3, 9 and 14 tokens: every row's greedy tokens equal those of its prompt alone (past
    block_size, 32), and its logits agree within 1e-5, for the prompt and for each cached step."""
    m = model(**kw)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(V, (n,), generator=g) for n in (3, 14, 9)]
    pad = torch.tensor([14 - len(p) for p in prompts])
    idx = torch.stack([F.pad(p, (14 - len(p), 0)) for p in prompts])
    out = m.generate(idx, 30, temperature=0, use_cache=use_cache, pad=pad)
    for row, p, n in zip(out, prompts, pad):
        alone = m.generate(p.unsqueeze(0), 30, temperature=0, use_cache=use_cache)[0]
        assert torch.equal(row[n:], alone)
    if not use_cache:
        return
    new_caches = lambda: [ex4.KVCache(kw.get("window") or 32) for _ in m.blocks]  # noqa: E731
    caches, first = new_caches(), new_caches()  # the batch's, and the shortest prompt's alone
    with torch.no_grad():
        batch, cached = m(out[:, :14], pad=pad)[0], m(out[:, :14], caches=caches, pad=pad)[0]  # all positions; the last
        for i, (p, n) in enumerate(zip(prompts, pad)):
            torch.testing.assert_close(batch[i, n:], m(out[i : i + 1, n:14])[0][0], atol=1e-5, rtol=0)
            torch.testing.assert_close(cached[i], m(out[i : i + 1, n:14], caches=first if i == 0 else None)[0][0, -1:])
        for t in range(14, 14 + 10):  # cached steps: the shortest prompt's row against it alone
            step = m(out[:, t : t + 1], caches=caches, pad=pad)[0]
            torch.testing.assert_close(step[0], m(out[:1, t : t + 1], caches=first)[0][0], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------------------
# Through main


SMALL = [
    "--device",
    "cpu",
    "--n_layer",
    "2",
    "--n_head",
    "4",
    "--n_embd",
    "32",
    "--block_size",
    "32",
    "--batch_size",
    "4",
    "--eval_interval",
    "5",
    "--eval_iters",
    "2",
    "--log_interval",
    "5",
]


def test_smoke_every_switch_on(text_file, tmp_path, capsys):
    out, straight = str(tmp_path / "out"), str(tmp_path / "straight")
    on = "--n_kv_head 2 --mlp swiglu --pos rope --window 8 --window_impl auto --kv_cache --dropout 0.1".split()
    ex4.main([*SMALL, *on, "--data", text_file, "--out_dir", out, "--max_iters", "10", "--max_new_tokens", "40"])
    printed = capsys.readouterr().out
    assert os.path.isfile(os.path.join(out, "best.pt")) and os.path.isfile(os.path.join(out, "log.csv"))
    sample = printed.split("--- sample 1 ---\n")[1]
    assert len(sample) > 40
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ckpt["iter_num"] == 10 and ckpt["config"]["n_kv_head"] == 2 and ckpt["config"]["window"] == 8

    # --resume takes the architecture switches and --data from ckpt.pt; a different value typed is an error
    resume = [*SMALL, "--out_dir", out, "--max_iters", "15", "--resume"]
    assert "--window 4 differs" in user_error(capsys, ex4.main, resume + ["--window", "4"])
    assert "--data" in user_error(capsys, ex4.main, resume + ["--data", text_file + "x"])
    ex4.main([*SMALL, "--dropout", "0.1", "--out_dir", out, "--max_iters", "15", "--resume", "--max_new_tokens", "5"])
    printed = capsys.readouterr().out
    assert "resuming from iter 10" in printed and "iter 15 |" in printed
    assert (
        torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["config"]["window"] == 8
    )  # the architecture came from the checkpoint
    ex4.main([*SMALL, *on, "--data", text_file, "--out_dir", straight, "--max_iters", "15", "--max_new_tokens", "5"])
    assert losses(out) == losses(straight)  # resumed at 10, the same losses as the uninterrupted run, dropout and all

    # without --resume, the checkpoint is never replaced, unless --overwrite
    assert "--overwrite" in user_error(capsys, ex4.main, [*SMALL, "--data", text_file, "--out_dir", out])
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["iter_num"] == 15

    # sampling from the checkpoint runs past block_size (RoPE and a window), and the cache does not change the text
    texts = []
    for cache in ("--kv_cache", "--no-kv_cache"):
        ex4.main(["--device", "cpu", "--out_dir", out, "--prompt", "All:", "--max_new_tokens", "80",
                  "--temperature", "0", cache])  # fmt: skip
        texts.append(capsys.readouterr().out)
    assert (
        texts[0] == texts[1] and texts[0].startswith("--- sample 1 ---\nAll:") and len(texts[0].split("\n", 1)[1]) > 80
    )

    # several prompts, from --prompt and --prompt_file, in one left-padded batch: each is what it gives alone
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("First Citizen:\n\nYou\n", encoding="utf-8")
    greedy = ["--device", "cpu", "--out_dir", out, "--max_new_tokens", "40", "--temperature", "0"]
    ex4.main([*greedy, "--prompt", "All:", "--prompt_file", str(prompts)])
    batch = capsys.readouterr().out.split("--- sample ")[1:]
    assert len(batch) == 3
    for i, prompt in enumerate(["All:", "First Citizen:", "You"]):
        ex4.main([*greedy, "--prompt", prompt])
        assert batch[i].split("\n", 1)[1] == capsys.readouterr().out.split("\n", 1)[1]
    assert "no such file" in user_error(capsys, ex4.main, [*greedy, "--prompt_file", str(tmp_path / "none.txt")])


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags, words",
    [
        (["--n_head", "4", "--n_kv_head", "3"], "--n_kv_head"),
        (["--n_kv_head", "0"], "--n_kv_head"),
        (["--window", "-1"], "--window"),
        (["--mlp", "relu"], "--mlp"),
        (["--window_impl", "fast"], "--window_impl"),
        (["--n_embd", "36", "--n_head", "4", "--n_kv_head", "1"], "--pos rope"),  # head size 9: no pairs to rotate
        (["--score", "additive"], "--score additive"),  # with the default rotary positions
        (["--score", "cosine"], "--score"),
        (["--pos", "alibi"], "--pos"),
        (["--pos", "sinusoidal", "--n_embd", "33", "--n_head", "3", "--n_kv_head", "3"], "--pos sinusoidal"),
    ],
)
def test_user_errors(flags, words, text_file, tmp_path, capsys):
    line = user_error(capsys, ex4.main, [*SMALL, *flags, "--data", text_file, "--out_dir", str(tmp_path)])
    assert words in line
