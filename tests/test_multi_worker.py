"""`MultiWorkerMirroredStrategy` with 2 worker processes on 127.0.0.1.

TensorFlow backend only. The test starts both workers (tests/multi_worker.py)
on free loopback ports, and kills whatever still runs when it ends. With
`keras_batchfix.integrations.multi_worker.MultiWorkerMirroredStrategy` (TensorFlow's
strategy with a `reduce` that takes what Keras 3.15 passes), the weights
after 2 epochs equal single-device training on the same global batches:
every cell of the composition matrix (tests/composition.py) on one device,
the accumulation cells run in 4 slices (`micro_batches=4`) against one pass
over each batch, and for `CenterLoss` alone the NumPy reference `numpy_center_loss_training`.
"""

import contextlib
import json
import os
import socket
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

if keras.backend.backend() != "tensorflow":
    pytest.skip("tf.distribute needs the TensorFlow backend", allow_module_level=True)

from tests.composition import (  # noqa: E402
    ACCUMULATION_CELLS,
    BIG_BATCH,
    CELLS,
    cell_id,
    fit_cell,
    initial_weights,
)
from tests.multi_worker import CENTER_LOSS_SIZES  # noqa: E402
from tests.processes import printed_weights  # noqa: E402
from tests.test_center_loss import (  # noqa: E402
    CENTER_LOSS_HYPERPARAMETERS,
    center_loss_problem,
    numpy_center_loss_training,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKERS = 2
TIMEOUT_S = 480


def free_loopback_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@contextlib.contextmanager
def running_workers(log_dir):
    """Starts the workers; yields `[(process, log path)]`; always stops them."""
    cluster = {
        "worker": [f"127.0.0.1:{port}" for port in free_loopback_ports(WORKERS)]
    }
    workers = []
    try:
        for index in range(WORKERS):
            tf_config = {"cluster": cluster, "task": {"type": "worker", "index": index}}
            env = dict(
                os.environ,
                KERAS_BACKEND="tensorflow",
                PYTHONPATH=ROOT,
                TF_CONFIG=json.dumps(tf_config),
            )
            log_path = log_dir / f"worker{index}.log"
            with open(log_path, "w") as log:
                process = subprocess.Popen(
                    [sys.executable, "-m", "tests.multi_worker"],
                    cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                )
            workers.append((process, log_path))
        yield workers
    finally:
        for process, _ in workers:
            if process.poll() is None:
                process.kill()
            process.wait()


def wait_for_workers(workers, deadline):
    """Returns when all exited with 0; fails at the first error, or at `deadline`.

    (A worker whose peer died would otherwise wait for it until the deadline.)
    """
    while True:
        codes = [process.poll() for process, _ in workers]  # poll every worker
        for code, (_, log_path) in zip(codes, workers):
            if code not in (None, 0):
                pytest.fail(f"worker failed:\n{log_path.read_text()[-3000:]}")
        if None not in codes:
            return
        if time.monotonic() > deadline:
            logs = "\n".join(path.read_text()[-1500:] for _, path in workers)
            pytest.fail(f"workers timed out after {TIMEOUT_S} s:\n{logs}")
        time.sleep(0.2)


def test_multi_worker_equals_one_device(tmp_path):
    deadline = time.monotonic() + TIMEOUT_S
    with running_workers(tmp_path) as workers:
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
        wait_for_workers(workers, deadline)
    first, second = (printed_weights(log_path) for _, log_path in workers)
    assert set(first) == set(expected), sorted(first)
    for name, want in expected.items():
        assert np.abs(want[0] - start_kernels[name]).max() > 1e-2, name  # it trained
        for got, other, want_value in zip(first[name], second[name], want):
            np.testing.assert_array_equal(got, other, err_msg=name)  # workers agree
            np.testing.assert_allclose(
                got, want_value, rtol=1e-5, atol=1e-6, err_msg=name
            )
