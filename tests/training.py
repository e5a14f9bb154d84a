"""Models trained with `fit`, optionally under a tf.distribute strategy."""

import contextlib

import keras
from keras import ops

from keras_batchfix import CenterLoss


def _scope(strategy):
    return strategy.scope() if strategy is not None else contextlib.nullcontext()


def fit_dense(loss, x, y, kernel, bias, batch_size, epochs, lr=0.05, momentum=0.9,
              strategy=None):
    """Trains `Dense` from `(kernel, bias)` with SGD; returns the final weights."""
    with _scope(strategy):
        inputs = keras.Input(x.shape[1:])
        dense = keras.layers.Dense(kernel.shape[-1])
        model = keras.Model(inputs, dense(inputs))
        dense.set_weights([kernel, bias])
        model.compile(optimizer=keras.optimizers.SGD(lr, momentum=momentum), loss=loss)
    model.fit(x, y, batch_size=batch_size, epochs=epochs, shuffle=False, verbose=0)
    return [ops.convert_to_numpy(w) for w in dense.weights]


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
    with _scope(strategy):
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
