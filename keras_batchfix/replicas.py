"""Replicas: how many train together, sums across them, and what Keras does to a loss.

The one module of the package that knows how data-parallel training combines
the replicas' losses. Every replica factor of the package comes from here.

A loss that is exact under data parallelism is a share of one global loss:

    L = (sum over replicas r of numerator_r) / divisor

Replica `r` computes `numerator_r / divisor` (its *share*; the shares add up
to `L`) and hands Keras `share * keras_factor(route)`, where the factor undoes
what happens to the value afterwards:

* how gradients combine: `tf.distribute` *sums* the replicas' gradients;
  torch DDP *averages* them (a factor `world_size` to undo); JAX's
  `keras.distribution.DataParallel` runs one program on the global batch (one
  replica, nothing to undo);
* what Keras multiplies the value by before differentiating it: `1` for a
  compiled loss reduced with `"sum"`; `1 / num_replicas` for `add_loss`
  values on the TensorFlow backend (Keras's
  `scale_loss_for_distribution`), `1` on the others.

A normalizer whose divisor is computed from the replica's own batch (a local
count) gives the mean of the replicas' losses: its share is
`numerator_r / (divisor_r * num_replicas)`.

Tested with Keras 3.12.0 and 3.15.1 (TensorFlow 2.21, JAX 0.10, torch 2.13).
"""

from __future__ import annotations

import contextlib

import keras

COMPILED = "compiled"  # returned from a compiled loss reduced with "sum"
ADD_LOSS = "add_loss"  # passed to `Layer.add_loss`
ROUTES = (COMPILED, ADD_LOSS)

# Set by `simulated_replicas` (used by `keras_batchfix.diagnose`).
_simulation = None


@contextlib.contextmanager
def simulated_replicas(num_replicas, global_sum=None):
    """Evaluates losses as one of `num_replicas` `tf.distribute` replicas.

    Inside the context `num_replicas()` returns `num_replicas`,
    `global_sum(value)` returns `global_sum(value)` of the argument (default:
    `value` itself), and Keras scales mean-reduced losses by
    `1 / num_replicas` as `tf.distribute` makes it, so a caller can evaluate
    the replicas one after the other on one device. Not thread-safe; for
    diagnostics.
    """
    from keras_batchfix._keras_compat import keras_replica_scale

    global _simulation
    previous = _simulation
    _simulation = (int(num_replicas), global_sum or (lambda value: value))
    try:
        with keras_replica_scale(num_replicas):
            yield
    finally:
        _simulation = previous


def _torch_process_group():
    """`torch.distributed` if a process group is initialized, else None."""
    if keras.backend.backend() != "torch":
        return None
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist
    return None


def _tf_replica_context():
    """The `tf.distribute` replica context when 2+ replicas run, else None.

    None also in a cross-replica context (while Keras builds a model).
    """
    if keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return None
    return context


def num_replicas():
    """Number of replicas whose gradients combine into one step.

    `tf.distribute`'s `num_replicas_in_sync`, torch's world size when a
    process group is initialized, 1 otherwise (JAX included).
    """
    if _simulation is not None:
        return _simulation[0]
    dist = _torch_process_group()
    if dist is not None:
        return dist.get_world_size()
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.distribute.get_strategy().num_replicas_in_sync
    return 1


def in_replica_step():
    """Whether this code runs in one of 2+ `tf.distribute` replica threads."""
    return _simulation is None and _tf_replica_context() is not None


def global_sum(value):
    """Sum of `value` (a tensor or a list of tensors) over the replicas.

    No gradient flows through the sum. Outside data parallelism (and on JAX,
    whose program sees the global batch) it returns `value`.
    """
    from keras import ops

    dist = _torch_process_group()
    context = None if dist is not None else _tf_replica_context()
    if _simulation is None and dist is None and context is None:
        return value  # one replica (Python numbers stay numbers)
    value = keras.tree.map_structure(
        lambda v: ops.convert_to_tensor(v, "float32") if isinstance(v, (int, float)) else v,
        value,
    )
    if _simulation is not None:
        return _simulation[1](value)
    if dist is not None:
        values = value if isinstance(value, (list, tuple)) else [value]
        totals = []
        for v in values:
            total = v.detach().clone()
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
            totals.append(total)
        return totals if isinstance(value, (list, tuple)) else totals[0]
    value = keras.tree.map_structure(ops.stop_gradient, value)
    return context.all_reduce("SUM", value)


def check_equal_over_processes(value, what):
    """Raises on every torch process unless all hold the same integer `value`.

    One collective (a max of `value` and `-value`); nothing outside a torch
    process group. `what` names the value in the error.
    """
    dist = _torch_process_group()
    if dist is None:
        return
    import torch

    both = torch.tensor([value, -value], dtype=torch.int64)
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    high, low = int(both[0]), -int(both[1])
    if high != low:
        raise ValueError(
            f"The processes disagree on {what}: from {low} to {high} (this "
            f"process: {value}). Each process must run the same number of "
            "gradient all-reduces in a step."
        )


def keras_factor(route):
    """What a replica's share is multiplied by before it is handed to Keras.

    `route` is `"compiled"` (a compiled loss reduced with `"sum"`) or
    `"add_loss"`. The product of this factor, Keras's own scaling of the
    route, and the framework's combination of gradients is 1, so the shares'
    gradients add up to the global loss's gradient.
    """
    if route not in ROUTES:
        raise ValueError(
            f"Argument `route` must be one of {ROUTES}; received {route!r}."
        )
    if _torch_process_group() is not None:
        return float(num_replicas())  # DDP averages gradients
    if route == ADD_LOSS and keras.backend.backend() == "tensorflow":
        return float(num_replicas())  # TF scales add_loss by 1 / replicas
    return 1.0


def mean_of_replicas():
    """Factor that turns a replica's own loss into its share of their mean."""
    return 1.0 / float(num_replicas())


def to_keras(numerator, divisor, divisor_is_global, route):
    """What a replica hands Keras for its part of `sum(numerator) / divisor`.

        numerator * keras_factor(route) / divisor                (global divisor)
        numerator * keras_factor(route) / (divisor * replicas)   (local divisor)

    With a global divisor the replicas' shares add up to the global loss;
    with a local one (the replica's own count) their mean is the loss.
    `numerator` may be unreduced (any shape): the result has its shape.
    """
    from keras import ops

    factor = keras_factor(route)
    if not divisor_is_global:
        factor = factor * mean_of_replicas()
    if not isinstance(divisor, float):  # a Python float where the count was one
        divisor = ops.cast(divisor, numerator.dtype)
    if factor != 1.0:  # a Python float: one op less on every step otherwise
        numerator = numerator * ops.cast(factor, numerator.dtype)
    return numerator / divisor


def average_gradients_over_processes(model: keras.Model) -> list:
    """Makes Keras's torch `fit` average each gradient over the process group.

    Keras 3's torch trainer has no DDP support: `fit` calls the Keras model
    itself, so a `torch.nn.parallel.DistributedDataParallel` wrapper around
    it would never run. This registers a hook on every trainable weight of
    `model` that replaces the weight's gradient by its mean over the
    `torch.distributed` process group, as DDP does:

        grad <- (sum over processes p of grad_p) / world_size

    so each process applies the same update and the weights stay equal
    (`keras_factor` counts on this average). Call it once, after the model
    is built and before `fit`; every process must train the same model on
    its shard of each global batch.

    Example:

    ```python
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    model = build_model()
    keras_batchfix.replicas.average_gradients_over_processes(model)
    model.fit(x_shard, y_shard, batch_size=global_batch // 2, shuffle=False)
    ```

    Returns the hooks' handles (`handle.remove()` undoes one).
    """
    dist = _torch_process_group()
    if dist is None:
        raise ValueError(
            "average_gradients_over_processes needs the torch backend and an "
            "initialized `torch.distributed` process group; received backend "
            f"{keras.backend.backend()!r} without one."
        )
    world_size = dist.get_world_size()

    def average(gradient):
        total = gradient.detach().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total / world_size

    return [
        weight.value.register_hook(average) for weight in model.trainable_weights
    ]
