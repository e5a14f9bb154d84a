"""Exact gradient accumulation: per-sample weights from a look-ahead over windows.

With `gradient_accumulation_steps=k` a Keras 3 optimizer adds up the
gradients of `k` micro-batches and applies their *mean* (sum / k,
keras/src/optimizers/base_optimizer.py, Keras 3.12 to 3.15). A loss
normalized by its micro-batch's count `C_m` then trains on

    (1 / k) * sum over micro-batches m of (numerator_m / C_m)

instead of the loss of their concatenation, `sum_m numerator_m / C_W` with
`C_W = sum_m C_m`: boxes (or tokens, or samples) of a micro-batch with a
small count weigh more. A plain Keras mean loss has the same bug in the
window that holds the epoch's short batch (6 and 4 samples averaged with
equal weights).

`window_weights` knows each window's count before its first micro-step:
from per-sample counts (positives per image, tokens per sequence, 1 per
sample for a mean) it gives every sample of micro-batch `m` of window `W`

    w_i = k * max(1, C_m) / max(1, C_W)

Passed as `sample_weight`, it turns each micro-batch's loss
`sum_i w_i numerator_i / max(1, C_m)` into `k * sum_i numerator_i / max(1, C_W)`,
and Keras's mean over the `k` micro-steps into the window's loss: exact, on
every backend, for every loss that multiplies its numerator by
`sample_weight` and divides by a count that is the sum of per-sample counts
(`SSDMultiboxLoss`, `compensate(..., count=...)` with `LocalCount` or, on one
device, `GlobalCount`, Keras's `"sum_over_batch_size"` losses with counts of
1 per sample). `CenterLoss` moves its centers itself: give it
`accumulation_steps=k` and the weights as a third input.
"""

import numpy as np


def window_weights(counts, batch_size, steps):
    """Per-sample weights that make `gradient_accumulation_steps` exact.

        w_i = steps * max(1, C_m) / max(1, C_W)

    `C_m` is the sum of `counts` over sample `i`'s micro-batch (consecutive
    slices of `batch_size`, as `fit(..., batch_size=batch_size,
    shuffle=False)` makes them) and `C_W` over its window of `steps`
    micro-batches. The number of micro-batches must be a multiple of
    `steps`: Keras's accumulation windows run on across epochs, and a window
    straddling two epochs cannot be one batch of either.

    Args:
        counts: per-sample counts, shape `(N,)` (NumPy-convertible, >= 0).
        batch_size: the micro-batch size passed to `fit`.
        steps: the optimizer's `gradient_accumulation_steps`.

    Returns:
        float32 weights of shape `(N,)`, to pass as `sample_weight` (times
        your own sample weights, if any).

    Example:

    ```python
    positives = y[..., 1:].max(-1).sum(-1)  # positive anchors per image
    model.compile(keras.optimizers.SGD(0.1, gradient_accumulation_steps=2),
                  keras_batchfix.SSDMultiboxLoss(21, mining="per_image"))
    model.fit(x, y, batch_size=6, shuffle=False,
              sample_weight=window_weights(positives, 6, steps=2))
    ```
    """
    counts = np.asarray(counts, dtype="float64")
    if counts.ndim != 1 or (counts < 0).any() or not np.isfinite(counts).all():
        raise ValueError(
            "Argument `counts` must be finite counts >= 0 of shape (N,); "
            f"received shape {counts.shape}."
        )
    for name, value in (("batch_size", batch_size), ("steps", steps)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
                or value < 1:
            raise ValueError(
                f"Argument `{name}` must be an integer >= 1; received "
                f"{name}={value!r}."
            )
    micro_batches = -(-len(counts) // batch_size)
    if micro_batches % steps:
        raise ValueError(
            f"{len(counts)} samples in micro-batches of {batch_size} make "
            f"{micro_batches} micro-batches, not a multiple of steps={steps}: "
            "Keras's accumulation windows would straddle epochs. Pass a number "
            f"of samples that makes a multiple of {steps} micro-batches."
        )
    batch_of = np.arange(len(counts)) // batch_size
    window_of = batch_of // steps
    batch_count = np.bincount(batch_of, counts)[batch_of]
    window_count = np.bincount(window_of, counts)[window_of]
    weights = steps * np.maximum(batch_count, 1.0) / np.maximum(window_count, 1.0)
    return weights.astype("float32")
