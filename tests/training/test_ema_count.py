import contextlib

import keras
import numpy as np
import pytest
from keras import ops

import keras_batchfix
from keras_batchfix import (
    EMACount,
    GlobalCount,
    NormalizerUpdates,
    SSDMultiboxLoss,
    compensate,
)
from tests.helpers.ssd_problem import NUM_CLASSES, ssd_problem
from tests.helpers.training import dense_model

BACKEND = keras.backend.backend()
# How `fit` runs: eagerly, compiled without XLA, and with XLA (`jax.jit` on
# JAX). torch's `fit` is eager.
FIT_MODES = ["eager"] if BACKEND == "torch" else ["eager", "compiled", "xla"]


def ssd_loss(normalizer):
    return SSDMultiboxLoss(
        NUM_CLASSES, mining="per_image", from_logits=True, normalizer=normalizer
    )


def ema_model(loss, kernel, bias, mode="compiled", optimizer=None, strategy=None):
    """A compiled one-Dense `keras_batchfix.Model` on `ssd_problem`'s data."""
    return dense_model(
        loss, (None, kernel.shape[0]), kernel, bias,
        optimizer or (lambda: keras.optimizers.SGD(0.05, momentum=0.9)),
        strategy, mode,
    )


def weights(model):
    return [ops.convert_to_numpy(w) for w in model.weights]


def ema_of(normalizer):
    return float(ops.convert_to_numpy(normalizer.ema))


def batch_counts(y, batch_size):
    """`max(1, positive anchors)` of each batch, in NumPy."""
    positives = y[..., 1:NUM_CLASSES].max(axis=-1)
    return [
        max(1.0, float(positives[start : start + batch_size].sum()))
        for start in range(0, len(y), batch_size)
    ]


def numpy_ema(counts, momentum, initial_value):
    """EMA after each count: detectron2's recurrence, started as documented."""
    ema = counts[0] if initial_value is None else initial_value
    history = []
    for count in counts:
        ema = momentum * ema + (1.0 - momentum) * count
        history.append(ema)
    return np.array(history)


@pytest.mark.parametrize("mode", FIT_MODES)
@pytest.mark.parametrize("initial_value", [None, 100.0])
def test_ema_follows_the_recurrence_in_training_only(mode, initial_value):
    x, y, kernel, bias = ssd_problem(0, 37)
    x_val, y_val, _, _ = ssd_problem(1, 16)
    normalizer = EMACount(momentum=0.8, initial_value=initial_value)
    model = ema_model(ssd_loss(normalizer), kernel, bias, mode)
    model.fit(
        x, y, batch_size=8, epochs=2, shuffle=False, verbose=0,
        validation_data=(x_val, y_val),
    )
    counts = batch_counts(y, 8) * 2
    want = numpy_ema(counts, 0.8, initial_value)[-1]
    np.testing.assert_allclose(ema_of(normalizer), want, rtol=1e-6)
    # The validation batches (other counts) did not move it, nor does this.
    model.evaluate(x_val, y_val, batch_size=4, verbose=0)
    np.testing.assert_allclose(ema_of(normalizer), want, rtol=1e-6)
    model.predict(x_val, verbose=0)
    np.testing.assert_allclose(ema_of(normalizer), want, rtol=1e-6)


@pytest.mark.parametrize("mode", FIT_MODES)
def test_evaluate_divides_by_the_candidate_and_keeps_the_ema(mode):
    x, y, kernel, bias = ssd_problem(2, 8)
    normalizer = EMACount(momentum=0.9, initial_value=50.0)
    model = ema_model(ssd_loss(normalizer), kernel, bias, mode)
    got = model.evaluate(x, y, batch_size=8, verbose=0)
    numerator, _ = ssd_loss(None).numerator_and_count(
        ops.convert_to_tensor(y), ops.convert_to_tensor(model.predict(x, verbose=0))
    )
    candidate = 0.9 * 50.0 + 0.1 * batch_counts(y, 8)[0]
    want = float(ops.convert_to_numpy(ops.sum(numerator))) / candidate
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert ema_of(normalizer) == 50.0


class PerStepLearningRate(keras.optimizers.schedules.LearningRateSchedule):
    def __init__(self, rates):
        self.rates = rates

    def __call__(self, step):
        return ops.take(ops.convert_to_tensor(self.rates, "float32"), step)


def test_training_equals_global_count_with_the_ema_ratio_as_learning_rate():
    """With plain SGD, dividing step t's loss by ema_t instead of count_t is
    the same as scaling step t's learning rate by count_t / ema_t."""
    x, y, kernel, bias = ssd_problem(3, 37)
    counts = batch_counts(y, 8) * 2
    ema = numpy_ema(counts, 0.9, 20.0)
    rates = (0.05 * np.array(counts) / ema).astype("float32")
    assert rates.min() < 0.04 and rates.max() > 0.06  # the EMA matters here
    trained = {}
    for name, normalizer, optimizer in (
        ("ema", EMACount(0.9, 20.0), lambda: keras.optimizers.SGD(0.05)),
        ("global", GlobalCount(),
         lambda: keras.optimizers.SGD(PerStepLearningRate(rates))),
    ):
        model = ema_model(ssd_loss(normalizer), kernel, bias, optimizer=optimizer)
        model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
        trained[name] = weights(model)
    for got, want in zip(trained["ema"], trained["global"]):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.abs(trained["ema"][0] - kernel).max() > 1e-2  # it trained


def test_momentum_zero_trains_exactly_like_global_count():
    x, y, kernel, bias = ssd_problem(4, 37)
    trained = {}
    for name, normalizer in (
        ("momentum 0", EMACount(momentum=0.0)),
        ("global", GlobalCount()),
        ("momentum 0.9", EMACount(momentum=0.9)),
    ):
        model = ema_model(ssd_loss(normalizer), kernel, bias)
        model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
        trained[name] = weights(model)
    for got, want in zip(trained["momentum 0"], trained["global"]):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert not np.allclose(trained["momentum 0.9"][0], trained["global"][0], atol=1e-4)


@pytest.mark.parametrize("file_name", ["model.keras", "model.weights.h5"])
def test_save_and_load_restore_the_ema_and_training_continues(tmp_path, file_name):
    x, y, kernel, bias = ssd_problem(5, 37)
    normalizer = EMACount(momentum=0.9, initial_value=100.0)
    model = ema_model(ssd_loss(normalizer), kernel, bias)
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    saved_ema = ema_of(normalizer)
    path = str(tmp_path / file_name)
    if file_name.endswith(".keras"):
        model.save(path)
        restored = keras.saving.load_model(path)
    else:
        model.save_weights(path)
        restored = ema_model(ssd_loss(EMACount(0.9, 100.0)), kernel * 0, bias)
        restored.optimizer.build(restored.trainable_variables)
        restored.load_weights(path)
    assert ema_of(restored.loss.normalizer) == saved_ema
    assert saved_ema != 100.0
    assert isinstance(restored, keras_batchfix.Model)
    for trained in (model, restored):
        trained.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    np.testing.assert_array_equal(
        ema_of(restored.loss.normalizer), ema_of(normalizer)
    )
    for got, want in zip(weights(restored), weights(model)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


@keras.saving.register_keras_serializable(package="tests")
def box_numerator(y_true, y_pred):
    return SSDMultiboxLoss(NUM_CLASSES, from_logits=True).numerator_and_count(
        y_true, y_pred
    )[0]


@keras.saving.register_keras_serializable(package="tests")
def positives(y_true, y_pred):
    return ops.sum(ops.max(y_true[..., 1:NUM_CLASSES], axis=-1))


def test_compensate_takes_it():
    x, y, kernel, bias = ssd_problem(6, 20)
    normalizer = EMACount(momentum=0.5)
    loss = compensate(box_numerator, count=positives, normalizer=normalizer)
    model = ema_model(loss, kernel, bias)
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    want = numpy_ema(batch_counts(y, 8), 0.5, None)[-1]
    np.testing.assert_allclose(ema_of(normalizer), want, rtol=1e-6)


def test_mirrored_training_equals_one_device(mirrored_strategy):
    x, y, kernel, bias = ssd_problem(0, 37)  # last batch of 5 splits 3 + 2
    results = []
    for strategy in (None, mirrored_strategy):
        scope = strategy.scope() if strategy else contextlib.nullcontext()
        with scope:
            normalizer = EMACount(momentum=0.9)
            loss = ssd_loss(normalizer)
        model = ema_model(loss, kernel, bias, strategy=strategy)
        model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
        results.append((weights(model), ema_of(normalizer)))
    (single, single_ema), (mirrored, mirrored_ema) = results
    np.testing.assert_allclose(mirrored_ema, single_ema, rtol=1e-6)
    np.testing.assert_allclose(
        single_ema, numpy_ema(batch_counts(y, 8) * 2, 0.9, None)[-1], rtol=1e-6
    )
    for got, want in zip(mirrored, single):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_a_plain_keras_model_does_not_move_it():
    """Documented: without `NormalizerUpdates` nothing calls `update()`."""
    x, y, _, _ = ssd_problem(7, 8)
    inputs = keras.Input(x.shape[1:])
    normalizer = EMACount(initial_value=30.0)
    model = keras.Model(inputs, keras.layers.Dense(NUM_CLASSES + 4)(inputs))
    model.compile("sgd", loss=ssd_loss(normalizer))
    model.fit(x, y, verbose=0)
    assert ema_of(normalizer) == 30.0


class Subclassed(NormalizerUpdates, keras.Model):
    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(NUM_CLASSES + 4)

    def call(self, inputs):
        return self.dense(inputs)


class Sequential(NormalizerUpdates, keras.Sequential):
    pass


class OwnComputeLoss(NormalizerUpdates, keras.Model):
    """A model whose own `compute_loss` override adds a term."""

    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(NUM_CLASSES + 4)

    def call(self, inputs):
        return self.dense(inputs)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None,
                     training=True):
        loss = super().compute_loss(x, y, y_pred, sample_weight, training=training)
        return loss + 0.0 * ops.sum(y_pred)


@pytest.mark.parametrize("model_class", [Subclassed, Sequential, OwnComputeLoss])
def test_the_mixin_drives_built_subclassed_and_sequential_models(model_class):
    x, y, _, _ = ssd_problem(8, 16)
    model = (
        Sequential([keras.layers.Dense(NUM_CLASSES + 4)])
        if model_class is Sequential else model_class()
    )
    model(x[:1])  # built: a subclassed model's state is locked now
    normalizer = EMACount(momentum=0.5)
    model.compile("sgd", loss=ssd_loss(normalizer))
    model.fit(x, y, batch_size=8, shuffle=False, verbose=0)
    want = numpy_ema(batch_counts(y, 8), 0.5, None)[-1]
    np.testing.assert_allclose(ema_of(normalizer), want, rtol=1e-6)
    assert [m.name for m in model.metrics].count("ema_count") == 1


def test_recompiling_drives_the_new_normalizer():
    x, y, _, _ = ssd_problem(9, 16)
    inputs = keras.Input(x.shape[1:])
    model = keras_batchfix.Model(inputs, keras.layers.Dense(NUM_CLASSES + 4)(inputs))
    first, second = EMACount(momentum=0.5), EMACount(momentum=0.5)
    model.compile("sgd", loss=ssd_loss(first))
    model.fit(x, y, batch_size=8, shuffle=False, verbose=0)
    moved = ema_of(first)
    model.compile("sgd", loss=ssd_loss(second))
    model.fit(x, y, batch_size=8, shuffle=False, verbose=0)
    assert ema_of(first) == moved
    assert ema_of(second) > 0
    assert [m.name for m in model.metrics].count("ema_count") == 1


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"momentum": 1.0}, "momentum"),
        ({"momentum": -0.1}, "momentum"),
        ({"momentum": "0.9"}, "momentum"),
        ({"initial_value": 0.0}, "initial_value"),
        ({"initial_value": -5.0}, "initial_value"),
    ],
)
def test_bad_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        EMACount(**kwargs)


def test_serializes_with_the_losses():
    for loss in (
        ssd_loss(EMACount(0.7, 30.0)),
        compensate(box_numerator, count=positives, normalizer=EMACount(0.7, 30.0)),
    ):
        restored = type(loss).from_config(loss.get_config())
        assert isinstance(restored.normalizer, EMACount)
        assert restored.normalizer is not loss.normalizer
        assert restored.normalizer.get_config() == {
            "momentum": 0.7, "initial_value": 30.0, "name": "ema_count",
        }


def test_mixin_bypassed_by_compute_loss_is_an_error():
    """A `compute_loss` before the mixin that skips it would leave the EMA still."""

    class Detector(keras_batchfix.NormalizerUpdates, keras.Model):
        def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None,
                         training=True):
            return keras.Model.compute_loss(self, x, y, y_pred, sample_weight, training)

    inputs = keras.Input((3,))
    model = Detector(inputs, keras.layers.Dense(5)(inputs))
    model.compile("sgd", keras_batchfix.compensate(
        lambda y_true, y_pred: ops.sum((y_true - y_pred) ** 2),
        count=lambda y_true, y_pred: ops.sum(y_true[:, 0]),
        normalizer=keras_batchfix.EMACount()))
    x, y = np.ones((4, 3), "float32"), np.ones((4, 5), "float32")
    with pytest.raises(ValueError, match="Detector.compute_loss does not call"):
        model.fit(x, y, verbose=0)
