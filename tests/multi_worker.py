"""One of two `MultiWorkerMirroredStrategy` workers; prints the trained weights.

tests/test_multi_worker.py starts two of these as
`python -m tests.multi_worker` with `TF_CONFIG` naming both (loopback ports),
and compares what they print with single-device training. Each worker has
one CPU device, so there are 2 replicas; a global batch is split between the
workers (worker 0 takes the first half; of an odd batch, the larger half).
"""

import json

import numpy as np
from keras import ops

from keras_batchfix import GlobalCount, SSDMultiboxLoss
from keras_batchfix.multi_worker import MultiWorkerMirroredStrategy
from tests.test_center_loss import CENTER_LOSS_HYPERPARAMETERS, center_loss_problem
from tests.test_compensate import (
    GLOBAL_COUNT_LOSSES,
    SELF_NORMALIZED_LOSSES,
    regression_problem,
)
from tests.test_normalizers import NUM_CLASSES, ssd_problem
from tests.training import fit_center_loss, fit_dense_cases

# Samples, in batches of 8: of 37, the last batch of 5 splits 3 / 2.
UNEVEN, EVEN = 37, 32
CENTER_LOSS_SIZES = (15, 16)  # 15: the last batch of 7 splits 4 / 3


def dense_cases():
    """name -> (loss, (x, y, kernel, bias)) trained with `fit_dense`."""
    cases = {
        "ssd, per-image mining, GlobalCount": (
            SSDMultiboxLoss(
                NUM_CLASSES, mining="per_image", from_logits=True,
                normalizer=GlobalCount(),
            ),
            ssd_problem(0, UNEVEN),
        ),
    }
    for name, loss in GLOBAL_COUNT_LOSSES.items():
        cases[f"compensate {name}, GlobalCount"] = (
            loss, regression_problem(9, UNEVEN, varying_flags=True)
        )
    for name, loss in SELF_NORMALIZED_LOSSES.items():  # equal counts per replica
        cases[f"compensate {name}, self-normalized"] = (
            loss, regression_problem(8, EVEN, varying_flags=False)
        )
    return cases


def main():
    strategy = MultiWorkerMirroredStrategy()  # before any other TensorFlow work
    assert strategy.num_replicas_in_sync == 2, strategy.num_replicas_in_sync
    weights = fit_dense_cases(dense_cases(), strategy)
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
