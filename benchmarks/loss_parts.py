"""Where the time of `SSDMultiboxLoss` goes: its parts, forward + backward.

Each part is a scalar function of `(y_true, y_pred)` in `keras.ops`, timed
like `loss_speed.py` (SSD300 scale, B = 32 by default, steps in turn) on the
compiled modes of one backend, beside the torch reference:

* `log-partition`: `sum(logsumexp(class scores))`;
* `target dot`: `sum(y_true * y_pred)` over the class columns (a 21-of-25
  slice of the last axis, and its gradient padded back);
* `cross-entropy`: as the loss computes it on this backend, and each of its
  two forms (`kernels.softmax_cross_entropy` picks one per backend):
  `CE via log-partition` (both parts above) and `CE via log_softmax`;
* `smooth L1`: the box term over all anchors; `box term`: as the loss
  computes it (`kernels.weighted_smooth_l1`, positives only on torch);
* `one-hot check`: the loss's test of the targets (`ssd_loss._invalid_inputs`);
* `floor`: cross-entropy + smooth L1 (`loss_speed.floor_loss`);
* `batch` / `per_image`: the whole loss.

    KERAS_BACKEND=jax python benchmarks/loss_parts.py [--batch-size 32]
"""

import argparse

from harness import interleaved_medians, value_and_grad_steps
from loss_speed import NUM_CLASSES, floor_loss, make_batch, torch_reference_steps


def parts():
    from keras import ops

    from keras_batchfix import SSDMultiboxLoss, kernels
    from keras_batchfix.ssd.loss import _invalid_inputs

    n = NUM_CLASSES

    def log_partition_sum(y_true, y_pred):
        return ops.sum(kernels.log_partition(y_pred[..., :n]))

    def target_dot(y_true, y_pred):
        return ops.sum(y_true[..., :n] * y_pred[..., :n])

    def summed(cross_entropy):
        return lambda y_true, y_pred: ops.sum(
            cross_entropy(y_true[..., :n], y_pred[..., :n])
        )

    def smooth_l1_sum(y_true, y_pred):
        return ops.sum(kernels.smooth_l1(y_pred[..., n : n + 4], y_true[..., n : n + 4]))

    def box_term(y_true, y_pred):
        positives = ops.sum(y_true[..., 1:n], axis=-1)
        return ops.sum(kernels.weighted_smooth_l1(
            y_pred[..., n : n + 4], y_true[..., n : n + 4], positives
        ))

    def one_hot_check(y_true, y_pred):
        targets = y_true[..., :n]
        invalid = _invalid_inputs(targets, ops.sum(targets, -1), y_pred, True)
        return ops.sum(y_pred[..., 0, 0]) + ops.cast(invalid, "float32")

    return {
        "log-partition": log_partition_sum,
        "target dot": target_dot,
        "cross-entropy": summed(kernels.softmax_cross_entropy),
        "CE via log-partition": summed(kernels._softmax_cross_entropy_keras),
        "CE via log_softmax": summed(kernels._softmax_cross_entropy_torch),
        "smooth L1": smooth_l1_sum,
        "box term": box_term,
        "one-hot check": one_hot_check,
        "floor": floor_loss,
        "batch": SSDMultiboxLoss(n, from_logits=True),
        "per_image": SSDMultiboxLoss(n, from_logits=True, mining="per_image"),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--anchors", type=int, default=8732)
    parser.add_argument("--repeats", type=int, default=11)
    args = parser.parse_args()
    y_true, y_pred = make_batch(args.batch_size, args.anchors)
    steps = {
        ("torch ref", mining): step
        for mining, step in torch_reference_steps(y_true, y_pred)["torch ref"].items()
    }
    for name, fn in parts().items():
        for mode, step in value_and_grad_steps(fn, y_pred, (y_true,)).items():
            if mode not in ("tf eager", "tf.function"):  # the compiled modes
                steps[mode, name] = step
    print(f"B={args.batch_size}, {args.anchors} anchors: median ms of "
          f"{args.repeats}, forward + backward")
    for (mode, name), seconds in interleaved_medians(steps, args.repeats).items():
        print(f"{mode:<12} {name:<21} {seconds * 1e3:8.1f}")


if __name__ == "__main__":
    main()
