"""Forward + backward time and peak memory of `SSDMultiboxLoss`, as ratios.

Baselines measured in the same run:

* `torch reference`: the PyTorch multibox loss of `tests/references`
  (ssd.pytorch's double argsort for per-image mining);
* `floor`: softmax cross-entropy plus smooth L1 over all anchors, no mining,
  written in `keras.ops` with the loss's own cross-entropy and timed the same
  way on the same backend: what any SSD loss costs before mining.

Peak memory is the largest rise of the process's resident set during one
step above its level before the step (`harness.peak_step_bytes`): the
buffers the step allocates, the returned gradient included, measured the
same way for every framework.

Each backend runs in its own process (Keras picks its backend at import).

    python benchmarks/loss_speed.py             # B = 8, 32, 128; 8732 anchors
    python benchmarks/loss_speed.py --quick     # small shapes, a smoke run
"""

import argparse
import os

from harness import (
    emit,
    median_seconds,
    peak_step_bytes,
    run_worker,
    value_and_grad_steps,
)

NUM_CLASSES = 21


def make_batch(batch_size, anchors, seed=0):
    import numpy as np

    from tests.ssd_data import random_batch

    return random_batch(
        np.random.default_rng(seed), batch_size, anchors, NUM_CLASSES,
        positive_fraction=0.01, neutral_fraction=0.02,
    )


def floor_loss(y_true, y_pred):
    """Cross-entropy (the loss's own log-partition form) + smooth L1, no mining."""
    from keras import ops

    from keras_batchfix.ssd_loss import log_partition, smooth_l1

    n = NUM_CLASSES
    targets, scores = y_true[..., :n], y_pred[..., :n]
    cross_entropy = ops.sum(targets, -1) * log_partition(scores) - ops.sum(
        targets * scores, -1
    )
    box = ops.sum(smooth_l1(y_pred[..., n : n + 4] - y_true[..., n : n + 4]), -1)
    return ops.sum(cross_entropy + box) / ops.maximum(ops.sum(y_true[..., 1:n]), 1.0)


def keras_steps(y_true, y_pred):
    """`{mode: {loss name: step function}}` for the running backend."""
    from keras_batchfix import SSDMultiboxLoss

    losses = {
        mining: SSDMultiboxLoss(NUM_CLASSES, from_logits=True, mining=mining)
        for mining in ("batch", "per_image")
    }
    losses["floor"] = floor_loss
    steps = {}
    for name, loss in losses.items():
        for mode, step in value_and_grad_steps(loss, y_pred, (y_true,)).items():
            steps.setdefault(mode, {})[name] = step
    return steps


def torch_reference_steps(y_true, y_pred):
    import torch

    from tests.references.torch_multibox import multibox_loss

    t = torch.tensor(y_true)

    def step(mining):
        p = torch.tensor(y_pred, requires_grad=True)
        multibox_loss(t, p, NUM_CLASSES, mining=mining, from_logits=True).backward()

    return {
        "torch reference": {
            mode: (lambda mode=mode: step(mode)) for mode in ("batch", "per_image")
        }
    }


def worker(args):
    """Runs in a child process: times every step, prints one JSON line."""
    results = {}
    for batch_size in args.batch_sizes:
        y_true, y_pred = make_batch(batch_size, args.anchors)
        if args.worker == "reference":
            steps = torch_reference_steps(y_true, y_pred)
        else:
            steps = keras_steps(y_true, y_pred)
        for mode, named in steps.items():
            for name, step in named.items():
                results.setdefault(f"{batch_size}", {}).setdefault(mode, {})[
                    name
                ] = {
                    "seconds": median_seconds(step, args.repeats),
                    "peak_bytes": peak_step_bytes(step),
                }
    emit(results)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--anchors", type=int, default=8732)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backends", nargs="+", default=["tensorflow", "jax", "torch"])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.anchors, args.batch_sizes, args.repeats = 500, [4], 2
    if args.worker:
        return worker(args)

    arguments = [
        "--anchors", str(args.anchors), "--repeats", str(args.repeats),
        "--batch-sizes", *map(str, args.batch_sizes),
    ]
    script = os.path.abspath(__file__)
    reference = run_worker(script, "reference", arguments)
    measured = {b: run_worker(script, b, arguments) for b in args.backends}
    print(f"SSDMultiboxLoss forward+backward, {args.anchors} anchors, "
          f"{NUM_CLASSES} classes, median of {args.repeats}; peak = largest "
          "resident-set rise during a step")
    print(f"{'B':>4} {'backend/mode':<13} {'mining':<10} {'median ms':>10} "
          f"{'/ torch ref':>11} {'/ floor':>8} {'peak MiB':>9} {'/ torch ref':>11}")
    for batch_size in map(str, args.batch_sizes):
        ref = reference[batch_size]["torch reference"]
        rows = [("torch ref", mining, ref[mining], None) for mining in ref]
        for backend_results in measured.values():
            for mode, named in backend_results[batch_size].items():
                rows += [
                    (mode, mining, named[mining], named["floor"])
                    for mining in ("batch", "per_image")
                ]
        for mode, mining, result, floor in rows:
            seconds, peak = result["seconds"], result["peak_bytes"]
            versus_floor = "" if floor is None else f"{seconds / floor['seconds']:.2f}"
            print(
                f"{batch_size:>4} {mode:<13} {mining:<10} {seconds * 1e3:>10.1f} "
                f"{seconds / ref[mining]['seconds']:>11.2f} {versus_floor:>8} "
                f"{peak / 2**20:>9.1f} {peak / ref[mining]['peak_bytes']:>11.2f}"
            )


if __name__ == "__main__":
    main()
