"""LoRA in ex3_pretrain_finetune.py's finetune stage and in flash_moe_finetune.py's fine-tune, the same code in both:
the adapted model starts as the pretrained one exactly; only the adapters (and flash's new routers) get gradients and
change, every frozen weight stays bit for bit; merging the adapters into the weights changes the logits by float
rounding only; through main, the checkpoints hold only what trains and the pretrained checkpoint's name and hash,
--resume gives the losses of a run never stopped, a LoRA checkpoint on other pretrained weights is refused in one
line, and --lora_merge writes an ordinary checkpoint that samples as the adapters do, without LoRA."""

import copy
import importlib
import inspect
import os
import shutil
import signal
from dataclasses import asdict, replace

import pytest
import torch
from test_compile import assert_compiles_whole, assert_experts_compile_whole, fresh_dynamo  # noqa: F401

import ex3_pretrain_finetune as ex3
import flash_moe_finetune as fm
from conftest import TEXT, losses, user_error

SCRIPTS = ["ex3_pretrain_finetune", "flash_moe_finetune"]
V = 23  # vocabulary of the unit-test models


def perturbed(model, seed, scale=0.05):
    """model with every weight moved off its initialisation (biases and LayerNorms too), as a pretrained one is."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def pretrained(mod, seed=0, **kw):
    """A small stand-in for a pretrained model and the Config of LoRA on it; flash's is upcycled: 4 experts in layer
    1, top-2, each a copy of its MLP."""
    torch.manual_seed(seed)
    cfg = mod.Config(n_layer=2, n_head=2, n_embd=32, block_size=16, dropout=0.0, bias=True, lora_rank=4, **kw)
    if mod is ex3:
        return perturbed(ex3.GPT(cfg, V), seed), cfg
    cfg = replace(cfg, n_experts=4, moe_k=2, moe_layers="odd")
    model = perturbed(fm.GPT(replace(cfg, n_experts=1), V), seed)
    fm.upcycle(model, cfg, torch.zeros((1, 1), dtype=torch.long))
    return model, cfg


def adapt(mod, model, cfg):
    """The script's own way of giving model adapters: ex3's add_lora; flash's lora_start (add_lora, routers train)."""
    if mod is ex3:
        ex3.add_lora(model, cfg, "pretrained.pt")
    else:
        fm.lora_start(model, cfg)
    return model


def batch(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(V, (4, 16), generator=g), torch.randint(V, (4, 16), generator=g)


def trains(name):
    """The parameters LoRA trains: A and B of each adapter, and flash's routers."""
    return ".lora_A." in name or ".lora_B." in name or ".router." in name


# ----------------------------------------------------------------------------------------------------------
# The model


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("targets,adapted", [("attn", 4), ("mlp", 4), ("attn,mlp", 8)])
def test_lora_starts_as_the_pretrained_model_exactly(script, targets, adapted):
    """B starts at zero: the logits are the pretrained model's, bit for bit, whichever layers get adapters."""
    mod = importlib.import_module(script)
    model, cfg = pretrained(mod, lora_targets=targets)
    x, _ = batch(0)
    with torch.no_grad():
        before = model.eval()(x)[0]
        lora = adapt(mod, copy.deepcopy(model), cfg).eval()
        layers = [m for m in lora.modules() if isinstance(m, mod.LoRALinear)]
        experts = 3 * 2 if mod is fm and "mlp" in targets else 0  # layer 1's other three experts: c_fc and c_proj
        assert len(layers) == adapted + experts
        assert all(not m.lora_B.weight.any() and m.lora_A.weight.abs().min() > 0 for m in layers)
        assert torch.equal(lora(x)[0], before)
        layers[0].lora_B.weight.normal_()  # the check can see an adapter at work
        assert not torch.allclose(lora(x)[0], before, atol=1e-3)


def test_the_lora_code_is_the_same_in_both():
    """flash_moe_finetune's LoRA is ex3's, word for word; only lora_start (the routers train too) is its own."""
    for name in ("LoRALinear", "add_lora", "load_adapters", "saved_weights", "lora_note", "save_merged"):
        assert inspect.getsource(getattr(fm, name)) == inspect.getsource(getattr(ex3, name)), name


@pytest.mark.parametrize("script", SCRIPTS)
def test_only_the_adapters_train_and_merging_changes_nothing(script, tmp_path):
    """Training steps through the script's optimizer: gradients reach A and B (and flash's routers) alone, the frozen
    weights stay bit for bit, A and B move; then the merged model's logits equal the adapted one's within 1e-5, and
    merged.pt (save_merged) is an ordinary checkpoint: a plain GPT loads it and computes the same."""
    mod = importlib.import_module(script)
    model, cfg = pretrained(mod, lora_dropout=0.1, learning_rate=1e-2)
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    lora = adapt(mod, copy.deepcopy(model), cfg).train()
    initial = {k: v.clone() for k, v in lora.state_dict().items()}
    optimizer = lora.configure_optimizer(cfg, "cpu")
    names = {id(p): n for n, p in lora.named_parameters()}
    held = {names[id(p)] for group in optimizer.param_groups for p in group["params"]}
    assert held == {n for n, _ in lora.named_parameters() if trains(n)} and held
    for step in range(5):
        x, y = batch(step)
        lora(x, y)[1].backward()
        assert {n for n, p in lora.named_parameters() if p.grad is not None} == held
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    after = lora.state_dict()
    for name, weight in frozen.items():  # each frozen weight, under its name in the adapted model
        adapted = name.replace(".weight", ".base.weight").replace(".bias", ".base.bias")
        assert trains(name) or torch.equal(after.get(adapted, after.get(name)), weight), name
    assert all(not torch.equal(after[n], initial[n]) for n in held)  # A, B (and the routers) moved
    assert all(lora.get_submodule(n.rsplit(".", 2)[0]).lora_B.weight.abs().max() > 1e-3 for n in held if "lora_B" in n)

    x, _ = batch(9)
    with torch.no_grad():
        unmerged = lora.eval()(x)[0]
        path = str(tmp_path / "best.pt")
        ckpt = {"script": mod.SCRIPT, "config": asdict(cfg), "lora_base": lora.lora_base, "iter_num": 5}
        mod.save_merged(lora, ckpt, path)
        assert not any(isinstance(m, mod.LoRALinear) for m in lora.modules())
        assert (lora(x)[0] - unmerged).abs().max() < 1e-5
        assert (lora(x)[0] - model.eval()(x)[0]).abs().max() > 1e-3  # ... and the adapters did change the model
        merged = torch.load(str(tmp_path / "merged.pt"), weights_only=True)
        assert "lora_base" not in merged and merged["config"]["lora_rank"] == 0
        plain = mod.GPT(mod.Config(**merged["config"]), V).eval()
        assert plain.state_dict().keys() == merged["model"].keys()  # the names of a model without adapters
        plain.load_state_dict(merged["model"])
        assert (plain(x)[0] - unmerged).abs().max() < 1e-5


@pytest.mark.slow
def test_compile_captures_the_adapters_whole():
    """--compile with adapters: one graph, the loss and the gradients of A and B (and of the routers) unchanged."""
    torch.manual_seed(0)
    cfg = ex3.Config(n_layer=2, n_head=2, n_embd=16, block_size=16, dropout=0.1, lora_rank=2, lora_dropout=0.1)
    x, y = batch(0)
    assert_compiles_whole(lambda: adapt(ex3, ex3.GPT(cfg, V), cfg), (x, y))
    assert_experts_compile_whole(lambda: adapt(fm, *pretrained(fm, lora_dropout=0.1)), (x, y))


# ----------------------------------------------------------------------------------------------------------
# Through main: checkpoints, resume, the pretrained checkpoint's hash, --lora_merge

LORA = ["--lora_rank", "2", "--lora_alpha", "4", "--lora_dropout", "0.1", "--dropout", "0.1", "--log_interval", "1"]
SAMPLE = ["--max_new_tokens", "12", "--temperature", "0", "--device", "cpu"]


class Ex3:
    """ex3: a pretrain stage on the tiny text (the stand-in pretrained model), then LoRA finetune stages from it."""

    mod = ex3

    def __init__(self, tmp_path):
        self.tmp = tmp_path
        text = tmp_path / "tiny.txt"
        text.write_text(TEXT, encoding="utf-8")
        self.common = ["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "16", "--batch_size", "4",
                       "--device", "cpu", "--eval_iters", "2", "--max_new_tokens", "10", "--data", str(text),
                       "--pretrain_data", str(text), "--data_dir", str(tmp_path / "data")]  # fmt: skip
        self.base = self.pretrain(str(tmp_path / "base"), seed=1)

    def pretrain(self, out, seed):
        ex3.main(self.common + ["--stage", "pretrain", "--max_iters", "30", "--eval_interval", "30",
                                "--seed", str(seed), "--learning_rate", "1e-2", "--out_dir", out])  # fmt: skip
        return os.path.join(out, "pretrain", "best.pt")

    def out_dir(self, name):
        """A run's out_dir, holding a copy of the pretrained stage."""
        shutil.copytree(os.path.dirname(self.base), self.tmp / name / "pretrain")
        return str(self.tmp / name)

    def finetune(self, out, iters):
        return self.common + LORA + ["--stage", "finetune", "--out_dir", out, "--finetune_iters", str(iters),
                                     "--eval_interval", "3", "--finetune_learning_rate", "1e-2",
                                     "--warmup_iters", "0"]  # fmt: skip

    def folder(self, out):
        return os.path.join(out, "finetune")

    def pretrained_path(self, out):
        return os.path.join(out, "pretrain", "best.pt")

    def sample(self, out):
        return ["--out_dir", out, "--stage", "finetune", "--prompt", "All:", *SAMPLE]

    def merge(self, out):
        return ["--out_dir", out, "--stage", "finetune", "--lora_merge", "--device", "cpu"]


class Flash:
    """flash_moe_finetune: the stand-in pretrained model is a checkpoint as ex3 --tokenizer gpt2 writes it; the runs
    upcycle it (4 experts in layer 1) and fine-tune adapters on tiny WikiText-style splits."""

    mod = fm

    def __init__(self, tmp_path):
        self.tmp = tmp_path
        wiki = tmp_path / "wikitext"
        wiki.mkdir()
        line = " = Lobster = \n \n The lobster is a red animal . It 's highly esteemed , 1 @,@ 000 g .\n"
        for i, split in enumerate(("train", "valid", "test")):
            (wiki / f"{split}.txt").write_text(line.replace("Lobster", f"Lobster {i}") * 30, encoding="utf-8")
        self.wiki = str(wiki)
        self.base = self.pretrain(str(tmp_path / "base.pt"), seed=1)

    def pretrain(self, path, seed):
        arch = {"n_layer": 2, "n_head": 2, "n_embd": 16, "block_size": 16, "bias": False}
        torch.manual_seed(seed)
        model = perturbed(fm.GPT(fm.Config(**arch, n_experts=1, gelu="none"), 50257), seed)
        torch.save({"script": "ex3_pretrain_finetune", "model": model.state_dict(), "config": arch,
                    "tokenizer": "gpt2", "vocab": None}, path)  # fmt: skip
        return path

    def out_dir(self, name):
        return str(self.tmp / name)

    def finetune(self, out, iters):
        return LORA + ["--init_from", self.base, "--data", self.wiki, "--out_dir", out, "--max_iters", str(iters),
                       "--eval_interval", "3", "--learning_rate", "1e-2", "--warmup_iters", "0", "--batch_size", "2",
                       "--eval_iters", "2", "--test_tokens", "200", "--max_new_tokens", "4", "--no-compare",
                       "--device", "cpu"]  # fmt: skip

    def folder(self, out):
        return out

    def pretrained_path(self, out):
        return self.base

    def sample(self, out):
        return ["--out_dir", out, "--prompt", "The lobster", "--no-compare", *SAMPLE]

    def merge(self, out):
        return ["--out_dir", out, "--lora_merge", "--device", "cpu"]


@pytest.fixture(params=SCRIPTS)
def runs(request, tmp_path):
    if request.param == "ex3_pretrain_finetune":
        return Ex3(tmp_path)
    request.getfixturevalue("gpt2_cache")  # GPT-2's BPE, offline
    return Flash(tmp_path)


def samples(text):
    return text[text.index("--- sample 1") :]


@pytest.mark.slow
def test_lora_checkpoints_resume_and_the_trained_model(runs, capsys, monkeypatch):
    """A LoRA run through main: the start-up line says what trains, the optimizer holds only that, the frozen weights
    end bit for bit where they began; ckpt.pt and best.pt hold only what trains, with the pretrained checkpoint's path
    and hash; stopped by Ctrl-C and resumed, the run gives the uninterrupted losses (dropout and all)."""
    mod, full, part = runs.mod, runs.out_dir("full"), runs.out_dir("part")
    models, train = [], mod.train

    def keep(cfg, model, *args, **kwargs):  # the model train() gets, and its weights before training
        models.append((model, {k: v.clone() for k, v in model.state_dict().items()}))
        return train(cfg, model, *args, **kwargs)

    monkeypatch.setattr(mod, "train", keep)
    mod.main(runs.finetune(full, 9))
    out = capsys.readouterr().out
    (model, before), = models  # fmt: skip
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    assert trained and all(trains(n) for n in trained) and n_train < n_all / 10
    assert f"LoRA rank 2 on attn,mlp: {n_train:,} of {n_all:,} parameters train" in out
    after = model.state_dict()
    for name, p in model.named_parameters():
        assert torch.equal(after[name], before[name]) != (name in trained), name  # frozen: bit for bit; the rest moved

    ckpt = torch.load(os.path.join(runs.folder(full), "ckpt.pt"), weights_only=True)
    best = torch.load(os.path.join(runs.folder(full), "best.pt"), weights_only=True)
    for c in (ckpt, best):
        assert set(c["model"]) == trained
        assert c["lora_base"]["path"] == runs.pretrained_path(full) and len(c["lora_base"]["sha256"]) == 64
    assert len(ckpt["optimizer"]["state"]) == len(trained) and "optimizer" not in best
    for name in trained:
        assert torch.equal(ckpt["model"][name], after[name])

    monkeypatch.setattr(mod, "train", train)
    get_lr = mod.get_lr
    ctrl_c = lambda it, cfg: (it == 4 and os.kill(os.getpid(), signal.SIGINT)) or get_lr(it, cfg)  # noqa: E731
    monkeypatch.setattr(mod, "get_lr", ctrl_c)
    with pytest.raises(SystemExit) as e:
        mod.main(runs.finetune(part, 9))
    assert e.value.code == 130 and "holds iteration 5" in capsys.readouterr().err
    monkeypatch.setattr(mod, "get_lr", get_lr)
    mod.main(runs.finetune(part, 9) + ["--resume"])
    assert "resuming from iter 5" in capsys.readouterr().out
    assert losses(runs.folder(part)) == losses(runs.folder(full)) and len(losses(runs.folder(full))) == 9 + 4


@pytest.mark.slow
def test_sampling_merging_and_the_wrong_pretrained_checkpoint(runs, capsys):
    """--prompt samples from a LoRA best.pt; --lora_merge writes merged.pt, which, as another run's best.pt, samples
    the same text through the plain path (no adapters). A LoRA checkpoint on other pretrained weights, or on none, is
    refused in one line by --prompt, --lora_merge and --resume, and the checkpoints are left as they were."""
    mod, out = runs.mod, runs.out_dir("run")
    mod.main(runs.finetune(out, 3))
    capsys.readouterr()
    mod.main(runs.sample(out))
    adapted = samples(capsys.readouterr().out)
    mod.main(runs.merge(out))
    said = capsys.readouterr().out
    merged_path = os.path.join(runs.folder(out), "merged.pt")
    assert f"saved {merged_path}" in said
    merged = torch.load(merged_path, weights_only=True)
    assert "lora_base" not in merged and not any("lora_" in k for k in merged["model"])
    plain = str(runs.tmp / "plain")
    os.makedirs(runs.folder(plain))
    shutil.copy(merged_path, os.path.join(runs.folder(plain), "best.pt"))
    mod.main(runs.sample(plain))
    assert samples(capsys.readouterr().out) == adapted and "--- sample 1" in adapted
    line = user_error(capsys, mod.main, runs.merge(plain))  # an ordinary checkpoint: no adapters to merge
    assert "holds no adapters" in line
    if mod is fm:  # a LoRA best.pt is no starting model; its merged.pt is
        line = user_error(capsys, mod.main, runs.finetune(out + "2", 3) + ["--init_from", os.path.join(out, "best.pt")])
        assert "holds LoRA adapters" in line and "--lora_merge" in line

    # other weights in the pretrained checkpoint's place
    folder = runs.folder(out)
    kept = {n: open(os.path.join(folder, n), "rb").read() for n in ("ckpt.pt", "best.pt")}
    pretrained = runs.pretrained_path(out)
    os.replace(runs.pretrain(str(runs.tmp / "other"), seed=2), pretrained)
    for args in (runs.sample(out), runs.merge(out), runs.finetune(out, 6) + ["--resume"]):
        line = user_error(capsys, mod.main, args)
        assert "sha256 differs" in line and pretrained in line
    os.remove(pretrained)
    line = user_error(capsys, mod.main, runs.sample(out))
    assert pretrained in line and ("missing" in line or "no checkpoint at" in line)
    assert kept == {n: open(os.path.join(folder, n), "rb").read() for n in ("ckpt.pt", "best.pt")}


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_lora_flag_mistakes(script, capsys):
    mod = importlib.import_module(script)
    assert "--lora_targets" in user_error(capsys, mod.parse_args, ["--lora_targets", "attn,ffn"])
    assert "--lora_targets" in user_error(capsys, mod.parse_args, ["--lora_targets", ""])
    assert "--lora_targets" in user_error(capsys, mod.parse_args, ["--lora_targets", "attn,attn"])  # not a traceback
    for flag in ("--lora_rank", "--lora_alpha", "--lora_dropout"):
        assert flag in user_error(capsys, mod.parse_args, [flag, "-1"])
    assert "--lora_alpha" in user_error(capsys, mod.parse_args, ["--lora_alpha", "0"])
    assert "--lora_dropout" in user_error(capsys, mod.parse_args, ["--lora_dropout", "1"])
    if mod is ex3:  # pretraining and the from-scratch run train every weight
        for stage in ("pretrain", "scratch"):
            assert "finetune stage" in user_error(capsys, ex3.parse_args, ["--stage", stage, "--lora_rank", "4"])
