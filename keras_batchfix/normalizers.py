"""Normalizers: how the count a loss divides by becomes its divisor.

A loss that "normalizes by a count" (matched boxes, valid tokens, samples) is
`numerator / divisor(count)`. A `Normalizer` decides two things that Keras
would otherwise decide, and gets wrong for such losses:

* how the count becomes a divisor (`max(1, count)`, so a batch with no
  positives gives a finite loss);
* whose count it is: the global batch of all replicas (`GlobalCount`, the
  default everywhere, and `EMACount`; the replicas' losses then add up to the
  one-device loss) or the replica's own batch (`LocalCount`; the replicas'
  losses are then averaged).

Normalizers compute no replica factor themselves: `keras_batchfix.replicas`
turns a numerator and a divisor into what each replica hands Keras.
"""

from __future__ import annotations

import keras
from keras import ops

from keras_batchfix import _validation, replicas


def _float_count(count):
    """`count` as a float32 scalar without gradient.

    A Python number (a static batch size, as eager torch and JAX traces
    give) stays a Python float, so that the divisor costs no ops.
    """
    if isinstance(count, (int, float)) and not isinstance(count, bool):
        return float(count)
    count = ops.stop_gradient(ops.cast(count, "float32"))
    if len(count.shape) != 0:
        raise ValueError(
            "A normalizer's `count` must be a scalar; received shape "
            f"{tuple(count.shape)}."
        )
    return count


def _checked_count(count):
    """`count` as a float32 scalar; NaN where it is negative (see `_divisor`)."""
    count = _float_count(count)
    if isinstance(count, float):
        return count if count >= 0.0 else float("nan")
    return ops.where(count >= 0.0, count, float("nan"))


def _divisor(total):
    """`max(1, total)`; NaN for a negative or NaN count.

    A count cannot be negative: rather than clamp it to 1 and train on a
    wrong scale, the loss becomes NaN on every backend, in compiled code too
    (where checking the value would cost a host round-trip). (A NaN fails
    the comparison.)
    """
    if isinstance(total, float):
        return max(total, 1.0) if total >= 0.0 else float("nan")
    return ops.where(total >= 0.0, ops.maximum(total, 1.0), float("nan"))


class Normalizer:
    """Base class of the normalizers: `divisor(count)`, with explicit state.

    A subclass sets `is_global` (whether `divisor` sums the count over the
    replicas) and implements `divisor(count)`. A normalizer with state
    (`EMACount`) keeps it in Keras variables, sets `stateful = True` and moves
    it in `update()`, which `keras_batchfix.Model` calls once per training
    step, after the loss; `divisor` itself changes no state a later step sees.

    Example:

    ```python
    class SqrtCount(keras_batchfix.Normalizer):
        is_global = True

        def divisor(self, count):
            total = keras_batchfix.replicas.global_sum(count)
            return keras.ops.sqrt(keras.ops.maximum(total, 1.0))
    ```
    """

    is_global = False
    stateful = False

    def divisor(self, count):
        """The scalar the loss's numerator is divided by, for a scalar `count`."""
        raise NotImplementedError

    def update(self):
        """Moves the state after a training step's loss (nothing without state)."""

    def get_config(self):
        return {}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        return f"{type(self).__name__}()"


@keras.saving.register_keras_serializable(package="keras_batchfix")
class GlobalCount(Normalizer):
    """Normalize by the count of the whole global batch, all replicas together.

        divisor = max(1, sum over replicas of count)

    Each replica divides its own numerator by the global count, so the
    replicas' gradients combine into exactly those of one device seeing the
    global batch, however the batch splits (an uneven last batch included),
    as FCOS and mmdet do with an `all_reduce`. On one device it is the
    batch's own count. The default normalizer of every loss of the package.

    The sum runs over `tf.distribute` replicas (mirrored or multi-worker) and
    over a `torch.distributed` process group (DDP); under JAX's
    `keras.distribution.DataParallel` the loss already sees the global batch.
    A negative or NaN count makes the divisor, and so the loss, NaN.

    Example:

    ```python
    loss = keras_batchfix.SSDMultiboxLoss(21, normalizer=GlobalCount())
    ```
    """

    is_global = True

    def divisor(self, count):
        return _divisor(replicas.global_sum(_checked_count(count)))


@keras.saving.register_keras_serializable(package="keras_batchfix")
class LocalCount(Normalizer):
    """Normalize by the count of the batch this replica sees.

        divisor = max(1, count)

    Each replica divides by its own count and Keras averages the replicas'
    losses: equal to one device only when every replica sees the same count.
    For comparison with code that does this (ssd.pytorch, torchvision's SSD
    under DDP); `GlobalCount` is exact at every split.

    Example:

    ```python
    loss = keras_batchfix.SSDMultiboxLoss(21, normalizer=LocalCount())
    ```
    """

    def divisor(self, count):
        return _divisor(_float_count(count))


@keras.saving.register_keras_serializable(package="keras_batchfix")
class EMACount(Normalizer, keras.metrics.Metric):
    """Normalize by an exponential moving average of the global count.

    detectron2's RetinaNet and FCOS normalizer, with the count made global as
    in `GlobalCount`. For a batch whose global count is `n`:

        candidate = momentum * ema + (1 - momentum) * max(1, n)
        divisor   = candidate
        ema      <- candidate          (update(), in training steps only)

    Before the first training step `ema` is `initial_value`, or (default)
    the first batch's `max(1, n)`. With `momentum=0` it is `GlobalCount`.

    Its state is two variables, `ema` and `candidate`. A
    `keras_batchfix.Model` (or `NormalizerUpdates`) calls `update()` after the
    loss of each training step and tracks the variables (on JAX they are part
    of the training state; `model.save` saves them). It does so through
    Keras's metrics, the one place a compiled model takes on new variables:
    the model lists the normalizer in `model.metrics`, where it logs nothing
    and `reset_state()` keeps the EMA (it is training state).
    Create it inside `strategy.scope()` under `tf.distribute`.

    Args:
        momentum: weight of the previous EMA, in `[0, 1)`. Default 0.9
            (detectron2's).
        initial_value: EMA before the first training step, a float > 0, or
            None (default) to start at the first training batch's
            `max(1, global count)`. detectron2 uses 100.
        name: name of the normalizer and of its variables' scope.

    Example:

    ```python
    normalizer = keras_batchfix.EMACount(momentum=0.9)
    model = keras_batchfix.Model(inputs, outputs)
    model.compile("sgd", keras_batchfix.SSDMultiboxLoss(21, normalizer=normalizer))
    model.fit(x, y, batch_size=2)
    keras.ops.convert_to_numpy(normalizer.ema)  # the current EMA
    ```
    """

    is_global = True
    stateful = True

    def __init__(
        self, momentum: float = 0.9, initial_value: float | None = None,
        name: str = "ema_count",
    ) -> None:
        momentum = _validation.real(
            "momentum", momentum, "a float in [0, 1)", lambda v: 0 <= v < 1
        )
        if initial_value is not None:
            initial_value = _validation.real(
                "initial_value", initial_value, "a float > 0 or None", lambda v: v > 0
            )
        keras.metrics.Metric.__init__(self, name=name, dtype="float32")
        self.momentum = momentum
        self.initial_value = initial_value
        # 0 marks "no training step yet" (an EMA of max(1, count) is >= 1).
        # Every replica computes the same values from the global count.
        self.ema = self.add_variable(
            shape=(),
            initializer=keras.initializers.Constant(self.initial_value or 0.0),
            aggregation="only_first_replica",
            name="ema",
        )
        self.candidate = self.add_variable(
            shape=(), initializer="zeros", aggregation="only_first_replica",
            name="candidate",
        )

    def divisor(self, count):
        total = _divisor(replicas.global_sum(_checked_count(count)))
        ema = ops.convert_to_tensor(self.ema)
        previous = ops.where(ema > 0.0, ema, total)
        candidate = self.momentum * previous + (1.0 - self.momentum) * total
        self.candidate.assign(candidate)
        return candidate

    def update(self):
        """Makes the last `divisor` call's candidate the EMA."""
        self.ema.assign(ops.convert_to_tensor(self.candidate))

    def result(self):
        return {}  # logs nothing: `model.evaluate` keeps returning the loss

    def reset_state(self):
        """Keeps the EMA: it is training state, not a per-epoch metric."""

    def save_own_variables(self, store):
        store["ema"] = self.ema

    def load_own_variables(self, store):
        self.ema.assign(store["ema"])

    def get_config(self):
        return {
            "momentum": self.momentum,
            "initial_value": self.initial_value,
            "name": self.name,
        }

    def __repr__(self):
        return (
            f"{type(self).__name__}(momentum={self.momentum}, "
            f"initial_value={self.initial_value})"
        )


def get(identifier):
    """A normalizer from an instance, a config dict or `None` (`GlobalCount`)."""
    if identifier is None:
        return GlobalCount()
    if isinstance(identifier, dict):
        identifier = keras.saving.deserialize_keras_object(identifier)
    if isinstance(identifier, Normalizer):
        return identifier
    raise ValueError(
        "Argument `normalizer` must be a `keras_batchfix.Normalizer` (for "
        "example `keras_batchfix.GlobalCount()`) or None; received "
        f"{identifier!r}."
    )
