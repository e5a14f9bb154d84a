"""Training-step time of `CenterLoss` (loss, feature gradient, center update).

Against the PyTorch reference of `keras_batchfix/references/torch_center_loss.py`
(the report's autograd Function plus its SGD step on the centers), timed
inside every backend's process, its steps taken in turn with the Keras ones
(`harness.interleaved_medians`), so each ratio compares steps measured side
by side. 512 features, batch 256, 10 and 10,000 classes.

    python benchmarks/center_loss_speed.py [--quick]
    python benchmarks/center_loss_speed.py --backends torch --repeats 50
"""

import argparse
import os

import numpy as np
from harness import emit, interleaved_medians, run_worker, torch_device, torch_synchronized

FEATURES, BATCH = 512, 256


def make_batch(num_classes, batch, features, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, features)).astype("float32")
    labels = rng.integers(0, num_classes, batch).astype("int32")
    return x, labels


def reference_step(num_classes, x, labels):
    import torch

    from keras_batchfix.references.torch_center_loss import TorchCenterLoss

    device = torch_device()
    center = TorchCenterLoss(num_classes, x.shape[1]).to(device)
    optimizer = center.make_optimizer(alpha=0.5)
    labels = torch.as_tensor(labels, device=device).long()

    def step():
        features = torch.tensor(x, requires_grad=True, device=device)
        optimizer.zero_grad()
        (0.01 * center(features, labels)).backward()
        optimizer.step()

    return {"torch reference": torch_synchronized(step)}


def keras_steps(num_classes, x, labels):
    """`{mode: step}`: one training call of the layer, loss and gradient."""
    import keras

    from keras_batchfix import CenterLoss

    layer = CenterLoss(num_classes, alpha=0.5, loss_weight=0.01)
    layer.build([x.shape, labels.shape])
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        x_t, labels_t = tf.constant(x), tf.constant(labels)

        def step():
            with tf.GradientTape() as tape:
                tape.watch(x_t)
                layer([x_t, labels_t], training=True)
                loss = tf.add_n(layer.losses)
            return tape.gradient(loss, x_t)

        return {
            "tf eager": step,
            "tf.function": tf.function(step),
            "tf XLA": tf.function(step, jit_compile=True),
        }
    if backend == "jax":
        import jax

        state = [[v.value for v in layer.trainable_variables],
                 [v.value for v in layer.non_trainable_variables]]
        labels_j = jax.numpy.asarray(labels)

        # Labels are an argument (closed over, XLA would constant-fold them).
        def loss_fn(features, trainable, non_trainable, labels):
            _, non_trainable, losses = layer.stateless_call(
                trainable, non_trainable, [features, labels],
                training=True, return_losses=True,
            )
            return sum(losses), non_trainable

        grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
        x_j = jax.numpy.asarray(x)

        def step():
            (_, state[1]), grad = grad_fn(x_j, *state, labels_j)
            jax.block_until_ready(grad)

        return {"jax jit": step}
    if backend == "torch":
        import torch

        device = torch_device()
        labels_t = torch.as_tensor(labels, device=device)

        def step():
            features = torch.tensor(x, requires_grad=True, device=device)
            layer([features, labels_t], training=True)
            sum(layer.losses).backward()

        return {"torch eager": torch_synchronized(step)}
    raise NotImplementedError(backend)


def worker(args):
    """`{classes: {mode: median seconds}}`; mode "torch reference" included."""
    results = {}
    for num_classes in args.classes:
        x, labels = make_batch(num_classes, args.batch, args.features)
        steps = reference_step(num_classes, x, labels)
        if args.worker != "reference":
            steps.update(keras_steps(num_classes, x, labels))
        results[str(num_classes)] = interleaved_medians(steps, args.repeats)
    emit(results)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--classes", type=int, nargs="+", default=[10, 10000])
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--features", type=int, default=FEATURES)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--backends", nargs="+", default=["tensorflow", "jax", "torch"])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.classes, args.batch, args.features, args.repeats = [10, 300], 32, 16, 3
    if args.worker:
        return worker(args)
    arguments = [
        "--classes", *map(str, args.classes), "--batch", str(args.batch),
        "--features", str(args.features), "--repeats", str(args.repeats),
    ]
    script = os.path.abspath(__file__)
    alone = run_worker(script, "reference", arguments)
    measured = {b: run_worker(script, b, arguments) for b in args.backends}
    print(f"CenterLoss training step, batch {args.batch}, {args.features} "
          f"features, median of {args.repeats}; / ref: the torch reference timed "
          "in turn in the same process, / ref alone: in its own process")
    print(f"{'classes':>8} {'backend/mode':<16} {'median ms':>10} {'/ ref':>7} "
          f"{'/ ref alone':>11}")
    for num_classes in map(str, args.classes):
        by_itself = alone[num_classes]["torch reference"]
        print(f"{num_classes:>8} {'ref alone':<16} {by_itself * 1e3:>10.2f}")
        for results in measured.values():
            timed = results[num_classes]
            ref = timed["torch reference"]
            for mode, seconds in timed.items():
                print(f"{num_classes:>8} {mode:<16} {seconds * 1e3:>10.2f} "
                      f"{seconds / ref:>7.2f} {seconds / by_itself:>11.2f}")


if __name__ == "__main__":
    main()
