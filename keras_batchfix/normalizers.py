"""Normalizers: the divisor a count-normalized loss applies to its numerator.

A loss that "normalizes by a count" (matched boxes, valid tokens, samples) is
`numerator / divisor(count)`. A normalizer decides two things that Keras
would otherwise decide for you, and gets wrong for such losses:

* how the count becomes a divisor (`max(1, count)` here, so a batch with no
  positives gives a finite loss);
* whose count it is: the replica's own batch (`LocalCount`; the replicas'
  losses are then averaged) or the global batch of all replicas
  (`GlobalCount`, `EMACount`; the replicas' losses then add up to the
  one-device loss).

Normalizers compute no replica factor themselves: `keras_batchfix.replicas`
turns a numerator and a divisor into what each replica hands Keras.

A normalizer has `divisor(count)` and the attribute `is_global`. A stateful
one (`EMACount`) also has `update()`, which a model calls after each training
step's loss (see `keras_batchfix.Model`).
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


@keras.saving.register_keras_serializable(package="keras_batchfix")
class LocalCount:
    """Normalize by the count of the batch this replica sees.

        divisor = max(1, count)

    A negative count makes the divisor, and so the loss, NaN. With one device this is the plain "divide by the batch's count". Under
    data parallelism each replica divides by its own count and the replicas'
    losses are averaged, which equals one-device training whenever every
    replica sees the same count.

    Example:

    ```python
    loss = keras_batchfix.SSDMultiboxLoss(21, normalizer=LocalCount())
    ```
    """

    is_global = False

    def divisor(self, count):
        return _divisor(_float_count(count))

    def get_config(self):
        return {}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        return f"{type(self).__name__}()"


@keras.saving.register_keras_serializable(package="keras_batchfix")
class GlobalCount(LocalCount):
    """Normalize by the count of the whole global batch, all replicas together.

        divisor = max(1, sum over replicas of count)

    Each replica divides its own numerator by the global count, so the
    replicas' gradients combine into exactly those of one device seeing the
    global batch, however the batch splits (an uneven last batch included).
    This is what FCOS and mmdet do with an `all_reduce`.

    The sum runs over `tf.distribute` replicas (mirrored or multi-worker) and
    over a `torch.distributed` process group (DDP); under JAX's
    `keras.distribution.DataParallel` the loss already sees the global batch.

    Hard-negative mining stays per replica: `SSDMultiboxLoss(mining="batch")`
    ranks the negatives of the local batch only, so use
    `mining="per_image"` where results must not depend on the replica split.

    Example:

    ```python
    with strategy.scope():
        model = build_model()
        model.compile("sgd", keras_batchfix.SSDMultiboxLoss(
            21, mining="per_image", normalizer=GlobalCount()))
    ```
    """

    is_global = True

    def divisor(self, count):
        return _divisor(replicas.global_sum(_checked_count(count)))


@keras.saving.register_keras_serializable(package="keras_batchfix")
class EMACount(keras.metrics.Metric):
    """Normalize by an exponential moving average of the global count.

    detectron2's RetinaNet and FCOS normalizer, with the count made global as
    in `GlobalCount`. For a batch whose global count is `n`:

        candidate = momentum * ema + (1 - momentum) * max(1, n)
        divisor   = candidate
        ema      <- candidate          (in training steps only)

    Before the first training step `ema` is `initial_value`, or (default)
    the first batch's `max(1, n)`. Use it when the count varies a lot from
    step to step (tiny per-device batches, images with few objects): a batch
    with few positives is then not weighted far more per positive than one
    with many. With `momentum=0` it is `GlobalCount`.

    Its state is explicit: `divisor(count)` returns the candidate and keeps
    it in the variable `candidate`; `update()` makes it the new `ema`. A
    `keras_batchfix.Model` (or a model with `keras_batchfix.NormalizerUpdates`)
    calls `update()` after the loss of each training step, so the EMA moves in
    `fit`'s training steps only; `evaluate` and validation divide each batch
    by its candidate without keeping it. The model also tracks the
    normalizer's variables (on JAX they are part of the training state) and
    `model.save` saves them. In a plain `keras.Model` nothing calls
    `update()`, and the divisor stays the moving average of the initial value
    and each batch's count.

    It is a `keras.metrics.Metric` so that the model tracks its variables,
    but it logs nothing (`result()` is `{}`), and `reset_state()` (which
    Keras calls at every epoch) keeps the EMA. Create it, like the model,
    inside `strategy.scope()` under `tf.distribute`.

    Args:
        momentum: weight of the previous EMA, in `[0, 1)`. Default 0.9
            (detectron2's).
        initial_value: EMA before the first training step, a float > 0, or
            None (default) to start at the first training batch's
            `max(1, global count)`. detectron2 uses 100; a value far from
            your typical count scales the loss of the first steps (about
            `1 / (1 - momentum)` of them) by roughly their ratio.
        name: name of the normalizer (and of its variables' scope).

    Example:

    ```python
    normalizer = keras_batchfix.EMACount(momentum=0.9)
    model = keras_batchfix.Model(inputs, outputs)
    model.compile("sgd", keras_batchfix.SSDMultiboxLoss(
        21, mining="per_image", normalizer=normalizer))
    model.fit(x, y, batch_size=2)
    keras.ops.convert_to_numpy(normalizer.ema)  # the current EMA
    ```
    """

    is_global = True

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
        super().__init__(name=name, dtype="float32")
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

    def update_state(self, *args, **kwargs):
        raise NotImplementedError(
            "EMACount is a normalizer, not a metric to update with values: "
            "its divisor(count) and update() move it."
        )

    def result(self):
        return {}

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
    """Returns a normalizer from an instance, a config dict or `None` (local)."""
    if identifier is None:
        return LocalCount()
    if isinstance(identifier, dict):
        identifier = keras.saving.deserialize_keras_object(identifier)
    if callable(getattr(identifier, "divisor", None)) and hasattr(
        identifier, "is_global"
    ):
        return identifier
    raise ValueError(
        "Argument `normalizer` must be a normalizer (for example "
        "`keras_batchfix.GlobalCount()`: an object with `divisor(count)` and "
        f"`is_global`) or None; received {identifier!r}."
    )


def stateful(normalizer):
    """Whether `normalizer` keeps state that a training step must `update()`."""
    return callable(getattr(normalizer, "update", None)) and isinstance(
        normalizer, keras.metrics.Metric
    )
