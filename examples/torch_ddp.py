"""Keras's `fit` on 2 torch DDP processes, trained exactly as one device.

    python examples/torch_ddp.py            # 2 processes on 127.0.0.1, gloo
    python examples/torch_ddp.py --quick    # fewer epochs (the test's form)

Each process joins a `torch.distributed` gloo process group on a free
loopback port, builds the same model (same seed), takes its part of each
global batch of 32 (`torch_ddp.shard_batches`), averages its gradients over
the group (`torch_ddp.average_gradients_over_processes`) and trains with a
count-normalized loss whose count is summed over the processes
(`GlobalCount`). 97 samples leave a last batch of 1: rank 1's share is
empty, so it gets a zero-weight sample of zeros (`pad_empty=True`), which
the loss counts as no box. Rank 0 then retrains the model on one device
and prints the largest weight gap (float rounding, below 1e-5). The
processes are stopped after `--timeout` seconds and the group is destroyed
in any case. On several hosts, run one process per GPU or host with
`MASTER_ADDR` set to the first host's address and each process's `rank`.
"""

import argparse
import datetime
import os
import socket
import sys
import time

os.environ["KERAS_BACKEND"] = "torch"  # before Keras is imported

import keras  # noqa: E402
import numpy as np  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from keras import ops  # noqa: E402

import keras_batchfix  # noqa: E402
from keras_batchfix.integrations import torch_ddp  # noqa: E402

SAMPLES, FEATURES, GLOBAL_BATCH = 97, 8, 32


def box_sum(y_true, y_pred):
    """Per-sample box error of the samples with a box (`y_true[:, 0] = 1`)."""
    has_box = y_true[:, 0]
    return has_box * ops.sum(ops.abs(y_true[:, 1:] - y_pred), axis=-1)


def boxes(y_true, y_pred):
    """The count the loss is divided by: samples with a box."""
    return ops.sum(y_true[:, 0])


def make_data():
    """The whole data set, the same in every process (fixed seed)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(SAMPLES, FEATURES)).astype("float32")
    has_box = rng.integers(0, 2, (SAMPLES, 1))
    y = np.concatenate([has_box, x[:, :4] + 0.1 * x[:, 4:]], axis=1)
    return x, y.astype("float32")


def build_model():
    """The same initial weights in every process: the seed is set first."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((FEATURES,))
    hidden = keras.layers.Dense(16, activation="relu")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(4)(hidden))
    model.compile(
        optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
        loss=keras_batchfix.compensate(
            box_sum, count=boxes, normalizer=keras_batchfix.GlobalCount()
        ),
    )
    return model


def train(rank, world_size, port, epochs):
    """One process: join the group, train on this rank's shard, clean up."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        "gloo", rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=60),  # a stuck collective fails
    )
    try:
        x, y = make_data()
        x_part, y_part, weights = torch_ddp.shard_batches(
            x, y, batch_size=GLOBAL_BATCH, pad_empty=True
        )
        model = build_model()
        torch_ddp.average_gradients_over_processes(model)
        model.fit(
            x_part, y_part, sample_weight=weights,
            batch_size=GLOBAL_BATCH // world_size, epochs=epochs,
            shuffle=False, verbose=0,
        )
        trained = [ops.convert_to_numpy(w) for w in model.weights]
    finally:
        dist.destroy_process_group()
    if rank == 0:  # the same training on one device, for comparison
        reference = build_model()
        reference.fit(x, y, batch_size=GLOBAL_BATCH, epochs=epochs,
                      shuffle=False, verbose=0)
        gap = max(
            float(np.abs(a - ops.convert_to_numpy(b)).max())
            for a, b in zip(trained, reference.weights)
        )
        print(f"{world_size} processes, {epochs} epochs: largest weight gap "
              f"to one device {gap:.1e}", flush=True)


def free_loopback_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="3 epochs")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds before the processes are stopped")
    args = parser.parse_args(argv)
    epochs = 3 if args.quick else args.epochs
    context = mp.start_processes(
        train, args=(args.processes, free_loopback_port(), epochs),
        nprocs=args.processes, join=False, start_method="spawn",
    )
    deadline = time.monotonic() + args.timeout
    try:
        while not context.join(timeout=1.0):  # raises if a process failed
            if time.monotonic() > deadline:
                raise TimeoutError(f"training took over {args.timeout} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
            process.join()


if __name__ == "__main__":
    main()
