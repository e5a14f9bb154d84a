"""`NormalizedLoss`: a loss returned to Keras already reduced.

Keras reduces what `Loss.call` returns by dividing its sum by the number of
elements (`"sum_over_batch_size"`). A loss that already divides by a count it
derives from the batch (matched boxes, say) is then divided a second time, by
the batch size, and its scale goes as `1 / batch_size`: the short last batch
of an epoch gets a loss and a gradient `batch_size / last_batch_size` times too
large. `NormalizedLoss` computes the whole reduction itself and hands Keras a
scalar that Keras passes on unchanged.
"""

import keras
from keras import ops
from keras.src.backend import get_keras_mask  # how Keras itself reads masks

from keras_batchfix import normalizers
from keras_batchfix.distribute import replicas_in_sync


class NormalizedLoss(keras.losses.Loss):
    """Base class: `loss = sum_i w_i * numerator_i / normalizer(count)`.

    Subclasses implement `numerator_and_count(y_true, y_pred)`, returning

    * `numerator`: the values to add up, of shape `()`, `(B,)` or `(B, ...)`;
    * `count`: the scalar the sum is normalized by, or `None` when the
      numerator is normalized already (then only the replicas are averaged).

    `w_i` is `sample_weight` (broadcast from the batch axis), times the Keras
    mask of `y_pred` if it has one. Weights scale the numerator only; the count
    is what `numerator_and_count` says it is. Keras's `reduction` does not
    apply: the returned value is the loss (a scalar), at every batch size.

    All arithmetic runs in the loss's `dtype` (float32 by default, also under a
    `mixed_float16` or `mixed_bfloat16` policy: predictions are cast up).

    Args:
        normalizer: how the count becomes the divisor; default
            `keras_batchfix.LocalCount()` (`max(1, count)`, averaged over
            `tf.distribute` replicas).
        name: name of the loss.
        dtype: dtype of the computation; default `keras.backend.floatx()`.
    """

    def __init__(self, normalizer=None, name=None, dtype=None):
        super().__init__(name=name, reduction="sum", dtype=dtype)
        self.normalizer = normalizers.get(normalizer)

    def numerator_and_count(self, y_true, y_pred):
        raise NotImplementedError

    def call(self, y_true, y_pred):
        """Unweighted loss of the batch, as a scalar."""
        return self(y_true, y_pred)

    def __call__(self, y_true, y_pred, sample_weight=None):
        mask = get_keras_mask(y_pred)
        with keras.name_scope(self.name):
            y_true = ops.convert_to_tensor(y_true, dtype=self.dtype)
            y_pred = ops.convert_to_tensor(y_pred, dtype=self.dtype)
            numerator, count = self.numerator_and_count(y_true, y_pred)
            numerator = ops.cast(numerator, self.dtype)
            total = weighted_sum(numerator, sample_weight, mask)
            if count is None:  # already normalized: only the replica mean
                replicas = replicas_in_sync()
                return total if replicas == 1 else total / float(replicas)
            divisor = ops.cast(self.normalizer(count), self.dtype)
            return ops.divide(total, divisor)

    def get_config(self):
        config = super().get_config()
        config.pop("reduction")
        config["normalizer"] = keras.saving.serialize_keras_object(
            self.normalizer
        )
        config["dtype"] = self.dtype
        return config


def weighted_sum(values, sample_weight=None, mask=None):
    """`sum(values * weights)`, weights broadcast from the leading axes."""
    weights = None
    for factor in (mask, sample_weight):
        if factor is None:
            continue
        factor = ops.cast(factor, values.dtype)
        weights = factor if weights is None else _align(weights, factor) * factor
    if weights is None:
        return ops.sum(values)
    if len(values.shape) == 0:
        raise ValueError(
            "`sample_weight` (or a mask) needs per-sample loss values, but the "
            "loss returned a scalar (shape ()). Return values of shape "
            "(batch_size,) or (batch_size, ...) to weight samples."
        )
    weights = _align(weights, values)
    return ops.sum(values * weights)


def _align(weights, values):
    """Squeeze trailing 1s of `weights`, then expand it to the rank of `values`."""
    while len(weights.shape) > len(values.shape) and weights.shape[-1] == 1:
        weights = ops.squeeze(weights, axis=-1)
    if len(weights.shape) > len(values.shape):
        raise ValueError(
            f"`sample_weight` of shape {tuple(weights.shape)} has more "
            f"dimensions than the loss values of shape {tuple(values.shape)}; "
            "wanted shape (batch_size,) or a prefix of the values' shape."
        )
    while len(weights.shape) < len(values.shape):
        weights = ops.expand_dims(weights, axis=-1)
    return weights
