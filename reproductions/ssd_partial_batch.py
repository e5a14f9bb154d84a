"""The report "Why does my training loss have regular spikes?", reproduced: the SSD
spike at every epoch's short last batch, and the fixes.

A small SSD (5 conv layers, 3 feature maps, 1344 anchors) is trained on a
synthetic detection set (shapes on textured backgrounds, 1-5 objects per image,
3 classes) whose size is not a multiple of the batch size, with SGD + momentum,
in seven runs that share the initial weights and the batch order:

  (a) bug    ssd_keras-style loss, per image (cls + alpha * box) / max(1, N_pos),
             reduced by Keras's default "sum_over_batch_size" (divides by b)
  (b) fix    the same function wrapped in `keras_batchfix.compensate`
  (c) fix    `keras_batchfix.SSDMultiboxLoss`
  (d) drop   the bug, with the short batch dropped (PyTorch's drop_last=True;
             the full batches are the same images as in the other runs)
  (e) clip   the bug, with `global_clipnorm` (the report's suggested mitigation),
             set before training to the median gradient norm of the buggy loss
             over the first epoch's full batches at the initial weights
  (f) torch  the same model, loop and batches in PyTorch, with the loss of
             keras_batchfix/references/torch_multibox.py (sum / max(1, N_pos))
  (g) control: (f) again from initial weights perturbed by a relative 1e-7
             (float32 rounding), to measure how far two runs drift apart when
             they differ by rounding only; (c) vs (f) is judged against it

All three Keras losses run the same math (`SSDMultiboxLoss.numerator_and_count`)
and differ only in the reduction. The buggy loss is B times smaller on a full
batch, so (a), (d) and (e) use the learning rate times B: their full-batch
steps are then the steps of (b); what remains is the bug itself, a short batch
of b images weighted B / b times too much.

Per-step losses come from `model.train_on_batch` (the same `train_step` as
`fit`; it resets the metrics, so it returns that batch's loss, not the epoch's
running mean that `fit` logs).

    python reproductions/ssd_partial_batch.py              # default, < 5 min on 2 CPUs
    python reproductions/ssd_partial_batch.py --quick      # < 60 s, checks the spikes

Writes `steps.csv`, `spikes.csv`, `table.md`, `ssd_partial_batch.png` and
`keras_vs_pytorch.png` to `--out`.
"""

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(ROOT, "reproductions", "results", "ssd_partial_batch")

IMAGE_SIZE = 64
NUM_CLASSES = 4  # background + rectangle, ellipse, triangle
FEATURE_MAPS = [(16, 16), (8, 8), (4, 4)]
SCALES = [0.15, 0.3, 0.55, 0.85]
ASPECT_RATIOS = (1.0, 2.0, 0.5)
NEIGHBOURS = 3  # full batches on each side of a short batch for the spike ratio
AFTER = 5  # steps after a short batch searched for a disturbance

VARIANTS = {
    "a_bug": "(a) bug: ssd_keras-style loss, sum_over_batch_size",
    "b_compensate": "(b) fix: compensate(same loss)",
    "c_ssd_multibox": "(c) fix: SSDMultiboxLoss",
    "d_drop_short": "(d) bug + short batch dropped",
    "e_bug_clipnorm": "(e) bug + global_clipnorm",
    "f_torch": "(f) PyTorch, same model/batches",
    "g_torch_jitter": "(g) control: (f) with weights x (1 + 1e-7 noise)",
}
BUGGY = ("a_bug", "d_drop_short", "e_bug_clipnorm")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--backend",
        default=os.environ.get("KERAS_BACKEND", "tensorflow"),
        choices=("tensorflow", "jax", "torch"),
        help="Keras backend (default: $KERAS_BACKEND or tensorflow)",
    )
    parser.add_argument("--epochs", type=int, default=None, help="default 30 (quick: 3)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 32 (quick: 16)")
    parser.add_argument(
        "--num-images",
        type=int,
        default=None,
        help="dataset size, not a multiple of the batch size (default 232; quick: 52)",
    )
    parser.add_argument(
        "--lr",
        type=float,
        default=0.03,
        help="SGD learning rate of the fixed losses (default 0.03; (c) diverges at 0.06)",
    )
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument(
        "--clipnorm",
        type=float,
        default=None,
        help="global_clipnorm of (e); default: median gradient norm of the "
        "buggy loss over the first epoch's full batches at the initial weights",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny run (< 60 s) that checks the spike ratios and exits non-zero if they are off",
    )
    args = parser.parse_args(argv)
    quick = args.quick
    if args.epochs is None:
        args.epochs = 3 if quick else 30
    if args.batch_size is None:
        args.batch_size = 16 if quick else 32
    if args.num_images is None:
        args.num_images = 52 if quick else 232
    if args.out is None:
        args.out = DEFAULT_OUT + ("_quick" if quick else "")
    return args


# ----------------------------------------------------------------------------
# Data


def make_dataset(num_images, seed, size=IMAGE_SIZE, max_objects=5):
    """Images `(n, size, size, 3)` in [-1, 1], padded boxes (xyxy px) and labels.

    Class 1 is a reddish rectangle, 2 a greenish ellipse, 3 a bluish triangle
    (shape and hue both tell the class, so that a tiny model learns in a few
    hundred CPU steps); backgrounds are gratings of random colour plus noise.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    images = np.empty((num_images, size, size, 3), dtype="float32")
    boxes = np.zeros((num_images, max_objects, 4), dtype="float32")
    labels = np.full((num_images, max_objects), -1, dtype="int64")
    for i in range(num_images):
        image = rng.uniform(0.2, 0.8, size=3) * np.ones((size, size, 3))
        for _ in range(2):  # texture: two oriented gratings and noise
            f = rng.uniform(0.1, 0.6, size=2)
            image += rng.uniform(0.05, 0.15, size=3) * np.sin(
                f[0] * xx + f[1] * yy + rng.uniform(0, 2 * np.pi)
            )[..., None]
        image += rng.normal(0.0, 0.04, size=image.shape)
        for j in range(rng.integers(1, max_objects + 1)):
            label = int(rng.integers(1, NUM_CLASSES))
            w = rng.uniform(10.0, 30.0)
            h = float(np.clip(w * np.exp(rng.uniform(-0.5, 0.5)), 8.0, 36.0))
            x0, y0 = rng.uniform(0, size - w), rng.uniform(0, size - h)
            u, v = (xx - x0) / w, (yy - y0) / h  # box coordinates in [0, 1]
            if label == 1:  # rectangle
                mask = (u >= 0) & (u <= 1) & (v >= 0) & (v <= 1)
            elif label == 2:  # ellipse
                mask = (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
            else:  # triangle, apex up
                mask = (v >= 0) & (v <= 1) & (np.abs(u - 0.5) <= v / 2)
            color = np.full(3, 0.15) + rng.uniform(-0.1, 0.1, size=3)
            color[label - 1] = rng.uniform(0.8, 1.0)  # class hue: red, green, blue
            image[mask] = color
            boxes[i, j] = (x0, y0, x0 + w, y0 + h)
            labels[i, j] = label
        images[i] = np.clip(image, 0.0, 1.0) * 2.0 - 1.0  # in [-1, 1]
    return images, boxes, labels


def batch_plan(num_images, batch_size, epochs, seed, drop_short=False):
    """Same shuffled order for every variant: list of (epoch, index array)."""
    import numpy as np

    rng = np.random.default_rng(seed + 1)
    plan = []
    for epoch in range(epochs):
        order = rng.permutation(num_images)
        for start in range(0, num_images, batch_size):
            idx = order[start : start + batch_size]
            if drop_short and len(idx) < batch_size:
                continue
            plan.append((epoch, idx))
    return plan


# ----------------------------------------------------------------------------
# Models


def build_keras_model(keras, n_boxes):
    layers = keras.layers
    depth = NUM_CLASSES + 4
    inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3))
    x = layers.Conv2D(16, 3, padding="same", activation="relu")(inputs)
    x = layers.Conv2D(32, 3, strides=2, padding="same", activation="relu")(x)
    f1 = layers.Conv2D(32, 3, strides=2, padding="same", activation="relu")(x)
    f2 = layers.Conv2D(64, 3, strides=2, padding="same", activation="relu")(f1)
    f3 = layers.Conv2D(64, 3, strides=2, padding="same", activation="relu")(f2)
    heads = []
    for f in (f1, f2, f3):
        h = layers.Conv2D(n_boxes * depth, 3, padding="same")(f)
        heads.append(layers.Reshape((-1, depth))(h))
    outputs = layers.Concatenate(axis=1)(heads)  # logits + offsets
    return keras.Model(inputs, outputs, name="tiny_ssd")


def build_torch_model(keras_model, n_boxes):
    """The Keras model in torch.nn, with its weights copied."""
    import numpy as np
    import torch
    from torch import nn
    import torch.nn.functional as F

    convs = [l for l in keras_model.layers if l.__class__.__name__ == "Conv2D"]
    depth = NUM_CLASSES + 4

    class TinySSD(nn.Module):
        def __init__(self):
            super().__init__()
            self.convs = nn.ModuleList(
                nn.Conv2d(c.kernel.shape[2], c.kernel.shape[3], 3) for c in convs
            )
            self.strides = [c.strides[0] for c in convs]

        def conv(self, i, x):
            if self.strides[i] == 1:  # "same", stride 1: one pixel each side
                x = F.pad(x, (1, 1, 1, 1))
            else:  # "same", stride 2, even size: Keras/TF pad bottom/right only
                x = F.pad(x, (0, 1, 0, 1))
            return F.conv2d(x, self.convs[i].weight, self.convs[i].bias, stride=self.strides[i])

        def forward(self, x):  # x: NHWC like Keras
            x = x.permute(0, 3, 1, 2)
            x = F.relu(self.conv(0, x))
            x = F.relu(self.conv(1, x))
            f1 = F.relu(self.conv(2, x))
            f2 = F.relu(self.conv(3, f1))
            f3 = F.relu(self.conv(4, f2))
            outs = []
            for i, f in zip((5, 6, 7), (f1, f2, f3)):
                h = self.conv(i, f).permute(0, 2, 3, 1)  # NHWC: anchor order of Keras
                outs.append(h.reshape(h.shape[0], -1, depth))
            return torch.cat(outs, dim=1)

    model = TinySSD()
    with torch.no_grad():
        for conv, keras_conv in zip(model.convs, convs):
            kernel, bias = keras_conv.get_weights()  # kernel (kh, kw, in, out)
            conv.weight.copy_(torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))))
            conv.bias.copy_(torch.from_numpy(np.ascontiguousarray(bias)))
    return model


# ----------------------------------------------------------------------------
# Training


def train_keras(keras, model, loss, optimizer, plan, images, y_true, name, log):
    import numpy as np

    model.compile(optimizer=optimizer, loss=loss)
    rows = []
    start = time.time()
    for step, (epoch, idx) in enumerate(plan):
        reported = float(model.train_on_batch(images[idx], y_true[idx]))
        if not np.isfinite(reported):
            log(f"  {name}: non-finite loss at step {step}; stopping this variant")
            break
        record_step(rows, plan, step, len(idx), reported, name, start, log)
    return rows, time.time() - start


def record_step(rows, plan, step, batch_size, reported, name, start, log):
    """Appends a step's row; logs progress at the last step of an epoch."""
    epoch = plan[step][0]
    rows.append(dict(step=step, epoch=epoch, batch_size=batch_size, reported=reported))
    if step + 1 == len(plan) or plan[step + 1][0] != epoch:
        log(
            f"  {name:15s} epoch {epoch + 1:2d}/{plan[-1][0] + 1}  last batch loss "
            f"{reported:.4g}  ({time.time() - start:.0f} s)"
        )


def train_torch(model, plan, images, y_true, lr, momentum, name, log):
    import torch

    from keras_batchfix.references.torch_multibox import multibox_loss

    torch.manual_seed(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    rows = []
    start = time.time()
    images_t = torch.from_numpy(images)
    y_true_t = torch.from_numpy(y_true)
    for step, (epoch, idx) in enumerate(plan):
        idx_t = torch.from_numpy(idx)
        optimizer.zero_grad()
        loss = multibox_loss(
            y_true_t[idx_t], model(images_t[idx_t]), NUM_CLASSES, from_logits=True
        )
        loss.backward()
        optimizer.step()
        reported = float(loss.detach())
        record_step(rows, plan, step, len(idx), reported, name, start, log)
    return rows, time.time() - start


def buggy_grad_norms(model, plan, images, y_true, batch_size):
    """Global gradient norms of the buggy loss at the initial weights (torch copy)."""
    import numpy as np
    import torch

    from keras_batchfix.references.torch_multibox import multibox_loss

    norms = []
    first_epoch = [idx for epoch, idx in plan if epoch == 0 and len(idx) == batch_size]
    for idx in first_epoch:
        model.zero_grad()
        idx_t = torch.from_numpy(idx)
        loss = multibox_loss(
            torch.from_numpy(y_true[idx]), model(torch.from_numpy(images[idx])),
            NUM_CLASSES, from_logits=True,
        ) / len(idx)  # the buggy loss: sum / (N_pos * b)
        loss.backward()
        norms.append(float(torch.sqrt(sum((p.grad**2).sum() for p in model.parameters()))))
        del idx_t
    model.zero_grad()
    return float(np.median(norms))


# ----------------------------------------------------------------------------
# Analysis


def analyse(steps, batch_size, short_size):
    """Spike ratios, disturbances, final losses, Keras-vs-PyTorch gap."""
    import numpy as np

    by_variant = {}
    for r in steps:
        by_variant.setdefault(r["variant"], []).append(r)
    reference = {  # (d): same images, never a short batch
        (r["epoch"], r["step_in_epoch"]): r["batch_loss"] for r in by_variant.get("d_drop_short", [])
    }
    spikes, summary = [], {}
    for variant, rows in by_variant.items():
        reported = np.array([r["reported"] for r in rows])
        short_steps = [i for i, r in enumerate(rows) if r["short"]]
        ratios, disturbances = [], []
        for t in short_steps:
            before = [i for i in range(max(0, t - NEIGHBOURS), t) if not rows[i]["short"]]
            after = [i for i in range(t + 1, min(len(rows), t + 1 + NEIGHBOURS)) if not rows[i]["short"]]
            ratio = reported[t] / np.median(reported[before + after])
            # disturbance: loss relative to (d) on the same images, after vs just before
            rel = lambda i: rows[i]["batch_loss"] / reference[(rows[i]["epoch"], rows[i]["step_in_epoch"])]
            following = [i for i in range(t + 1, min(len(rows), t + 1 + AFTER)) if not rows[i]["short"]]
            if reference and following and t > 0 and not rows[t - 1]["short"]:
                disturbance = max(rel(i) for i in following) / rel(t - 1) - 1.0
            else:
                disturbance = float("nan")
            ratios.append(ratio)
            disturbances.append(disturbance)
            spikes.append(dict(variant=variant, epoch=rows[t]["epoch"], step=rows[t]["step"],
                               spike_ratio=ratio, disturbance=disturbance))
        last_epoch = rows[-1]["epoch"]
        final = [r["batch_loss"] for r in rows if r["epoch"] == last_epoch and not r["short"]]
        summary[variant] = dict(
            ratios=ratios,
            disturbances=disturbances,
            final_loss=float(np.mean(final)),
            steps=len(rows),
        )
    gap = {}
    for name, (one, other) in dict(keras_torch=("c_ssd_multibox", "f_torch"),
                                   torch_torch=("g_torch_jitter", "f_torch")).items():
        if one not in by_variant or other not in by_variant:
            continue
        k = np.array([r["batch_loss"] for r in by_variant[one]])
        t = np.array([r["batch_loss"] for r in by_variant[other]])
        n = min(len(k), len(t))
        rel = np.abs(k[:n] - t[:n]) / np.abs(t[:n])
        above = np.flatnonzero(rel > 1e-3)
        gap[name] = dict(max=float(rel.max()), argmax=int(rel.argmax()), first=float(rel[0]),
                         median=float(np.median(rel)), rel=rel,
                         first_above=int(above[0]) if len(above) else None,
                         final=abs(summary[one]["final_loss"] / summary[other]["final_loss"] - 1))
    return spikes, summary, gap


def format_table(summary, gap, args, lrs, clipnorm, hardware, timings):
    import numpy as np

    short = args.num_images % args.batch_size
    lines = [
        f"Run: `{' '.join(sys.argv[1:]) or '(defaults)'}` on Keras backend `{args.backend}`; "
        f"{args.num_images} images, batch {args.batch_size}, last batch {short} "
        f"(B / b_last = {args.batch_size / short:.2f}), {args.epochs} epochs, "
        f"SGD momentum {args.momentum}; {hardware}.",
        "",
        "| variant | lr | spike ratio min / median / max | spike ratio at each short batch (loss / median of its 6 neighbours) | disturbance after a short batch: median / largest | final loss | time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for variant, label in VARIANTS.items():
        if variant not in summary:
            continue
        s = summary[variant]
        ratios = " ".join(f"{r:.2f}" for r in s["ratios"]) or "— (no short batch)"
        spread = (f"{min(s['ratios']):.2f} / {np.median(s['ratios']):.2f} / "
                  f"{max(s['ratios']):.2f}" if s["ratios"] else "—")
        d = [x for x in s["disturbances"] if x == x]
        dist = (f"{100 * np.median(d):+.0f}% / {100 * max(d):+.0f}%"
                if d and variant != "d_drop_short" else "—")
        extra = f", clipnorm {clipnorm:.3g}" if variant == "e_bug_clipnorm" else ""
        lines.append(
            f"| {label} | {lrs[variant]:.3g}{extra} | {spread} | {ratios} | {dist} | "
            f"{s['final_loss']:.4f} | {timings.get(variant, float('nan')):.0f} |"
        )
    lines.append("")
    lines.append(
        "Spike ratio: reported (optimized) loss of the short batch / median of the reported loss of "
        f"the up to {NEIGHBOURS} full batches before and after it. Disturbance: over the {AFTER} steps "
        "after the short batch, the largest batch loss relative to (d) on the same images (same "
        "batches, no short batch), divided by that relative loss at the step just before, minus 1. "
        "Batch loss = (CE + SmoothL1) / max(1, N_pos) of the batch; final loss = its mean over the "
        "last epoch's full batches."
    )
    for name, label in (("keras_torch", "Keras (c) vs PyTorch (f)"),
                        ("torch_torch", "Control: PyTorch (g) vs PyTorch (f), rounding-size perturbation")):
        if name not in gap:
            continue
        g = gap[name]
        first_above = "never" if g["first_above"] is None else f"from step {g['first_above']}"
        lines.append("")
        lines.append(
            f"{label}, batch loss per step: relative gap {g['first']:.1e} at step 0, above 1e-3 "
            f"{first_above}, median {g['median']:.1e}, largest {g['max']:.1e} (step {g['argmax']}); "
            f"final losses differ by {100 * g['final']:.2f}%."
        )
    return "\n".join(lines)


def plot(steps, gap, args, lrs, out, hardware):
    """Two figures: the spike and its effect; Keras against PyTorch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    colors = dict(a_bug="tab:red", b_compensate="tab:blue", c_ssd_multibox="tab:green",
                  d_drop_short="tab:gray", e_bug_clipnorm="tab:orange", f_torch="tab:purple",
                  g_torch_jitter="tab:brown")
    styles = dict(b_compensate="--", f_torch=":")
    by_variant = {}
    for r in steps:
        by_variant.setdefault(r["variant"], []).append(r)
    base_lr = args.lr
    fig, axes = plt.subplots(2, 1, figsize=(11, 8.5), sharex=True)
    for ax in axes:
        for e in range(1, args.epochs):
            ax.axvline(e, color="k", lw=0.5, alpha=0.2)
    for variant, rows in by_variant.items():
        if variant == "g_torch_jitter":
            continue  # a control of the second figure
        x = np.array([r["position"] for r in rows])
        short = np.array([r["short"] for r in rows], bool)
        kw = dict(color=colors[variant], ls=styles.get(variant, "-"), lw=1.1,
                  label=VARIANTS[variant])
        # What the optimizer follows: its loss times its learning rate, in
        # units of the fixed variants' rate (the buggy ones run at lr x B).
        seen = np.array([r["reported"] for r in rows]) * lrs[variant] / base_lr
        axes[0].plot(x, seen, **kw)
        axes[0].plot(x[short], seen[short], "o", color=colors[variant], ms=4)
        axes[1].plot(x, [r["batch_loss"] for r in rows], **kw)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("loss the optimizer follows\n(loss x lr / lr of the fixes, log)")
    axes[0].set_title(
        f"{args.num_images} images in batches of {args.batch_size}: every epoch ends with "
        f"a batch of {args.num_images % args.batch_size} (dots)", fontsize=10)
    axes[0].legend(fontsize=8, ncol=2, loc="upper right")
    axes[1].set_yscale("log")
    axes[1].set_ylabel("SSD loss of the batch\nsum / max(1, N_pos), log")
    axes[1].set_title("Effect on training: the same loss measured for every variant "
                      "((b) and (c) coincide)", fontsize=10)
    axes[1].legend(fontsize=8, ncol=2, loc="upper right")
    axes[1].set_xlabel(f"epoch   (Keras backend: {args.backend}; {hardware})")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "ssd_partial_batch.png"), dpi=110)
    plt.close(fig)

    if not gap:
        return
    fig, ax = plt.subplots(figsize=(11, 3.5))
    for name, color, label in (
        ("keras_torch", "k", "Keras SSDMultiboxLoss (c) vs PyTorch (f)"),
        ("torch_torch", "tab:brown", "control: PyTorch (g) vs PyTorch (f), weights x (1 + 1e-7 noise)"),
    ):
        if name not in gap:
            continue
        rel = np.asarray(gap[name]["rel"], float)
        x = np.array([r["position"] for r in by_variant["f_torch"]])[: len(rel)]
        nonzero = rel > 0  # equal in float32: not drawn
        ax.semilogy(x[nonzero], rel[nonzero], color=color, lw=0.9, label=label)
    ax.set_ylabel("relative gap of the batch loss")
    ax.set_xlabel("epoch (steps where both are equal in float32 are not drawn)")
    ax.set_title("Keras against PyTorch: same weights, batches and SGD", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "keras_vs_pytorch.png"), dpi=110)
    plt.close(fig)


def hardware_name():
    try:
        with open("/proc/cpuinfo") as f:
            model = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except Exception:  # pragma: no cover
        import platform

        model = platform.processor() or "CPU"
    cpu = f"{os.cpu_count()}-core {model} CPU"
    try:  # Keras's steps run on the GPU when there is one; (f) and (g) on the CPU
        import torch

        if torch.cuda.is_available():
            return f"{cpu}, {torch.cuda.get_device_name(0)} GPU"
    except Exception:  # pragma: no cover
        pass
    return cpu


# ----------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    os.environ["KERAS_BACKEND"] = args.backend
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    t_start = time.time()

    def log(msg):
        print(f"[{time.time() - t_start:6.1f}s] {msg}", flush=True)

    import keras
    import torch

    # One thread: on a small shared CPU, torch's intra-op threads contend with
    # other processes and run ~10x slower (measured); results are unaffected.
    torch.set_num_threads(1)

    import keras_batchfix
    from keras_batchfix import SSDMultiboxLoss, compensate

    short = args.num_images % args.batch_size
    if short == 0:
        raise SystemExit("--num-images must not be a multiple of --batch-size (no short batch)")
    hardware = hardware_name()
    log(f"Keras {keras.__version__} on {keras.backend.backend()}, torch {torch.__version__}; {hardware}")

    images, boxes, labels = make_dataset(args.num_images, args.seed)
    anchors = keras_batchfix.ssd_anchors((IMAGE_SIZE, IMAGE_SIZE), FEATURE_MAPS, SCALES, ASPECT_RATIOS)
    y_true = keras_batchfix.encode_ssd_targets(boxes, labels, anchors, NUM_CLASSES)
    n_pos = (y_true[..., 1:NUM_CLASSES].sum(-1) > 0).sum(-1)
    log(
        f"data: {args.num_images} images, {int((labels > 0).sum())} objects, {len(anchors)} anchors, "
        f"{n_pos.mean():.1f} positive anchors per image (min {n_pos.min()}); batch {args.batch_size}, "
        f"last batch {short} -> expected spike ratio B / b_last = {args.batch_size / short:.2f}"
    )

    keras.utils.set_random_seed(args.seed)
    n_boxes = keras_batchfix.num_anchors_per_cell(ASPECT_RATIOS)
    base = build_keras_model(keras, n_boxes)
    assert base.output_shape[1] == len(anchors), (base.output_shape, anchors.shape)
    initial = base.get_weights()

    plan = batch_plan(args.num_images, args.batch_size, args.epochs, args.seed)
    plan_drop = batch_plan(args.num_images, args.batch_size, args.epochs, args.seed, drop_short=True)

    core = SSDMultiboxLoss(NUM_CLASSES, from_logits=True)

    def ssd_keras_style_loss(y_true, y_pred):
        """Per image (cls + alpha * box) / max(1, N_pos of the batch): ssd_keras without `* batch_size`."""
        numerator, count = core.numerator_and_count(y_true, y_pred)
        return numerator / keras.ops.maximum(keras.ops.cast(count, numerator.dtype), 1.0)

    torch_model = build_torch_model(base, n_boxes)
    clipnorm = args.clipnorm
    if clipnorm is None:
        clipnorm = buggy_grad_norms(torch_model, plan, images, y_true, args.batch_size)
        log(f"(e) global_clipnorm = {clipnorm:.4g} (median initial gradient norm of the buggy loss)")

    B = args.batch_size
    lrs = {v: args.lr * (B if v in BUGGY else 1) for v in VARIANTS}
    sgd = lambda v, **kw: keras.optimizers.SGD(lrs[v], momentum=args.momentum, **kw)
    keras_variants = {
        "a_bug": (ssd_keras_style_loss, sgd("a_bug"), plan),
        "b_compensate": (compensate(ssd_keras_style_loss), sgd("b_compensate"), plan),
        "c_ssd_multibox": (SSDMultiboxLoss(NUM_CLASSES, from_logits=True), sgd("c_ssd_multibox"), plan),
        "d_drop_short": (ssd_keras_style_loss, sgd("d_drop_short"), plan_drop),
        "e_bug_clipnorm": (ssd_keras_style_loss, sgd("e_bug_clipnorm", global_clipnorm=clipnorm), plan),
    }
    if args.quick:  # the spike check needs (a) and (c); (f) checks the agreement with PyTorch
        keras_variants = {k: v for k, v in keras_variants.items() if k in ("a_bug", "c_ssd_multibox")}

    results, timings = {}, {}
    for variant, (loss, optimizer, variant_plan) in keras_variants.items():
        log(f"{VARIANTS[variant]} (lr {lrs[variant]:.3g})")
        model = keras.models.clone_model(base)
        model.set_weights(initial)
        results[variant], timings[variant] = train_keras(
            keras, model, loss, optimizer, variant_plan, images, y_true, variant, log
        )
        results[variant + "_plan"] = variant_plan
    log(f"{VARIANTS['f_torch']} (lr {lrs['f_torch']:.3g})")
    results["f_torch"], timings["f_torch"] = train_torch(
        torch_model, plan, images, y_true, lrs["f_torch"], args.momentum, "f_torch", log
    )
    results["f_torch_plan"] = plan
    if not args.quick:
        log(f"{VARIANTS['g_torch_jitter']} (lr {lrs['g_torch_jitter']:.3g})")
        jittered = build_torch_model(base, n_boxes)
        generator = torch.Generator().manual_seed(args.seed)
        with torch.no_grad():
            for p in jittered.parameters():
                p.mul_(1.0 + 1e-7 * torch.randn(p.shape, generator=generator))
        results["g_torch_jitter"], timings["g_torch_jitter"] = train_torch(
            jittered, plan, images, y_true, lrs["g_torch_jitter"], args.momentum, "g_torch_jitter", log
        )
        results["g_torch_jitter_plan"] = plan

    steps = []
    for variant in VARIANTS:
        if variant not in results:
            continue
        variant_plan = results[variant + "_plan"]
        for r, (epoch, idx) in zip(results[variant], variant_plan):
            in_epoch = sum(1 for e, _ in variant_plan[: r["step"]] if e == epoch)
            per_epoch = sum(1 for e, _ in variant_plan if e == epoch)
            b = len(idx)
            batch_loss = r["reported"] * b if variant in BUGGY else r["reported"]
            steps.append(dict(
                variant=variant, step=r["step"], epoch=epoch, step_in_epoch=in_epoch,
                position=epoch + in_epoch / per_epoch, batch_size=b, short=b < args.batch_size,
                n_pos=int(n_pos[idx].sum()), reported=r["reported"], batch_loss=batch_loss,
            ))

    spikes, summary, gap = analyse(steps, args.batch_size, short)
    table = format_table(summary, gap, args, lrs, clipnorm, hardware, timings)

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "steps.csv"), "w") as f:
        keys = ["variant", "step", "epoch", "step_in_epoch", "position", "batch_size", "short", "n_pos", "reported", "batch_loss"]
        f.write(",".join(keys) + "\n")
        for r in steps:
            f.write(",".join(f"{r[k]:.9g}" if isinstance(r[k], float) else str(r[k]) for k in keys) + "\n")
    with open(os.path.join(args.out, "spikes.csv"), "w") as f:
        f.write("variant,epoch,step,spike_ratio,disturbance\n")
        for s in spikes:
            f.write(f"{s['variant']},{s['epoch']},{s['step']},{s['spike_ratio']:.4f},{s['disturbance']:.4f}\n")
    total = time.time() - t_start
    table += f"\n\nTotal wall time {total:.0f} s."
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table + "\n")
    plot(steps, gap, args, lrs, args.out, hardware)
    print()
    print(table)
    print(f"\nwrote {args.out}/steps.csv, spikes.csv, table.md, ssd_partial_batch.png, keras_vs_pytorch.png")

    failures = check(summary, gap, args.batch_size / short) if args.quick else []
    for failure in failures:
        print("CHECK FAILED:", failure)
    if args.quick and not failures:
        print("checks passed")
    return 1 if failures else 0


def check(summary, gap, expected):
    """The quick mode's assertions: the bug spikes by ~B / b_last, the fixes do not."""
    failures = []
    bug, fixed = summary["a_bug"], summary["c_ssd_multibox"]
    # Up to the first short batch (a) and (c) take the same steps (lr x B on a
    # loss B times smaller), so there the ratio of their spike ratios is
    # B / b_last up to float rounding.
    first = bug["ratios"][0] / fixed["ratios"][0]
    if abs(first / expected - 1) > 0.05:
        failures.append(f"first short batch: spike(a) / spike(c) = {first:.3f}, expected {expected:.2f}")
    for r in bug["ratios"]:
        if not 0.6 * expected <= r <= 1.6 * expected:
            failures.append(f"(a) spike ratio {r:.2f} not near B / b_last = {expected:.2f}")
    for name, s in (("(c)", fixed), ("(f)", summary["f_torch"])):
        for r in s["ratios"]:
            if not 0.5 <= r <= 1.6:
                failures.append(f"{name} spike ratio {r:.2f} not near 1")
    if "keras_torch" in gap and gap["keras_torch"]["first"] > 1e-5:
        failures.append(f"Keras and PyTorch differ by {gap['keras_torch']['first']:.1e} at step 0")
    return failures


if __name__ == "__main__":
    sys.exit(main())
