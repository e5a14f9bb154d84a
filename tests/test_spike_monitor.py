"""Tests of `keras_batchfix.SpikeMonitor` (run under each KERAS_BACKEND)."""

import csv
import os
import sys

import keras
import numpy as np
import pytest
from keras import ops

import keras_batchfix
from keras_batchfix import spike_monitor
from keras_batchfix.spike_monitor import attribute_spikes
from keras_batchfix.spike_monitor import detect_spikes
from tests.training import strategy_scope

BATCH = 32


def seed_loss(y_true, y_pred):
    """Seed 000: per-sample values divided by the batch's positive count.

    `y_true[:, 0]` is the target, `y_true[:, 1]` the sample's positives.
    Keras then averages over the batch: the loss is e^2 / B.
    """
    per_sample = y_true[:, 1] * ops.square(y_pred[:, 0] - y_true[:, 0])
    return per_sample / ops.maximum(ops.sum(y_true[:, 1]), 1.0)


def bias_model():
    # Inputs are zeros, so only the bias learns: every sample is the same and
    # the loss of a batch does not depend on which samples it holds. The loss
    # decreases monotonically unless the batch size or the LR intervenes.
    model = keras.Sequential(
        [keras.Input((2,)), keras.layers.Dense(1, kernel_initializer="zeros")]
    )
    return model


def synthetic_data(n):
    x = np.zeros((n, 2), "float32")
    y = np.stack([np.ones(n), np.full(n, 3.0)], axis=1).astype("float32")
    return x, y


def fit(loss, n, epochs, learning_rate, monitor, callbacks=()):
    keras.utils.set_random_seed(0)
    model = bias_model()
    model.compile(optimizer=keras.optimizers.SGD(learning_rate), loss=loss)
    x, y = synthetic_data(n)
    model.fit(
        x, y, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0,
        callbacks=[monitor, *callbacks],
    )
    return model


def test_seed_000_spikes_at_every_short_batch(capsys):
    n = BATCH * 8 + 4  # 9 steps per epoch, the last of 4 samples
    monitor = keras_batchfix.SpikeMonitor(min_history=5)
    fit(seed_loss, n, epochs=6, learning_rate=0.05, monitor=monitor)
    steps = monitor.steps
    assert len(steps["loss"]) == 6 * 9
    expected_sizes = ([BATCH] * 8 + [4]) * 6
    np.testing.assert_array_equal(steps["batch_size"], expected_sizes)
    short = np.nonzero(steps["batch_size"] == 4)[0]
    spiked = np.nonzero(steps["spike"])[0]
    np.testing.assert_array_equal(spiked, short)
    assert all(spike["cause"] == "short_batch" for spike in monitor.spikes)
    # The spike is the B / b = 8x inflation of the loss (the bias hardly
    # moves in one step): compare each short batch with the step before.
    ratios = steps["loss"][short] / steps["loss"][short - 1]
    assert np.all((ratios > 6.5) & (ratios < 8.5))
    out = capsys.readouterr().out
    assert "short_batch: 6" in out and "keras_batchfix.diagnose" in out


def test_no_spikes_with_the_fixed_loss():
    n = BATCH * 8 + 4
    monitor = keras_batchfix.SpikeMonitor(min_history=5, verbose=0)

    def schedule(epoch, lr):  # recorded per step, read from the optimizer
        return 0.005 if epoch < 3 else 0.004

    lr_callback = keras.callbacks.LearningRateScheduler(schedule)
    fit(
        keras_batchfix.compensate(seed_loss), n, epochs=6, learning_rate=0.005,
        monitor=monitor, callbacks=[lr_callback],
    )
    steps = monitor.steps
    assert len(steps["loss"]) == 54 and np.sum(steps["batch_size"] == 4) == 6
    assert not np.any(steps["spike"]) and monitor.spikes == []
    expected = [schedule(epoch, None) for epoch in steps["epoch"]]
    np.testing.assert_allclose(steps["learning_rate"], expected, rtol=1e-6)


def test_spike_planted_at_a_learning_rate_change():
    # One step at a learning rate that overshoots the bias (e -> -3 e), one
    # that nearly converges it (e -> -0.1 e): the loss of exactly one step,
    # the one after the jump, is 9x its predecessor.
    s = 25
    values = [0.005, 2.0, 0.45, 0.005]
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay(
        [s - 1, s, s + 1], values
    )
    monitor = keras_batchfix.SpikeMonitor(min_history=5, verbose=0)
    fit(keras_batchfix.compensate(seed_loss), BATCH * 8, 5, schedule, monitor)
    steps = monitor.steps
    expected_lr = np.where(
        steps["step"] < s, values[0],
        np.where(steps["step"] == s, values[1],
                 np.where(steps["step"] == s + 1, values[2], values[3])),
    )
    np.testing.assert_allclose(steps["learning_rate"], expected_lr, rtol=1e-6)
    np.testing.assert_array_equal(np.nonzero(steps["spike"])[0], [s + 1])
    assert monitor.spikes[0]["cause"] == "lr_change"
    assert steps["loss"][s + 1] / steps["loss"][s] == pytest.approx(9.0, rel=0.05)


@pytest.fixture(params=["native", "state"])
def recording_mode(request, monkeypatch):
    """Each backend's own recording, and the tracker-differencing fallback."""
    if request.param == "state":
        monkeypatch.setattr(keras_batchfix.SpikeMonitor, "_MODES", {})
    return request.param


def test_step_losses_match_an_independent_computation(recording_mode):
    # With a learning rate of 0 the weights never change, so the loss of each
    # batch can be computed directly; validation data checks that the last
    # step of an epoch is read before evaluate() resets the tracker.
    rng = np.random.default_rng(3)
    x = rng.normal(size=(100, 3)).astype("float32")
    y = rng.normal(size=(100, 2)).astype("float32")
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    monitor = keras_batchfix.SpikeMonitor(verbose=0)
    model.fit(
        x, y, batch_size=16, epochs=2, shuffle=False, verbose=0,
        validation_data=(x[:10], 10 * y[:10]), callbacks=[monitor],
    )
    w, b = model.get_weights()
    expected, sizes = [], []
    for start in range(0, 100, 16):
        xb, yb = x[start : start + 16], y[start : start + 16]
        expected.append(np.mean((xb @ w + b - yb) ** 2))
        sizes.append(len(xb))
    np.testing.assert_allclose(monitor.steps["loss"], expected * 2, rtol=1e-5)
    np.testing.assert_array_equal(monitor.steps["batch_size"], sizes * 2)
    np.testing.assert_array_equal(monitor.steps["epoch"], [0] * 7 + [1] * 7)
    # The hooks are gone: the tracker has its own two variables again, and
    # the model trains and evaluates without the monitor.
    assert len(model._loss_tracker.variables) == 2
    assert "update_state" not in vars(model._loss_tracker)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    full = float(np.mean((x @ w + b - y) ** 2))  # lr 0: weights unchanged
    assert model.evaluate(x, y, verbose=0) == pytest.approx(full, rel=1e-5)


def test_gradient_norm_matches_numpy():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(64, 3)).astype("float32")
    y = rng.normal(size=(64, 1)).astype("float32")
    keras.utils.set_random_seed(2)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    lr = 0.1
    model.compile(optimizer=keras.optimizers.SGD(lr), loss="mse")
    w, b = model.get_weights()
    monitor = keras_batchfix.SpikeMonitor(gradient_norm=True, verbose=0)
    model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0, callbacks=[monitor])
    expected = []
    for start in (0, 32):  # plain SGD: w <- w - lr * g, computed by hand
        xb, yb = x[start : start + 32], y[start : start + 32]
        residual = xb @ w + b - yb
        grad_w = 2 * xb.T @ residual / len(xb)
        grad_b = 2 * residual.sum(axis=0) / len(xb)
        expected.append(np.sqrt(np.sum(grad_w**2) + np.sum(grad_b**2)))
        w, b = w - lr * grad_w, b - lr * grad_b
    np.testing.assert_allclose(monitor.steps["grad_norm"], expected, rtol=1e-4)
    assert "apply" not in vars(model.optimizer)  # the patch is removed


def test_writes_csv_plot_and_tensorboard(tmp_path):
    n = BATCH * 4 + 4
    log_dir = tmp_path / "spikes"
    monitor = keras_batchfix.SpikeMonitor(
        log_dir=log_dir, min_history=3, tensorboard=True, verbose=0
    )
    fit(seed_loss, n, epochs=3, learning_rate=0.05, monitor=monitor)
    with open(log_dir / "steps.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 15 == len(monitor.steps["loss"])
    assert [float(r["loss"]) for r in rows] == pytest.approx(list(monitor.steps["loss"]))
    assert [r["spike"] for r in rows].count("True") == len(monitor.spikes) > 0
    with open(log_dir / "steps.png", "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    events = read_events(log_dir / "tensorboard")
    losses = [value for tag, _, value in sorted(events) if tag == "spike_monitor/loss"]
    assert losses == pytest.approx(list(monitor.steps["loss"]), rel=1e-6)


def test_missing_matplotlib_fails_before_training(tmp_path, monkeypatch):
    for name in list(sys.modules):
        if name == "matplotlib" or name.startswith("matplotlib."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monitor = keras_batchfix.SpikeMonitor(log_dir=tmp_path, verbose=0)
    with pytest.raises(ImportError, match=r"keras-batchfix\[plots\]"):
        fit(seed_loss, BATCH, 1, 0.1, monitor)
    assert not (tmp_path / "steps.csv").exists()


def test_detect_spikes_properties():
    rng = np.random.default_rng(5)
    losses = 1.0 + 0.05 * rng.normal(size=300)
    losses[[100, 200]] += [1.0, 0.3]  # 20 and 6 standard deviations
    scores, spikes = detect_spikes(losses, threshold=8.0)
    assert list(np.nonzero(spikes)[0]) == [100]
    _, spikes = detect_spikes(losses, threshold=4.0)
    assert {100, 200} <= set(np.nonzero(spikes)[0])
    assert np.all(np.isnan(scores[:10])) and np.all(np.isfinite(scores[10:]))
    # A smooth decay or a downward jump is never a spike.
    assert not np.any(detect_spikes(np.exp(-np.arange(200) / 30.0))[1])
    drop = np.ones(100)
    drop[50:] = 0.1
    assert not np.any(detect_spikes(drop)[1])


def test_attribute_spikes():
    spikes = np.zeros(12, bool)
    spikes[[3, 4, 8, 11]] = True
    sizes = np.array([32] * 12)
    sizes[3] = 5
    rates = np.array([0.1] * 7 + [0.2] * 5)
    causes = attribute_spikes(spikes, sizes, rates, lookback=2)
    assert causes[3] == "short_batch"
    assert causes[4] == "after_short_batch"
    assert causes[8] == "lr_change"  # LR changed at step 7
    assert causes[11] == "unknown"
    assert causes[0] == ""


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="threshold"):
        keras_batchfix.SpikeMonitor(threshold=0)
    with pytest.raises(ValueError, match="min_history"):
        keras_batchfix.SpikeMonitor(window=5, min_history=10)


def read_events(folder):
    """(tag, step, value) of the scalar events, read back with TensorFlow."""
    import tensorflow as tf

    found = []
    for name in os.listdir(folder):
        for record in tf.data.TFRecordDataset(os.path.join(folder, name)):
            event = tf.compat.v1.Event.FromString(record.numpy())
            for value in event.summary.value:
                number = tf.make_ndarray(value.tensor)
                found.append((value.tag, event.step, float(number)))
    return found


@pytest.mark.parametrize("max_rows", [None, 64])
def test_long_epochs(max_rows, monkeypatch):
    # 300 steps per epoch. By default the buffer has room for the epoch and is
    # read at its end (and at the end of `fit`); with room for only 64 steps
    # (as for epochs longer than the maximum) it is read mid-epoch and wraps
    # around. The losses must be the batches' either way.
    if keras.backend.backend() == "torch":
        pytest.skip("torch keeps its steps in a list, no buffer")
    if max_rows is not None:
        monkeypatch.setattr(spike_monitor, "_MAX_BUFFER_ROWS", max_rows)
    rng = np.random.default_rng(6)
    x = rng.normal(size=(600, 2)).astype("float32")
    y = rng.normal(size=(600, 1)).astype("float32")
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    monitor = keras_batchfix.SpikeMonitor(verbose=0)
    reads = []
    flush = monitor._flush_buffer
    monkeypatch.setattr(monitor, "_flush_buffer", lambda: reads.append(1) or flush())
    model.fit(x, y, batch_size=2, epochs=1, shuffle=False, verbose=0, callbacks=[monitor])
    w, b = model.get_weights()
    expected = np.mean(((x @ w + b - y) ** 2).reshape(300, 2), axis=1)
    np.testing.assert_allclose(monitor.steps["loss"], expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(monitor.steps["batch"], np.arange(300))
    assert len(reads) == (2 if max_rows is None else 2 + 300 // 64)


def lr_zero_fit(monitor, batch_size, strategy=None, earlier_fits=0, **compile_kwargs):
    """Fits a frozen (LR 0) linear model; returns the per-batch MSE it had.

    `earlier_fits` unmonitored one-epoch fits come first.
    """
    rng = np.random.default_rng(7)
    x = rng.normal(size=(100, 3)).astype("float32")
    y = rng.normal(size=(100, 2)).astype("float32")
    keras.utils.set_random_seed(4)
    with strategy_scope(strategy):
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse", **compile_kwargs)
    for _ in range(earlier_fits):
        model.fit(x, y, batch_size=batch_size, epochs=1, verbose=0)
    model.fit(
        x, y, batch_size=batch_size, epochs=2, shuffle=False, verbose=0,
        callbacks=[monitor],
    )
    w, b = model.get_weights()
    per_sample = np.mean((x @ w + b - y) ** 2, axis=1)
    return [per_sample[i : i + batch_size] for i in range(0, 100, batch_size)]


def test_a_model_that_trained_before(recording_mode):
    # The optimizer's iteration count does not start at 0 (on JAX the buffer
    # is written at that count): only this fit's batches are recorded.
    monitor = keras_batchfix.SpikeMonitor(verbose=0)
    batches = lr_zero_fit(monitor, 16, earlier_fits=2)
    expected = [np.mean(batch) for batch in batches]
    np.testing.assert_allclose(monitor.steps["loss"], expected * 2, rtol=1e-5)
    np.testing.assert_array_equal(
        monitor.steps["batch_size"], [len(batch) for batch in batches] * 2
    )


@pytest.mark.skipif(
    keras.backend.backend() == "torch",
    reason="Keras's torch trainer has no steps_per_execution",
)
@pytest.mark.parametrize("steps_per_execution", [3, 4])  # 7 batches: 3+3+1, 4+3
def test_steps_per_execution(recording_mode, steps_per_execution):
    # Native recording sees every batch inside an execution; the fallback
    # reads the tracker between executions, so its "step" is one execution
    # of `steps_per_execution` batches (their mean loss and total size).
    monitor = keras_batchfix.SpikeMonitor(verbose=0)
    batches = lr_zero_fit(monitor, 16, steps_per_execution=steps_per_execution)
    if recording_mode == "native":
        groups = [[batch] for batch in batches]
    else:
        groups = [
            batches[i : i + steps_per_execution]
            for i in range(0, len(batches), steps_per_execution)
        ]
    expected = [np.mean(np.concatenate(group)) for group in groups]
    sizes = [sum(len(batch) for batch in group) for group in groups]
    np.testing.assert_allclose(monitor.steps["loss"], expected * 2, rtol=1e-5)
    np.testing.assert_array_equal(monitor.steps["batch_size"], sizes * 2)


def test_fallback_under_tf_distribute(mirrored_strategy):
    # Under tf.distribute the monitor reads the loss tracker between steps.
    # 100 samples in batches of 16: the short last batch (4) splits 2 + 2.
    monitor = keras_batchfix.SpikeMonitor(verbose=0)
    batches = lr_zero_fit(monitor, 16, strategy=mirrored_strategy)
    assert monitor._mode == "state"
    expected = [np.mean(batch) for batch in batches]
    np.testing.assert_allclose(monitor.steps["loss"], expected * 2, rtol=1e-5)
    np.testing.assert_array_equal(
        monitor.steps["batch_size"], [len(batch) for batch in batches] * 2
    )
