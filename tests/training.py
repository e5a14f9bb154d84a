"""One Dense layer trained with `fit`, optionally under a tf.distribute strategy."""

import contextlib

import keras
from keras import ops

from keras_batchfix import EMACount, attach_normalizers

# `mode` of `dense_model`: (run_eagerly, jit_compile) for `compile`.
MODES = {
    "auto": (False, "auto"),
    "eager": (True, False),
    "compiled": (False, False),
    "xla": (False, True),  # `jax.jit` on JAX
}


def dense_model(loss, input_shape, kernel, bias, optimizer, strategy=None,
                mode="auto"):
    """A compiled `Dense` from `(kernel, bias)`, its EMACount attached."""
    scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
    run_eagerly, jit_compile = MODES[mode]
    with scope:
        inputs = keras.Input(input_shape)
        dense = keras.layers.Dense(kernel.shape[-1])
        model = keras.Model(inputs, dense(inputs))
        dense.set_weights([kernel, bias])
        model.compile(
            optimizer=optimizer(), loss=loss, run_eagerly=run_eagerly,
            jit_compile=jit_compile,
        )
    if isinstance(getattr(loss, "normalizer", None), EMACount):
        attach_normalizers(model)
    return model


def fit_dense(loss, x, y, kernel, bias, batch_size, epochs, lr=0.05, momentum=0.9,
              strategy=None):
    """Trains `Dense` from `(kernel, bias)` with SGD; returns the final weights."""
    model = dense_model(
        loss, x.shape[1:], kernel, bias,
        lambda: keras.optimizers.SGD(lr, momentum=momentum), strategy,
    )
    model.fit(x, y, batch_size=batch_size, epochs=epochs, shuffle=False, verbose=0)
    return [ops.convert_to_numpy(w) for w in model.weights]
