"""`keras_batchfix.Model`: a Keras model whose training step knows the package's losses.

It does two things a plain `keras.Model` cannot: it steps the stateful
normalizers once per training step, and with `compile(..., micro_batches=k)`
it runs each batch as one update in `k` slices (exact gradient
accumulation, `keras_batchfix.training.accumulation`).

A normalizer with state (`EMACount`) moves once per training step, after the
step's loss. Keras tells a model whether it is training through the public
`Model.compute_loss(..., training=...)`, so the model, not the loss, drives
it: `NormalizerUpdates` overrides `compute_loss` to call each stateful
normalizer's `update()` after the loss of a training step, and lists the
normalizers in `model.metrics`, so that their variables are part of the
model's state on every backend (JAX's stateless `fit` included).

It finds the normalizers of the compiled losses (`model.loss`, a loss or a
nest of losses), those of the model's layers (`CenterLoss(normalizer=...)`),
and the model's own `normalizer` attribute (a `compute_loss` override that
uses `keras_batchfix.count_weight`).
"""

from __future__ import annotations

import keras

from keras_batchfix.training import accumulation, loss_terms


class NormalizerUpdates:
    """Mixin that makes a `keras.Model` step normalizers and run micro-batches.

    After the loss of each training step it calls `update()` on every
    stateful normalizer of the compiled losses and the layers (`EMACount`),
    and tracks their variables. `compile(..., micro_batches=k)` runs every
    batch of `fit` as one update computed in `k` slices, exact for every
    count-normalized loss (`keras_batchfix.training.accumulation`).

    Put it before the model class: `class Detector(NormalizerUpdates,
    keras.Model)`, or `class Fixed(NormalizerUpdates, SomeKerasHubModel)`.
    An override of `compute_loss` in the model class still runs (the mixin
    calls it first); it must take the `training` argument, as Keras's does.

    Example:

    ```python
    class Detector(keras_batchfix.NormalizerUpdates, keras.Model):
        ...

    model = Detector()
    model.compile("sgd", keras_batchfix.SSDMultiboxLoss(
        21, normalizer=keras_batchfix.EMACount()))
    model.fit(x, y)
    ```
    """

    micro_batches = None

    def compile(self, *args, micro_batches: int | None = None, **kwargs) -> None:
        micro_batches = accumulation.check_micro_batches(micro_batches)
        owner = _override(type(self), "compute_loss")
        if micro_batches and owner is not None:
            raise ValueError(
                "Argument `micro_batches` runs the compiled loss (and `CenterLoss`) "
                f"on each slice, but {owner.__name__} overrides `compute_loss`, "
                "which the slices would skip. Compile its losses instead, or "
                "train without `micro_batches`."
            )
        layers = loss_terms.center_loss_layers(self)
        for layer in layers if micro_batches else ():
            if layer.centers_trainable:
                raise ValueError(
                    "Argument `micro_batches` needs the center step of "
                    f"`CenterLoss` layer {layer.name!r}; it has "
                    "centers_trainable=True (the optimizer would average "
                    "per-slice steps). Use centers_trainable=False."
                )
        super().compile(*args, **kwargs)
        self.micro_batches = micro_batches
        for layer in layers:
            layer.micro_batches = micro_batches

    def get_compile_config(self):
        config = super().get_compile_config()
        if config and self.micro_batches:
            config["micro_batches"] = self.micro_batches
        return config

    def compile_from_config(self, config):
        if _override(type(self), "compile") is not None:
            # A compile of the model's own (keras-hub's tasks) may not take
            # its saved config: Keras's rule, compile by hand after loading.
            return super().compile_from_config(config)
        self.compile(**keras.saving.deserialize_keras_object(config))
        if self.built and getattr(self, "optimizer", None) is not None:
            self.optimizer.build(self.trainable_variables)  # its variables

    def train_step(self, *args):
        if self.micro_batches:
            return accumulation.train_step(self, *args)
        self._normalizers_updated = False  # set by compute_loss (a trace-time check)
        logs = super().train_step(*args)
        if self.stateful_normalizers and not self._normalizers_updated:
            raise ValueError(
                f"{_compute_loss_owner(type(self)).__name__}.compute_loss does "
                "not call `super().compute_loss(..., training=training)`, so "
                "the stateful normalizers "
                f"{self.stateful_normalizers} never move. Call it, or step "
                "them yourself with `normalizer.update()` after the loss."
            )
        return logs

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        loss = super().compute_loss(
            x=x, y=y, y_pred=y_pred, sample_weight=sample_weight,
            training=training,
        )
        if training:
            for normalizer in self.stateful_normalizers:
                normalizer.update()
            self._normalizers_updated = True
        return loss

    @property
    def stateful_normalizers(self):
        """The normalizers with state of the compiled losses and the layers."""
        found = []
        losses = keras.tree.flatten(getattr(self, "loss", None) or [])
        candidates = [getattr(self, "normalizer", None)]  # a model's own
        candidates += [getattr(loss, "normalizer", None) for loss in losses]
        candidates += [
            getattr(layer, "normalizer", None)
            for layer in loss_terms.all_layers(self)
        ]
        for normalizer in candidates:
            if getattr(normalizer, "stateful", False) and not any(
                normalizer is other for other in found
            ):
                found.append(normalizer)
        return found

    @property
    def metrics(self):
        metrics = list(super().metrics)
        for normalizer in self.stateful_normalizers:
            if not any(normalizer is metric for metric in metrics):
                metrics.append(normalizer)
        return metrics


def _override(cls, method):
    """The first class above Keras's (not the mixin) that defines `method`.

    Keras's own classes end the search: below them come the backend's (on
    torch, `torch.nn.Module`, which has a `compile` of its own).
    """
    for klass in cls.__mro__:
        if klass.__module__.startswith("keras."):
            return None
        if klass is not NormalizerUpdates and method in vars(klass):
            return klass
    return None


def _compute_loss_owner(cls):
    """The class before the mixin whose `compute_loss` hides the mixin's, or None."""
    for klass in cls.__mro__:
        if klass is NormalizerUpdates:
            return None
        if "compute_loss" in vars(klass):
            return klass
    return None


@keras.saving.register_keras_serializable(package="keras_batchfix")
class Model(NormalizerUpdates, keras.Model):
    """A `keras.Model` that steps stateful normalizers and runs `micro_batches`.

    A drop-in for functional models: `keras.Model` with `NormalizerUpdates`.

    Example:

    ```python
    inputs = keras.Input((8732, 32))
    model = keras_batchfix.Model(inputs, keras.layers.Dense(25)(inputs))
    model.compile("sgd", keras_batchfix.SSDMultiboxLoss(
        21, from_logits=True, normalizer=keras_batchfix.EMACount()))
    ```
    """
