"""gan_text.py: the code it shares is its parents' (attention, KVCache's, the load-balancing loss, expert use), cached
sampling equals the full forward and an uncached loop, the REINFORCE step follows the sign of the advantage, rewards
are detached, rollouts match generate from each prefix alone, the discriminator separates a toy set, BLEU and
self-BLEU, and runs through main with every phase, checkpoint, exact resume, --prompt and --init_from scratch|PATH;
--oracle: the oracle is fixed by its seed, scores its own samples above uniform ones, and the GAN's rewards line up with
its sequences; a run through main logs NLL-oracle in every phase."""

import inspect
import math
import os
import signal
from operator import attrgetter

import pytest
import torch
import torch.nn as nn

import ex4_mqa_swiglu as ex4
import gan_text as gan
import switchhead_moe as sh
from conftest import assert_causal, read_log, user_error

TINY = ["--device", "cpu", "--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "16", "--seq_len", "12",
        "--batch_size", "4", "--eval_iters", "2", "--log_interval", "1", "--warmup_iters", "1",
        "--learning_rate", "1e-2", "--d_embd", "8", "--d_hidden", "16", "--gan_batch_size", "4", "--eval_samples", "6",
        "--max_new_tokens", "20"]  # fmt: skip


def tiny(seed=0, **overrides):
    """A tiny generator and discriminator over a vocabulary of 11."""
    cfg = gan.Config(
        **{
            "n_layer": 2,
            "n_head": 2,
            "n_embd": 32,
            "head_size": 8,
            "block_size": 16,
            "d_embd": 8,
            "d_hidden": 16,
            **overrides,
        }
    )
    torch.manual_seed(seed)
    return cfg, gan.GPT(cfg, 11), gan.Discriminator(cfg, 11)


class ConstantD(nn.Module):
    """A discriminator that calls everything real with probability p."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, idx):
        return torch.full((idx.size(0),), self.p)


def params(module):
    return [p.detach().clone() for p in module.parameters()]


def same(module, before):
    return all(torch.equal(a, b) for a, b in zip(params(module), before))


# ----------------------------------------------------------------------------------------------------------
# One name per idea: the parents' code, word for word


@pytest.mark.parametrize("name,parent", [("attention", sh), ("load_balancing_loss", sh), ("expert_usage", sh),
                                         ("expert_matmul", sh), ("KVCache.__init__", ex4), ("KVCache.update", ex4),
                                         ("angles", ex4), ("rotate", ex4), ("rope_channels", sh), ("rotate_first", sh),
                                         ("renorm_rows", sh), ("dead_experts", sh), ("reset_usage", sh)])  # fmt: skip
def test_shared_code_is_the_parents(name, parent):
    """KVCache's methods: its docstring says what gan_text's cache holds, and ex4's nbytes is not needed here."""
    assert inspect.getsource(attrgetter(name)(gan)) == inspect.getsource(attrgetter(name)(parent))


# ----------------------------------------------------------------------------------------------------------
# The generator: cached sampling, REINFORCE


CACHED = [(4, True, "rope"), (4, False, "rope"), (1, True, "rope"), (1, False, "rope"), (4, True, "learned"),
          (1, True, "learned")]  # fmt: skip


@pytest.mark.parametrize("n_experts,flash,pos", CACHED)
def test_cached_steps_equal_the_full_forward(n_experts, flash, pos):
    cfg, model, _ = tiny(n_experts=n_experts, flash=flash, head_size=8 if n_experts > 1 else 16, pos=pos)
    model.eval()
    idx = torch.randint(11, (3, 10))
    full, _ = model(idx)
    caches = [gan.KVCache(cfg.block_size) for _ in model.blocks]
    steps = [model(idx[:, :4], caches=caches)[0]]  # a prompt
    steps += [model(idx[:, t : t + 1], caches=caches)[0] for t in range(4, 10)]  # then one token at a time
    assert caches[0].pos == 10
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)
    assert_causal(model, 11)  # and the uncached model is still causal


def uncached_greedy(model, idx, n):
    """The parent's generate at temperature 0: the whole context (at most block_size tokens) every step."""
    for _ in range(n):
        logits, _ = model(idx[:, -model.cfg.block_size :])
        idx = torch.cat((idx, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    return idx


@pytest.mark.parametrize("n_experts", [4, 1])
def test_cached_generate_equals_the_uncached_loop(n_experts):
    """Within block_size and past it, where the cache is full and the context is re-read from a later token."""
    _, model, _ = tiny(n_experts=n_experts, head_size=8 if n_experts > 1 else 16)
    model.eval()
    idx = torch.randint(11, (3, 5))
    out = model.generate(idx, 20, temperature=0)  # 25 tokens, block_size 16
    assert out.shape == (3, 25) and torch.equal(out[:, :5], idx)
    assert torch.equal(out, uncached_greedy(model, idx, 20))
    # given: each row keeps its own prefix of idx and samples the rest, as if generated from that prefix alone
    seqs = torch.randint(11, (3, 12))
    given = torch.tensor([1, 4, 12])
    out = model.generate(seqs, 0, temperature=0, given=given)
    for row, g in enumerate(given.tolist()):
        assert torch.equal(out[row], uncached_greedy(model, seqs[row : row + 1, :g], 12 - g)[0])


@pytest.mark.parametrize("reward,direction", [(0.9, 1), (0.1, -1)])
def test_reinforce_step_follows_the_advantage(reward, direction):
    cfg, model, _ = tiny(rollouts=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    real = torch.randint(11, (1, 12))
    torch.manual_seed(1)
    fake = gan.complete(model, real, 1)  # the sample the step below draws (same seed, same draws)
    before = gan.token_logprobs(model, fake).sum().item()
    torch.manual_seed(1)
    baseline, r = gan.generator_step(model, ConstantD(reward), optimizer, real, cfg, baseline=0.5)
    after = gan.token_logprobs(model, fake).sum().item()
    assert r == pytest.approx(reward) and baseline == pytest.approx(0.9 * 0.5 + 0.1 * reward)
    assert direction * (after - before) > 1e-4  # above the baseline: likelier; below it: less likely


def test_per_token_rewards_weight_their_own_tokens():
    _, model, _ = tiny()
    seqs = torch.randint(11, (2, 8))
    logp = gan.token_logprobs(model, seqs)
    rewards = torch.rand(2, 7)
    loss = gan.reinforce_loss(logp, rewards, 0.3)
    assert loss.item() == pytest.approx(-((rewards - 0.3) * logp).sum(1).mean().item(), rel=1e-6)
    # one reward per sequence is the same as that reward at every token
    assert gan.reinforce_loss(logp, rewards[:, 0], 0.3).item() == pytest.approx(
        gan.reinforce_loss(logp, rewards[:, :1].expand(2, 7), 0.3).item(), rel=1e-6
    )


def test_rewards_are_detached():
    cfg, model, disc = tiny(rollouts=0)
    g_opt, d_opt = model.configure_optimizer(cfg, "cpu"), disc.configure_optimizer(cfg)
    real = torch.randint(11, (4, 12))
    d_before, g_before = params(disc), params(model)
    gan.generator_step(model, disc, g_opt, real, cfg, baseline=None)
    assert not same(model, g_before)  # the check can see a change
    assert same(disc, d_before) and all(p.grad is None for p in disc.parameters())  # no gradient reached D
    g_before = params(model)
    gan.discriminator_step(model, disc, d_opt, real, cfg)
    assert not same(disc, d_before)
    assert same(model, g_before) and all(p.grad is None for p in model.parameters())


# ----------------------------------------------------------------------------------------------------------
# Rollouts


def test_completion_keeps_the_given_prefix():
    _, model, _ = tiny()
    seqs = torch.randint(11, (5, 12))
    given = torch.tensor([1, 2, 5, 11, 12])
    out = gan.complete(model, seqs, given)
    for row, g in enumerate(given.tolist()):
        assert torch.equal(out[row, :g], seqs[row, :g])
    assert not torch.equal(out[:3], seqs[:3])  # the rest is sampled
    assert model.training  # left in the mode it was in


def test_rollout_rewards_shape_permutation_and_last_reward():
    _, model, disc = tiny()
    B, T = 5, 10
    seqs = torch.randint(11, (B, T))
    rewards = gan.rollout_rewards(model, disc, seqs, n_rollouts=1, temperature=0)  # greedy completions: deterministic
    assert rewards.shape == (B, T - 1)
    assert torch.allclose(rewards[:, -1], disc(seqs))
    perm = torch.tensor([3, 0, 4, 1, 2])
    assert torch.allclose(gan.rollout_rewards(model, disc, seqs[perm], 1, temperature=0), rewards[perm], atol=1e-6)
    # each reward is D of the greedy generate from that prefix alone
    model.eval()
    for t in (1, 4, T - 2):
        done = model.generate(seqs[:, : t + 1], T - t - 1, temperature=0)
        assert torch.allclose(rewards[:, t - 1], disc(done), atol=1e-6)
    # sampled rollouts: rewards are probabilities, averaged over the rollouts
    torch.manual_seed(0)
    sampled = gan.rollout_rewards(model, disc, seqs, n_rollouts=3)
    assert sampled.shape == (B, T - 1) and ((sampled > 0) & (sampled < 1)).all()


# ----------------------------------------------------------------------------------------------------------
# The discriminator


def test_discriminator_separates_a_toy_set():
    cfg, _, disc = tiny(d_learning_rate=1e-2)
    opt = disc.configure_optimizer(cfg)
    gen = torch.Generator().manual_seed(0)
    toy = lambda n, low: torch.randint(low, low + 5, (n, 12), generator=gen)  # noqa: E731  real: tokens 0-4, fake: 5-9
    losses = []
    for _ in range(40):
        loss = gan.discriminator_loss(disc, toy(16, 0), toy(16, 5))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    real, fake = disc(toy(200, 0)), disc(toy(200, 5))
    accuracy = ((real > 0.5).float().mean() + (fake < 0.5).float().mean()) / 2
    assert accuracy > 0.98 and losses[-1] < 0.2 * losses[0]
    probs = torch.cat([real, fake])
    assert ((probs > 0) & (probs < 1)).all()
    # L_D is the formula of the issue
    real, fake = toy(8, 0), toy(8, 5)
    expected = -(torch.log(disc(real)) + torch.log(1 - disc(fake))).mean()
    assert gan.discriminator_loss(disc, real, fake).item() == pytest.approx(expected.item(), rel=1e-4)


# ----------------------------------------------------------------------------------------------------------
# BLEU


def test_bleu_of_a_corpus_against_itself_and_self_bleu_of_copies_is_one():
    lines = [
        "First Citizen: Before we proceed any further, hear me speak.",
        "All: Speak, speak.",
        "You are all resolved rather to die than to famish?",
        "Resolved. resolved.",
    ]
    corpus = [gan.words(t) for t in lines]
    for n in (2, 3, 4):
        assert gan.bleu(corpus, corpus, n) == pytest.approx(1.0)
        assert gan.self_bleu([corpus[0]] * 5, n) == pytest.approx(1.0)
        assert gan.self_bleu(corpus, n) < 0.5  # different sentences: diverse


def test_bleu_by_hand():
    hyp, ref = "the cat sat on the mat".split(), "the cat is on the mat".split()
    # unigrams 5/6 (both "the" match), bigrams 3/5 (the cat, on the, the mat), same length: no brevity penalty
    assert gan.bleu([hyp], [ref], 2) == pytest.approx(math.sqrt(5 / 6 * 3 / 5))
    # trigrams 1/4 (on the mat), no 4-gram: smoothed to 0.1 / 3
    assert gan.bleu([hyp], [ref], 4) == pytest.approx((5 / 6 * 3 / 5 * 1 / 4 * 0.1 / 3) ** 0.25)
    # brevity penalty: a 3-word hypothesis against the closest reference, 6 words
    assert gan.bleu([["the", "cat", "is"]], [ref, ["x"] * 9], 2) == pytest.approx(math.exp(1 - 6 / 3))
    # self-BLEU leaves each sample out of its own references: here each is scored against the other only
    a, b = "the cat sat on the mat".split(), "the dog sat on a mat".split()
    assert gan.self_bleu([a, b], 2) == pytest.approx((gan.bleu([a], [b], 2) + gan.bleu([b], [a], 2)) / 2)
    assert gan.self_bleu([a, a, b], 2) == pytest.approx((1 + 1 + gan.bleu([b], [a], 2)) / 3)


# ----------------------------------------------------------------------------------------------------------
# The oracle (SeqGAN's synthetic data)


def oracle_cfg(**overrides):
    return gan.Config(**{"oracle": True, "oracle_vocab": 30, "oracle_embd": 8, "oracle_train": 40, "seq_len": 8,
                         "block_size": 8, **overrides})  # fmt: skip


def test_the_oracle_is_fixed_by_its_seed():
    cfg, cfg_b = oracle_cfg(), oracle_cfg(seed=7)  # neither --seed nor the global random state changes the oracle
    torch.manual_seed(1)
    a = gan.Oracle(cfg)
    data_a = gan.OracleData(a, cfg, torch.device("cpu"))
    torch.manual_seed(2)
    b = gan.Oracle(cfg_b)
    data_b = gan.OracleData(b, cfg_b, torch.device("cpu"))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert data_a.splits["train"].shape == (40, 9) and data_a.splits["val"].shape == (4, 9)
    assert all(torch.equal(data_a.splits[k], data_b.splits[k]) for k in ("train", "val"))
    assert (data_a.splits["train"][:, 0] == 0).all() and data_a.splits["train"][:, 1:].unique().numel() > 5
    other_cfg = oracle_cfg(oracle_seed=1)
    other = gan.Oracle(other_cfg)
    assert not torch.equal(other.head.weight, a.head.weight)
    assert not torch.equal(
        gan.OracleData(other, other_cfg, torch.device("cpu")).splits["train"], data_a.splits["train"]
    )
    # N(0, 1) parameters, but one bias per gate, as SeqGAN's cell
    drawn = torch.cat([p.flatten() for name, p in a.named_parameters() if name != "lstm.bias_hh_l0"])
    assert abs(drawn.mean().item()) < 0.1 and abs(drawn.std().item() - 1) < 0.1 and not a.lstm.bias_hh_l0.any()


def test_nll_oracle_ranks_the_oracle_above_uniform_tokens():
    """The oracle's own samples score its entropy, below log V; uniform tokens score a cross-entropy above log V."""
    cfg = oracle_cfg()
    oracle = gan.Oracle(cfg)
    own = oracle.sample(2000, 8, torch.Generator().manual_seed(0))
    uniform = torch.cat((torch.zeros(2000, 1, dtype=torch.long), torch.randint(30, (2000, 8))), dim=1)
    assert oracle.nll(own) < math.log(30) - 0.3 and oracle.nll(uniform) > math.log(30) + 0.3
    # nll is the distribution sample draws from: the step-by-step probabilities of one sequence, by hand
    seq, state, logp = own[:1], None, 0.0
    for t in range(8):
        h, state = oracle.lstm(oracle.wte(seq[:, t : t + 1]), state)
        logp += torch.log_softmax(oracle.head(h[0, -1]), -1)[seq[0, t + 1]].item()
    assert oracle.nll(seq) == pytest.approx(-logp / 8, rel=1e-5)
    # and sample draws from it: the first tokens' frequencies against the oracle's first distribution
    first = torch.softmax(oracle(own[:1, :1])[0, 0], -1)
    counts = torch.bincount(own[:, 1], minlength=30) / 2000
    assert (counts - first).abs().sum() / 2 < 0.06 and counts[first.argmax()] > 0.5 * first.max()
    assert oracle.nll(own, chunk=7) == pytest.approx(oracle.nll(own), rel=1e-5)  # chunks change nothing


@pytest.mark.parametrize("rollouts", [0, 2])
def test_rewards_line_up_with_oracle_sequences(rollouts):
    """A fake keeps the start token and samples seq_len tokens; one reward per sequence, or one per sampled token."""
    cfg = oracle_cfg(n_layer=1, n_head=2, n_embd=16, head_size=8, d_embd=8, d_hidden=16, rollouts=rollouts)
    data = gan.OracleData(gan.Oracle(cfg), cfg, torch.device("cpu"))
    torch.manual_seed(0)
    model, disc = gan.GPT(cfg, cfg.oracle_vocab), gan.Discriminator(cfg, cfg.oracle_vocab)
    real = data.get_text("train", 5, torch.Generator().manual_seed(0))
    fake = gan.complete(model, real, 1)
    assert fake.shape == real.shape == (5, 9) and (fake[:, 0] == 0).all() and not torch.equal(fake, real)
    logp = gan.token_logprobs(model, fake)
    rewards = gan.rollout_rewards(model, disc, fake, rollouts) if rollouts else disc(fake)
    assert logp.shape == (5, 8) and rewards.shape == ((5, 8) if rollouts else (5,))
    x, y = data.get_batch("train", torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (cfg.batch_size, 8) and torch.equal(x[:, 1:], y[:, :-1])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = params(model)
    gan.generator_step(model, disc, optimizer, real, cfg, baseline=0.0)
    assert not same(model, before)


ORACLE = ["--oracle", "--oracle_vocab", "30", "--oracle_embd", "8", "--oracle_train", "40", "--seq_len", "8",
          "--block_size", "8", "--max_iters", "4", "--eval_interval", "2", "--d_pretrain_iters", "2",
          "--adv_eval_interval", "2", "--max_new_tokens", "8"]  # fmt: skip


@pytest.mark.slow
def test_oracle_run_through_main(tmp_path, capsys):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    gan.main(TINY + ORACLE + ["--out_dir", full, "--adv_rounds", "4", "--rollouts", "1"])
    out = capsys.readouterr().out
    assert "oracle: LSTM of 8, vocabulary of 30, seed 0; 40 training and 4 held-out sequences" in out
    assert "iter 4 | train" in out and "| NLL-oracle" in out and "round 4 | NLL" in out and "BLEU" not in out
    rows = read_log(full)
    evals = [r for r in rows if r["val_loss"]]
    assert [(r["phase"], r["iter"]) for r in evals] == [("mle", "0"), ("mle", "2"), ("mle", "4"), ("d_pretrain", "0"),
                                                        ("d_pretrain", "2"), ("adversarial", "2"),
                                                        ("adversarial", "4")]  # fmt: skip
    assert all(float(r["nll_oracle"]) > 0 and not r["bleu4"] for r in evals)
    assert float(evals[0]["nll_oracle"]) != float(evals[2]["nll_oracle"])  # MLE changed the samples it scores
    assert evals[2]["nll_oracle"] == evals[3]["nll_oracle"]  # the same generator, the same draws
    ckpt = torch.load(os.path.join(full, "ckpt.pt"), weights_only=True)
    assert ckpt["tokenizer"] == "oracle" and len(ckpt["vocab"]) == 30 and ckpt["config"]["oracle"]
    # stopped after round 2 and resumed without the --oracle flags: they come back from the checkpoint
    gan.main(TINY + ORACLE + ["--out_dir", part, "--adv_rounds", "2", "--rollouts", "1"])
    gan.main(TINY + ORACLE[7:] + ["--out_dir", part, "--adv_rounds", "4", "--rollouts", "1", "--resume"])
    assert drop_time(read_log(part)) == drop_time(rows)
    # --prompt: token numbers separated by spaces
    capsys.readouterr()
    gan.main(["--out_dir", full, "--prompt", "0 5", "--max_new_tokens", "6", "--device", "cpu"])
    sample = capsys.readouterr().out.split("--- sample 1 ---\n")[1].split()
    assert sample[:2] == ["0", "5"] and len(sample) == 8 and all(0 <= int(t) < 30 for t in sample)
    assert "oracle's vocabulary" in user_error(capsys, gan.main, ["--out_dir", full, "--prompt", "0 30"])


# ----------------------------------------------------------------------------------------------------------
# Through main


def test_every_phase_checkpoint_resume_and_sample(tmp_path, text_file, capsys):
    common = TINY + ["--data", text_file, "--max_iters", "4", "--eval_interval", "2", "--d_pretrain_iters", "2",
                     "--adv_eval_interval", "2", "--rollouts", "1", "--mle_weight", "0.5", "--g_steps", "2",
                     "--d_steps", "2"]  # fmt: skip
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    gan.main(common + ["--out_dir", full, "--adv_rounds", "4"])
    out = capsys.readouterr().out
    assert (
        "samples of the MLE generator, before the adversarial rounds:" in out
        and "samples after the adversarial rounds:" in out
    )
    assert out.count("--- sample 1 ---") == 2 and "rewards per token, 1 rollouts per prefix" in out
    assert "d-pretrain 2 | NLL" in out and "round 4 | NLL" in out and "self-BLEU-4" in out and "reward" in out
    rows = read_log(full)
    assert {r["phase"] for r in rows} == {"mle", "d_pretrain", "adversarial"}
    evals = [r for r in rows if r["phase"] != "mle" and r["bleu2"]]
    assert [(r["phase"], r["iter"]) for r in evals] == [
        ("d_pretrain", "0"),
        ("d_pretrain", "2"),
        ("adversarial", "2"),
        ("adversarial", "4"),
    ]
    assert all(
        0 <= float(r[k]) <= 1 for r in evals for k in ("d_acc_real", "d_acc_fake", "bleu2", "bleu4", "self_bleu4")
    )
    ckpt = torch.load(os.path.join(full, "ckpt.pt"), weights_only=True)
    assert ckpt["phase"] == "adversarial" and ckpt["iter_num"] == 4
    assert ckpt["config"]["init_from"] == "scratch" and ckpt["tokenizer"] == "char"  # the default: MLE pre-training
    assert {"model", "optimizer", "discriminator", "baseline"} <= ckpt.keys()
    assert ckpt["optimizer"].keys() == {"generator", "discriminator"}  # both optimizers, as Run's one
    # best.pt: the latest generator (a GAN has no best model), no optimizers; both carry the MLE phase's best val
    best = torch.load(os.path.join(full, "best.pt"), weights_only=True)
    assert (best["phase"], best["iter_num"]) == ("adversarial", 4) and "optimizer" not in best
    assert all(torch.equal(best["model"][k], v) for k, v in ckpt["model"].items())
    mle_best = min(float(r["val_loss"]) for r in rows if r["phase"] == "mle" and r["val_loss"])
    assert ckpt["best_val_loss"] == best["best_val_loss"] == pytest.approx(mle_best, abs=1e-4)

    # stop after round 2, then resume to 4: the same log as the uninterrupted run, rollouts and all
    gan.main(common + ["--out_dir", part, "--adv_rounds", "2"])
    # the data and the architecture come from the checkpoint: --data may be left out, and a different value is an error
    line = user_error(capsys, gan.main, common + ["--out_dir", part, "--resume", "--d_hidden", "8"])
    assert "--d_hidden 8 differs from the checkpoint's 16" in line
    resume = [a for a in common if a not in ("--data", text_file)]
    gan.main(resume + ["--out_dir", part, "--adv_rounds", "4", "--resume", "--init_from", "scratch"])  # as it was
    assert resumed_in_the_rounds(capsys, 2)
    assert drop_time(read_log(part)) == drop_time(rows)

    # sampling from best.pt alone: the adversarially trained generator
    gan.main(["--out_dir", full, "--prompt", "All:", "--max_new_tokens", "30", "--num_samples", "2", "--device", "cpu"])
    out = capsys.readouterr().out
    assert out.count("--- sample") == 2 and "\nAll:" in out


def resumed_in_the_rounds(capsys, it):
    """The run that just ended resumed at round it: Run's line says the iteration, and D's pre-training is over."""
    out = capsys.readouterr().out
    return f"resuming from iter {it} " in out and "d-pretrain" not in out


def drop_time(rows):
    return [{k: v for k, v in r.items() if k != "ms_per_iter"} for r in rows]


def interrupt_on_call(monkeypatch, name, n):
    """Ctrl-C (a real SIGINT) during the n-th call of gan.<name> in the next run."""
    calls, fn = [0], getattr(gan, name)

    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGINT)
        return fn(*args, **kwargs)

    monkeypatch.setattr(gan, name, wrapped)


@pytest.mark.slow
def test_ctrl_c_in_every_phase_saves_there_and_resume_continues_exactly(tmp_path, text_file, capsys, monkeypatch):
    """Stopped between evaluations in each phase in turn, the run saves the step it reached; resumed each time, it
    ends with exactly the log of a run that was never stopped."""
    common = TINY + ["--data", text_file, "--max_iters", "4", "--eval_interval", "2", "--d_pretrain_iters", "2",
                     "--adv_rounds", "4", "--adv_eval_interval", "2", "--d_steps", "2", "--dropout", "0.1"]  # fmt: skip
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    gan.main(common + ["--out_dir", full])
    # interrupted in MLE iteration 2 (get_lr's 3rd call), D pre-training step 0 and round 0: each saves the next step
    stops = [("get_lr", 3, "mle", 3, []), ("discriminator_step", 1, "d_pretrain", 1, ["--resume"]),
             ("discriminator_step", 2, "adversarial", 1, ["--resume"])]  # fmt: skip
    for name, n, phase, step, resume in stops:
        with monkeypatch.context() as m:
            interrupt_on_call(m, name, n)
            capsys.readouterr()
            with pytest.raises(SystemExit) as e:
                gan.main(common + ["--out_dir", part] + resume)
        assert e.value.code == 130
        err = capsys.readouterr().err
        assert f"stopped: {part}{os.sep}ckpt.pt holds iteration {step}; continue with --resume" in err
        ckpt = torch.load(os.path.join(part, "ckpt.pt"), weights_only=True)
        assert (ckpt["phase"], ckpt["iter_num"]) == (phase, step)
    gan.main(common + ["--out_dir", part, "--resume"])
    assert resumed_in_the_rounds(capsys, 1)
    assert drop_time(read_log(part)) == drop_time(read_log(full))
    for name in ("ckpt.pt", "best.pt"):
        a, b = (torch.load(os.path.join(d, name), weights_only=True) for d in (full, part))
        assert all(torch.equal(a["model"][k], v) for k, v in b["model"].items())


@pytest.mark.slow
def test_init_from_a_switchhead_checkpoint(tmp_path, text_file, capsys):
    mle = str(tmp_path / "mle")
    sh.main(["--device", "cpu", "--n_layer", "1", "--n_embd", "32", "--block_size", "16", "--batch_size", "4",
             "--eval_iters", "2", "--data", text_file, "--out_dir", mle, "--max_iters", "2", "--eval_interval", "1",
             "--max_new_tokens", "0"])  # fmt: skip
    capsys.readouterr()
    init = torch.load(os.path.join(mle, "best.pt"), weights_only=True)
    out_dir = str(tmp_path / "gan")
    common = TINY + ["--data", text_file, "--d_pretrain_iters", "1", "--adv_rounds", "2", "--adv_eval_interval", "1",
                     "--max_new_tokens", "5"]  # fmt: skip
    init_from = os.path.join(mle, "best.pt")
    gan.main(common + ["--out_dir", out_dir, "--init_from", init_from, "--n_layer", "3", "--adv_rounds", "1"])
    out = capsys.readouterr().out
    assert "no MLE pre-training here" in out and "iter 0 | train" not in out and "round 1 | NLL" in out
    ckpt = torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=True)
    assert ckpt["config"]["n_layer"] == 1  # the generator's architecture comes from switchhead_moe's checkpoint
    assert ckpt["best_val_loss"] == init["best_val_loss"]  # the MLE phase's best val, done by switchhead_moe
    assert {r["phase"] for r in read_log(out_dir)} == {"d_pretrain", "adversarial"}
    # --resume takes --init_from from the checkpoint too, and carries its best val on
    gan.main(common + ["--out_dir", out_dir, "--resume", "--n_layer", "1"])
    assert resumed_in_the_rounds(capsys, 1)
    ckpt = torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=True)
    assert ckpt["iter_num"] == 2 and ckpt["config"]["init_from"] == init_from
    assert ckpt["best_val_loss"] == init["best_val_loss"]
    # any other script's checkpoint (this script's own included) ends with one line
    elsewhere = common + ["--out_dir", str(tmp_path / "other"), "--init_from"]
    other = str(tmp_path / "ex1.pt")
    torch.save({"script": "ex1_gpt"}, other)
    line = user_error(capsys, gan.main, elsewhere + [other])
    assert "of ex1_gpt, not of switchhead_moe; give one that python switchhead_moe.py wrote" in line
    assert "--out_dir" not in line  # the advice is about --init_from's file, not the folder of this run
    own = os.path.join(out_dir, "best.pt")
    assert "of gan_text, not of switchhead_moe" in user_error(capsys, gan.main, elsewhere + [own])
    assert "no checkpoint" in user_error(capsys, gan.main, elsewhere + [str(tmp_path / "missing.pt")])


@pytest.mark.slow
def test_user_errors(tmp_path, text_file, capsys):
    assert "--seq_len 20" in user_error(
        capsys, gan.main, TINY + ["--data", text_file, "--seq_len", "20"]
    )  # block_size is 16
    assert "--seq_len 1" in user_error(capsys, gan.main, TINY + ["--seq_len", "1"])
    assert "--baseline_decay" in user_error(capsys, gan.main, TINY + ["--baseline_decay", "1"])
    assert "--rollouts" in user_error(capsys, gan.main, TINY + ["--rollouts", "-1"])
    assert "--eval_samples" in user_error(capsys, gan.main, TINY + ["--eval_samples", "1"])
    assert "--init_from" in user_error(capsys, gan.main, TINY + ["--resume", "--init_from", "x.pt"])
    assert "--oracle_train" in user_error(capsys, gan.main, TINY + ["--oracle", "--oracle_train", "9"])
    assert "leave out --data" in user_error(capsys, gan.main, TINY + ["--oracle", "--data", text_file])
    assert "leave out --data and --init_from" in user_error(
        capsys, gan.main, TINY + ["--oracle", "--init_from", "x.pt"]
    )
    assert "no checkpoint" in user_error(capsys, gan.main, ["--out_dir", str(tmp_path), "--prompt", "hi"])


BAD_DATA = [("missing", "no such file"), ("folder", "a folder"), ("empty", "train split has 0 tokens"),
            ("binary", "binary"), ("latin-1", "not UTF-8"), ("short", "val split has 15 tokens")]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("case,expect", BAD_DATA)
def test_bad_data_file(case, expect, tmp_path, capsys):
    """Each is one line; "short": 150 characters, whose val split holds a GAN sequence (12) but no MLE batch (17)."""
    path = tmp_path / "data.txt"
    contents = {"empty": b"", "binary": b"\0\1 binary \0" * 40, "latin-1": "caf\u00e9 ".encode("latin-1") * 40,
                "short": (("All:\nSpeak, speak.\n" * 10)[:150]).encode()}  # fmt: skip
    if case in contents:
        path.write_bytes(contents[case])
    data = str(tmp_path) if case == "folder" else str(path)
    for extra in ([], ["--max_iters", "0"]):  # no MLE step: the data is checked all the same
        assert expect in user_error(capsys, gan.main, TINY + ["--data", data, "--out_dir", str(tmp_path / "o")] + extra)
