"""The token model's loss as a numerator and a count (padding is token 0)."""

import keras
from keras import ops


def token_sum(y_true, y_pred):
    """Cross-entropy summed over the valid (non-padding) target tokens."""
    valid = ops.cast(y_true > 0, "float32")
    ce = keras.losses.sparse_categorical_crossentropy(y_true, y_pred, from_logits=True)
    return ops.sum(ce * valid, axis=-1)


def valid_tokens(y_true, y_pred):
    return ops.sum(ops.cast(y_true > 0, "float32"))
