"""Losses divided by a count of their own, exact at every batch size.

Keras reduces what `Loss.call` returns by dividing its sum by the number of
values (`"sum_over_batch_size"`). A loss that already divides by a count it
takes from the batch (matched boxes, valid tokens) is then divided a second
time, by the batch size: its scale goes as `1 / batch_size`, and the short
last batch of an epoch gets a loss and a gradient `batch_size /
last_batch_size` times too large. One story, three entry points:

* `NormalizedLoss`: a `Loss` whose subclass returns a numerator and a count;
  `call` divides by the normalizer's divisor, `__call__` sums (`"sum"`);
* `compensate(loss, count=None)`: the same for a function or a Keras loss;
* `count_weight(count)`: the weight that does it inside a model's own
  `compute_loss`.

The default normalizer is `GlobalCount` everywhere; `keras_batchfix.replicas`
supplies the replica factor.
"""

import functools
import re
from collections.abc import Callable

import keras
from keras import ops

from keras_batchfix import _keras_compat, _validation, kernels, normalizers, replicas


class NormalizedLoss(keras.losses.Loss):
    """Base class: `loss = sum_i w_i * numerator_i / divisor(count)`.

    A subclass implements `numerator_and_count(y_true, y_pred)`, returning the
    values to add up (shape `()`, `(B,)` or `(B, ...)`) and the scalar count
    they are divided by (or `None` when they are normalized already).
    `divisor` is the normalizer's, `max(1, global count)` by default. `w_i`
    is `sample_weight` (broadcast from the batch axis) times the Keras masks
    of `y_pred` and of the values; weights scale the numerator only.

    `call` returns the unweighted values `numerator_i / divisor(count)` (with
    the replica factor); `__call__` weights and sums them with Keras's
    `"sum"` reduction. The loss is the same at every batch size, on every
    backend and strategy. The arithmetic runs in the loss's `dtype`.

    Args:
        normalizer: a `keras_batchfix.Normalizer`; default `GlobalCount()`.
        name: name of the loss.
        dtype: dtype of the computation; default `keras.backend.floatx()`.

    Example:

    ```python
    class FlaggedError(keras_batchfix.NormalizedLoss):
        def numerator_and_count(self, y_true, y_pred):
            flags = y_true[..., 0]
            return flags * ops.sum((y_pred - y_true) ** 2, -1), ops.sum(flags)

    model.compile("sgd", FlaggedError())
    ```
    """

    def __init__(
        self,
        normalizer: normalizers.Normalizer | dict | None = None,
        name: str | None = None,
        dtype: str | None = None,
    ):
        super().__init__(name=name, reduction="sum", dtype=dtype)
        self.normalizer = normalizers.get(normalizer)

    def numerator_and_count(self, y_true, y_pred) -> tuple:
        raise NotImplementedError

    def call(self, y_true, y_pred):
        """Unweighted values whose sum is the loss: `numerator / divisor`."""
        numerator, count = self.numerator_and_count(y_true, y_pred)
        numerator = as_values(self, "numerator", numerator, self.dtype)
        if count is None:  # normalized already
            divisor, divisor_is_global = 1.0, False
        else:
            count = as_values(self, "count", count, "float32")
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
        _validation.check_sample_weight(self.name, sample_weight, y_pred)
        in_mask = _keras_compat.get_keras_mask(y_pred)
        with keras.name_scope(self.name):
            y_true, y_pred = (
                keras.tree.map_structure(
                    lambda v: ops.convert_to_tensor(v, dtype=self.dtype), nest
                )
                for nest in (y_true, y_pred)
            )
            values = self.call(y_true, y_pred)
            out_mask = _keras_compat.get_keras_mask(values)
            if in_mask is None or out_mask is None:
                mask = out_mask if in_mask is None else in_mask
            else:
                mask = ops.logical_and(in_mask, out_mask)
            return weighted_sum(values, sample_weight, mask)

    def get_config(self):
        config = super().get_config()
        config.pop("reduction")
        config["normalizer"] = keras.saving.serialize_keras_object(
            self.normalizer
        )
        config["dtype"] = self.dtype
        return config


def as_values(loss, what, value, dtype):
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
    """`sum(values * weights)`, weights broadcast from the leading axes.

    Keras's `"sum"` reduction, with two differences: weights broadcast over
    any number of trailing axes (Keras expands them by one at most), and an
    empty batch sums to 0 (Keras returns its empty values).
    """
    weights = None
    for factor in (mask, sample_weight):
        if factor is None:
            continue
        factor = ops.cast(factor, values.dtype)
        weights = factor if weights is None else _align(weights, factor) * factor
    if weights is not None:
        if len(values.shape) == 0:
            raise ValueError(
                "`sample_weight` (or a mask) needs per-sample loss values, but "
                "the loss returned a scalar (shape ()). Return values of shape "
                "(batch_size,) or (batch_size, ...) to weight samples."
            )
        values = values * _align(weights, values)
    return ops.sum(values)


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
        independent = _independent_of(values, y_pred)
        if independent:
            raise ValueError(
                f"The loss {self.name!r} returned {independent}, which does not "
                "depend on `y_pred`: it has no gradient, and training would "
                "move no weight (TensorFlow says \"No gradients provided\", "
                "torch raises from autograd, JAX would train on silently). "
                "Return values computed from `y_pred` with `keras.ops`."
            )
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


def _independent_of(values, y_pred):
    """Why `values` cannot depend on `y_pred`, or "" when they may.

    Cheap checks only, never a host round-trip:

    * a Python or NumPy value (not a tensor) computed from tensor inputs
      (`lambda y_true, y_pred: 0.5`): every backend, every call;
    * in a training step only (where a gradient is taken): on JAX, values
      that are not traced along with `y_pred` by the differentiation (a
      constant, or a function of `y_true` alone); on torch, values that do
      not require grad while `y_pred` does. TensorFlow's own "No gradients
      provided" covers it there.
    """
    if values is None or isinstance(values, (str, bytes)):
        return ""  # `NormalizedLoss` names these
    if not keras.ops.is_tensor(y_pred):
        return ""
    if not keras.ops.is_tensor(values):
        return f"a constant ({values!r})"
    if kernels.outside_gradient_trace(values, y_pred):
        return (
            "values the gradient cannot reach from `y_pred` (a constant or a "
            "function of `y_true` alone)"
        )
    return ""


def _name_of(loss):
    """A name usable as a TensorFlow scope: `<lambda>` and partials included."""
    while isinstance(loss, functools.partial):
        loss = loss.func
    name = getattr(loss, "name", None) or getattr(loss, "__name__", None)
    if not isinstance(name, str):
        name = type(loss).__name__
    return re.sub(r"[^A-Za-z0-9_.\-]+", "_", name).strip("_") or "loss"


def compensate(
    loss: Callable | keras.losses.Loss,
    count: Callable | None = None,
    normalizer: normalizers.Normalizer | None = None,
    name: str | None = None,
) -> keras.losses.Loss:
    """Makes Keras optimize a self-normalizing loss exactly as written.

    Keras divides the values of a loss by their number; for values already
    divided by a count of the batch that is one division too many. The
    wrapped loss is

        loss = sum_i w_i * values_i                           (count=None)
        loss = sum_i w_i * values_i / max(1, global count)    (count given)

    for values of shape `()`, `(B,)` or `(B, ...)`, `w_i` being
    `sample_weight`. Given a `count`, `loss` returns the numerator and the
    normalizer divides, exact under every strategy and with `micro_batches`.
    A loss whose values cannot depend on `y_pred` (a constant; on JAX and
    torch in training, a function of `y_true` alone) raises a `ValueError`.

    Args:
        loss: `(y_true, y_pred) -> values`, a function or a `keras.losses.Loss`
            (its unreduced `call` is used).
        count: optional `(y_true, y_pred) -> scalar`, the normalizing count.
        normalizer: a `keras_batchfix.Normalizer` for `count`; default
            `GlobalCount()`.
        name: name of the loss; default `"compensated_" + loss name`.

    Returns:
        A `keras.losses.Loss` for `model.compile(loss=...)`; a
        `NormalizedLoss` (such as `SSDMultiboxLoss`) comes back unchanged.

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


def count_weight(count, normalizer: normalizers.Normalizer | None = None):
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
    normalizer = normalizers.get(normalizer)
    one = ops.ones((), dtype="float32")
    return replicas.to_keras(
        one, normalizer.divisor(count), normalizer.is_global, route=replicas.COMPILED
    )
