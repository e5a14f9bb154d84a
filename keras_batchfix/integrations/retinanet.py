"""keras-hub's `RetinaNetObjectDetector` with its loss normalized by a package normalizer.

keras-hub 0.32's detector divides its focal and box losses (both reduced with
`"sum"`) by `max(1, N_pos)`, the positive anchors of the batch each replica
sees. Keras applies no replica factor to a `"sum"` reduction and
`tf.distribute` sums the replicas' gradients, so on 2 replicas a step moves
the weights about twice as far as on one device, and the per-replica count
makes the step depend on how the batch splits. This subclass weights the same
losses with `keras_batchfix.count_weight(N_pos, normalizer)` instead: with the
default `GlobalCount()` its training equals one device's on the global batch,
under `MirroredStrategy`, the multi-worker strategy and JAX's `DataParallel`
alike; `EMACount()` gives detectron2's moving-average normalizer.

Needs keras-hub (tested with 0.32.0); import it from this module:

```python
from keras_batchfix.integrations.retinanet import RetinaNetObjectDetector

with strategy.scope():
    model = RetinaNetObjectDetector(backbone=backbone, num_classes=3,
                                    anchor_generator=anchors,
                                    bounding_box_format="yxyx")
    model.compile(optimizer=keras.optimizers.SGD(0.01))
model.fit(images, {"boxes": boxes, "labels": labels}, batch_size=8)
```
"""

import keras
import keras_hub
from keras import ops

import keras_batchfix
from keras_batchfix import normalizers, replicas

_KerasHubRetinaNet = keras_hub.models.RetinaNetObjectDetector


class _NormalizedRetinaNetLoss(_KerasHubRetinaNet):
    """The detector's loss, its count weight from a package normalizer."""

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        height, width = ops.shape(x)[1], ops.shape(x)[2]
        encoder = self.label_encoder
        targets = keras.utils.bounding_boxes.convert_format(
            y, source=self.bounding_box_format,
            target=encoder.bounding_box_format, height=height, width=width,
        )
        boxes, labels = encoder(
            images=x, gt_boxes=targets["boxes"], gt_classes=targets["labels"]
        )
        # Encoder labels: a class index, -1 for background, -2 for ignored.
        positive = ops.cast(labels > -1.0, "float32")
        counted = ops.cast(labels != -2.0, "float32")
        positives = ops.sum(positive)
        weight = keras_batchfix.count_weight(positives, self.normalizer)
        # One device drops the whole loss of a batch without positives;
        # here that is decided on the global batch, as one device would.
        weight = ops.where(replicas.global_sum(positives) > 0.0, weight, 0.0)
        y_true = {
            "bbox_regression": boxes,
            "cls_logits": ops.one_hot(
                ops.cast(labels, "int32"), self.num_classes, dtype="float32"
            ),
        }
        weights = {"bbox_regression": positive * weight, "cls_logits": counted * weight}
        # Skip keras-hub's own normalization: the base Keras `compute_loss`.
        return super(_KerasHubRetinaNet, self).compute_loss(
            x=x, y=y_true, y_pred=y_pred, sample_weight=weights,
            training=training,
        )


@keras.saving.register_keras_serializable(package="keras_batchfix")
class RetinaNetObjectDetector(keras_batchfix.NormalizerUpdates, _NormalizedRetinaNetLoss):
    """keras-hub's RetinaNet; its loss divided by `normalizer.divisor(N_pos)`.

        loss = (sum_a FL_a + sum_{a positive} Huber_a) / divisor(N_pos)

    with keras-hub's focal loss `FL` over the anchors that are not ignored and
    its Huber box loss over the positives. The arguments are keras-hub's, and

    Args:
        normalizer: how the positive count becomes the divisor; default
            `keras_batchfix.GlobalCount()` (all replicas' positives).
    """

    def __init__(self, *args, normalizer=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.normalizer = normalizers.get(
            normalizers.GlobalCount() if normalizer is None else normalizer
        )

    def get_config(self):
        config = super().get_config()
        config["normalizer"] = keras.saving.serialize_keras_object(self.normalizer)
        return config
