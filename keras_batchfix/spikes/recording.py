"""How `SpikeMonitor` records each step of `fit`, through public Keras API only.

A recorder is driven by the monitor's hooks (`StepRecorder`, the interface)
and hands back, at the end of each epoch, one row per step: the loss of that
step's batch, its size, the learning rate and, when the logs carry it, the
gradient norm. The default, `LogsRecorder`, changes nothing on the model (no
patched method, no retrace, no extra variable), so there is nothing to undo
when `fit` raises.

What `LogsRecorder` reads, and how a step's loss follows:

* `logs["loss"]` in `on_train_batch_end`: Keras's running mean of the epoch,
  `m_t = (sum_{s<=t} b_s l_s) / n_t` with `n_t = sum_{s<=t} b_s`;
* `count`, the samples seen so far, of the model's loss metric
  (`model.metrics`, named `"loss"`): read three times an epoch, after its
  first step (in `on_train_batch_begin` of the second), before its last one
  (when `params["steps"]` is known) and after it (in `on_test_begin`, before
  validation resets it, or `on_epoch_end`). That gives the full batch size
  `B = n_0`, checks that every step but the last had `B` samples (as every
  Keras data adapter batches: arrays, `tf.data.Dataset.batch`, a torch
  `DataLoader`, `PyDataset`), and gives the last batch exactly:
  `b_last = n_last - n_{last-1}`. Then

      l_t = (m_t n_t - m_{t-1} n_{t-1}) / b_t.

  The relative error from `m_t` being float32 is about `6e-8 (t + 1) B / b_t`
  (6e-5 after 1000 steps): far below what spike detection looks at.
* the learning rate: for a `LearningRateSchedule` (found through
  `optimizer.get_config()`), the schedule at each step's iteration
  (`optimizer.iterations` at the start of `fit` plus the steps since), exact
  on every backend; otherwise `optimizer.learning_rate`, read with the
  counts (before the epoch's first, second and last steps; the first after
  every `on_epoch_begin`), so that the changes of epoch-level callbacks
  (`LearningRateScheduler`, `ReduceLROnPlateau`) are seen at their step. A
  rate that a callback changes at some other step shows from the next read:
  reading it every step would cost a device read each step (and on JAX a
  state sync, the trainer keeping the optimizer's state out of its
  variables during an epoch).

On JAX, `Callback.model` syncs the trainer's state into the variables; the
recorder goes through it only at those three points of an epoch. Per step it
only stores floats, in `on_train_batch_end`, which Keras may run in a worker
thread (the monitor is `async_safe`): the step is not held up.

With `steps_per_execution = k > 1` Keras calls the batch hooks once per
execution of `k` batches, so a row is an execution (the mean loss of its
batches, their total size): a short batch's spike is diluted `k` times.

Example (what `SpikeMonitor` does with it):

```python
recorder = LogsRecorder()
recorder.start(callback)          # in on_train_begin
...                               # batch_begin / batch_end / test_begin
rows = recorder.epoch_end(epoch)  # {"loss": array, "batch_size": array, ...}
```
"""

import warnings

import keras
import numpy as np

#: Columns of the rows a recorder returns, one value per step.
ROW_COLUMNS = ("epoch", "batch", "batches", "loss", "batch_size", "learning_rate", "grad_norm")


class StepRecorder:
    """The interface: the monitor calls these from its hooks, in this order.

    `start(callback)` in `on_train_begin`; per step `batch_begin(batch)` and
    `batch_end(batch, logs)`; `test_begin()` in `on_test_begin`;
    `epoch_end(epoch)` returns the epoch's rows (a dict of 1-D arrays keyed
    by `ROW_COLUMNS`). Keras calls no hook when `fit` raises, so a recorder
    must leave the model as it found it at every point: `LogsRecorder`
    changes nothing on it.
    """

    def start(self, callback):
        raise NotImplementedError

    def batch_begin(self, batch):
        """Called before each step (or execution of steps)."""

    def batch_end(self, batch, logs):
        raise NotImplementedError

    def test_begin(self):
        """Called when validation starts (before it resets the metrics)."""

    def epoch_end(self, epoch):
        raise NotImplementedError


class LogsRecorder(StepRecorder):
    """Steps from `logs` and the loss metric's sample count (module docstring).

    Args:
        grad_norm_key: the key of the step's gradient norm in `logs`, if a
            custom `train_step` returns one (NaN when absent).
    """

    def __init__(self, grad_norm_key="grad_norm"):
        self.grad_norm_key = grad_norm_key
        self._begin_epoch()  # `evaluate` outside `fit` calls test_begin

    def start(self, callback):
        self._callback = callback
        model = callback.model
        _loss_metric(model)  # fails now if there is none
        optimizer = model.optimizer
        self._optimizer = getattr(optimizer, "inner_optimizer", optimizer)
        self._schedule = _schedule_of(self._optimizer)
        self._iteration = int(keras.ops.convert_to_numpy(self._optimizer.iterations))
        self.steps_per_execution = int(getattr(model, "steps_per_execution", 1) or 1)
        self._begin_epoch()

    def _begin_epoch(self):
        self._logged = {}  # end batch -> (running mean, grad norm)
        self._rates = {}  # begin batch -> learning rate (read before the step)
        self._first = None  # samples after the first row
        self._before_last = None  # samples before the last row (steps known)
        self._total = None  # samples after the epoch's last row

    def _count(self):
        """Samples seen so far this epoch (`Callback.model` syncs JAX's state)."""
        return float(keras.ops.convert_to_numpy(_loss_metric(self._callback.model).count))

    def batch_begin(self, batch):
        steps = self._callback.params.get("steps")
        if batch == 0:
            self._read_rate(batch)
        elif self._first is None:
            self._first = self._count()
            self._read_rate(batch)
        if steps and batch > 0 and batch + self.steps_per_execution >= steps:
            self._before_last = self._count()
            self._read_rate(batch)

    def _read_rate(self, batch):
        """`optimizer.learning_rate` now, for the steps from `batch` on (no schedule)."""
        if self._schedule is None:
            self._rates[int(batch)] = float(
                keras.ops.convert_to_numpy(self._optimizer.learning_rate)
            )

    def batch_end(self, batch, logs):
        logs = logs or {}
        grad_norm = logs.get(self.grad_norm_key, float("nan"))
        self._logged[int(batch)] = (float(logs.get("loss", float("nan"))), float(grad_norm))

    def test_begin(self):
        if self._logged and self._total is None:
            self._total = self._count()

    def epoch_end(self, epoch):
        if self._total is None:
            self._total = self._count()
        ends = np.array(sorted(self._logged), dtype="int64")
        if ends.size == 0:
            self._begin_epoch()
            return {name: np.zeros(0) for name in ROW_COLUMNS}
        means, grad_norms = (
            np.array([self._logged[b][i] for b in ends], dtype="float64") for i in range(2)
        )
        steps = self._callback.params.get("steps")
        if steps:  # Keras reports an execution's end as `begin + k - 1`, even past the last
            ends = np.minimum(ends, steps - 1)
        batches = np.diff(ends, prepend=-1)
        seen = self._samples_seen(ends, batches)
        sums = means * seen
        sizes = np.diff(seen, prepend=0.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            losses = np.diff(sums, prepend=0.0) / sizes
        if self._schedule is not None:
            rates = _evaluate(self._schedule, self._iteration + ends)
        else:  # the rate read last before each row's first batch
            read = np.array(sorted(self._rates), dtype="int64")
            values = np.array([self._rates[b] for b in read] + [np.nan])
            rates = values[np.searchsorted(read, ends - batches + 1, side="right") - 1]
        self._iteration += int(ends[-1]) + 1
        rows = {
            "epoch": np.full(ends.size, epoch, dtype="int64"),
            "batch": ends,
            "batches": batches,
            "loss": losses,
            "batch_size": sizes,
            "learning_rate": rates,
            "grad_norm": grad_norms,
        }
        self._begin_epoch()
        return rows

    def _samples_seen(self, ends, batches):
        """`n_t` of every row; NaN (with a warning) where it cannot be known."""
        total = self._total
        if ends.size == 1:
            return np.array([total])
        batch_size = self._first / batches[0]
        seen = batch_size * (ends + 1.0)
        seen[-1] = total
        before_last = seen[-2] if self._before_last is None else self._before_last
        last = total - before_last
        if before_last != seen[-2] or not 0 < last <= batch_size * batches[-1]:
            warnings.warn(
                "SpikeMonitor: the batches of this epoch are not all of one size "
                f"but the last ({batch_size:g} samples after the first step, "
                f"{before_last:g} before the last, {total:g} in all); their "
                "losses and sizes are recorded as NaN.",
                stacklevel=2,
            )
            seen[:-1] = np.nan
        return seen


def _loss_metric(model):
    """The model's loss metric (a `keras.metrics.Mean` named "loss")."""
    for metric in model.metrics:
        if metric.name == "loss" and hasattr(metric, "count"):
            return metric
    raise ValueError(
        "SpikeMonitor needs a model compiled with a loss (`model.compile(loss=...)`); "
        f"this model's metrics are {[m.name for m in model.metrics]}."
    )


def _schedule_of(optimizer):
    """The optimizer's `LearningRateSchedule`, or None for a fixed or variable rate."""
    config = optimizer.get_config().get("learning_rate")
    if not isinstance(config, dict):
        return None
    return keras.optimizers.schedules.deserialize(config)


def _evaluate(schedule, iterations):
    """The schedule's rate at each iteration, as float64.

    One call on all iterations where the schedule is elementwise; one call
    per iteration where it is not (PiecewiseConstantDecay on torch writes in
    place into a scalar, for one).
    """
    try:
        steps = keras.ops.convert_to_tensor(iterations.astype("int64"))
        values = np.asarray(keras.ops.convert_to_numpy(schedule(steps)), dtype="float64")
        if values.shape == iterations.shape:
            return values
    except (RuntimeError, TypeError, ValueError):
        pass
    return np.array([float(keras.ops.convert_to_numpy(schedule(int(i)))) for i in iterations])
