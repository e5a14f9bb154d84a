""""Decaying learning rate spikes center loss" on real data: does the center loss rise after an LR decay, and why?

Data: the `animal-mnist` package (10,000 28x28 animal silhouettes, 10
classes, MIT licence; `pip install animal-mnist --no-deps`), read from the
installed package, padded to 32x32; 2,400 training images with 20% of their
labels flipped to another class, 1,000 clean validation images.
Model: an ImageNet-style ResNet-18 layout (two basic blocks per stage) at
base width 32, i.e. 256-d features (ResNet-18 proper is width 64, 512-d:
`--width 64`); ReLU or PReLU. Training as in the seed: SGD lr 0.05,
momentum 0.9, weight decay 5e-4, batch 64, cross-entropy + 0.01 * center
loss (alpha 0.5, the report's PyTorch CenterLoss), 24 epochs with LR x0.5
after epoch 8 and x0.1 after epoch 16, no augmentation.

Each run logs per epoch the running train center loss (what the seed
plotted), the validation center loss, and, on 1,000 training images in eval
mode with the epoch-end centers, the exact split of the center loss into
within-class scatter W and the centers' lag G, the feature scale
S = mean ||x||^2, L/S, the share of S in the common mean, and dead units.
The analysis compares the rise after each decay with the same statistic at
control epochs without a decay (see `ratios`).

Usage (each call adds its runs to runs.csv in --out, replacing runs with the
same framework/variant/noise/aug/width/seed, then re-analyzes all of them):
    python reproductions/center_loss_lr_decay.py   # default: relu, prelu,
        # l2norm x seeds 0,1,2, PyTorch, 1 thread: 9 runs, ~8 min
    python reproductions/center_loss_lr_decay.py --quick --out /tmp/q  # < 60 s
    python reproductions/center_loss_lr_decay.py --variants relu,prelu \\
        --seeds 0,1,2,3,4
    python reproductions/center_loss_lr_decay.py --variants relu,prelu \\
        --noise 0,0.2 --aug 0,1 --seeds 0,1,2
    python reproductions/center_loss_lr_decay.py --framework keras \\
        --variants relu,prelu,l2norm
    python reproductions/center_loss_lr_decay.py --full   # report scale, GPU

Outputs in --out: runs.csv (one row per run and epoch), ratios.csv (per run),
summary.csv (per set-up: mean, sd over seeds, rises k of n),
center_loss_lr_decay.png and mechanism.png.
"""

import argparse
import functools
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

from support import center_loss_torch as T  # noqa: E402
from support.center_loss_statistics import (  # noqa: E402
    analyze, read_runs, run_key, write_runs)

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "results", "center_loss_lr_decay")


# ----------------------------------------------------------------------------
# figures
# ----------------------------------------------------------------------------
def plot_main(out, framework="torch", width=None, noise="0.2", aug="0"):
    """relu vs prelu (and l2norm) at one set-up: every seed thin, mean thick."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = read_runs(os.path.join(out, "runs.csv"))
    if width is None:
        widths = sorted({k[4] for k in runs if k[0] == framework}, key=int)
        width = widths[0] if widths else "32"
    chosen = {}
    for k, rows in runs.items():
        if k[0] == framework and k[2] == noise and k[3] == aug \
                and k[4] == width:
            chosen.setdefault(k[1], []).append((k[5], rows))
    if not chosen:
        return None
    panels = [
        ("rel_d2", "train center loss / its value at the LR x0.1 decay\n"
                   "(l2norm: center loss on unit features)"),
        ("train_center", "train center loss (running, as the seed logs)"),
        ("val_center", "validation center loss"),
        ("train_ce", "train cross-entropy (running, noisy labels)"),
        ("tr_raw_sq", "feature scale  mean ||x||^2  (train)"),
        ("tr_rel", "center loss / mean ||x||^2  (train)"),
        ("tr_within", "within-class scatter W  (train)"),
        ("tr_lag", "centers' lag G = 1/2 sum p_j ||m_j - c_j||^2"),
        ("tr_mean_sq", "share of ||x||^2 in the common mean"),
    ]
    colors = {"relu": "tab:red", "prelu": "tab:blue", "l2norm": "tab:green",
              "prelu_last": "tab:purple", "alpha_sched": "tab:orange",
              "no_bn_wd": "tab:brown"}
    shown = [v for v in ("relu", "prelu") if v in chosen] or list(chosen)
    fig, axes = plt.subplots(3, 3, figsize=(17, 13))
    any_rows = next(iter(chosen.values()))[0][1]
    epochs = len(any_rows)
    d1, d2 = T.decay_epochs(epochs)
    for ax, (q, title) in zip(axes.flat, panels):
        for v in (shown + [x for x in ("l2norm",) if x in chosen]
                  if q == "rel_d2" else shown):
            if q == "rel_d2":
                curves = np.array([[r["train_center"] / rows[d2 - 1][
                    "train_center"] for r in rows] for _, rows in chosen[v]])
            else:
                curves = np.array([[r[q] for r in rows]
                                   for _, rows in chosen[v]])
            ep = np.arange(1, curves.shape[1] + 1)
            for c in curves:
                ax.plot(ep, c, color=colors.get(v, "k"), lw=0.7, alpha=0.35)
            ax.plot(ep, curves.mean(0), color=colors.get(v, "k"), lw=2.2,
                    label=f"{v.upper() if v != 'l2norm' else v} "
                          f"(mean of {len(curves)} seeds)")
        for d, txt in ((d1, "LR x0.5"), (d2, "LR x0.1")):
            ax.axvline(d + 0.5, color="k", ls=":", lw=1)
            ax.text(d + 0.7, 0.97, txt, transform=ax.get_xaxis_transform(),
                    va="top", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        if q in ("train_center", "val_center", "tr_raw_sq", "tr_lag",
                 "tr_within"):
            ax.set_yscale("log")
            lo = min(np.nanmin([r[q] for _, rows in chosen[v]
                                for r in rows[3:]]) for v in shown)
            hi = max(np.nanmax([r[q] for _, rows in chosen[v]
                                for r in rows[3:]]) for v in shown)
            ax.set_ylim(lo / 1.2, hi * 1.2)  # the first epochs are far off
        if q == "rel_d2":
            ax.axhline(1.0, color="k", lw=0.8)
            ax.set_ylim(0.7, 1.5)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=9)
    fig.suptitle(
        f"Center loss around LR decays, ReLU vs PReLU ({framework}; "
        f"animal-mnist, 2,400 train images, label noise {noise}, "
        f"{'with' if aug == '1' else 'no'} augmentation;\nResNet-18 layout, "
        f"width {width} = {8 * int(width)}-d features; SGD lr 0.05, x0.5 "
        "after epoch 8, x0.1 after epoch 16; center loss lambda 0.01, "
        "alpha 0.5; thin lines: single seeds)", fontsize=12)
    fig.tight_layout()
    path = os.path.join(out, "center_loss_lr_decay.png")
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_mechanism(out, summary):
    """End-of-last-phase ratios per set-up: center loss, scale, L/S."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {}
    for s in summary:
        name = (f"{s['framework']} {s['variant']}\nnoise {s['noise']}"
                f"{' aug' if s['aug'] == '1' else ''} w{s['width']}")
        by.setdefault(name, {})[s["quantity"]] = s
    names = list(by)
    if not names:
        return None
    quantities = [("train_center", "center loss (running)"),
                  ("tr_raw_sq", "mean ||x||^2"),
                  ("tr_within", "within-class scatter W"),
                  ("tr_rel", "center loss / ||x||^2")]
    fig, ax = plt.subplots(figsize=(max(10, 1.3 * len(names)), 6))
    width = 0.8 / len(quantities)
    for i, (q, label) in enumerate(quantities):
        m = [by[n][q]["end3_mean"] if q in by[n] else np.nan for n in names]
        lo = [by[n][q]["end3_mean"] - by[n][q]["end3_min"] if q in by[n]
              else 0 for n in names]
        hi = [by[n][q]["end3_max"] - by[n][q]["end3_mean"] if q in by[n]
              else 0 for n in names]
        ax.bar(np.arange(len(names)) + (i - 1.5) * width, m, width,
               yerr=[lo, hi], capsize=2, label=label)
    ax.axhline(1.0, color="k", lw=1)
    ax.set_xticks(np.arange(len(names)))
    ax.set_xticklabels([f"{n}\n(n={by[n]['train_center']['n']})"
                        for n in names], fontsize=8)
    ax.set_ylabel("value at the last epoch / value at the 2nd LR decay\n"
                  "(bar: mean over seeds; whiskers: min..max)")
    ax.set_title("What changes over the last phase (after LR x0.1): "
                 "> 1 = rose, < 1 = fell  (l2norm: center loss on unit "
                 "features; its mean ||x||^2 is of the raw features)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = os.path.join(out, "mechanism.png")
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------
def _floats(s):
    return [float(x) for x in str(s).split(",") if x != ""]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--framework", default="torch",
                   choices=["torch", "keras", "both"],
                   help="PyTorch with the report's CenterLoss, Keras "
                        "(keras_batchfix.CenterLoss on KERAS_BACKEND), or "
                        "both (--quick: both)")
    p.add_argument("--variants", default="relu,prelu,l2norm",
                   help=f"comma list from {T.VARIANTS}")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--noise", default="0.2", help="label-noise list")
    p.add_argument("--aug", default="0", help="augmentation list: 0,1")
    p.add_argument("--epochs", type=int, default=24)
    p.add_argument("--width", type=int, default=32,
                   help="ResNet base width; features 8 * width")
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--n-train", type=int, default=2400)
    p.add_argument("--threads", type=int, default=1,
                   help="torch/TF threads (1: the committed numbers exactly)")
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--quick", action="store_true",
                   help="smoke run for the tests: width 8, 1 block per stage, "
                        "600 images, 6 epochs, relu, prelu, l2norm, PyTorch "
                        "and Keras (< 60 s)")
    p.add_argument("--full", action="store_true",
                   help="the report's scale: ResNet-18 (width 64, 512-d), "
                        "60 epochs, all 9,000 training images; on a GPU")
    p.add_argument("--analyze-only", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.width, args.blocks, args.n_train, args.epochs = 8, 1, 600, 6
        if args.variants == p.get_default("variants"):
            args.variants = "relu,prelu,l2norm"
        if args.framework == p.get_default("framework"):
            args.framework = "both"
        if args.seeds == p.get_default("seeds"):
            args.seeds = "0"
    if args.full:
        args.width, args.epochs, args.n_train = 64, 60, 9000
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        if v not in T.VARIANTS:
            p.error(f"unknown variant {v!r}; choose from {T.VARIANTS}")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "runs.csv")
    new = {}
    if not args.analyze_only:
        import torch
        torch.set_num_threads(args.threads)
        frameworks = (["torch", "keras"] if args.framework == "both"
                      else [args.framework])
        fns = {}
        if "keras" in frameworks:
            from support import center_loss_keras as K
            _keras_threads(args.threads)
            fns["keras"] = K.run
        device = "cuda" if args.full and torch.cuda.is_available() else "cpu"
        fns["torch"] = functools.partial(T.run, device=device)
        t_start = time.time()
        setups = [(z, int(a), s) for z in _floats(args.noise)
                  for a in _floats(args.aug) for s in _floats(args.seeds)]
        for fw in frameworks:
            for noise, aug, seed in setups:
                data = T.load_splits(args.n_train, noise,
                                     noise_seed=int(seed))
                for v in variants:
                    if fw == "keras" and v not in K.KERAS_VARIANTS:
                        continue
                    print(f"== {fw} {v} noise {noise:g} aug {aug} width "
                          f"{args.width} seed {int(seed)} "
                          f"({time.time() - t_start:.0f} s so far)",
                          flush=True)
                    rows = fns[fw](v, epochs=args.epochs, width=args.width,
                                   blocks=args.blocks, seed=int(seed),
                                   data=data, aug=bool(aug),
                                   log=lambda s: print(s, flush=True))
                    key = run_key(fw, v, noise, aug, args.width, seed)
                    new[key] = rows
                    runs = read_runs(path)
                    runs[key] = rows
                    write_runs(path, runs)
        print(f"{len(new)} runs in {time.time() - t_start:.0f} s", flush=True)
    summary = analyze(args.out)
    figs = [plot_main(args.out), plot_mechanism(args.out, summary)]
    print("wrote " + ", ".join(os.path.join(args.out, n) for n in
                               ("runs.csv", "ratios.csv", "summary.csv"))
          + ", " + ", ".join(f for f in figs if f), flush=True)
    return new, summary


def _keras_threads(threads):
    import keras
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(threads)
        except RuntimeError:
            pass


if __name__ == "__main__":
    main()
