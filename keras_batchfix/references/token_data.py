"""Padded token sequences for the accumulation tests and reproduction (NumPy)."""

import numpy as np

VOCAB, LENGTH, SEQUENCES = 50, 12, 124


def token_data(seed=0):
    """`(x, y)`: 124 sequences of 3..12 tokens in 1..49, padded with 0 to 12.

    `y` is the next token; the last valid token predicts 0, the end of the
    sequence.
    """
    rng = np.random.default_rng(seed)
    x = np.zeros((SEQUENCES, LENGTH), "int32")
    for row, length in enumerate(rng.integers(3, LENGTH + 1, SEQUENCES)):
        x[row, :length] = rng.integers(1, VOCAB, length)
    y = np.roll(x, -1, axis=1)
    y[:, -1] = 0
    return x, y
