"""Each kernel against NumPy, on whichever backend runs (CI runs all three).

A backend with a native path (see `keras_batchfix.kernels`) is checked
against the same NumPy values as the `keras.ops` path of the others.
"""

import keras
import numpy as np
import pytest

from keras_batchfix import kernels
from tests.helpers.gradients import value_and_grad


# The native forms, which only the torch backend can run.
TORCH_FORMS = {
    "_kth_largest_torch",
    "_smooth_l1_torch",
    "_weighted_smooth_l1_torch",
    "_row_sum_of_squares_torch",
    "_segment_sum_torch",
    "_assign_sub_torch",
    "_assign_add_torch",
    "_take_rows_torch",
}


def _numpy(x):
    return keras.ops.convert_to_numpy(x)


def forms(*names):
    """The kernel and its named forms, those that run on this backend."""
    params = []
    for name in names:
        skip = name in TORCH_FORMS and keras.backend.backend() != "torch"
        mark = pytest.mark.skipif(skip, reason="a torch-backend kernel")
        params.append(pytest.param(getattr(kernels, name), id=name, marks=mark))
    return pytest.mark.parametrize("kernel", params)


def _numpy_kth_largest(rows, k):
    flat = rows.reshape(len(rows), -1)
    kth = np.array([np.sort(r)[::-1][kr - 1] for r, kr in zip(flat, k)], "float32")
    return kth, (flat >= kth[:, None]).sum(axis=1)


KTH_LARGEST = forms("kth_largest", "_kth_largest_keras", "_kth_largest_torch")


@KTH_LARGEST
@pytest.mark.parametrize("row_shape", [(300,), (10, 30)])
@pytest.mark.parametrize("distinct", [True, False])
def test_kth_largest_matches_a_sort(kernel, distinct, row_shape):
    rng = np.random.default_rng(3)
    if distinct:
        scores = rng.exponential(size=(20, 300)).astype("float32")
    else:  # many ties, zeros, tiny and huge values
        pool = np.array([0.0, 1e-30, 1e-7, 0.5, 2.0, 3e4, 1e30], "float32")
        scores = rng.choice(pool, size=(20, 300))
    scores[rng.random(scores.shape) < 0.2] = -1.0  # never the answer
    k = np.array([rng.integers(1, (row >= 0).sum() + 1) for row in scores], "int32")
    k[0], k[1] = 1, (scores[1] >= 0).sum()  # the ends of the range
    rows = scores.reshape((len(scores),) + row_shape)
    kth, at_least = kernel(keras.ops.array(rows), keras.ops.array(k))
    want_kth, want_at_least = _numpy_kth_largest(scores, k)
    np.testing.assert_array_equal(_numpy(kth), want_kth)
    np.testing.assert_array_equal(_numpy(at_least), want_at_least)


@KTH_LARGEST
@pytest.mark.parametrize("k", [1, 37, 240])
def test_kth_largest_of_one_row(kernel, k):
    # One row (batch-wide mining): torch takes the least of an unsorted top k.
    rng = np.random.default_rng(k)
    scores = rng.choice(np.array([0.0, 0.5, 2.0, 7.0], "float32"), size=(1, 10, 30))
    scores[0, 0, :] = rng.exponential(size=30)
    kth, at_least = kernel(keras.ops.array(scores), keras.ops.array([k]))
    want_kth, want_at_least = _numpy_kth_largest(scores, [k])
    np.testing.assert_array_equal(_numpy(kth), want_kth)
    np.testing.assert_array_equal(_numpy(at_least), want_at_least)


@KTH_LARGEST
def test_kth_largest_of_all_zero_rows(kernel):
    kth, at_least = kernel(
        keras.ops.zeros((2, 5)), keras.ops.array(np.array([1, 5], "int32"))
    )
    np.testing.assert_array_equal(_numpy(kth), [0.0, 0.0])
    np.testing.assert_array_equal(_numpy(at_least), [5, 5])


@forms("smooth_l1", "_smooth_l1_keras", "_smooth_l1_torch")
def test_smooth_l1_value_and_gradient(kernel):
    rng = np.random.default_rng(4)
    prediction = (3 * rng.normal(size=(4, 50, 4))).astype("float32")
    prediction[0, 0] = [1.0, -1.0, 0.0, 0.999]  # the boundary and zero
    target = rng.normal(size=prediction.shape).astype("float32")
    d = prediction.astype("float64") - target
    want = np.where(np.abs(d) < 1, 0.5 * d**2, np.abs(d) - 0.5)
    value, grad = value_and_grad(
        lambda p: keras.ops.sum(kernel(p, keras.ops.array(target))),
        prediction,
    )
    np.testing.assert_allclose(value, want.sum(), rtol=1e-5)
    np.testing.assert_allclose(grad, np.clip(d, -1.0, 1.0), rtol=1e-5, atol=1e-6)


@forms(
    "softmax_cross_entropy",
    "_softmax_cross_entropy_keras",
    "_softmax_cross_entropy_torch",
)
@pytest.mark.parametrize("given_total", [False, True])
def test_softmax_cross_entropy_value_and_gradient(kernel, given_total):
    rng = np.random.default_rng(5)
    logits = (30 * rng.normal(size=(3, 40, 6))).astype("float32")  # large: stability
    targets = np.eye(6, dtype="float32")[rng.integers(0, 6, size=(3, 40))]
    targets[:, ::7] = 0.0  # neutral anchors: no target, no loss
    shifted = logits.astype("float64") - logits.max(axis=-1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    want = -(targets * log_softmax).sum(axis=-1)
    weights = rng.random(want.shape)
    total = keras.ops.array(targets.sum(-1)) if given_total else None

    def weighted(x):
        if kernel is kernels._softmax_cross_entropy_torch:  # computes its own total
            ce = kernel(keras.ops.array(targets), x)
        else:
            ce = kernel(keras.ops.array(targets), x, total)
        return keras.ops.sum(ce * keras.ops.array(weights.astype("float32")))

    value, grad = value_and_grad(weighted, logits)
    np.testing.assert_allclose(value, (weights * want).sum(), rtol=1e-5)
    softmax = np.exp(log_softmax)
    want_grad = weights[..., None] * (targets.sum(-1, keepdims=True) * softmax - targets)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-6)


@forms("weighted_smooth_l1", "_weighted_smooth_l1_torch")
def test_weighted_smooth_l1_value_and_gradient(kernel):
    rng = np.random.default_rng(7)
    prediction = (3 * rng.normal(size=(3, 40, 4))).astype("float32")
    target = rng.normal(size=prediction.shape).astype("float32")
    weights = np.where(rng.random((3, 40)) < 0.2, 1.5, 0.0).astype("float32")
    weights[2] = 0.0  # an image without positives
    d = prediction.astype("float64") - target
    per_row = np.where(np.abs(d) < 1, 0.5 * d**2, np.abs(d) - 0.5).sum(-1)
    per_image = [0.1, 1.0, 10.0]
    value, grad = value_and_grad(
        lambda p: keras.ops.sum(
            kernel(p, keras.ops.array(target), keras.ops.array(weights))
            * keras.ops.array(np.array(per_image, "float32"))[:, None]
        ),
        prediction,
    )
    np.testing.assert_allclose(
        value, (weights * per_row * np.array(per_image)[:, None]).sum(), rtol=1e-5
    )
    scale = (weights * np.array(per_image)[:, None])[..., None]
    np.testing.assert_allclose(grad, scale * np.clip(d, -1, 1), rtol=1e-5, atol=1e-6)


@forms("row_sum_of_squares", "_row_sum_of_squares_torch")
def test_row_sum_of_squares(kernel):
    x = np.random.default_rng(8).normal(size=(3, 5, 7)).astype("float32")
    got = _numpy(kernel(keras.ops.array(x)))
    np.testing.assert_allclose(got, (x.astype("float64") ** 2).sum(-1), rtol=1e-5)


@forms("assign_sub", "_assign_sub_torch")
def test_assign_sub(kernel):
    variable = keras.Variable(np.arange(6, dtype="float32").reshape(2, 3))
    kernel(variable, keras.ops.ones((2, 3)))
    np.testing.assert_array_equal(_numpy(variable), np.arange(6).reshape(2, 3) - 1.0)


@forms("assign_add", "_assign_add_torch")
@pytest.mark.parametrize("dtype", ["float32", "int32"])
def test_assign_add(kernel, dtype):
    variable = keras.Variable(np.arange(6).reshape(2, 3), dtype=dtype, trainable=False)
    kernel(variable, 2)
    kernel(variable, keras.ops.ones((2, 3), dtype=dtype))
    got = _numpy(variable)
    assert got.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(got, np.arange(6).reshape(2, 3) + 3)


@forms("take_rows", "_take_rows_torch")
@pytest.mark.parametrize("shape", [(9,), (9, 4)])
def test_take_rows_matches_numpy(kernel, shape):
    rng = np.random.default_rng(7)
    x = rng.normal(size=shape).astype("float32")
    ids = rng.integers(0, 9, 30).astype("int32")
    ids[:2] = 0, 8  # the first and last rows
    got = _numpy(kernel(keras.ops.array(x), keras.ops.array(ids)))
    np.testing.assert_array_equal(got, x[ids])


@forms("segment_sum", "_segment_sum_torch")
def test_segment_sum_matches_numpy(kernel):
    rng = np.random.default_rng(6)
    data = rng.normal(size=(50, 7)).astype("float32")
    ids = rng.integers(0, 9, 50).astype("int32")  # some of the 12 segments empty
    want = np.zeros((12, 7))
    np.add.at(want, ids, data)
    got = kernel(keras.ops.array(data), keras.ops.array(ids), 12)
    np.testing.assert_allclose(_numpy(got), want, rtol=1e-5, atol=1e-6)


def test_bitcast_round_trips():
    x = np.array([0.0, 1.5, -2.0, 3e38], "float32")
    bits = kernels.bitcast(keras.ops.array(x), "int32")
    np.testing.assert_array_equal(_numpy(bits), x.view("int32"))
    np.testing.assert_array_equal(_numpy(kernels.bitcast(bits, "float32")), x)
