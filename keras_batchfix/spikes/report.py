"""`SpikeMonitor`'s output: a summary, `steps.csv`, `steps.png`, TensorBoard.

`steps` is a dict of 1-D NumPy arrays, one entry per column of `COLUMNS`,
one value per recorded step. Nothing here imports Keras; matplotlib (the
`plots` extra) and TensorFlow (the `tensorflow` extra, for TensorBoard
through the public `tf.summary` API) are imported only when asked for:
`can_plot` tells whether matplotlib is there, and `require` checks
TensorFlow before training so that a missing one fails early.

Example:

```python
check_log_dir("runs/spikes")              # in on_train_begin
write_csv("runs/spikes/steps.csv", steps)
text = summary(steps, report, log_dir="runs/spikes")  # "SpikeMonitor: 84 steps, ..."
```
"""

import csv
import math
import os
import tempfile

import numpy as np

COLUMNS = (
    "step", "epoch", "batch", "batches", "loss", "batch_size", "learning_rate",
    "grad_norm", "score", "spike", "cause",
)

#: TensorBoard scalars written per step (under "spike_monitor/").
SCALARS = ("loss", "batch_size", "learning_rate", "grad_norm", "spike")


def check_log_dir(log_dir: str) -> None:
    """Creates `log_dir` if needed and checks that files can be written in it."""
    try:
        os.makedirs(log_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=log_dir):
            pass
    except OSError as error:
        raise ValueError(
            f"Argument `log_dir` must be a folder SpikeMonitor can create and write "
            f"to; received log_dir={log_dir!r} ({error.strerror or error})."
        ) from error


def require(tensorboard: bool) -> None:
    """Imports what `tensorboard` needs now, with an error naming the extra."""
    if tensorboard:
        _tensorflow()


def can_plot() -> bool:
    """Whether matplotlib (the `plots` extra) can be imported for `write_plot`."""
    try:
        _pyplot_figure()
    except ImportError:
        return False
    return True


def _pyplot_figure():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(
            "SpikeMonitor(plot=True) needs matplotlib: `pip install "
            "keras-batchfix[plots]` (or matplotlib), or pass plot=False."
        ) from error
    return Figure, FigureCanvasAgg


def _tensorflow():
    """TensorFlow, whose `tf.summary.scalar` the `tensorboard` package implements."""
    try:
        import tensorboard  # noqa: F401
        import tensorflow as tf
    except ImportError as error:
        raise ImportError(
            "SpikeMonitor(tensorboard=True) writes through `tf.summary.scalar` and "
            "needs TensorFlow and TensorBoard: `pip install keras-batchfix[tensorflow] "
            "tensorboard`, or pass tensorboard=False (steps.csv has the same values)."
        ) from error
    return tf


def _plain(value):
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    return value


def rows(steps: dict) -> list:
    """The steps as a list of dicts (one per step, keys `COLUMNS`)."""
    n = len(steps["loss"])
    return [{name: _plain(steps[name][t]) for name in COLUMNS} for t in range(n)]


def summary(steps: dict, report, log_dir: "str | None" = None) -> str:
    """A few lines: steps, spikes by cause, short batches, the batch-size exponent.

    `report` is the `analysis.SpikeReport` of `steps`.
    """
    n = len(steps["loss"])
    spikes = np.nonzero(steps["spike"])[0]
    losses = np.asarray(steps["loss"], dtype="float64")
    non_finite = np.nonzero(~np.isfinite(losses))[0]
    with np.errstate(invalid="ignore"):
        non_positive = np.nonzero(losses <= 0)[0]
    headline = f"SpikeMonitor: {n} steps"
    if non_finite.size:
        headline += f" ({non_finite.size} with a NaN or infinite loss)"
    lines = [f"{headline}, {spikes.size} spikes"]
    if non_finite.size:
        first = non_finite[0]
        lines.append(
            f"  NaN or infinite loss: {non_finite.size} steps, at steps "
            f"{_steps_text(steps, non_finite)} (first: epoch {_plain(steps['epoch'][first])}, "
            f"batch {_plain(steps['batch'][first])}); not scored. Keras's running mean "
            "stays NaN for the rest of an epoch after a NaN batch; "
            "keras.callbacks.TerminateOnNaN stops fit at the first."
        )
    if non_positive.size:
        lines.append(
            f"  loss <= 0: {non_positive.size} steps, at steps "
            f"{_steps_text(steps, non_positive)}; not scored (the detector works on log(loss))."
        )
    by_cause = {}
    for t in spikes:
        by_cause.setdefault(steps["cause"][t], []).append(int(steps["step"][t]))
    for cause, where in sorted(by_cause.items()):
        lines.append(f"  {cause}: {len(where)} at steps {_shown(where)}")
    with np.errstate(invalid="ignore"):
        short = steps["batch_size"] < report.usual_batch_size
    if np.any(short):
        lines.append(
            f"  short batches (< {report.usual_batch_size:g} samples): {int(short.sum())}, "
            f"of which {int(np.sum(short & steps['spike']))} spiked"
        )
    lines.append(f"  batch-size exponent: {report.exponent.message()}")
    if log_dir is not None:
        lines.append(f"  written to {log_dir}")
    return "\n".join(lines)


def _shown(where):
    """At most 8 step numbers, then "...": "6, 13, 20"."""
    return ", ".join(map(str, where[:8])) + (", ..." if len(where) > 8 else "")


def _steps_text(steps, indices):
    return _shown([int(steps["step"][t]) for t in indices])


def write_csv(path: str, steps: dict) -> str:
    """One row per step, columns `COLUMNS`. Returns `path`."""
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows(steps))
    return path


def write_plot(path: str, steps: dict) -> str:
    """Loss with the spikes marked and their causes; batch size, LR (and grad norm) beneath."""
    figure_cls, canvas_cls = _pyplot_figure()
    x = steps["step"]
    panels = [("loss", "loss"), ("batch_size", "batch size"), ("learning_rate", "learning rate")]
    if np.any(np.isfinite(steps["grad_norm"])):
        panels.append(("grad_norm", "grad norm"))
    figure = figure_cls(figsize=(10, 2.2 * len(panels) + 1))
    canvas_cls(figure)
    axes = figure.subplots(len(panels), 1, sharex=True)
    for ax, (name, label) in zip(axes, panels):
        values = steps[name]
        if name == "batch_size":
            ax.step(x, values, where="mid", color="tab:gray")
        else:
            ax.plot(x, values, lw=1, color="tab:blue")
        finite = values[np.isfinite(values)]
        if name in ("loss", "grad_norm") and finite.size and np.all(finite > 0):
            ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    spikes = np.nonzero(steps["spike"])[0]
    if spikes.size:
        axes[0].scatter(x[spikes], steps["loss"][spikes], color="tab:red", zorder=3, label="spike")
        for t in spikes:
            axes[0].annotate(
                steps["cause"][t], (x[t], steps["loss"][t]), fontsize=7,
                xytext=(3, 3), textcoords="offset points", color="tab:red",
            )
        axes[0].legend(loc="upper right")
    axes[0].set_title(f"SpikeMonitor: {spikes.size} spikes in {len(x)} steps")
    axes[-1].set_xlabel("step")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return path


def write_tensorboard(log_dir: str, steps: dict) -> str:
    """Per-step scalars `spike_monitor/<column>` through `tf.summary.scalar`."""
    tf = _tensorflow()
    writer = tf.summary.create_file_writer(log_dir)
    with writer.as_default():
        for t in range(len(steps["loss"])):
            for name in SCALARS:
                value = float(steps[name][t])
                if math.isfinite(value):
                    tf.summary.scalar(f"spike_monitor/{name}", value, step=int(steps["step"][t]))
    writer.close()
    return log_dir
