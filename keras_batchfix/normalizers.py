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
