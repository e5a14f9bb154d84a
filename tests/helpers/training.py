"""Models trained with `fit`, optionally under a tf.distribute strategy."""

import contextlib

import keras
from keras import ops

import keras_batchfix
from keras_batchfix import CenterLoss, EMACount

# `mode` of `dense_model`: (run_eagerly, jit_compile) for `compile`.
MODES = {
    "auto": (False, "auto"),
    "eager": (True, False),
    "compiled": (False, False),
    "xla": (False, True),  # `jax.jit` on JAX
}


def dense_model(loss, input_shape, kernel, bias, optimizer, strategy=None,
                mode="auto"):
    """A compiled `Dense` from `(kernel, bias)`.

    A `keras_batchfix.Model` when the loss has an `EMACount`, else a
    `keras.Model`.
    """
    run_eagerly, jit_compile = MODES[mode]
    with strategy_scope(strategy):
        inputs = keras.Input(input_shape)
        dense = keras.layers.Dense(kernel.shape[-1])
        model_class = (
            keras_batchfix.Model
            if isinstance(getattr(loss, "normalizer", None), EMACount)
            else keras.Model
        )
        model = model_class(inputs, dense(inputs))
        dense.set_weights([kernel, bias])
        model.compile(
            optimizer=optimizer(), loss=loss, run_eagerly=run_eagerly,
            jit_compile=jit_compile,
        )
    return model


def strategy_scope(strategy):
    """`strategy.scope()`, or no scope for `None`."""
    return strategy.scope() if strategy is not None else contextlib.nullcontext()


def fit_dense(loss, x, y, kernel, bias, batch_size, epochs, lr=0.05, momentum=0.9,
              strategy=None):
    """Trains `Dense` from `(kernel, bias)` with SGD; returns the final weights."""
    model = dense_model(
        loss, x.shape[1:], kernel, bias,
        lambda: keras.optimizers.SGD(lr, momentum=momentum), strategy,
    )
    model.fit(x, y, batch_size=batch_size, epochs=epochs, shuffle=False, verbose=0)
    return [ops.convert_to_numpy(w) for w in model.weights]


def fit_dense_cases(cases, strategy=None):
    """`{name: (loss, (x, y, kernel, bias))}` -> `{name: final weights}`.

    2 epochs in batches of 8.
    """
    return {
        name: fit_dense(loss, *problem, batch_size=8, epochs=2, strategy=strategy)
        for name, (loss, problem) in cases.items()
    }


def fit_center_loss(x, y, w, c, batch_size, lr, lam, alpha, strategy=None):
    """Features `x @ W` (no bias) into `CenterLoss`, one epoch of SGD.

    Returns the `Dense` layer, the `CenterLoss` layer and the history.
    """
    with strategy_scope(strategy):
        inputs = keras.Input(x.shape[1:])
        labels = keras.Input((), dtype="int32")
        dense = keras.layers.Dense(w.shape[1], use_bias=False)
        layer = CenterLoss(
            len(c),
            alpha=alpha,
            loss_weight=lam,
            centers_initializer=keras.initializers.Constant(c),
        )
        model = keras.Model([inputs, labels], layer([dense(inputs), labels]))
        dense.set_weights([w.astype("float32")])
        model.compile(optimizer=keras.optimizers.SGD(lr))
    history = model.fit([x, y], batch_size=batch_size, shuffle=False, verbose=0)
    return dense, layer, history


def batch_loss(model, x, y, sample_weight=None):
    """The model's loss on one batch `(x, y)`, metrics reset first.

    (`test_on_batch` keeps a running mean across calls in Keras 3.8.)
    """
    return model.evaluate(
        x, y, sample_weight=sample_weight, batch_size=len(x), verbose=0
    )
