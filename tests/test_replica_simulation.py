"""`replicas.ReplicaSimulation`: the one mechanism behind the diagnostics' replica splits.

The simulation runs the replicas one after another and replays their
all-reduces summed. Checked against sums by hand, against a real
2-replica `tf.distribute.MirroredStrategy` (TensorFlow), and shown to be
what `diagnose` and `diagnose_model` go through (any backend).
"""

import keras
import numpy as np
import pytest
from keras import ops

import keras_batchfix
from keras_batchfix import replicas
from keras_batchfix.diagnostics import loss_probe, split_weights
from tests.helpers.seed_losses import ssd_batch
from tests.helpers.seed_losses import ssd_keras_style_loss
from tests.helpers.seed_losses import ssd_numerator
from tests.helpers.seed_losses import ssd_positives


@pytest.fixture(scope="module")
def batch():
    return ssd_batch(batch_size=8, anchors=12, seed=1)


def test_replays_each_all_reduce_summed_over_the_replicas():
    def share(a, b):  # a's and b's shares of their sums: one all-reduce of two
        totals = replicas.global_sum([ops.sum(a), ops.sum(b)])
        return ops.sum(a) / totals[0] + 10.0 * ops.sum(b) / totals[1]

    parts = [(np.float32([1.0, 2.0]), np.float32([1.0])),
             (np.float32([5.0]), np.float32([3.0]))]
    simulation = replicas.ReplicaSimulation(num_replicas=2)
    assert replicas.num_replicas() == 1
    with simulation:
        assert replicas.num_replicas() == 2
        losses = simulation.replica_losses(share, parts)
    assert replicas.num_replicas() == 1 and replicas.global_sum(3.0) == 3.0
    # By hand: sum(a) over the replicas is 8, sum(b) is 4.
    np.testing.assert_allclose(losses, [3 / 8 + 10 * 1 / 4, 5 / 8 + 10 * 3 / 4], rtol=1e-6)
    assert simulation.all_reduces == 1


def test_replicas_must_all_reduce_alike():
    def uneven(a):
        return replicas.global_sum(ops.sum(a)) if a.shape[0] > 1 else ops.sum(a)

    simulation = replicas.ReplicaSimulation(2)
    with simulation, pytest.raises(ValueError, match="different numbers of all-reduces"):
        simulation.replica_losses(uneven, [(np.ones(2, "float32"),), (np.ones(1, "float32"),)])
    with pytest.raises(RuntimeError, match="inside `with simulation:`"):
        simulation.replica_losses(uneven, [(np.ones(2, "float32"),)])


def test_diagnose_and_diagnose_model_go_through_it(batch):
    # A global count all-reduces once per replica; a local one never.
    glob = keras_batchfix.compensate(
        ssd_numerator, count=ssd_positives, normalizer=keras_batchfix.GlobalCount()
    )
    local = keras_batchfix.compensate(
        ssd_numerator, count=ssd_positives, normalizer=keras_batchfix.LocalCount()
    )
    assert keras_batchfix.diagnose(glob, *batch, repeats=(1, 2)).all_reduces == 1
    assert keras_batchfix.diagnose(local, *batch, repeats=(1, 2)).all_reduces == 0
    # CenterLoss (GlobalCount by default) all-reduces the batch size.
    features = keras.Input((3,))
    labels = keras.Input((), dtype="int32")
    hidden = keras_batchfix.CenterLoss(4, loss_weight=0.5)([features, labels])
    model = keras.Model([features, labels], keras.layers.Dense(4)(hidden))
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x = [rng.normal(size=(8, 3)).astype("float32"), rng.integers(0, 4, 8).astype("int32")]
    result = keras_batchfix.diagnose_model(model, x, x[1], repeats=(1, 2))
    assert result.all_reduces == 1
    assert "1 all-reduces per replica" in str(result)
    # The batch size, counted over the replicas: exact on any split.
    assert result.replica_factor == pytest.approx(1.0, rel=1e-5)


# ------------------------------------------------ oracle: a real MirroredStrategy
def mirrored_objective(compiled, strategy):
    """`parts -> sum over 2 MirroredStrategy replicas of the compiled loss`."""
    import tensorflow as tf

    steps = {}

    def step_for(has_weights):
        if has_weights not in steps:

            @tf.function
            def step(values):
                def replica_fn(yt, yp, sw):
                    return compiled(yt, yp, sw if has_weights else None)

                per_replica = strategy.run(replica_fn, args=values)
                return strategy.reduce("SUM", per_replica, axis=None)

            steps[has_weights] = step
        return steps[has_weights]

    def objective(parts):
        def value_fn(context):
            yt, yp, sw = parts[context.replica_id_in_sync_group]
            return tf.constant(yt), tf.constant(yp), tf.constant(1.0 if sw is None else sw)

        values = strategy.experimental_distribute_values_from_function(value_fn)
        return float(step_for(parts[0][2] is not None)(values))

    return objective


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="tf.distribute only")
@pytest.mark.parametrize(
    "name", ["dice", "mse", "ssd_keras", "local_count", "global_count"]
)
def test_simulated_split_agrees_with_mirrored_strategy(name, batch, mirrored_strategy):
    loss = {
        "dice": keras.losses.Dice(),
        "mse": "mse",
        "ssd_keras": ssd_keras_style_loss,
        "local_count": keras_batchfix.compensate(
            ssd_numerator, count=ssd_positives, normalizer=keras_batchfix.LocalCount()
        ),
        "global_count": keras_batchfix.compensate(
            ssd_numerator, count=ssd_positives, normalizer=keras_batchfix.GlobalCount()
        ),
    }[name]
    y_true, y_pred = batch
    result = keras_batchfix.diagnose(loss, y_true, y_pred, repeats=(1, 2))
    compiled = loss_probe.CompiledLoss(loss, y_true, y_pred)
    real = mirrored_objective(compiled, mirrored_strategy)

    def tile(x):
        return np.concatenate([x, x])

    single = float(compiled(tile(y_true), tile(y_pred)))
    assert result.replica_ratio == pytest.approx(
        real([(y_true, y_pred, None)] * 2) / single, rel=1e-5
    )
    # The split diagnose makes: the samples ordered by their count.
    probe = loss_probe.LossProbe(
        compiled, y_true, y_pred, None, rank=len(result.return_shape))
    index, parts = split_weights.equal_parts(probe.count_order(), 2)
    whole = float(compiled(y_true[index], y_pred[index]))
    split = real([(y_true[index[p]], y_pred[index[p]], None) for p in parts])
    assert result.replica_ratio_split == pytest.approx(split / whole, rel=1e-5)
    factor, _ = probe.split_factor(index, parts, real)
    assert result.unequal_split_factor == pytest.approx(factor, rel=1e-5)
    if name == "dice":  # a scalar skips Keras's 1 / num_replicas
        assert result.replica_ratio == pytest.approx(2.0, rel=1e-4)
    if name == "local_count":  # the halves' positives differ
        assert abs(result.replica_ratio_split - 1.0) > 5e-3
