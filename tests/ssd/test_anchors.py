"""`ssd_anchors` against a plain-Python construction, and its properties."""

import math

import numpy as np
import pytest

import keras_batchfix
from keras_batchfix import num_anchors_per_cell, ssd_anchors


def reference_anchors(image_hw, maps, scales, ratios, extra=True):
    """Loop-by-loop construction from the SSD paper's definition (centroids)."""
    h_img, w_img = image_hw
    size = min(h_img, w_img)
    out = []
    for k, (rows, cols) in enumerate(maps):
        for i in range(rows):
            for j in range(cols):
                cx = (j + 0.5) * w_img / cols
                cy = (i + 0.5) * h_img / rows
                for ar in ratios:
                    w = scales[k] * size * math.sqrt(ar)
                    h = scales[k] * size / math.sqrt(ar)
                    out.append((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2))
                    if ar == 1 and extra:
                        s = math.sqrt(scales[k] * scales[k + 1]) * size
                        out.append((cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2))
    return np.array(out)


@pytest.mark.parametrize("extra", [True, False])
def test_matches_reference_construction(extra):
    maps, scales, ratios = [(4, 6), (2, 3)], [0.2, 0.45, 0.7], (0.5, 1.0, 3.0)
    got = ssd_anchors((60, 90), maps, scales, ratios, two_boxes_for_ar1=extra)
    want = reference_anchors((60, 90), maps, scales, ratios, extra)
    assert got.dtype == np.float32
    assert got.shape == want.shape == (30 * num_anchors_per_cell(ratios, extra), 4)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-4)


def test_order_is_a_channels_last_reshape():
    """Anchor r*cols*n + c*n + b is box b of cell (r, c), as Reshape((-1, depth)) orders."""
    rows, cols = 3, 5
    n = num_anchors_per_cell((1.0, 2.0, 0.5))
    anchors = ssd_anchors((30, 50), [(rows, cols)], [0.3, 0.6])
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    grid = centres.reshape(rows, cols, n, 2)
    for r in range(rows):
        for c in range(cols):
            np.testing.assert_allclose(grid[r, c], [[10 * c + 5, 10 * r + 5]] * n, atol=1e-5)


def test_aspect_ratios_and_sizes():
    anchors = ssd_anchors((64, 64), [(2, 2)], [0.25, 0.64], (1.0, 2.0, 0.5))
    w = anchors[:, 2] - anchors[:, 0]
    h = anchors[:, 3] - anchors[:, 1]
    np.testing.assert_allclose((w / h)[:4], [1.0, 1.0, 2.0, 0.5], rtol=1e-5)
    np.testing.assert_allclose(np.sqrt(w * h)[:4], [16, 0.4 * 64, 16, 16], rtol=1e-5)


def test_per_layer_aspect_ratios_and_clip():
    anchors = ssd_anchors(
        (32, 32), [(2, 2), (1, 1)], [0.5, 0.9, 1.2], [(1.0,), (2.0, 0.5)], clip=True
    )
    assert anchors.shape == (2 * 2 * 2 + 1 * 2, 4)
    assert anchors.min() >= 0 and anchors.max() <= 32


@pytest.mark.parametrize(
    "fmt, convert",
    [
        ("rel_xyxy", lambda b: b / np.array([80, 40, 80, 40])),
        ("yxyx", lambda b: b[:, [1, 0, 3, 2]]),
        (
            "center_xywh",
            lambda b: np.concatenate([(b[:, :2] + b[:, 2:]) / 2, b[:, 2:] - b[:, :2]], 1),
        ),
    ],
)
def test_formats(fmt, convert):
    args = ((40, 80), [(2, 4)], [0.3, 0.5])
    np.testing.assert_allclose(
        ssd_anchors(*args, bounding_box_format=fmt),
        convert(ssd_anchors(*args).astype("float64")),
        rtol=1e-5,
        atol=1e-5,
    )


def test_errors():
    with pytest.raises(ValueError, match="scales"):
        ssd_anchors((32, 32), [(4, 4), (2, 2)], [0.2, 0.5])
    with pytest.raises(ValueError, match="aspect_ratios"):
        ssd_anchors((32, 32), [(4, 4)], [0.2, 0.5], aspect_ratios=(1.0, -2.0))
    with pytest.raises(ValueError, match="per layer"):
        ssd_anchors((32, 32), [(4, 4)], [0.2, 0.5], aspect_ratios=[(1.0,), (2.0,)])


def test_exported():
    assert keras_batchfix.ssd_anchors is ssd_anchors
    assert num_anchors_per_cell((1.0, 2.0, 0.5, 3.0, 1 / 3)) == 6
    assert num_anchors_per_cell((2.0, 0.5)) == 2
