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

`ReplicaSimulation` runs the replicas one after another on one device (for
`keras_batchfix.diagnose` and `diagnose_model`).

Tested with Keras 3.12.0 and 3.15.1 (TensorFlow 2.21, JAX 0.10, torch 2.13).
"""

import keras

from keras_batchfix import _keras_compat

COMPILED = "compiled"  # returned from a compiled loss reduced with "sum"
ADD_LOSS = "add_loss"  # passed to `Layer.add_loss`
ROUTES = (COMPILED, ADD_LOSS)


class ReplicaSimulation:
    """Runs data-parallel replicas one after another on one device.

    Inside `with simulation:` the package sees `num_replicas` replicas:
    `num_replicas()` returns it, Keras scales mean-reduced losses by
    `1 / num_replicas` as under `tf.distribute`, and every `global_sum` is
    answered by the simulation. `replica_losses(loss_of, parts)` evaluates
    each replica's loss in two passes:

    1. record: each replica runs on its part; the values it all-reduces
       (a global count, `CenterLoss`'s center statistics) are recorded and
       returned unchanged;
    2. replay: each replica runs again and its `k`-th all-reduce returns
       the sum over the replicas of their `k`-th recorded value, as a real
       all-reduce would.

    Every replica must make the same number of all-reduces, in the same
    order (a `ValueError` otherwise). The second pass is skipped when
    nothing was all-reduced.

    Example:

    ```python
    simulation = ReplicaSimulation(num_replicas=2)
    with simulation:
        losses = simulation.replica_losses(loss_of, [(y_true_0, y_pred_0), (y_true_1, y_pred_1)])
    simulation.all_reduces  # global_sum calls of one replica
    ```

    Not thread-safe; for the diagnostics, which run on one thread.
    """

    _active = []  # the simulations entered, innermost last

    def __init__(self, num_replicas: int, compile=None):
        """`compile(function)`: a compiled form of a function (default: itself).

        `keras_batchfix.kernels.jit` compiles the two passes with `jax.jit`
        on JAX: the recorded values are outputs of the first, the sums
        arguments of the second.
        """
        self.num_replicas = int(num_replicas)
        #: The `global_sum` calls each replica made in the last `replica_losses`.
        self.all_reduces = 0
        self._compile = compile or (lambda function: function)
        self._passes = {}  # loss_of -> (record, replay)
        self._recording = None  # a list while recording
        self._replaying = None  # an iterator of the sums while replaying
        self._scales = []

    def __enter__(self):
        scale = _keras_compat.keras_replica_scale(self.num_replicas)
        scale.__enter__()
        self._scales.append(scale)
        ReplicaSimulation._active.append(self)
        return self

    def __exit__(self, *exc_info):
        ReplicaSimulation._active.remove(self)
        self._scales.pop().__exit__(*exc_info)
        return False

    @classmethod
    def active(cls):
        """The innermost simulation entered, or None."""
        return cls._active[-1] if cls._active else None

    def global_sum(self, value):
        """What `global_sum(value)` returns inside this simulation."""
        from keras import ops

        if self._replaying is not None:
            total = next(self._replaying, None)
            if total is None:
                raise ValueError(
                    "A simulated replica made more all-reduces when replayed "
                    "than when recorded; the split cannot be simulated."
                )
            return keras.tree.map_structure(
                lambda t, v: ops.convert_to_tensor(t, dtype=v.dtype), total, value
            )
        if self._recording is not None:
            self._recording.append(value)
        return value

    def _passes_of(self, loss_of):
        """`(record, replay)`: `loss_of` recording, and replaying `totals`."""
        if loss_of not in self._passes:

            def record(*part):
                self._recording = []
                try:
                    return loss_of(*part), self._recording
                finally:
                    self._recording = None

            def replay(totals, *part):
                self._replaying = iter(totals)
                try:
                    return loss_of(*part)
                finally:
                    self._replaying = None

            self._passes[loss_of] = self._compile(record), self._compile(replay)
        return self._passes[loss_of]

    def replica_losses(self, loss_of, parts):
        """`[float(loss_of(*part)) for part in parts]`, all-reduces summed over the parts.

        Each part is one replica's arguments. Must run inside `with self:`.
        """
        from keras import ops

        def number(value):
            return float(ops.convert_to_numpy(value))

        if self.active() is not self:
            raise RuntimeError("`replica_losses` must run inside `with simulation:`.")
        record, replay = self._passes_of(loss_of)
        recorded, losses = [], []
        for part in parts:
            loss, calls = record(*part)
            losses.append(number(loss))
            recorded.append(
                [keras.tree.map_structure(ops.convert_to_numpy, call) for call in calls]
            )
        if len({len(calls) for calls in recorded}) != 1:
            raise ValueError(
                "The simulated replicas made different numbers of all-reduces "
                f"({[len(calls) for calls in recorded]}); the split cannot be "
                "simulated for this loss."
            )
        self.all_reduces = len(recorded[0])
        if not self.all_reduces:
            return losses
        totals = [
            keras.tree.map_structure(lambda *values: sum(values), *step)
            for step in zip(*recorded)
        ]
        return [number(replay(totals, *part)) for part in parts]


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
    simulation = ReplicaSimulation.active()
    if simulation is not None:
        return simulation.num_replicas
    dist = _torch_process_group()
    if dist is not None:
        return dist.get_world_size()
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.distribute.get_strategy().num_replicas_in_sync
    return 1


def in_replica_step():
    """Whether this code runs in one of 2+ `tf.distribute` replica threads."""
    return ReplicaSimulation.active() is None and _tf_replica_context() is not None


def global_sum(value):
    """Sum of `value` (a tensor or a list of tensors) over the replicas.

    No gradient flows through the sum. Outside data parallelism (and on JAX,
    whose program sees the global batch) it returns `value`.
    """
    from keras import ops

    simulation = ReplicaSimulation.active()
    dist = _torch_process_group()
    context = None if dist is not None else _tf_replica_context()
    if simulation is None and dist is None and context is None:
        return value  # one replica (Python numbers stay numbers)
    value = keras.tree.map_structure(
        lambda v: ops.convert_to_tensor(v, "float32") if isinstance(v, (int, float)) else v,
        value,
    )
    if simulation is not None:
        return simulation.global_sum(value)
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


class ReplicaThreadLosses(_keras_compat.ThreadOwnedLosses):
    """Layer mixin: each `MirroredStrategy` replica thread reads its own `add_loss`.

    `MirroredStrategy` runs the replicas of one step in threads that share a
    layer's `add_loss` list, switching threads at every all-reduce. A loss
    that all-reduces after the forward pass (`GlobalCount` in a compiled
    loss) lets replica 1 add its value before replica 0 reads the list, so
    replica 0 would log both. This keeps each thread to its own values
    while 2+ replicas run.
    """

    @staticmethod
    def _threads_share_losses():
        return in_replica_step()
