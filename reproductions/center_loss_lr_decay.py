"""Seed 003: does center loss peak at each learning-rate decay, and why?

A small ResNet (basic blocks with BatchNorm; ReLU or PReLU) on scikit-learn's
bundled 8x8 digits (no download), the seed's recipe scaled down: SGD lr 0.05,
momentum 0.9, weight decay 5e-4, LR x0.5 at 1/3 and x0.1 at 2/3 of the
epochs, cross-entropy + 0.01 * center loss with alpha 0.5, 60/20/20
train/validation/test split. The same experiment runs in PyTorch (the seed's
CenterLoss semantics, keras_batchfix/references/torch_center_loss.py) and in Keras
(keras_batchfix.CenterLoss), one candidate mechanism changed at a time:

    relu          the seed's set-up (baseline)
    prelu         PReLU instead of ReLU (the seed: "the problem goes away")
    alpha_sched   the center step alpha follows the LR schedule
    no_bn_wd      no weight decay on the BatchNorms that produce the features
    l2norm        center loss on L2-normalized features

Per epoch it logs train and validation cross-entropy and center loss, mean
feature norm, mean center norm, the distance of each class's mean feature to
its center, center loss / mean squared feature norm, the fraction of dead
feature units, and the peak ratio of the center loss at each decay.

Usage:
    python reproductions/center_loss_lr_decay.py            # default, < 10 min
    python reproductions/center_loss_lr_decay.py --quick    # smoke run, < 60 s
    python reproductions/center_loss_lr_decay.py --backend torch --epochs 60 \\
        --variants relu,prelu --out /tmp/cl

Outputs in --out: center_loss_lr_decay.csv (one row per framework, variant,
epoch), peaks.csv (center loss after / before each decay), and
center_loss_lr_decay.png.
"""

import argparse
import csv
import math
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from reproductions import _center_loss_torch as T  # noqa: E402

DEFAULT_OUT = os.path.join(_HERE, "results", "center_loss_lr_decay")
COLUMNS = [
    "framework", "variant", "epoch", "lr", "alpha",
    "train_ce", "train_center", "val_ce", "val_acc", "val_center",
    "eval_train_center", "eval_train_feat_norm", "val_feat_norm",
    "center_norm", "eval_train_mean_to_center", "val_mean_to_center",
    "train_batch_mean_to_center", "train_rel_center",
    "eval_train_rel_center", "val_rel_center",
    "train_dead", "eval_train_dead", "val_dead",
    "bn_gamma", "bn_beta", "fc_norm", "sec",
]


# ----------------------------------------------------------------------------
# Keras side
# ----------------------------------------------------------------------------
def run_keras(variant="relu", epochs=30, lr=0.05, momentum=0.9,
              weight_decay=5e-4, lamb=0.01, alpha=0.5, batch_size=32,
              width=16, blocks=1, num_classes=8, seed=0, data=None,
              log=print, shift=0, noise=0.0):
    """The PyTorch experiment (`_center_loss_torch.run`) written in Keras.

    Weight decay is an L2 penalty wd/2 * ||w||^2 on every weight (the
    gradient wd * w then goes through momentum, as torch.optim.SGD's
    `weight_decay`); BatchNorm momentum/epsilon and the conv/dense
    initializers are PyTorch's.
    """
    import keras
    from keras import layers

    from keras_batchfix import CenterLoss

    keras.utils.set_random_seed(seed)
    if data is None:
        data = T.load_digits_splits(num_classes, seed=0)
    act = "prelu" if variant == "prelu" else "relu"
    reg = keras.regularizers.L2(weight_decay / 2) if weight_decay else None
    torch_init = keras.initializers.VarianceScaling(1 / 3, "fan_in", "uniform")

    def conv(filters, k, stride, x):
        return layers.Conv2D(filters, k, stride, padding="same", use_bias=False,
                             kernel_initializer=torch_init,
                             kernel_regularizer=reg)(x)

    def bn(x, decay=True, name=None):
        r = reg if decay else None
        return layers.BatchNormalization(momentum=0.9, epsilon=1e-5,
                                         gamma_regularizer=r,
                                         beta_regularizer=r, name=name)(x)

    def activation(x):
        if act == "prelu":  # torch.nn.PReLU(): one slope per layer, 0.25
            return layers.PReLU(keras.initializers.Constant(0.25),
                                alpha_regularizer=reg,
                                shared_axes=[1, 2, 3])(x)
        return layers.ReLU()(x)

    images = keras.Input((8, 8, 1), name="images")
    labels = keras.Input((), dtype="int32", name="labels")
    x = activation(bn(conv(width, 3, 1, images)))
    cin = width
    n_blocks = 3 * blocks
    b = 0
    for i, cout in enumerate((width, 2 * width, 4 * width)):
        for j in range(blocks):
            b += 1
            last = b == n_blocks
            decay = not (last and variant == "no_bn_wd")
            stride = 2 if (i > 0 and j == 0) else 1
            out = activation(bn(conv(cout, 3, stride, x)))
            out = bn(conv(cout, 3, 1, out), decay,
                     "feature_bn" if last else None)
            sc = x
            if stride != 1 or cin != cout:
                sc = bn(conv(cout, 1, stride, x), decay)
            x = activation(layers.Add()([out, sc]))
            cin = cout
    feat = layers.GlobalAveragePooling2D(name="features")(x)
    cfeat = layers.UnitNormalization()(feat) if variant == "l2norm" else feat

    steps = math.ceil(len(data["train"][1]) / batch_size)
    d1, d2 = T.decay_epochs(epochs)
    # PiecewiseConstantDecay uses values[k] while step <= boundaries[k]: the
    # first step of epoch d (0-based) is iteration d * steps.
    bounds = [d1 * steps - 1, d2 * steps - 1]
    lr_sched = keras.optimizers.schedules.PiecewiseConstantDecay(
        bounds, [lr, lr * 0.5, lr * 0.1])
    if variant == "alpha_sched":
        center_alpha = keras.optimizers.schedules.PiecewiseConstantDecay(
            bounds, [alpha, alpha * 0.5, alpha * 0.1])
    else:
        center_alpha = alpha
    center = CenterLoss(num_classes, alpha=center_alpha, loss_weight=lamb,
                        name="center_loss")
    out = center([cfeat, labels])
    if variant == "l2norm":
        # the classifier sees the raw features; keep the layer in the graph
        fc_in = layers.Lambda(lambda t: t[0] + 0.0 * t[1][:, :1])([feat, out])
    else:
        fc_in = out
    logits = layers.Dense(num_classes, kernel_initializer=torch_init,
                          bias_initializer=torch_init, kernel_regularizer=reg,
                          bias_regularizer=reg, name="fc")(fc_in)
    model = keras.Model([images, labels], logits)
    model.compile(
        optimizer=keras.optimizers.SGD(lr_sched, momentum=momentum),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalCrossentropy(
            from_logits=True, name="ce")],
        jit_compile=False,  # XLA compilation costs more than it saves here
    )
    feat_model = keras.Model(images, [feat, cfeat])
    fc_layer = model.get_layer("fc")
    feat_bn = model.get_layer("feature_bn")

    xtr, ytr = data["train"]
    xva, yva = data["val"]
    xtr = np.transpose(xtr, (0, 2, 3, 1))  # NCHW -> NHWC
    xva = np.transpose(xva, (0, 2, 3, 1))
    rng = np.random.RandomState(seed)
    rows = []
    for epoch in range(epochs):
        t0 = time.time()
        f = T.lr_factor(epoch, epochs)
        x_ep = _augment_np(xtr, shift, noise, rng)
        hist = model.fit([x_ep, ytr], ytr, batch_size=batch_size, epochs=1,
                         shuffle=True, verbose=0)
        row = {"epoch": epoch + 1, "lr": lr * f,
               "alpha": alpha * (f if variant == "alpha_sched" else 1.0),
               "train_ce": hist.history["ce"][-1],
               "train_center": hist.history["center_loss_value"][-1]}
        cen = keras.ops.convert_to_numpy(center.centers)
        for split, xs, ys in (("eval_train_", xtr, ytr), ("val_", xva, yva)):
            fs, cfs = (keras.ops.convert_to_numpy(t)
                       for t in feat_model(xs, training=False))
            row.update(T.diagnostics(cfs, ys, cen, num_classes, split))
            row[split + "dead"] = float((np.abs(fs).max(0) == 0).mean())
        lva = keras.ops.convert_to_numpy(model([xva, yva], training=False))
        lva = lva - lva.max(1, keepdims=True)
        logp = lva - np.log(np.exp(lva).sum(1, keepdims=True))
        row["val_ce"] = float(-logp[np.arange(len(yva)), yva].mean())
        row["val_acc"] = float((lva.argmax(1) == yva).mean())
        row["center_norm"] = float(np.linalg.norm(cen, axis=1).mean())
        gamma = keras.ops.convert_to_numpy(feat_bn.gamma)
        row["bn_gamma"] = float(np.abs(gamma).mean())
        row["bn_beta"] = float(keras.ops.convert_to_numpy(feat_bn.beta).mean())
        row["fc_norm"] = float(np.linalg.norm(
            keras.ops.convert_to_numpy(fc_layer.kernel)))
        row["sec"] = time.time() - t0
        rows.append(row)
        log(T.format_row("keras", variant, epochs, row))
    return rows


def _augment_np(x, shift, noise, rng):
    if shift:
        b = len(x)
        xp = np.pad(x, ((0, 0), (shift, shift), (shift, shift), (0, 0)))
        dx = rng.randint(0, 2 * shift + 1, b)
        dy = rng.randint(0, 2 * shift + 1, b)
        x = np.stack([xp[i, dy[i]:dy[i] + 8, dx[i]:dx[i] + 8]
                      for i in range(b)])
    if noise:
        x = x + noise * rng.standard_normal(x.shape).astype(x.dtype)
    return x.astype(np.float32)


# ----------------------------------------------------------------------------
# analysis
# ----------------------------------------------------------------------------
def peak_ratios(rows, epochs, key="train_center", before=3, after=2):
    """For each decay: mean of `key` over the `after` epochs from the decay
    on, divided by its mean over the `before` epochs just before it.

    A peak at the decay shows as a ratio > 1 (the seed's curves);
    a loss that keeps decreasing gives a ratio < 1.
    """
    out = []
    for d in T.decay_epochs(epochs):  # d = number of epochs before the decay
        b = [r[key] for r in rows[max(0, d - before):d]]
        a = [r[key] for r in rows[d:d + after]]
        out.append(float(np.mean(a) / np.mean(b)) if a and b else float("nan"))
    return out


PEAK_KEYS = ("train_center", "val_center", "eval_train_feat_norm",
             "eval_train_rel_center", "eval_train_mean_to_center", "train_ce")


def plot(all_rows, epochs, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("train_center", "train center loss (running, train mode)", True),
        ("val_center", "validation center loss", True),
        ("train_ce", "train cross-entropy (running)", True),
        ("eval_train_feat_norm", "mean feature norm ||x|| (train set)", False),
        ("eval_train_rel_center", "center loss / mean ||x||^2 (train set)",
         True),
        ("eval_train_mean_to_center",
         "mean ||class mean - center|| (train set)", True),
        ("center_norm", "mean center norm ||c||", False),
        ("eval_train_dead", "dead feature units (fraction)", False),
    ]
    fig, axes = plt.subplots(2, 4, figsize=(20, 8.5))
    styles = {"torch": "-", "keras": "--"}
    colors = {v: c for v, c in zip(T.VARIANTS, plt.cm.tab10.colors)}
    for ax, (key, title, logy) in zip(axes.flat, panels):
        for (fw, variant), rows in all_rows.items():
            ep = [r["epoch"] for r in rows]
            ax.plot(ep, [r[key] for r in rows], styles.get(fw, "-"),
                    color=colors.get(variant), lw=1.4,
                    label=f"{fw} {variant}")
        for d in T.decay_epochs(epochs):
            ax.axvline(d + 0.5, color="k", ls=":", lw=1)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch (dotted: LR decay x0.5, x0.1)")
        if logy:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7, ncol=2)
    fig.suptitle("Seed 003 reproduction: center loss around LR decays "
                 "(digits 8x8, small ResNet; solid = PyTorch, dashed = Keras)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ----------------------------------------------------------------------------
# search for a setting that reproduces the peak (PyTorch only)
# ----------------------------------------------------------------------------
SEARCH_SETTINGS = [
    # (name, overrides of the default recipe, seeds)
    ("base", {}, (0, 1, 2)),
    ("feat512_w128", {"width": 128}, (0,)),
    ("2blocks_feat128", {"blocks": 2, "width": 32}, (0,)),
    ("epochs60", {"epochs": 60}, (0,)),
    ("classes10", {"num_classes": 10}, (0,)),
    ("batch8", {"batch_size": 8}, (0,)),
    ("wd5e-3", {"weight_decay": 5e-3}, (0,)),
    ("orthogonal_init", {"init": "orthogonal"}, (0,)),
    ("hard_aug", {"shift": 2, "noise": 1.0}, (0, 1)),
    ("hard_aug_batch8", {"shift": 2, "noise": 1.0, "batch_size": 8}, (0,)),
    # near the BatchNorm + weight-decay equilibrium of the weight norms
    # (lr * wd / (1 - momentum) * steps ~ 5 by the first decay, like a long run)
    ("wd5e-3_batch8_epochs60",
     {"weight_decay": 5e-3, "batch_size": 8, "epochs": 60}, (0,)),
]
SEARCH_KEYS = ("train_center", "val_center", "eval_train_feat_norm",
               "eval_train_rel_center", "train_ce")


def placebo_epochs(epochs):
    """Epochs half-way between the decays (and the ends): no decay there."""
    d1, d2 = T.decay_epochs(epochs)
    return [d1 // 2, (d1 + d2) // 2, (d2 + epochs) // 2]


def search(out, variants=("relu", "prelu"), settings=None, log=print):
    """Peak ratios at the decays vs. at placebo epochs, per setting/seed."""
    path = os.path.join(out, "search.csv")
    header = ["setting", "variant", "seed", "quantity", "decay1", "decay2",
              "placebo1", "placebo2", "placebo3", "final_val_acc"]
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        for name, over, seeds in settings or SEARCH_SETTINGS:
            for v in variants:
                for seed in seeds:
                    cfg = dict(epochs=30, seed=seed, variant=v)
                    cfg.update(over)
                    t0 = time.time()
                    num_classes = cfg.get("num_classes", 8)
                    rows = T.run(log=lambda s: None,
                                 data=T.load_digits_splits(num_classes), **cfg)
                    ep = cfg["epochs"]
                    for key in SEARCH_KEYS:
                        dec = peak_ratios(rows, ep, key)
                        pla = [_ratio_at(rows, e, key)
                               for e in placebo_epochs(ep)]
                        w.writerow([name, v, seed, key]
                                   + [f"{x:.4f}" for x in dec + pla]
                                   + [f"{rows[-1]['val_acc']:.4f}"])
                    fh.flush()
                    r = peak_ratios(rows, ep, "train_center")
                    rv = peak_ratios(rows, ep, "val_center")
                    log(f"[search] {name:16s} {v:6s} seed {seed}: center "
                        f"after/before decay: train {r[0]:.3f} {r[1]:.3f}, "
                        f"val {rv[0]:.3f} {rv[1]:.3f} "
                        f"({time.time() - t0:.0f} s)")
    return path


def _ratio_at(rows, d, key, before=3, after=2):
    b = [r[key] for r in rows[max(0, d - before):d]]
    a = [r[key] for r in rows[d:d + after]]
    return float(np.mean(a) / np.mean(b))


# ----------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="both",
                   choices=["torch", "keras", "both"],
                   help="framework: PyTorch (seed semantics), Keras "
                        "(keras_batchfix.CenterLoss on KERAS_BACKEND), or both")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--variants", default=",".join(T.VARIANTS))
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--quick", action="store_true",
                   help="6 epochs, variants relu,prelu, both frameworks")
    p.add_argument("--width", type=int, default=16,
                   help="ResNet base width; feature dim = 4 * width")
    p.add_argument("--blocks", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--lamb", type=float, default=0.01)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--num-classes", type=int, default=8)
    p.add_argument("--shift", type=int, default=0,
                   help="augmentation: random shift up to this many pixels")
    p.add_argument("--noise", type=float, default=0.0,
                   help="augmentation: Gaussian pixel noise (standardized)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--search", action="store_true",
                   help="PyTorch only: peak ratios at the decays vs. placebo "
                        "epochs over SEARCH_SETTINGS x relu/prelu x seeds "
                        "(writes search.csv; about 15-25 min on 2 cores)")
    args = p.parse_args(argv)
    if args.search:
        import torch
        torch.set_num_threads(args.threads)
        os.makedirs(args.out, exist_ok=True)
        path = search(args.out, log=lambda s: print(s, flush=True))
        print(f"wrote {path}")
        return None
    if args.quick:
        args.epochs = min(args.epochs, 6)
        if args.variants == ",".join(T.VARIANTS):
            args.variants = "relu,prelu"
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        if v not in T.VARIANTS:
            p.error(f"unknown variant {v!r}; choose from {T.VARIANTS}")
    frameworks = ["torch", "keras"] if args.backend == "both" else [args.backend]

    import torch
    torch.set_num_threads(args.threads)
    if "keras" in frameworks:
        import keras
        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf
            try:
                tf.config.threading.set_intra_op_parallelism_threads(
                    args.threads)
                tf.config.threading.set_inter_op_parallelism_threads(
                    args.threads)
            except RuntimeError:
                pass

    os.makedirs(args.out, exist_ok=True)
    data = T.load_digits_splits(args.num_classes, seed=0)
    cfg = dict(epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay,
               lamb=args.lamb, alpha=args.alpha, batch_size=args.batch_size,
               width=args.width, blocks=args.blocks,
               num_classes=args.num_classes, seed=args.seed, data=data,
               shift=args.shift, noise=args.noise)
    print(f"digits: {len(data['train'][1])} train / {len(data['val'][1])} val"
          f" / {len(data['test'][1])} test, {args.num_classes} classes; "
          f"feature dim {4 * args.width}; decays after epochs "
          f"{T.decay_epochs(args.epochs)}", flush=True)
    t_start = time.time()
    all_rows = {}
    for fw in frameworks:
        for v in variants:
            fn = T.run if fw == "torch" else run_keras
            all_rows[(fw, v)] = fn(v, log=lambda s: print(s, flush=True),
                                   **cfg)

    csv_path = os.path.join(args.out, "center_loss_lr_decay.csv")
    with open(csv_path, "w", newline="") as fh:
        w = csv.DictWriter(fh, COLUMNS, extrasaction="ignore")
        w.writeheader()
        for (fw, v), rows in all_rows.items():
            for r in rows:
                full = {k: r.get(k, float("nan")) for k in COLUMNS}
                full.update(framework=fw, variant=v)
                w.writerow({k: (f"{x:.6g}" if isinstance(x, float) else x)
                            for k, x in full.items()})
    peaks_path = os.path.join(args.out, "peaks.csv")
    d1, d2 = T.decay_epochs(args.epochs)
    with open(peaks_path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["framework", "variant", "quantity",
                    f"ratio_decay1_after_epoch{d1}",
                    f"ratio_decay2_after_epoch{d2}"])
        print("\nafter/before ratio at each decay (mean of the 2 epochs from "
              "the decay on / mean of the 3 epochs before; > 1 = peak):")
        for (fw, v), rows in all_rows.items():
            for key in PEAK_KEYS:
                r = peak_ratios(rows, args.epochs, key)
                w.writerow([fw, v, key] + [f"{x:.4f}" for x in r])
                if key in ("train_center", "val_center"):
                    print(f"  {fw:5s} {v:11s} {key:13s} "
                          + "  ".join(f"{x:.3f}" for x in r))
    png_path = os.path.join(args.out, "center_loss_lr_decay.png")
    plot(all_rows, args.epochs, png_path)
    print(f"\nwrote {csv_path}, {peaks_path}, {png_path} "
          f"({time.time() - t_start:.0f} s)")
    return all_rows


if __name__ == "__main__":
    main()
