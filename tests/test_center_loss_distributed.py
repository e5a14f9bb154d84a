"""`CenterLoss` under `tf.distribute.MirroredStrategy` (2 logical CPUs).

TensorFlow backend only (tests/conftest.py creates the logical devices and
the shared strategy; tests/multi_worker.py trains the same problems under
`MultiWorkerMirroredStrategy`).
The reference is single-device training on the same global batches, written
in NumPy.
"""

import numpy as np
import pytest

import keras

if keras.backend.backend() != "tensorflow":
    pytest.skip("tf.distribute needs the TensorFlow backend", allow_module_level=True)

from keras_batchfix import CenterLoss  # noqa: E402
from tests.test_center_loss import (  # noqa: E402
    batches,
    numpy_center_loss,
    numpy_center_step,
)

K, D, IN = 4, 3, 5
HYPERPARAMETERS = dict(batch_size=8, lr=0.5, lam=0.7, alpha=0.5)


def center_loss_problem(n):
    """Inputs, labels, start kernel and start centers for `n` samples."""
    rng = np.random.default_rng(10 + n)
    x = rng.normal(size=(n, IN)).astype("float32")
    y = rng.integers(0, K, size=n).astype("int32")
    return x, y, rng.normal(size=(IN, D)), rng.normal(size=(K, D))


def single_device_reference(x, y, w, c, batch_size, lr, lam, alpha):
    """SGD on lambda * L_C through features x @ W, then the center rule."""
    losses, sizes = [], []
    for part in batches(len(x), batch_size):
        xb, yb = x[part].astype(np.float64), y[part]
        f = xb @ w
        losses.append(lam * numpy_center_loss(c, f, yb))
        sizes.append(len(yb))
        w = w - lr * xb.T @ (lam * (f - c[yb]) / len(yb))
        c = numpy_center_step(c, f, yb, alpha)
    return w, c, np.average(losses, weights=sizes)


def fit_center_loss(strategy, x, y, w, c, batch_size, lr, lam, alpha):
    """Features `x @ W` into `CenterLoss`, trained one epoch under `strategy`."""
    with strategy.scope():
        inputs = keras.Input((IN,))
        labels = keras.Input((), dtype="int32")
        dense = keras.layers.Dense(D, use_bias=False)
        layer = CenterLoss(
            K,
            alpha=alpha,
            loss_weight=lam,
            centers_initializer=keras.initializers.Constant(c),
        )
        model = keras.Model([inputs, labels], layer([dense(inputs), labels]))
        dense.set_weights([w.astype("float32")])
        model.compile(optimizer=keras.optimizers.SGD(lr))
    history = model.fit([x, y], batch_size=batch_size, shuffle=False, verbose=0)
    return dense, layer, history


def replica_values(variable):
    tf_variable = variable.value
    return [np.asarray(v.numpy(), np.float64) for v in tf_variable.values]


@pytest.mark.parametrize("n", [16, 15])  # 15: last global batch of 7 splits 4 / 3
def test_mirrored_equals_single_device(n, mirrored_strategy):
    x, y, w, c = center_loss_problem(n)
    dense, layer, history = fit_center_loss(
        mirrored_strategy, x, y, w, c, **HYPERPARAMETERS
    )
    w_ref, c_ref, loss_ref = single_device_reference(x, y, w, c, **HYPERPARAMETERS)
    lam = HYPERPARAMETERS["lam"]

    centers = replica_values(layer.centers)
    assert len(centers) == 2
    np.testing.assert_array_equal(centers[0], centers[1])  # replicas agree
    np.testing.assert_allclose(centers[0], c_ref, rtol=1e-5, atol=1e-6)
    kernels = replica_values(dense.kernel)
    np.testing.assert_array_equal(kernels[0], kernels[1])
    np.testing.assert_allclose(kernels[0], w_ref, rtol=1e-5, atol=1e-6)
    assert int(layer.iterations.numpy()) == 2
    if n % 4 == 0:
        # Keras's loss log is exact when every replica gets the same count
        # (with an uneven split its tracker weights replica values unevenly).
        np.testing.assert_allclose(history.history["loss"][0], loss_ref, rtol=1e-5)
        np.testing.assert_allclose(
            history.history[f"{layer.name}_value"][0], loss_ref / lam, rtol=1e-5
        )
