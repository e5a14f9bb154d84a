"""keras-hub's D-FINE: its count is local and padded; the fix's replica shares add up.

keras-hub 0.32's `DFineObjectDetector` divides its losses by the label slots
of each replica's batch, padding included, and scores a batch's images
against indices into the first image's targets.
`keras_batchfix.integrations.d_fine.DFineObjectDetector` scores each image
against its own targets and divides by the real objects of the global
batch. keras-hub's forward pass mixes the images of a batch, so the
replica checks are on the loss for given predictions. Needs keras-hub (the
`keras-hub` extra).
"""

import keras
import numpy as np
import pytest

pytest.importorskip("keras_hub")

import keras_batchfix  # noqa: E402
from reproductions.support.d_fine import LEARNING_RATE, boxes_batch, detector  # noqa: E402


def compiled(fixed, decoder_layers=1):
    model = detector(fixed, decoder_layers=decoder_layers)
    model.compile(optimizer=keras.optimizers.SGD(LEARNING_RATE))
    return model


def loss(model, x, y):
    return loss_for(model, x, y, model(x))


def loss_for(model, x, y, y_pred):
    return float(model.compute_loss(
        x=x, y=y, y_pred=y_pred, sample_weight=None, training=False))


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


def test_keras_hubs_forward_pass_couples_the_images_of_a_batch():
    """Two images in a batch of 4 get other predictions than in a batch of 2.

    keras-hub's D-FINE model itself (not its loss) mixes the images of a
    batch, so no loss makes a replica split train like one device: this is
    why these tests compare losses for given predictions, not training runs.
    A keras-hub that fixes its model makes this fail; then add the training
    comparisons under `MirroredStrategy` and JAX `DataParallel`.
    """
    model = detector(True)
    x, _ = boxes_batch(4)
    full = keras.ops.convert_to_numpy(model(x, training=True)["logits"])
    half = keras.ops.convert_to_numpy(model(x[:2], training=True)["logits"])
    assert np.abs(full[:2] - half).max() > 1e-2


def shares(model, x, y, y_pred, parts):
    """The losses simulated replicas hand Keras for `parts` of one batch.

    `keras_batchfix.replicas.ReplicaSimulation` answers the fix's all-reduce
    of the object count with the sum over the parts.
    """
    def loss_of(x_part, y_part, y_pred_part):
        return model.compute_loss(
            x=x_part, y=y_part, y_pred=y_pred_part, sample_weight=None, training=False
        )

    split = [
        (x[p], {k: v[p] for k, v in y.items()}, {k: v[p] for k, v in y_pred.items()})
        for p in parts
    ]
    simulation = keras_batchfix.replicas.ReplicaSimulation(len(parts))
    with simulation:
        return simulation.replica_losses(loss_of, split)


def test_the_fixs_replica_shares_add_up_to_one_devices_loss():
    """An unequal split (3 / 1 images, unequal objects) of given predictions."""
    model = detector(True)
    x, y = boxes_batch(4)
    y_pred = model(x)
    whole = loss_for(model, x, y, y_pred)
    parts = [slice(0, 3), slice(3, 4)]
    np.testing.assert_allclose(
        sum(shares(model, x, y, y_pred, parts)), whole, rtol=1e-5)


def test_keras_hubs_replicas_hand_twice_the_loss():
    """The same 4 images on each of 2 replicas: 2x one device's loss on all 8."""
    model = detector(False)
    x, y = boxes_batch(4)
    x8 = np.concatenate([x, x])
    y8 = {k: np.concatenate([v, v]) for k, v in y.items()}
    y_pred = model(x8)
    whole = loss_for(model, x8, y8, y_pred)
    parts = [slice(0, 4), slice(4, 8)]
    replicas = sum(shares(model, x8, y8, y_pred, parts))
    assert replicas / whole == pytest.approx(2.0, rel=1e-3)


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
