"""`compensate`: undo Keras's reduction over the batch for a self-normalizing loss."""

import functools
import re

import keras

from keras_batchfix import _validation
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

    def __call__(self, y_true, y_pred, sample_weight=None):
        _validation.check_sample_weight(self.name, sample_weight, y_pred)
        return super().__call__(y_true, y_pred, sample_weight)

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
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        trace = getattr(y_pred, "_trace", None)  # JAX's tracers since 0.4.36
        if (
            isinstance(y_pred, jax.core.Tracer)
            and trace is not None
            and type(trace).__name__ != "DynamicJaxprTrace"  # jit, not grad
            and getattr(values, "_trace", None) is not trace
        ):
            return (
                "values outside the gradient's trace of `y_pred` (a constant "
                "or a function of `y_true` alone)"
            )
    elif backend == "torch":
        import torch

        if (
            torch.is_grad_enabled()
            and getattr(y_pred, "requires_grad", False)
            and not getattr(values, "requires_grad", True)
        ):
            return (
                "values that do not require grad (a constant or a function "
                "of `y_true` alone)"
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

    A loss whose values cannot depend on `y_pred` raises a `ValueError`
    (it has no gradient): one that returns a Python or NumPy value
    (`lambda y_true, y_pred: 0.5`) at every call on every backend; one that
    returns a constant tensor or a function of `y_true` alone, in training
    steps on JAX (which would otherwise train on silently, moving no weight)
    and torch. TensorFlow's `fit` reports those itself when no other loss
    has a gradient ("No gradients provided"). Only cheap checks are made (types, JAX's tracing, torch's
    `requires_grad`), never a host round-trip.

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
