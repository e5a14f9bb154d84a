"""Does the loss change with the number of replicas? Per-replica vs global count.

A multibox-style loss normalized by the positives of the batch is trained
under `tf.distribute.MirroredStrategy` over 1, 2 and 4 logical CPU devices,
with the count taken per replica (`LocalCount`, the replicas' losses averaged)
or all-reduced over replicas (`GlobalCount`). Images have 0 to 8 positives
each, so replicas see different counts, as in detection.

For each setting the script reports, against one device on the same global
batches: the relative gap of the loss and of the gradient that the optimizer
applies on the first batch, and the relative gap of the weights after
`--epochs` epochs of `fit` (the last batch of each epoch is short and splits
unevenly). Mining is per image, so only the normalizer differs.

    python reproductions/replica_normalization.py [--epochs 3] [--out DIR]

Writes `table.md` and `table.csv` to `--out`.
"""

import argparse
import csv
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

MAX_REPLICAS = 4
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0],
    [tf.config.LogicalDeviceConfiguration()] * MAX_REPLICAS,
)

import keras  # noqa: E402

from keras_batchfix import GlobalCount, LocalCount, SSDMultiboxLoss  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLASSES, ANCHORS, FEATURES = 4, 100, 6
IMAGES, BATCH = 100, 16  # the last batch of an epoch has 4 images


def make_data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(IMAGES, ANCHORS, FEATURES)).astype("float32")
    y = np.zeros((IMAGES, ANCHORS, NUM_CLASSES + 4), "float32")
    y[..., 0] = 1.0  # background
    for image in range(IMAGES):
        positives = rng.choice(ANCHORS, size=rng.integers(0, 9), replace=False)
        y[image, positives, 0] = 0.0
        y[image, positives, rng.integers(1, NUM_CLASSES, len(positives))] = 1.0
    y[..., NUM_CLASSES:] = rng.normal(size=(IMAGES, ANCHORS, 4))
    kernel = rng.normal(scale=0.3, size=(FEATURES, NUM_CLASSES + 4))
    return x, y, kernel.astype("float32")


def build(kernel, loss, strategy):
    with strategy.scope():
        inputs = keras.Input((ANCHORS, FEATURES))
        dense = keras.layers.Dense(NUM_CLASSES + 4)
        model = keras.Model(inputs, dense(inputs))
        dense.set_weights([kernel, np.zeros(NUM_CLASSES + 4, "float32")])
        model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), loss=loss)
    return model


def applied_loss_and_gradient(model, loss, strategy, x, y):
    """The summed replica losses and gradients: what the optimizer applies."""
    replicas = strategy.num_replicas_in_sync
    share = len(x) // replicas

    def split(context):
        part = slice(context.replica_id_in_sync_group * share,
                     (context.replica_id_in_sync_group + 1) * share)
        return x[part], y[part]

    def step(inputs):
        features, targets = inputs
        with tf.GradientTape() as tape:
            value = loss(targets, model(features))
        return value, tape.gradient(value, model.trainable_weights)

    values = strategy.experimental_distribute_values_from_function(split)
    value, gradients = strategy.run(step, args=(values,))
    total = strategy.reduce("SUM", value, axis=None)
    gradients = [strategy.reduce("SUM", g, axis=None) for g in gradients]
    return total.numpy(), np.concatenate([g.numpy().ravel() for g in gradients])


def relative_gap(a, b):
    return float(np.linalg.norm(np.ravel(a) - np.ravel(b)) / np.linalg.norm(np.ravel(b)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(
        ROOT, "reproductions", "results", "replica_normalization"))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    x, y, kernel = make_data()
    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    rows = []
    for name, normalizer in (("LocalCount", LocalCount), ("GlobalCount", GlobalCount)):
        reference = None
        for replicas in (1, 2, 4):
            strategy = tf.distribute.MirroredStrategy(
                devices[:replicas], cross_device_ops=tf.distribute.ReductionToOneDevice()
            )
            loss = SSDMultiboxLoss(
                NUM_CLASSES, from_logits=True, mining="per_image",
                normalizer=normalizer(),
            )
            model = build(kernel, loss, strategy)
            value, gradient = applied_loss_and_gradient(
                model, loss, strategy, x[:BATCH], y[:BATCH]
            )
            model.fit(x, y, batch_size=BATCH, epochs=args.epochs, shuffle=False,
                      verbose=0)
            weights = np.concatenate([w.numpy().ravel() for w in model.weights])
            if reference is None:
                reference = (value, gradient, weights)
            row = {
                "normalizer": name,
                "replicas": replicas,
                "loss, batch 1": f"{value:.5f}",
                "loss gap": f"{abs(value - reference[0]) / reference[0]:.2e}",
                "gradient gap": f"{relative_gap(gradient, reference[1]):.2e}",
                f"weight gap after {args.epochs} epochs": (
                    f"{relative_gap(weights, reference[2]):.2e}"
                ),
            }
            rows.append(row)
            print(row, flush=True)
    with open(os.path.join(args.out, "table.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(r[h]) for h in header) + " |" for r in rows]
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
