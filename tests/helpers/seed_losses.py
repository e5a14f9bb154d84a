"""Losses for the diagnostics tests, written independently of the package.

`ssd_keras_style_loss` follows ssd_keras's `SSDLoss.compute_loss` layout,
`(batch, anchors, n_classes + 4)`, simplified (no hard-negative mining: every
negative anchor counts): per image, (class loss + alpha * box loss) divided by
max(1, positives of the whole batch). ssd_keras then multiplied by the batch
size to undo Keras 2's mean over the batch; `with_batch_size=True` keeps that
line, `False` drops it (the seed-000 bug).
"""

import numpy as np
from keras import ops

from keras_batchfix import EMACount, SSDMultiboxLoss

N_CLASSES = 3  # background + 2


def _ssd_terms(y_true, y_pred, alpha=1.0):
    n = N_CLASSES
    log_probs = ops.log_softmax(y_pred[..., :n], axis=-1)
    cross_entropy = -ops.sum(y_true[..., :n] * log_probs, axis=-1)
    diff = ops.abs(y_pred[..., n : n + 4] - y_true[..., n : n + 4])
    smooth_l1 = ops.sum(ops.where(diff < 1.0, 0.5 * diff**2, diff - 0.5), -1)
    positives = ops.max(y_true[..., 1:n], axis=-1)
    negatives = y_true[..., 0]
    class_loss = ops.sum((positives + negatives) * cross_entropy, axis=-1)
    box_loss = ops.sum(positives * smooth_l1, axis=-1)
    return class_loss + alpha * box_loss, ops.sum(positives)


def ssd_numerator(y_true, y_pred):
    """Per-image (class loss + alpha * box loss), not normalized."""
    return _ssd_terms(y_true, y_pred)[0]


def ssd_positives(y_true, y_pred):
    """The batch's positive anchors."""
    return _ssd_terms(y_true, y_pred)[1]


def ssd_keras_style_loss(y_true, y_pred):
    """Per-image values / max(1, N_pos of the batch), without `* batch_size`."""
    per_image, n_pos = _ssd_terms(y_true, y_pred)
    return per_image / ops.maximum(1.0, n_pos)


def ssd_keras_style_loss_times_batch(y_true, y_pred):
    """The same, with ssd_keras's `* batch_size` (dynamic batch size)."""
    batch_size = ops.cast(ops.shape(y_pred)[0], y_pred.dtype)
    return ssd_keras_style_loss(y_true, y_pred) * batch_size


def unnormalized_sum(y_true, y_pred):
    """A scalar sum of squared errors over the whole batch."""
    return ops.sum(ops.square(y_true - y_pred))


def ssd_batch(batch_size=16, anchors=24, seed=0):
    """Random (y_true, y_pred) in the ssd_keras layout, 2-6 positives/image."""
    rng = np.random.default_rng(seed)
    n = N_CLASSES
    y_true = np.zeros((batch_size, anchors, n + 4), "float32")
    labels = np.zeros((batch_size, anchors), "int64")
    for i in range(batch_size):
        positives = rng.choice(anchors, size=rng.integers(2, 7), replace=False)
        labels[i, positives] = rng.integers(1, n, size=positives.size)
    y_true[..., :n] = np.eye(n, dtype="float32")[labels]
    y_true[..., n:] = rng.normal(size=(batch_size, anchors, 4))
    y_pred = rng.normal(size=(batch_size, anchors, n + 4)).astype("float32")
    return y_true, y_pred


# The package's SSD loss with an EMACount normalizer, for the CLI.
ema_count_ssd_loss = SSDMultiboxLoss(
    N_CLASSES, from_logits=True, normalizer=EMACount(momentum=0.5)
)
