"""One of two `MultiWorkerMirroredStrategy` workers; prints the trained weights.

tests/integrations/test_multi_worker.py starts two of these as
`python -m tests.helpers.multi_worker` with `TF_CONFIG` naming both (loopback ports),
and compares what they print with single-device training. Each worker has
one CPU device, so there are 2 replicas; a global batch is split between the
workers (worker 0 takes the first half; of an odd batch, the larger half).
It trains every cell of the composition matrix (tests/helpers/composition.py), the
accumulation cells with `micro_batches` and the `CenterLoss` problems of
tests/test_center_loss.py.
"""

import json

import numpy as np
from keras import ops

from keras_batchfix.integrations.multi_worker import MultiWorkerMirroredStrategy
from tests.helpers.composition import ACCUMULATION_CELLS, CELLS, MICRO_BATCHES, cell_id, fit_cell
from tests.helpers.center_loss_problem import CENTER_LOSS_HYPERPARAMETERS, center_loss_problem
from tests.helpers.training import fit_center_loss

CENTER_LOSS_SIZES = (15, 16)  # 15: the last batch of 7 splits 4 / 3


def main():
    strategy = MultiWorkerMirroredStrategy()  # before any other TensorFlow work
    assert strategy.num_replicas_in_sync == 2, strategy.num_replicas_in_sync
    weights = {cell_id(cell): fit_cell(cell, strategy) for cell in CELLS}
    for cell in ACCUMULATION_CELLS:
        weights["micro-batches: " + cell_id(cell)] = fit_cell(
            cell, strategy, **MICRO_BATCHES
        )
    for n in CENTER_LOSS_SIZES:
        dense, layer, _ = fit_center_loss(
            *center_loss_problem(n), **CENTER_LOSS_HYPERPARAMETERS, strategy=strategy
        )
        weights[f"center loss, {n} samples"] = [
            ops.convert_to_numpy(dense.kernel), ops.convert_to_numpy(layer.centers)
        ]
    print("RESULT " + json.dumps(
        {name: [np.asarray(w).tolist() for w in ws] for name, ws in weights.items()}
    ))


if __name__ == "__main__":
    main()
