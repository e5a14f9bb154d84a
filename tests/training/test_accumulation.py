"""Exact gradient accumulation: `compile(micro_batches=k)` equals one pass per batch.

The property: a model compiled with `micro_batches=4` ends within 1e-5 of the
same model taking one pass over each batch, after 3 epochs of shuffled
batches of 8 (one seed; 37 samples, so the last batch of 5 runs as slices of
2, 1, 1, 1), with momentum SGD and with Adam, each with a learning-rate
schedule that decays once. Every cell of the composition matrix
(tests/helpers/composition.py: each piece alone and in pairs in one model) on the
current backend, under `MirroredStrategy`, and a token language model whose
loss is a mean over its valid tokens. Keras's own
`gradient_accumulation_steps` misses the same runs by far more. The
multi-process strategies run the accumulation cells in
tests/integrations/test_multi_worker.py, tests/integrations/test_torch_ddp.py,
tests/test_jax_multi_process.py and (JAX `DataParallel`)
tests/test_normalizers.py.
"""

import functools

import keras
import numpy as np
import pytest
from keras import ops

import keras_batchfix
from keras_batchfix import CenterLoss, compensate
from keras_batchfix.references.token_data import LENGTH, VOCAB, token_data
from tests.helpers.token_losses import token_sum, valid_tokens
from tests.helpers.composition import (
    BIG_BATCH,
    CELLS,
    MICRO_BATCHES,
    build_cell,
    cell_id,
    fit_cell,
    initial_weights,
    max_gap,
)

TOLERANCE = 1e-5
# Each piece alone (a self-normalized loss has no count to sum: an error,
# tested below) and the pairs that put two counts or two normalizers in one
# model.
SLICED_CELLS = [cell for cell in CELLS if len(cell) == 1 and cell != ("compensate no count",)] + [
    ("ssd GlobalCount", "center"),
    ("keras mse", "center"),
    ("ssd GlobalCount", "compensate per-element"),
    ("ssd EMACount", "keras mse"),
]
SGD_CELLS = [("ssd EMACount",), ("compensate per-element",), ("keras mse", "center")]


def weights_of(model):
    return [np.asarray(ops.convert_to_numpy(w)) for w in model.weights]


@functools.lru_cache(maxsize=None)
def one_pass(cell, optimizer):
    """The reference: one device, one pass over each batch (computed once)."""
    return fit_cell(cell, **dict(BIG_BATCH, optimizer=optimizer))


# ----------------------------------------------------------- composition
@pytest.mark.parametrize("cell", SLICED_CELLS, ids=cell_id)
def test_micro_batches_equal_one_pass_adam(cell):
    big = one_pass(cell, "adam schedule")
    assert max_gap(big, initial_weights(cell)) > 1e-2  # it trained
    assert max_gap(fit_cell(cell, **MICRO_BATCHES), big) < TOLERANCE


@pytest.mark.parametrize("cell", SGD_CELLS, ids=cell_id)
def test_micro_batches_equal_one_pass_sgd(cell):
    options = dict(MICRO_BATCHES, optimizer="sgd schedule")
    assert max_gap(fit_cell(cell, **options), one_pass(cell, "sgd schedule")) < TOLERANCE


@pytest.mark.parametrize(
    "cell", [("ssd GlobalCount", "center"), ("ssd EMACount", "keras mse")],
    ids=cell_id,
)
def test_mirrored_micro_batches_equal_one_device(cell, mirrored_strategy):
    mirrored = fit_cell(cell, strategy=mirrored_strategy, **MICRO_BATCHES)
    assert max_gap(mirrored, one_pass(cell, "adam schedule")) < TOLERANCE


def test_keras_accumulation_is_not_one_pass():
    """What `micro_batches` fixes: Keras averages the slices' own means."""
    cell = ("ssd GlobalCount",)
    big = fit_cell(cell, optimizer="adam schedule", epochs=3)  # not shuffled
    model = build_cell(cell)
    model.compile(
        optimizer=keras.optimizers.Adam(
            keras.optimizers.schedules.PiecewiseConstantDecay([7], [0.01, 0.001]),
            gradient_accumulation_steps=4,
        ),
        loss=model.loss,
    )
    from tests.helpers.composition import cell_data

    x, _, y, _ = cell_data(cell)
    model.fit({"x": x}, {"boxes": y}, batch_size=2, epochs=3, shuffle=False, verbose=0)
    assert max_gap(weights_of(model), big) > 1e-3


# ------------------------------------------------------ a token language model


TOKEN_LOSSES = {
    # Keras's own: the mask of Embedding(mask_zero=True) makes the mean one
    # over valid tokens.
    "masked keras": lambda: keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    "compensate": lambda: compensate(
        token_sum, count=valid_tokens, normalizer=keras_batchfix.GlobalCount()
    ),
}


def fit_tokens(loss, optimizer, batch_size=32, micro_batches=None, steps=None):
    x, y = token_data()
    keras.utils.set_random_seed(1)
    tokens = keras.Input((LENGTH,), dtype="int32")
    hidden = keras.layers.Embedding(VOCAB, 16, mask_zero=loss == "masked keras")(tokens)
    model = keras_batchfix.Model(tokens, keras.layers.Dense(VOCAB)(hidden))
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay(
        [5], [0.5, 0.05] if optimizer == "sgd" else [0.01, 0.001]
    )
    kwargs = {"gradient_accumulation_steps": steps} if steps else {}
    model.compile(
        optimizer=(keras.optimizers.SGD(schedule, momentum=0.9, **kwargs)
                   if optimizer == "sgd" else keras.optimizers.Adam(schedule, **kwargs)),
        loss=TOKEN_LOSSES[loss](), micro_batches=micro_batches,
    )
    keras.utils.set_random_seed(3)
    history = model.fit(x, y, batch_size=batch_size, epochs=3, verbose=0)
    return weights_of(model), history.history["loss"]


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("loss", TOKEN_LOSSES)
def test_token_model_micro_batches_equal_one_pass(loss, optimizer):
    big, big_losses = fit_tokens(loss, optimizer)
    sliced, sliced_losses = fit_tokens(loss, optimizer, micro_batches=4)
    assert max_gap(sliced, big) < TOLERANCE
    np.testing.assert_allclose(sliced_losses, big_losses, rtol=1e-5)  # logged loss
    if (loss, optimizer) == ("masked keras", "sgd"):  # Keras's accumulation is not
        keras_way, _ = fit_tokens(loss, optimizer, batch_size=8, steps=4)
        assert max_gap(keras_way, big) > 1e-3


# --------------------------------------------------------------- data sources
class Batches(keras.utils.PyDataset):
    def __init__(self, arrays, batch_size):
        super().__init__()
        self.arrays, self.batch_size = arrays, batch_size

    def __len__(self):
        return -(-len(self.arrays[0]) // self.batch_size)

    def __getitem__(self, index):
        part = slice(index * self.batch_size, (index + 1) * self.batch_size)
        return tuple(a[part] for a in self.arrays)


@pytest.mark.parametrize("source", ["arrays", "PyDataset", "generator", "tf.data"])
def test_data_sources(source):
    x, y = token_data()
    if source == "tf.data" and keras.backend.backend() != "tensorflow":
        pytest.skip("tf.data with the TensorFlow backend")

    def fit(micro_batches):
        keras.utils.set_random_seed(1)
        tokens = keras.Input((LENGTH,), dtype="int32")
        hidden = keras.layers.Embedding(VOCAB, 8, mask_zero=True)(tokens)
        model = keras_batchfix.Model(tokens, keras.layers.Dense(VOCAB)(hidden))
        model.compile(
            keras.optimizers.SGD(0.5),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            micro_batches=micro_batches,
        )
        if source == "arrays":
            model.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0)
        elif source == "PyDataset":
            model.fit(Batches((x, y), 32), epochs=2, verbose=0)
        elif source == "generator":
            def batches():
                while True:
                    yield from (Batches((x, y), 32)[i] for i in range(4))
            model.fit(batches(), steps_per_epoch=4, epochs=2, verbose=0)
        else:
            import tensorflow as tf

            data = tf.data.Dataset.from_tensor_slices((x, y)).batch(32)
            model.fit(data, epochs=2, verbose=0)
        return weights_of(model)

    assert max_gap(fit(4), fit(None)) < TOLERANCE


# ---------------------------------------------------- state, saving and errors
def test_schedule_sees_updates_and_ema_moves_once_per_update():
    cell = ("ssd EMACount",)
    model = build_cell(cell, **{"optimizer": "sgd schedule", "micro_batches": 4})
    from tests.helpers.composition import cell_data

    x, _, y, _ = cell_data(cell)
    model.fit({"x": x[:16]}, {"boxes": y[:16]}, batch_size=8, epochs=1,
              shuffle=False, verbose=0)
    assert int(ops.convert_to_numpy(model.optimizer.iterations)) == 2  # updates
    positives = y[:16, :, 1:4].max(-1).sum(-1)
    first, second = max(1.0, positives[:8].sum()), max(1.0, positives[8:].sum())
    ema = model.loss["boxes"].normalizer.ema
    np.testing.assert_allclose(
        ops.convert_to_numpy(ema), 0.8 * first + 0.2 * second, rtol=1e-6
    )


def test_saved_model_keeps_micro_batches(tmp_path):
    cell = ("ssd GlobalCount", "center")
    model = build_cell(cell, **{"micro_batches": 4})
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.micro_batches == 4
    layer = next(l for l in loaded.layers if isinstance(l, CenterLoss))
    assert layer.micro_batches == 4


@pytest.mark.parametrize("bad", [1, 0, 2.5, True, "4"])
def test_bad_micro_batches(bad):
    model = build_cell(("keras mse",))
    with pytest.raises(ValueError, match=r"`micro_batches` must be an integer >= 2"):
        model.compile("sgd", "mse", micro_batches=bad)


def test_micro_batches_with_keras_accumulation_is_an_error():
    model = build_cell(("keras mse",))
    model.compile(keras.optimizers.SGD(0.1, gradient_accumulation_steps=2), "mse",
                  micro_batches=2)
    x = np.zeros((4, 6, 5), "float32")
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        model.fit({"x": x}, {"boxes": np.zeros((4, 6, 8), "float32")}, verbose=0)


def test_self_normalized_loss_is_an_error():
    cell = ("compensate no count",)
    model = build_cell(cell, **{"micro_batches": 2})
    x = np.zeros((4, 6, 5), "float32")
    with pytest.raises(ValueError, match="count"):
        model.fit({"x": x}, {"boxes": np.zeros((4, 6, 8), "float32")}, verbose=0)


def test_trainable_centers_are_an_error():
    features = keras.Input((3,))
    labels = keras.Input((), dtype="int32")
    out = CenterLoss(3, centers_trainable=True)([features, labels])
    model = keras_batchfix.Model([features, labels], out)
    with pytest.raises(ValueError, match="centers_trainable"):
        model.compile("sgd", micro_batches=2)


def test_own_compute_loss_is_an_error():
    class Detector(keras_batchfix.Model):
        def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None,
                         training=True):
            return super().compute_loss(x, y, y_pred, sample_weight, training)

    inputs = keras.Input((3,))
    model = Detector(inputs, keras.layers.Dense(2)(inputs))
    with pytest.raises(ValueError, match="Detector overrides `compute_loss`"):
        model.compile("sgd", "mse", micro_batches=2)


def test_frozen_center_loss_keeps_its_centers_and_its_loss():
    cell = ("keras mse", "center")
    big_model = build_cell(cell, optimizer="adam schedule")
    sliced_model = build_cell(cell, optimizer="adam schedule", micro_batches=4)
    from tests.helpers.composition import cell_data, cell_inputs

    x, labels, y, _ = cell_data(cell)
    results = []
    for model in (big_model, sliced_model):
        layer = next(l for l in model.layers if isinstance(l, CenterLoss))
        layer.trainable = False
        model.compile(optimizer=model.optimizer, loss=model.loss,
                      micro_batches=model.micro_batches)
        model.fit(cell_inputs(cell, x, labels), {"boxes": y}, batch_size=8,
                  epochs=2, shuffle=False, verbose=0)
        results.append(weights_of(model))
    assert max_gap(results[1], results[0]) < TOLERANCE
