"""`CenterLoss` under `tf.distribute.MirroredStrategy` (2 logical CPUs).

TensorFlow backend only (tests/conftest.py creates the logical devices and
the shared strategy; tests/helpers/multi_worker.py and tests/helpers/jax_data_parallel.py
train the same problems under `MultiWorkerMirroredStrategy` and JAX's
`DataParallel`).
The reference is single-device training on the same global batches, written
in NumPy (`numpy_center_loss_training`).
"""

import numpy as np
import pytest

import keras

if keras.backend.backend() != "tensorflow":
    pytest.skip("tf.distribute needs the TensorFlow backend", allow_module_level=True)

from tests.helpers.center_loss_problem import (  # noqa: E402
    CENTER_LOSS_HYPERPARAMETERS,
    center_loss_problem,
    numpy_center_loss_training,
)
from tests.helpers.training import fit_center_loss  # noqa: E402


def replica_values(variable):
    tf_variable = variable.value
    return [np.asarray(v.numpy(), np.float64) for v in tf_variable.values]


@pytest.mark.parametrize("n", [16, 15])  # 15: last global batch of 7 splits 4 / 3
def test_mirrored_equals_single_device(n, mirrored_strategy):
    x, y, w, c = center_loss_problem(n)
    dense, layer, history = fit_center_loss(
        x, y, w, c, **CENTER_LOSS_HYPERPARAMETERS, strategy=mirrored_strategy
    )
    w_ref, c_ref, loss_ref = numpy_center_loss_training(
        x, y, w, c, **CENTER_LOSS_HYPERPARAMETERS
    )
    lam = CENTER_LOSS_HYPERPARAMETERS["lam"]

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
