"""One of two JAX processes under `DataParallel`; prints the trained weights.

tests/test_jax_multi_process.py starts two of these as
`python -m tests.helpers.jax_multi_process RANK PORT` and one as
`python -m tests.helpers.jax_multi_process reference` (one device, no coordinator).
Each process joins `jax.distributed.initialize` on 127.0.0.1:PORT (one CPU
device each, two in all), sets `keras.distribution.DataParallel` over all
devices with `auto_shard_dataset = False`, and feeds `fit` its own half of
each global batch of 8 (Keras assembles the global batch with
`jax.make_array_from_process_local_data`). Every process must create the
same initial variables (`keras.utils.set_random_seed`: JAX checks that a
replicated value is equal on every process). The cells train on even data:
a global batch must split evenly over the devices.
"""

import os
import sys

os.environ["KERAS_BACKEND"] = "jax"

import json  # noqa: E402

import numpy as np  # noqa: E402

CELLS = [
    ("ssd GlobalCount", "center"),
    ("compensate per-element", "center"),
    ("ssd EMACount", "compensate scalar"),
    ("compensate per-sample", "keras mse"),
]


def main(argv):
    import jax

    processes = 1 if argv == ["reference"] else 2
    rank = 0
    if processes > 1:
        rank = int(argv[0])
        jax.distributed.initialize(
            coordinator_address=f"127.0.0.1:{argv[1]}", num_processes=2,
            process_id=rank, initialization_timeout=60,
        )
    import keras
    from keras import ops

    from tests.helpers.composition import (
        ACCUMULATION_CELLS,
        BATCH,
        EPOCHS,
        HEAD_LOSSES,
        build_cell,
        cell_data,
        cell_id,
        cell_inputs,
    )
    from tests.helpers.torch_ddp import shard

    keras.utils.set_random_seed(0)
    if processes > 1:
        distribution = keras.distribution.DataParallel(
            devices=keras.distribution.list_devices()
        )
        distribution.auto_shard_dataset = False  # each process feeds its shard
        keras.distribution.set_distribution(distribution)
    weights = {}
    # Each cell as it is, and the accumulation cells in 4 slices of each
    # global batch (one pass on the reference's one device).
    runs = [(cell, cell_id(cell), {}, EPOCHS) for cell in CELLS] + [
        (cell, "micro-batches: " + cell_id(cell),
         dict(optimizer="adam schedule",
              micro_batches=4 if processes > 1 else None), 3)
        for cell in ACCUMULATION_CELLS
    ]
    for cell, name, options, epochs in runs:
        x, labels, y_boxes, y_aux = (
            shard(a, rank, processes) for a in cell_data(cell, even=True)
        )
        model = build_cell(cell, **options)
        heads = [piece for piece in cell if piece in HEAD_LOSSES]
        y = dict(zip(("boxes", "aux"), (y_boxes, y_aux)[: len(heads)])) or None
        model.fit(cell_inputs(cell, x, labels), y, batch_size=BATCH // processes,
                  epochs=epochs, shuffle=False, verbose=0)
        weights[name] = [
            np.asarray(ops.convert_to_numpy(w)).tolist() for w in model.weights
        ]
    print("RESULT " + json.dumps(weights), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
