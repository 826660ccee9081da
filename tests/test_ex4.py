"""ex4_mqa_swiglu.py: grouped-query attention, SwiGLU, RoPE, sliding windows and the KV cache do what they claim."""

import os
from dataclasses import fields

import pytest
import torch

import ex1_gpt as ex1
import ex4_mqa_swiglu as ex4
from conftest import assert_causal, losses, user_error

V = 65  # vocabulary size of the test models
OFF = dict(n_kv_head=4, mlp="gelu", rope=False, window=0)  # every switch off: ex1's architecture


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
    cfg = tiny(n_kv_head=n_kv_head, rope=False, flash=flash)
    torch.manual_seed(0)
    gqa = ex4.CausalSelfAttention(cfg)
    mha = ex1.CausalSelfAttention(ex1.Config(n_head=4, n_embd=32, block_size=32, flash=flash))
    C, hs, group = 32, 8, 4 // n_kv_head
    wq, wk, wv = gqa.c_attn.weight.detach().split([C, n_kv_head * hs, n_kv_head * hs])
    repeat = lambda w: w.view(n_kv_head, hs, C).repeat_interleave(group, dim=0).reshape(C, C)  # noqa: E731
    with torch.no_grad():
        mha.c_attn.weight.copy_(torch.cat([wq, repeat(wk), repeat(wv)]))
        mha.c_proj.weight.copy_(gqa.c_proj.weight)
    x = torch.randn(3, 20, C)
    torch.testing.assert_close(gqa(x), mha(x), atol=1e-6, rtol=1e-5)
    if n_kv_head == 2:  # groups are consecutive query heads: alternating them (0, 1, 0, 1) is another model
        with torch.no_grad():
            mha.c_attn.weight.copy_(torch.cat([wq, wk.repeat(group, 1), wv.repeat(group, 1)]))
        assert not torch.allclose(gqa(x), mha(x), atol=1e-4)


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
    rot = lambda x, p: ex4.rotate(x.view(1, 1, 1, 16), p).view(16)  # noqa: E731
    for m, n, shift in [(0, 0, 7), (5, 2, 100), (3, 9, 1000), (40, 1, 4000)]:
        score = rot(q, m) @ rot(k, n)
        torch.testing.assert_close(
            rot(q, m + shift) @ rot(k, n + shift), score, atol=1e-4, rtol=1e-4
        )  # angles are float32
        assert not torch.allclose(rot(q, m) @ rot(k, n + 1), score, atol=1e-3)  # but the distance itself matters
    x = torch.randn(2, 3, 50, 16, generator=g, dtype=torch.float64)
    torch.testing.assert_close(ex4.rotate(x, 17).norm(dim=-1), x.norm(dim=-1))
    assert not torch.allclose(ex4.rotate(x, 17), x)


def test_rope_replaces_the_position_table():
    assert model(rope=True).wpe is None and model(rope=False).wpe is not None
    assert not any("wpe" in name for name in model(rope=True).state_dict())


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
    attn(x)[:, t].sum().backward()
    seen = x.grad.abs().sum(dim=(0, 2)) != 0
    assert seen.tolist() == [t - W < s <= t for s in range(T)]


@pytest.mark.parametrize(
    "kw", [dict(), dict(window=4), dict(window=4, window_impl="blocked", flash=False), dict(**OFF)]
)
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
    dict(n_kv_head=2, rope=False),  # learned positions
    dict(n_kv_head=1, rope=False, window=6),
]


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


def test_unbounded_only_with_rope_and_window():
    assert model(window=6).max_len is None
    assert model(window=0).max_len == 32 and model(rope=False, window=6).max_len == 32
    with pytest.raises(AssertionError):
        model(window=0)(torch.zeros(1, 33, dtype=torch.long))
    assert model(window=6)(torch.zeros(1, 100, dtype=torch.long))[0].shape == (1, 100, V)


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
    on = "--n_kv_head 2 --mlp swiglu --rope --window 8 --window_impl auto --kv_cache --dropout 0.1".split()  # fmt: skip
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
        ex4.main(
            [
                "--device",
                "cpu",
                "--out_dir",
                out,
                "--prompt",
                "All:",
                "--max_new_tokens",
                "80",
                "--temperature",
                "0",
                cache,
            ]
        )
        texts.append(capsys.readouterr().out)
    assert (
        texts[0] == texts[1] and texts[0].startswith("--- sample 1 ---\nAll:") and len(texts[0].split("\n", 1)[1]) > 80
    )


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--n_head", "4", "--n_kv_head", "3"], "--n_kv_head"),
        (["--n_kv_head", "0"], "--n_kv_head"),
        (["--window", "-1"], "--window"),
        (["--mlp", "relu"], "--mlp"),
        (["--window_impl", "fast"], "--window_impl"),
        (["--n_embd", "36", "--n_head", "4", "--n_kv_head", "1"], "--rope"),  # head size 9 cannot be rotated in pairs
    ],
)
def test_user_errors(flags, words, text_file, tmp_path, capsys):
    line = user_error(capsys, ex4.main, [*SMALL, *flags, "--data", text_file, "--out_dir", str(tmp_path)])
    assert words in line


def test_every_numeric_flag_rejects_minus_one(text_file, tmp_path, capsys):
    short = [*SMALL, "--data", text_file, "--max_iters", "0", "--max_new_tokens", "1", "--out_dir", str(tmp_path)]
    for f in fields(ex4.Config):
        if f.type in (int, float):
            assert f"--{f.name}" in user_error(capsys, ex4.main, short + [f"--{f.name}", "-1"])
