"""Where the time of a `CenterLoss` training step goes on the torch backend.

Steps timed in turn in one process (`harness.interleaved_medians`), batch
256, 512 features, beside the torch reference of `center_loss_speed.py`:

* `new tensor`: the features tensor each step creates (in every row below);
* `empty Keras layer`: `__call__` of a Keras layer whose `call` returns its
  input: what Keras's layer machinery costs before any op;
* `forward, evaluation`: the layer's call with `training=False` (loss,
  invalid-label guard, normalizer, metric; no center step);
* `forward, training`: the same with the center step;
* `..., without the metric`: the same calls of a layer whose metric is
  switched off (`layer.tracker = None`, as on JAX): what the two logged
  values (`<name>_value`, `<name>_relative`) cost;
* `step`: forward, training, plus the backward pass (what
  `center_loss_speed.py` times).

It also counts the calls of the torch backend's `convert_to_tensor` (about
one per `keras.ops` call) in one training call, and times one small op.

    KERAS_BACKEND=torch python benchmarks/center_loss_parts.py [--classes 10]
"""

import argparse
import cProfile
import os
import pstats

os.environ.setdefault("KERAS_BACKEND", "torch")

from center_loss_speed import BATCH, FEATURES, make_batch, reference_step  # noqa: E402
from harness import interleaved_medians  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()

    import keras
    import torch

    from keras_batchfix import CenterLoss

    if keras.backend.backend() != "torch":
        raise SystemExit("run with KERAS_BACKEND=torch")
    x, labels = make_batch(args.classes, BATCH, FEATURES)
    labels_t = torch.as_tensor(labels)
    layer = CenterLoss(args.classes, alpha=0.5, loss_weight=0.01)
    layer.build([x.shape, labels.shape])
    unlogged = CenterLoss(args.classes, alpha=0.5, loss_weight=0.01)
    unlogged.build([x.shape, labels.shape])
    unlogged.tracker = None

    class Empty(keras.layers.Layer):
        def call(self, inputs):
            return inputs[0]

    empty = Empty()

    def features():
        return torch.tensor(x, requires_grad=True)

    def step():
        layer([features(), labels_t], training=True)
        sum(layer.losses).backward()

    steps = {
        **reference_step(args.classes, x, labels),
        "new tensor": features,
        "empty Keras layer": lambda: empty([features(), labels_t]),
        "forward, evaluation": lambda: layer([features(), labels_t], training=False),
        "forward, training": lambda: layer([features(), labels_t], training=True),
        "forward, evaluation, without the metric": lambda: unlogged(
            [features(), labels_t], training=False
        ),
        "forward, training, without the metric": lambda: unlogged(
            [features(), labels_t], training=True
        ),
        "step": step,
    }
    small = torch.ones(256)
    one_op = {"one keras.ops.add (256 floats)": lambda: keras.ops.add(small, small)}
    medians = interleaved_medians({**steps, **one_op}, args.repeats)

    profile = cProfile.Profile()
    profile.runcall(layer, [features(), labels_t], training=True)
    calls = sum(
        count
        for (path, _, function), (count, *_) in pstats.Stats(profile).stats.items()
        if function == "convert_to_tensor" and path.endswith("torch/core.py")
    )

    reference = medians["torch reference"]
    print(f"CenterLoss on torch, {args.classes} classes, batch {BATCH}, "
          f"{FEATURES} features, median of {args.repeats}")
    for name, seconds in medians.items():
        print(f"{name:<40} {seconds * 1e3:8.3f} ms {seconds / reference:6.2f}x ref")
    print(f"torch backend convert_to_tensor calls in one training call: {calls}")


if __name__ == "__main__":
    main()
