"""
bench_gan.py: does adversarial training (gan_text.py) beat the MLE generator it starts from on the quality-diversity
trade-off, or does a temperature-tuned MLE model win, as Caccia et al. (ICLR 2020, "Language GANs falling short") found?

    python benchmarks/bench_gan.py              the full run on TinyShakespeare: about 20-25 minutes on 2 CPU cores
                                                (estimated from short runs on a shared machine, not timed end to end:
                                                MLE about 4 minutes; the GAN's 200 D steps at ~0.5 s, 150 rounds at
                                                ~2.7 s and 15 evaluations at ~12 s, about 12; evaluation 1-2)
    python benchmarks/bench_gan.py --quick      a check of the pipeline in under a minute (numbers meaningless)
    python benchmarks/bench_gan.py -- --rollouts 1 --gan_batch_size 16     flags after -- go to gan_text.py (SeqGAN's
                                                per-token rewards: about 4 s more per round at this batch)

Steps, each a fresh process as a user would run it, with its output under out/bench_gan/:
  1. The MLE generator: python switchhead_moe.py --block_size 64 (its defaults otherwise: 2 heads x 4 experts,
     4 layers of 128, 2000 iterations), into out/bench_gan/mle.
  2. The GAN: python gan_text.py --init_from out/bench_gan/mle/best.pt (its defaults: D pre-trained 200 steps,
     150 rounds of 1 generator and 3 discriminator steps, batches of 64 sequences of 64 characters, sequence-level
     rewards), into out/bench_gan/gan. Its log.csv gives D's accuracy and the metrics over the rounds.
  3. Here, in this process: both generators measured the same way. NLL: the mean cross-entropy per character on
     --eval_iters held-out batches (the same batches for both). Samples: --samples sequences of 64 characters,
     each started from the first character of a held-out sequence at a fixed offset, the same first characters and
     the same random seed for every row. BLEU-2/3/4 (word level, smoothed) of the samples against the held-out text
     cut into 64-character pieces, and self-BLEU-4 of the samples (diversity: lower is more diverse), all with
     gan_text.py's own functions. Each generator is sampled at every --temperatures value; temperature 1 is the
     distribution the GAN trained. Real text (train-split sequences, scored the same way) marks the target.
     The sampling noise is shown by scoring the MLE generator at temperature 1 with a second seed.
  4. A picture, benchmarks/pictures/gan_quality_diversity.png: BLEU-4 and BLEU-2 against self-BLEU, one curve per
     generator over the temperatures, real text as a star. The verdict compares the GAN at temperature 1 with the MLE
     curve at the same self-BLEU-4 (linear interpolation between temperatures): the higher BLEU-4 wins.
It prints markdown tables for the README.
"""

import argparse
import os
import sys
import time
from contextlib import nullcontext

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import gan_text as gan  # noqa: E402  (importing it trains nothing)
from common import PICTURES, read_log, run  # noqa: E402

OUT = os.path.join(ROOT, "out", "bench_gan")


def load_generator(path, script):
    ckpt = gan.load_checkpoint(path, torch.device("cpu"), scripts=(script,))
    model = gan.GPT(
        gan.Config(**{k: v for k, v in ckpt["config"].items() if k in gan.Config.__dataclass_fields__}),
        len(ckpt["vocab"]),
    )
    model.load_state_dict(ckpt["model"])
    return model.eval(), ckpt["vocab"]


def measure(model, real, refs, tok, cfg, temperature, seed):
    cfg.seed = seed
    metrics, fake = gan.evaluate_samples(model, None, real, refs, tok, cfg, nullcontext(), temperature)
    texts = [tok.decode(row) for row in fake.tolist()]
    metrics["distinct"] = len(set(texts))
    return metrics, texts


def interpolate(points, x):
    """y at x on the polyline through points (x, y), sorted by x; None outside its range."""
    points = sorted(points)
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument(
        "--mle_iters", type=int, default=2000, help="MLE iterations of the generator (switchhead_moe.py)"
    )
    parser.add_argument("--d_pretrain_iters", type=int, default=200)
    parser.add_argument("--adv_rounds", type=int, default=150)
    parser.add_argument("--samples", type=int, default=256, help="samples per generator and temperature")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2])
    parser.add_argument("--eval_iters", type=int, default=200, help="held-out batches for the NLL")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--data", default="", help="a local text file instead of TinyShakespeare")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--quick", action="store_true", help="tiny runs: 20 MLE iterations, 2 D steps, 3 rounds, 32 samples"
    )
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    common = ["--block_size", "64", "--seed", str(args.seed), "--device", args.device, "--max_new_tokens", "0"] + (
        ["--data", args.data] if args.data else []
    )
    mle_flags, gan_flags = (
        ["--max_iters", str(args.mle_iters)],
        ["--d_pretrain_iters", str(args.d_pretrain_iters), "--adv_rounds", str(args.adv_rounds)],
    )
    if args.quick:
        args.samples, args.temperatures, args.eval_iters = 32, [0.8, 1.0, 1.2], 2
        mle_flags = [
            "--max_iters",
            "20",
            "--eval_interval",
            "20",
            "--eval_iters",
            "2",
            "--n_layer",
            "2",
            "--n_embd",
            "64",
        ]
        gan_flags = [
            "--d_pretrain_iters",
            "2",
            "--adv_rounds",
            "3",
            "--adv_eval_interval",
            "1",
            "--eval_iters",
            "2",
            "--eval_samples",
            "16",
            "--gan_batch_size",
            "8",
        ]
    print(
        f"torch threads: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, {os.cpu_count()} cores",
        flush=True,
    )

    # 1 and 2: the two training runs
    mle_dir, gan_dir = os.path.join(OUT, "mle"), os.path.join(OUT, "gan")
    for d in (mle_dir, gan_dir):
        os.makedirs(d, exist_ok=True)
    cmd = [
        sys.executable,
        os.path.join(ROOT, "switchhead_moe.py"),
        *common,
        *mle_flags,
        "--out_dir",
        mle_dir,
        "--overwrite",
    ]
    print(f"MLE: {' '.join(cmd[1:])}", flush=True)
    _, t_mle, _ = run(cmd, log_path=os.path.join(mle_dir, "stdout.txt"))
    print(f"  {t_mle / 60:.1f} min", flush=True)
    cmd = [
        sys.executable,
        os.path.join(ROOT, "gan_text.py"),
        *common,
        *gan_flags,
        *extra,
        "--init_from",
        os.path.join(mle_dir, "best.pt"),
        "--out_dir",
        gan_dir,
        "--overwrite",
    ]
    print(f"GAN: {' '.join(cmd[1:])}", flush=True)
    _, t_gan, _ = run(cmd, log_path=os.path.join(gan_dir, "stdout.txt"))
    print(f"  {t_gan / 60:.1f} min", flush=True)

    # 3: both generators, measured the same way
    t0 = time.time()
    generators = {
        "MLE": load_generator(os.path.join(mle_dir, "best.pt"), "switchhead_moe"),
        "GAN": load_generator(os.path.join(gan_dir, "best.pt"), "gan_text"),
    }
    vocab = generators["MLE"][1]
    cfg = gan.parse_args(
        common + ["--eval_samples", str(args.samples), "--eval_iters", str(args.eval_iters), "--device", "cpu"]
    )
    tok = gan.CharTokenizer(vocab)
    loader = gan.DataLoader(torch.tensor(tok.encode(gan.load_text(cfg)), dtype=torch.long), cfg, torch.device("cpu"))
    refs, real = gan.held_out(loader, tok, cfg)
    train_real = loader.get_text("train", args.samples, torch.Generator().manual_seed(args.seed))
    target = gan.text_metrics([tok.decode(row) for row in train_real.tolist()], refs)
    target["distinct"] = args.samples
    rows, texts = [("real text (train split)", "-", None, target)], {}
    for name, (model, _) in generators.items():
        nll = gan.estimate_loss(model, loader, cfg, nullcontext())["val"]
        for temp in args.temperatures:
            m, texts[name, temp] = measure(model, real, refs, tok, cfg, temp, args.seed)
            rows.append((name, temp, nll, m))
            print(f"  {name} T={temp}: BLEU-4 {m['bleu4']:.3f} self-BLEU-4 {m['self_bleu4']:.3f}", flush=True)
    noise, _ = measure(generators["MLE"][0], real, refs, tok, cfg, 1.0, args.seed + 100)
    for name, (model, _) in generators.items():  # self-BLEU-2 for the second panel
        for temp in args.temperatures:
            next(r for r in rows if r[0] == name and r[1] == temp)[3]["self_bleu2"] = gan.self_bleu(
                [gan.words(t) for t in texts[name, temp]], 2
            )
    target["self_bleu2"] = gan.self_bleu([gan.words(tok.decode(row)) for row in train_real.tolist()], 2)
    t_eval = time.time() - t0

    print(
        f"\n{args.samples} samples of 64 characters per row; NLL: val cross-entropy per character over "
        f"{args.eval_iters} batches"
    )
    print("| generator | temperature | NLL | BLEU-2 | BLEU-3 | BLEU-4 | self-BLEU-4 | self-BLEU-2 | distinct samples |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, temp, nll, m in rows:
        scores = " | ".join(f"{m[k]:.3f}" for k in ("bleu2", "bleu3", "bleu4", "self_bleu4", "self_bleu2"))
        print(
            f"| {name} | {temp} | {'-' if nll is None else f'{nll:.4f}'} | {scores} | {m['distinct']}/{args.samples} |"
        )
    base = next(r[3] for r in rows if r[0] == "MLE" and r[1] == 1.0) if 1.0 in args.temperatures else None
    if base:
        diffs = ", ".join(
            f"{label} {noise[k]:.3f} ({noise[k] - base[k]:+.3f})"
            for label, k in (("BLEU-2", "bleu2"), ("BLEU-4", "bleu4"), ("self-BLEU-4", "self_bleu4"))
        )
        print(f"sampling noise: MLE at T=1 with another seed: {diffs}")

    evals = [r for r in read_log(gan_dir) if r["phase"] != "mle" and r["bleu4"]]
    gan_cfg = torch.load(os.path.join(gan_dir, "ckpt.pt"), weights_only=True)["config"]
    print(
        f"\nDiscriminator and generator over the GAN's phases (gan_text.py's evaluations: {gan_cfg['eval_samples']} "
        "samples at temperature 1)"
    )
    print("| phase | step | D accuracy real | D accuracy fake | NLL val | BLEU-4 | self-BLEU-4 |")
    print("|---|---|---|---|---|---|---|")
    for r in evals:
        accuracy = f"{100 * float(r['d_acc_real']):.1f}% | {100 * float(r['d_acc_fake']):.1f}%"
        print(
            f"| {r['phase']} | {r['iter']} | {accuracy} | {r['val_loss']} | {float(r['bleu4']):.3f} | "
            f"{float(r['self_bleu4']):.3f} |"
        )

    # 4: the picture and the verdict
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, n in zip(axes, (4, 2)):
        for name, style in (("MLE", "o-"), ("GAN", "s--")):
            pts = [(r[3][f"self_bleu{n}"], r[3][f"bleu{n}"], r[1]) for r in rows if r[0] == name]
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                style,
                label=f"{name} generator, temperatures {args.temperatures[0]}-{args.temperatures[-1]}",
            )
            for x, y, temp in pts:
                ax.annotate(f"{temp:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.plot([target[f"self_bleu{n}"]], [target[f"bleu{n}"]], "k*", markersize=12, label="real text")
        ax.set_xlabel(f"self-BLEU-{n} (lower: more diverse)")
        ax.set_ylabel(f"BLEU-{n} against held-out text (higher: better)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    corpus = os.path.basename(args.data) if args.data else "TinyShakespeare"
    fig.suptitle(
        f"{corpus}, {args.samples} samples of 64 characters: MLE generator vs after {gan_cfg['adv_rounds']} "
        "adversarial rounds"
    )
    fig.tight_layout()
    png = os.path.join(OUT if args.quick else PICTURES, "gan_quality_diversity.png")  # a quick run keeps the README's
    fig.savefig(png, dpi=120)
    print(f"\npicture: {png}")

    gan_point = next((r[3] for r in rows if r[0] == "GAN" and r[1] == 1.0), None)
    if gan_point:
        mle_curve = [(r[3]["self_bleu4"], r[3]["bleu4"]) for r in rows if r[0] == "MLE"]
        at = interpolate(mle_curve, gan_point["self_bleu4"])
        if at is None:
            print(
                f"verdict: the GAN at T=1 (self-BLEU-4 {gan_point['self_bleu4']:.3f}) lies outside the MLE curve's "
                "range of self-BLEU-4: widen --temperatures"
            )
        else:
            margin, spread = gan_point["bleu4"] - at, abs(noise["bleu4"] - base["bleu4"]) if base else 0.0
            winner = "the GAN" if margin > 0 else "the temperature-tuned MLE generator"
            verdict = (
                f"{winner} wins by {abs(margin):.3f}"
                if abs(margin) > spread
                else f"no winner: the difference, {margin:+.3f}, is within the sampling noise"
            )
            print(
                f"verdict: at the GAN's diversity (self-BLEU-4 {gan_point['self_bleu4']:.3f}) "
                f"the MLE curve reaches BLEU-4 {at:.3f}, "
                f"the GAN {gan_point['bleu4']:.3f}: {verdict} (sampling noise {spread:.3f}, from a second seed)"
            )
    collapsed = [
        f"{name} T={temp}"
        for name, temp, _, m in rows
        if name != "real text (train split)" and m["distinct"] < args.samples // 2
    ]
    print(f"collapse (fewer than half the samples distinct): {', '.join(collapsed) if collapsed else 'none'}")
    print(f"time: MLE {t_mle / 60:.1f} min, GAN {t_gan / 60:.1f} min, evaluation {t_eval / 60:.1f} min")


if __name__ == "__main__":
    main()
