import functools

import keras
import numpy as np
import pytest
from keras import ops

from keras_batchfix import GlobalCount, SSDMultiboxLoss, compensate
from keras_batchfix.normalized_loss import Compensated
from keras_batchfix.references.ssd_data import random_batch
from tests.helpers.training import batch_loss, fit_dense

NUM_CLASSES = 4


def ssd_keras_style(y_true, y_pred):
    """Seed 000's loss without its `* batch_size` line: per image, / N_pos."""
    numerator, count = SSDMultiboxLoss(
        NUM_CLASSES, from_logits=True
    ).numerator_and_count(y_true, y_pred)
    return numerator / ops.maximum(count, 1.0)


# Squared error on the anchors flagged in channel 0, and the number of
# flagged anchors: the numerator and count of a self-normalizing loss.
def flagged_errors(y_true, y_pred):
    """Numerator per element, shape (B, anchors)."""
    return y_true[..., 0] * ops.sum((y_pred - y_true) ** 2, -1)


def flagged_squared_error(y_true, y_pred):
    """Numerator per sample, shape (B,)."""
    return ops.sum(flagged_errors(y_true, y_pred), axis=1)


def flagged_error_total(y_true, y_pred):
    """Numerator as a scalar."""
    return ops.sum(flagged_errors(y_true, y_pred))


def flagged_count(y_true, y_pred):
    return ops.sum(y_true[..., 0])


# Three return shapes of the self-normalizing loss (numerator / count).
def per_element(y_true, y_pred):
    return flagged_errors(y_true, y_pred) / flagged_count(y_true, y_pred)


def per_sample(y_true, y_pred):
    return ops.sum(per_element(y_true, y_pred), axis=1)


def scalar(y_true, y_pred):
    return ops.sum(per_element(y_true, y_pred))


# Self-normalizing: equal to one device when replicas see equal counts.
SELF_NORMALIZED_LOSSES = {
    "per_element": compensate(per_element),
    "per_sample": compensate(per_sample),
    "scalar": compensate(scalar),
}
# Numerator and count, the count all-reduced: equal to one device always.
GLOBAL_COUNT_LOSSES = {
    name: compensate(numerator, count=flagged_count, normalizer=GlobalCount())
    for name, numerator in (
        ("per_element", flagged_errors),
        ("per_sample", flagged_squared_error),
        ("scalar", flagged_error_total),
    )
}


def numpy_flagged_loss(y_true, y_pred, weights=None):
    flagged = y_true[..., 0]
    per_image = (flagged * ((y_pred - y_true) ** 2).sum(-1)).sum(-1)
    if weights is not None:
        per_image = per_image * weights
    return per_image.sum() / flagged.sum()


def flagged_batch(rng, batch_size, anchors=6, depth=3, flags_per_image=2):
    y_true = rng.normal(size=(batch_size, anchors, depth)).astype("float32")
    y_true[..., 0] = 0.0
    y_true[:, :flags_per_image, 0] = 1.0
    y_pred = rng.normal(size=y_true.shape).astype("float32")
    return y_true, y_pred


def regression_problem(seed, size, varying_flags):
    """Inputs, targets and a Dense layer's start: `Dense(x)` predicts `y`.

    Every image has 2 flagged anchors, or (`varying_flags`) 0 to 6, so that
    replicas see different counts.
    """
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(size, 6, 3)).astype("float32")
    y_true, _ = flagged_batch(rng, size)
    if varying_flags:
        y_true[..., 0] = rng.random((size, 6)) < rng.random((size, 1))
    kernel = rng.normal(size=(3, 3)).astype("float32")
    return x, y_true, kernel, np.zeros(3, "float32")


def identity_model(loss, depth):
    inputs = keras.Input((None, depth))
    model = keras.Model(inputs, keras.layers.Identity()(inputs))
    model.compile(loss=loss)
    return model


def test_seed_000_loss_spikes_in_keras_and_not_once_compensated():
    rng = np.random.default_rng(0)
    y_true, y_pred = random_batch(rng, 8, 40, NUM_CLASSES, positive_fraction=0.1)
    # Four copies of the same 8 images: the normalized loss is the same.
    big_true, big_pred = np.tile(y_true, (4, 1, 1)), np.tile(y_pred, (4, 1, 1))
    plain = identity_model(ssd_keras_style, NUM_CLASSES + 4)
    ratio = batch_loss(plain, y_pred, y_true) / batch_loss(plain, 
        big_pred, big_true
    )
    np.testing.assert_allclose(ratio, 32 / 8, rtol=1e-5)  # 1 / B scaling
    fixed = identity_model(compensate(ssd_keras_style), NUM_CLASSES + 4)
    np.testing.assert_allclose(
        batch_loss(fixed, y_pred, y_true),
        batch_loss(fixed, big_pred, big_true),
        rtol=1e-5,
    )
    np.testing.assert_allclose(
        batch_loss(fixed, y_pred, y_true),
        float(SSDMultiboxLoss(NUM_CLASSES, from_logits=True)(y_true, y_pred)),
        rtol=1e-5,
    )


@pytest.mark.parametrize("loss_fn", [per_element, per_sample, scalar])
def test_every_return_shape_gives_the_normalized_value(loss_fn):
    rng = np.random.default_rng(1)
    for batch_size in (1, 5, 16):
        y_true, y_pred = flagged_batch(rng, batch_size)
        model = identity_model(compensate(loss_fn), 3)
        np.testing.assert_allclose(
            batch_loss(model, y_pred, y_true),
            numpy_flagged_loss(y_true, y_pred),
            rtol=1e-5,
        )


def test_numerator_and_count_form():
    rng = np.random.default_rng(2)
    loss = compensate(flagged_squared_error, count=flagged_count)
    for batch_size in (1, 3, 16):
        y_true, y_pred = flagged_batch(rng, batch_size)
        np.testing.assert_allclose(
            float(loss(y_true, y_pred)), numpy_flagged_loss(y_true, y_pred), rtol=1e-5
        )


@pytest.mark.parametrize("loss_fn", [per_element, per_sample])
def test_sample_weight_scales_each_sample_not_the_count(loss_fn):
    rng = np.random.default_rng(3)
    y_true, y_pred = flagged_batch(rng, 5)
    weights = rng.random(5).astype("float32")
    model = identity_model(compensate(loss_fn), 3)
    np.testing.assert_allclose(
        batch_loss(model, y_pred, y_true, sample_weight=weights),
        numpy_flagged_loss(y_true, y_pred, weights),
        rtol=1e-5,
    )


def test_scalar_loss_refuses_sample_weight():
    y_true, y_pred = flagged_batch(np.random.default_rng(4), 3)
    with pytest.raises(ValueError, match="sample_weight"):
        compensate(scalar)(y_true, y_pred, sample_weight=np.ones(3, "float32"))


def test_wraps_a_keras_loss_instance_through_its_unreduced_call():
    y_true, y_pred = flagged_batch(np.random.default_rng(5), 4)
    loss = compensate(keras.losses.MeanSquaredError())
    want = ((y_true - y_pred) ** 2).mean(-1).sum()
    np.testing.assert_allclose(float(loss(y_true, y_pred)), want, rtol=1e-5)


def test_bad_arguments():
    with pytest.raises(ValueError, match="`loss`"):
        compensate("mse")
    with pytest.raises(ValueError, match="`count`"):
        compensate(per_sample, count=3)
    with pytest.raises(ValueError, match="`normalizer`.*count=None"):
        compensate(per_sample, normalizer=GlobalCount())
    y_true, y_pred = flagged_batch(np.random.default_rng(6), 2)
    with pytest.raises(ValueError, match=r"count of loss .* must be a scalar.*\(2,\)"):
        compensate(flagged_squared_error, count=lambda t, p: ops.sum(t, (1, 2)))(
            y_true, y_pred
        )


@keras.saving.register_keras_serializable(package="tests")
def registered_per_sample(y_true, y_pred):
    return per_sample(y_true, y_pred)


@keras.saving.register_keras_serializable(package="tests")
def registered_count(y_true, y_pred):
    return flagged_count(y_true, y_pred)


@pytest.mark.parametrize("count", [None, registered_count], ids=["self", "count"])
def test_model_save_round_trip(tmp_path, count):
    model = identity_model(compensate(registered_per_sample, count=count), 3)
    path = tmp_path / "model.keras"
    model.save(path)
    restored = keras.models.load_model(path)
    assert isinstance(restored.loss, Compensated)
    assert restored.loss.loss is registered_per_sample
    y_true, y_pred = flagged_batch(np.random.default_rng(7), 4)
    np.testing.assert_allclose(
        batch_loss(restored, y_pred, y_true), batch_loss(model, y_pred, y_true)
    )


def assert_mirrored_equals_one_device(loss, problem, strategy):
    x, y_true, kernel, bias = problem
    single = fit_dense(loss, x, y_true, kernel, bias, batch_size=8, epochs=2)
    mirrored = fit_dense(
        loss, x, y_true, kernel, bias, batch_size=8, epochs=2, strategy=strategy
    )
    assert np.abs(single[0] - kernel).max() > 1e-2  # training moved the weights
    for got, want in zip(mirrored, single):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(SELF_NORMALIZED_LOSSES))
def test_mirrored_strategy_equals_one_device(name, mirrored_strategy):
    # 32 images in batches of 8, 2 flagged anchors each: equal replica counts.
    assert_mirrored_equals_one_device(
        SELF_NORMALIZED_LOSSES[name],
        regression_problem(8, 32, varying_flags=False),
        mirrored_strategy,
    )


@pytest.mark.parametrize("name", list(GLOBAL_COUNT_LOSSES))
def test_global_count_mirrored_equals_one_device_split_unevenly(
    name, mirrored_strategy
):
    # 37 images: the last batch of 5 splits 3 / 2; counts differ by replica.
    assert_mirrored_equals_one_device(
        GLOBAL_COUNT_LOSSES[name],
        regression_problem(9, 37, varying_flags=True),
        mirrored_strategy,
    )


@pytest.mark.parametrize(
    "returned", [None, "loss"], ids=["None", "str"]
)
def test_a_loss_returning_no_values_is_named(returned):
    def broken(y_true, y_pred):
        return returned

    y_true, y_pred = flagged_batch(np.random.default_rng(8), 2)
    with pytest.raises(ValueError, match=f"'compensated_broken'.*{returned!r}"):
        compensate(broken)(y_true, y_pred)
    with pytest.raises(ValueError, match="count.*returned"):
        compensate(flagged_squared_error, count=broken)(y_true, y_pred)


def test_a_package_loss_comes_back_unchanged():
    """`compensate(L)` is `L`: wrapping cannot apply the replica factor twice."""
    ssd = SSDMultiboxLoss(NUM_CLASSES, from_logits=True, normalizer=GlobalCount())
    assert compensate(ssd) is ssd
    with pytest.raises(ValueError, match="NormalizedLoss"):
        compensate(ssd, count=flagged_count)


def test_compensated_package_loss_equals_it_under_mirrored(mirrored_strategy):
    """Under 2 replicas `compensate(SSDMultiboxLoss(...))` returned half the loss."""
    from tests.helpers.ssd_problem import ssd_problem

    x, y, kernel, bias = ssd_problem(10, 37)
    ssd = SSDMultiboxLoss(NUM_CLASSES, mining="per_image", from_logits=True,
                          normalizer=GlobalCount())
    trained = [
        fit_dense(loss, x, y, kernel, bias, batch_size=8, epochs=2,
                  strategy=mirrored_strategy)
        for loss in (ssd, compensate(ssd))
    ]
    for got, want in zip(*trained):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    "loss_fn",
    [lambda t, p: per_sample(t, p), functools.partial(per_sample)],
    ids=["lambda", "partial"],
)
def test_lambda_and_partial_train_under_fit(loss_fn):
    """`compensated_<lambda>` used to be an invalid TensorFlow scope name."""
    loss = compensate(loss_fn)
    assert loss.name in ("compensated_lambda", "compensated_per_sample")
    x, y, kernel, bias = regression_problem(11, 16, varying_flags=False)
    trained = fit_dense(loss, x, y, kernel, bias, batch_size=8, epochs=1)
    want = fit_dense(compensate(per_sample), x, y, kernel, bias, batch_size=8,
                     epochs=1)
    for got, expected in zip(trained, want):
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)


def test_call_returns_unreduced_values_whose_sum_is_the_loss():
    """Keras's `Loss` contract: `call` unreduced, `__call__` reduces."""
    y_true, y_pred = flagged_batch(np.random.default_rng(12), 3)
    loss = compensate(flagged_errors, count=flagged_count)
    values = ops.convert_to_numpy(
        loss.call(ops.convert_to_tensor(y_true), ops.convert_to_tensor(y_pred))
    )
    assert values.shape == y_true.shape[:2]
    np.testing.assert_allclose(values.sum(), float(loss(y_true, y_pred)), rtol=1e-6)
