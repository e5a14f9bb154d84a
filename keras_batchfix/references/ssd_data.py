"""Random batches in the ssd_keras layout (one-hot classes, box offsets)."""

import numpy as np


def random_batch(
    rng,
    batch_size,
    anchors,
    num_classes,
    positive_fraction,
    neutral_fraction=0.1,
    trailing=0,
    from_logits=True,
):
    """Returns float32 `(y_true, y_pred)` of shape `(B, A, C + 4 + trailing)`."""
    shape = (batch_size, anchors)
    kind = rng.random(shape)
    labels = rng.integers(1, num_classes, size=shape)
    labels = np.where(kind < positive_fraction, labels, 0)
    neutral = (kind >= positive_fraction) & (
        kind < positive_fraction + neutral_fraction
    )
    onehot = np.eye(num_classes, dtype="float32")[labels]
    onehot[neutral] = 0.0
    y_true = np.concatenate(
        [
            onehot,
            rng.normal(size=shape + (4,)),
            rng.normal(size=shape + (trailing,)),
        ],
        axis=-1,
    ).astype("float32")
    scores = rng.normal(scale=2.0, size=shape + (num_classes,))
    if not from_logits:
        scores = np.exp(scores) / np.exp(scores).sum(-1, keepdims=True)
    y_pred = np.concatenate(
        [
            scores,
            rng.normal(scale=1.5, size=shape + (4,)),
            rng.normal(size=shape + (trailing,)),
        ],
        axis=-1,
    ).astype("float32")
    return y_true, y_pred
