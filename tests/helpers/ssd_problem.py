"""A small SSD problem whose images hold 0 to 6 positives, so replicas see different counts."""

import numpy as np

from keras_batchfix.references.ssd_data import random_batch

NUM_CLASSES = 4


def ssd_problem(seed, size):
    """Images with 0 to 6 positives each, so replicas see different counts."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(size, 20, 5)).astype("float32")
    y_true, _ = random_batch(rng, size, 20, NUM_CLASSES, positive_fraction=0.0)
    for image in range(size):
        positives = rng.integers(0, 7)
        y_true[image, :positives, :NUM_CLASSES] = np.eye(NUM_CLASSES)[
            rng.integers(1, NUM_CLASSES, positives)
        ]
    kernel = rng.normal(scale=0.3, size=(5, NUM_CLASSES + 4)).astype("float32")
    return x, y_true, kernel, np.zeros(NUM_CLASSES + 4, "float32")
