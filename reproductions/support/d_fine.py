"""A tiny keras-hub D-FINE and a batch of boxes, for the D-FINE tests.

An HGNetV2 encoder of two small stages, one encoder and `DECODER_LAYERS`
decoder layers, 6 queries, 3 classes, 32x32 images; no denoising queries,
no weights downloaded. `detector(fixed=...)` builds keras-hub's
`DFineObjectDetector` or `keras_batchfix.integrations.d_fine`'s, from the
same seed, its BatchNorms frozen.
"""

import keras
import keras_hub
import numpy as np

NUM_CLASSES, SIZE, QUERIES = 3, 32, 6
LEARNING_RATE = 1e-3  # for the round trip's compile


def backbone(decoder_layers=1):
    encoder = keras_hub.models.HGNetV2Backbone(
        stem_channels=[3, 4, 4],
        stackwise_stage_filters=[[4, 4, 8, 1, 1, 3], [8, 4, 8, 1, 1, 3]],
        apply_downsample=[False, True],
        use_lightweight_conv_block=[False, False],
        depths=[1, 1], hidden_sizes=[8, 8], embedding_size=4,
        use_learnable_affine_block=True, hidden_act="relu",
        image_shape=(SIZE, SIZE, 3), out_features=["stage1", "stage2"],
    )
    return keras_hub.models.DFineBackbone(
        backbone=encoder, decoder_in_channels=[8, 8], encoder_hidden_dim=8,
        num_denoising=0, num_labels=NUM_CLASSES, hidden_dim=8,
        learn_initial_query=False, num_queries=QUERIES,
        anchor_image_size=(SIZE, SIZE), feat_strides=[4, 8],
        num_feature_levels=2, encoder_in_channels=[8, 8],
        encode_proj_layers=[1], num_attention_heads=2, encoder_ffn_dim=8,
        num_encoder_layers=1, hidden_expansion=0.5, depth_multiplier=0.5,
        eval_idx=-1, num_decoder_layers=decoder_layers,
        decoder_attention_heads=2, decoder_ffn_dim=8, decoder_n_points=[2, 2],
        lqe_hidden_dim=4, num_lqe_layers=2,
        out_features=["stage1", "stage2"], image_shape=(SIZE, SIZE, 3),
    )


def detector(fixed, normalizer=None, seed=0, decoder_layers=1):
    """The detector, its initial weights set by `seed`, BatchNorms frozen."""
    keras.utils.set_random_seed(seed)
    kwargs = dict(backbone=backbone(decoder_layers), num_classes=NUM_CLASSES,
                  bounding_box_format="yxyx")
    if fixed:
        from keras_batchfix.integrations.d_fine import DFineObjectDetector

        model = DFineObjectDetector(normalizer=normalizer, **kwargs)
    else:
        model = keras_hub.models.DFineObjectDetector(**kwargs)
    freeze_batch_norms(model)
    return model


def freeze_batch_norms(layer):
    """Frozen BatchNorm (detectron2's FrozenBN): inference statistics.

    Per-replica batch statistics differ from one device's whatever the loss
    does, so a replica-split comparison needs frozen (or synchronized) ones.
    The keras-hub audit and tests/helpers/retinanet_problem.py use it too.
    """
    for sublayer in getattr(layer, "layers", ()):
        if isinstance(sublayer, keras.layers.BatchNormalization):
            sublayer.trainable = False
        freeze_batch_norms(sublayer)


def boxes_batch(n, slots=3, full=False, seed=0):
    """`(images, {"boxes", "labels"})`; 1 to `slots` objects an image, -1 padded.

    Boxes are normalized `center_xywh`, as keras-hub's loss reads them.
    `full=True`: every slot holds an object (no padding).
    """
    rng = np.random.default_rng(seed)
    images = rng.uniform(size=(n, SIZE, SIZE, 3)).astype("float32")
    boxes = np.zeros((n, slots, 4), "float32")
    labels = -np.ones((n, slots), "int32")
    for i in range(n):
        count = slots if full else rng.integers(1, slots + 1)
        for j in range(count):
            boxes[i, j] = [*rng.uniform(0.3, 0.7, 2), *rng.uniform(0.2, 0.5, 2)]
            labels[i, j] = rng.integers(0, NUM_CLASSES)
    return images, {"boxes": boxes, "labels": labels}
