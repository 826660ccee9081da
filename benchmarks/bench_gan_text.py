"""
bench_gan_text.py: does adversarial training (gan_text.py) beat the MLE generator it starts from on the
quality-diversity trade-off, or does a temperature-tuned MLE model win, as Caccia et al. (ICLR 2020, "Language GANs
falling short") found?

    python benchmarks/bench_gan_text.py              the full run on TinyShakespeare: about 20-25 minutes on 2 CPU cores
                                                (estimated from short runs on a shared machine, not timed end to end:
                                                MLE about 4 minutes; the GAN's 200 D steps at ~0.5 s, 150 rounds at
                                                ~2.7 s and 15 evaluations at ~12 s, about 12; evaluation 1-2)
    python benchmarks/bench_gan_text.py --quick      a check of the pipeline in under a minute (numbers meaningless)
    python benchmarks/bench_gan_text.py --rollouts 1 -- --gan_batch_size 16    one more GAN run, with SeqGAN's per-token
                                                rewards from 1 rollout per prefix, beside the other two (about 4 s more
                                                per round at this batch); flags after -- go to both GAN runs
    python benchmarks/bench_gan_text.py oracle       SeqGAN's synthetic-data yardstick (gan_text.py --oracle), below

Steps, each a fresh process as a user would run it, with its output under out/bench_gan_text/:
  1. The MLE generator: python switchhead_moe.py --block_size 64 (its defaults otherwise: 2 heads x 4 experts,
     4 layers of 128, 2000 iterations), into out/bench_gan_text/mle.
  2. The GAN: python gan_text.py --init_from out/bench_gan_text/mle/best.pt (its defaults: D pre-trained 200 steps,
     150 rounds of 1 generator and 3 discriminator steps, batches of 64 sequences of 64 characters, sequence-level
     rewards), into out/bench_gan_text/gan. Its log.csv gives D's accuracy and the metrics over the rounds.
  3. Here, in this process: both generators measured the same way. NLL: the mean cross-entropy per character on
     --eval_iters held-out batches (the same batches for both). Samples: --samples sequences of 64 characters,
     each started from the first character of a held-out sequence at a fixed offset, the same first characters and
     the same random seed for every row. BLEU-2/3/4 (word level, smoothed) of the samples against the held-out text
     cut into 64-character pieces, and self-BLEU-4 of the samples (diversity: lower is more diverse), all with
     gan_text.py's own functions. Each generator is sampled at every --temperatures value; temperature 1 is the
     distribution the GAN trained. Real text (train-split sequences, scored the same way) marks the target.
     The sampling noise is shown by scoring the MLE generator at temperature 1 with a second seed.
  4. A picture, benchmarks/pictures/gan_quality_diversity.png (with --rollouts gan_quality_diversity_rollouts.png):
     BLEU-4 and BLEU-2 against self-BLEU, one curve per generator over the temperatures, real text as a star. The
     verdict compares each GAN at temperature 1 with the MLE curve at the same self-BLEU-4 (linear interpolation
     between temperatures): the higher BLEU-4 wins.
It prints markdown tables for RESULTS.md.

The oracle part (python benchmarks/bench_gan_text.py oracle [--rollouts N]) asks the same question where quality can be
measured exactly. gan_text.py --oracle: SeqGAN's oracle (an LSTM of 32 with N(0, 1) parameters, vocabulary 5,000) is
the true distribution; 10,000 sequences of 20 tokens sampled from it are the training data. For each --seeds value a
fresh process trains the generator by MLE (--mle_iters), pre-trains D, runs the adversarial rounds, and evaluates along
the way NLL-oracle (the oracle's NLL per token of --samples fresh samples at temperature 1: quality) and the generator's
NLL on held-out oracle samples (coverage). The generator is smaller than the default (2 layers of 64, SwitchHead with 2
heads x 4 experts); every phase uses batches of 64 sequences (SeqGAN's), and the rounds the generator learning rate
--adv_learning_rate 1e-4, where the MLE schedule ends. It prints the table beside SeqGAN's (Yu et al. 2017, Table 1:
NLL-oracle of a random generator 10.310, MLE 9.038, SeqGAN 8.736) and draws benchmarks/pictures/gan_oracle.png.
--rollouts N adds one run of the first seed with SeqGAN's per-token rewards.
"""

import argparse
import math
import os
import sys
import time
from contextlib import nullcontext

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import gan_text as gan  # noqa: E402  (importing it trains nothing)
from common import PICTURES, machine, read_log, run, table  # noqa: E402

OUT = os.path.join(ROOT, "out", "bench_gan_text")


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
    parser.add_argument("part", nargs="?", default="quality", choices=["quality", "oracle"])
    parser.add_argument(
        "--mle_iters", type=int, default=None, help="MLE iterations of the generator (quality 2000, oracle 1000)"
    )
    parser.add_argument("--d_pretrain_iters", type=int, default=None, help="D pre-training steps (200; oracle 50)")
    parser.add_argument("--adv_rounds", type=int, default=150)
    parser.add_argument("--rollouts", type=int, default=0, help="one more GAN run with this many rollouts per prefix")
    parser.add_argument("--samples", type=int, default=None, help="samples per generator and temperature (256), or "
                        "per NLL-oracle evaluation (oracle: 1000)")  # fmt: skip
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2])
    parser.add_argument("--eval_iters", type=int, default=None, help="held-out batches for the NLL (200; oracle 20)")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1337, 1338, 1339], help="oracle: one run each")
    parser.add_argument("--adv_learning_rate", type=float, default=1e-4, help="oracle: the generator's in the rounds")
    parser.add_argument(
        "--eval_interval", type=int, default=100, help="oracle: evaluate every this many MLE iterations"
    )
    parser.add_argument("--adv_eval_interval", type=int, default=10, help="oracle: evaluate every this many rounds")
    parser.add_argument("--data", default="", help="a local text file instead of TinyShakespeare")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--quick", action="store_true", help="tiny runs: 20 MLE iterations, 2 D steps, 3 rounds, 32 samples"
    )
    parser.add_argument("--reuse", action="store_true", help="oracle: read the runs out/bench_gan_text already holds")
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)  # after --: gan_text.py's flags, never the part's name
    args, extra = parser.parse_known_args(argv[:cut])
    extra += argv[cut + 1 :]
    print(
        f"torch threads: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, {os.cpu_count()} cores",
        flush=True,
    )
    print(f"machine: {machine()}", flush=True)
    oracle(args, extra) if args.part == "oracle" else quality(args, extra)


def quality(args, extra):
    """The char comparison: MLE, the GAN (and with --rollouts a second GAN), sampled at every temperature."""
    args.mle_iters = 2000 if args.mle_iters is None else args.mle_iters
    args.d_pretrain_iters = 200 if args.d_pretrain_iters is None else args.d_pretrain_iters
    args.samples, args.eval_iters = args.samples or 256, args.eval_iters or 200
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

    # 1 and 2: the training runs
    mle_dir, gan_dir, rollouts_dir = (os.path.join(OUT, d) for d in ("mle", "gan", "gan_rollouts"))
    os.makedirs(mle_dir, exist_ok=True)
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
    gan_runs = {"GAN": (gan_dir, [])}
    if args.rollouts:
        gan_runs[f"GAN, {args.rollouts} rollouts"] = (rollouts_dir, ["--rollouts", str(args.rollouts)])
    t_gan = {}
    for name, (out_dir, flags) in gan_runs.items():
        os.makedirs(out_dir, exist_ok=True)
        cmd = [sys.executable, os.path.join(ROOT, "gan_text.py"), *common, *gan_flags, *extra, *flags, "--init_from",
               os.path.join(mle_dir, "best.pt"), "--out_dir", out_dir, "--overwrite"]  # fmt: skip
        print(f"{name}: {' '.join(cmd[1:])}", flush=True)
        _, t_gan[name], _ = run(cmd, log_path=os.path.join(out_dir, "stdout.txt"))
        print(f"  {t_gan[name] / 60:.1f} min", flush=True)

    # 3: every generator, measured the same way
    t0 = time.time()
    generators = {"MLE": load_generator(os.path.join(mle_dir, "best.pt"), "switchhead_moe")}
    for name, (out_dir, _) in gan_runs.items():
        generators[name] = load_generator(os.path.join(out_dir, "best.pt"), "gan_text")
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

    gan_cfg = torch.load(os.path.join(gan_dir, "ckpt.pt"), weights_only=True)["config"]
    for name, (out_dir, _) in gan_runs.items():
        evals = [r for r in read_log(out_dir) if r["phase"] != "mle" and r["bleu4"]]
        print(
            f"\nDiscriminator and generator over the phases of {name} (gan_text.py's evaluations: "
            f"{gan_cfg['eval_samples']} samples at temperature 1)"
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
        for name, style in zip(generators, ("o-", "s--", "^:")):
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
    name = "gan_quality_diversity_rollouts.png" if args.rollouts else "gan_quality_diversity.png"
    png = os.path.join(OUT if args.quick else PICTURES, name)  # a quick run keeps the README's
    fig.savefig(png, dpi=120)
    print(f"\npicture: {png}")

    for name in gan_runs:
        gan_point = next((r[3] for r in rows if r[0] == name and r[1] == 1.0), None)
        if not gan_point:
            continue
        mle_curve = [(r[3]["self_bleu4"], r[3]["bleu4"]) for r in rows if r[0] == "MLE"]
        at = interpolate(mle_curve, gan_point["self_bleu4"])
        if at is None:
            print(
                f"verdict ({name}): at T=1 (self-BLEU-4 {gan_point['self_bleu4']:.3f}) it lies outside the MLE "
                "curve's range of self-BLEU-4: widen --temperatures"
            )
        else:
            margin, spread = gan_point["bleu4"] - at, abs(noise["bleu4"] - base["bleu4"]) if base else 0.0
            winner = name if margin > 0 else "the temperature-tuned MLE generator"
            verdict = (
                f"{winner} wins by {abs(margin):.3f}"
                if abs(margin) > spread
                else f"no winner: the difference, {margin:+.3f}, is within the sampling noise"
            )
            print(
                f"verdict ({name}): at its diversity (self-BLEU-4 {gan_point['self_bleu4']:.3f}) "
                f"the MLE curve reaches BLEU-4 {at:.3f}, "
                f"{name} {gan_point['bleu4']:.3f}: {verdict} (sampling noise {spread:.3f}, from a second seed)"
            )
    collapsed = [
        f"{name} T={temp}"
        for name, temp, _, m in rows
        if name != "real text (train split)" and m["distinct"] < args.samples // 2
    ]
    print(f"collapse (fewer than half the samples distinct): {', '.join(collapsed) if collapsed else 'none'}")
    times = ", ".join(f"{name} {t / 60:.1f} min" for name, t in t_gan.items())
    print(f"time: MLE {t_mle / 60:.1f} min, {times}, evaluation {t_eval / 60:.1f} min")


PAPER = {"random": 10.310, "MLE": 9.038, "SeqGAN": 8.736}  # NLL-oracle, Yu et al. 2017, Table 1 (their oracle)


def oracle_curves(rows, phase):
    """(step, NLL-oracle, held-out NLL) at every evaluation of phase in a run's log.csv."""
    return [(int(r["iter"]), float(r["nll_oracle"]), float(r["val_loss"])) for r in rows
            if r["phase"] == phase and r["nll_oracle"]]  # fmt: skip


def seed_spread(values):
    """mean ± sample standard deviation, and the range."""
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return mean, std, max(values) - min(values)


def oracle(args, extra):
    """gan_text.py --oracle for every seed: NLL-oracle and held-out NLL through MLE and the adversarial rounds."""
    mle_iters = 1000 if args.mle_iters is None else args.mle_iters
    d_iters = 50 if args.d_pretrain_iters is None else args.d_pretrain_iters
    samples, eval_iters = args.samples or 1000, args.eval_iters or 20
    flags = ["--oracle", "--seq_len", "20", "--block_size", "20", "--n_layer", "2", "--n_embd", "64",
             "--batch_size", "64", "--gan_batch_size", "64", "--max_iters", str(mle_iters), "--warmup_iters", "50",
             "--eval_interval", str(args.eval_interval), "--eval_iters", str(eval_iters), "--eval_samples",
             str(samples), "--d_pretrain_iters", str(d_iters), "--adv_rounds", str(args.adv_rounds),
             "--adv_eval_interval", str(args.adv_eval_interval), "--adv_learning_rate", str(args.adv_learning_rate),
             "--log_interval", "50", "--max_new_tokens", "0", "--device", args.device]  # fmt: skip
    if args.quick:
        flags += ["--oracle_vocab", "500", "--oracle_train", "500", "--max_iters", "20", "--eval_interval", "10",
                  "--eval_iters", "2", "--eval_samples", "64", "--d_pretrain_iters", "2", "--adv_rounds", "4",
                  "--adv_eval_interval", "2"]  # fmt: skip
    runs = {f"seed {seed}": (seed, []) for seed in args.seeds}
    if args.rollouts:
        runs[f"seed {args.seeds[0]}, {args.rollouts} rollouts"] = (args.seeds[0], ["--rollouts", str(args.rollouts)])
    logs, times = {}, {}
    for name, (seed, more) in runs.items():
        out_dir = os.path.join(OUT, "oracle_" + name.replace(" ", "").replace(",", "_"))
        cmd = [sys.executable, os.path.join(ROOT, "gan_text.py"), *flags, *extra, *more, "--seed", str(seed),
               "--out_dir", out_dir, "--overwrite"]  # fmt: skip
        print(f"{name}: {' '.join(cmd[1:])}", flush=True)
        os.makedirs(out_dir, exist_ok=True)
        if args.reuse and os.path.isfile(os.path.join(out_dir, "stdout.txt")):  # a finished run: read its log again
            print("  reused", flush=True)
        else:
            _, times[name], _ = run(cmd, log_path=os.path.join(out_dir, "stdout.txt"))
            print(f"  {times[name] / 60:.1f} min", flush=True)
        logs[name] = read_log(out_dir)
    cfg = torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=True)["config"]

    # the oracle's own numbers: its entropy (NLL-oracle of its held-out samples), and a uniform generator's
    cfg_oracle = gan.Config(**{k: v for k, v in cfg.items() if k in gan.Config.__dataclass_fields__})
    data = gan.OracleData(gan.Oracle(cfg_oracle), cfg_oracle, torch.device("cpu"))
    entropy = data.oracle.nll(data.splits["val"])
    n = cfg["eval_samples"]
    uniform = torch.cat((torch.zeros(n, 1, dtype=torch.long),
                         torch.randint(cfg["oracle_vocab"], (n, cfg["seq_len"]),
                                       generator=torch.Generator().manual_seed(0))), dim=1)  # fmt: skip
    uniform_nll = data.oracle.nll(uniform)
    log_v = math.log(cfg["oracle_vocab"])

    # the table: per run, then mean ± std over the seeds, beside the paper
    points = {}
    for name, rows in logs.items():
        mle, adv = oracle_curves(rows, "mle"), oracle_curves(rows, "adversarial")
        points[name] = {"random": mle[0], "MLE": mle[-1], "adversarial": adv[-1] if adv else mle[-1],
                        "best": min(adv, key=lambda p: p[1]) if adv else mle[-1]}  # fmt: skip
    print(f"\nNLL per token in nats; NLL-oracle of {cfg['eval_samples']} fresh samples at temperature 1 from the start "
          f"token; held-out NLL over {cfg['eval_iters']} batches of {cfg['batch_size']} held-out oracle sequences; "
          f"machine: {machine()}")  # fmt: skip
    header = ["run", "random: NLL-oracle", "held-out NLL", f"MLE ({cfg['max_iters']} it.): NLL-oracle",
              "held-out NLL", f"adversarial ({cfg['adv_rounds']} rounds): NLL-oracle", "held-out NLL",
              "best round: NLL-oracle", "change in NLL-oracle", "change in held-out NLL"]  # fmt: skip
    rows = []
    for name, p in points.items():
        rows.append([name, *(f"{p[k][i]:.3f}" for k in ("random", "MLE", "adversarial") for i in (1, 2)),
                     f"{p['best'][1]:.3f} (round {p['best'][0]})", f"{p['adversarial'][1] - p['MLE'][1]:+.3f}",
                     f"{p['adversarial'][2] - p['MLE'][2]:+.3f}"])  # fmt: skip
    seeds = [points[f"seed {s}"] for s in args.seeds]

    def stat(values, sign=""):
        mean, std, _ = seed_spread(values)
        return f"{mean:{sign}.3f} ± {std:.3f}"

    rows.append([f"mean ± std over {len(seeds)} seeds",
                 *(stat([p[k][i] for p in seeds]) for k in ("random", "MLE", "adversarial") for i in (1, 2)),
                 stat([p["best"][1] for p in seeds]), stat([p["adversarial"][1] - p["MLE"][1] for p in seeds], "+"),
                 stat([p["adversarial"][2] - p["MLE"][2] for p in seeds], "+")])  # fmt: skip
    rows.append(["SeqGAN paper (its oracle)", f"{PAPER['random']:.3f}", "-", f"{PAPER['MLE']:.3f}", "-",
                 f"{PAPER['SeqGAN']:.3f}", "-", "-", f"{PAPER['SeqGAN'] - PAPER['MLE']:+.3f}", "-"])  # fmt: skip
    table(header, rows)
    print(f"the oracle (seed {cfg['oracle_seed']}): NLL-oracle of its own held-out samples (its entropy per token, "
          f"also the lowest held-out NLL a generator can reach) {entropy:.3f}; uniform tokens: NLL-oracle "
          f"{uniform_nll:.3f}, held-out NLL log V = {log_v:.3f}")  # fmt: skip

    # the verdict: the adversarial change against the spread of the MLE generators over seeds
    change = seed_spread([p["adversarial"][1] - p["MLE"][1] for p in seeds])
    _, mle_std, mle_range = seed_spread([p["MLE"][1] for p in seeds])
    cost = seed_spread([p["adversarial"][2] - p["MLE"][2] for p in seeds])
    beyond = change[0] < 0 and abs(change[0]) > mle_range and all(p["adversarial"][1] < p["MLE"][1] for p in seeds)
    print(f"verdict: the adversarial rounds change NLL-oracle by {change[0]:+.3f} ± {change[1]:.3f} (mean ± std over "
          f"seeds); the MLE generators' NLL-oracle spreads over {mle_range:.3f} (std {mle_std:.3f}): "
          + ("an improvement beyond the seed spread" if beyond else "no improvement beyond the seed spread")
          + f"; held-out NLL changes by {cost[0]:+.3f} ± {cost[1]:.3f}")  # fmt: skip

    # the picture: both numbers through MLE and the adversarial rounds, one line per run
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7), gridspec_kw={"width_ratios": [3, 2]})
    for (name, rows_), style in zip(logs.items(), ("o-", "s-", "^-", "v--", "d--")):
        for col, phase in enumerate(("mle", "adversarial")):
            curve = oracle_curves(rows_, phase)
            if phase == "adversarial":  # round 0: the generator at the end of MLE
                curve = [(0, *points[name]["MLE"][1:])] + curve
            for row in (0, 1):
                axes[row, col].plot([c[0] for c in curve], [c[row + 1] for c in curve], style, markersize=3,
                                    label=name)  # fmt: skip
    for col in (0, 1):
        axes[1, col].set_xlabel(("MLE iteration", "adversarial round")[col])
    axes[0, 0].set_ylabel("NLL-oracle (quality; lower: better)")
    axes[1, 0].set_ylabel("held-out NLL (coverage; lower: better)")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    axes[0, 1].legend(fontsize=8)
    fig.suptitle(f"SeqGAN's oracle (vocabulary {cfg['oracle_vocab']}, LSTM of {cfg['oracle_embd']}, sequences of "
                 f"{cfg['seq_len']}): the generator through MLE, then adversarial training\nthe oracle's entropy, "
                 f"the floor of both curves: {entropy:.2f} nats per token", fontsize=10)  # fmt: skip
    fig.tight_layout()
    png = os.path.join(OUT if args.quick else PICTURES, "gan_oracle.png")
    fig.savefig(png, dpi=120)
    print(f"\npicture: {png}")
    print("time: " + ", ".join(f"{name} {t / 60:.1f} min" for name, t in times.items()))


if __name__ == "__main__":
    main()
