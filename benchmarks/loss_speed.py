"""Forward + backward time and peak memory of `SSDMultiboxLoss`, as ratios.

Baselines:

* `torch ref`: the PyTorch multibox loss of `keras_batchfix.references` (ssd.pytorch's
  double argsort for per-image mining), timed inside every backend's process,
  its steps taken in turn with the Keras ones (`harness.interleaved_medians`),
  so each ratio compares steps measured side by side;
* `floor`: softmax cross-entropy plus smooth L1 over all anchors, no mining,
  with the loss's own kernels (`keras_batchfix.kernels`) and timed the same
  way on the same backend: what any SSD loss costs before mining.

Peak memory is the largest rise of the process's resident set during one
step above its level before it (`harness.peak_step_bytes`): the buffers the
step allocates, the returned gradient included, measured the same way for
torch and JAX, in separate processes. TensorFlow's allocator reuses memory
it already holds, so its resident set does not rise in a step: no peak is
shown for it.

Each backend runs in its own process (Keras picks its backend at import).

    python benchmarks/loss_speed.py             # B = 8, 32, 128; 8732 anchors
    python benchmarks/loss_speed.py --batch-sizes 32 --repeats 15
    python benchmarks/loss_speed.py --quick     # small shapes, a smoke run
    python benchmarks/loss_speed.py --backends jax torch --no-memory   # on a GPU

On a GPU (JAX or torch; the torch reference then runs there too, each step
followed by `torch.cuda.synchronize()`), the peak-memory pass would measure
host memory, so skip it with `--no-memory`.
"""

import argparse
import os

from harness import (
    emit,
    interleaved_medians,
    peak_step_bytes,
    run_worker,
    torch_device,
    torch_synchronized,
    value_and_grad_steps,
)

NUM_CLASSES = 21


def make_batch(batch_size, anchors, seed=0):
    import numpy as np

    from keras_batchfix.references.ssd_data import random_batch

    return random_batch(
        np.random.default_rng(seed), batch_size, anchors, NUM_CLASSES,
        positive_fraction=0.01, neutral_fraction=0.02,
    )


def floor_loss(y_true, y_pred):
    """Cross-entropy (the loss's own log-partition form) + smooth L1, no mining."""
    from keras import ops

    from keras_batchfix import kernels

    n = NUM_CLASSES
    class_targets, box_targets, _ = ops.split(y_true, [n, n + 4], axis=-1)
    class_scores, box_offsets, _ = ops.split(y_pred, [n, n + 4], axis=-1)
    cross_entropy = kernels.softmax_cross_entropy(class_targets, class_scores)
    box = ops.sum(kernels.smooth_l1(box_offsets, box_targets), -1)
    positives = ops.sum(class_targets) - ops.sum(class_targets[..., 0])
    return ops.sum(cross_entropy + box) / ops.maximum(positives, 1.0)


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

    from keras_batchfix.references.torch_multibox import multibox_loss

    device = torch_device()
    t = torch.tensor(y_true, device=device)

    def step(mining):
        p = torch.tensor(y_pred, requires_grad=True, device=device)
        multibox_loss(t, p, NUM_CLASSES, mining=mining, from_logits=True).backward()

    return {
        "torch ref": {
            mode: torch_synchronized(lambda mode=mode: step(mode))
            for mode in ("batch", "per_image")
        }
    }


def worker(args):
    """Runs in a child process: times or measures every step, prints JSON.

    `{batch size: {mode: {name: value}}}`; a Keras backend's worker also
    times the torch reference (mode "torch ref") in turn with its own steps.
    """
    results = {}
    for batch_size in args.batch_sizes:
        y_true, y_pred = make_batch(batch_size, args.anchors)
        steps = torch_reference_steps(y_true, y_pred)
        if args.worker != "reference":
            if args.memory:
                steps = {}
            steps.update(keras_steps(y_true, y_pred))
        flat = {
            (mode, name): step
            for mode, named in steps.items()
            for name, step in named.items()
        }
        if args.memory:
            values = {}
            for key, step in flat.items():
                step(), step()  # warm-up
                values[key] = peak_step_bytes(step)
        else:
            values = interleaved_medians(flat, args.repeats)
        for (mode, name), value in values.items():
            results.setdefault(f"{batch_size}", {}).setdefault(mode, {})[name] = value
    emit(results)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--anchors", type=int, default=8732)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backends", nargs="+", default=["tensorflow", "jax", "torch"])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--memory", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--no-memory", action="store_true",
        help="skip the peak-memory pass (it measures host memory: use on a GPU)",
    )
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
    alone = run_worker(script, "reference", arguments)
    seconds = {b: run_worker(script, b, arguments) for b in args.backends}
    # TensorFlow's allocator reuses memory it already holds: its resident set
    # does not rise during a step (0.0-0.2 MiB measured), so this method
    # cannot see its buffers (n/a).
    peaks = {} if args.no_memory else {
        w: run_worker(script, w, [*arguments, "--memory"], memory=True)
        for w in ["reference", *args.backends]
        if w != "tensorflow"
    }
    print(f"SSDMultiboxLoss forward+backward, {args.anchors} anchors, "
          f"{NUM_CLASSES} classes, median of {args.repeats}; / torch ref: the "
          "reference timed in turn in the same process, / alone: in its own "
          "process; peak = largest resident-set rise in a step")
    print(f"{'B':>4} {'backend/mode':<13} {'mining':<10} {'median ms':>10} "
          f"{'/ torch ref':>11} {'/ alone':>8} {'/ floor':>8} {'peak MiB':>9} "
          f"{'/ torch ref':>11}")
    for batch_size in map(str, args.batch_sizes):
        by_itself = alone[batch_size]["torch ref"]
        for mining in ("batch", "per_image"):
            print(f"{batch_size:>4} {'ref alone':<13} {mining:<10} "
                  f"{by_itself[mining] * 1e3:>10.1f}")
        for backend in args.backends:
            timed = seconds[backend][batch_size]
            ref = timed["torch ref"]
            for mode, named in timed.items():
                floor = named.get("floor")
                for mining in ("batch", "per_image"):
                    versus_floor = "" if floor is None else f"{named[mining] / floor:.2f}"
                    print(
                        f"{batch_size:>4} {mode:<13} {mining:<10} "
                        f"{named[mining] * 1e3:>10.1f} "
                        f"{named[mining] / ref[mining]:>11.2f} "
                        f"{named[mining] / by_itself[mining]:>8.2f} {versus_floor:>8} "
                        f"{_peak_columns(peaks, batch_size, mode, mining)}"
                    )


def _peak_columns(peaks, batch_size, mode, mining):
    """The peak MiB and its ratio to the reference's, or dashes without them."""
    peak = next(
        (p[batch_size][mode][mining] for p in peaks.values() if mode in p[batch_size]),
        None,
    )
    if peak is None:
        return f"{'n/a' if peaks else '-':>9} {'-':>11}"
    ref_peak = peaks["reference"][batch_size]["torch ref"][mining]
    return f"{peak / 2**20:>9.1f} {peak / ref_peak:>11.2f}"


if __name__ == "__main__":
    main()
