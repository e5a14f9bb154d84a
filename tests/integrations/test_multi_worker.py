"""`MultiWorkerMirroredStrategy` with 2 worker processes on 127.0.0.1.

TensorFlow backend only. The test starts both workers (tests/helpers/multi_worker.py)
on free loopback ports, and kills whatever still runs when it ends. With
`keras_batchfix.integrations.multi_worker.MultiWorkerMirroredStrategy` (TensorFlow's
strategy with a `reduce` that takes what Keras 3.15 passes), the weights
after 2 epochs equal single-device training on the same global batches:
every cell of the composition matrix (tests/helpers/composition.py) on one device,
the accumulation cells run in 4 slices (`micro_batches=4`) against one pass
over each batch, and for `CenterLoss` alone the NumPy reference `numpy_center_loss_training`.
"""

import json

import keras
import numpy as np
import pytest

if keras.backend.backend() != "tensorflow":
    pytest.skip("tf.distribute needs the TensorFlow backend", allow_module_level=True)

from tests.helpers.composition import (  # noqa: E402
    ACCUMULATION_CELLS,
    BIG_BATCH,
    CELLS,
    cell_id,
    fit_cell,
    initial_weights,
)
from tests.helpers.multi_worker import CENTER_LOSS_SIZES  # noqa: E402
from tests.helpers.processes import free_loopback_ports, printed_weights, started  # noqa: E402
from tests.helpers.center_loss_problem import (  # noqa: E402
    CENTER_LOSS_HYPERPARAMETERS,
    center_loss_problem,
    numpy_center_loss_training,
)

WORKERS = 2
TIMEOUT_S = 480


def worker_runs(log_dir):
    """Each worker's arguments, log and `TF_CONFIG`, on free loopback ports."""
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_loopback_ports(WORKERS)]}
    return [
        ((), log_dir / f"worker{index}.log",
         {"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})})
        for index in range(WORKERS)
    ]


def test_multi_worker_equals_one_device(tmp_path):
    runs = worker_runs(tmp_path)
    with started("tests.helpers.multi_worker", runs, {"KERAS_BACKEND": "tensorflow"}, TIMEOUT_S) as wait:
        # Single-device references, computed while the workers train.
        expected = {cell_id(cell): fit_cell(cell) for cell in CELLS}
        start_kernels = {cell_id(cell): initial_weights(cell)[0] for cell in CELLS}
        for cell in ACCUMULATION_CELLS:  # one pass over each batch, one device
            name = "micro-batches: " + cell_id(cell)
            expected[name] = fit_cell(cell, **BIG_BATCH)
            start_kernels[name] = start_kernels[cell_id(cell)]
        for n in CENTER_LOSS_SIZES:
            x, y, w, c = center_loss_problem(n)
            w_ref, c_ref, _ = numpy_center_loss_training(
                x, y, w, c, **CENTER_LOSS_HYPERPARAMETERS
            )
            expected[f"center loss, {n} samples"] = [w_ref, c_ref]
            start_kernels[f"center loss, {n} samples"] = w
        wait()
    first, second = (printed_weights(log_path) for _, log_path, _ in runs)
    assert set(first) == set(expected), sorted(first)
    for name, want in expected.items():
        assert np.abs(want[0] - start_kernels[name]).max() > 1e-2, name  # it trained
        for got, other, want_value in zip(first[name], second[name], want):
            np.testing.assert_array_equal(got, other, err_msg=name)  # workers agree
            np.testing.assert_allclose(
                got, want_value, rtol=1e-5, atol=1e-6, err_msg=name
            )
