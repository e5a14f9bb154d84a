"""torch DDP, really run: 2 processes (gloo on 127.0.0.1) train as one device.

Starts two `tests/helpers/torch_ddp.py` processes joined in a `torch.distributed`
gloo process group on a free loopback port, and a third that trains the same
cells on one device; kills whatever still runs when it ends (at most
`TIMEOUT_S`). Keras's torch `fit` runs in each process, its gradients averaged
over the group by `keras_batchfix.integrations.torch_ddp` (the recipe of
docs/distributed.md). With the uneven last batch (5 split 3 / 2, different
positive counts), `SSDMultiboxLoss(normalizer=GlobalCount())`,
`compensate(count=..., normalizer=GlobalCount())` and `CenterLoss` end within
1e-5 of one device (also with each rank's share run in 2 slices,
`micro_batches=2`, against one pass over each batch), and both processes hold
the same weights. A Keras `MeanSquaredError` does not (the mean of the
ranks' own means), `compensate(..., count=samples, normalizer=GlobalCount())`
of the same loss does. With 33 samples in batches of 16 (the last batch
splits 1 / 0), `shard_batches` raises before training, naming the sizes, and
with `pad_empty=True` trains as one device.

Also runs examples/torch_ddp.py (`--quick`), and checks `shard_batches`
against the global batches it cuts. Runs whatever the test process's backend
(the processes use torch); skipped without torch.
"""

import numpy as np
import pytest

pytest.importorskip("torch")

from tests.helpers.processes import free_loopback_port, printed_weights, run_all  # noqa: E402
from tests.helpers.composition import ACCUMULATION_CELLS  # noqa: E402
from tests.helpers.torch_ddp import DDP_CELLS, MSE_LOSSES, PADDED_CELLS  # noqa: E402

TIMEOUT_S = 300
TOLERANCE = 1e-5


def test_torch_ddp_equals_one_device(tmp_path):
    runs = [(["reference"], tmp_path / "reference.log")] + [
        ([str(rank), "2"], tmp_path / f"rank{rank}.log") for rank in range(2)
    ]
    env = dict(
        KERAS_BACKEND="torch", MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_loopback_port()), GLOO_SOCKET_IFNAME="lo",
    )
    run_all("tests.helpers.torch_ddp", runs, env, TIMEOUT_S)
    reference, first, second = (printed_weights(log_path) for _, log_path in runs)
    assert len(reference) == (
        len(DDP_CELLS) + len(ACCUMULATION_CELLS) + len(MSE_LOSSES) + len(PADDED_CELLS)
    )
    gaps = {}
    for name, want in reference.items():
        for got, other, want_value in zip(first[name], second[name], want):
            np.testing.assert_array_equal(got, other, err_msg=name)  # ranks agree
        gaps[name] = max(
            np.abs(got - want_value).max() for got, want_value in zip(first[name], want)
        )
    print("largest weight gap to one device:", {k: f"{v:.1e}" for k, v in gaps.items()})
    # A Keras mean loss averages the ranks' own means: 3 / 2 is not one device.
    assert gaps.pop("mse: keras") > 1e-3, gaps
    for name, gap in gaps.items():
        assert gap < TOLERANCE, (name, gap)
    for _, log_path in runs[1:]:  # a rank with too few samples for its slices
        slices = [line for line in log_path.read_text().splitlines()
                  if line.startswith("SLICES ")]
        assert slices and "disagree on the slices" in slices[0], slices
        empty = [line for line in log_path.read_text().splitlines()
                 if line.startswith("EMPTY_SHARE ")]
        assert empty and "last batch of 1 sample(s) (33 samples in batches of 16)" in empty[0], empty
        assert "rank(s) [1] of 2" in empty[0], empty


def test_example_trains_as_one_device():
    """examples/torch_ddp.py (2 gloo processes, an empty share padded) runs.

    The example stops its processes after `--timeout`; the test kills the
    example's process group if it outlives that.
    """
    import os
    import re
    import signal
    import subprocess
    import sys

    from tests.helpers.processes import ROOT

    process = subprocess.Popen(
        [sys.executable, "examples/torch_ddp.py", "--quick", "--timeout", str(TIMEOUT_S)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, PYTHONPATH=ROOT), start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=TIMEOUT_S + 60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    assert process.returncode == 0, stderr[-3000:]
    gap = re.search(r"largest weight gap to one device (\S+)", stdout)
    assert gap, stdout + stderr[-3000:]
    assert float(gap.group(1)) < TOLERANCE


# ------------------------------------------------- shard_batches, no processes
def _global_batches(arrays, batch_size):
    return [arrays[i:i + batch_size] for i in range(0, len(arrays), batch_size)]


@pytest.mark.parametrize("size,batch_size,world_size", [
    (37, 8, 2), (36, 8, 2), (33, 16, 2), (50, 12, 3), (7, 4, 4),
])
def test_shard_batches_gives_each_rank_its_share_of_each_batch(size, batch_size, world_size):
    from keras_batchfix.integrations.torch_ddp import shard_batches

    x = np.arange(size, dtype="float32")[:, None] + 1.0  # no sample is all zeros
    y = {"a": -x, "b": np.stack([x, x], axis=1)}
    parts = [
        shard_batches(x, y, batch_size=batch_size, rank=rank,
                      world_size=world_size, pad_empty=True)
        for rank in range(world_size)
    ]
    local = batch_size // world_size
    steps = {len(_global_batches(p[0], local)) for p in parts}
    assert steps == {len(_global_batches(x, batch_size))}  # equal steps everywhere
    for step, batch in enumerate(_global_batches(x, batch_size)):
        shares = [_global_batches(p[0], local)[step] for p in parts]
        weights = [_global_batches(p[2], local)[step] for p in parts]
        real = np.concatenate([s[w > 0] for s, w in zip(shares, weights)])
        np.testing.assert_array_equal(real, batch)  # the batch, in order
        for share, weight in zip(shares, weights):
            assert not share[weight == 0].any()  # padding is zeros
            assert len(share) - len(batch) // world_size in (0, 1)
    for rank, (px, py, pw) in enumerate(parts):
        np.testing.assert_array_equal(py["a"], -px)  # targets follow inputs
        np.testing.assert_array_equal(py["b"][:, 0], px)


def test_shard_batches_keeps_weights_and_adds_none_without_padding():
    from keras_batchfix.integrations.torch_ddp import shard_batches

    x = np.arange(10.0)
    _, y, w = shard_batches(x, batch_size=4, rank=1, world_size=2)
    assert y is None and w is None
    _, _, w = shard_batches(x, x, 2 * x, batch_size=4, rank=1, world_size=2)
    np.testing.assert_array_equal(w, 2 * np.array([2, 3, 6, 7, 9]))


@pytest.mark.parametrize("kwargs,message", [
    (dict(batch_size=16), "last batch of 1 sample(s) (33 samples in batches of 16) leaves rank(s) [1] of 2"),
    (dict(batch_size=7), "received batch_size=7"),
    (dict(batch_size=1), "received batch_size=1"),
    (dict(batch_size=16, rank=2), "must be below world_size=2; received rank=2"),
    (dict(batch_size=16, world_size=None), "received rank=0, world_size=None"),
    (dict(batch_size=16, pad_empty="yes"), "received pad_empty='yes'"),
    (dict(batch_size=16, y=np.zeros(32)), "same number of samples"),
])
def test_shard_batches_errors_name_the_sizes(kwargs, message):
    from keras_batchfix.integrations.torch_ddp import shard_batches

    kwargs = dict(dict(rank=0, world_size=2), **kwargs)
    with pytest.raises(ValueError) as error:
        shard_batches(np.ones((33, 2)), **kwargs)
    assert message in str(error.value)
