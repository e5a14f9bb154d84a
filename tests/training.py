"""One Dense layer trained with `fit`, optionally under a tf.distribute strategy."""

import contextlib

import keras
from keras import ops


def fit_dense(loss, x, y, kernel, bias, batch_size, epochs, lr=0.05, momentum=0.9,
              strategy=None):
    """Trains `Dense` from `(kernel, bias)` with SGD; returns the final weights."""
    scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
    with scope:
        inputs = keras.Input(x.shape[1:])
        dense = keras.layers.Dense(kernel.shape[-1])
        model = keras.Model(inputs, dense(inputs))
        dense.set_weights([kernel, bias])
        model.compile(optimizer=keras.optimizers.SGD(lr, momentum=momentum), loss=loss)
    model.fit(x, y, batch_size=batch_size, epochs=epochs, shuffle=False, verbose=0)
    return [ops.convert_to_numpy(w) for w in dense.weights]
