import itertools

import keras
import numpy as np
import pytest

from keras_batchfix import SSDMultiboxLoss
from keras_batchfix.kernels import top_k_mask
from tests.helpers.gradients import value_and_grad
from tests.helpers.training import batch_loss
from keras_batchfix.references.ssd_data import random_batch

torch = pytest.importorskip("torch")
from keras_batchfix.references.torch_multibox import multibox_loss  # noqa: E402

NUM_CLASSES = 5
CASES = list(
    itertools.product(
        [1, 7, 32],  # batch of 1, a partial batch, a full batch
        [0.0, 0.02, 0.3],  # positive fraction (zero included)
        [True, False],  # from_logits
        ["batch", "per_image"],
    )
)


def reference(y_true, y_pred, **kwargs):
    """Value and gradient with respect to y_pred of the PyTorch reference."""
    y_pred = torch.tensor(y_pred, dtype=torch.float64, requires_grad=True)
    value = multibox_loss(
        torch.tensor(y_true, dtype=torch.float64),
        y_pred,
        num_classes=NUM_CLASSES,
        **kwargs,
    )
    value.backward()
    return value.item(), y_pred.grad.numpy()


@pytest.mark.parametrize("batch_size,positive_fraction,from_logits,mining", CASES)
def test_value_and_gradient_match_pytorch(
    batch_size, positive_fraction, from_logits, mining
):
    rng = np.random.default_rng(batch_size * 100 + int(positive_fraction * 50))
    y_true, y_pred = random_batch(
        rng,
        batch_size,
        anchors=60,
        num_classes=NUM_CLASSES,
        positive_fraction=positive_fraction,
        trailing=8 if from_logits else 0,
        from_logits=from_logits,
    )
    options = dict(from_logits=from_logits, mining=mining, n_neg_min=2)
    loss = SSDMultiboxLoss(NUM_CLASSES, **options)
    value, grad = value_and_grad(lambda p: loss(y_true, p), y_pred)
    want_value, want_grad = reference(y_true, y_pred, **options)
    np.testing.assert_allclose(value, want_value, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mining", ["batch", "per_image"])
def test_options_match_pytorch(mining):
    rng = np.random.default_rng(3)
    y_true, y_pred = random_batch(rng, 6, 80, NUM_CLASSES, positive_fraction=0.05)
    options = dict(neg_pos_ratio=2.5, n_neg_min=7, alpha=0.3, from_logits=True)
    loss = SSDMultiboxLoss(NUM_CLASSES, mining=mining, **options)
    want, _ = reference(y_true, y_pred, mining=mining, **options)
    np.testing.assert_allclose(float(loss(y_true, y_pred)), want, rtol=1e-5)


def test_mining_modes_differ_when_positives_are_uneven():
    # Image 0 has all the positives: batch mining may spend its negatives there
    # or elsewhere, per-image mining gives image 1 none. The reference decides.
    rng = np.random.default_rng(4)
    y_true, y_pred = random_batch(rng, 2, 50, NUM_CLASSES, positive_fraction=0.0)
    y_true[0, :5, :NUM_CLASSES] = np.eye(NUM_CLASSES)[1]
    values = {}
    for mining in ("batch", "per_image"):
        loss = SSDMultiboxLoss(NUM_CLASSES, mining=mining, from_logits=True)
        values[mining] = float(loss(y_true, y_pred))
        want, _ = reference(y_true, y_pred, mining=mining, from_logits=True)
        np.testing.assert_allclose(values[mining], want, rtol=1e-5)
    assert values["batch"] != pytest.approx(values["per_image"])


def test_all_neutral_and_no_positive_batches_are_finite():
    rng = np.random.default_rng(5)
    y_true, y_pred = random_batch(rng, 3, 40, NUM_CLASSES, positive_fraction=0.0)
    loss = SSDMultiboxLoss(NUM_CLASSES, from_logits=True)
    assert float(loss(y_true, y_pred)) == 0.0  # no positive: no negative mined
    loss = SSDMultiboxLoss(NUM_CLASSES, from_logits=True, n_neg_min=4)
    want, _ = reference(y_true, y_pred, from_logits=True, n_neg_min=4)
    np.testing.assert_allclose(float(loss(y_true, y_pred)), want, rtol=1e-5)
    y_true[..., :NUM_CLASSES] = 0.0  # every anchor neutral
    assert float(loss(y_true, y_pred)) == 0.0


def fit_model(loss, jit_compile=False):
    inputs = keras.Input((None, NUM_CLASSES + 4))
    outputs = keras.layers.Identity()(inputs)
    model = keras.Model(inputs, outputs)
    model.compile(loss=loss, jit_compile=jit_compile)
    return model


@pytest.mark.parametrize("jit_compile", [False, True])
def test_keras_reports_the_normalized_loss_at_every_batch_size(jit_compile):
    if jit_compile and keras.backend.backend() == "torch":
        pytest.skip("jit_compile on torch is torch.compile, not XLA")
    rng = np.random.default_rng(6)
    y_true, y_pred = random_batch(rng, 32, 50, NUM_CLASSES, positive_fraction=0.1)
    model = fit_model(SSDMultiboxLoss(NUM_CLASSES, from_logits=True), jit_compile)
    for size in (32, 7, 1):
        reported = batch_loss(model, y_pred[:size], y_true[:size])
        want, _ = reference(y_true[:size], y_pred[:size], from_logits=True)
        np.testing.assert_allclose(reported, want, rtol=1e-5)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_reduces_in_float32(policy):
    rng = np.random.default_rng(7)
    y_true, y_pred = random_batch(rng, 4, 3000, NUM_CLASSES, positive_fraction=0.02)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        loss = SSDMultiboxLoss(NUM_CLASSES, from_logits=True)
        low = keras.ops.cast(y_pred, keras.config.dtype_policy().compute_dtype)
        value = loss(y_true, low)
        assert keras.backend.standardize_dtype(value.dtype) == "float32"
        rounded = keras.ops.convert_to_numpy(keras.ops.cast(low, "float32"))
    finally:
        keras.config.set_dtype_policy(previous)
    want, _ = reference(y_true, rounded, from_logits=True)
    np.testing.assert_allclose(float(value), want, rtol=1e-5)


def test_model_save_round_trip(tmp_path):
    loss = SSDMultiboxLoss(
        NUM_CLASSES, neg_pos_ratio=2.0, n_neg_min=3, alpha=0.5,
        mining="per_image", from_logits=True,
    )
    model = fit_model(loss)
    path = tmp_path / "model.keras"
    model.save(path)
    restored = keras.models.load_model(path)
    assert isinstance(restored.loss, SSDMultiboxLoss)
    assert restored.loss.get_config() == loss.get_config()
    rng = np.random.default_rng(8)
    y_true, y_pred = random_batch(rng, 3, 30, NUM_CLASSES, positive_fraction=0.1)
    np.testing.assert_allclose(
        batch_loss(restored, y_pred, y_true), batch_loss(model, y_pred, y_true)
    )


def test_top_k_mask_selects_exactly_k_even_with_ties():
    scores = np.array(
        [[3, 1, 3, 3, 0, -1], [2, 2, 2, 2, 2, 2], [5, 4, 3, 2, 1, 0]], "float32"
    )
    k = np.array([2, 4, 0], "int32")
    mask = keras.ops.convert_to_numpy(top_k_mask(scores, k))
    assert mask.sum(axis=1).tolist() == [2, 4, 0]
    for row, kr, row_mask in zip(scores, k, mask):
        kth = np.sort(row)[::-1][kr - 1] if kr else np.inf
        assert (row[row_mask] >= kth).all()
        assert (row[~row_mask] <= kth).all()


@pytest.mark.parametrize("row_shape", [(300,), (10, 30)])  # flat or a batch
@pytest.mark.parametrize("distinct", [False, True])
def test_top_k_mask_matches_a_stable_sort_on_random_rows(distinct, row_shape):
    rng = np.random.default_rng(9)
    if distinct:  # no ties at the k-th value: the plain threshold
        scores = rng.exponential(size=(20, 300)).astype("float32")
    else:  # few distinct values (many ties), zeros, tiny and huge values
        pool = np.array([0.0, 1e-30, 1e-7, 0.5, 0.5, 2.0, 3e4, 1e30], "float32")
        scores = rng.choice(pool, size=(20, 300))
    scores[rng.random(scores.shape) < 0.2] = -1.0  # never selected
    k = np.array([rng.integers(0, (row >= 0).sum() + 1) for row in scores], "int32")
    rows = scores.reshape((len(scores),) + row_shape)
    mask = keras.ops.convert_to_numpy(top_k_mask(rows, k)).reshape(scores.shape)
    for row, kr, row_mask in zip(scores, k, mask):
        want = np.zeros_like(row_mask)
        want[np.argsort(-row, kind="stable")[:kr]] = True  # first among ties
        np.testing.assert_array_equal(row_mask, want)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_classes=1), "num_classes"),
        (dict(num_classes=5, neg_pos_ratio=-1), "neg_pos_ratio"),
        (dict(num_classes=5, n_neg_min=-2), "n_neg_min"),
        (dict(num_classes=5, mining="global"), "mining"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SSDMultiboxLoss(**kwargs)


@pytest.mark.parametrize(
    "true_shape,pred_shape,match",
    [
        ((2, 10, 9), (2, 10, 9, 1), r"rank 3.*\(2, 10, 9, 1\)"),
        ((2, 10, 9), (2, 11, 9), r"same shape.*\(2, 10, 9\).*\(2, 11, 9\)"),
        ((2, 10, 7), (2, 10, 7), r"num_classes \+ 4 = 9.*\(2, 10, 7\)"),
        ((2, 10, 10), (2, 10, 10), r"num_classes \+ 4 = 9"),
    ],
)
def test_bad_shapes(true_shape, pred_shape, match):
    loss = SSDMultiboxLoss(5)
    with pytest.raises(ValueError, match=match):
        loss(np.zeros(true_shape, "float32"), np.zeros(pred_shape, "float32"))


def smoothed(y_true, epsilon=0.1):
    """Label smoothing on the one-hot part of the non-neutral anchors."""
    y = y_true.copy()
    onehot = y[..., :NUM_CLASSES]
    labelled = onehot.sum(-1, keepdims=True) > 0
    y[..., :NUM_CLASSES] = np.where(
        labelled, onehot * (1 - epsilon) + epsilon / NUM_CLASSES, 0.0
    )
    return y


@pytest.mark.parametrize("jit_compile", [False, True])
def test_inputs_it_cannot_be_right_for_give_nan_in_fit(jit_compile):
    """Soft labels, and logits with from_logits=False, were silently accepted."""
    rng = np.random.default_rng(3)
    y_true, logits = random_batch(rng, 4, 30, NUM_CLASSES, positive_fraction=0.2)
    _, probabilities = random_batch(
        np.random.default_rng(3), 4, 30, NUM_CLASSES, positive_fraction=0.2,
        from_logits=False,
    )
    inputs = keras.Input(y_true.shape[1:])
    cases = [
        (True, y_true, logits, False),
        (False, y_true, probabilities, False),
        (True, smoothed(y_true), logits, True),  # soft targets
        (False, y_true, logits, True),  # logits given as probabilities
    ]
    for from_logits, target, prediction, nan in cases:
        model = keras.Model(inputs, keras.layers.Identity()(inputs))
        model.compile(
            loss=SSDMultiboxLoss(NUM_CLASSES, from_logits=from_logits),
            jit_compile=jit_compile if keras.backend.backend() != "torch" else False,
        )
        assert np.isnan(batch_loss(model, prediction, target)) == nan


@pytest.mark.parametrize(
    "row,nan",
    [
        ([0.0, 1.0, 0.0, 0.0, 0.0], False),
        ([0.0, 0.0, 0.0, 0.0, 0.0], False),  # neutral
        ([0.0, 0.9, 0.1, 0.0, 0.0], True),  # label smoothing
        ([0.0, 1.0 - 2**-24, 0.0, 0.0, 0.0], True),  # just below 1
        ([1e-30, 1.0, 0.0, 0.0, 0.0], True),  # a tiny background entry
        ([0.0, 0.5, 0.5, 0.0, 0.0], True),  # sums to 1
        ([1.0, 0.0, 0.3, -0.3, 0.0], True),  # sums to 1, with a negative entry
        # Below float32 resolution of the row's sum: not seen (documented),
        # and the loss it gives differs by less than its rounding.
        ([0.0, 1.0, 1e-30, 0.0, 0.0], False),
        ([0.0, 1.0, 1.0, 0.0, 0.0], True),  # two classes
        ([-1.0, 1.0, 1.0, 0.0, 0.0], True),  # summing to 1 with a negative
        ([0.0, 2.0, 0.0, 0.0, 0.0], True),
    ],
)
def test_targets_that_are_not_one_hot_give_nan(row, nan):
    rng = np.random.default_rng(4)
    y_true, logits = random_batch(rng, 2, 20, NUM_CLASSES, positive_fraction=0.2)
    y_true[1, 3, :NUM_CLASSES] = row
    loss = SSDMultiboxLoss(NUM_CLASSES, from_logits=True)
    value = keras.ops.convert_to_numpy(loss(y_true, logits))
    assert np.isnan(value) == nan
