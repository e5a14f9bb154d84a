"""The report "Why does my training loss have regular spikes?", reproduced.

A user trained SSD in Keras and saw the loss jump once an epoch. The loss
of ssd_keras divides the batch's summed box losses by the batch's number of
matched boxes; Keras's default reduction, "sum_over_batch_size", then
divides by the batch size again. On a full batch of B images that is a
constant factor the learning rate absorbs; on the short last batch of b
images, the loss and its gradient are B / b times too large.

This script trains a tiny SSD (5 conv layers, 3 feature maps, 1344 anchors)
on synthetic shapes, with a dataset that is not a multiple of the batch
size, in seven runs that share the initial weights and the batch order:

  (a) bug    the ssd_keras-style loss under Keras's default reduction
  (b) fix    the same function wrapped in `keras_batchfix.compensate`
  (c) fix    `keras_batchfix.SSDMultiboxLoss`
  (d) drop   the bug, with the short batch dropped (PyTorch's drop_last=True)
  (e) clip   the bug, with `global_clipnorm` (the usual advice)
  (f) torch  the same model, batches and SGD in PyTorch
  (g) control (f) from weights perturbed by a relative 1e-7: how far two
             runs drift apart on float32 rounding alone

Then it looks for the spikes with the package's own spike analysis, the one
`keras_batchfix.SpikeMonitor` runs after `fit`.

    python reproductions/ssd_partial_batch.py --out out/ssd_partial_batch  # 90 s of CPU time
    python reproductions/ssd_partial_batch.py --quick   # < 60 s, checks the spikes

Writes `steps.csv`, `spikes.csv`, `table.md`, `ssd_partial_batch.png` and
`keras_vs_pytorch.png` to `--out`. The data, models and training loops are
in `support/ssd.py`, the statistics in `support/ssd_statistics.py`.
"""

import argparse
import os
import sys
import time

from support import ssd, ssd_figures, ssd_statistics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(ROOT, "reproductions", "results", "ssd_partial_batch")
LABELS = {
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
    parser.add_argument("--backend", default=os.environ.get("KERAS_BACKEND", "tensorflow"),
                        choices=("tensorflow", "jax", "torch"),
                        help="Keras backend (default: $KERAS_BACKEND or tensorflow)")
    parser.add_argument("--epochs", type=int, default=None, help="default 30 (quick: 3)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 32 (quick: 16)")
    parser.add_argument("--num-images", type=int, default=None,
                        help="not a multiple of the batch size (default 232; quick: 52)")
    parser.add_argument("--lr", type=float, default=0.03,
                        help="SGD learning rate of the fixed losses (default 0.03)")
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--clipnorm", type=float, default=None,
                        help="global_clipnorm of (e); default: the median gradient norm of "
                        "the buggy loss over the first epoch's full batches")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--quick", action="store_true",
                        help="(a), (c) and (f) for 3 epochs (< 60 s); exits 1 if the spikes are off")
    args = parser.parse_args(argv)
    defaults = (3, 16, 52) if args.quick else (30, 32, 232)
    args.epochs = args.epochs or defaults[0]
    args.batch_size = args.batch_size or defaults[1]
    args.num_images = args.num_images or defaults[2]
    args.out = args.out or DEFAULT_OUT + ("_quick" if args.quick else "")
    if args.num_images % args.batch_size == 0:
        parser.error("--num-images must not be a multiple of --batch-size (no short batch)")
    return args


def main(argv=None):
    args = parse_args(argv)
    os.environ["KERAS_BACKEND"] = args.backend
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    started = time.time()

    def log(message):
        print(f"[{time.time() - started:6.1f}s] {message}", flush=True)

    import keras
    import torch

    import keras_batchfix
    from keras_batchfix import SSDMultiboxLoss, compensate

    # One thread: on a small shared CPU torch's thread pool runs about 10x
    # slower; the results do not depend on it.
    torch.set_num_threads(1)
    hardware = ssd.hardware_name()
    log(f"Keras {keras.__version__} on {args.backend}, torch {torch.__version__}; {hardware}")

    # 1. The data: images with 1-5 shapes of 3 classes, and their SSD targets.
    B, short = args.batch_size, args.num_images % args.batch_size
    images, boxes, labels = ssd.make_dataset(args.num_images, args.seed)
    anchors = keras_batchfix.ssd_anchors((ssd.IMAGE_SIZE,) * 2, ssd.FEATURE_MAPS, ssd.SCALES,
                                         ssd.ASPECT_RATIOS)
    y_true = keras_batchfix.encode_ssd_targets(boxes, labels, anchors, ssd.NUM_CLASSES)
    n_pos = (y_true[..., 1:ssd.NUM_CLASSES].sum(-1) > 0).sum(-1)
    log(f"{args.num_images} images, {len(anchors)} anchors, {n_pos.mean():.1f} matched per image; "
        f"batches of {B}, the last of {short}: the bug should spike by B / b = {B / short:.2f}")

    # 2. One model, one set of initial weights, one batch order for every run.
    keras.utils.set_random_seed(args.seed)
    n_boxes = keras_batchfix.num_anchors_per_cell(ssd.ASPECT_RATIOS)
    base = ssd.build_keras_model(keras, n_boxes)
    initial = base.get_weights()
    plan = ssd.batch_plan(args.num_images, B, args.epochs, args.seed)
    plan_drop = ssd.batch_plan(args.num_images, B, args.epochs, args.seed, drop_short=True)

    # 3. The report's loss: per image, the batch's summed classification and
    # box losses over its matched boxes. Keras then divides by the batch size.
    core = SSDMultiboxLoss(ssd.NUM_CLASSES, from_logits=True)

    def ssd_keras_style_loss(y_true, y_pred):
        numerator, count = core.numerator_and_count(y_true, y_pred)
        return numerator / keras.ops.maximum(keras.ops.cast(count, numerator.dtype), 1.0)

    # The buggy loss is B times smaller on a full batch, so the buggy runs use
    # B times the learning rate: their full-batch steps are the fixes' steps,
    # and what differs is the bug itself, the short batch weighted B / b.
    lrs = {v: args.lr * (B if v in BUGGY else 1) for v in LABELS}
    torch_model = ssd.build_torch_model(base, n_boxes)
    clipnorm = args.clipnorm or ssd.buggy_grad_norms(torch_model, plan, images, y_true, B)
    log(f"(e) global_clipnorm = {clipnorm:.4g}")

    def sgd(variant, **kwargs):
        return keras.optimizers.SGD(lrs[variant], momentum=args.momentum, **kwargs)

    runs = {
        "a_bug": (ssd_keras_style_loss, sgd("a_bug"), plan),
        "b_compensate": (compensate(ssd_keras_style_loss), sgd("b_compensate"), plan),
        "c_ssd_multibox": (SSDMultiboxLoss(ssd.NUM_CLASSES, from_logits=True),
                           sgd("c_ssd_multibox"), plan),
        "d_drop_short": (ssd_keras_style_loss, sgd("d_drop_short"), plan_drop),
        "e_bug_clipnorm": (ssd_keras_style_loss,
                           sgd("e_bug_clipnorm", global_clipnorm=clipnorm), plan),
    }
    if args.quick:  # the spike check needs the bug and a fix; (f) checks PyTorch
        runs = {k: runs[k] for k in ("a_bug", "c_ssd_multibox")}

    # 4. Train every run, one step per batch, and record each step's loss.
    steps = []
    for variant, (loss, optimizer, variant_plan) in runs.items():
        log(f"{LABELS[variant]} (lr {lrs[variant]:.3g})")
        model = keras.models.clone_model(base)
        model.set_weights(initial)
        rows, _ = ssd.train_keras(keras, model, loss, optimizer, variant_plan, images, y_true,
                                  variant, log)
        steps += ssd.step_rows(variant, rows, variant_plan, B, n_pos, variant in BUGGY)
    torch_runs = {"f_torch": torch_model}
    if not args.quick:
        jittered = ssd.build_torch_model(base, n_boxes)
        generator = torch.Generator().manual_seed(args.seed)
        with torch.no_grad():
            for p in jittered.parameters():
                p.mul_(1.0 + 1e-7 * torch.randn(p.shape, generator=generator))
        torch_runs["g_torch_jitter"] = jittered
    for variant, model in torch_runs.items():
        log(f"{LABELS[variant]} (lr {lrs[variant]:.3g})")
        rows, _ = ssd.train_torch(model, plan, images, y_true, lrs[variant], args.momentum,
                                  variant, log)
        steps += ssd.step_rows(variant, rows, plan, B, n_pos, buggy=False)

    # 5. The spikes, by keras_batchfix.spikes.analysis.analyze on each run's
    # per-step loss: the batch-size exponent (-1: divided by B twice), the
    # flagged steps and their causes, and each short batch's spike ratio.
    spikes, summary, gap = ssd_statistics.summarize(steps, lrs)
    header = (f"Run: `{' '.join(sys.argv[1:]) or '(defaults)'}` on Keras {keras.__version__} "
              f"({args.backend}); {args.num_images} images, batch {B}, last batch {short} "
              f"(B / b = {B / short:.2f}), {args.epochs} epochs, SGD momentum {args.momentum}; "
              f"{hardware}.")
    table = ssd_statistics.format_table(summary, gap, LABELS, lrs, clipnorm, header)
    table += f"\n\nTotal wall time {time.time() - started:.0f} s."

    # 6. What it wrote.
    os.makedirs(args.out, exist_ok=True)
    ssd_figures.write_csvs(args.out, steps, spikes)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table + "\n")
    footer = f"Keras {keras.__version__} ({args.backend}), torch {torch.__version__}; {hardware}"
    ssd_figures.spikes_figure(steps, LABELS, lrs, args.lr, summary, args, footer,
                              os.path.join(args.out, "ssd_partial_batch.png"))
    if gap:
        ssd_figures.agreement_figure(steps, gap, footer,
                                     os.path.join(args.out, "keras_vs_pytorch.png"),
                                     ssd_figures.agreement_title(gap))
    print("\n" + table)
    print(f"\nwrote {args.out}: steps.csv, spikes.csv, table.md, ssd_partial_batch.png"
          + (", keras_vs_pytorch.png" if gap else ""))

    if not args.quick:
        return 0
    failures = ssd_statistics.check(summary, gap, B / short)
    for failure in failures:
        print("CHECK FAILED:", failure)
    print("checks passed" if not failures else f"{len(failures)} checks failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
