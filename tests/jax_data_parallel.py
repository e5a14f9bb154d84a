"""Trains on one JAX CPU device and under `DataParallel` over two; prints the gap.

Run as `python -m tests.jax_data_parallel` (the test does): the two host
devices must be configured before JAX starts, hence a process of its own.
"""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["KERAS_BACKEND"] = "jax"

import json  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_batchfix import (  # noqa: E402
    EMACount,
    GlobalCount,
    LocalCount,
    SSDMultiboxLoss,
)
from tests.test_normalizers import NUM_CLASSES, ssd_problem  # noqa: E402
from tests.training import fit_dense  # noqa: E402

# Factories: an EMACount's state must start afresh in every run.
LOSSES = {
    "batch mining, LocalCount": lambda: SSDMultiboxLoss(
        NUM_CLASSES, from_logits=True, normalizer=LocalCount()
    ),
    "per-image mining, GlobalCount": lambda: SSDMultiboxLoss(
        NUM_CLASSES, from_logits=True, mining="per_image", normalizer=GlobalCount()
    ),
    "per-image mining, EMACount": lambda: SSDMultiboxLoss(
        NUM_CLASSES, from_logits=True, mining="per_image", normalizer=EMACount()
    ),
}


def main():
    # 32 images in batches of 8: DataParallel needs batches that split evenly
    # (JAX raises IndivisibleError on a last batch of odd size).
    x, y, kernel, bias = ssd_problem(1, 32)
    single = {
        name: fit_dense(loss(), x, y, kernel, bias, batch_size=8, epochs=2)
        for name, loss in LOSSES.items()
    }
    devices = keras.distribution.list_devices("cpu")
    assert len(devices) == 2, devices
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
    gaps = {}
    for name, loss in LOSSES.items():
        parallel = fit_dense(loss(), x, y, kernel, bias, batch_size=8, epochs=2)
        gaps[name] = {
            "max_abs_gap": max(
                float(np.abs(a - b).max()) for a, b in zip(parallel, single[name])
            ),
            "max_abs_change": float(np.abs(single[name][0] - kernel).max()),
        }
    print("RESULT " + json.dumps(gaps))


if __name__ == "__main__":
    main()
