"""Tests of `keras_batchfix.CenterLoss`; backend-agnostic.

Run under each backend: `KERAS_BACKEND=jax pytest tests/test_center_loss.py`
(tensorflow, jax, torch). References are NumPy re-implementations written
apart (tests/helpers/center_loss_problem.py) and the PyTorch port of the report's code in `keras_batchfix.references`.
"""


import numpy as np
import pytest

import keras
from keras import ops

from keras_batchfix import CenterLoss, EMACount, GlobalCount, LocalCount
from tests.helpers.center_loss_problem import (
    D,
    K,
    batches,
    numpy_center_loss,
    numpy_center_step,
)

BACKEND = keras.backend.backend()


def to_numpy(x):
    return np.asarray(ops.convert_to_numpy(x), np.float64)


MODES = {
    "eager": dict(run_eagerly=True, jit_compile=False),
    "graph": dict(run_eagerly=False, jit_compile=False),
    "xla": dict(run_eagerly=False, jit_compile=True),
}


def mode_params():
    if BACKEND == "torch":  # torch: eager (jit_compile would be torch.compile)
        return ["eager"]
    if BACKEND == "jax":  # jax: always traced by jax.jit unless run_eagerly
        return ["eager", "xla"]
    return list(MODES)


# ------------------------------------------------------------------- models


def identity_feature_model(layer):
    """features = the input itself (so the test knows them exactly)."""
    features = keras.Input((D,))
    labels = keras.Input((), dtype="int32")
    out = layer([features, labels])
    logits = keras.layers.Dense(K)(out)
    return keras.Model([features, labels], logits)


def linear_feature_model(layer, kernel):
    """features = x @ W (no bias), then the center loss is the only loss."""
    x = keras.Input((kernel.shape[0],))
    labels = keras.Input((), dtype="int32")
    dense = keras.layers.Dense(kernel.shape[1], use_bias=False)
    features = layer([dense(x), labels])
    model = keras.Model([x, labels], features)
    dense.set_weights([kernel.astype("float32")])
    return model


# -------------------------------------------------------------------- tests


@pytest.mark.parametrize("mode", mode_params())
@pytest.mark.parametrize("schedule", [False, True])
def test_fit_moves_centers_by_paper_rule(mode, schedule):
    rng = np.random.default_rng(0)
    n, batch_size = 20, 8  # batches of 8, 8 and a short last one of 4
    x = rng.normal(size=(n, D)).astype("float32")
    y = rng.integers(0, K, size=n).astype("int32")
    y[:3] = 1  # several samples of one class in the first batch
    c0 = rng.normal(size=(K, D))
    if schedule:
        alpha = keras.optimizers.schedules.ExponentialDecay(
            0.5, decay_steps=1, decay_rate=0.5
        )
        alphas = [0.5 * 0.5**step for step in range(3)]
    else:
        alpha, alphas = 0.3, [0.3] * 3

    layer = CenterLoss(
        K, alpha=alpha, centers_initializer=keras.initializers.Constant(c0)
    )
    model = identity_feature_model(layer)
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        **MODES[mode],
    )
    model.fit([x, y], y, batch_size=batch_size, shuffle=False, verbose=0)

    expected = c0
    for step, part in enumerate(batches(n, batch_size)):
        expected = numpy_center_step(expected, x[part], y[part], alphas[step])
    assert not np.allclose(expected, c0)
    np.testing.assert_allclose(to_numpy(layer.centers), expected, rtol=1e-5, atol=1e-6)
    assert int(ops.convert_to_numpy(layer.iterations)) == 3

    # Centers move only in training.
    after_fit = to_numpy(layer.centers)
    model.evaluate([x, y], y, batch_size=batch_size, verbose=0)
    model.predict([x, y], batch_size=batch_size, verbose=0)
    np.testing.assert_array_equal(to_numpy(layer.centers), after_fit)
    assert int(ops.convert_to_numpy(layer.iterations)) == 3


def test_loss_gradient_reaches_features_only():
    """Only loss: lambda * L_C through features = x @ W; NumPy SGD reference.

    Checks the feature gradient lambda * (x_i - c_{y_i}) / B (the kernel
    moves by it), that the centers are not in the model's trainable weights,
    and that both use the pre-step values, over a short last batch too.
    """
    rng = np.random.default_rng(1)
    n, batch_size, lr, lam, alpha = 10, 4, 0.5, 0.7, 0.5
    x = rng.normal(size=(n, 5)).astype("float32")
    y = rng.integers(0, K, size=n).astype("int32")
    w = rng.normal(size=(5, D))
    c = rng.normal(size=(K, D))
    layer = CenterLoss(
        K,
        alpha=alpha,
        loss_weight=lam,
        centers_initializer=keras.initializers.Constant(c),
    )
    model = linear_feature_model(layer, w)
    assert all(v is not layer.centers for v in model.trainable_variables)
    model.compile(optimizer=keras.optimizers.SGD(lr))
    history = model.fit([x, y], batch_size=batch_size, shuffle=False, verbose=0)

    losses, sizes = [], []
    for part in batches(n, batch_size):
        xb, yb = x[part].astype(np.float64), y[part]
        f = xb @ w
        losses.append(lam * numpy_center_loss(c, f, yb))
        sizes.append(len(yb))
        grad_f = lam * (f - c[yb]) / len(yb)
        w = w - lr * xb.T @ grad_f
        c = numpy_center_step(c, f, yb, alpha)
    dense = next(l for l in model.layers if isinstance(l, keras.layers.Dense))
    np.testing.assert_allclose(dense.get_weights()[0], w, rtol=1e-5)
    np.testing.assert_allclose(to_numpy(layer.centers), c, rtol=1e-5, atol=1e-6)
    # Keras logs the batch-size-weighted mean of the per-batch losses.
    np.testing.assert_allclose(
        history.history["loss"][0], np.average(losses, weights=sizes), rtol=1e-5
    )


def test_loss_scale_does_not_depend_on_batch_size():
    rng = np.random.default_rng(2)
    layer = CenterLoss(K, loss_weight=0.5)
    features = rng.normal(size=(3, D)).astype("float32")
    labels = np.array([0, 2, 3])
    values = []
    for repeat in (1, 4):  # the same samples, batch of 3 then of 12
        layer([np.tile(features, (repeat, 1)), np.tile(labels, repeat)])
        values.append(float(ops.convert_to_numpy(layer.losses[0])))
    centers = to_numpy(layer.centers)
    expected = 0.5 * numpy_center_loss(centers, features, labels)
    np.testing.assert_allclose(values, [expected, expected], rtol=1e-5)
    np.testing.assert_allclose(
        float(ops.convert_to_numpy(layer.center_loss(features, labels))),
        expected / 0.5,
        rtol=1e-5,
    )


def test_label_forms_accepted():
    rng = np.random.default_rng(3)
    c = rng.normal(size=(K, D))
    features = rng.normal(size=(5, D)).astype("float32")
    labels = np.array([0, 1, 3, 3, 2])
    expected = numpy_center_loss(c, features, labels)
    for form in (
        labels.astype("int32"),
        labels.astype("int64"),
        labels.astype("float32"),
        labels.reshape(5, 1).astype("int32"),
        labels.reshape(5, 1).astype("float32"),
    ):
        layer = CenterLoss(K, centers_initializer=keras.initializers.Constant(c))
        value = layer.center_loss(ops.convert_to_tensor(features), ops.convert_to_tensor(form))
        np.testing.assert_allclose(float(ops.convert_to_numpy(value)), expected, rtol=1e-5)


def test_bad_inputs_raise_clear_errors():
    layer = CenterLoss(K, feat_dim=3)
    features = np.zeros((2, 5), "float32")
    with pytest.raises(ValueError, match=r"\(5, shape \(2, 5\)\).*feat_dim.*\(3"):
        layer([features, np.array([0, 1])])
    layer = CenterLoss(K)
    layer([np.zeros((2, 3), "float32"), np.array([0, 1])])  # builds D = 3
    with pytest.raises(ValueError, match="feature dimension"):
        layer([np.zeros((2, 4), "float32"), np.array([0, 1])])
    with pytest.raises(ValueError, match=r"labels.*\(2, 2\)"):
        layer([np.zeros((2, 3), "float32"), np.zeros((2, 2), "int32")])
    for shape in ((3,), (3, 1)):  # another batch size
        with pytest.raises(ValueError, match=r"labels.shape=\(3.*features.shape=\(2, 3\)"):
            layer([np.zeros((2, 3), "float32"), np.zeros(shape, "int32")])
    with pytest.raises(ValueError, match="num_classes"):
        CenterLoss(0)
    for alpha in (-1.0, 0.0, 5.0, True):  # (0, 1]: a larger step overshoots
        with pytest.raises(ValueError, match=r"`alpha`.*\(0, 1\]"):
            CenterLoss(K, alpha=alpha)


@pytest.mark.parametrize(
    "normalizer, divisor",
    [
        (GlobalCount(), lambda b: b),
        (LocalCount(), lambda b: b),
        # detectron2's EMA: momentum * ema + (1 - momentum) * count
        (EMACount(momentum=0.9, initial_value=40.0), lambda b: 0.9 * 40.0 + 0.1 * b),
    ],
    ids=["GlobalCount", "LocalCount", "EMACount"],
)
def test_center_loss_is_the_added_loss_over_loss_weight(normalizer, divisor):
    """`center_loss()` is `L_C` as the layer adds it: divided by the normalizer."""
    rng = np.random.default_rng(14)
    c = rng.normal(size=(K, D))
    x = rng.normal(size=(5, D)).astype("float32")
    y = np.array([0, 1, 3, 3, 2], "int32")
    layer = CenterLoss(K, loss_weight=0.3, normalizer=normalizer,
                       centers_initializer=keras.initializers.Constant(c))
    expected = numpy_center_loss(c, x, y) * len(y) / divisor(len(y))
    value = float(ops.convert_to_numpy(layer.center_loss(x, y)))
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    layer([x, y], training=False)
    added = float(ops.convert_to_numpy(layer.losses[0]))
    np.testing.assert_allclose(added, 0.3 * expected, rtol=1e-5)


@pytest.mark.parametrize("bad", [-1, K, 0.5], ids=["negative", "num_classes", "float"])
def test_invalid_label_gives_nan_center_loss_on_every_backend(bad):
    """`center_loss()` gives the same documented value as the loss in `fit`."""
    layer = CenterLoss(K)
    features = np.ones((3, D), "float32")
    labels = np.array([0, bad, 1], "float32")
    assert np.isnan(float(ops.convert_to_numpy(layer.center_loss(features, labels))))
    value = layer.center_loss(features, np.array([0, 3, 1], "float32"))
    assert np.isfinite(float(ops.convert_to_numpy(value)))


@pytest.mark.parametrize("bad", [-1, K, 0.5], ids=["negative", "num_classes", "float"])
def test_invalid_labels_in_fit_give_a_nan_loss_on_every_backend(bad):
    """Not silently ignored (TF, JAX) nor raising (torch): `loss: nan` everywhere."""
    rng = np.random.default_rng(4)
    n = 8
    x = rng.normal(size=(n, D)).astype("float32")
    y = np.array([0, 1, bad, 2, 3, 3, 1, 0], "float32")
    c0 = rng.normal(size=(K, D))
    layer = CenterLoss(K, alpha=0.5, centers_initializer=keras.initializers.Constant(c0))
    features = keras.Input((D,))
    labels = keras.Input((), dtype="float32")
    model = keras.Model([features, labels], layer([features, labels]))
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    history = model.fit([x, y], batch_size=n, verbose=0)
    assert np.isnan(history.history["loss"][0])
    valid = np.array([i != 2 for i in range(n)])
    np.testing.assert_allclose(  # the valid samples moved the centers
        to_numpy(layer.centers),
        numpy_center_step(c0, x[valid], y[valid].astype(int), 0.5),
        rtol=1e-5, atol=1e-6,
    )


def trainable_centers_model(seed, lr, alpha):
    """`(model, layer, x, y, c0)`: a `CenterLoss` with trainable centers, SGD(lr)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(6, D)).astype("float32")
    y = np.array([0, 0, 1, 3, 3, 3], "int32")
    c0 = rng.normal(size=(K, D))
    layer = CenterLoss(
        K,
        alpha=alpha,
        centers_trainable=True,
        centers_initializer=keras.initializers.Constant(c0),
    )
    features = keras.Input((D,))
    labels = keras.Input((), dtype="int32")
    model = keras.Model([features, labels], layer([features, labels]))
    model.compile(optimizer=keras.optimizers.SGD(lr))
    return model, layer, x, y, c0


def test_trainable_centers_opt_in_get_optimizer_step():
    n, lr, alpha = 6, 0.2, 0.5
    model, layer, x, y, c0 = trainable_centers_model(5, lr, alpha)
    assert any(v is layer.centers for v in model.trainable_variables)
    history = model.fit([x, y], batch_size=n, verbose=0)
    np.testing.assert_allclose(
        to_numpy(layer.centers),
        numpy_center_step(c0, x, y, lr * alpha),
        rtol=1e-5,
        atol=1e-6,
    )
    # The zero-valued surrogate term leaves the loss value alone.
    np.testing.assert_allclose(
        history.history["loss"][0], 0.01 * numpy_center_loss(c0, x, y), rtol=1e-5
    )


def test_trainable_centers_take_alpha_above_one_as_a_learning_rate_multiplier():
    """The report's set-up, the model at lr 0.05, the centers at 0.5.

    With `centers_trainable=True`, `alpha` multiplies the optimizer's learning
    rate, so centers at 0.5 beside a model at 0.05 need `alpha=10`: accepted,
    and each step moves the centers by `0.05 * 10` times the paper's step.
    """
    n, lr, alpha = 6, 0.05, 10.0
    model, layer, x, y, c0 = trainable_centers_model(29, lr, alpha)
    assert layer.alpha == 10.0
    model.fit([x, y], batch_size=n, epochs=2, verbose=0)  # two steps
    want = numpy_center_step(numpy_center_step(c0, x, y, lr * alpha), x, y, lr * alpha)
    np.testing.assert_allclose(to_numpy(layer.centers), want, rtol=1e-5, atol=1e-6)
    # The layer's own step keeps the paper's range.
    with pytest.raises(ValueError, match=r"`alpha`.*\(0, 1\].*received alpha=10"):
        CenterLoss(K, alpha=alpha)
    for bad in (0.0, -1.0, float("inf"), "10"):
        with pytest.raises(ValueError, match=r"`alpha` must be a float > 0"):
            CenterLoss(K, alpha=bad, centers_trainable=True)


def test_default_initializer_is_seed_kaiming_normal():
    layer = CenterLoss(50)
    layer.build([(None, 400), (None,)])
    c = to_numpy(layer.centers)
    assert c.shape == (50, 400)
    std = np.sqrt(2.0 / 50)  # torch kaiming_normal_ on centers.t(): fan_in = 50
    assert abs(c.std() / std - 1) < 0.03
    assert abs(c.mean()) < 0.01
    assert np.abs(c).max() > 3 * std  # untruncated


def test_identity_without_labels_and_inference_model():
    layer = CenterLoss(K)
    features = np.arange(6, dtype="float32").reshape(2, 3)
    np.testing.assert_array_equal(to_numpy(layer(features)), features)
    assert not layer.losses


def test_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(6)
    x = rng.normal(size=(8, D)).astype("float32")
    y = rng.integers(0, K, size=8).astype("int32")
    schedule = keras.optimizers.schedules.ExponentialDecay(0.5, 10, 0.9)
    layer = CenterLoss(K, alpha=schedule, loss_weight=0.02, name="center")
    model = identity_feature_model(layer)
    model.compile(
        optimizer="sgd",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit([x, y], y, batch_size=4, verbose=0)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    restored = loaded.get_layer("center")
    assert isinstance(restored, CenterLoss)
    np.testing.assert_array_equal(to_numpy(restored.centers), to_numpy(layer.centers))
    assert int(ops.convert_to_numpy(restored.iterations)) == 2
    assert restored.loss_weight == 0.02
    assert isinstance(restored.alpha, keras.optimizers.schedules.ExponentialDecay)
    assert restored.alpha.get_config() == schedule.get_config()
    np.testing.assert_allclose(
        to_numpy(loaded.predict([x, y], verbose=0)),
        to_numpy(model.predict([x, y], verbose=0)),
        rtol=1e-6,
    )
    # and it keeps training from the restored centers and step counter
    before = to_numpy(restored.centers)
    loaded.fit([x, y], y, batch_size=8, verbose=0)
    alpha = 0.5 * 0.9 ** (2 / 10)
    np.testing.assert_allclose(
        to_numpy(restored.centers),
        numpy_center_step(before, x, y, alpha),
        rtol=1e-5,
        atol=1e-6,
    )


# -------------------------------------------------------- PyTorch parity


def _torch_parity_setup():
    torch = pytest.importorskip("torch")
    from keras_batchfix.references.torch_center_loss import TorchCenterLoss

    return torch, TorchCenterLoss


def test_pytorch_parity_joint_training_20_steps():
    """The report's algorithm in PyTorch vs the Keras layer, from equal weights.

    20 SGD steps (the last batch short), cross-entropy + 0.01 * center loss.
    """
    torch, TorchCenterLoss = _torch_parity_setup()
    rng = np.random.default_rng(7)
    n_in, hidden, classes, feat = 6, 16, 5, 2
    batch_size, steps, lr, lam, alpha = 8, 20, 0.05, 0.01, 0.5
    n = batch_size * (steps - 1) + 5
    x = rng.normal(size=(n, n_in)).astype("float32")
    y = rng.integers(0, classes, size=n).astype("int32")
    w1 = rng.normal(scale=0.5, size=(n_in, hidden)).astype("float32")
    b1 = rng.normal(scale=0.1, size=hidden).astype("float32")
    w2 = rng.normal(scale=0.5, size=(hidden, feat)).astype("float32")
    b2 = rng.normal(scale=0.1, size=feat).astype("float32")
    w3 = rng.normal(scale=0.5, size=(feat, classes)).astype("float32")
    b3 = rng.normal(scale=0.1, size=classes).astype("float32")
    c0 = (rng.normal(size=(classes, feat)) * np.sqrt(2 / classes)).astype("float32")

    # PyTorch, as in the report's training loop.
    torch.manual_seed(0)
    net = torch.nn.ModuleDict(
        {
            "l1": torch.nn.Linear(n_in, hidden),
            "l2": torch.nn.Linear(hidden, feat),
            "l3": torch.nn.Linear(feat, classes),
        }
    )
    with torch.no_grad():
        for name, (w, b) in zip(("l1", "l2", "l3"), ((w1, b1), (w2, b2), (w3, b3))):
            net[name].weight.copy_(torch.from_numpy(w.T))
            net[name].bias.copy_(torch.from_numpy(b))
    center = TorchCenterLoss(classes, feat, centers=torch.from_numpy(c0))
    opt_net = torch.optim.SGD(net.parameters(), lr=lr)
    opt_center = center.make_optimizer(alpha)
    xent = torch.nn.CrossEntropyLoss()
    totals, center_values, sizes = [], [], []
    for part in batches(n, batch_size):
        xb = torch.from_numpy(x[part])
        yb = torch.from_numpy(y[part]).long()
        feats = net["l2"](torch.relu(net["l1"](xb)))
        logits = net["l3"](feats)
        c_loss = center(feats, yb)
        loss = xent(logits, yb) + lam * c_loss
        opt_net.zero_grad()
        opt_center.zero_grad()
        loss.backward()
        opt_net.step()
        opt_center.step()
        totals.append(loss.item())
        center_values.append(c_loss.item())
        sizes.append(len(yb))
    assert len(sizes) == steps and sizes[-1] == 5

    # Keras.
    images = keras.Input((n_in,))
    labels = keras.Input((), dtype="int32")
    d1 = keras.layers.Dense(hidden, activation="relu")
    d2 = keras.layers.Dense(feat)
    d3 = keras.layers.Dense(classes)
    layer = CenterLoss(
        classes,
        alpha=alpha,
        loss_weight=lam,
        centers_initializer=keras.initializers.Constant(c0),
    )
    logits = d3(layer([d2(d1(images)), labels]))
    model = keras.Model([images, labels], logits)
    for dense, (w, b) in zip((d1, d2, d3), ((w1, b1), (w2, b2), (w3, b3))):
        dense.set_weights([w, b])
    model.compile(
        optimizer=keras.optimizers.SGD(lr),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    running = []  # Keras logs the running (batch-size weighted) mean
    record = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: running.append(logs["loss"])
    )
    history = model.fit(
        [x, y], y, batch_size=batch_size, shuffle=False, verbose=0,
        callbacks=[record],
    )

    rel = dict(rtol=1e-4, atol=1e-6)
    torch_running = [
        np.average(totals[: k + 1], weights=sizes[: k + 1]) for k in range(steps)
    ]
    np.testing.assert_allclose(running, torch_running, **rel)
    np.testing.assert_allclose(history.history["loss"][0], torch_running[-1], **rel)
    if BACKEND != "jax":
        np.testing.assert_allclose(
            history.history[f"{layer.name}_value"][0],
            np.average(center_values, weights=sizes),
            **rel,
        )
    np.testing.assert_allclose(
        to_numpy(layer.centers), center.centers.detach().numpy(), **rel
    )
    for dense, name in zip((d1, d2, d3), ("l1", "l2", "l3")):
        kernel, bias = dense.get_weights()
        np.testing.assert_allclose(kernel, net[name].weight.detach().numpy().T, **rel)
        np.testing.assert_allclose(bias, net[name].bias.detach().numpy(), **rel)
    # The run must have moved everything noticeably (the test can fail).
    assert np.abs(to_numpy(layer.centers) - c0).max() > 0.05
    assert np.abs(d2.get_weights()[0] - w2).max() > 1e-3


def test_mixed_precision_keeps_labels_and_loss_in_float32():
    """Under a float16 compute policy, float labels > 2048 stay exact."""
    rng = np.random.default_rng(8)
    classes = 3000
    c = rng.normal(size=(classes, D))
    layer = CenterLoss(
        classes,
        dtype="mixed_float16",
        centers_initializer=keras.initializers.Constant(c),
    )
    features = rng.normal(size=(2, D)).astype("float16")
    labels = np.array([2049.0, 2051.0], "float32")  # not float16-representable
    out = layer([ops.convert_to_tensor(features), ops.convert_to_tensor(labels)])
    assert ops.convert_to_numpy(out).dtype == np.float16
    assert layer.centers.dtype == "float32"
    value = float(ops.convert_to_numpy(layer.losses[0]))
    expected = 0.01 * numpy_center_loss(c, features, labels.astype(int))
    np.testing.assert_allclose(value, expected, rtol=1e-4)


def test_torch_reference_matches_numpy_rule_and_gradient():
    """The PyTorch reference itself: one step against the NumPy formulas."""
    torch, TorchCenterLoss = _torch_parity_setup()
    rng = np.random.default_rng(9)
    c0 = rng.normal(size=(K, D))
    x = rng.normal(size=(6, D))
    y = np.array([0, 0, 2, 3, 3, 3])
    lam, alpha = 0.3, 0.5
    center = TorchCenterLoss(K, D, centers=torch.from_numpy(c0))
    features = torch.from_numpy(x).requires_grad_(True)
    loss = lam * center(features, torch.from_numpy(y))
    loss.backward()
    center.make_optimizer(alpha).step()
    np.testing.assert_allclose(loss.item(), lam * numpy_center_loss(c0, x, y))
    np.testing.assert_allclose(features.grad.numpy(), lam * (x - c0[y]) / len(y))
    np.testing.assert_allclose(
        center.centers.detach().numpy(), numpy_center_step(c0, x, y, alpha)
    )
    with pytest.raises(ValueError, match="dimension"):
        center(torch.zeros(2, D + 1, dtype=torch.float64), torch.tensor([0, 1]))


def test_training_call_moves_centers_unless_frozen():
    rng = np.random.default_rng(11)
    c0 = rng.normal(size=(K, D))
    x = rng.normal(size=(5, D)).astype("float32")
    y = np.array([1, 1, 0, 3, 1], "int32")
    layer = CenterLoss(K, alpha=0.4, centers_initializer=keras.initializers.Constant(c0))
    layer([x, y], training=False)
    np.testing.assert_array_equal(to_numpy(layer.centers), c0.astype("float32"))
    layer([x, y], training=True)  # an eager training call updates
    np.testing.assert_allclose(
        to_numpy(layer.centers), numpy_center_step(c0, x, y, 0.4), rtol=1e-5, atol=1e-6
    )
    layer.trainable = False  # frozen: no update, no step
    before = to_numpy(layer.centers)
    layer([x, y], training=True)
    np.testing.assert_array_equal(to_numpy(layer.centers), before)
    assert int(ops.convert_to_numpy(layer.iterations)) == 1


def test_scale_free_loss_unchanged_when_features_scaled():
    """`scale_free=True`: L_C on x / ||x||, so scaling the features (by one
    factor or per sample) changes neither the loss, nor the added loss, nor
    the center step; the relative metric is L_C / mean ||x^||^2 = L_C."""
    rng = np.random.default_rng(12)
    c0 = rng.normal(size=(K, D)) * 0.5
    x = rng.normal(size=(6, D)).astype("float32")
    y = np.array([0, 1, 1, 3, 2, 0], "int32")
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    expected = numpy_center_loss(c0, unit, y)
    init = keras.initializers.Constant(c0)
    scales = (1.0, 1e-3, 7.5, 1e3, rng.uniform(0.1, 10.0, size=(6, 1)))
    for s in scales:
        xs = (x * s).astype("float32")
        layer = CenterLoss(K, alpha=0.3, loss_weight=0.2, scale_free=True,
                           centers_initializer=init)
        value = float(ops.convert_to_numpy(layer.center_loss(xs, y)))
        np.testing.assert_allclose(value, expected, rtol=1e-5)
        out = layer([xs, y], training=True)
        np.testing.assert_array_equal(to_numpy(out), xs)  # raw features out
        added = float(ops.convert_to_numpy(layer.losses[0]))
        np.testing.assert_allclose(added, 0.2 * expected, rtol=1e-5)
        np.testing.assert_allclose(
            to_numpy(layer.centers), numpy_center_step(c0, unit, y, 0.3),
            rtol=1e-5, atol=1e-6,
        )
        if layer.tracker is not None:  # not on JAX
            np.testing.assert_allclose(
                float(ops.convert_to_numpy(
                    layer.tracker.result()[f"{layer.name}_relative"]
                )),
                expected, rtol=1e-5,
            )
    # the default (seed) loss does scale with ||x||^2
    plain = CenterLoss(K, centers_initializer=init)
    a = float(ops.convert_to_numpy(plain.center_loss(x, y)))
    b = float(ops.convert_to_numpy(plain.center_loss(10 * x, y)))
    assert b > 20 * a
    config = CenterLoss(K, scale_free=True).get_config()
    assert config["scale_free"] is True
    assert CenterLoss.from_config(config).scale_free is True


def test_no_layer_metric_on_jax_and_none_logged():
    """JAX's `fit` would drop a layer metric's updates: the layer has none."""
    layer = CenterLoss(K)
    features = keras.Input((D,))
    labels = keras.Input((), dtype="int32")
    model = keras.Model([features, labels], layer([features, labels]))
    model.compile(optimizer="sgd")
    x, y = np.ones((4, D), "float32"), np.array([0, 1, 2, 3], "int32")
    history = model.fit([x, y], batch_size=2, verbose=0)
    logged = f"{layer.name}_value" in history.history
    assert logged == (BACKEND != "jax")
    assert (layer.tracker is None) == (BACKEND == "jax")


def test_relative_metric_is_loss_over_mean_squared_norm():
    if BACKEND == "jax":
        pytest.skip("no layer metric on JAX (test_no_layer_metric_on_jax_and_none_logged)")
    rng = np.random.default_rng(13)
    c0 = rng.normal(size=(K, D))
    x = rng.normal(size=(5, D)).astype("float32")
    y = np.array([0, 1, 2, 3, 3], "int32")
    layer = CenterLoss(K, centers_initializer=keras.initializers.Constant(c0))
    layer([x, y], training=False)
    expected = numpy_center_loss(c0, x, y) / np.mean(np.sum(x ** 2, axis=1))
    results = layer.tracker.result()
    np.testing.assert_allclose(
        float(ops.convert_to_numpy(results[f"{layer.name}_relative"])),
        expected, rtol=1e-5,
    )
    np.testing.assert_allclose(
        float(ops.convert_to_numpy(results[f"{layer.name}_value"])),
        numpy_center_loss(c0, x, y), rtol=1e-5,
    )
