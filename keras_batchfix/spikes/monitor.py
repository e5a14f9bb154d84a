"""`SpikeMonitor`: the loss of every training step, and why it spiked."""

import os
import warnings

import keras
import numpy as np

from keras_batchfix.spikes import analysis as spike_analysis
from keras_batchfix.spikes import report as spike_report
from keras_batchfix._keras_compat import print_msg
from keras_batchfix.spikes.recording import ROW_COLUMNS
from keras_batchfix.spikes.recording import LogsRecorder


class SpikeMonitor(keras.callbacks.Callback):
    """Records the loss of every training step and explains its spikes.

    Keras's `logs["loss"]` is the epoch's running mean, which hides a
    one-step spike. For every step of `fit` the monitor records the loss of
    that batch, its batch size, the learning rate and, if the logs carry one,
    the gradient norm (`keras_batchfix.spikes.recording`: public API only,
    nothing on the model is changed). At the end of `fit` it flags spikes
    and names their causes (`keras_batchfix.spikes.analysis`): with
    `y_t = log(loss_t)`, step `t` is a spike when

        (y_t - (median(y_{t-h..t-1}) + median(y_{t+1..t+h})) / 2) / scale_t > threshold

    and it is above both medians (the scale is the robust spread of that
    residual around `t`), or when it is a short batch and the run's
    batch-size exponent (`loss ~ B**beta`, each short batch against its
    neighbouring full ones, pooled over epochs with a 95% interval) is named
    -1. A verdict is named only when the interval supports it, otherwise
    "inconclusive" with what would settle it. Causes: `"short_batch"`,
    `"after_short_batch"`, `"lr_change"`, `"grad_norm"`, `"unknown"`. It
    prints a summary (with the exponent, e.g. "B^-1.00 ± 0.05: divided by
    the batch size twice") and
    writes into `log_dir`: `steps.csv`, `steps.png` (needs matplotlib, the
    `plots` extra) and, with `tensorboard=True`, scalars under
    `log_dir/tensorboard` (through `tf.summary`; needs TensorFlow). See
    `docs/spike_monitor.md`.

    Args:
        log_dir: folder for the outputs, created and checked in
            `on_train_begin`; `None` writes nothing.
        plot: write `steps.png` (when `log_dir` is set). `None` (default):
            when matplotlib is installed. `True` without matplotlib writes
            everything else and warns.
        tensorboard: write TensorBoard scalars (when `log_dir` is set).
        verbose: 1 prints the summary at the end of `fit`, 0 is silent.
        recorder: a `keras_batchfix.spikes.recording.StepRecorder`; default `LogsRecorder()`.
        **detector: fields of `keras_batchfix.spikes.analysis.DetectorConfig` (`threshold`,
            `half_window`, `neighbours`, `lookback`, `lr_rtol`, ...).

    Attributes (after `fit`, or `analyze()` after an interrupted one):
        steps: dict of NumPy arrays, one per column of `keras_batchfix.spikes.report.COLUMNS`.
        spikes: list of dicts, one per spike, with the same keys.
        report: the `keras_batchfix.spikes.analysis.SpikeReport` (`report.exponent`, ...).

    Example:

    ```python
    monitor = keras_batchfix.SpikeMonitor(log_dir="runs/spikes")
    model.fit(x, y, batch_size=16, epochs=12, callbacks=[monitor])
    monitor.spikes  # [{"step": 6, "cause": "short_batch", "loss": ...}, ...]
    ```
    """

    def __init__(self, log_dir: "str | os.PathLike | None" = None, plot: "bool | None" = None,
                 tensorboard: bool = False, verbose: int = 1, recorder=None, **detector):
        super().__init__()
        if verbose not in (0, 1):
            raise ValueError(
                f"Argument `verbose` must be 0 or 1; received verbose={verbose!r}."
            )
        if log_dir is not None and not isinstance(log_dir, (str, bytes, os.PathLike)):
            raise ValueError(
                "Argument `log_dir` must be a folder path (a str or os.PathLike) or "
                f"None; received log_dir={log_dir!r}."
            )
        self.config = spike_analysis.DetectorConfig(**detector)
        self.log_dir = None if log_dir is None else os.fspath(log_dir)
        self.plot = None if plot is None else bool(plot)
        self.tensorboard = bool(tensorboard)
        self.verbose = verbose
        self.recorder = LogsRecorder() if recorder is None else recorder
        # The batch-end hook only stores floats: Keras may run it in a worker
        # thread and need not wait for each step's logs.
        self.async_safe = True
        self._plotting = False
        self._plot_warned = False
        self._epochs = []
        self.steps = self._table([])
        self.spikes = []
        self.report = None

    def on_train_begin(self, logs=None):
        if self.log_dir is not None:
            spike_report.check_log_dir(self.log_dir)
            spike_report.require(self.tensorboard)
        self._plotting = self.log_dir is not None and self._can_plot()
        self._epochs = []
        self.recorder.start(self)
        if getattr(self.recorder, "steps_per_execution", 1) > 1 and self.verbose:
            print_msg(
                f"SpikeMonitor: steps_per_execution={self.recorder.steps_per_execution}: "
                "one row per execution (its batches' mean loss, their total size)."
            )

    def on_train_batch_begin(self, batch, logs=None):
        self.recorder.batch_begin(batch)

    def on_train_batch_end(self, batch, logs=None):
        self.recorder.batch_end(batch, logs)

    def on_test_begin(self, logs=None):
        self.recorder.test_begin()

    def on_epoch_end(self, epoch, logs=None):
        self._epochs.append(self.recorder.epoch_end(epoch))

    def on_train_end(self, logs=None):
        self.analyze()
        if self.log_dir is not None:
            spike_report.write_csv(os.path.join(self.log_dir, "steps.csv"), self.steps)
            if self._plotting:
                spike_report.write_plot(os.path.join(self.log_dir, "steps.png"), self.steps)
            if self.tensorboard:
                folder = os.path.join(self.log_dir, "tensorboard")
                spike_report.write_tensorboard(folder, self.steps)
        if self.verbose:
            print_msg(spike_report.summary(self.steps, self.report, self.log_dir))

    def _can_plot(self):
        """Whether `steps.png` is written: `plot`, and matplotlib installed."""
        if self.plot is False:
            return False
        if spike_report.can_plot():
            return True
        if self.plot and not self._plot_warned:
            self._plot_warned = True
            warnings.warn(
                "SpikeMonitor(plot=True): matplotlib is not installed, so steps.png "
                "is not written (the other outputs are). `pip install "
                "keras-batchfix[plots]` adds it; plot=False silences this warning.",
                stacklevel=2,
            )
        return False

    def analyze(self) -> list:
        """Flags and attributes the spikes of the epochs recorded so far.

        `fit` calls it at its end; after an interrupted `fit` (Keras then
        calls no `on_train_end`), call it yourself. Returns `self.spikes`.
        """
        steps = self._table(self._epochs)
        self.report = spike_analysis.analyze(
            steps["loss"], steps["batch_size"], steps["learning_rate"],
            steps["grad_norm"], self.config,
        )
        steps["score"] = self.report.scores.score
        steps["spike"] = self.report.spikes
        steps["cause"] = np.array(self.report.causes, dtype=object)
        self.steps = steps
        self.spikes = [row for row in spike_report.rows(steps) if row["spike"]]
        return self.spikes

    @staticmethod
    def _table(epochs):
        """The epochs' rows as one dict of arrays, with the run's step index."""
        steps = {
            name: np.concatenate([rows[name] for rows in epochs]) if epochs else np.zeros(0)
            for name in ROW_COLUMNS
        }
        steps["step"] = np.arange(len(steps["loss"]))
        steps["score"] = np.full(len(steps["loss"]), np.nan)
        steps["spike"] = np.zeros(len(steps["loss"]), dtype=bool)
        steps["cause"] = np.full(len(steps["loss"]), "", dtype=object)
        return steps
