"""keras-hub's D-FINE: its count is local and padded; the fix trains like one device.

keras-hub 0.32's `DFineObjectDetector` divides its losses by the label slots
of each replica's batch, padding included.
`keras_batchfix.integrations.d_fine.DFineObjectDetector` divides by the real
objects of the global batch. Needs keras-hub (the `keras-hub` extra).
"""

import keras
import numpy as np
import pytest

pytest.importorskip("keras_hub")

import keras_batchfix  # noqa: E402
from tests.d_fine_problem import LEARNING_RATE, boxes_batch, detector  # noqa: E402
from tests.processes import printed_line  # noqa: E402
from tests.training import strategy_scope  # noqa: E402


def compiled(fixed, strategy=None, decoder_layers=1):
    with strategy_scope(strategy):
        model = detector(fixed, decoder_layers=decoder_layers)
        model.compile(optimizer=keras.optimizers.SGD(LEARNING_RATE))
    return model


def loss(model, x, y):
    return float(model.compute_loss(
        x=x, y=y, y_pred=model(x), sample_weight=None, training=False))


def trained(fixed, x, y, strategy=None, epochs=1):
    model = compiled(fixed, strategy)
    model.fit(x, y, batch_size=4, epochs=epochs, shuffle=False, verbose=0)
    return [np.asarray(keras.ops.convert_to_numpy(w)) for w in model.trainable_weights]


def gap(got, want):
    return max(float(np.abs(a - b).max()) for a, b in zip(got, want))


def with_padding(y, extra):
    """`y` with `extra` more padding slots an image (label -1, box 0)."""
    n = y["labels"].shape[0]
    return {
        "boxes": np.concatenate([y["boxes"], np.zeros((n, extra, 4), "float32")], 1),
        "labels": np.concatenate([y["labels"], -np.ones((n, extra), "int32")], 1),
    }


def test_keras_hub_divides_by_its_padded_slots():
    """One image, 2 objects: 2 padding slots more double keras-hub's divisor.

    keras-hub's matcher takes the padding slots for objects, so they add to
    the loss; the fix divides the same sum by the 2 real objects.
    """
    x, y = boxes_batch(1, slots=2, full=True)
    model, fixed = detector(False), detector(True)
    padded = with_padding(y, 2)
    np.testing.assert_allclose(
        loss(fixed, x, padded), 2.0 * loss(model, x, padded), rtol=1e-5)
    assert loss(fixed, x, padded) > 1.01 * loss(fixed, x, y)


def test_the_fix_is_keras_hubs_loss_on_one_full_image():
    x, y = boxes_batch(1, full=True)
    np.testing.assert_allclose(
        loss(detector(True), x, y), loss(detector(False), x, y), rtol=1e-6)


def test_the_fix_is_keras_hubs_loss_on_one_image_with_distillation():
    """Two decoder layers: the distillation loss of one image is keras-hub's."""
    x, y = boxes_batch(1, full=True)
    np.testing.assert_allclose(
        loss(detector(True, decoder_layers=2), x, y),
        loss(detector(False, decoder_layers=2), x, y), rtol=1e-6)


def test_keras_hubs_batch_loss_depends_on_the_order_of_its_images():
    """keras-hub gathers each image's targets by indices into the first image's.

    On a batch of full images (equal counts) one device's loss is the mean
    of the images' losses, whatever their order: the fix's is, keras-hub's
    is neither.
    """
    x, y = boxes_batch(3, full=True)
    reverse = {k: v[::-1] for k, v in y.items()}
    model, fixed = detector(False), detector(True)
    singles = np.mean([
        loss(model, x[i:i + 1], {k: v[i:i + 1] for k, v in y.items()}) for i in range(3)
    ])
    np.testing.assert_allclose(loss(fixed, x, y), singles, rtol=1e-5)
    np.testing.assert_allclose(loss(fixed, x[::-1], reverse), singles, rtol=1e-5)
    assert abs(loss(model, x, y) - loss(model, x[::-1], reverse)) > 1e-2 * singles


def test_diagnose_model_finds_the_replica_sum():
    x, y = boxes_batch(4)
    result = keras_batchfix.diagnose_model(compiled(False), x, y, repeats=(1, 2))
    assert abs(result.exponent) < 1e-3
    assert result.verdict == "replica_sum"
    assert result.replica_factor == pytest.approx(2.0, rel=1e-4)


def test_mirrored_fixed_trains_like_one_device(mirrored_strategy):
    x, y = boxes_batch(7)  # the last batch of 3 splits 2 / 1
    single = trained(True, x, y)
    moved = gap(single, trained(True, x, y, epochs=0))
    assert moved > 1e-4  # it trained
    assert gap(trained(True, x, y, mirrored_strategy), single) < 1e-5 * max(1.0, moved)


def test_mirrored_keras_hub_takes_twice_the_step(mirrored_strategy):
    """The bug the fix removes, measured: one step on 2 replicas."""
    x, y = boxes_batch(4, full=True)
    start = trained(False, x, y, epochs=0)
    one = trained(False, x, y, epochs=1)
    two = trained(False, x, y, mirrored_strategy, epochs=1)
    ratio = np.sqrt(sum(((b - a) ** 2).sum() for a, b in zip(start, two))) / np.sqrt(
        sum(((b - a) ** 2).sum() for a, b in zip(start, one))
    )
    print("RATIO", ratio)
    assert ratio == pytest.approx(2.0, rel=0.05)


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="runs its own JAX process")
def test_jax_data_parallel_fixed_trains_like_one_device():
    moved, gap_value = map(
        float, printed_line("tests.d_fine_data_parallel", "GAP ", 300).split()
    )
    assert moved > 1e-4
    assert gap_value < 1e-5


def test_the_fix_round_trips(tmp_path):
    model = compiled(True)
    path = str(tmp_path / "d_fine.keras")
    model.save(path)
    restored = keras.saving.load_model(path)
    assert isinstance(restored.normalizer, keras_batchfix.GlobalCount)
    x, y = boxes_batch(2)
    np.testing.assert_allclose(loss(restored, x, y), loss(model, x, y), rtol=1e-6)


def test_micro_batches_refuse_the_override():
    """Its loss is its own `compute_loss`, which `micro_batches` slices would skip."""
    model = detector(True)
    with pytest.raises(ValueError, match="overrides `compute_loss`"):
        model.compile(optimizer=keras.optimizers.SGD(LEARNING_RATE), micro_batches=2)
