"""Normalizers: the divisor a self-normalizing loss applies to its numerator.

A loss that "normalizes by a count" (matched boxes, valid tokens, ...) is
`numerator / normalizer(count)`. The normalizer decides two things that Keras
otherwise decides for you, and gets wrong for such losses:

* how the count becomes a divisor (`max(1, count)` here, so a batch with no
  positives gives a finite loss);
* how replicas combine. Keras sums gradients across `tf.distribute` replicas,
  so a per-replica loss must carry the factor `1 / num_replicas` for the sum to
  be a mean of replica losses. Keras adds that factor itself only to losses it
  reduces with a mean; the losses of this package are returned already
  reduced, so their normalizer adds it.
"""

import inspect
import threading

import keras
from keras import ops

from keras_batchfix.distribute import all_reduce_sum, replicas_in_sync


@keras.saving.register_keras_serializable(package="keras_batchfix")
class LocalCount:
    """Normalize by the count of the batch this replica sees.

    divisor = max(1, count) * num_replicas

    With one device this is the plain "divide by the batch's count". Under
    `tf.distribute` each replica divides by its own count, and the replicas'
    losses are averaged (the `num_replicas` factor, because Keras sums
    replica gradients), which equals single-device training whenever every
    replica sees the same count.

    Example:

    ```python
    loss = keras_batchfix.SSDMultiboxLoss(21, normalizer=LocalCount())
    ```
    """

    def __call__(self, count):
        count = ops.cast(count, "float32")
        return ops.maximum(count, 1.0) * float(replicas_in_sync())

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

    divisor = max(1, sum over replicas of count) / gradient_averaging

    Each replica divides its own numerator by the global count, so the
    replicas' summed gradients are exactly those of one device seeing the
    global batch, however the batch splits (an uneven last batch included).
    This is what FCOS and mmdet do (with `all_reduce`); without it, the loss
    changes with the number of devices.

    * TensorFlow (`tf.distribute`, mirrored or multi-worker): the count is
      all-reduced with `SUM` across replicas; gradients are summed by Keras.
    * JAX (`keras.distribution.DataParallel`): the loss already sees the
      global batch, nothing to reduce.
    * torch with `torch.distributed` initialized (DDP): the count is
      all-reduced, and the divisor is divided by the world size because DDP
      averages gradients.

    Hard-negative mining stays per replica: `SSDMultiboxLoss(mining="batch")`
    ranks the negatives of the local batch only, so use
    `mining="per_image"` where results must not depend on the replica split.
    """

    def __call__(self, count):
        count = ops.stop_gradient(ops.cast(count, "float32"))
        total, gradient_averaging = _global_sum(count)
        return ops.maximum(total, 1.0) / gradient_averaging


@keras.saving.register_keras_serializable(package="keras_batchfix")
class EMACount(keras.metrics.Metric):
    """Normalize by an exponential moving average of the global count.

    In each training step (detectron2's RetinaNet and FCOS normalizer, with
    the count made global as in `GlobalCount`):

        ema <- momentum * ema + (1 - momentum) * max(1, global count)
        divisor = ema / gradient_averaging

    `global count` and `gradient_averaging` are those of `GlobalCount`. The
    loss of a step is divided by the EMA after its update. Use it when the
    count has a large variance from step to step (tiny per-device batches,
    images with few objects): a batch with few positives is then not
    weighted far more per positive than one with many. With `momentum=0` it
    is `GlobalCount`.

    The EMA moves only in `fit`'s training steps; `evaluate`, validation and
    a `compute_loss(..., training=False)` divide by the current EMA without
    changing it (before the first training step: by the batch's
    `max(1, global count)`).

    Its state is the variable `ema`, owned by the model once you call
    `keras_batchfix.attach_normalizers(model)` after `model.compile` (and
    after `keras.saving.load_model`): the model then carries it through
    `fit` on every backend (on JAX, as part of the training state) and saves
    it with `model.save` and `model.save_weights`. Without that call the
    loss raises a `RuntimeError`, also when called outside `fit`.

    It is a `keras.metrics.Metric` so that the model tracks its variable,
    but it logs nothing (`result()` is `{}`), and `reset_state()` (which
    Keras calls at every epoch) keeps the EMA.

    Under `tf.distribute` create it, like the model, inside
    `strategy.scope()`: every replica then holds the same EMA.

    Args:
        momentum: weight of the previous EMA, in `[0, 1)`. Default 0.9
            (detectron2's).
        initial_value: EMA before the first training step, a float > 0, or
            None (default) to start at the first training batch's
            `max(1, global count)`, which needs no tuning. detectron2 uses
            100; a value far from your typical count scales the loss of the
            first steps (about `1 / (1 - momentum)` of them) by roughly their
            ratio.
        name: name of the normalizer (and of its variable's scope).

    Example:

    ```python
    loss = keras_batchfix.SSDMultiboxLoss(21, normalizer=EMACount(momentum=0.9))
    model.compile(optimizer="sgd", loss=loss)
    keras_batchfix.attach_normalizers(model)
    model.fit(x, y, batch_size=2)
    keras.ops.convert_to_numpy(loss.normalizer.ema)  # the current EMA
    ```
    """

    def __init__(self, momentum=0.9, initial_value=None, name="ema_count"):
        if not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
            raise ValueError(
                "Argument `momentum` must be a float in [0, 1); received "
                f"momentum={momentum!r}."
            )
        if initial_value is not None and (
            not isinstance(initial_value, (int, float)) or not initial_value > 0
        ):
            raise ValueError(
                "Argument `initial_value` must be a float > 0 or None; "
                f"received initial_value={initial_value!r}."
            )
        super().__init__(name=name, dtype="float32")
        self.momentum = float(momentum)
        self.initial_value = None if initial_value is None else float(initial_value)
        # 0 marks "no training step yet" (an EMA of max(1, count) is >= 1).
        # Every replica computes the same EMA from the global count.
        self.ema = self.add_variable(
            shape=(),
            initializer=keras.initializers.Constant(self.initial_value or 0.0),
            aggregation="only_first_replica",
            name="ema",
        )

    def __call__(self, count):
        training = _training_flag(self)
        count = ops.stop_gradient(ops.cast(count, "float32"))
        total, gradient_averaging = _global_sum(count)
        total = ops.maximum(total, 1.0)
        ema = self.ema.value
        previous = ops.where(ema > 0.0, ema, total)
        if not training:
            return previous / gradient_averaging
        ema = self.momentum * previous + (1.0 - self.momentum) * total
        self.ema.assign(ema)
        return ema / gradient_averaging

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


def _global_sum(value):
    """`(sum of value over replicas, factor the framework divides grads by)`."""
    if keras.backend.backend() == "torch":
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            total = value.detach().clone()
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
            return total, float(dist.get_world_size())
    return all_reduce_sum(value), 1.0


def get(identifier):
    """Returns a normalizer from an instance, a config dict or `None` (local)."""
    if identifier is None:
        return LocalCount()
    if isinstance(identifier, dict):
        return keras.saving.deserialize_keras_object(identifier)
    if callable(identifier):
        return identifier
    raise ValueError(
        "Argument `normalizer` must be a normalizer instance (for example "
        f"`keras_batchfix.LocalCount()`) or None; received {identifier!r}."
    )


# Set while an attached model computes its loss; see `attach_normalizers`.
_loss_scope = threading.local()


def attach_normalizers(model):
    """Makes `model` own and drive the `EMACount` normalizers of its loss.

    Call it after `model.compile(...)` (again after every `compile`) and after
    `keras.saving.load_model`. It

    * adds each `EMACount` found as `normalizer` of `model.loss` (a loss or
      a list or dict of them) to the model's metrics, so that the EMA is part
      of the model's state on every backend: JAX's stateless `fit` otherwise
      drops its updates, and reads it as a constant;
    * wraps `model.compute_loss` to tell the normalizers the `training`
      argument Keras passes it: `True` in `fit`'s training steps, `False` in
      `evaluate` and validation. This works eagerly and under `tf.function`,
      XLA, `jax.jit` and `torch`.

    The EMA is saved with the loss (`model.save`, `model.save_weights`)
    whether or not the model is attached.

    Args:
        model: a compiled `keras.Model` whose `compute_loss` takes the
            `training` argument (Keras's does).

    Returns:
        The model.
    """
    if not getattr(model, "compiled", False):
        raise ValueError(
            "Argument `model` must be compiled: call `model.compile(loss=...)` "
            "before `attach_normalizers(model)`."
        )
    ema_counts = [
        loss.normalizer
        for loss in keras.tree.flatten(model.loss)
        if isinstance(getattr(loss, "normalizer", None), EMACount)
    ]
    if not ema_counts:
        raise ValueError(
            "Argument `model` has no `EMACount` normalizer in its loss "
            f"(model.loss={model.loss!r}); nothing to attach."
        )
    compute_loss = model.compute_loss
    if not getattr(compute_loss, "attaches_normalizers", False):
        if "training" not in inspect.signature(compute_loss).parameters:
            raise ValueError(
                "Argument `model` overrides `compute_loss` without the "
                "`training` argument, so an EMACount cannot tell training "
                "from evaluation; add `training=True` to its signature."
            )

        def compute_loss_telling_normalizers(
            x=None, y=None, y_pred=None, sample_weight=None, training=True
        ):
            previous = getattr(_loss_scope, "state", None)
            _loss_scope.state = (model._ema_counts, training)
            try:
                return compute_loss(
                    x, y, y_pred, sample_weight=sample_weight, training=training
                )
            finally:
                _loss_scope.state = previous

        compute_loss_telling_normalizers.attaches_normalizers = True
        model.compute_loss = compute_loss_telling_normalizers
    # A built subclassed model locks its state; unlock it as Keras does when
    # it untracks a variable (`Layer._untrack_variable`).
    tracker = model._tracker
    locked = tracker.locked
    tracker.unlock()
    try:
        for previous in getattr(model, "_ema_counts", ()):
            tracker.untrack(previous)
        model._ema_counts = ema_counts
    finally:
        if locked:
            tracker.lock()
    return model


def _training_flag(normalizer):
    """The `training` flag of the attached model computing `normalizer`'s loss."""
    state = getattr(_loss_scope, "state", None)
    if state is None or not any(normalizer is n for n in state[0]):
        raise RuntimeError(
            f"{normalizer!r} is not attached to the model computing the loss: "
            "call `keras_batchfix.attach_normalizers(model)` after "
            "`model.compile(...)` and after `keras.saving.load_model(...)`. "
            "(It keeps its state in the model, and updates only in `fit`'s "
            "training steps, which only the model can tell it.)"
        )
    return state[1]
