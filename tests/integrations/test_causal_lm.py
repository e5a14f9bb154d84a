"""keras-hub's `CausalLM`: what its loss weighs per token, and the token-mean fix.

A 1-layer `GPT2CausalLM` from a tiny config (random weights, no preset)
trains on 22 sequences of 2..10 tokens padded with 0, its padding mask as
`sample_weight`, in batches of 8 (the last one 6). keras-hub's compiled loss
weighs a valid token `1 / (B * T)`, padding included: it moves with the
batch size and the padded length. `keras_batchfix.integrations.causal_lm.GPT2CausalLM`
with `token_loss()` and `micro_batches=2` trains exactly as one pass of the
token mean over each batch, on one device and under `MirroredStrategy`;
Keras's own accumulation does not. Needs keras-hub.
"""

import keras
import numpy as np
import pytest
from keras import ops

keras_hub = pytest.importorskip("keras_hub")

from keras_batchfix.integrations import causal_lm  # noqa: E402
from tests.helpers.training import strategy_scope  # noqa: E402

VOCAB, LENGTH, SEQUENCES, BATCH = 40, 10, 22, 8
TOLERANCE = 1e-5


def token_data(length=LENGTH):
    rng = np.random.default_rng(0)
    ids = np.zeros((SEQUENCES, length), "int32")
    for row, n in enumerate(rng.integers(2, length + 1, SEQUENCES)):
        ids[row, :n] = rng.integers(1, VOCAB, n)
    x = {"token_ids": ids[:, :-1], "padding_mask": (ids[:, :-1] > 0).astype("int32")}
    return x, ids[:, 1:], (ids[:, 1:] > 0).astype("float32")


def language_model(fixed, strategy=None, loss="auto", micro_batches=None, steps=None):
    with strategy_scope(strategy):
        keras.utils.set_random_seed(0)
        backbone = keras_hub.models.GPT2Backbone(
            vocabulary_size=VOCAB, num_layers=1, num_heads=2, hidden_dim=8,
            intermediate_dim=16, max_sequence_length=LENGTH, dropout=0.0,
        )
        cls = causal_lm.GPT2CausalLM if fixed else keras_hub.models.GPT2CausalLM
        model = cls(backbone=backbone, preprocessor=None)
        kwargs = {"micro_batches": micro_batches} if fixed else {}
        optimizer = keras.optimizers.SGD(
            0.5, momentum=0.9, **({"gradient_accumulation_steps": steps} if steps else {})
        )
        model.compile(optimizer=optimizer, loss=loss, **kwargs)
    return model


def trained(model, batch_size=BATCH):
    x, y, weights = token_data()
    model.fit(x, y, sample_weight=weights, batch_size=batch_size, epochs=2, verbose=0)
    return [np.asarray(ops.convert_to_numpy(w)) for w in model.trainable_weights]


def gap(got, want):
    return max(float(np.abs(a - b).max()) for a, b in zip(got, want))


def test_keras_hub_weighs_a_token_one_over_batch_times_length():
    model = language_model(fixed=False)
    for length, size in ((LENGTH, BATCH), (LENGTH, 6), (5, BATCH)):
        x, y, weights = token_data(length)
        x = {k: v[:size] for k, v in x.items()}
        y, weights = y[:size], weights[:size]
        logits = model(x)
        ce = ops.convert_to_numpy(keras.losses.sparse_categorical_crossentropy(
            y, logits, from_logits=True))
        loss = float(ops.convert_to_numpy(
            model.compute_loss(x=x, y=y, y_pred=logits, sample_weight=weights)))
        # Every valid token weighs 1 / (B * T), padding counted in T.
        np.testing.assert_allclose(loss, (ce * weights).sum() / weights.size, rtol=1e-5)
        assert not np.isclose(loss, (ce * weights).sum() / weights.sum(), rtol=1e-3)


def test_micro_batches_train_as_one_pass_of_the_token_mean():
    one_pass = trained(language_model(fixed=True, loss=causal_lm.token_loss()))
    sliced = trained(language_model(
        fixed=True, loss=causal_lm.token_loss(), micro_batches=2))
    keras_way = trained(language_model(
        fixed=False, loss=causal_lm.token_loss(), steps=2), batch_size=BATCH // 2)
    assert gap(sliced, one_pass) < TOLERANCE
    assert gap(keras_way, one_pass) > 1e-3


def test_two_replicas_train_as_one_device(mirrored_strategy):
    one_pass = trained(language_model(fixed=True, loss=causal_lm.token_loss()))
    mirrored = trained(language_model(
        fixed=True, strategy=mirrored_strategy, loss=causal_lm.token_loss(),
        micro_batches=2,
    ))
    keras_hub_mirrored = trained(language_model(
        fixed=False, strategy=mirrored_strategy, loss=causal_lm.token_loss()))
    assert gap(mirrored, one_pass) < TOLERANCE
    assert gap(keras_hub_mirrored, one_pass) > 1e-4  # a mean of replica means
