"""Checks of numeric arguments, shared so that every message reads alike.

"Argument `x` must be <what>; received x=<value>." A number is a Python
`int` or `float` or a NumPy real scalar (`np.float32(0.9)`, `np.int64(3)`),
never a `bool` or a string; it must be finite. Each check returns the value
as a plain `float` or `int`. Also the losses' `sample_weight` length check.
NumPy only, no Keras: `spikes/analysis.py` loads this module by its path.
"""

import math
import numbers

import numpy as np


def is_real(value):
    """Whether `value` is a real number: Python or NumPy, not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _fail(name, value, wanted):
    raise ValueError(f"Argument `{name}` must be {wanted}; received {name}={value!r}.")


def real(name, value, wanted, valid=lambda v: True):
    """`value` as a float if it is a finite real number with `valid(value)`.

    `wanted` says what was wanted, e.g. `"a float >= 0"`; otherwise a
    `ValueError` names `name`, `value` and `wanted`.
    """
    if is_real(value) and math.isfinite(value) and valid(float(value)):
        return float(value)
    _fail(name, value, wanted)


def integer(name, value, minimum, wanted=None):
    """`value` as an int if it is an integer (or integer-valued float) >= `minimum`."""
    if (
        is_real(value)
        and math.isfinite(value)
        and int(value) == value
        and value >= minimum
    ):
        return int(value)
    _fail(name, value, wanted or f"an integer >= {minimum}")


def _static_shape(value):
    """The shape of an array, tensor or nested list (None entries unknown), or None."""
    try:
        shape = value.shape if hasattr(value, "shape") else np.shape(value)
        return tuple(None if d is None else int(d) for d in shape)
    except (TypeError, ValueError):  # unknown rank (a TensorFlow graph)
        return None


def check_sample_weight(loss_name, sample_weight, y_pred):
    """A `ValueError` for a `sample_weight` whose length is not the batch size.

    Checked where both lengths are static (eager calls, JAX and torch
    always): the weights' first axis must be `y_pred`'s (or 1, which
    broadcasts), as Keras's losses would otherwise fail with a backend's
    raw shape error.
    """
    if sample_weight is None:
        return
    weights, predictions = _static_shape(sample_weight), _static_shape(y_pred)
    if not weights or not predictions:  # scalar weights broadcast
        return
    batch, length = predictions[0], weights[0]
    if batch is None or length is None or length in (batch, 1):
        return
    raise ValueError(
        f"Argument `sample_weight` of loss {loss_name!r} must have one weight "
        f"per sample: shape ({batch},) (or ({batch}, ...)) for y_pred of shape "
        f"{predictions}; received sample_weight of shape {weights}."
    )
