"""A small keras-hub RetinaNet and a batch of boxes, for the detector tests.

ResNet basic blocks, `RetinaNetBackbone` levels 3-5, 3 classes, 64x64
images; no weights are downloaded. `detector(fixed=...)` builds keras-hub's
`RetinaNetObjectDetector` or `keras_batchfix.integrations.retinanet`'s, from the same
seed.
"""

import keras
import keras_hub
import numpy as np

from reproductions.support.d_fine import freeze_batch_norms

NUM_CLASSES, SIZE = 3, 64
# Plain SGD; keras-hub's untrained detector starts near a loss of 500 and
# diverges within 3 steps at 1e-3 (measured), so the tests step at 1e-5.
LEARNING_RATE = 1e-5


def detector(fixed, normalizer=None, seed=0):
    """The detector, its initial weights set by `seed`, BatchNorms frozen."""
    keras.utils.set_random_seed(seed)
    encoder = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[7],
        stackwise_num_filters=[64, 16, 16, 16], stackwise_num_blocks=[1, 1, 1, 1],
        stackwise_num_strides=[1, 2, 2, 2], block_type="basic_block",
        use_pre_activation=False, image_shape=(SIZE, SIZE, 3),
    )
    backbone = keras_hub.models.RetinaNetBackbone(
        image_encoder=encoder, min_level=3, max_level=5, use_p5=False,
        image_shape=(SIZE, SIZE, 3),
    )
    anchors = keras_hub.layers.AnchorGenerator(
        bounding_box_format="yxyx", min_level=3, max_level=5, num_scales=1,
        aspect_ratios=[1.0], anchor_size=2,
    )
    kwargs = dict(backbone=backbone, num_classes=NUM_CLASSES,
                  anchor_generator=anchors, bounding_box_format="yxyx")
    if fixed:
        from keras_batchfix.integrations.retinanet import RetinaNetObjectDetector

        model = RetinaNetObjectDetector(normalizer=normalizer, **kwargs)
    else:
        model = keras_hub.models.RetinaNetObjectDetector(**kwargs)
    freeze_batch_norms(model)
    return model


def boxes_batch(n, seed=0):
    """`(images, {"boxes", "labels"})`: 1 to 3 boxes an image, -1 padded."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(size=(n, SIZE, SIZE, 3)).astype("float32")
    boxes = np.zeros((n, 3, 4), "float32")
    labels = -np.ones((n, 3), "int32")
    for i in range(n):
        for j in range(rng.integers(1, 4)):
            y0, x0 = rng.uniform(0, 30, 2)
            h, w = rng.uniform(14, 34, 2)
            boxes[i, j] = [y0, x0, y0 + h, x0 + w]
            labels[i, j] = rng.integers(0, NUM_CLASSES)
    return images, {"boxes": boxes, "labels": labels}
