"""Cost of `compensate` and `SpikeMonitor` on the `fit` step time of a small model.

Each backend runs in its own process (see `harness.run_worker`). There, a
small MLP is trained with `fit` on Keras's `"mse"` (the baseline), on
`compensate(keras.losses.MeanSquaredError())` (the wrapper's cost: its own
reduction instead of Keras's) and with `SpikeMonitor`, all interleaved. Each `fit` runs four
epochs and the last three are timed (the first includes tracing). The ratio of
a configuration is the median over timed epochs of its step time divided by
the baseline's step time in the same epoch of the same repeat (pairs measured
close in time cancel most of the drift of a shared machine). "min ratio"
divides the fastest epoch of a configuration by the fastest baseline epoch: on
a busy machine, where other work only ever adds time, it is the steadier
estimate. "cpu ratio" is the median of paired ratios of the process's CPU time
per epoch (all threads): other processes' load inflates it far less than wall
time, so it is the estimate to read on a shared machine. "baseline again" is a
second model identical to the baseline, measured the same way: how far its
ratios stray from 1 is how much of any other ratio is noise. "hooks" is the
share of the timed epoch spent in the monitor's own Python code (its hooks;
see `HookTimer`): measured inside the same steps, it is immune to the drift
that blurs the ratios, and it is the monitor's whole cost, since the monitor
leaves the compiled step as it is (it reads `logs` and, three times an
epoch, the loss metric's sample count). On JAX the run also counts the
operations of the traced loss (`compute_loss`) for the baseline and
`compensate` (a count, not a time, exact on any machine).

    python benchmarks/fit_overhead.py            # all three backends
    python benchmarks/fit_overhead.py --backends jax --repeats 9
    python benchmarks/fit_overhead.py --quick    # smoke run
"""

import argparse
import os
import statistics
import time

from harness import emit, run_worker

TIMED_EPOCHS = 3  # per `fit`, after one that includes tracing

CONFIGS = (
    "baseline",
    "baseline again",  # a second, identical model: the run's noise floor
    "compensate(mse)",
    "SpikeMonitor",
)


def worker(args):
    import keras
    import numpy as np

    import keras_batchfix

    class HookTimer:
        """Wall time spent in a monitor's own Python code, in total.

        Wraps (on the instance) the monitor's hooks: everything the monitor
        does during `fit` (the batch-end hook may run in Keras's worker
        thread; its time is counted all the same).
        """

        METHODS = ("on_train_batch_begin", "on_train_batch_end", "on_test_begin",
                   "on_epoch_end")

        def __init__(self, monitor):
            self.seconds = 0.0
            for name in self.METHODS:
                setattr(monitor, name, self._timed(getattr(monitor, name)))

        def _timed(self, method):
            def timed(*args, **kwargs):
                start = time.perf_counter()
                try:
                    return method(*args, **kwargs)
                finally:
                    self.seconds += time.perf_counter() - start

            return timed

    class EpochTimer(keras.callbacks.Callback):
        """Wall and CPU time of each epoch (epoch hooks only: no per-step cost).

        Passed last, so the epoch it times includes the other callbacks'
        `on_epoch_end` (the monitor assembles the epoch's rows there).
        """

        def __init__(self, hooks=None):
            super().__init__()
            self.hooks = hooks

        def on_train_begin(self, logs=None):
            self.times, self.cpu_times, self.hook_times = [], [], []

        def on_epoch_begin(self, epoch, logs=None):
            self.hook_start = self.hooks.seconds if self.hooks else 0.0
            self.start = time.perf_counter()
            self.cpu_start = time.process_time()

        def on_epoch_end(self, epoch, logs=None):
            self.times.append(time.perf_counter() - self.start)
            self.cpu_times.append(time.process_time() - self.cpu_start)
            hooks = self.hooks.seconds if self.hooks else 0.0
            self.hook_times.append(hooks - self.hook_start)

    def make_model(name):
        model = keras.Sequential(
            [
                keras.Input((args.features,)),
                keras.layers.Dense(args.width, activation="relu"),
                keras.layers.Dense(args.width, activation="relu"),
                keras.layers.Dense(1),
            ]
        )
        loss = "mse"
        if name == "compensate(mse)":
            loss = keras_batchfix.compensate(keras.losses.MeanSquaredError())
        model.compile(optimizer=keras.optimizers.SGD(1e-3, momentum=0.9), loss=loss)
        return model

    def callbacks(name):
        """(callbacks for `fit`, the epoch timer): the timer comes last."""
        if not name.startswith("SpikeMonitor"):
            timer = EpochTimer()
            return [timer], timer
        monitor = keras_batchfix.SpikeMonitor(verbose=0)
        timer = EpochTimer(HookTimer(monitor))
        return [monitor, timer], timer

    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.samples, args.features)).astype("float32")
    y = rng.normal(size=(args.samples, 1)).astype("float32")
    steps = -(-args.samples // args.batch_size)
    models = {name: make_model(name) for name in CONFIGS}
    step_times = {name: [] for name in CONFIGS}
    cpu_times = {name: [] for name in CONFIGS}
    hook_fractions = {name: [] for name in CONFIGS}
    for _ in range(args.repeats):
        for name in CONFIGS:
            fit_callbacks, timer = callbacks(name)
            models[name].fit(
                x, y, batch_size=args.batch_size, epochs=1 + TIMED_EPOCHS,
                verbose=0, callbacks=fit_callbacks,
            )
            for epoch in range(1, 1 + TIMED_EPOCHS):  # the first one traces
                step_times[name].append(timer.times[epoch] / steps)
                cpu_times[name].append(timer.cpu_times[epoch] / steps)
                hook_fractions[name].append(
                    timer.hook_times[epoch] / timer.times[epoch]
                )
    base = step_times["baseline"]
    cpu_base = cpu_times["baseline"]
    loss_ops = {}
    if keras.backend.backend() == "jax":
        loss_ops = {
            name: traced_loss_ops(models[name], y)
            for name in ("baseline", "compensate(mse)")
        }
    emit(
        {
            name: {
                "loss_ops": loss_ops.get(name),
                "step_us": statistics.median(step_times[name]) * 1e6,
                "ratio": statistics.median(
                    t / b for t, b in zip(step_times[name], base)
                ),
                "min_ratio": min(step_times[name]) / min(base),
                "cpu_ratio": statistics.median(
                    t / b for t, b in zip(cpu_times[name], cpu_base)
                ),
                "hooks": statistics.median(hook_fractions[name]),
            }
            for name in CONFIGS
        }
    )


def traced_loss_ops(model, y):
    """Operations in the loss of a train step as traced (JAX): `compute_loss`.

    A count, not a time: the same on every machine and every run, so it
    settles what wall times on a shared machine cannot (a loss with fewer
    operations than Keras's own reduction adds no work).
    """
    import jax

    batch = y[:32]  # any values of the targets' shape trace the same program
    jaxpr = jax.make_jaxpr(
        lambda y_true, y_pred: model.compute_loss(
            x=None, y=y_true, y_pred=y_pred, training=True
        )
    )(batch, batch)
    return len(jaxpr.jaxpr.eqns)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="tensorflow,jax,torch")
    parser.add_argument("--samples", type=int, default=4100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--features", type=int, default=32)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.samples, args.repeats = 260, 1
    if args.worker:
        worker(args)
        return
    forwarded = [
        f"--samples={args.samples}", f"--batch-size={args.batch_size}",
        f"--features={args.features}", f"--width={args.width}",
        f"--repeats={args.repeats}",
    ]
    steps = -(-args.samples // args.batch_size)
    print(
        f"fit overhead: MLP {args.features}-{args.width}-{args.width}-1, "
        f"batch {args.batch_size}, {steps} steps per timed epoch, "
        f"{args.repeats} repeats (median of paired ratios)"
    )
    print(
        f"{'backend':11s} {'configuration':34s} {'step (us)':>10s} {'ratio':>7s}"
        f" {'min ratio':>9s} {'cpu ratio':>9s} {'hooks':>6s}"
    )
    loss_ops = {}
    for backend in args.backends.split(","):
        results = run_worker(os.path.abspath(__file__), backend, forwarded)
        for name in CONFIGS:
            row = results[name]
            if row["loss_ops"] is not None:
                loss_ops[name] = row["loss_ops"]
            print(
                f"{backend:11s} {name:34s} {row['step_us']:10.1f} {row['ratio']:7.3f}"
                f" {row['min_ratio']:9.3f} {row['cpu_ratio']:9.3f}"
                f" {100 * row['hooks']:5.2f}%"
            )
    if loss_ops:
        base = loss_ops["baseline"]
        print("operations in the traced loss (JAX jaxpr equations): " + ", ".join(
            f"{name} {count} ({count / base:.2f}x)" for name, count in loss_ops.items()
        ))


if __name__ == "__main__":
    main()
