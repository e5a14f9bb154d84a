"""Replicas under `tf.distribute`: how many there are, and sums across them.

Only the TensorFlow backend runs one loss per replica and sums the replicas'
gradients; JAX's `keras.distribution.DataParallel` runs one program over the
global batch, so there these helpers see one replica and change nothing.
"""

import contextlib

import keras

# Set by `simulated_replicas` (used by `keras_batchfix.diagnose`).
_simulation = None


@contextlib.contextmanager
def simulated_replicas(num_replicas, all_reduce_sum=None):
    """Runs this package's losses as if on one of `num_replicas` replicas.

    Inside the context `replicas_in_sync()` returns `num_replicas` and
    `all_reduce_sum(value)` returns `all_reduce_sum(value)` of the argument
    (default: `value` itself), so a caller can evaluate the replicas one after
    the other on one device. Not thread-safe; for diagnostics.
    """
    global _simulation
    previous = _simulation
    _simulation = (int(num_replicas), all_reduce_sum or (lambda value: value))
    try:
        yield
    finally:
        _simulation = previous


def replica_context():
    """The `tf.distribute` replica context if 2+ replicas run, else None.

    None also in a cross-replica context (e.g. while Keras traces a model).
    """
    if keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return None
    return context


def replicas_in_sync():
    """Number of replicas whose gradients Keras sums (1 outside `tf.distribute`)."""
    if _simulation is not None:
        return _simulation[0]
    if keras.backend.backend() != "tensorflow":
        return 1
    import tensorflow as tf

    return tf.distribute.get_strategy().num_replicas_in_sync


def all_reduce_sum(value):
    """Sum of `value` (a tensor or a list of tensors) over the replicas."""
    if _simulation is not None:
        return _simulation[1](value)
    context = replica_context()
    if context is None:
        return value
    return context.all_reduce("SUM", value)
