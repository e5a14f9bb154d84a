"""`NormalizedLoss` and the `Normalizer` protocol, against NumPy."""

import keras
import numpy as np
import pytest
from keras import ops

import keras_batchfix
from keras_batchfix import GlobalCount, LocalCount, NormalizedLoss, Normalizer
from keras_batchfix._keras_compat import set_keras_mask


class FlaggedError(NormalizedLoss):
    """Squared error of the flagged rows (`y_true[..., 0] == 1`), per flagged row."""

    def numerator_and_count(self, y_true, y_pred):
        flags = y_true[..., 0]
        return flags * ops.sum((y_pred - y_true[..., 1:]) ** 2, -1), ops.sum(flags)


class PairError(NormalizedLoss):
    """A loss of a model with two outputs, `{"a": ..., "b": ...}`."""

    def numerator_and_count(self, y_true, y_pred):
        errors = ops.sum((y_pred["a"] - y_true["a"]) ** 2, -1)
        errors = errors + ops.sum(ops.abs(y_pred["b"] - y_true["b"]), -1)
        return errors, ops.cast(ops.shape(errors)[0], "float32")


def flagged_problem(shape=(6, 5), seed=0):
    rng = np.random.default_rng(seed)
    flags = rng.integers(0, 2, shape + (1,)).astype("float32")
    targets = rng.normal(size=shape + (3,)).astype("float32")
    y_pred = rng.normal(size=shape + (3,)).astype("float32")
    return np.concatenate([flags, targets], -1), y_pred


def numpy_flagged(y_true, y_pred, weights=None):
    per_row = y_true[..., 0] * ((y_pred - y_true[..., 1:]) ** 2).sum(-1)
    if weights is not None:
        per_row = per_row * weights.reshape(weights.shape + (1,) * (per_row.ndim - weights.ndim))
    return per_row.sum() / max(1.0, y_true[..., 0].sum())


def value(tensor):
    return float(ops.convert_to_numpy(tensor))


def test_the_default_normalizer_is_the_global_count():
    assert type(FlaggedError().normalizer) is GlobalCount
    assert type(keras_batchfix.compensate(lambda t, p: p, count=lambda t, p: 1.0).normalizer) is GlobalCount
    assert type(keras_batchfix.SSDMultiboxLoss(3).normalizer) is GlobalCount


@pytest.mark.parametrize("batch", [1, 3, 6])
def test_the_loss_is_the_numerator_over_the_count_at_every_batch_size(batch):
    y_true, y_pred = flagged_problem()
    got = value(FlaggedError()(y_true[:batch], y_pred[:batch]))
    np.testing.assert_allclose(got, numpy_flagged(y_true[:batch], y_pred[:batch]), rtol=1e-5)


def test_sample_weights_broadcast_over_every_trailing_axis():
    y_true, y_pred = flagged_problem((4, 5, 2))
    weights = np.array([0.0, 1.0, 2.0, 0.5], "float32")
    got = value(FlaggedError()(y_true, y_pred, sample_weight=weights))
    np.testing.assert_allclose(got, numpy_flagged(y_true, y_pred, weights), rtol=1e-5)


def test_the_mask_of_the_predictions_weighs_the_values():
    y_true, y_pred = flagged_problem((4, 5))
    mask = np.arange(5)[None, :] < np.array([[5], [3], [1], [0]])
    y_pred_tensor = ops.convert_to_tensor(y_pred)
    set_keras_mask(y_pred_tensor, ops.convert_to_tensor(mask))
    got = value(FlaggedError()(y_true, y_pred_tensor))
    masked = y_true.copy()
    masked[..., 0] *= mask  # masked rows add nothing; the count stays the loss's
    want = (masked[..., 0] * ((y_pred - y_true[..., 1:]) ** 2).sum(-1)).sum()
    np.testing.assert_allclose(got, want / y_true[..., 0].sum(), rtol=1e-5)


def test_nested_targets_and_predictions():
    rng = np.random.default_rng(1)
    y_true = {"a": rng.normal(size=(5, 3)), "b": rng.normal(size=(5, 2))}
    y_pred = {"a": rng.normal(size=(5, 3)), "b": rng.normal(size=(5, 2))}
    want = (((y_pred["a"] - y_true["a"]) ** 2).sum() + np.abs(y_pred["b"] - y_true["b"]).sum()) / 5
    np.testing.assert_allclose(value(PairError()(y_true, y_pred)), want, rtol=1e-5)


def test_an_empty_batch_gives_zero():
    y_true, y_pred = flagged_problem((0, 5))
    assert value(FlaggedError()(y_true, y_pred)) == 0.0


def test_a_scalar_loss_cannot_take_sample_weights():
    loss = keras_batchfix.compensate(lambda y_true, y_pred: ops.sum(y_pred))
    with pytest.raises(ValueError, match="needs per-sample loss values"):
        loss(np.zeros((3, 2)), np.ones((3, 2)), sample_weight=np.ones(3))


def test_a_normalizer_of_ones_own_plugs_in():
    class SqrtCount(Normalizer):
        is_global = True

        def divisor(self, count):
            return ops.sqrt(ops.maximum(keras_batchfix.replicas.global_sum(count), 1.0))

    y_true, y_pred = flagged_problem()
    got = value(FlaggedError(normalizer=SqrtCount())(y_true, y_pred))
    want = numpy_flagged(y_true, y_pred) * max(1.0, y_true[..., 0].sum()) ** 0.5
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("normalizer", ["global", object(), keras.losses.MeanSquaredError()])
def test_anything_but_a_normalizer_is_a_named_error(normalizer):
    with pytest.raises(ValueError, match="Argument `normalizer` must be a `keras_batchfix.Normalizer`"):
        FlaggedError(normalizer=normalizer)


def test_local_and_global_counts_agree_on_one_device():
    y_true, y_pred = flagged_problem()
    local = value(FlaggedError(normalizer=LocalCount())(y_true, y_pred))
    glob = value(FlaggedError(normalizer=GlobalCount())(y_true, y_pred))
    assert local == glob
