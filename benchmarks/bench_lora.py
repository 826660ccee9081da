"""
bench_lora.py: LoRA against the full finetune, printed as Markdown tables for RESULTS.md, with a picture.

Two parts; `all` runs both. Every table starts with the machine (CPU, threads, torch version).

  ex3    From a pretrained ex3 model (--pretrained: the folder of its best.pt, made by ex3_pretrain_finetune.py --stage
         pretrain: ex1's CPU model, 4 layers, 4 heads, 128 wide, block 64, on the Project Gutenberg books), finetune
         stages on TinyShakespeare for --finetune_iters (ex3's 2,000): the full finetune (every weight, ex3's lr 5e-4)
         and LoRA at each of --ranks (adapters on attention and the MLPs, --lora_lr). Each run gets a copy of the
         pretrained best.pt in its out_dir and runs alone, 1 thread by default (--threads). Prints, per run: the best
         val loss, the share of the full finetune's gain over the pretrained model it recovers, the parameters that
         train, the optimizer state in ckpt.pt (AdamW's two moments per trained parameter), the sizes of ckpt.pt and
         best.pt, the median ms/iter of log.csv. Target: some rank that trains at most 10% of the parameters recovers at
         least 80% of the gain. Draws val loss against trained parameters into benchmarks/pictures/lora_ex3.png (with
         matplotlib; without it, no picture). Then --lora_merge on the best LoRA run: merged.pt's size, and its val
         loss, scored by ex3's estimate_loss, equal to the adapted model's.
  flash  flash_moe_finetune.py's offline stand-in (RESULTS.md: "upcycled experts against a dense fine-tune"): a
         GPT-2-BPE ex3 model (--flash_base, a best.pt; without it, made as bench_flash_moe_finetune.py makes it: 4
         layers, 128 wide, context 128, 800 iterations on 5M tokens of the books), fine-tuned dense for 300 iterations
         of 8 x 128 tokens on WikiText-2's valid split: every weight (lr 1e-3, bench_flash_moe_finetune.py's) against
         LoRA at --flash_ranks (--flash_lora_lr). Prints the test perplexity (window 128, stride 64) before and after,
         the parameters that train, ckpt.pt's size and ms/iter.

Run alone on the machine (ms/iter is measured). On 2 CPU cores, 1 thread:
  python benchmarks/bench_lora.py ex3      six finetunes of 2,000 iterations: 8-12 min each on a machine where 4-6
                                           other jobs ran (about an hour and a quarter in all), half that alone
  python benchmarks/bench_lora.py ex3 --reuse   only the finetunes not yet finished in out/bench_lora/ex3 (each run's
                                           numbers are read from its log.csv and checkpoints), then the report
  python benchmarks/bench_lora.py flash    estimated (not yet run) at 40 minutes with the base model to make, 25
                                           without (--flash_base PATH)
  python benchmarks/bench_lora.py all --quick   a check of the script itself: tiny sizes, about 3 minutes (it makes
                                                its own small pretrained models)
"""

import argparse
import os
import re
import shutil
import statistics
import sys
from contextlib import nullcontext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, "..", "shared", "data")
OUT = os.path.join(ROOT, "out", "bench_lora")
EX3 = os.path.join(ROOT, "ex3_pretrain_finetune.py")
FLASH = os.path.join(ROOT, "flash_moe_finetune.py")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, ROOT)
import ex3_pretrain_finetune as ex3  # noqa: E402
from common import PICTURES, machine, read_log, run, table  # noqa: E402

DONE = r"done: (\d+) iterations in ([\d.]+) s, median ([\d.]+) ms/iter, best val ([\d.]+)"


def checkpoint_numbers(folder):
    """The sizes of ckpt.pt and best.pt in bytes, and of the optimizer state in ckpt.pt (its tensors' bytes)."""
    ckpt = torch.load(os.path.join(folder, "ckpt.pt"), map_location="cpu", weights_only=True)
    state = sum(t.numel() * t.element_size() for s in ckpt["optimizer"]["state"].values() for t in s.values())
    return {name: os.path.getsize(os.path.join(folder, f"{name}.pt")) for name in ("ckpt", "best")} | {"optim": state}


def size(n):
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


# ----------------------------------------------------------------------------------------------------------
# ex3: ranks 1 ... 16 against the full finetune


def ex3_quick_pretrained(a):
    """--quick: a small pretrained model of its own (2 layers, 64 wide, 200 iterations on 2M characters)."""
    out = os.path.join(OUT, "ex3-quick", "base")
    run([sys.executable, EX3, "--stage", "pretrain", "--out_dir", out, "--overwrite", "--pretrain_data", a.books,
         "--data", a.shakespeare, "--pretrain_tokens", "2000000", "--n_layer", "2", "--n_embd", "64",
         "--max_iters", "200", "--eval_interval", "200", "--eval_iters", "20", "--max_new_tokens", "1",
         "--device", "cpu"], a.threads)  # fmt: skip
    return os.path.join(out, "pretrain")


def finished(folder, iters):
    """Whether the finetune in folder got to its last evaluation, at iteration iters."""
    path = os.path.join(folder, "log.csv")
    return os.path.isfile(path) and any(r["iter"] == str(iters) and r["val_loss"] for r in read_log(folder))


def ex3_result(name, flags, out_dir, n_all):
    """A finished finetune's numbers, all read from its files: log.csv (the best val loss, the pretrained model's at
    iteration 0, the median of the logged ms/iter) and the checkpoints (what trains: a LoRA checkpoint holds it)."""
    folder = os.path.join(out_dir, "finetune")
    log = read_log(folder)
    evals = [float(r["val_loss"]) for r in log if r["val_loss"]]
    ckpt = torch.load(os.path.join(folder, "ckpt.pt"), map_location="cpu", weights_only=True)
    trains = sum(t.numel() for t in ckpt["model"].values()) if "lora_base" in ckpt else n_all
    ms = statistics.median(float(r["ms_per_iter"]) for r in log if r["ms_per_iter"])
    return {"name": name, "flags": flags, "out_dir": out_dir, "val": min(evals), "before": evals[0], "ms": ms,
            "trains": trains, **checkpoint_numbers(folder)}  # fmt: skip


def ex3_part(a):
    pretrained = ex3_quick_pretrained(a) if a.quick else a.pretrained
    if not os.path.isfile(os.path.join(pretrained, "best.pt")):
        sys.exit(f"no best.pt in {pretrained}; pass --pretrained, the pretrain folder of an ex3 run")
    base = torch.load(os.path.join(pretrained, "best.pt"), map_location="cpu", weights_only=True)
    cfg = ex3.Config(**base["config"])
    n_all = sum(p.numel() for p in ex3.GPT(cfg, len(base["vocab"])).parameters())  # what the full finetune trains
    iters = 50 if a.quick else a.finetune_iters
    common = ["--stage", "finetune", "--overwrite", "--data", a.shakespeare, "--finetune_iters", str(iters),
              "--log_interval", "100", "--max_new_tokens", "200", "--device", "cpu"]  # fmt: skip
    if a.quick:
        common += ["--eval_interval", "25", "--eval_iters", "20", "--log_interval", "5"]
    runs = [("full finetune", [])] + [
        (f"LoRA rank {r}", ["--lora_rank", str(r), "--finetune_learning_rate", a.lora_lr]) for r in a.ranks
    ]
    results = []
    for name, flags in runs:
        out_dir = os.path.join(OUT, "ex3-quick" if a.quick else "ex3", name.replace(" ", "-"))
        if not (a.reuse and finished(os.path.join(out_dir, "finetune"), iters)):
            os.makedirs(os.path.join(out_dir, "pretrain"), exist_ok=True)
            shutil.copy(os.path.join(pretrained, "best.pt"), os.path.join(out_dir, "pretrain", "best.pt"))
            cmd = [sys.executable, EX3, "--out_dir", out_dir, *common, *flags, *a.extra]
            run(cmd, a.threads, log_path=os.path.join(out_dir, "output.txt"))
        results.append(ex3_result(name, flags, out_dir, n_all))
        print(f"{name}: best val {results[-1]['val']:.4f}, {results[-1]['ms']:.1f} ms/iter", flush=True)
    ex3_report(a, results, cfg, n_all, pretrained, iters)
    merge_check(a, min(results[1:], key=lambda r: r["val"]), cfg)
    plot(results, n_all, os.path.join(OUT if a.quick else PICTURES, "lora_ex3.png"))


def ex3_report(a, results, cfg, n_all, pretrained, iters):
    full, before = results[0], results[0]["before"]
    print(f"\n### LoRA against the full finetune: ex3_pretrain_finetune.py{' (--quick)' if a.quick else ''}\n")
    print(
        f"Machine: {machine(a.threads)}. Command: OMP_NUM_THREADS={a.threads} python benchmarks/bench_lora.py ex3"
        f"{' --quick' if a.quick else ''} --lora_lr {a.lora_lr} (one run at a time). From {pretrained}/best.pt "
        f"({cfg.n_layer} layers, {cfg.n_head} heads, {cfg.n_embd} wide, block {cfg.block_size}; val loss on "
        f"TinyShakespeare {before:.4f} before finetuning), {iters} iterations of {cfg.batch_size} x {cfg.block_size} "
        f"tokens each; full finetune at lr {ex3.Config.finetune_learning_rate:g}, LoRA at lr {a.lora_lr} with "
        f"alpha {ex3.Config.lora_alpha:g} on attn,mlp; val loss: the best evaluation (every "
        f"{25 if a.quick else 500} iterations, {20 if a.quick else 200} batches per split); ms/iter: the median of "
        "the logged iterations.\n"
    )
    rows, met = [], []
    for r in results:
        share, recovered = r["trains"] / n_all, (before - r["val"]) / (before - full["val"])
        if r is not full and share <= 0.10 and recovered >= 0.80:
            met.append(r["name"])
        rows.append([r["name"], f"{r['trains']:,} ({100 * share:.2f}%)", f"{r['val']:.4f}", f"{100 * recovered:.0f}%",
                     size(r["optim"]), size(r["ckpt"]), size(r["best"]), f"{r['ms']:.1f}"])  # fmt: skip
    table(["run", "parameters trained (% of all)", "best val loss", "gain recovered", "optimizer state", "ckpt.pt",
           "best.pt", "ms/iter"], rows)  # fmt: skip
    print(
        f"Pretrained model before finetuning: val {before:.4f}; the full finetune's gain {before - full['val']:.4f}. "
        "Target: a rank that trains at most 10% of the parameters recovers at least 80% of it: "
        + (f"met ({', '.join(met)})." if met else "NOT met.")
        + "\n",
        flush=True,
    )


def merge_check(a, r, cfg):
    """--lora_merge on a LoRA run: merged.pt's size, and its val loss equal to the adapted model's (best.pt)."""
    finetune = os.path.join(r["out_dir"], "finetune")
    run([sys.executable, EX3, "--out_dir", r["out_dir"], "--stage", "finetune", "--lora_merge", "--device", "cpu"])
    device = torch.device("cpu")
    best = ex3.load_checkpoint(os.path.join(finetune, "best.pt"), device)
    merged = ex3.load_checkpoint(os.path.join(finetune, "merged.pt"), device)
    tok = ex3.get_tokenizer(best["tokenizer"], best["vocab"])
    ids = np.array(tok.encode(ex3.load_text(ex3.Config(data=a.shakespeare))), dtype=np.uint16)
    run_cfg = ex3.Config(**best["config"])
    loader = ex3.DataLoader(ids, run_cfg, device)
    adapted = ex3.load_model(run_cfg, best, os.path.join(finetune, "best.pt"), tok.vocab_size, device)
    plain = ex3.GPT(ex3.Config(**merged["config"]), tok.vocab_size)
    plain.load_state_dict(merged["model"])
    val = [ex3.estimate_loss(m, loader, run_cfg, nullcontext())["val"] for m in (adapted, plain)]
    print(
        f"--lora_merge on {r['name']} (`python ex3_pretrain_finetune.py --stage finetune --lora_merge --out_dir ...`): "
        f"merged.pt {size(os.path.getsize(os.path.join(finetune, 'merged.pt')))}, an ordinary checkpoint; val loss "
        f"{val[1]:.4f} from it through a plain GPT against {val[0]:.4f} with the adapters (difference "
        f"{abs(val[1] - val[0]):.1e}).\n",
        flush=True,
    )


def plot(results, n_all, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): no picture")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    lora = [r for r in results if r["flags"]]
    ax.plot([r["trains"] for r in lora], [r["val"] for r in lora], marker="o", label="LoRA (attn, mlp)")
    for r in lora:
        ax.annotate(f"r={r['flags'][1]}", (r["trains"], r["val"]), textcoords="offset points", xytext=(4, 4))
    full, before = results[0], results[0]["before"]
    ax.plot([full["trains"]], [full["val"]], marker="s", color="black", linestyle="", label="full finetune")
    ax.axhline(before, color="gray", linestyle="--", linewidth=0.8, label="pretrained, before finetuning")
    target = before - 0.8 * (before - full["val"])
    ax.axhline(target, color="tab:red", linestyle=":", linewidth=0.8, label="80% of the full finetune's gain")
    ax.axvline(0.1 * n_all, color="tab:red", linestyle=":", linewidth=0.8)
    ax.set_xscale("log")
    ax.set(xlabel="parameters trained (log scale)", ylabel="best val loss on TinyShakespeare",
           title="ex3: LoRA ranks against the full finetune")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    print(f"saved {path}")


# ----------------------------------------------------------------------------------------------------------
# flash_moe_finetune: the offline stand-in, full fine-tune against LoRA


def flash_part(a):
    out = os.path.join(OUT, "flash-quick" if a.quick else "flash")
    if a.quick:
        size_flags = ["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "32", "--batch_size", "4"]
        pre_iters, ft_iters, every, evals, tokens = 30, 10, 10, 5, "200000"
    else:
        size_flags = ["--n_layer", "4", "--n_head", "4", "--n_embd", "128", "--block_size", "128", "--batch_size", "8"]
        pre_iters, ft_iters, every, evals, tokens = 800, 300, 100, 20, "5000000"
    base = a.flash_base
    if not base or a.quick:  # bench_flash_moe_finetune.py's starting model
        base_dir = os.path.join(out, "base")
        run([sys.executable, EX3, "--stage", "pretrain", "--tokenizer", "gpt2", "--out_dir", base_dir, "--overwrite",
             "--pretrain_data", a.books, "--pretrain_tokens", tokens, "--data", a.shakespeare, *size_flags,
             "--max_iters", str(pre_iters), "--eval_interval", str(pre_iters), "--eval_iters", str(evals),
             "--learning_rate", "1e-3", "--min_lr", "1e-4", "--warmup_iters", str(pre_iters // 16),
             "--log_interval", str(every), "--max_new_tokens", "30", "--device", "cpu"],
            a.threads, show=True)  # fmt: skip
        base = os.path.join(base_dir, "pretrain", "best.pt")
    common = ["--init_from", base, "--data", a.wikitext, "--train_split", "valid", "--n_experts", "1",
              "--max_iters", str(ft_iters), "--eval_interval", str(every), "--eval_iters", str(evals),
              "--log_interval", str(every), "--min_lr", "1e-4", "--warmup_iters", str(ft_iters // 10),
              "--dropout", "0", "--max_new_tokens", "40", "--no-compare", "--device", "cpu", "--overwrite"]  # fmt: skip
    if a.quick:
        common += ["--test_tokens", "5000"]
    runs = [("full fine-tune", ["--learning_rate", "1e-3"])] + [
        (f"LoRA rank {r}", ["--lora_rank", str(r), "--learning_rate", a.flash_lora_lr]) for r in a.flash_ranks
    ]
    rows = []
    for name, flags in runs:
        out_dir = os.path.join(out, name.replace(" ", "-"))
        text, wall, _ = run([sys.executable, FLASH, "--out_dir", out_dir, *common, *flags, *a.extra], a.threads)
        ppl = re.findall(r"test perplexity (?:before fine-tuning|after fine-tuning \(best val checkpoint\)): "
                         r"([\d.]+) per token \([\d,]+ tokens\), ([\d.]+) per word", text)  # fmt: skip
        done = re.search(DONE, text)
        weights = torch.load(os.path.join(out_dir, "ckpt.pt"), map_location="cpu", weights_only=True)["model"]
        n = sum({t.data_ptr(): t.numel() for t in weights.values()}.values())  # the tied embedding once
        sizes = checkpoint_numbers(out_dir)
        rows.append([name, f"{n:,}", f"{float(ppl[0][0]):.2f}", f"**{float(ppl[1][0]):.2f}** / "
                     f"{float(ppl[1][1]):.2f}", done.group(4), size(sizes["optim"]), size(sizes["ckpt"]),
                     f"{float(done.group(3)):.0f}", f"{wall / 60:.1f} min"])  # fmt: skip
        print(f"{name}: test perplexity {ppl[0][0]} -> {ppl[1][0]}", flush=True)
    print(f"\n### LoRA against the full fine-tune: flash_moe_finetune.py's offline stand-in{' (--quick)' * a.quick}\n")
    print(
        f"Machine: {machine(a.threads)}. Command: OMP_NUM_THREADS={a.threads} python benchmarks/bench_lora.py flash"
        f"{' --quick' if a.quick else ''} --flash_lora_lr {a.flash_lora_lr}. Starting model {base} (GPT-2's BPE), "
        f"dense (--n_experts 1), {ft_iters} iterations on WikiText-2's valid split, test split scored with a sliding "
        "window.\n"
    )
    table(["run", "parameters trained", "test perplexity before", "after, per token / per word", "best val loss",
           "optimizer state", "ckpt.pt", "ms/iter", "wall"], rows)  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("part", choices=["all", "ex3", "flash"])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the script, not the numbers")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every run")
    parser.add_argument("--reuse", action="store_true", help="ex3: keep the finetunes already finished in out/")
    parser.add_argument("--pretrained", default=os.path.join(ROOT, "out", "lora", "pretrain"),
                        help="ex3: the pretrain folder (its best.pt) the finetunes start from")  # fmt: skip
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="ex3: LoRA ranks")
    parser.add_argument("--finetune_iters", type=int, default=2000, help="ex3: iterations of every finetune")
    parser.add_argument("--lora_lr", default="3e-3", help="ex3: the LoRA runs' --finetune_learning_rate")
    parser.add_argument("--flash_base", default="", help="flash: a best.pt of ex3 --tokenizer gpt2; empty: make one")
    parser.add_argument("--flash_ranks", type=int, nargs="+", default=[8], help="flash: LoRA ranks")
    parser.add_argument("--flash_lora_lr", default="3e-3", help="flash: the LoRA runs' --learning_rate")
    parser.add_argument("--books", default=os.path.join(SHARED, "gutenberg", "books"), help="the pretraining corpus")
    parser.add_argument("--shakespeare", default=os.path.join(SHARED, "tinyshakespeare.txt"), help="TinyShakespeare")
    parser.add_argument("--wikitext", default=os.path.join(SHARED, "wikitext-2"), help="WikiText-2's valid and test")
    a, extra = parser.parse_known_args()
    a.extra = [x for x in extra if x != "--"]
    for part in ("ex3", "flash") if a.part == "all" else (a.part,):
        globals()[f"{part}_part"](a)


if __name__ == "__main__":
    main()
