"""Tests of `keras_batchfix.SpikeMonitor` (run under each KERAS_BACKEND)."""

import csv
import importlib.util
import os
import sys
import warnings

import keras
import numpy as np
import pytest
from keras import ops

import keras_batchfix
from keras_batchfix.spikes import report as spike_report
from tests.helpers.training import strategy_scope


def ssd_style_loss(y_true, y_pred):
    """ssd_keras's normalization: per-sample values over the batch's positives.

    `y_true[:, 0]` is the target, `y_true[:, 1]` the sample's positives.
    Keras then divides by the batch size a second time.
    """
    positives = y_true[:, 1]
    per_sample = positives * ops.square(y_pred[:, 0] - y_true[:, 0])
    return per_sample / ops.maximum(ops.sum(positives), 1.0)


def user_data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(100, 4)).astype("float32")
    target = 3.0 + 0.05 * x @ np.array([1.0, -1.0, 0.5, 0.5])
    positives = rng.integers(1, 4, size=100)
    return x, np.stack([target, positives], axis=1).astype("float32")


def user_fit(loss, learning_rate, monitor, epochs=12, callbacks=()):
    """The user's case: 100 samples in batches of 16 (the last of 4), SGD with momentum."""
    keras.utils.set_random_seed(0)
    x, y = user_data()
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, kernel_initializer="zeros")])
    model.compile(optimizer=keras.optimizers.SGD(learning_rate, momentum=0.9), loss=loss)
    model.fit(x, y, batch_size=16, epochs=epochs, verbose=0, callbacks=[*callbacks, monitor])
    return model


def test_user_case_short_batches_flagged(capsys):
    monitor = keras_batchfix.SpikeMonitor()
    user_fit(ssd_style_loss, 0.01, monitor)
    steps = monitor.steps
    assert len(steps["loss"]) == 12 * 7
    np.testing.assert_array_equal(steps["batch_size"], ([16] * 6 + [4]) * 12)
    short = steps["batch_size"] == 4
    flagged = short & steps["spike"] & (steps["cause"] == "short_batch")
    exponent = monitor.report.exponent
    out = capsys.readouterr().out
    assert "short batches (< 16 samples): 12, of which" in out
    assert "batch-size exponent: in this run your loss scales as B^-" in out
    # On TensorFlow, after keras.utils.set_random_seed, every epoch holds the
    # same batches: the short batch's own 4 samples move its loss by the same
    # factor each epoch, which the trace cannot tell from the batch size.
    assert exponent.repeated == (keras.backend.backend() == "tensorflow")
    if exponent.repeated:
        assert exponent.verdict in ("other", "inconclusive")
        assert "the batches repeat from epoch to epoch" in out
        assert "divided by the batch size twice" not in out
    else:
        assert exponent.verdict == "inverse_batch_size" and flagged.sum() == 12
        assert "divided by the batch size twice; wrap it in keras_batchfix.compensate" in out


def test_user_case_compensated_nothing_flagged():
    monitor = keras_batchfix.SpikeMonitor(verbose=0)
    # compensate takes Keras's 1/16 out of the loss: the same step needs 1/16 of the LR.
    lr_callback = keras.callbacks.LearningRateScheduler(lambda epoch, lr: 0.01 / 16 * 0.9**epoch)
    user_fit(keras_batchfix.compensate(ssd_style_loss), 0.01 / 16, monitor, callbacks=[lr_callback])
    steps = monitor.steps
    assert np.sum(steps["batch_size"] == 4) == 12
    assert monitor.spikes == [] and not np.any(steps["spike"])
    assert monitor.report.exponent.verdict == "invariant"
    # The rate a callback sets each epoch is recorded for every step.
    expected = 0.01 / 16 * 0.9 ** steps["epoch"]
    np.testing.assert_allclose(steps["learning_rate"], expected, rtol=1e-6)


def frozen_fit(monitor, batch_size=16, n=100, epochs=2, earlier_fits=0, strategy=None,
               validation=True, **compile_kwargs):
    """Fits a linear model at LR 0; returns the per-batch MSEs it had (one epoch)."""
    rng = np.random.default_rng(7)
    x = rng.normal(size=(n, 3)).astype("float32")
    y = rng.normal(size=(n, 2)).astype("float32")
    keras.utils.set_random_seed(4)
    with strategy_scope(strategy):
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse", **compile_kwargs)
    for _ in range(earlier_fits):
        model.fit(x, y, batch_size=batch_size, epochs=1, verbose=0)
    model.fit(
        x, y, batch_size=batch_size, epochs=epochs, shuffle=False, verbose=0,
        validation_data=(x[:10], 10 * y[:10]) if validation else None, callbacks=[monitor],
    )
    w, b = model.get_weights()
    per_sample = np.mean((x @ w + b - y) ** 2, axis=1)
    return model, [per_sample[i : i + batch_size] for i in range(0, n, batch_size)]


@pytest.mark.parametrize("earlier_fits", [0, 2])
def test_step_losses_match_an_independent_computation(earlier_fits):
    # LR 0: the weights never change, so each batch's loss can be computed
    # directly. Validation checks that the epoch's samples are read before
    # evaluate() resets the loss metric; earlier fits that the optimizer's
    # iteration count does not matter.
    monitor = keras_batchfix.SpikeMonitor(verbose=0)
    _, batches = frozen_fit(monitor, earlier_fits=earlier_fits)
    np.testing.assert_allclose(monitor.steps["loss"], [np.mean(b) for b in batches] * 2, rtol=1e-5)
    np.testing.assert_array_equal(monitor.steps["batch_size"], [len(b) for b in batches] * 2)
    np.testing.assert_array_equal(monitor.steps["epoch"], [0] * 7 + [1] * 7)
    np.testing.assert_array_equal(monitor.steps["step"], np.arange(14))


def attributes(model):
    """What a monitor could change: the names of the model's, its optimizer's and its
    metrics' attributes and variables, and which of their methods are set on the instance."""
    objects = [model, model.optimizer, *model.metrics]
    return (
        [sorted(vars(obj)) for obj in objects],
        [[k for k, v in vars(obj).items() if callable(v)] for obj in objects],
        [len(obj.variables) for obj in objects],
    )


class Interrupt(keras.callbacks.Callback):
    """Raises KeyboardInterrupt before batch `batch` of epoch `epoch` (once)."""

    def __init__(self, epoch, batch):
        super().__init__()
        self.at, self.epoch, self.armed = (epoch, batch), None, True

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        if self.armed and (self.epoch, batch) == self.at:
            self.armed = False
            raise KeyboardInterrupt


def test_nothing_to_undo_when_fit_raises():
    # A KeyboardInterrupt in the middle of an epoch: Keras calls no
    # on_train_end. The monitor changed nothing on the model, so a later fit
    # without it trains exactly as a model that never had it, and what was
    # recorded can still be analyzed.
    rng = np.random.default_rng(8)
    x = rng.normal(size=(100, 3)).astype("float32")
    y = rng.normal(size=(100, 1)).astype("float32")
    weights = []
    for with_monitor in (True, False):
        keras.utils.set_random_seed(5)
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
        model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), loss="mse")
        model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
        before = attributes(model)
        monitor = keras_batchfix.SpikeMonitor(verbose=0)
        callbacks = [monitor] if with_monitor else []
        with pytest.raises(KeyboardInterrupt):
            model.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0,
                      callbacks=[*callbacks, Interrupt(epoch=0, batch=3)])
        assert attributes(model) == before
        model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
        weights.append(model.get_weights())
        if with_monitor:
            assert monitor.analyze() == [] and len(monitor.steps["loss"]) == 0  # no epoch ended
    for a, b in zip(*weights):
        np.testing.assert_array_equal(a, b)


def test_analyze_after_an_interrupted_fit():
    monitor = keras_batchfix.SpikeMonitor(verbose=0)
    with pytest.raises(KeyboardInterrupt):
        user_fit(ssd_style_loss, 0.01, monitor, epochs=3, callbacks=[Interrupt(epoch=1, batch=3)])
    monitor.analyze()
    assert len(monitor.steps["loss"]) == 7  # the one epoch that ended


def bias_fit(monitor, learning_rate, epochs, n=16 * 8, callbacks=()):
    """Inputs are zeros, so only the bias learns: every batch has the same loss
    but for the learning rate's (and the batch size's) effect."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, kernel_initializer="zeros")])
    model.compile(optimizer=keras.optimizers.SGD(learning_rate), loss="mse")
    x = np.zeros((n, 2), "float32")
    y = np.ones((n, 1), "float32")
    model.fit(x, y, batch_size=16, epochs=epochs, shuffle=False, verbose=0,
              callbacks=[*callbacks, monitor])
    return model


def test_schedule_step_is_a_learning_rate_change():
    # One step at a rate that overshoots the bias (e -> -3 e), then one that
    # nearly converges it: the loss of exactly the step after the jump is 9x.
    s = 25
    values = [0.005, 2.0, 0.45, 0.005]
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay([s - 1, s, s + 1], values)
    monitor = keras_batchfix.SpikeMonitor(verbose=0)
    bias_fit(monitor, schedule, epochs=5)
    steps = monitor.steps
    expected = np.select([steps["step"] < s, steps["step"] == s, steps["step"] == s + 1],
                         values[:3], values[3])
    np.testing.assert_allclose(steps["learning_rate"], expected, rtol=1e-6)
    assert steps["loss"][s + 1] / steps["loss"][s] == pytest.approx(9.0, rel=0.05)
    assert s + 1 in np.nonzero(steps["spike"])[0]
    assert steps["cause"][s + 1] == "lr_change"


class LogGradNorm(keras.callbacks.Callback):
    """Puts a gradient norm into the step's logs, as a custom `train_step` returning
    `logs["grad_norm"]` would (here: 1, and 10 at `spike_step`)."""

    def __init__(self, spike_step):
        super().__init__()
        self.spike_step, self.step = spike_step, 0

    def on_train_batch_end(self, batch, logs=None):
        logs["grad_norm"] = 10.0 if self.step == self.spike_step else 1.0
        self.step += 1


@pytest.mark.parametrize("grad_norm", [False, True])
def test_bad_sample_is_unexplained_or_a_gradient_norm_spike(grad_norm):
    # A frozen model; one sample of the fifth batch is far off: that
    # batch's loss spikes each epoch, and nothing the monitor sees explains it
    # unless the logs carry a gradient norm that spikes with it.
    rng = np.random.default_rng(9)
    x = rng.normal(size=(96, 3)).astype("float32")
    keras.utils.set_random_seed(6)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    w, b = model.get_weights()
    y = (x @ w + b + 1.0 + 0.1 * rng.normal(size=(96, 1))).astype("float32")  # errors ~1
    y[72] += 20.0
    monitor = keras_batchfix.SpikeMonitor(verbose=0)
    callbacks = [LogGradNorm(spike_step=10), monitor] if grad_norm else [monitor]
    model.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0, callbacks=callbacks)
    steps = monitor.steps
    np.testing.assert_array_equal(np.nonzero(steps["spike"])[0], [4, 10, 16])
    if grad_norm:
        assert list(steps["cause"][[4, 10, 16]]) == ["unknown", "grad_norm", "unknown"]
        assert steps["grad_norm"][10] == 10.0
    else:
        assert set(steps["cause"][[4, 10, 16]]) == {"unknown"}
        assert np.all(np.isnan(steps["grad_norm"]))


def test_writes_csv_plot_and_tensorboard(tmp_path):
    log_dir = tmp_path / "new" / "spikes"  # created in on_train_begin
    tensorboard = all(importlib.util.find_spec(name) for name in ("tensorflow", "tensorboard"))
    monitor = keras_batchfix.SpikeMonitor(log_dir=log_dir, tensorboard=tensorboard, verbose=0)
    user_fit(ssd_style_loss, 0.01, monitor, epochs=3)
    with open(log_dir / "steps.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 21 == len(monitor.steps["loss"])
    assert list(rows[0]) == list(spike_report.COLUMNS)
    assert [float(r["loss"]) for r in rows] == pytest.approx(list(monitor.steps["loss"]))
    assert [r["spike"] for r in rows].count("True") == len(monitor.spikes) > 0
    with open(log_dir / "steps.png", "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    if tensorboard:
        events = read_events(log_dir / "tensorboard")
        losses = [value for tag, _, value in sorted(events) if tag == "spike_monitor/loss"]
        assert losses == pytest.approx(list(monitor.steps["loss"]), rel=1e-6)


def read_events(folder):
    """(tag, step, value) of the scalar events, read back with TensorFlow."""
    import tensorflow as tf

    found = []
    for name in os.listdir(folder):
        for record in tf.data.TFRecordDataset(os.path.join(folder, name)):
            event = tf.compat.v1.Event.FromString(record.numpy())
            for value in event.summary.value:
                found.append((value.tag, event.step, float(tf.make_ndarray(value.tensor))))
    return found


@pytest.mark.skipif(
    all(importlib.util.find_spec(name) for name in ("tensorflow", "tensorboard")),
    reason="TensorFlow and TensorBoard are installed",
)
def test_tensorboard_without_its_packages_fails_before_training(tmp_path):
    monitor = keras_batchfix.SpikeMonitor(log_dir=tmp_path, tensorboard=True, verbose=0)
    with pytest.raises(ImportError, match="tensorboard=False"):
        user_fit(ssd_style_loss, 0.01, monitor, epochs=1)
    assert monitor.steps["loss"].size == 0


def test_log_dir_checked_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monitor = keras_batchfix.SpikeMonitor(log_dir=blocker / "spikes", verbose=0)
    with pytest.raises(ValueError, match=r"`log_dir`.*a_file/spikes"):
        user_fit(ssd_style_loss, 0.01, monitor, epochs=1)
    assert monitor.steps["loss"].size == 0


@pytest.fixture
def no_matplotlib(monkeypatch):
    """matplotlib as if it were not installed."""
    for name in list(sys.modules):
        if name == "matplotlib" or name.startswith("matplotlib."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)


def test_without_matplotlib_the_default_skips_the_plot(tmp_path, no_matplotlib):
    monitor = keras_batchfix.SpikeMonitor(log_dir=tmp_path, verbose=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        user_fit(ssd_style_loss, 0.01, monitor, epochs=1)
    assert (tmp_path / "steps.csv").exists()
    assert not (tmp_path / "steps.png").exists()


def test_without_matplotlib_plot_true_warns_once(tmp_path, no_matplotlib):
    monitor = keras_batchfix.SpikeMonitor(log_dir=tmp_path, plot=True, verbose=0)
    with pytest.warns(UserWarning, match=r"keras-batchfix\[plots\]") as caught:
        user_fit(ssd_style_loss, 0.01, monitor, epochs=1)
        user_fit(ssd_style_loss, 0.01, monitor, epochs=1)  # a second fit: no new warning
    assert sum("matplotlib" in str(w.message) for w in caught) == 1
    assert (tmp_path / "steps.csv").exists()
    assert not (tmp_path / "steps.png").exists()
    assert len(monitor.steps["loss"]) > 0


def test_plot_false_writes_no_png(tmp_path):
    monitor = keras_batchfix.SpikeMonitor(log_dir=tmp_path, plot=False, verbose=0)
    user_fit(ssd_style_loss, 0.01, monitor, epochs=1)
    assert (tmp_path / "steps.csv").exists()
    assert not (tmp_path / "steps.png").exists()


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="`threshold` must be a number > 0; received threshold=0"):
        keras_batchfix.SpikeMonitor(threshold=0)
    with pytest.raises(ValueError, match="`verbose` must be 0 or 1"):
        keras_batchfix.SpikeMonitor(verbose=2)
    with pytest.raises(TypeError, match="window"):
        keras_batchfix.SpikeMonitor(window=5)  # the old argument: now `half_window`


@pytest.mark.filterwarnings("ignore:Your input ran out of data")
def test_batches_of_unknown_number_and_of_varying_size():
    # A generator: `params["steps"]` is None, the last batch is found from the
    # epoch's total. Then batches that are not all full but the last: the
    # sizes cannot be known from the logs, and the monitor says so.
    def batches(sizes):
        rng = np.random.default_rng(10)
        for size in sizes:
            yield rng.normal(size=(size, 3)).astype("float32"), np.zeros((size, 1), "float32")

    def fit(sizes):
        keras.utils.set_random_seed(7)
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
        model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
        monitor = keras_batchfix.SpikeMonitor(verbose=0)
        model.fit(batches(sizes), epochs=1, shuffle=False, verbose=0, callbacks=[monitor])
        w, b = model.get_weights()
        expected = [np.mean((xb @ w + b) ** 2) for xb, _ in batches(sizes)]
        return monitor, expected

    monitor, expected = fit([16, 16, 16, 5])
    np.testing.assert_array_equal(monitor.steps["batch_size"], [16, 16, 16, 5])
    np.testing.assert_allclose(monitor.steps["loss"], expected, rtol=1e-5)
    with pytest.warns(UserWarning, match="not all of one size"):
        monitor, _ = fit([16, 8, 16, 5])
    assert np.all(np.isnan(monitor.steps["batch_size"][:-1]))


@pytest.mark.skipif(
    keras.backend.backend() == "torch", reason="Keras's torch trainer has no steps_per_execution"
)
@pytest.mark.parametrize("steps_per_execution", [3, 4])  # 7 batches: 3+3+1, 4+3
def test_steps_per_execution(steps_per_execution):
    # Keras calls the batch hooks once per execution: a row is an execution
    # (its batches' mean loss, their total size).
    monitor = keras_batchfix.SpikeMonitor(verbose=0)
    _, batches = frozen_fit(monitor, steps_per_execution=steps_per_execution)
    groups = [batches[i : i + steps_per_execution]
              for i in range(0, len(batches), steps_per_execution)]
    expected = [np.mean(np.concatenate(group)) for group in groups]
    np.testing.assert_allclose(monitor.steps["loss"], expected * 2, rtol=1e-5)
    np.testing.assert_array_equal(
        monitor.steps["batch_size"], [sum(len(b) for b in group) for group in groups] * 2
    )
    np.testing.assert_array_equal(monitor.steps["batches"], [len(g) for g in groups] * 2)


def test_under_tf_distribute(mirrored_strategy):
    # 100 samples in batches of 16 over 2 replicas: the short batch splits 2 + 2.
    monitor = keras_batchfix.SpikeMonitor(verbose=0)
    _, batches = frozen_fit(monitor, strategy=mirrored_strategy)
    np.testing.assert_allclose(monitor.steps["loss"], [np.mean(b) for b in batches] * 2, rtol=1e-5)
    np.testing.assert_array_equal(monitor.steps["batch_size"], [len(b) for b in batches] * 2)
