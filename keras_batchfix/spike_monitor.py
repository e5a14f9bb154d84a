"""`SpikeMonitor`: the loss of every training step, and why it spiked.

Keras 3 hands callbacks `logs["loss"]`, the running mean of the epoch, so a
one-step spike (the short last batch of an epoch, a learning-rate jump) is
hidden. `SpikeMonitor` records, for every step, the loss of that batch, its
batch size, the learning rate and optionally the global gradient norm; flags
spikes against a rolling median and MAD; attributes each to a cause it can
see; and writes a CSV, a PNG plot and optionally TensorBoard scalars.

How a step is recorded (nothing is recomputed; see `keras/src/backend/*/
trainer.py`: every train step calls `_loss_tracker.update_state(loss,
sample_weight=batch_size)`):

* TensorFlow: the tracker's `update_state` is wrapped (and the train function
  retraced) so that the compiled step also writes `(loss, batch size,
  iteration, learning rate)` into a ring buffer of `tf.Variable`s with room
  for an epoch, read at the end of each epoch (and, for epochs longer than
  2**16 steps or of unknown length, before it could overflow). The loss is
  the step's own float32 value: exact.
* torch: the same wrapper keeps the step's values as tensors (the step runs
  eagerly; no device sync per step; plain torch calls, 10-15 us a step),
  converted at the end of each epoch. Exact.
* JAX: the jitted step is stateless, so the ring buffer is a variable added
  to the loss tracker for the duration of `fit` (it travels in the trainer's
  metrics state and is removed at the end), written at the optimizer's
  iteration count modulo its size; the step's iteration and LR are taken in
  `optimizer.apply`, where the optimizer's state is mapped, and written by
  the tracker wrapper. Exact.
* Fallback (TensorFlow under `tf.distribute`, where replica-local writes are
  not possible; JAX with a `LossScaleOptimizer`): the monitor reads the
  tracker's `total` (sum of `loss_t * b_t`) and `count` (sum of `b_t`)
  between steps (on JAX from `model._jax_state`; never through
  `Callback.model`, which syncs the whole model on every access), and takes
  differences: `b_t = count_t - count_{t-1}`,
  `loss_t = (total_t - total_{t-1}) / b_t`.

Precision of the fallback's differences: `total` is a float32 accumulator, so `total_t`
carries a rounding error of up to half an ulp, about `6e-8 * total_t`, and
the recovered loss a relative error of about
`6e-8 * (sum_{s<=t} b_s loss_s) / (b_t loss_t)`: `6e-8` times the number of
steps so far in the epoch (times `B / b` for a short batch), e.g. 6e-5 after
1,000 steps, 5e-4 for a batch 8x shorter. The subtraction itself is done in
float64 on the float32 values, so it adds nothing. Inverting `logs["loss"]`
(`mean_t * seen_t - mean_{t-1} * seen_{t-1}`) would add the rounding of the
division and need the sample counts from elsewhere; `count` gives them
exactly (up to 2**24 samples per epoch). The error is far below what spike
detection looks at (the `min_scale` floor is 1e-3).
"""

import csv
import math
import os
import warnings

import keras
import numpy as np
from keras import ops

# The most steps the TensorFlow and JAX step buffers hold (5 floats each).
_MAX_BUFFER_ROWS = 2**16

COLUMNS = (
    "step",
    "epoch",
    "batch",
    "loss",
    "batch_size",
    "learning_rate",
    "grad_norm",
    "score",
    "spike",
    "cause",
)


def detect_spikes(losses, threshold=6.0, window=50, min_history=10, min_scale=1e-3):
    """Robust upward outliers of a loss curve.

    `score_t = (loss_t - median) / max(1.4826 * MAD, min_scale * |median|)`,
    the median and MAD (median absolute deviation) taken over the up to
    `window` steps before `t` (not `t` itself). `1.4826 * MAD` estimates a
    standard deviation; the `min_scale` floor keeps a nearly constant loss
    from turning rounding into spikes.

    Args:
        losses: 1-D per-step losses (NaN entries are skipped in histories).
        threshold: score above which a step is a spike.
        window: steps of history.
        min_history: steps of history needed before scoring (earlier: NaN).
        min_scale: relative floor of the scale (fraction of the median).

    Returns:
        `(scores, spikes)`: float array (NaN where unscored) and bool array.

    Example:

    >>> losses = np.ones(40); losses[30] = 5.0
    >>> detect_spikes(losses)[1].nonzero()[0]
    array([30])
    """
    losses = np.asarray(losses, dtype="float64")
    n = losses.size
    scores = np.full(n, np.nan)
    if n == 0:
        return scores, np.zeros(0, dtype=bool)
    padded = np.concatenate([np.full(window, np.nan), losses])
    # History of step t: padded[t : t + window] (the `window` steps before t).
    history = np.lib.stride_tricks.sliding_window_view(padded, window)[:n]
    counts = np.sum(np.isfinite(history), axis=1)
    enough = counts >= max(1, min_history)
    if np.any(enough):
        hist = history[enough]
        median = np.nanmedian(hist, axis=1)
        mad = np.nanmedian(np.abs(hist - median[:, None]), axis=1)
        scale = np.maximum(1.4826 * mad, min_scale * np.abs(median))
        scale = np.maximum(scale, np.finfo("float64").tiny)
        scores[enough] = (losses[enough] - median) / scale
    spikes = np.nan_to_num(scores, nan=-np.inf) > threshold
    return scores, spikes


def attribute_spikes(spikes, batch_sizes, learning_rates, lookback=2, lr_rtol=0.05):
    """Names the visible cause of each spike.

    * `"short_batch"`: the step's batch is smaller than the usual (most
      common) batch size; `"after_short_batch"`: one of the `lookback` steps
      before was (momentum carries its inflated gradient forward);
    * `"lr_change"`: the learning rate changed by more than `lr_rtol`
      (relative) at the step or up to `lookback` steps before;
    * `"unknown"`: none of these. Several causes are joined with `+`.

    Returns a list of strings, `""` for steps that are not spikes.
    """
    spikes = np.asarray(spikes, dtype=bool)
    sizes = np.asarray(batch_sizes, dtype="float64")
    rates = np.asarray(learning_rates, dtype="float64")
    usual = usual_batch_size(sizes)
    short = sizes < usual
    changed = np.zeros(len(rates), dtype=bool)
    if len(rates) > 1:
        previous, current = rates[:-1], rates[1:]
        with np.errstate(divide="ignore", invalid="ignore"):
            relative = np.abs(current - previous) / np.abs(previous)
        relative = np.where(previous == 0, np.where(current == 0, 0.0, np.inf), relative)
        changed[1:] = np.nan_to_num(relative, nan=0.0) > lr_rtol
    causes = []
    for t, is_spike in enumerate(spikes):
        if not is_spike:
            causes.append("")
            continue
        found = []
        before = slice(max(0, t - lookback), t)
        if short[t]:
            found.append("short_batch")
        elif np.any(short[before]):
            found.append("after_short_batch")
        if np.any(changed[max(0, t - lookback) : t + 1]):
            found.append("lr_change")
        causes.append("+".join(found) or "unknown")
    return causes


def usual_batch_size(batch_sizes):
    """The most common batch size (the largest of equally common ones)."""
    sizes = np.asarray(batch_sizes, dtype="float64")
    sizes = sizes[np.isfinite(sizes)]
    if sizes.size == 0:
        return float("nan")
    values, counts = np.unique(sizes, return_counts=True)
    return float(values[counts == counts.max()].max())


class SpikeMonitor(keras.callbacks.Callback):
    """Records the loss of every training step and explains its spikes.

    For every step of `fit` the monitor records the loss of that batch (not
    the epoch's running mean that `logs["loss"]` holds), its batch size, the
    learning rate (schedules and callbacks that set it included) and,
    optionally, the global gradient norm. At the end of `fit` it flags spikes
    (score above `threshold` against the rolling median and MAD of the
    previous `window` steps, see `detect_spikes`), names their cause
    (`"short_batch"`, `"after_short_batch"`, `"lr_change"` or `"unknown"`, see
    `attribute_spikes`), prints a summary, and writes into `log_dir`:
    `steps.csv`, `steps.png` (loss with spikes marked; batch size, learning
    rate and gradient norm beneath; needs matplotlib, the `plots` extra) and,
    with `tensorboard=True`, TensorBoard scalars under `log_dir/tensorboard`.

    Spikes at every short batch mean the loss scales with the batch size:
    check it with `keras_batchfix.diagnose`.

    Cost (see the module docstring for how steps are recorded, and
    `benchmarks/fit_overhead.py`): a few scalar writes in the train step
    and one read of a buffer per epoch; the train function is retraced once
    per `fit`. `gradient_norm=True` also computes
    `sqrt(sum_i ||g_i||^2)` of the gradients `optimizer.apply` receives
    (before clipping; unscaled under `LossScaleOptimizer`), one reduction per
    weight. In the fallback on JAX that value leaves the jitted step through
    `jax.debug.callback`, which costs several times a small model's step. The
    gradient norm is not available under `tf.distribute` (NaN, with a
    warning). In the fallback with `steps_per_execution=k`, a "step" is one
    execution of `k` batches (their mean loss and total batch size).

    Args:
        log_dir: folder for the CSV, the plot and TensorBoard; `None` writes
            nothing (the data stay in `monitor.steps`).
        threshold: spike score threshold (in robust standard deviations).
        window: steps of history for the rolling median and MAD.
        min_history: steps before the first score.
        min_scale: relative floor of the MAD scale (see `detect_spikes`).
        lookback: steps back a short batch or LR change may cause a spike.
        lr_rtol: relative LR change that counts as a change.
        gradient_norm: also record the global gradient norm.
        plot: write `steps.png` (when `log_dir` is set).
        tensorboard: write TensorBoard scalars (when `log_dir` is set).
        verbose: 1 prints the summary at the end of `fit`, 0 is silent.

    Attributes (after `fit`):
        steps: dict of NumPy arrays, one entry per column of `COLUMNS`.
        spikes: list of dicts (one per spike) with the same keys.

    Example:

    ```python
    monitor = keras_batchfix.SpikeMonitor(log_dir="runs/spikes", threshold=6)
    model.fit(x, y, batch_size=32, epochs=10, callbacks=[monitor])
    monitor.spikes  # [{"step": 8, "cause": "short_batch", ...}, ...]
    ```
    """

    # How steps are recorded, per backend (anything else: "state", reading
    # the loss tracker between steps).
    _MODES = {"tensorflow": "buffer", "torch": "eager", "jax": "jaxbuffer"}

    def __init__(
        self,
        log_dir=None,
        threshold=6.0,
        window=50,
        min_history=10,
        min_scale=1e-3,
        lookback=2,
        lr_rtol=0.05,
        gradient_norm=False,
        plot=True,
        tensorboard=False,
        verbose=1,
    ):
        super().__init__()
        if threshold <= 0:
            raise ValueError(f"Argument `threshold` must be > 0; received {threshold!r}.")
        if window < 2 or min_history < 1 or min_history > window:
            raise ValueError(
                "Arguments must satisfy 1 <= min_history <= window and window >= 2;"
                f" received window={window!r}, min_history={min_history!r}."
            )
        self.log_dir = None if log_dir is None else os.fspath(log_dir)
        self.threshold = float(threshold)
        self.window = int(window)
        self.min_history = int(min_history)
        self.min_scale = float(min_scale)
        self.lookback = int(lookback)
        self.lr_rtol = float(lr_rtol)
        self.gradient_norm = bool(gradient_norm)
        self.plot = bool(plot)
        self.tensorboard = bool(tensorboard)
        self.verbose = int(verbose)
        # Keras calls `on_train_batch_begin` synchronously; the monitor has no
        # batch-end hook, so it does not force synchronous batch-end dispatch.
        self.async_safe = True
        self.steps = {name: np.zeros(0) for name in COLUMNS}
        self.spikes = []

    # -- fit hooks ---------------------------------------------------------

    def on_train_begin(self, logs=None):
        model = self.model
        if getattr(model, "_loss_tracker", None) is None:
            raise ValueError(
                "SpikeMonitor needs a model compiled with a loss "
                "(`model.compile(loss=...)`)."
            )
        if self.log_dir is not None and self.plot:
            _import_pyplot_figure()  # fail now, not after training
        self._backend = keras.backend.backend()
        self._mode = self._MODES.get(self._backend, "state")
        if self._backend == "tensorflow":
            import tensorflow as tf

            # `fit` calls callbacks outside the model's strategy scope.
            with model.distribute_strategy.scope():
                if tf.distribute.has_strategy():
                    self._mode = "state"
        if self._mode == "jaxbuffer" and _innermost(model.optimizer) is not model.optimizer:
            self._mode = "state"  # LossScaleOptimizer: apply runs in a cond
        self._rows = []  # finished steps, dicts
        self._snaps = []  # state mode: (epoch, batch or None at the end, snapshot)
        self._eager_rows = []  # eager mode: [loss, batch_size, iterations, lr, grad_norm]
        self._pending = False
        self._jax_stack = None
        self._epoch = 0
        self._in_test = False
        self._grad_norms = {}
        self._patches = []
        self._optimizer = _innermost(model.optimizer)
        self._schedule = None
        if isinstance(
            getattr(self._optimizer, "_learning_rate", None),
            keras.optimizers.schedules.LearningRateSchedule,
        ):
            self._schedule = self._optimizer._learning_rate
        self._stash = None
        if self._mode in ("buffer", "jaxbuffer"):
            self._make_buffer()
        if self._mode in ("buffer", "eager", "jaxbuffer"):
            self._patch(model._loss_tracker, "update_state", self._wrap_update_state)
        if self._mode == "jaxbuffer":
            # The optimizer's variables are only mapped inside its stateless
            # apply, which JAX's train_step runs before the metrics update:
            # the apply wrapper hands the step's iteration, LR (and gradient
            # norm) to the tracker wrapper, within the same trace.
            self._patch(self._optimizer, "apply", self._wrap_apply)
        elif self.gradient_norm:
            if self._mode == "state" and self._backend == "tensorflow":
                warnings.warn(
                    "SpikeMonitor(gradient_norm=True) is not supported under "
                    "tf.distribute; recording NaN.",
                    stacklevel=2,
                )
            else:
                self._patch(self._optimizer, "apply", self._wrap_apply)
        if self._patches:
            model.make_train_function(force=True)  # trace with the hooks

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._pending = False
        self._batch_in_epoch = 0
        if self._mode == "state":
            self._locate()

    def on_train_batch_begin(self, batch, logs=None):
        if self._mode == "state":
            self._snaps.append((self._epoch, batch, self._snapshot()))
            self._pending = True
        elif self._mode in ("buffer", "jaxbuffer"):
            # Read the buffer only if the coming call could overwrite unread rows.
            if (self._since_flush + 1) * self._rows_per_call > self._capacity:
                self._flush_buffer()
            self._since_flush += 1

    def on_test_begin(self, logs=None):
        # Validation inside `fit` resets the loss tracker: read the last
        # training step first; and do not record validation steps.
        self._finish_pending()
        self._in_test = True

    def on_test_end(self, logs=None):
        self._in_test = False

    def on_epoch_end(self, epoch, logs=None):
        self._finish_pending()
        self._collect()

    def on_train_end(self, logs=None):
        self._finish_pending()
        self._collect()
        self._unpatch()
        self._analyze()
        if self.log_dir is not None:
            os.makedirs(self.log_dir, exist_ok=True)
            self.write_csv(os.path.join(self.log_dir, "steps.csv"))
            if self.plot:
                self.write_plot(os.path.join(self.log_dir, "steps.png"))
            if self.tensorboard:
                self.write_tensorboard(os.path.join(self.log_dir, "tensorboard"))
        if self.verbose:
            print(self.summary())

    # -- hooks in the train step (TensorFlow and torch) ----------------------
    #
    # The loss tracker's `update_state(loss, sample_weight=batch_size)` sees
    # the loss of the step and its batch size: the wrapper records them with
    # the step's learning rate and iteration (read before the optimizer
    # increments it, so the schedule's value for this step). TensorFlow: into
    # a ring buffer of `tf.Variable`s written inside the compiled step and
    # read at the end of each epoch (or before it could overflow). torch:
    # kept as tensors (no sync).
    # Validation steps (between on_test_begin and on_test_end) are skipped.

    def _patch(self, obj, name, wrapper):
        original = getattr(obj, name)
        setattr(obj, name, wrapper(original))
        self._patches.append((obj, name))

    def _unpatch(self):
        for obj, name in self._patches:
            if name in vars(obj):
                delattr(obj, name)
        if self._mode == "jaxbuffer":
            tracker = self._bare_model()._loss_tracker
            # By identity: `list.remove` would compare variables elementwise.
            tracker._variables[:] = [v for v in tracker._variables if v is not self._buffer]
        if self._patches:
            self.model.train_function = None  # the next fit traces a clean one
            self.model.test_function = None
        self._patches = []

    def _wrap_update_state(self, original):
        monitor = self

        def update_state(values, sample_weight=None):
            result = original(values, sample_weight=sample_weight)
            if not monitor._in_test:  # traced or run for training steps only
                monitor._record_step(values, sample_weight)
            return result

        return update_state

    def _eager_row(self, values, sample_weight):
        """torch: this step's `[loss, size, iterations, lr, grad_norm]`.

        Plain torch calls, not Keras ops (each of which converts and checks
        its arguments in Python), and no device sync: the tensors are
        converted at the end of the epoch. The iteration and learning-rate
        variables change in place, so their values are copied; a schedule's
        learning rate is evaluated from the iterations then, for all steps at
        once.
        """
        opt = self._optimizer
        lr_variable = getattr(opt, "_learning_rate", None)
        iterations = learning_rate = float("nan")
        if self._schedule is not None:
            iterations = opt._iterations.value.detach().clone()
        elif isinstance(lr_variable, keras.Variable):
            learning_rate = lr_variable.value.detach().clone()
        else:  # a callable learning rate
            learning_rate = ops.cast(opt.learning_rate, "float32")
        size = 1 if sample_weight is None else sample_weight
        return [values.detach(), size, iterations, learning_rate, float("nan")]

    @staticmethod
    def _loss_and_size(values, sample_weight):
        """The step's loss and batch size as float32 scalars (compiled modes)."""
        loss = ops.reshape(ops.cast(values, "float32"), ())
        size = ops.cast(1 if sample_weight is None else sample_weight, "float32")
        return loss, size

    def _record_step(self, values, sample_weight):
        if self._mode == "eager":
            self._eager_rows.append(self._eager_row(values, sample_weight))
        elif self._mode == "buffer":
            import tensorflow as tf

            opt = self._optimizer
            row = tf.stack(
                [
                    *self._loss_and_size(values, sample_weight),
                    ops.cast(opt.iterations, "float32"),
                    ops.cast(opt.learning_rate, "float32"),
                    float("nan"),
                ]
            )
            index = self._cursor % self._capacity
            self._buffer[index].assign(tf.cast(row, tf.float64))
            self._cursor.assign_add(1)
        elif self._mode == "jaxbuffer" and self._stash is not None:
            iterations, lr, norm = self._stash
            self._stash = None
            loss, size = self._loss_and_size(values, sample_weight)
            row = ops.stack([loss, size, ops.cast(iterations, "float32"), lr, norm])
            # The write position is the optimizer's iteration count (one per
            # step): no cursor variable, one array fewer for every step to
            # pass in and out (what the recording costs on JAX is mostly
            # those arrays, see `benchmarks/fit_overhead.py`).
            index = ops.mod(ops.cast(iterations, "int32"), self._capacity)
            self._buffer.assign(
                ops.slice_update(
                    self._buffer.value, (index, ops.zeros((), "int32")), row[None, :]
                )
            )

    def _make_buffer(self):
        # Room for a whole epoch (up to `_MAX_BUFFER_ROWS` steps) when `fit`
        # knows its length, so that the buffer is read only at the end of each
        # epoch: a read waits for the device, draining the queue of dispatched
        # steps. The writes are in place (the variables are updated in place
        # on TensorFlow, donated by the JAX trainer), whatever the capacity.
        steps_per_execution = getattr(self._bare_model(), "steps_per_execution", 1)
        self._rows_per_call = max(1, int(steps_per_execution or 1))
        epoch_steps = (self.params or {}).get("steps") or 0
        self._capacity = int(
            min(max(epoch_steps + self._rows_per_call, 256), _MAX_BUFFER_ROWS)
        )
        self._read_cursor = 0
        self._since_flush = 0
        if self._mode == "jaxbuffer":
            # A variable of the loss tracker travels in the JAX trainer's state
            # (and is removed again at the end of `fit`). Rows are written at
            # `iterations % capacity`: the read cursor starts at `iterations`.
            tracker = self._bare_model()._loss_tracker
            self._buffer = tracker.add_variable(
                (self._capacity, 5), "zeros", dtype="float32", name="spike_monitor_steps"
            )
            self._read_cursor = int(ops.convert_to_numpy(self._optimizer.iterations))
            return
        import tensorflow as tf

        self._buffer = tf.Variable(tf.zeros((self._capacity, 5), tf.float64), trainable=False)
        self._cursor = tf.Variable(0, dtype=tf.int64, trainable=False)

    def _buffer_values(self):
        """(rows written so far, table) now, as NumPy.

        On JAX the rows written are counted by the optimizer's iterations.
        """
        if self._mode == "buffer":
            return int(self._cursor.numpy()), self._buffer.numpy()
        model = self._bare_model()
        iterations = self._optimizer._iterations
        state = getattr(model, "_jax_state", None)
        if state and not getattr(model, "_jax_state_synced", True):
            i = _index_of(iterations, model.optimizer.variables)
            j = _index_of(self._buffer, model.metrics_variables)
            return (
                int(np.asarray(state["optimizer_variables"][i])),
                np.asarray(state["metrics_variables"][j]),
            )
        return int(np.asarray(iterations.value)), np.asarray(self._buffer.value)

    def _flush_buffer(self):
        end, table = self._buffer_values()
        start = self._read_cursor
        self._since_flush = 0
        if end == start:
            return
        if end - start > self._capacity:  # pragma: no cover (flushed in time)
            warnings.warn("SpikeMonitor lost steps: its buffer overflowed.", stacklevel=2)
            start = end - self._capacity
        rows = table[np.arange(start, end) % self._capacity]
        self._read_cursor = end
        self._append_rows(rows)

    def _wrap_apply(self, original):
        monitor = self
        opt = self._optimizer

        def apply(grads, trainable_variables=None):
            norm = monitor._global_norm(grads)
            if monitor._mode == "jaxbuffer":
                monitor._stash = (
                    ops.convert_to_tensor(opt.iterations),
                    ops.cast(opt.learning_rate, "float32"),
                    ops.cast(norm, "float32"),
                )
                return original(grads, trainable_variables)
            monitor._record_grad_norm(norm, opt.iterations)
            return original(grads, trainable_variables)

        return apply

    def _global_norm(self, grads):
        """`sqrt(sum_i ||g_i||^2)` in float32 (NaN without `gradient_norm`)."""
        grads = [g for g in grads if g is not None]
        if not (self.gradient_norm and grads):
            return ops.convert_to_tensor(float("nan"))
        if self._mode == "eager":  # one fused torch call, not 3 ops per weight
            import torch

            return torch.nn.utils.get_total_norm(grads)
        squares = [ops.sum(ops.square(ops.cast(g, "float32"))) for g in grads]
        return ops.sqrt(sum(squares))

    def _record_grad_norm(self, norm, iterations):
        if self._mode == "eager":
            if self._eager_rows:
                self._eager_rows[-1][4] = norm.detach()
        elif self._mode == "buffer":
            import tensorflow as tf

            index = (self._cursor - 1) % self._capacity  # this step's row
            self._buffer[index, 4].assign(tf.cast(norm, tf.float64))
        else:  # JAX: the value leaves the jitted step by a host callback
            import jax

            def receive(value, step):
                self._grad_norms[int(step)] = float(value)

            jax.debug.callback(receive, norm, ops.convert_to_tensor(iterations))

    def _append_rows(self, table):
        """Adds finished steps of the current epoch.

        `table` has one row per step: (loss, size, iterations, lr, grad norm).
        """
        for loss, size, _, lr, grad_norm in np.asarray(table, dtype="float64").tolist():
            self._rows.append(
                {
                    "step": len(self._rows),
                    "epoch": self._epoch,
                    "batch": self._batch_in_epoch,
                    "loss": loss,
                    "batch_size": size,
                    "learning_rate": lr,
                    "grad_norm": grad_norm,
                }
            )
            self._batch_in_epoch += 1

    def _eager_table(self, rows):
        """torch: the recorded rows as one float64 array (a stack per column)."""
        import torch

        table = np.full((len(rows), 5), np.nan)
        for j, column in enumerate(zip(*rows)):
            if all(isinstance(value, torch.Tensor) for value in column):
                stacked = torch.stack(column).reshape(len(rows))
                table[:, j] = ops.convert_to_numpy(stacked.double())
            else:  # Python numbers (or a mix)
                table[:, j] = [_to_float(value) for value in column]
        if self._schedule is not None:
            table[:, 3] = self._schedule_values(table[:, 2])
        return table

    def _collect(self):
        """Moves the steps recorded so far into `self._rows`."""
        if self._mode in ("buffer", "jaxbuffer"):
            self._flush_buffer()
        elif self._mode == "eager":
            rows, self._eager_rows = self._eager_rows, []
            if rows:
                self._append_rows(self._eager_table(rows))
        else:
            self._convert()

    # -- reading the model between steps (JAX, and TF under tf.distribute) ---

    def _bare_model(self):
        """The model without `Callback.model`'s side effect.

        On JAX, `Callback.model` syncs the trainer's state into the model's
        variables (and the next step gathers it again) on every access: far
        too slow between steps. The monitor reads the state itself.
        """
        model = self._model
        return getattr(model, "module", model)  # torch DDP wrapper

    def _locate(self):
        """Indices of the variables in the JAX trainer's state lists."""
        model = self._bare_model()
        tracker = model._loss_tracker
        opt = self._optimizer
        self._vars = {
            "total": (tracker.total, "metrics_variables"),
            "count": (tracker.count, "metrics_variables"),
            "iterations": (getattr(opt, "_iterations", None), "optimizer_variables"),
            "lr": (getattr(opt, "_learning_rate", None), "optimizer_variables"),
        }
        self._index = {}
        if self._backend != "jax":
            return
        lists = {
            "metrics_variables": model.metrics_variables,
            "optimizer_variables": list(model.optimizer.variables),
        }
        for key, (var, kind) in self._vars.items():
            self._index[key] = _index_of(var, lists[kind])

    def _values(self):
        """(total, count, iterations, lr) now: arrays (JAX state) or floats."""
        model = self._bare_model()
        state = None
        if self._backend == "jax":
            state = getattr(model, "_jax_state", None)
            if getattr(model, "_jax_state_synced", True):
                state = None  # the variables are current
        values = []
        for key in ("total", "count", "iterations", "lr"):
            var, kind = self._vars[key]
            if key == "lr" and not isinstance(var, keras.Variable):
                values.append(self._constant_lr())
            elif var is None:
                values.append(float("nan"))
            elif state is not None:
                index = self._index.get(key)
                values.append(
                    float("nan") if index is None or kind not in state else state[kind][index]
                )
            else:
                values.append(ops.convert_to_tensor(var))
        return values

    def _snapshot(self):
        """The values now, without waiting for the device on JAX.

        On JAX the four scalars are stacked by a jitted function into a new
        array (dispatched asynchronously: the next step donates the state's
        buffers, so they cannot be kept) and converted at the end of the
        epoch. Elsewhere they are converted now.
        """
        values = self._values()
        if self._backend == "jax":
            if self._jax_stack is None:
                import jax
                import jax.numpy as jnp

                self._jax_stack = jax.jit(
                    lambda *xs: jnp.stack([jnp.asarray(x, jnp.float32) for x in xs])
                )
            return self._jax_stack(*values)
        return [float(ops.convert_to_numpy(v)) if not isinstance(v, float) else v for v in values]

    def _constant_lr(self):
        lr = getattr(self._optimizer, "_learning_rate", None)
        if self._schedule is not None:
            return float("nan")  # evaluated from the iterations in _convert
        if callable(lr):
            return float(ops.convert_to_numpy(lr()))
        try:
            return float(lr)
        except (TypeError, ValueError):
            return float("nan")

    def _finish_pending(self):
        """State mode: the snapshot after the last step of the epoch."""
        if self._mode != "state" or not self._pending:
            return
        self._pending = False
        self._snaps.append((self._epoch, None, self._snapshot()))

    def _convert(self):
        """State mode: step losses from differences of the tracker's sums.

        Snapshot `k` is taken before step `k` of the epoch (so after step
        `k - 1`): step `k` has the learning rate and iteration of snapshot `k`
        and the loss `(total_{k+1} - total_k) / (count_{k+1} - count_k)`.
        """
        if not self._snaps:
            return
        if self._backend == "jax":
            import jax

            jax.effects_barrier()  # gradient-norm callbacks have arrived
        snaps, self._snaps = self._snaps, []
        values = np.array(
            [np.asarray(snap, dtype="float64").reshape(4) for _, _, snap in snaps]
        )
        if self._schedule is not None:
            values[:, 3] = self._schedule_values(values[:, 2])
        for k in range(len(snaps) - 1):
            (epoch, batch, _), (next_epoch, _, _) = snaps[k], snaps[k + 1]
            if batch is None or next_epoch != epoch:
                continue
            total, count, iteration, rate = values[k]
            size = values[k + 1, 1] - count
            loss = (values[k + 1, 0] - total) / size if size > 0 else float("nan")
            self._rows.append(
                {
                    "step": len(self._rows),
                    "epoch": epoch,
                    "batch": batch,
                    "loss": loss,
                    "batch_size": size,
                    "learning_rate": float(rate),
                    "grad_norm": self._grad_norms.get(int(iteration), float("nan")),
                }
            )

    def _schedule_values(self, iterations):
        steps = iterations
        accumulation = getattr(self._optimizer, "gradient_accumulation_steps", None)
        if accumulation:
            steps = np.floor(steps / accumulation)
        try:  # most schedules are elementwise: one call for all steps
            values = ops.convert_to_numpy(
                self._schedule(ops.convert_to_tensor(steps.astype("int64")))
            )
            values = np.asarray(values, dtype="float64")
            if values.shape == steps.shape:
                return values
        except Exception:  # noqa: BLE001 (schedules with ops.cond etc.)
            pass
        return np.array(
            [float(ops.convert_to_numpy(self._schedule(int(s)))) for s in steps]
        )

    # -- analysis and output -------------------------------------------------

    def _analyze(self):
        rows = self._rows
        steps = {
            name: np.array([row.get(name, np.nan) for row in rows], dtype="float64")
            for name in COLUMNS
            if name not in ("score", "spike", "cause")
        }
        scores, spikes = detect_spikes(
            steps["loss"],
            threshold=self.threshold,
            window=self.window,
            min_history=self.min_history,
            min_scale=self.min_scale,
        )
        causes = attribute_spikes(
            spikes,
            steps["batch_size"],
            steps["learning_rate"],
            lookback=self.lookback,
            lr_rtol=self.lr_rtol,
        )
        for name in ("step", "epoch", "batch"):
            steps[name] = steps[name].astype("int64")
        steps["score"] = scores
        steps["spike"] = spikes
        steps["cause"] = np.array(causes, dtype=object)
        self.steps = steps
        self.spikes = [
            {name: _plain(steps[name][t]) for name in COLUMNS}
            for t in np.nonzero(spikes)[0]
        ]

    def summary(self):
        """A few lines: steps, spikes by cause, and what to do about them."""
        steps = self.steps
        n = len(steps["loss"])
        lines = [
            f"SpikeMonitor: {n} steps, {len(self.spikes)} spikes (score > "
            f"{self.threshold:g} robust SDs over the median of the previous "
            f"{self.window} steps)"
        ]
        if n == 0:
            return lines[0]
        usual = usual_batch_size(steps["batch_size"])
        by_cause = {}
        for spike in self.spikes:
            by_cause.setdefault(spike["cause"], []).append(spike["step"])
        for cause, where in sorted(by_cause.items()):
            shown = ", ".join(str(s) for s in where[:8]) + (", ..." if len(where) > 8 else "")
            lines.append(f"  {cause}: {len(where)} at steps {shown}")
        short = steps["batch_size"] < usual
        if np.any(short):
            flagged = np.sum(short & steps["spike"])
            lines.append(
                f"  short batches (< {usual:g}): {int(np.sum(short))}, of which "
                f"{int(flagged)} spiked"
            )
            if flagged and flagged >= 0.5 * np.sum(short):
                lines.append(
                    "  -> the loss likely scales with the batch size: check it "
                    "with keras_batchfix.diagnose(loss, y_true, y_pred)"
                )
        if self.log_dir is not None:
            lines.append(f"  written to {self.log_dir}")
        return "\n".join(lines)

    def write_csv(self, path):
        """Writes one row per step (columns `COLUMNS`)."""
        steps = self.steps
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(COLUMNS)
            for t in range(len(steps["loss"])):
                writer.writerow([_plain(steps[name][t]) for name in COLUMNS])
        return path

    def write_plot(self, path):
        """Writes the PNG: loss with spikes, batch size, LR (and grad norm)."""
        figure_cls, canvas_cls = _import_pyplot_figure()
        steps = self.steps
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
        spike_steps = np.nonzero(steps["spike"])[0]
        if spike_steps.size:
            axes[0].scatter(
                x[spike_steps], steps["loss"][spike_steps], color="tab:red", zorder=3,
                label="spike",
            )
            for t in spike_steps:
                axes[0].annotate(
                    steps["cause"][t], (x[t], steps["loss"][t]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points", color="tab:red",
                )
            axes[0].legend(loc="upper right")
        axes[0].set_title(f"SpikeMonitor: {len(spike_steps)} spikes in {len(x)} steps")
        axes[-1].set_xlabel("step")
        figure.tight_layout()
        figure.savefig(path, dpi=100)
        return path

    def write_tensorboard(self, log_dir):
        """Writes the per-step scalars as TensorBoard events.

        Uses TensorFlow's core `tf.summary.write` with the scalar plugin's
        metadata, so the `tensorboard` package is needed to view the events,
        not to write them.
        """
        import tensorflow as tf
        from tensorflow.core.framework import summary_pb2

        metadata = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars")
        )
        writer = tf.summary.create_file_writer(log_dir)
        steps = self.steps
        with writer.as_default():
            for t in range(len(steps["loss"])):
                step = int(steps["step"][t])
                for name in ("loss", "batch_size", "learning_rate", "grad_norm", "spike"):
                    value = float(steps[name][t])
                    if math.isfinite(value):
                        tf.summary.write(
                            f"spike_monitor/{name}",
                            tf.constant(value, dtype=tf.float32),
                            step=step,
                            metadata=metadata,
                        )
        writer.flush()
        writer.close()
        return log_dir


def _index_of(variable, variables):
    """Position of `variable` in `variables`, by identity (None if absent)."""
    return next((i for i, v in enumerate(variables) if v is variable), None)


def _innermost(optimizer):
    while hasattr(optimizer, "inner_optimizer"):
        optimizer = optimizer.inner_optimizer
    return optimizer


def _to_float(value):
    if isinstance(value, (int, float, np.generic)):
        return float(value)
    return float(ops.convert_to_numpy(value))  # also from a GPU tensor


def _plain(value):
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    return value


def _import_pyplot_figure():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:  # pragma: no cover (matplotlib installed here)
        raise ImportError(
            "SpikeMonitor's plot needs matplotlib: `pip install "
            "keras-batchfix[plots]` (or matplotlib), or pass plot=False."
        ) from error
    return Figure, FigureCanvasAgg
