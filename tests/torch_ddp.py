"""One of two torch DDP processes; prints the trained weights.

tests/test_torch_ddp.py starts two of these as
`python -m tests.torch_ddp RANK WORLD_SIZE` (`KERAS_BACKEND=torch`,
`MASTER_ADDR=127.0.0.1`, `MASTER_PORT` a free port) and one as
`python -m tests.torch_ddp reference` (one device, no process group). Each
process joins a gloo process group, makes Keras's `fit` average the
gradients over it (`keras_batchfix.replicas.average_gradients_over_processes`)
and trains the composition cells of `DDP_CELLS` (tests/composition.py) on its
shard of each global batch of 8: the first half to rank 0 and, of an odd
batch, the larger half, so the last batch of 5 splits 3 / 2 with different
positive counts.
"""

import json
import os
import sys

import numpy as np

from tests.composition import (
    ACCUMULATION_CELLS,
    BATCH,
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

    from keras_batchfix import replicas

    x, labels, y_boxes, y_aux = (
        shard(a, rank, world_size) for a in cell_data(cell)
    )
    model = build_cell(
        cell, optimizer="adam schedule",
        micro_batches=micro_batches if world_size > 1 else None,
    ) if micro_batches else build_cell(cell)
    if world_size > 1:
        replicas.average_gradients_over_processes(model)
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
    print("RESULT " + json.dumps(weights), flush=True)
    if world_size > 1:
        print("SLICES " + uneven_slices(rank), flush=True)
        dist.destroy_process_group()


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
