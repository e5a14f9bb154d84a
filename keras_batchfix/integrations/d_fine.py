"""keras-hub's `DFineObjectDetector` with its losses divided by the global object count.

keras-hub 0.32's D-FINE divides every varifocal, box, fine-grained
localization and auxiliary loss by `num_boxes`, the number of label slots of
the batch one replica sees: padding slots included and never summed over
the replicas, so on 2 replicas the loss handed to Keras is about twice one
device's. On a batch of several images it also scores every image against
indices into the first image's targets. This subclass runs keras-hub's loss
image by image and divides the sum by the real objects of all replicas (at
least 1), as DETR and its successors do: for given predictions, the
replicas' losses add up to one device's loss on the global batch.
keras-hub's forward pass itself mixes the images of a batch, so training
under replicas still differs from one device's; see docs/keras_hub.md.

Needs keras-hub (tested with 0.32.0):

```python
from keras_batchfix.integrations.d_fine import DFineObjectDetector

with strategy.scope():
    model = DFineObjectDetector(backbone=backbone, num_classes=80)
    model.compile(optimizer=keras.optimizers.AdamW(1e-4))
model.fit(images, {"boxes": boxes, "labels": labels}, batch_size=8)
```
"""

import keras
import keras_hub
from keras import ops

import keras_batchfix
from keras_batchfix import normalizers, replicas

_KerasHubDFine = keras_hub.models.DFineObjectDetector
_DDF = "loss_ddf"


class _NormalizedDFineLoss(_KerasHubDFine):
    """The detector's loss image by image, its object count from a normalizer."""

    def _image_losses(self, x, y, y_pred, sample_weight, kwargs):
        """keras-hub's loss of one image: (counted losses, distillation loss)."""
        weights = self.weight_dict
        # keras-hub divides all but the decoupled distillation (DDF) loss by
        # the image's label slots: take them with the DDF weight zeroed.
        try:
            self.weight_dict = {**weights, _DDF: 0.0}
            counted = super().compute_loss(x, y, y_pred, sample_weight, **kwargs)
            ddf = ops.zeros((), counted.dtype)
            if weights[_DDF] != 0.0 and self.backbone.num_decoder_layers > 1:
                self.weight_dict = {**dict.fromkeys(weights, 0.0), _DDF: weights[_DDF]}
                ddf = super().compute_loss(x, y, y_pred, sample_weight, **kwargs)
        finally:
            self.weight_dict = weights
        return counted, ddf

    def compute_loss(self, x, y, y_pred, sample_weight, **kwargs):
        labels = ops.convert_to_tensor(y["labels"])
        slots = ops.maximum(ops.cast(ops.shape(labels)[1], "float32"), 1.0)

        def one_image(item):
            x_i, y_i, y_pred_i = keras.tree.map_structure(
                lambda t: ops.expand_dims(t, 0), item
            )
            return self._image_losses(x_i, y_i, y_pred_i, None, kwargs)

        # keras-hub's loss of a batch gathers every image's targets by indices
        # into the first image's: image by image, each image is its own.
        counted, ddf = ops.map(one_image, (x, y, y_pred))
        objects = ops.sum(ops.cast(labels >= 0, "float32"))
        images = ops.cast(ops.shape(labels)[0], "float32")
        loss = ops.sum(counted) * slots * keras_batchfix.count_weight(
            objects, self.normalizer
        )
        # The distillation loss: a mean over the images of all replicas.
        return loss + replicas.to_keras(
            ops.sum(ddf), replicas.global_sum(images), True, route=replicas.COMPILED
        )


@keras.saving.register_keras_serializable(package="keras_batchfix")
class DFineObjectDetector(keras_batchfix.NormalizerUpdates, _NormalizedDFineLoss):
    """keras-hub's D-FINE; its losses divided by `normalizer.divisor(N_obj)`.

        loss = sum_i sum_k w_k * S_ik / divisor(N_obj) + w_ddf * mean_i L_ddf_i

    over the images `i`, with `S_ik` keras-hub's summed varifocal, L1, CIoU and fine-grained
    localization losses (last decoder layer, auxiliary layers, encoder and
    denoising queries; the denoising ones divided by `divisor(N_obj)` times
    the number of denoising groups), `N_obj` the real objects of the batch
    (labels `>= 0`) and `L_ddf_i` keras-hub's decoupled distillation loss, a
    ratio of means, averaged over the images of all replicas. keras-hub
    divides by the batch's label slots, padding included, on each replica.
    The arguments are keras-hub's, and

    Args:
        normalizer: how the object count becomes the divisor; default
            `keras_batchfix.GlobalCount()` (all replicas' objects, at least 1).

    keras-hub's matcher treats every label slot as an object, padding (label
    -1) included; this subclass keeps that matching. The tests build no
    denoising queries (a backbone built with `labels`).
    """

    def __init__(self, *args, normalizer: object = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.normalizer = normalizers.get(
            normalizers.GlobalCount() if normalizer is None else normalizer
        )

    def get_config(self) -> dict:
        config = super().get_config()
        config["normalizer"] = keras.saving.serialize_keras_object(self.normalizer)
        return config
