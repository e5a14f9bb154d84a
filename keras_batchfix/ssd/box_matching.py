"""Ground-truth boxes to `SSDMultiboxLoss` targets: IoU matching and encoding.

IoU and the box-offset encoding are `keras.utils.bounding_boxes`'s
(`compute_iou`, `encode_box_to_deltas`); the matching itself (one greedy
bipartite pass, then a threshold) runs in NumPy, as a data-pipeline step.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np
from numpy.typing import ArrayLike

BACKGROUND = -1
NEUTRAL = -2


def match_anchors(
    iou: ArrayLike, pos_iou_threshold: float = 0.5, neg_iou_limit: float = 0.3
) -> np.ndarray:
    """Assigns each anchor of one image a ground-truth box, or none.

    ssd_keras's two-step matching:

    1. Bipartite (greedy): repeatedly take the largest remaining IoU of the
       matrix and match that box to that anchor, then remove both; so every
       box gets its own best anchor (if it overlaps any anchor at all),
       however low the IoU.
    2. Multi: every other anchor whose best IoU is `>= pos_iou_threshold` is
       matched to its best box.

    An unmatched anchor is background if its best IoU is `< neg_iou_limit`,
    neutral otherwise (neither positive nor negative in the loss).

    Args:
        iou: NumPy array `(num_anchors, num_boxes)`.
        pos_iou_threshold: least IoU of a positive (multi) match. Default 0.5.
        neg_iou_limit: IoU from which an unmatched anchor is neutral rather
            than background. Default 0.3. Must be `<= pos_iou_threshold`; set
            it equal to have no neutral anchors.

    Returns:
        Int array `(num_anchors,)`: the index of the matched box, or
        `BACKGROUND` (-1), or `NEUTRAL` (-2).
    """
    if neg_iou_limit > pos_iou_threshold:
        raise ValueError(
            "Argument `neg_iou_limit` must be <= `pos_iou_threshold`; received "
            f"neg_iou_limit={neg_iou_limit}, pos_iou_threshold={pos_iou_threshold}."
        )
    iou = np.asarray(iou, dtype="float64")
    num_anchors, num_boxes = iou.shape
    matches = np.full(num_anchors, BACKGROUND, dtype="int64")
    if num_boxes == 0:
        return matches

    remaining = iou.copy()
    for _ in range(min(num_boxes, num_anchors)):
        anchor, box = np.unravel_index(np.argmax(remaining), remaining.shape)
        if remaining[anchor, box] <= 0.0:
            break
        matches[anchor] = box
        remaining[anchor, :] = -1.0
        remaining[:, box] = -1.0

    best_box = np.argmax(iou, axis=1)
    best_iou = iou[np.arange(num_anchors), best_box]
    free = matches == BACKGROUND
    positive = free & (best_iou >= pos_iou_threshold)
    matches[positive] = best_box[positive]
    neutral = free & ~positive & (best_iou >= neg_iou_limit)
    matches[neutral] = NEUTRAL
    return matches


def encode_ssd_targets(
    boxes: ArrayLike,
    labels: ArrayLike,
    anchors: ArrayLike,
    num_classes: int,
    bounding_box_format: str = "xyxy",
    anchor_format: str | None = None,
    pos_iou_threshold: float = 0.5,
    neg_iou_limit: float = 0.3,
    variances: Sequence[float] = (0.1, 0.1, 0.2, 0.2),
    encoding_format: str = "center_xywh",
    image_shape: Sequence[int] | None = None,
) -> np.ndarray:
    """Encodes ground-truth boxes into `y_true` for `SSDMultiboxLoss`.

    Each anchor is matched to a box with `match_anchors` (IoU from
    `keras.utils.bounding_boxes.compute_iou`). Row `a` of the result is

    * positive: the one-hot of the box's label, then the box encoded against
      anchor `a` by `keras.utils.bounding_boxes.encode_box_to_deltas`
      (`((cx - cx_a) / w_a, (cy - cy_a) / h_a, log(w / w_a), log(h / h_a))`
      divided by `variances`, with the default `"center_xywh"`: ssd_keras's
      centroid encoding);
    * background: one-hot of class 0, zero offsets;
    * neutral: all zeros (the loss counts it neither as positive nor negative).

    Args:
        boxes: `(num_boxes, 4)` for one image, or `(batch, max_boxes, 4)`
            padded, in `bounding_box_format`.
        labels: `(num_boxes,)` or `(batch, max_boxes)` integers: the class of
            each box as its index in the one-hot, in `[1, num_classes)` (0 is
            the background); a negative label marks padding.
        anchors: `(num_anchors, 4)`, e.g. from `keras_batchfix.ssd_anchors`.
        num_classes: number of classes including the background.
        bounding_box_format: format of `boxes`. Default `"xyxy"`.
        anchor_format: format of `anchors`; default `bounding_box_format`.
        pos_iou_threshold: see `match_anchors`.
        neg_iou_limit: see `match_anchors`.
        variances: the 4 divisors of the offsets. Default `(0.1, 0.1, 0.2, 0.2)`.
        encoding_format: `"center_xywh"` (default) or `"center_yxhw"`, the
            order of the 4 offsets.
        image_shape: `(height, width, channels)`, needed for relative formats.

    Returns:
        float32 NumPy array `(num_anchors, num_classes + 4)`, or
        `(batch, num_anchors, num_classes + 4)` for batched input.

    Example:

    ```python
    anchors = keras_batchfix.ssd_anchors((64, 64), [(8, 8), (4, 4)], [0.2, 0.5, 0.8])
    y_true = keras_batchfix.encode_ssd_targets(
        boxes=[[10, 12, 30, 40]], labels=[2], anchors=anchors, num_classes=3
    )  # (320, 7): rows match the model's (batch, 320, 7) predictions
    ```
    """
    if int(num_classes) != num_classes or num_classes < 2:
        raise ValueError(
            "Argument `num_classes` must be an integer >= 2 (background "
            f"included); received num_classes={num_classes!r}."
        )
    num_classes = int(num_classes)
    anchor_format = anchor_format or bounding_box_format
    boxes = np.asarray(boxes, dtype="float32")
    labels = np.asarray(labels)
    anchors = np.asarray(anchors, dtype="float32")
    unbatched = labels.ndim == 1
    if unbatched:
        boxes, labels = boxes[None], labels[None]
    boxes = boxes.reshape(labels.shape + (4,))  # also (0,) boxes -> (0, 4)
    if labels.ndim != 2:
        raise ValueError(
            "Argument `labels` must have shape (num_boxes,) or (batch, "
            f"max_boxes); received shape {labels.shape}."
        )
    if anchors.ndim != 2 or anchors.shape[-1] != 4:
        raise ValueError(
            f"Argument `anchors` must have shape (num_anchors, 4); received "
            f"shape {anchors.shape}."
        )
    if np.any(labels >= num_classes) or np.any(labels == 0):
        raise ValueError(
            "Labels must be in [1, num_classes) (0 is the background; negative "
            f"values mark padding); received labels in [{labels.min()}, "
            f"{labels.max()}] with num_classes={num_classes}."
        )
    labels = labels.astype("int64")
    batch, max_boxes = labels.shape
    num_anchors = anchors.shape[0]
    y_true = np.zeros((batch, num_anchors, num_classes + 4), dtype="float32")
    if max_boxes == 0:
        y_true[..., 0] = 1.0
        return y_true[0] if unbatched else y_true

    iou = keras.ops.convert_to_numpy(
        keras.utils.bounding_boxes.compute_iou(
            _to_format(anchors, anchor_format, bounding_box_format, image_shape),
            boxes,
            bounding_box_format=bounding_box_format,
            image_shape=image_shape,
        )
    )  # (batch, num_anchors, max_boxes)
    matches = np.full((batch, num_anchors), BACKGROUND, dtype="int64")
    for i in range(batch):
        valid = np.flatnonzero(labels[i] >= 0)
        if len(valid) == 0:
            continue
        found = match_anchors(iou[i][:, valid], pos_iou_threshold, neg_iou_limit)
        matches[i] = np.where(found >= 0, valid[np.maximum(found, 0)], found)

    positive = matches >= 0
    index = np.maximum(matches, 0)
    matched_boxes = np.take_along_axis(boxes, index[..., None], axis=1)
    # Non-positive rows are encoded against any real box and zeroed after.
    filler = _to_format(anchors, anchor_format, bounding_box_format, image_shape)
    matched_boxes = np.where(positive[..., None], matched_boxes, filler[None])
    offsets = keras.ops.convert_to_numpy(
        keras.utils.bounding_boxes.encode_box_to_deltas(
            anchors,
            matched_boxes,
            anchor_format=anchor_format,
            box_format=bounding_box_format,
            encoding_format=encoding_format,
            variance=list(variances),
            image_shape=image_shape,
        )
    )
    matched_labels = np.take_along_axis(labels, index, axis=1)
    y_true[..., 0] = matches == BACKGROUND
    rows, cols = np.nonzero(positive)
    y_true[rows, cols, matched_labels[rows, cols]] = 1.0
    y_true[..., num_classes:] = np.where(positive[..., None], offsets, 0.0)
    return y_true[0] if unbatched else y_true


def _to_format(boxes, source, target, image_shape):
    if source.lower() == target.lower():
        return boxes
    height, width = (None, None) if image_shape is None else image_shape[:2]
    return keras.ops.convert_to_numpy(
        keras.utils.bounding_boxes.convert_format(
            boxes, source=source, target=target, height=height, width=width
        )
    ).astype("float32")
