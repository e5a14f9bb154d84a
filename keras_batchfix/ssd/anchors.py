"""SSD anchor boxes (default boxes) for a few feature maps, ssd_keras's layout."""

from __future__ import annotations

import math
from collections.abc import Sequence

import keras
import numpy as np


def num_anchors_per_cell(
    aspect_ratios: Sequence[float] = (1.0, 2.0, 0.5), two_boxes_for_ar1: bool = True
) -> int:
    """Number of anchors centred on each cell of a feature map.

    One box per aspect ratio, plus one when `two_boxes_for_ar1` and `1.0` is
    among the aspect ratios. A prediction head for that feature map outputs
    `num_anchors_per_cell(...) * (num_classes + 4)` channels.
    """
    aspect_ratios = [float(ar) for ar in aspect_ratios]
    return len(aspect_ratios) + int(two_boxes_for_ar1 and 1.0 in aspect_ratios)


def ssd_anchors(
    image_shape: Sequence[int],
    feature_map_shapes: Sequence[Sequence[int]],
    scales: Sequence[float],
    aspect_ratios: Sequence[float] | Sequence[Sequence[float]] = (1.0, 2.0, 0.5),
    two_boxes_for_ar1: bool = True,
    offset: float = 0.5,
    clip: bool = False,
    bounding_box_format: str = "xyxy",
) -> np.ndarray:
    """Anchor boxes of an SSD head, in the order its predictions are reshaped.

    For feature map `k` of shape `(h_k, w_k)` the anchors sit on the centres
    `((j + offset) * W / w_k, (i + offset) * H / h_k)` of its cells, with
    `(H, W)` the image size. At each centre there is one box per aspect ratio
    `ar`, of width `s_k * S * sqrt(ar)` and height `s_k * S / sqrt(ar)` (with
    `S = min(H, W)` and `s_k = scales[k]`), and, for `ar == 1` when
    `two_boxes_for_ar1`, a second square box of side `sqrt(s_k * s_{k+1}) * S`
    right after it (Liu et al., 2016; ssd_keras's `AnchorBoxes`).

    The order matches a channels-last head reshaped to `(batch, -1, depth)`:
    feature map by feature map, then row `i`, column `j`, then box, so that
    anchor `a` of this array belongs to row `a` of the loss's `y_true`.

    Args:
        image_shape: `(height, width)` or `(height, width, channels)` of the
            input image, in pixels.
        feature_map_shapes: list of `(h_k, w_k)`, one per prediction layer.
        scales: `len(feature_map_shapes) + 1` floats, the box sizes as a
            fraction of `min(height, width)`; the last one only sets the extra
            square box of the last layer.
        aspect_ratios: width / height of the boxes: one sequence for every
            layer, or a list with one sequence per layer.
        two_boxes_for_ar1: whether to add the second square box. Default True.
        offset: position of the centre within a cell, in cells. Default 0.5.
        clip: whether to clip the boxes to the image. Default False.
        bounding_box_format: format of the returned boxes (any format of
            `keras.utils.bounding_boxes.convert_format`, e.g. `"xyxy"`,
            `"center_xywh"`, `"rel_xyxy"`). Default `"xyxy"`, in pixels.

    Returns:
        A float32 NumPy array of shape `(num_anchors, 4)`.

    Example:

    >>> anchors = ssd_anchors((64, 64), [(8, 8), (4, 4)], scales=[0.2, 0.5, 0.8])
    >>> anchors.shape  # (8*8 + 4*4) cells * 4 boxes
    (320, 4)
    """
    height, width = (float(d) for d in tuple(image_shape)[:2])
    feature_map_shapes = [tuple(int(d) for d in s) for s in feature_map_shapes]
    n_layers = len(feature_map_shapes)
    if n_layers == 0:
        raise ValueError("Argument `feature_map_shapes` must not be empty.")
    if len(scales) != n_layers + 1:
        raise ValueError(
            "Argument `scales` must have len(feature_map_shapes) + 1 = "
            f"{n_layers + 1} entries; received scales={list(scales)!r}."
        )
    if any(s <= 0 for s in scales):
        raise ValueError(f"Argument `scales` must be positive; received {scales!r}.")
    if _is_per_layer(aspect_ratios):
        per_layer = [tuple(float(a) for a in ars) for ars in aspect_ratios]
        if len(per_layer) != n_layers:
            raise ValueError(
                "With one sequence of `aspect_ratios` per layer there must be "
                f"{n_layers} of them; received {len(per_layer)}."
            )
    else:
        per_layer = [tuple(float(a) for a in aspect_ratios)] * n_layers
    if any(ar <= 0 for ars in per_layer for ar in ars) or not all(per_layer):
        raise ValueError(
            "Argument `aspect_ratios` must hold positive numbers (at least one "
            f"per layer); received {aspect_ratios!r}."
        )

    size = min(height, width)
    layers = []
    for k, ((rows, cols), ars) in enumerate(zip(feature_map_shapes, per_layer)):
        sides = []  # (box width, box height) of each box of a cell, in order
        for ar in ars:
            sides.append((scales[k] * size * math.sqrt(ar), scales[k] * size / math.sqrt(ar)))
            if ar == 1.0 and two_boxes_for_ar1:
                side = math.sqrt(scales[k] * scales[k + 1]) * size
                sides.append((side, side))
        sides = np.asarray(sides, dtype="float64")  # (n_boxes, 2)
        cy = (np.arange(rows) + offset) * height / rows
        cx = (np.arange(cols) + offset) * width / cols
        cy, cx = np.meshgrid(cy, cx, indexing="ij")  # (rows, cols)
        boxes = np.empty((rows, cols, len(sides), 4), dtype="float64")
        boxes[..., 0] = cx[..., None] - sides[:, 0] / 2
        boxes[..., 1] = cy[..., None] - sides[:, 1] / 2
        boxes[..., 2] = cx[..., None] + sides[:, 0] / 2
        boxes[..., 3] = cy[..., None] + sides[:, 1] / 2
        layers.append(boxes.reshape(-1, 4))
    boxes = np.concatenate(layers, axis=0)
    if clip:
        boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0.0, width)
        boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0.0, height)
    boxes = boxes.astype("float32")
    if bounding_box_format.lower() != "xyxy":
        boxes = keras.ops.convert_to_numpy(
            keras.utils.bounding_boxes.convert_format(
                boxes,
                source="xyxy",
                target=bounding_box_format,
                height=height,
                width=width,
            )
        ).astype("float32")
    return boxes


def _is_per_layer(aspect_ratios):
    return len(aspect_ratios) > 0 and all(
        isinstance(a, (list, tuple, np.ndarray)) for a in aspect_ratios
    )
