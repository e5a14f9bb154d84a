"""keras-hub's RetinaNet: `diagnose_model` finds the replica bug, the fix trains like one device.

keras-hub 0.32's detector divides its `"sum"` losses by the positives of each
replica's batch; under 2 replicas a step moves the weights about twice as
far as on one device. `keras_batchfix.integrations.retinanet.RetinaNetObjectDetector`
divides by the global count. Needs keras-hub (the `keras-hub` extra).
"""


import keras
import numpy as np
import pytest

pytest.importorskip("keras_hub")

import keras_batchfix  # noqa: E402
from tests.helpers.processes import printed_line  # noqa: E402
from tests.helpers.retinanet_problem import LEARNING_RATE, boxes_batch, detector  # noqa: E402
from tests.helpers.training import strategy_scope  # noqa: E402


def compiled(fixed, strategy=None, normalizer=None):
    with strategy_scope(strategy):
        model = detector(fixed, normalizer=normalizer() if normalizer else None)
        model.compile(optimizer=keras.optimizers.SGD(LEARNING_RATE))
    return model


def trained(fixed, x, y, strategy=None, epochs=2, normalizer=None):
    model = compiled(fixed, strategy, normalizer)
    model.fit(x, y, batch_size=4, epochs=epochs, shuffle=False, verbose=0)
    return [np.asarray(keras.ops.convert_to_numpy(w)) for w in model.trainable_weights]


def gap(got, want):
    return max(float(np.abs(a - b).max()) for a, b in zip(got, want))


@pytest.mark.parametrize("fixed", [False, True], ids=["keras-hub", "fixed"])
def test_diagnose_model_flags_the_replica_scaling(fixed):
    x, y = boxes_batch(4)
    result = keras_batchfix.diagnose_model(compiled(fixed), x, y)
    assert abs(result.exponent) < 1e-3
    if fixed:
        assert result.replica_factor == pytest.approx(1.0, rel=1e-4)
        assert result.replica_factor_split == pytest.approx(1.0, rel=1e-4)
        # Its compute_loss ignores sample weights: measured by moving the
        # predictions of each part (finite differences).
        assert result.probes["replicas"] == "predictions"
        assert result.unequal_split_factor == pytest.approx(1.0, abs=1e-2)
        # Keras's gradient_accumulation_steps divides each micro-batch by
        # its own positives, and micro_batches does not slice an override.
        assert result.verdict == "accumulation"
        assert result.accumulation_factor > 1.2
        assert "compute_loss override" in result.advice
    else:
        assert result.verdict == "replica_scaling" and result.fix == "global_count"
        assert result.replica_factor == pytest.approx(2.0, rel=1e-4)
        assert "count_weight" in str(result)


def test_the_fix_is_keras_hubs_loss_on_one_device():
    x, y = boxes_batch(4)
    losses = []
    for fixed in (False, True):
        model = compiled(fixed)
        losses.append(float(model.compute_loss(
            x=x, y=y, y_pred=model(x), sample_weight=None, training=False)))
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-6)


def test_mirrored_fixed_trains_like_one_device(mirrored_strategy):
    x, y = boxes_batch(11)  # the last batch of 3 splits 2 / 1
    single = trained(True, x, y)
    moved = gap(single, trained(True, x, y, epochs=0))
    assert moved > 1e-3  # it trained
    assert gap(trained(True, x, y, mirrored_strategy), single) < 1e-5 * max(1.0, moved)


def test_mirrored_keras_hub_takes_a_larger_step(mirrored_strategy):
    """The bug the fix removes: one step under 2 replicas, 2.74x as far.

    Each replica divides by its own positives and the replicas' gradients
    add up: 2x for equal counts, more here, where the two halves of the
    batch hold different numbers of positive anchors. Measured on keras-hub
    0.32.0 (TensorFlow, 2 logical CPUs): 2.738; a keras-hub that fixes its
    normalization makes this fail.
    """
    x, y = boxes_batch(4)
    start = trained(False, x, y, epochs=0)
    one = trained(False, x, y, epochs=1)
    two = trained(False, x, y, mirrored_strategy, epochs=1)
    ratio = np.sqrt(sum(((b - a) ** 2).sum() for a, b in zip(start, two))) / np.sqrt(
        sum(((b - a) ** 2).sum() for a, b in zip(start, one))
    )
    assert ratio == pytest.approx(2.738, rel=1e-2)


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="runs its own JAX process")
def test_jax_data_parallel_fixed_trains_like_one_device():
    moved, gap_value = map(
        float, printed_line("tests.helpers.retinanet_data_parallel", "GAP ", 300).split()
    )
    assert moved > 1e-3
    assert gap_value < 1e-5


def test_ema_count_moves_in_training_and_the_model_round_trips(tmp_path):
    x, y = boxes_batch(8)
    model = compiled(True, normalizer=lambda: keras_batchfix.EMACount(momentum=0.5))
    assert model.stateful_normalizers == [model.normalizer]
    model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    ema = float(keras.ops.convert_to_numpy(model.normalizer.ema))
    assert ema > 0  # it moved from "no step yet"
    path = str(tmp_path / "retinanet.keras")
    model.save(path)
    restored = keras.saving.load_model(path)
    assert isinstance(restored.normalizer, keras_batchfix.EMACount)
    assert float(keras.ops.convert_to_numpy(restored.normalizer.ema)) == ema
    for got, want in zip(restored.weights, model.weights):
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(got), keras.ops.convert_to_numpy(want)
        )
