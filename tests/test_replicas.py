"""`keras_batchfix.replicas`: the replica arithmetic, against NumPy.

The real strategies are checked end to end elsewhere (tests/test_composition.py,
the multi-process tests, tests/test_replica_simulation.py against a real
`MirroredStrategy`); here each function's contract, on any backend.
"""

import keras
import numpy as np
import pytest
from keras import ops

from keras_batchfix import GlobalCount, LocalCount, NormalizedLoss, replicas


class FlaggedError(NormalizedLoss):
    def numerator_and_count(self, y_true, y_pred):
        flags = y_true[:, 0]
        return flags * ops.sum((y_pred - y_true[:, 1:]) ** 2, -1), ops.sum(flags)


def problem(seed=0):
    rng = np.random.default_rng(seed)
    flags = np.array([1, 1, 1, 0, 0, 1], "float32")[:, None]  # 3 + 1 over 2 replicas
    y_true = np.concatenate([flags, rng.normal(size=(6, 2))], 1).astype("float32")
    return y_true, rng.normal(size=(6, 2)).astype("float32")


def numpy_errors(y_true, y_pred):
    return y_true[:, 0] * ((y_pred - y_true[:, 1:]) ** 2).sum(-1)


def test_one_device_has_one_replica_and_sums_are_the_values():
    assert replicas.num_replicas() == 1
    value = ops.convert_to_tensor(3.5)
    assert float(ops.convert_to_numpy(replicas.global_sum(value))) == 3.5
    assert replicas.keras_factor(replicas.COMPILED) == 1.0
    assert replicas.keras_factor(replicas.ADD_LOSS) == 1.0


def test_a_simulation_sets_the_number_of_replicas_and_restores_it():
    with replicas.ReplicaSimulation(4):
        assert replicas.num_replicas() == 4
        with replicas.ReplicaSimulation(2):
            assert replicas.num_replicas() == 2
        assert replicas.num_replicas() == 4
    assert replicas.num_replicas() == 1


def test_keras_factor_undoes_what_the_backend_does_to_each_route():
    with replicas.ReplicaSimulation(2):
        assert replicas.keras_factor(replicas.COMPILED) == 1.0
        # TensorFlow scales add_loss values by 1 / replicas; the others do not.
        want = 2.0 if keras.backend.backend() == "tensorflow" else 1.0
        assert replicas.keras_factor(replicas.ADD_LOSS) == want


def test_an_unknown_route_is_a_named_error():
    with pytest.raises(ValueError, match="Argument `route` must be one of"):
        replicas.keras_factor("fit")


@pytest.mark.parametrize("divisor_is_global", [True, False])
def test_to_keras_is_a_share_of_the_global_loss_or_of_the_replicas_mean(divisor_is_global):
    numerator = ops.convert_to_tensor(np.array([1.0, 2.0, 3.0], "float32"))
    with replicas.ReplicaSimulation(2):
        got = ops.convert_to_numpy(replicas.to_keras(numerator, 4.0, divisor_is_global, replicas.COMPILED))
    want = np.array([1.0, 2.0, 3.0]) / (4.0 if divisor_is_global else 8.0)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_global_count_shares_add_up_to_the_one_device_loss_on_an_unequal_split():
    y_true, y_pred = problem()
    loss = FlaggedError(normalizer=GlobalCount())
    parts = [(y_true[:3], y_pred[:3]), (y_true[3:], y_pred[3:])]
    simulation = replicas.ReplicaSimulation(2)
    with simulation:
        shares = simulation.replica_losses(loss, parts)
    one_device = numpy_errors(y_true, y_pred).sum() / y_true[:, 0].sum()
    np.testing.assert_allclose(sum(shares), one_device, rtol=1e-5)
    assert simulation.all_reduces == 1


def test_local_count_shares_add_up_to_the_mean_of_the_replicas_losses():
    y_true, y_pred = problem()
    loss = FlaggedError(normalizer=LocalCount())
    parts = [(y_true[:3], y_pred[:3]), (y_true[3:], y_pred[3:])]
    simulation = replicas.ReplicaSimulation(2)
    with simulation:
        shares = simulation.replica_losses(loss, parts)
    means = [numpy_errors(t, p).sum() / max(1.0, t[:, 0].sum()) for t, p in parts]
    np.testing.assert_allclose(sum(shares), np.mean(means), rtol=1e-5)
    one_device = numpy_errors(y_true, y_pred).sum() / y_true[:, 0].sum()
    assert abs(sum(shares) - one_device) > 1e-3  # counts 3 and 1: not one device's
    assert simulation.all_reduces == 0
