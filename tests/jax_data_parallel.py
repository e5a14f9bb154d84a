"""Trains on one JAX CPU device and under `DataParallel` over two; prints the gaps.

Run as `python -m tests.jax_data_parallel` (the test does): the two host
devices must be configured before JAX starts, hence a process of its own.
Under `DataParallel` the loss sees the global batch (one program over the
sharded batch), so every loss here, self-normalized or not, must equal one
device. 38 samples in batches of 8: the short last batch of 6 splits 3 / 3.
A batch of odd size cannot be split: Keras's `distribute_data_input` raises
JAX's `IndivisibleError` (keras/src/backend/jax/distribution_lib.py).
"""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["KERAS_BACKEND"] = "jax"

import json  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402

from keras_batchfix import (  # noqa: E402
    EMACount,
    GlobalCount,
    LocalCount,
    SSDMultiboxLoss,
)
from tests.test_center_loss import (  # noqa: E402
    CENTER_LOSS_HYPERPARAMETERS,
    center_loss_problem,
    numpy_center_loss_training,
)
from tests.test_compensate import (  # noqa: E402
    GLOBAL_COUNT_LOSSES,
    SELF_NORMALIZED_LOSSES,
    regression_problem,
)
from tests.test_normalizers import NUM_CLASSES, ssd_problem  # noqa: E402
from tests.training import fit_center_loss, fit_dense_cases  # noqa: E402

SIZE = 38
CENTER_LOSS_SIZES = (16, 14)  # 14: the last batch of 6 splits 3 / 3


def dense_cases():
    """name -> (loss, (x, y, kernel, bias)) trained with `fit_dense`.

    New loss objects on every call: an EMACount's state must start afresh.
    """
    ssd = ssd_problem(1, SIZE)
    regression = regression_problem(9, SIZE, varying_flags=True)
    cases = {
        "ssd, batch mining, LocalCount": (
            SSDMultiboxLoss(NUM_CLASSES, from_logits=True, normalizer=LocalCount()),
            ssd,
        ),
        "ssd, per-image mining, GlobalCount": (
            SSDMultiboxLoss(
                NUM_CLASSES, from_logits=True, mining="per_image",
                normalizer=GlobalCount(),
            ),
            ssd,
        ),
        "ssd, per-image mining, EMACount": (
            SSDMultiboxLoss(
                NUM_CLASSES, from_logits=True, mining="per_image",
                normalizer=EMACount(),
            ),
            ssd,
        ),
    }
    for name, loss in GLOBAL_COUNT_LOSSES.items():
        cases[f"compensate {name}, GlobalCount"] = (loss, regression)
    for name, loss in SELF_NORMALIZED_LOSSES.items():
        cases[f"compensate {name}, self-normalized"] = (loss, regression)
    return cases


def gap(got, want, start):
    return {
        "max_abs_gap": max(float(np.abs(a - b).max()) for a, b in zip(got, want)),
        "max_abs_change": float(np.abs(want[0] - start).max()),  # the kernel
    }


def main():
    cases = dense_cases()
    single = fit_dense_cases(cases)
    devices = keras.distribution.list_devices("cpu")
    assert len(devices) == 2, devices
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
    parallel = fit_dense_cases(dense_cases())
    gaps = {
        name: gap(parallel[name], single[name], start=problem[2])
        for name, (_, problem) in cases.items()
    }
    for n in CENTER_LOSS_SIZES:
        x, y, w, c = center_loss_problem(n)
        dense, layer, _ = fit_center_loss(x, y, w, c, **CENTER_LOSS_HYPERPARAMETERS)
        got = [ops.convert_to_numpy(dense.kernel), ops.convert_to_numpy(layer.centers)]
        want = numpy_center_loss_training(x, y, w, c, **CENTER_LOSS_HYPERPARAMETERS)
        gaps[f"center loss, {n} samples"] = gap(got, want[:2], start=w)
    print("RESULT " + json.dumps(gaps))


if __name__ == "__main__":
    main()
