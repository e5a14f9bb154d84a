"""Every private Keras name the package uses, in one place.

Each has no public equivalent in the Keras versions tested: 3.12.0 and 3.15.1
(the oldest and newest of the supported range; CI runs the core tests on
both). If a Keras release moves one, this module is the one to change.
"""

import contextlib

from keras.src.backend import get_keras_mask  # noqa: F401  the mask Keras's Loss reads
from keras.src.losses import loss as _loss_module
from keras.src.losses.loss import apply_mask  # noqa: F401  mask into sample weights
from keras.src.losses.loss import reduce_weighted_values  # noqa: F401  Loss.__call__'s
from keras.src.trainers import compile_utils as _compile_utils


def set_keras_mask(x, mask):
    """Gives `x` the Keras mask `mask` (diagnose_model moves masked predictions)."""
    try:
        from keras.src.backend import set_keras_mask as set_mask
    except ImportError:  # the attribute Keras's masking reads
        x._keras_mask = mask
    else:
        set_mask(x, mask)


def flat_compiled_losses(model, y_true, y_pred):
    """`[(path, loss, loss_weight)]` of `model.compile(loss=...)`, resolved.

    The losses Keras's `CompileLoss` made of the compiled loss (strings and
    functions wrapped, one per output), with the path of their output.
    """
    compiled = model._compile_loss
    if compiled is None:
        return []
    if not compiled.built:
        compiled.build(y_true, y_pred)
    return [(f.path, f.loss, f.loss_weights) for f in compiled._flat_losses]


def loss_tracker(model):
    """The `Mean` metric behind the `loss` that `fit` logs."""
    return model._loss_tracker


def compile_loss(loss, y_true, y_pred):
    """`(CompileLoss built on the arrays, the loss it resolved)`.

    How `model.compile(loss=...)` wraps a loss: strings and functions resolved,
    `LossFunctionWrapper` around functions, the reduction applied.
    """
    compiled = _compile_utils.CompileLoss(loss)
    compiled.build(y_true, y_pred)
    return compiled, compiled._flat_losses[0].loss


@contextlib.contextmanager
def keras_replica_scale(num_replicas):
    """Makes Keras's losses scale as on `num_replicas` `tf.distribute` replicas.

    Keras multiplies mean-reduced losses by `1 / num_replicas` through
    `keras.src.losses.loss.scale_loss_for_distribution`; for
    `keras_batchfix.replicas.ReplicaSimulation`, which evaluates the
    replicas one after another on one device.
    """
    def scale(value):
        from keras import ops

        return ops.multiply(value, ops.cast(1.0 / num_replicas, value.dtype))

    original = _loss_module.scale_loss_for_distribution
    _loss_module.scale_loss_for_distribution = scale
    try:
        yield
    finally:
        _loss_module.scale_loss_for_distribution = original


class ThreadOwnedLosses:
    """Layer mixin: each thread reads only the `add_loss` values it added.

    `MirroredStrategy` runs the replicas of one step in threads that share a
    layer's `add_loss` list. While the subclass's `_threads_share_losses()`
    returns True, each value is tagged with the thread that added it, and
    Keras's read of the list (the private `Layer._get_own_losses`, the only
    place to filter it) keeps the calling thread's values.
    `keras_batchfix.replicas.ReplicaThreadLosses` says when.
    """

    @staticmethod
    def _threads_share_losses():
        return False

    def add_loss(self, loss):
        import threading

        if self._threads_share_losses():  # a traced step: a few entries per trace
            owners = self.__dict__.setdefault("_loss_owner_threads", {})
            for value in loss if isinstance(loss, (list, tuple)) else [loss]:
                owners[id(value)] = threading.get_ident()
        super().add_loss(loss)

    def _get_own_losses(self):
        import threading

        losses = super()._get_own_losses()
        if not self._threads_share_losses():
            return losses
        owners = self.__dict__.get("_loss_owner_threads", {})
        thread = threading.get_ident()
        return [loss for loss in losses if owners.get(id(loss), thread) == thread]


# --- SpikeMonitor ---------------------------------------------------------------
# `print_msg` writes a message to stdout, or to absl logging once interactive
# logging is off (`keras.config.disable_interactive_logging()`), as Keras's own
# callbacks do. It lives in `keras.src.utils.io_utils` (Keras 3.12.0 and
# 3.15.1; the SpikeMonitor tests ran on 3.15.1) and `keras.utils` has no alias.
from keras.src.utils.io_utils import print_msg  # noqa: E402,F401
