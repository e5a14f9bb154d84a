"""Trains on one JAX CPU device and under `DataParallel` over two; prints the gaps.

Run as `python -m tests.helpers.jax_data_parallel` (tests/test_normalizers.py does):
the two host devices must be configured before JAX starts, hence a process of
its own. Under `DataParallel` the loss sees the global batch (one program
over the sharded batch), so every cell of the composition matrix
(tests/helpers/composition.py), self-normalized or not, must equal one device, and
the accumulation cells in 4 slices (`micro_batches=4`) must equal one pass
over each batch on one device. Every
cell trains on 36 samples in batches of 8, the short last batch of 4 split
2 / 2: a batch of odd size cannot be split (Keras's `distribute_data_input`
raises JAX's `IndivisibleError`, keras/src/backend/jax/distribution_lib.py).
"""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["KERAS_BACKEND"] = "jax"

import json  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402

from tests.helpers.composition import (  # noqa: E402
    ACCUMULATION_CELLS,
    BIG_BATCH,
    CELLS,
    MICRO_BATCHES,
    cell_id,
    fit_cell,
    initial_weights,
    max_gap,
)
from tests.helpers.center_loss_problem import (  # noqa: E402
    CENTER_LOSS_HYPERPARAMETERS,
    center_loss_problem,
    numpy_center_loss_training,
)
from tests.helpers.training import fit_center_loss  # noqa: E402

CENTER_LOSS_SIZES = (16, 14)  # 14: the last batch of 6 splits 3 / 3


def main():
    single = {cell_id(cell): fit_cell(cell, even=True) for cell in CELLS}
    big_batch = {
        cell_id(cell): fit_cell(cell, even=True, **BIG_BATCH)
        for cell in ACCUMULATION_CELLS
    }
    devices = keras.distribution.list_devices("cpu")
    assert len(devices) == 2, devices
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
    gaps = {}
    for cell in CELLS:
        name = cell_id(cell)
        gaps[name] = {
            "max_abs_gap": max_gap(fit_cell(cell, even=True), single[name]),
            "max_abs_change": max_gap(single[name], initial_weights(cell)),
        }
    for cell in ACCUMULATION_CELLS:  # 4 slices of each batch, on 2 devices
        name = cell_id(cell)
        gaps["micro-batches: " + name] = {
            "max_abs_gap": max_gap(
                fit_cell(cell, even=True, **MICRO_BATCHES), big_batch[name]
            ),
            "max_abs_change": max_gap(big_batch[name], initial_weights(cell)),
        }
    for n in CENTER_LOSS_SIZES:
        x, y, w, c = center_loss_problem(n)
        dense, layer, _ = fit_center_loss(x, y, w, c, **CENTER_LOSS_HYPERPARAMETERS)
        got = [ops.convert_to_numpy(dense.kernel), ops.convert_to_numpy(layer.centers)]
        want = numpy_center_loss_training(x, y, w, c, **CENTER_LOSS_HYPERPARAMETERS)
        gaps[f"center loss, {n} samples"] = {
            "max_abs_gap": max_gap(got, want[:2]),
            "max_abs_change": float(np.abs(want[0] - w).max()),
        }
    print("RESULT " + json.dumps(gaps))


if __name__ == "__main__":
    main()
