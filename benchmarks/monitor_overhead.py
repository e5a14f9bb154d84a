"""Cost of `SpikeMonitor` on the step time of a small model.

Runs `fit` on a small MLP with and without the monitor (and with the
gradient norm), interleaving the configurations, and prints each one's
steady-state step time as a ratio to the baseline measured in the same run
(epoch 0 of every `fit`, which includes tracing, is left out).

    KERAS_BACKEND=jax python benchmarks/monitor_overhead.py

Run it once per backend (the backend is fixed per process).
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_batchfix  # noqa: E402


class EpochTimer(keras.callbacks.Callback):
    """Wall time of each epoch (epoch hooks only: no per-step cost)."""

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.times.append(time.perf_counter() - self._start)

    def on_train_begin(self, logs=None):
        self.times = []


def make_model(features, width):
    model = keras.Sequential(
        [
            keras.Input((features,)),
            keras.layers.Dense(width, activation="relu"),
            keras.layers.Dense(width, activation="relu"),
            keras.layers.Dense(1),
        ]
    )
    model.compile(optimizer=keras.optimizers.SGD(1e-3, momentum=0.9), loss="mse")
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--features", type=int, default=32)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.samples, args.features)).astype("float32")
    y = rng.normal(size=(args.samples, 1)).astype("float32")
    configs = {
        "baseline": lambda: [],
        "SpikeMonitor": lambda: [keras_batchfix.SpikeMonitor(verbose=0)],
        "SpikeMonitor(gradient_norm=True)": lambda: [
            keras_batchfix.SpikeMonitor(gradient_norm=True, verbose=0)
        ],
    }
    models = {name: make_model(args.features, args.width) for name in configs}
    times = {name: [] for name in configs}
    steps = -(-args.samples // args.batch_size)
    for _ in range(args.repeats):
        for name, callbacks in configs.items():
            timer = EpochTimer()
            models[name].fit(
                x, y, batch_size=args.batch_size, epochs=args.epochs, verbose=0,
                callbacks=[timer, *callbacks()],
            )
            times[name].extend(t / steps for t in timer.times[1:])

    base = statistics.median(times["baseline"])
    print(
        f"backend={keras.backend.backend()} steps/epoch={steps} batch={args.batch_size} "
        f"MLP {args.features}-{args.width}-{args.width}-1, "
        f"{args.repeats}x{args.epochs - 1} timed epochs per configuration"
    )
    print(f"{'configuration':36s} {'step (us)':>10s} {'ratio':>7s}")
    for name in configs:
        step = statistics.median(times[name])
        print(f"{name:36s} {step * 1e6:10.1f} {step / base:7.3f}")


if __name__ == "__main__":
    main()
