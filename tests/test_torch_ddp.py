"""torch DDP, really run: 2 processes (gloo on 127.0.0.1) train as one device.

Starts two `tests/torch_ddp.py` processes joined in a `torch.distributed`
gloo process group on a free loopback port, and a third that trains the same
cells on one device; kills whatever still runs when it ends (at most
`TIMEOUT_S`). Keras's torch `fit` runs in each process, its gradients averaged
over the group by `keras_batchfix.replicas.average_gradients_over_processes`
(the recipe of docs/distributed.md). With the uneven last batch (5 split
3 / 2, different positive counts), `SSDMultiboxLoss(normalizer=GlobalCount())`,
`compensate(count=..., normalizer=GlobalCount())` and `CenterLoss` end within
1e-5 of one device (also with each rank's share run in 2 slices,
`micro_batches=2`, against one pass over each batch), and both processes hold the same weights. Runs whatever
the test process's backend (the processes use torch); skipped without torch.
"""

import numpy as np
import pytest

pytest.importorskip("torch")

from tests.processes import free_loopback_port, printed_weights, run_all  # noqa: E402
from tests.composition import ACCUMULATION_CELLS  # noqa: E402
from tests.torch_ddp import DDP_CELLS  # noqa: E402

TIMEOUT_S = 180
TOLERANCE = 1e-5


def test_torch_ddp_equals_one_device(tmp_path):
    runs = [(["reference"], tmp_path / "reference.log")] + [
        ([str(rank), "2"], tmp_path / f"rank{rank}.log") for rank in range(2)
    ]
    env = dict(
        KERAS_BACKEND="torch", MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_loopback_port()), GLOO_SOCKET_IFNAME="lo",
    )
    run_all("tests.torch_ddp", runs, env, TIMEOUT_S)
    reference, first, second = (printed_weights(log_path) for _, log_path in runs)
    assert len(reference) == len(DDP_CELLS) + len(ACCUMULATION_CELLS)
    for name, want in reference.items():
        for got, other, want_value in zip(first[name], second[name], want):
            np.testing.assert_array_equal(got, other, err_msg=name)  # ranks agree
            assert np.abs(got - want_value).max() < TOLERANCE, name
    for _, log_path in runs[1:]:  # a rank with too few samples for its slices
        slices = [line for line in log_path.read_text().splitlines()
                  if line.startswith("SLICES ")]
        assert slices and "disagree on the slices" in slices[0], slices
