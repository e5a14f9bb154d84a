"""Argument checks shared by `diagnose` and `diagnose_model`."""

import keras
import numpy as np

from keras_batchfix import _validation


def check_verbose(verbose):
    """A named error unless `verbose` is 0 or 1 (Keras's convention)."""
    if verbose not in (0, 1):
        raise ValueError(f"Argument `verbose` must be 0 or 1; received {verbose!r}.")


def check_repeats(repeats):
    """The sorted distinct tiling factors; a named error unless two or more >= 1."""
    try:
        factors = sorted({_validation.integer("repeats", k, 1) for k in repeats})
    except (TypeError, ValueError):
        factors = []
    if len(factors) < 2:
        raise ValueError(
            "Argument `repeats` must be two or more distinct integers >= 1 "
            f"(tiling factors, e.g. (1, 2, 4)); received repeats={repeats!r}."
        )
    return factors


def check_steps(accumulation_steps):
    """`accumulation_steps` as an int; a named error unless an integer >= 2."""
    return _validation.integer("accumulation_steps", accumulation_steps, 2)


def check_replicas(num_replicas):
    """`num_replicas` as an int; a named error unless an integer >= 2."""
    return _validation.integer("num_replicas", num_replicas, 2)


def as_array(x, name):
    """`x` as one NumPy array with a batch axis; a named error otherwise."""
    if isinstance(x, (list, tuple, dict)):
        raise ValueError(
            f"`{name}` must be one array (single-output models); received a "
            f"{type(x).__name__}."
        )
    x = np.asarray(keras.ops.convert_to_numpy(x))
    if x.ndim == 0:
        raise ValueError(f"`{name}` must have a batch axis; received a scalar.")
    return x
