"""`NormalizedLoss`: a loss divided by a count of its own, exact at every batch size.

Keras reduces what `Loss.call` returns by dividing its sum by the number of
elements (`"sum_over_batch_size"`). A loss that already divides by a count it
derives from the batch (matched boxes, say) is then divided a second time, by
the batch size, and its scale goes as `1 / batch_size`: the short last batch
of an epoch gets a loss and a gradient `batch_size / last_batch_size` times too
large. A `NormalizedLoss` is reduced with `"sum"` instead: `call` returns the
unreduced values already divided by the count's divisor (and carrying the
replica factor of `keras_batchfix.replicas`), and `__call__` adds them up.
"""

from __future__ import annotations

import keras
from keras import ops

from keras_batchfix import normalizers, replicas
from keras_batchfix._keras_compat import get_keras_mask


class NormalizedLoss(keras.losses.Loss):
    """Base class: `loss = sum_i w_i * numerator_i / divisor(count)`.

    Subclasses implement `numerator_and_count(y_true, y_pred)`, returning

    * `numerator`: the values to add up, of shape `()`, `(B,)` or `(B, ...)`;
    * `count`: the scalar the sum is normalized by, or `None` when the
      numerator is normalized already (then only the replicas are averaged).

    `divisor` is the `normalizer`'s (`max(1, count)` for the default
    `LocalCount`). `w_i` is `sample_weight` (broadcast from the batch axis),
    times the Keras mask of `y_pred` if it has one. Weights scale the
    numerator only; the count is what `numerator_and_count` says it is.

    `call(y_true, y_pred)` returns the unweighted values
    `numerator_i / divisor(count)` (times the replica factor), whose sum is
    the loss; `__call__` weights and sums them, as Keras's `"sum"` reduction
    does. The result is the loss at every batch size, on every backend and
    strategy.

    All arithmetic runs in the loss's `dtype` (float32 by default, also under a
    `mixed_float16` or `mixed_bfloat16` policy: predictions are cast up).

    Args:
        normalizer: how the count becomes the divisor; default
            `keras_batchfix.LocalCount()`.
        name: name of the loss.
        dtype: dtype of the computation; default `keras.backend.floatx()`.

    Example:

    ```python
    class FlaggedError(keras_batchfix.NormalizedLoss):
        def numerator_and_count(self, y_true, y_pred):
            flags = y_true[..., 0]
            return flags * ops.sum((y_pred - y_true) ** 2, -1), ops.sum(flags)

    model.compile("sgd", FlaggedError(normalizer=keras_batchfix.GlobalCount()))
    ```
    """

    def __init__(
        self,
        normalizer: normalizers.LocalCount | normalizers.EMACount | None = None,
        name: str | None = None,
        dtype: str | None = None,
    ) -> None:
        super().__init__(name=name, reduction="sum", dtype=dtype)
        self.normalizer = normalizers.get(normalizer)

    def numerator_and_count(self, y_true, y_pred):
        raise NotImplementedError

    def call(self, y_true, y_pred):
        """Unweighted values whose sum is the loss: `numerator / divisor`."""
        numerator, count = self.numerator_and_count(y_true, y_pred)
        numerator = _as_values(self, "numerator", numerator, self.dtype)
        if count is None:  # normalized already
            divisor, divisor_is_global = 1.0, False
        else:
            count = _as_values(self, "count", count, "float32")
            if len(count.shape) != 0:
                raise ValueError(
                    f"The count of loss {self.name!r} must be a scalar; it "
                    f"has shape {tuple(count.shape)}."
                )
            divisor = self.normalizer.divisor(count)
            divisor_is_global = self.normalizer.is_global
        return replicas.to_keras(
            numerator, divisor, divisor_is_global, route=replicas.COMPILED
        )

    def __call__(self, y_true, y_pred, sample_weight=None):
        mask = get_keras_mask(y_pred)
        with keras.name_scope(self.name):
            y_true = ops.convert_to_tensor(y_true, dtype=self.dtype)
            y_pred = ops.convert_to_tensor(y_pred, dtype=self.dtype)
            return weighted_sum(self.call(y_true, y_pred), sample_weight, mask)

    def get_config(self):
        config = super().get_config()
        config.pop("reduction")
        config["normalizer"] = keras.saving.serialize_keras_object(
            self.normalizer
        )
        config["dtype"] = self.dtype
        return config


def _as_values(loss, what, value, dtype):
    """`value` as a tensor of `dtype`; a named error if it is not numeric."""
    if value is None or isinstance(value, (str, bytes)):
        raise ValueError(
            f"Loss {loss.name!r} must compute numeric values for its {what}; "
            f"it returned {value!r}."
        )
    try:
        value = ops.convert_to_tensor(value)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"Loss {loss.name!r} must compute numeric values for its {what}; "
            f"it returned {value!r} ({error})."
        ) from None
    return ops.cast(value, dtype)


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


def count_weight(
    count, normalizer: normalizers.LocalCount | normalizers.EMACount | None = None
):
    """The weight that turns a sum of loss values into a count-normalized loss.

        weight = replica factor / divisor(count)

    so that `sum_i weight * values_i` is `sum_i values_i / divisor(count)`
    with the factor of `keras_batchfix.replicas` for this replica: exact on
    one device and under every strategy (with `GlobalCount`, however the
    batch splits). For a model whose `compute_loss` weights `"sum"`-reduced
    losses by `1 / count`, as keras-hub's detectors do; a stateful normalizer
    (`EMACount`) also needs the model to call its `update()`
    (`keras_batchfix.NormalizerUpdates`).

    Args:
        count: the scalar count of this replica's batch (positive anchors).
        normalizer: default `keras_batchfix.GlobalCount()`.

    Example:

    ```python
    positives = ops.sum(positive_mask)
    weight = keras_batchfix.count_weight(positives, keras_batchfix.GlobalCount())
    sample_weight = {"boxes": positive_mask * weight, "classes": valid_mask * weight}
    ```
    """
    normalizer = normalizers.get(
        normalizers.GlobalCount() if normalizer is None else normalizer
    )
    one = ops.ones((), dtype="float32")
    return replicas.to_keras(
        one, normalizer.divisor(count), normalizer.is_global, route=replicas.COMPILED
    )
