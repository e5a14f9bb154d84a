"""Records real per-step loss traces with `SpikeMonitor`, as small CSVs.

A 3-conv CNN on animal-mnist (the `animal-mnist` package's 28x28 images, 10
classes), batch 64, 12 epochs, Adam at 3e-3 with the learning rate x0.1 at
epochs 4 and 8 (`LearningRateScheduler`), default `SpikeMonitor()`. The
training set is a fixed random subset of `30 * 64 + last` images, so every
epoch is 30 full batches and a short last batch of `last` samples. Losses:

* `buggy`: per-sample cross-entropy divided by the batch size, which Keras
  then averages: the loss is divided by the batch size twice, and its
  batch-size exponent is exactly -1 (the short batch reads `64 / last` times
  high);
* `clean`: plain cross-entropy (exponent 0).

Each run (seeds 0, 1 and 2 of each loss and short batch) writes
`benchmarks/traces/<backend>_<loss>_<last>_seed<seed>.csv`: one row per
step (`step, epoch, batch, loss, batch_size, learning_rate`, what the monitor
recorded), after a `#` line with the command. `benchmarks/spike_detection.py`
analyses them beside its synthetic traces. Run one backend per process:

    KERAS_BACKEND=tensorflow python benchmarks/record_spike_traces.py
    KERAS_BACKEND=tensorflow python benchmarks/record_spike_traces.py --data tfdata
    KERAS_BACKEND=jax python benchmarks/record_spike_traces.py

`fit` on NumPy arrays after `keras.utils.set_random_seed` feeds the same
batches every epoch on TensorFlow (not on JAX); `--data tfdata` feeds a
`tf.data` pipeline that `shuffle(..., seed, reshuffle_each_iteration=True)`
reshuffles each epoch (`<backend>-tfdata_...csv`).

A rerun on the same machine and backend gives the same traces up to float
round-off (the seed fixes the subset, the shuffling and the initial weights);
on other hardware they agree statistically.
"""

import argparse
import gzip
import os
import pickle
import time

import keras
import numpy as np

import keras_batchfix

BATCH = 64
STEPS = 30  # full batches an epoch
EPOCHS = 12
FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "traces")
COLUMNS = ("step", "epoch", "batch", "loss", "batch_size", "learning_rate")


def animal_mnist(n, seed=0):
    """(x float32 (n, 28, 28, 1) in [0, 1], y int (n,)): a fixed random subset."""
    import animal_mnist as package

    folder = os.path.join(os.path.dirname(package.__file__), "data", "Animal_MNIST")
    with gzip.open(os.path.join(folder, "animal_data_version_3.gz")) as handle:
        x = np.asarray(pickle.load(handle), np.float32) / 255.0
    with gzip.open(os.path.join(folder, "animal_label_version_3.gz")) as handle:
        y = np.asarray(pickle.load(handle), np.int64)
    keep = np.random.default_rng(seed).permutation(len(x))[:n]
    return x[keep, :, :, None], y[keep]


def cnn():
    return keras.Sequential([
        keras.Input((28, 28, 1)),
        keras.layers.Conv2D(16, 3, activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(32, 3, activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(32, 3, activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(10),
    ])


def buggy_loss(y_true, y_pred):
    """Cross-entropy divided by the batch size, per sample: Keras divides again."""
    per_sample = keras.losses.sparse_categorical_crossentropy(y_true, y_pred, from_logits=True)
    return per_sample / keras.ops.cast(keras.ops.shape(y_pred)[0], per_sample.dtype)


def clean_loss(y_true, y_pred):
    return keras.losses.sparse_categorical_crossentropy(y_true, y_pred, from_logits=True)


def record(loss, last, seed=0, data="arrays"):
    """Trains one run; returns the monitor's steps (a dict of arrays)."""
    keras.utils.set_random_seed(seed)
    x, y = animal_mnist(STEPS * BATCH + last, seed)
    if data == "tfdata":  # reshuffled every epoch, from a fixed seed
        import tensorflow as tf

        x = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(
            len(x), seed=seed, reshuffle_each_iteration=True).batch(BATCH)
        y = None
    model = cnn()
    model.compile(keras.optimizers.Adam(3e-3), {"buggy": buggy_loss, "clean": clean_loss}[loss])
    decay = keras.callbacks.LearningRateScheduler(
        lambda epoch, rate: rate * 0.1 if epoch in (4, 8) else rate
    )
    monitor = keras_batchfix.SpikeMonitor()
    model.fit(x, y, batch_size=None if y is None else BATCH, epochs=EPOCHS,
              callbacks=[decay, monitor], verbose=0)
    return monitor.steps


def write(path, steps, command):
    with open(path, "w") as handle:
        handle.write(f"# {command}\n")
        handle.write(",".join(COLUMNS) + "\n")
        for t in range(len(steps["loss"])):
            handle.write(
                f"{int(steps['step'][t])},{int(steps['epoch'][t])},{int(steps['batch'][t])},"
                f"{steps['loss'][t]:.9g},{int(steps['batch_size'][t])},"
                f"{steps['learning_rate'][t]:.9g}\n"
            )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--losses", default="buggy,clean")
    parser.add_argument("--last", default="56,20", help="short last batch sizes")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--data", choices=("arrays", "tfdata"), default="arrays",
                        help="NumPy arrays to fit, or a tf.data pipeline reshuffled each epoch")
    args = parser.parse_args()
    backend = keras.backend.backend()
    os.makedirs(FOLDER, exist_ok=True)
    command = f"KERAS_BACKEND={backend} python benchmarks/record_spike_traces.py"
    if args.data == "tfdata":
        command += " --data tfdata"
        backend += "-tfdata"
    runs = [(loss, int(last), int(seed)) for seed in args.seeds.split(",")
            for loss in args.losses.split(",") for last in args.last.split(",")]
    for loss, last, seed in runs:
        start = time.perf_counter()
        steps = record(loss, last, seed, args.data)
        path = os.path.join(FOLDER, f"{backend}_{loss}_{last}_seed{seed}.csv")
        write(path, steps, command)
        print(f"{path}: {len(steps['loss'])} steps, {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
