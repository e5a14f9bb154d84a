"""Exact gradient accumulation with `keras_batchfix.window_weights`.

`SGD(0.1, gradient_accumulation_steps=2)` on micro-batches of 6 must train
as plain steps on batches of 12 (34 samples: windows of 6 + 6, 6 + 6 and
the short 6 + 4 against batches of 12, 12 and 10). Naively (no weights) a
count-normalized loss misses by more than 1e-4; with `window_weights` as
`sample_weight` every loss lands within 1e-5, and so does `CenterLoss`
with `accumulation_steps=2` and the weights as its third input. Runs on
the current backend.
"""

import keras
import numpy as np
import pytest
from keras import ops

from keras_batchfix import CenterLoss, GlobalCount, compensate, window_weights
from tests.composition import (
    ANCHORS,
    FEATURES,
    NUM_CLASSES,
    box_errors_per_sample,
    cell_data,
    max_gap,
    positive_count,
    ssd,
)

SAMPLES, MICRO, STEPS, EPOCHS = 34, 6, 2, 2
LOSSES = {
    "ssd GlobalCount": lambda: ssd(GlobalCount()),
    "compensate per-sample": lambda: compensate(
        box_errors_per_sample, count=positive_count, normalizer=GlobalCount()
    ),
    "keras mse": lambda: keras.losses.MeanSquaredError(),
}


def problem():
    x, _, y, _ = cell_data(("accumulation",))
    return x[:SAMPLES], y[:SAMPLES]


def per_sample_counts(name, y):
    if name == "keras mse":
        return np.ones(len(y))
    return y[..., 1:NUM_CLASSES].max(-1).sum(-1)  # positive anchors per image


def fit(name, batch_size, steps=None, sample_weight=None):
    x, y = problem()
    rng = np.random.default_rng(7)
    inputs = keras.Input((ANCHORS, FEATURES))
    dense = keras.layers.Dense(NUM_CLASSES + 4)
    model = keras.Model(inputs, dense(inputs))
    dense.set_weights([
        rng.normal(scale=0.4, size=w.shape).astype("float32")
        for w in dense.get_weights()
    ])
    model.compile(
        keras.optimizers.SGD(0.1, gradient_accumulation_steps=steps),
        LOSSES[name](),
    )
    model.fit(x, y, batch_size=batch_size, epochs=EPOCHS, shuffle=False,
              verbose=0, sample_weight=sample_weight)
    return [np.asarray(ops.convert_to_numpy(w)) for w in model.weights]


@pytest.mark.parametrize("name", LOSSES)
def test_window_weights_make_accumulation_exact(name):
    one_batch = fit(name, MICRO * STEPS)
    naive = fit(name, MICRO, STEPS)
    _, y = problem()
    weights = window_weights(per_sample_counts(name, y), MICRO, STEPS)
    if name == "keras mse":  # Keras broadcasts weights from the last axis
        weights = weights[:, None]
    exact = fit(name, MICRO, STEPS, sample_weight=weights)
    assert max_gap(naive, one_batch) > 1e-4
    assert max_gap(exact, one_batch) < 1e-5



def test_window_weights_formula():
    # micro-batches (1, 3), (0, 0) in one window of count 4; (2, 2), (1,) in
    # one of count 5.
    weights = window_weights([1, 3, 0, 0, 2, 2, 1], batch_size=2, steps=2)
    np.testing.assert_allclose(
        weights, [2 * 4 / 4] * 2 + [2 * 1 / 4] * 2 + [2 * 4 / 5] * 2 + [2 * 1 / 5]
    )


def test_window_weights_rejects_straddling_windows():
    with pytest.raises(ValueError, match="multiple of steps=2"):
        window_weights(np.ones(5), batch_size=2, steps=2)


def fit_center(batch_size, steps=None, exact=False):
    """Dense -> CenterLoss -> Dense with cross-entropy; returns the weights."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(SAMPLES, 4)).astype("float32")
    labels = rng.integers(0, 3, SAMPLES).astype("int32")
    weights = window_weights(np.ones(SAMPLES), MICRO, STEPS)
    images = keras.Input((4,))
    label_input = keras.Input((), dtype="int32")
    weight_input = keras.Input(())
    embed, classify = keras.layers.Dense(2), keras.layers.Dense(3)
    features = embed(images)
    layer = CenterLoss(
        3, alpha=0.5, loss_weight=0.5, accumulation_steps=steps if exact else None,
        centers_initializer=keras.initializers.Constant(rng.normal(size=(3, 2))),
    )
    inputs = [features, label_input] + ([weight_input] if exact else [])
    logits = classify(layer(inputs))
    model = keras.Model([images, label_input, weight_input], logits)
    for dense in (embed, classify):
        dense.set_weights([rng.normal(scale=0.5, size=w.shape).astype("float32")
                           for w in dense.get_weights()])
    model.compile(keras.optimizers.SGD(0.1, gradient_accumulation_steps=steps),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit([x, labels, weights], labels, batch_size=batch_size, epochs=EPOCHS,
              shuffle=False, verbose=0, sample_weight=weights if exact else None)
    trained = model.trainable_weights + [layer.centers]
    return [np.asarray(ops.convert_to_numpy(w)) for w in trained]


def test_center_loss_accumulation_is_exact():
    one_batch = fit_center(MICRO * STEPS)
    naive = fit_center(MICRO, STEPS)
    exact = fit_center(MICRO, STEPS, exact=True)
    assert max_gap(naive, one_batch) > 1e-4
    assert max_gap(exact, one_batch) < 1e-5


def test_center_loss_rejects_accumulation_with_trainable_centers():
    with pytest.raises(ValueError, match="accumulation_steps"):
        CenterLoss(3, accumulation_steps=2, centers_trainable=True)
