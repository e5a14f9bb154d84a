"""`match_anchors` / `encode_ssd_targets`: hand-made cases, NumPy IoU and decoding."""

import keras
import numpy as np
import pytest

from keras_batchfix import (
    SSDMultiboxLoss,
    encode_ssd_targets,
    match_anchors,
    ssd_anchors,
)
from keras_batchfix.ssd.box_matching import BACKGROUND, NEUTRAL

NUM_CLASSES = 4
VARIANCES = np.array([0.1, 0.1, 0.2, 0.2])


def numpy_iou(a, b):
    """Pairwise IoU of xyxy boxes, (len(a), len(b))."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=-1)
    area = lambda x: np.prod(x[:, 2:] - x[:, :2], axis=-1)
    return inter / (area(a)[:, None] + area(b)[None, :] - inter)


def numpy_decode(anchors, offsets):
    """Inverse of the centroid encoding, back to xyxy."""
    a = anchors.astype("float64")
    cxa, cya = (a[:, 0] + a[:, 2]) / 2, (a[:, 1] + a[:, 3]) / 2
    wa, ha = a[:, 2] - a[:, 0], a[:, 3] - a[:, 1]
    d = offsets * VARIANCES
    cx, cy = cxa + d[:, 0] * wa, cya + d[:, 1] * ha
    w, h = wa * np.exp(d[:, 2]), ha * np.exp(d[:, 3])
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=-1)


def random_scene(rng, n_boxes, size=64):
    w = rng.uniform(8, 30, n_boxes)
    h = rng.uniform(8, 30, n_boxes)
    x0, y0 = rng.uniform(0, size - w), rng.uniform(0, size - h)
    boxes = np.stack([x0, y0, x0 + w, y0 + h], axis=-1).astype("float32")
    return boxes, rng.integers(1, NUM_CLASSES, n_boxes)


@pytest.fixture(scope="module")
def anchors():
    return ssd_anchors((64, 64), [(8, 8), (4, 4)], [0.2, 0.45, 0.8])


def test_match_anchors_hand_made():
    iou = np.array(
        [
            [0.90, 0.10],  # best for box 0 -> bipartite
            [0.60, 0.10],  # multi match to box 0 (>= 0.5)
            [0.35, 0.10],  # neutral band [0.3, 0.5)
            [0.05, 0.25],  # box 1's best anchor: bipartite despite IoU 0.25
            [0.10, 0.15],  # background
            [0.00, 0.00],  # background
        ]
    )
    np.testing.assert_array_equal(
        match_anchors(iou, 0.5, 0.3), [0, 0, NEUTRAL, 1, BACKGROUND, BACKGROUND]
    )
    # No neutral band when the two thresholds coincide.
    assert NEUTRAL not in match_anchors(iou, 0.5, 0.5)
    assert (match_anchors(np.zeros((3, 0))) == BACKGROUND).all()


def test_bipartite_is_greedy_on_the_global_maximum():
    # Box 0 and box 1 both prefer anchor 0; the larger IoU (box 1) wins it and
    # box 0 falls back to its second-best anchor.
    iou = np.array([[0.6, 0.7], [0.4, 0.1], [0.0, 0.0]])
    np.testing.assert_array_equal(match_anchors(iou, 0.5, 0.3), [1, 0, BACKGROUND])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_encoding_properties_against_numpy(anchors, seed):
    rng = np.random.default_rng(seed)
    boxes, labels = random_scene(rng, n_boxes=4)
    y = encode_ssd_targets(boxes, labels, anchors, NUM_CLASSES)
    assert y.shape == (len(anchors), NUM_CLASSES + 4) and y.dtype == np.float32

    onehot, offsets = y[:, :NUM_CLASSES], y[:, NUM_CLASSES:]
    iou = numpy_iou(anchors.astype("float64"), boxes.astype("float64"))
    positive = onehot[:, 1:].sum(-1) > 0
    background = onehot[:, 0] == 1
    neutral = onehot.sum(-1) == 0
    assert (positive.astype(int) + background + neutral == 1).all()
    assert (onehot.sum(-1) <= 1).all()

    # Positives decode (NumPy) to one of the boxes, carrying that box's label.
    decoded = numpy_decode(anchors[positive], offsets[positive])
    target = np.argmax(numpy_iou(decoded, boxes.astype("float64")), axis=-1)
    np.testing.assert_allclose(decoded, boxes[target], atol=1e-3)
    np.testing.assert_array_equal(onehot[positive].argmax(-1), labels[target])
    # Every box has an anchor, and each positive either passes the threshold or
    # is a box's own best anchor (the bipartite step).
    assert set(target) == set(range(len(boxes)))
    best_anchor_per_box = set(np.argmax(iou, axis=0))
    for a, t in zip(np.flatnonzero(positive), target):
        assert iou[a, t] >= 0.5 - 1e-6 or a in best_anchor_per_box
    # Background below the negative limit, neutral in between, zero offsets off positives.
    assert (iou[background].max(-1) < 0.3 + 1e-6).all()
    assert ((iou[neutral].max(-1) >= 0.3 - 1e-6) & (iou[neutral].max(-1) < 0.5 + 1e-6)).all()
    assert (offsets[~positive] == 0).all()


def test_batched_with_padding_equals_per_image(anchors):
    rng = np.random.default_rng(3)
    scenes = [random_scene(rng, n) for n in (1, 3, 5)]
    boxes = np.zeros((3, 5, 4), "float32")
    labels = np.full((3, 5), -1)
    for i, (b, l) in enumerate(scenes):
        boxes[i, : len(b)], labels[i, : len(l)] = b, l
    boxes[0, 1:] = [[0, 0, 64, 64]] * 4  # padding is ignored whatever its coordinates
    batched = encode_ssd_targets(boxes, labels, anchors, NUM_CLASSES)
    for i, (b, l) in enumerate(scenes):
        np.testing.assert_array_equal(batched[i], encode_ssd_targets(b, l, anchors, NUM_CLASSES))


def test_no_boxes_is_all_background(anchors):
    y = encode_ssd_targets(np.zeros((0, 4)), np.zeros((0,), int), anchors, NUM_CLASSES)
    assert (y[:, 0] == 1).all() and (y[:, 1:] == 0).all()
    y = encode_ssd_targets(np.zeros((2, 3, 4)), -np.ones((2, 3), int), anchors, NUM_CLASSES)
    assert y.shape == (2, len(anchors), NUM_CLASSES + 4) and (y[..., 0] == 1).all()


def test_center_yxhw_swaps_the_offsets(anchors):
    boxes, labels = random_scene(np.random.default_rng(4), 3)
    xy = encode_ssd_targets(boxes, labels, anchors, NUM_CLASSES)
    yx = encode_ssd_targets(boxes, labels, anchors, NUM_CLASSES, encoding_format="center_yxhw")
    np.testing.assert_allclose(yx[:, NUM_CLASSES:], xy[:, NUM_CLASSES:][:, [1, 0, 3, 2]], rtol=1e-6)


def test_other_box_formats(anchors):
    boxes, labels = random_scene(np.random.default_rng(5), 3)
    want = encode_ssd_targets(boxes, labels, anchors, NUM_CLASSES)
    rel = boxes / 64.0
    got = encode_ssd_targets(
        rel, labels, anchors, NUM_CLASSES, bounding_box_format="rel_xyxy",
        anchor_format="xyxy", image_shape=(64, 64, 3),
    )
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_label_validation(anchors):
    boxes = np.array([[0, 0, 10, 10]], "float32")
    with pytest.raises(ValueError, match="num_classes"):
        encode_ssd_targets(boxes, [NUM_CLASSES], anchors, NUM_CLASSES)
    with pytest.raises(ValueError, match="background"):
        encode_ssd_targets(boxes, [0], anchors, NUM_CLASSES)


def test_targets_feed_the_loss(anchors):
    """A prediction equal to the encoded targets costs (almost) nothing."""
    rng = np.random.default_rng(6)
    boxes, labels = random_scene(rng, 3)
    y = encode_ssd_targets(boxes, labels, anchors, NUM_CLASSES)[None]
    logits = np.where(y[..., :NUM_CLASSES] > 0, 20.0, 0.0)
    logits[..., 0] += (y[..., :NUM_CLASSES].sum(-1) == 0) * 20.0  # neutral: any
    y_pred = np.concatenate([logits, y[..., NUM_CLASSES:]], -1).astype("float32")
    loss = SSDMultiboxLoss(NUM_CLASSES, from_logits=True)
    assert float(keras.ops.convert_to_numpy(loss(y, y_pred))) < 1e-6
    y_pred[..., NUM_CLASSES] += 1.0  # a unit error on the x offset: SmoothL1 = 0.5
    assert float(keras.ops.convert_to_numpy(loss(y, y_pred))) == pytest.approx(0.5, rel=1e-4)
