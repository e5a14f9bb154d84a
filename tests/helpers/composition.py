"""The composition matrix: the package's pieces alone and in pairs in one model.

A *cell* is a tuple of piece names. Its model has a shared `Dense` trunk over
the anchors, one head per head loss of the cell (`"boxes"`, then `"aux"`),
and, when the cell has `"center"`, a `CenterLoss` on features pooled from
the trunk. `fit_cell` trains it for 2 epochs in batches of 8 with SGD and
momentum and returns the weights; the property under test is that every
strategy gives one device's weights (within 1e-5).

Data: `UNEVEN` has 37 samples with 0 to 6 positive anchors each (the last
batch of 5 splits 3 / 2 over 2 replicas, with different counts). Cells with
a loss that is exact only when the replicas see equal counts (a
self-normalized `compensate` without a count, a plain Keras mean loss) train
on `EVEN`: 36 samples, 2 positives each (the last batch of 4 splits 2 / 2).
JAX's `DataParallel` needs batches that split evenly: it trains every cell
on `EVEN`-sized data (`even=True`).

Used by tests/test_composition.py (one device and `MirroredStrategy`),
tests/helpers/multi_worker.py (2 workers), tests/helpers/jax_data_parallel.py, tests/helpers/torch_ddp.py
(2 DDP processes) and tests/helpers/jax_multi_process.py (2 JAX processes).
"""

import keras
import numpy as np
from keras import ops

import keras_batchfix
from keras_batchfix import CenterLoss, EMACount, GlobalCount, SSDMultiboxLoss, compensate
from tests.helpers.training import strategy_scope

NUM_CLASSES, ANCHORS, FEATURES, CENTER_CLASSES = 4, 6, 5, 3
UNEVEN, EVEN = 37, 36
EPOCHS, BATCH = 2, 8


# ---------------------------------------------------------------- head losses
def positives(y_true):
    return ops.max(y_true[..., 1:NUM_CLASSES], axis=-1)  # (B, A)


@keras.saving.register_keras_serializable(package="tests")
def box_errors(y_true, y_pred):
    """Numerator per element: squared box error on positive anchors, (B, A)."""
    error = ops.sum((y_pred[..., NUM_CLASSES:] - y_true[..., NUM_CLASSES:]) ** 2, -1)
    return positives(y_true) * error


def box_errors_per_sample(y_true, y_pred):
    return ops.sum(box_errors(y_true, y_pred), axis=1)


def box_error_total(y_true, y_pred):
    return ops.sum(box_errors(y_true, y_pred))


def positive_count(y_true, y_pred):
    return ops.sum(positives(y_true))


def box_errors_self_normalized(y_true, y_pred):
    """ssd_keras style: already divided by the replica's own count."""
    return box_errors(y_true, y_pred) / ops.maximum(positive_count(y_true, y_pred), 1.0)


def ssd(normalizer):
    return SSDMultiboxLoss(
        NUM_CLASSES, mining="per_image", from_logits=True, normalizer=normalizer
    )


# name -> factory of a head loss (called inside the strategy's scope).
HEAD_LOSSES = {
    "ssd GlobalCount": lambda: ssd(GlobalCount()),
    "ssd EMACount": lambda: ssd(EMACount(momentum=0.8)),
    "compensate scalar": lambda: compensate(
        box_error_total, count=positive_count, normalizer=GlobalCount()
    ),
    "compensate per-sample": lambda: compensate(
        box_errors_per_sample, count=positive_count, normalizer=GlobalCount()
    ),
    "compensate per-element": lambda: compensate(
        box_errors, count=positive_count, normalizer=GlobalCount()
    ),
    "compensate no count": lambda: compensate(box_errors_self_normalized),
    "keras mse": lambda: keras.losses.MeanSquaredError(),
}
# Exact only when every replica sees the same count: trained on EVEN.
NEEDS_EQUAL_COUNTS = {"compensate no count", "keras mse"}
PIECES = tuple(HEAD_LOSSES) + ("center",)

CELLS = (
    [(piece,) for piece in PIECES]
    + [(head, "center") for head in HEAD_LOSSES]
    + [
        ("ssd GlobalCount", "ssd EMACount"),
        ("ssd GlobalCount", "compensate per-element"),
        ("ssd EMACount", "compensate scalar"),
        ("compensate per-sample", "compensate no count"),
        ("ssd GlobalCount", "keras mse"),
        ("ssd EMACount", "keras mse"),
        ("compensate per-sample", "keras mse"),
    ]
)


def cell_id(cell):
    return " + ".join(cell)


# Accumulation: `micro_batches=4` against one pass over each batch of 8, both
# shuffled with one seed, Adam with a schedule that decays once, 3 epochs.
# The last batch of 37 samples is 5 (slices of 2, 1, 1, 1).
BIG_BATCH = dict(optimizer="adam schedule", shuffle=True, epochs=3)
MICRO_BATCHES = dict(BIG_BATCH, micro_batches=4)
# The cells the multi-process tests also run in slices (a count-normalized
# loss with each normalizer, CenterLoss, a Keras mean loss).
ACCUMULATION_CELLS = (
    ("ssd GlobalCount", "center"),
    ("ssd EMACount", "keras mse"),
    ("compensate per-element",),
)


# ---------------------------------------------------------------------- data
def cell_data(cell, even=False):
    """`(x, labels, y_boxes, y_aux)` for the cell, NumPy, seeded by the cell."""
    equal_counts = any(piece in NEEDS_EQUAL_COUNTS for piece in cell)
    size = EVEN if (even or equal_counts) else UNEVEN
    rng = np.random.default_rng(sum(map(ord, cell_id(cell))))
    x = rng.normal(size=(size, ANCHORS, FEATURES)).astype("float32")
    labels = rng.integers(0, CENTER_CLASSES, size).astype("int32")
    targets = []
    for _ in range(2):
        y = np.zeros((size, ANCHORS, NUM_CLASSES + 4), "float32")
        y[..., 0] = 1.0  # background
        y[..., NUM_CLASSES:] = rng.normal(size=(size, ANCHORS, 4))
        for image in range(size):
            n = 2 if equal_counts else rng.integers(0, 7)
            anchors = rng.permutation(ANCHORS)[:n]
            y[image, anchors, :NUM_CLASSES] = np.eye(NUM_CLASSES)[
                rng.integers(1, NUM_CLASSES, n)
            ]
        targets.append(y)
    return x, labels, targets[0], targets[1]


# --------------------------------------------------------------------- model
OPTIMIZERS = {
    "sgd": lambda: keras.optimizers.SGD(0.05, momentum=0.9),
    # Decayed once, in the second of 3 epochs (5 updates an epoch).
    "sgd schedule": lambda: keras.optimizers.SGD(
        keras.optimizers.schedules.PiecewiseConstantDecay([7], [0.05, 0.005]),
        momentum=0.9,
    ),
    "adam schedule": lambda: keras.optimizers.Adam(
        keras.optimizers.schedules.PiecewiseConstantDecay([7], [0.01, 0.001])
    ),
}


def build_cell(cell, strategy=None, optimizer="sgd", micro_batches=None):
    """The compiled model of `cell`; deterministic initial weights."""
    heads = [piece for piece in cell if piece in HEAD_LOSSES]
    rng = np.random.default_rng(1234)
    with strategy_scope(strategy):
        x = keras.Input((ANCHORS, FEATURES), name="x")
        inputs = {"x": x}
        if "center" in cell:  # an unused input is an error in older Keras
            inputs["labels"] = keras.Input((), dtype="int32", name="labels")
        trunk = keras.layers.Dense(6, activation="tanh", name="trunk")
        hidden = trunk(x)
        layers = [trunk]
        outputs = {}
        for name in ("boxes", "aux")[: len(heads)]:
            head = keras.layers.Dense(NUM_CLASSES + 4, name=name)
            outputs[name] = head(hidden)
            layers.append(head)
        if "center" in cell:
            embed = keras.layers.Dense(3, name="embed")
            features = embed(keras.layers.Flatten()(hidden))
            layers.append(embed)
            outputs["embedding"] = CenterLoss(
                CENTER_CLASSES, alpha=0.5, loss_weight=0.1,
                centers_initializer=keras.initializers.Constant(
                    rng.normal(size=(CENTER_CLASSES, 3))
                ),
            )([features, inputs["labels"]])
        model = keras_batchfix.Model(inputs, outputs)
        for layer in layers:
            layer.set_weights(
                [rng.normal(scale=0.4, size=w.shape).astype("float32")
                 for w in layer.get_weights()]
            )
        losses = {
            name: HEAD_LOSSES[head]()
            for name, head in zip(("boxes", "aux"), heads)
        }
        model.compile(
            optimizer=OPTIMIZERS[optimizer](), loss=losses or None,
            micro_batches=micro_batches,
        )
    return model


def fit_cell(cell, strategy=None, even=False, optimizer="sgd",
             micro_batches=None, shuffle=False, epochs=EPOCHS):
    """Trains `cell`'s model; returns its weights (NumPy), centers included.

    `shuffle=True` shuffles with a fixed seed: every run sees the same
    batches.
    """
    x, labels, y_boxes, y_aux = cell_data(cell, even)
    model = build_cell(cell, strategy, optimizer, micro_batches)
    heads = [piece for piece in cell if piece in HEAD_LOSSES]
    y = dict(zip(("boxes", "aux"), (y_boxes, y_aux)[: len(heads)])) or None
    if shuffle:
        keras.utils.set_random_seed(0)
    model.fit(
        cell_inputs(cell, x, labels), y, batch_size=BATCH, epochs=epochs,
        shuffle=shuffle, verbose=0,
    )
    return [np.asarray(ops.convert_to_numpy(w)) for w in model.weights]


def cell_inputs(cell, x, labels):
    """The model's inputs: the labels only where a `CenterLoss` reads them."""
    return {"x": x, "labels": labels} if "center" in cell else {"x": x}


def initial_weights(cell):
    return [np.asarray(ops.convert_to_numpy(w)) for w in build_cell(cell).weights]


def max_gap(got, want):
    return max(float(np.abs(a - b).max()) for a, b in zip(got, want))
