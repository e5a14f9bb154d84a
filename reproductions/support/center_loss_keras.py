"""Keras side of the center-loss reproduction, with `keras_batchfix.CenterLoss`.

The PyTorch experiment of `center_loss_torch.run` written in Keras 3: the
same data arrays, the same ImageNet-style ResNet (up to the padding
alignment of the 3x3/2 max-pool), SGD with momentum and a
`PiecewiseConstantDecay` schedule, and weight decay as an L2 penalty
`wd/2 * ||w||^2` on every weight (its gradient `wd * w` goes through
momentum, as `torch.optim.SGD(weight_decay=wd)`). The center loss is
`keras_batchfix.CenterLoss(10, alpha, loss_weight=lambda)`; `l2norm` is
`CenterLoss(..., scale_free=True)` and `alpha_sched` passes the LR schedule's
shape as `alpha`.
"""

import math
import time

import numpy as np

from . import center_loss_torch as T

KERAS_VARIANTS = ("relu", "prelu", "alpha_sched", "l2norm")


def build(variant, width, blocks, weight_decay, lamb, alpha, steps, epochs,
          lr, momentum):
    import keras
    from keras import layers

    from keras_batchfix import CenterLoss

    act = "prelu" if variant == "prelu" else "relu"
    reg = keras.regularizers.L2(weight_decay / 2) if weight_decay else None
    conv_init = keras.initializers.VarianceScaling(2.0, "fan_out",
                                                   "untruncated_normal")
    dense_init = keras.initializers.VarianceScaling(1 / 3, "fan_in", "uniform")

    def conv(x, filters, k, stride):
        if k > 1:
            x = layers.ZeroPadding2D(k // 2)(x)
        return layers.Conv2D(filters, k, stride, use_bias=False,
                             kernel_initializer=conv_init,
                             kernel_regularizer=reg)(x)

    def bn(x):
        return layers.BatchNormalization(momentum=0.9, epsilon=1e-5,
                                         gamma_regularizer=reg,
                                         beta_regularizer=reg)(x)

    def activation(x):
        if act == "prelu":  # torch.nn.PReLU(): one slope, 0.25
            return layers.PReLU(keras.initializers.Constant(0.25),
                                alpha_regularizer=reg,
                                shared_axes=[1, 2, 3])(x)
        return layers.ReLU()(x)

    images = keras.Input((32, 32, 1), name="images")
    labels = keras.Input((), dtype="int32", name="labels")
    x = activation(bn(conv(images, width, 7, 2)))
    x = layers.MaxPooling2D(3, 2, padding="same")(x)
    cin = width
    for i, cout in enumerate((width, 2 * width, 4 * width, 8 * width)):
        for j in range(blocks):
            stride = 2 if i and not j else 1
            out = activation(bn(conv(x, cout, 3, stride)))
            out = bn(conv(out, cout, 3, 1))
            sc = x if stride == 1 and cin == cout else bn(conv(x, cout, 1,
                                                                stride))
            x = activation(layers.Add()([out, sc]))
            cin = cout
    feat = layers.GlobalAveragePooling2D(name="features")(x)

    d1, d2 = T.decay_epochs(epochs)
    # PiecewiseConstantDecay uses values[k] while step <= boundaries[k]; the
    # first step of epoch d (0-based) is iteration d * steps.
    bounds = [d1 * steps - 1, d2 * steps - 1]
    lr_sched = keras.optimizers.schedules.PiecewiseConstantDecay(
        bounds, [lr, lr * 0.5, lr * 0.1])
    center_alpha = alpha
    if variant == "alpha_sched":
        center_alpha = keras.optimizers.schedules.PiecewiseConstantDecay(
            bounds, [alpha, alpha * 0.5, alpha * 0.1])
    center = CenterLoss(T.NUM_CLASSES, alpha=center_alpha, loss_weight=lamb,
                        scale_free=variant == "l2norm", name="center_loss")
    logits = layers.Dense(T.NUM_CLASSES, kernel_initializer=dense_init,
                          bias_initializer=dense_init, kernel_regularizer=reg,
                          bias_regularizer=reg)(center([feat, labels]))
    model = keras.Model([images, labels], logits)
    model.compile(
        optimizer=keras.optimizers.SGD(lr_sched, momentum=momentum),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalCrossentropy(
            from_logits=True, name="ce")],
        jit_compile=False)
    return model, center


def run(variant="relu", epochs=24, lr=0.05, momentum=0.9, weight_decay=5e-4,
        lamb=0.01, alpha=0.5, batch_size=64, width=64, blocks=2, seed=0,
        data=None, n_train=2400, label_noise=0.2, aug=False, n_eval=1000,
        log=print):
    """Train one variant with Keras; the same per-epoch rows as `T.run`."""
    import keras

    if variant not in KERAS_VARIANTS:
        raise ValueError(f"Keras variants: {KERAS_VARIANTS}; got {variant!r}")
    keras.utils.set_random_seed(seed)
    if data is None:
        data = T.load_splits(n_train, label_noise, noise_seed=seed)
    xtr = np.transpose(data["train"][0], (0, 2, 3, 1))  # NCHW -> NHWC
    xva = np.transpose(data["val"][0], (0, 2, 3, 1))
    ytr, yva = data["train"][1].astype("int32"), data["val"][1].astype("int32")
    steps = math.ceil(len(ytr) / batch_size)
    model, center = build(variant, width, blocks, weight_decay, lamb, alpha,
                             steps, epochs, lr, momentum)
    feat_model = keras.Model(model.inputs[0],
                             model.get_layer("features").output)
    fc = model.layers[-1]
    rng = np.random.RandomState(seed)
    xev, yev = xtr[:n_eval], ytr[:n_eval]
    rows = []
    for epoch in range(epochs):
        t0 = time.time()
        f = T.lr_factor(epoch, epochs)
        x_ep = _augment_np(xtr, rng) if aug else xtr
        hist = model.fit([x_ep, ytr], ytr, batch_size=batch_size, epochs=1,
                         shuffle=True, verbose=0).history
        row = {"epoch": epoch + 1, "lr": lr * f,
               "alpha": alpha * (f if variant == "alpha_sched" else 1.0),
               "train_ce": hist["ce"][-1],
               "train_center": hist.get("center_loss_value", [math.nan])[-1],
               "train_relative": hist.get("center_loss_relative",
                                          [math.nan])[-1]}
        cen = keras.ops.convert_to_numpy(center.centers)
        for prefix, xs, ys in (("tr_", xev, yev), ("val_", xva, yva)):
            fs = np.concatenate([
                keras.ops.convert_to_numpy(feat_model(xs[i:i + 500],
                                                      training=False))
                for i in range(0, len(xs), 500)])
            lg = keras.ops.convert_to_numpy(fc(fs))
            cfs = fs / np.maximum(np.linalg.norm(fs, axis=1, keepdims=True),
                                  1e-6) if variant == "l2norm" else fs
            row.update(T.decompose(cfs, ys, cen, prefix))
            row[prefix + "raw_sq"] = float((fs.astype(np.float64) ** 2)
                                           .sum(1).mean())
            row[prefix + "dead"] = float((np.abs(fs).max(0) == 0).mean())
            lg = lg - lg.max(1, keepdims=True)
            logp = lg - np.log(np.exp(lg).sum(1, keepdims=True))
            row[prefix + "ce_eval"] = float(-logp[np.arange(len(ys)), ys]
                                            .mean())
            row[prefix + "acc"] = float((lg.argmax(1) == ys).mean())
        row["val_ce"] = row.pop("val_ce_eval")
        row["center_norm"] = float(np.linalg.norm(cen, axis=1).mean())
        row["sec"] = time.time() - t0
        rows.append(row)
        log(T.format_row("keras", variant, epochs, row))
    return rows


def _augment_np(x, rng, shift=3):
    """NHWC version of `T.augment`: random flip and shift up to `shift` px."""
    b, h, w = x.shape[:3]
    flip = rng.rand(b) < 0.5
    x = np.where(flip[:, None, None, None], x[:, :, ::-1], x)
    xp = np.pad(x, ((0, 0), (shift, shift), (shift, shift), (0, 0)),
                constant_values=float(x.min()))
    dx = rng.randint(0, 2 * shift + 1, b)
    dy = rng.randint(0, 2 * shift + 1, b)
    return np.stack([xp[i, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
                     for i in range(b)]).astype(np.float32)
