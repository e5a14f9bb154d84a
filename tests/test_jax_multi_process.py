"""Multi-process JAX: 2 processes joined by `jax.distributed` on 127.0.0.1.

Starts two `tests/helpers/jax_multi_process.py` processes (one CPU device each,
`keras.distribution.DataParallel` over both, each feeding its half of every
global batch) and a third on one device; kills whatever still runs when it
ends (at most `TIMEOUT_S`). Composition cells with `SSDMultiboxLoss`,
`compensate`, `EMACount`, `CenterLoss` and a Keras mean loss end within 1e-5
of one device, also run in 4 slices of each global batch (`micro_batches=4`)
against one pass over each batch. JAX CPU cross-process collectives (gloo) run on this machine
with jax 0.10. Skipped without JAX.
"""

import numpy as np
import pytest

pytest.importorskip("jax")

from tests.helpers.composition import ACCUMULATION_CELLS  # noqa: E402
from tests.helpers.jax_multi_process import CELLS  # noqa: E402
from tests.helpers.processes import free_loopback_port, printed_weights, run_all  # noqa: E402

TIMEOUT_S = 180
TOLERANCE = 1e-5


def test_jax_multi_process_equals_one_device(tmp_path):
    port = str(free_loopback_port())
    runs = [(["reference"], tmp_path / "reference.log")] + [
        ([str(rank), port], tmp_path / f"process{rank}.log") for rank in range(2)
    ]
    run_all("tests.helpers.jax_multi_process", runs, {"KERAS_BACKEND": "jax"}, TIMEOUT_S)
    reference, first, second = (printed_weights(log_path) for _, log_path in runs)
    assert len(reference) == len(CELLS) + len(ACCUMULATION_CELLS)
    for name, want in reference.items():
        for got, other, want_value in zip(first[name], second[name], want):
            np.testing.assert_array_equal(got, other, err_msg=name)
            assert np.abs(got - want_value).max() < TOLERANCE, name
