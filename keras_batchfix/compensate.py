"""`compensate`: undo Keras's reduction over the batch for a self-normalizing loss."""

import functools
import re

import keras

from keras_batchfix.normalized_loss import NormalizedLoss


@keras.saving.register_keras_serializable(package="keras_batchfix")
class Compensated(NormalizedLoss):
    """A user loss made independent of Keras's reduction; see `compensate`."""

    def __init__(self, loss, count=None, normalizer=None, name=None, dtype=None):
        if not callable(loss):
            raise ValueError(
                "Argument `loss` must be a callable `(y_true, y_pred) -> values` "
                f"or a `keras.losses.Loss`; received {loss!r}."
            )
        if count is not None and not callable(count):
            raise ValueError(
                "Argument `count` must be a callable `(y_true, y_pred) -> scalar` "
                f"or None; received {count!r}."
            )
        if count is None and normalizer is not None:
            raise ValueError(
                "Argument `normalizer` applies to a `count`; received "
                f"normalizer={normalizer!r} with count=None (a loss that "
                "normalizes itself has no count to normalize by)."
            )
        if name is None:
            name = "compensated_" + _name_of(loss)
        super().__init__(normalizer=normalizer, name=name, dtype=dtype)
        self.loss = loss
        self.count = count

    def numerator_and_count(self, y_true, y_pred):
        if isinstance(self.loss, keras.losses.Loss):
            values = self.loss.call(y_true, y_pred)  # unreduced values
        else:
            values = self.loss(y_true, y_pred)
        if self.count is None:
            return values, None
        count = self.count(y_true, y_pred)
        if count is None:
            raise ValueError(
                f"The `count` of loss {self.name!r} must compute a scalar; it "
                "returned None."
            )
        return values, count

    def get_config(self):
        config = super().get_config()
        config["loss"] = keras.saving.serialize_keras_object(self.loss)
        config["count"] = keras.saving.serialize_keras_object(self.count)
        if self.count is None:
            del config["normalizer"]
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for key in ("loss", "count"):  # the normalizer: `normalizers.get`
            config[key] = keras.saving.deserialize_keras_object(config[key])
        return cls(**config)


def _name_of(loss):
    """A name usable as a TensorFlow scope: `<lambda>` and partials included."""
    while isinstance(loss, functools.partial):
        loss = loss.func
    name = getattr(loss, "name", None) or getattr(loss, "__name__", None)
    if not isinstance(name, str):
        name = type(loss).__name__
    return re.sub(r"[^A-Za-z0-9_.\-]+", "_", name).strip("_") or "loss"


def compensate(loss, count=None, normalizer=None, name=None):
    """Makes Keras optimize a self-normalizing loss exactly as written.

    For a loss whose values are already divided by a count taken from the
    batch (`l_i / N` with `N` the batch's matched boxes, say), Keras's default
    reduction divides again by the number of values and trains on
    `sum_i l_i / (N * B)`, which scales like `1 / B`. The wrapped loss is

        loss = sum_i w_i * values_i                       (count=None)
        loss = sum_i w_i * values_i / max(1, count)       (count given)

    for values of shape `()`, `(B,)` or `(B, ...)` alike, with `w_i` the
    `sample_weight` of sample `i` (weights multiply the numerator; they do not
    change the count; a scalar-valued loss cannot take `sample_weight`).

    Pass `count` to hand the wrapper your numerator and your count separately
    (then `loss` returns un-normalized values): the `normalizer` decides how
    the count becomes a divisor, so it can be made global across replicas.
    Under `tf.distribute` the replica losses are averaged, which equals
    single-device training whenever every replica sees the same count.

    Args:
        loss: `(y_true, y_pred) -> values`, a function or a `keras.losses.Loss`
            (its unreduced `call` is used).
        count: optional `(y_true, y_pred) -> scalar`, the normalizing count.
        normalizer: how `count` becomes the divisor (only with `count`); see
            `keras_batchfix.LocalCount` (the default) and `GlobalCount`.
        name: name of the loss; default `"compensated_" + loss name`.

    Returns:
        A `keras.losses.Loss` to pass to `model.compile(loss=...)`. A loss of
        this package (a `keras_batchfix.NormalizedLoss`, such as
        `SSDMultiboxLoss`) is exact already and comes back unchanged.

    Example:

    ```python
    def box_loss(y_true, y_pred):  # per sample, normalized by the batch
        positives = ops.sum(y_true[..., 0])
        per_sample = ops.sum(ops.abs(y_true - y_pred) * y_true[..., :1], (1, 2))
        return per_sample / ops.maximum(positives, 1.0)

    model.compile(optimizer="sgd", loss=keras_batchfix.compensate(box_loss))
    ```
    """
    if isinstance(loss, NormalizedLoss):
        if count is not None or normalizer is not None or name is not None:
            raise ValueError(
                f"Argument `loss` ({loss!r}) is a NormalizedLoss: it has its "
                "own count and normalizer, so `compensate` returns it as it "
                "is and takes no `count`, `normalizer` or `name`."
            )
        return loss
    return Compensated(loss, count=count, normalizer=normalizer, name=name)
