"""torch DDP, really run: 2 processes (gloo on 127.0.0.1) train as one device.

Starts two `tests/torch_ddp.py` processes joined in a `torch.distributed`
gloo process group on a free loopback port, and a third that trains the same
cells on one device; kills whatever still runs when it ends (at most
`TIMEOUT_S`). Keras's torch `fit` runs in each process, its gradients averaged
over the group by `keras_batchfix.replicas.average_gradients_over_processes`
(the recipe of docs/distributed.md). With the uneven last batch (5 split
3 / 2, different positive counts), `SSDMultiboxLoss(normalizer=GlobalCount())`,
`compensate(count=..., normalizer=GlobalCount())` and `CenterLoss` end within
1e-5 of one device, and both processes hold the same weights. Runs whatever
the test process's backend (the processes use torch); skipped without torch.
"""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("torch")

from tests.torch_ddp import DDP_CELLS  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 180
TOLERANCE = 1e-5


def free_loopback_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args, log_path, port):
    env = dict(
        os.environ, KERAS_BACKEND="torch", PYTHONPATH=ROOT,
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
        GLOO_SOCKET_IFNAME="lo",
    )
    with open(log_path, "w") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "tests.torch_ddp", *args],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )


def printed_weights(log_path):
    lines = [
        line for line in log_path.read_text().splitlines()
        if line.startswith("RESULT ")
    ]
    assert lines, log_path.read_text()[-3000:]
    return {
        name: [np.asarray(w) for w in ws]
        for name, ws in json.loads(lines[0][len("RESULT "):]).items()
    }


def test_torch_ddp_equals_one_device(tmp_path):
    port = free_loopback_port()
    runs = [(["reference"], tmp_path / "reference.log")] + [
        ([str(rank), "2"], tmp_path / f"rank{rank}.log") for rank in range(2)
    ]
    processes = []
    deadline = time.monotonic() + TIMEOUT_S
    try:
        for args, log_path in runs:
            processes.append(start(args, log_path, port))
        while None in [p.poll() for p in processes]:
            for p, (_, log_path) in zip(processes, runs):
                if p.poll() not in (None, 0):
                    pytest.fail(f"{log_path.name} failed:\n{log_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"DDP processes timed out after {TIMEOUT_S} s")
            time.sleep(0.2)
        for p, (_, log_path) in zip(processes, runs):
            assert p.returncode == 0, log_path.read_text()[-3000:]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
            p.wait()
    reference, first, second = (printed_weights(log_path) for _, log_path in runs)
    assert len(reference) == len(DDP_CELLS)
    for name, want in reference.items():
        for got, other, want_value in zip(first[name], second[name], want):
            np.testing.assert_array_equal(got, other, err_msg=name)  # ranks agree
            assert np.abs(got - want_value).max() < TOLERANCE, name
