"""One of two torch DDP processes; prints the trained weights.

tests/integrations/test_torch_ddp.py starts two of these as
`python -m tests.helpers.torch_ddp RANK WORLD_SIZE` (`KERAS_BACKEND=torch`,
`MASTER_ADDR=127.0.0.1`, `MASTER_PORT` a free port) and one as
`python -m tests.helpers.torch_ddp reference` (one device, no process group). Each
process joins a gloo process group, makes Keras's `fit` average the
gradients over it (`keras_batchfix.integrations.torch_ddp`) and trains:

* the composition cells of `DDP_CELLS` (tests/helpers/composition.py) on its shard of
  each global batch of 8: the first half to rank 0 and, of an odd batch, the
  larger half, so the last batch of 5 splits 3 / 2 with different positive
  counts;
* `MSE_LOSSES`: a Keras `MeanSquaredError` and its exact form
  (`compensate(..., count=samples, normalizer=GlobalCount())`) on 37 samples
  in batches of 8 (the last batch splits 3 / 2), sharded by
  `torch_ddp.shard_batches`; the reference trains a plain Keras
  `MeanSquaredError` on one device;
* `PADDED_CELLS` on 33 samples in batches of 16 (the last batch splits
  1 / 0): `shard_batches(..., pad_empty=True)` gives rank 1 a zero-weight
  sample there; without `pad_empty` it raises, and the process prints the
  message (`EMPTY_SHARE <message>`).
"""

import json
import os
import sys

import numpy as np

from tests.helpers.composition import (
    ACCUMULATION_CELLS,
    BATCH,
    FEATURES,
    CELLS,
    EPOCHS,
    HEAD_LOSSES,
    build_cell,
    cell_inputs,
    cell_data,
    cell_id,
)

# The cells with GlobalCount / EMACount losses, CenterLoss, and the ones
# exact only for equal counts (trained on even data, every batch split equally).
DDP_CELLS = [
    cell for cell in CELLS
    if cell in (
        ("ssd GlobalCount",),
        ("compensate scalar",),
        ("compensate per-element",),
        ("center",),
        ("ssd GlobalCount", "center"),
        ("compensate per-sample", "center"),
        ("ssd EMACount", "compensate scalar"),
        ("compensate per-sample", "keras mse"),
    )
]


def shard(array, rank, world_size):
    """This rank's part of each global batch of `BATCH`, in batch order."""
    parts = []
    for start in range(0, len(array), BATCH):
        batch = array[start:start + BATCH]
        bounds = np.cumsum([0] + [
            len(batch) // world_size + (r < len(batch) % world_size)
            for r in range(world_size)
        ])
        parts.append(batch[bounds[rank]:bounds[rank + 1]])
    return np.concatenate(parts)


def fit_shard(cell, rank, world_size, micro_batches=None):
    """Trains `cell` on this rank's shards; returns the weights (NumPy).

    With `micro_batches`, each rank runs its share of a batch in that many
    slices; the reference (one device) runs each batch in one pass.
    """
    from keras import ops

    from keras_batchfix.integrations import torch_ddp

    x, labels, y_boxes, y_aux = (
        shard(a, rank, world_size) for a in cell_data(cell)
    )
    model = build_cell(
        cell, optimizer="adam schedule",
        micro_batches=micro_batches if world_size > 1 else None,
    ) if micro_batches else build_cell(cell)
    if world_size > 1:
        torch_ddp.average_gradients_over_processes(model)
    heads = [piece for piece in cell if piece in HEAD_LOSSES]
    y = dict(zip(("boxes", "aux"), (y_boxes, y_aux)[: len(heads)])) or None
    model.fit(
        cell_inputs(cell, x, labels), y, batch_size=BATCH // world_size,
        epochs=3 if micro_batches else EPOCHS, shuffle=False, verbose=0,
    )
    return [np.asarray(ops.convert_to_numpy(w)).tolist() for w in model.weights]


def main(argv):
    if argv == ["reference"]:
        rank, world_size = 0, 1
    else:
        rank, world_size = int(argv[0]), int(argv[1])
        import torch.distributed as dist

        assert os.environ["MASTER_ADDR"] == "127.0.0.1"
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
    weights = {cell_id(cell): fit_shard(cell, rank, world_size) for cell in DDP_CELLS}
    for cell in ACCUMULATION_CELLS:
        weights["micro-batches: " + cell_id(cell)] = fit_shard(
            cell, rank, world_size, micro_batches=2
        )
    for name in MSE_LOSSES:
        weights["mse: " + name] = fit_mse(name, rank, world_size)
    for cell in PADDED_CELLS:
        weights["padded: " + cell_id(cell)] = fit_padded(cell, rank, world_size)
    print("RESULT " + json.dumps(weights), flush=True)
    if world_size > 1:
        print("SLICES " + uneven_slices(rank), flush=True)
        print("EMPTY_SHARE " + empty_share_error(), flush=True)
        dist.destroy_process_group()


MSE_SIZE = 37  # batches of 8: the last batch of 5 splits 3 / 2
MSE_LOSSES = ("keras", "compensate")


def samples(y_true, y_pred):
    """The count of a Keras mean over samples: this replica's batch size."""
    from keras import ops

    return ops.cast(ops.shape(y_true)[0], "float32")


def fit_mse(name, rank, world_size):
    """A linear model trained with a mean squared error; returns its weights.

    `name` is `"keras"` (`keras.losses.MeanSquaredError()`) or
    `"compensate"` (the same values over the global number of samples). The
    reference (one device) trains with Keras's loss in both cases.
    """
    import keras
    from keras import ops

    from keras_batchfix import GlobalCount, compensate
    from keras_batchfix.integrations import torch_ddp

    rng = np.random.default_rng(7)
    x = rng.normal(size=(MSE_SIZE, FEATURES)).astype("float32")
    y = (x @ rng.normal(size=(FEATURES, 3)) + rng.normal(size=(MSE_SIZE, 3))).astype("float32")
    inputs = keras.Input((FEATURES,))
    layer = keras.layers.Dense(3)
    model = keras.Model(inputs, layer(inputs))
    layer.set_weights([rng.normal(size=w.shape).astype("float32") for w in layer.get_weights()])
    loss = keras.losses.MeanSquaredError()
    if world_size > 1:
        if name == "compensate":
            loss = compensate(loss, count=samples, normalizer=GlobalCount())
        x, y, _ = torch_ddp.shard_batches(x, y, batch_size=BATCH)
        torch_ddp.average_gradients_over_processes(model)
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss=loss)
    model.fit(x, y, batch_size=BATCH // world_size, epochs=EPOCHS, shuffle=False, verbose=0)
    return [np.asarray(ops.convert_to_numpy(w)).tolist() for w in model.weights]


PADDED_SIZE, PADDED_BATCH = 33, 16  # the last batch of 1 splits 1 / 0
PADDED_CELLS = (("ssd GlobalCount",), ("compensate per-sample",))


def fit_padded(cell, rank, world_size):
    """`cell` on 33 samples in batches of 16; an empty share padded on rank 1."""
    from keras import ops

    from keras_batchfix.integrations import torch_ddp

    x, _, y, _ = (a[:PADDED_SIZE] for a in cell_data(cell))
    model = build_cell(cell)
    weights = None
    if world_size > 1:
        x, y, weights = torch_ddp.shard_batches(
            x, y, batch_size=PADDED_BATCH, pad_empty=True
        )
        torch_ddp.average_gradients_over_processes(model)
    model.fit(
        {"x": x}, {"boxes": y}, sample_weight=weights,
        batch_size=PADDED_BATCH // world_size, epochs=EPOCHS, shuffle=False,
        verbose=0,
    )
    return [np.asarray(ops.convert_to_numpy(w)).tolist() for w in model.weights]


def empty_share_error():
    """What `shard_batches` says of 33 samples in batches of 16 without padding."""
    from keras_batchfix.integrations import torch_ddp

    x, _, y, _ = (a[:PADDED_SIZE] for a in cell_data(PADDED_CELLS[0]))
    try:
        torch_ddp.shard_batches(x, y, batch_size=PADDED_BATCH)
    except ValueError as error:
        return str(error).replace("\n", " ")
    return "no error"


def uneven_slices(rank):
    """The error both ranks get when one has fewer samples than `micro_batches`."""
    cell = ("keras mse",)
    x, _, y, _ = cell_data(cell)
    size = 4 if rank == 0 else 1  # rank 1: one slice, rank 0: two
    model = build_cell(cell, micro_batches=2)
    try:
        model.fit({"x": x[:size]}, {"boxes": y[:size]}, batch_size=size, verbose=0)
    except ValueError as error:
        return str(error)
    return "no error"


if __name__ == "__main__":
    main(sys.argv[1:])
