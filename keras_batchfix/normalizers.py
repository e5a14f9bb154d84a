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


def replicas_in_sync():
    """Number of replicas that sum their gradients (1 outside `tf.distribute`).

    Only the TensorFlow backend distributes by running one loss per replica;
    JAX's `keras.distribution.DataParallel` runs one program on the global batch.
    """
    if keras.backend.backend() != "tensorflow":
        return 1
    import tensorflow as tf

    return tf.distribute.get_strategy().num_replicas_in_sync


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

    >>> LocalCount()(keras.ops.convert_to_tensor(0.0))  # no positives
    1.0
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
