"""`diagnose_model` on models whose loss is compiled (dicts of outputs, loss weights, masks).

keras-hub's RetinaNet (a `compute_loss` override) is in tests/integrations/test_retinanet.py.
"""

import keras
import numpy as np
import pytest

import keras_batchfix
from tests.helpers.composition import box_errors_self_normalized, cell_data, positive_count
from keras_batchfix.references.token_data import LENGTH, VOCAB, token_data
from tests.helpers.token_losses import token_sum, valid_tokens


def two_head_model(boxes_loss, weights=None):
    x = keras.Input((6, 5), name="x")
    hidden = keras.layers.Dense(6, activation="tanh")(x)
    outputs = {"boxes": keras.layers.Dense(8, name="boxes")(hidden),
               "aux": keras.layers.Dense(8, name="aux")(hidden)}
    model = keras.Model(x, outputs)
    model.compile("sgd", loss={"boxes": boxes_loss, "aux": "mse"}, loss_weights=weights)
    return model


@pytest.fixture
def batch():
    x, _, y_boxes, y_aux = cell_data(("compensate no count",))
    return x[:8], {"boxes": y_boxes[:8], "aux": y_aux[:8]}


def test_flags_the_output_divided_twice_and_passes_the_fixed_one(batch):
    x, y = batch
    buggy = keras_batchfix.diagnose_model(
        two_head_model(box_errors_self_normalized), x, y)
    assert buggy.outputs["boxes"].verdict == "inverse_batch_size"
    assert buggy.outputs["aux"].verdict == "invariant"
    assert buggy.verdict != "invariant"
    fixed = keras_batchfix.diagnose_model(
        two_head_model(keras_batchfix.compensate(box_errors_self_normalized),
                       weights={"boxes": 2.0, "aux": 0.5}), x, y)
    assert fixed.outputs["boxes"].verdict == "invariant"
    assert abs(fixed.exponent) < 1e-3
    assert fixed.replica_factor == pytest.approx(1.0, rel=1e-4)
    assert fixed.verdict == "invariant"


def test_global_count_is_exact_on_any_split(batch):
    x, y = batch
    loss = keras_batchfix.compensate(
        lambda t, p: box_errors_self_normalized(t, p) * positive_count(t, p),
        count=positive_count, normalizer=keras_batchfix.GlobalCount())
    result = keras_batchfix.diagnose_model(two_head_model(loss), x, y)
    assert result.replica_factor_split == pytest.approx(1.0, rel=1e-4)


def test_report_printed_once(batch, capsys):
    x, y = batch
    result = keras_batchfix.diagnose_model(two_head_model("mse"), x, y)
    assert capsys.readouterr().out == ""
    print(result)
    assert capsys.readouterr().out.count("VERDICT:") == 1
    keras_batchfix.diagnose_model(two_head_model("mse"), x, y, verbose=1)
    assert capsys.readouterr().out.count("VERDICT: invariant") == 1


def test_bad_input():
    model = two_head_model("mse")
    with pytest.raises(ValueError, match="num_replicas"):
        keras_batchfix.diagnose_model(model, np.zeros((2, 6, 5)), None, num_replicas=1)
    with pytest.raises(ValueError, match="batch sizes"):
        keras_batchfix.diagnose_model(
            model, np.zeros((2, 6, 5)), {"boxes": np.zeros((3, 6, 8)), "aux": np.zeros((3, 6, 8))})
    with pytest.raises(ValueError, match="`verbose` must be 0 or 1"):
        keras_batchfix.diagnose_model(model, np.zeros((2, 6, 5)), None, verbose=2)
    with pytest.raises(ValueError, match="compiled"):
        keras_batchfix.diagnose_model(keras.Sequential([keras.layers.Dense(1)]), np.zeros((2, 1)))


# ---------------------------------------------------- a masked token model
def token_model(loss, model_class=keras.Model, mask_zero=True, **compile_kwargs):
    """Embedding(mask_zero) + Dense over the vocabulary, as tests/training/test_accumulation.py."""
    keras.utils.set_random_seed(1)
    tokens = keras.Input((LENGTH,), dtype="int32")
    hidden = keras.layers.Embedding(VOCAB, 16, mask_zero=mask_zero)(tokens)
    model = model_class(tokens, keras.layers.Dense(VOCAB)(hidden))
    model.compile("sgd", loss, **compile_kwargs)
    return model


@pytest.fixture(scope="module")
def tokens():
    x, y = token_data()
    return x[:16], y[:16]


def tokens_ratio(tokens, parts=2):
    """Non-padding tokens of the part with most over the part with fewest, by hand."""
    counts = np.split(np.sort((tokens > 0).sum(axis=1), kind="stable"), parts)
    return counts[-1].sum() / counts[0].sum()


@pytest.mark.parametrize("model_class", [keras.Model, keras_batchfix.Model],
                         ids=["keras", "package"])
def test_masked_token_model_is_not_exact_under_replicas_and_accumulation(tokens, model_class):
    """Keras's masked mean divides each replica and each micro-batch by its own tokens."""
    x, y = tokens
    model = token_model(
        keras.losses.SparseCategoricalCrossentropy(from_logits=True), model_class)
    result = keras_batchfix.diagnose_model(model, x, y)
    assert result.verdict == "local_count" and not result.ok
    # On one device, and with the same samples on every replica, it is exact:
    assert abs(result.exponent) < 1e-3
    assert result.replica_factor == pytest.approx(1.0, rel=1e-5)
    # Split long against short sequences, tokens weigh by the halves' counts
    # (of the mask, the input tokens):
    expected = tokens_ratio(x)
    assert expected > 1.5
    assert result.unequal_split_factor == pytest.approx(expected, rel=1e-5)
    assert result.accumulation_mode == "keras"
    assert result.accumulation_factor == pytest.approx(expected, rel=1e-5)
    assert "replicas" in result.advice and "gradient_accumulation_steps" in result.advice
    assert "micro_batches" in result.advice and "GlobalCount" in result.advice
    assert "every replica split" not in str(result)
    report = str(result)
    assert "accumulation over 2 micro-batches" in report and "unequal counts" in report


def test_masked_token_model_with_micro_batches_is_exact(tokens):
    """The fix the verdict names: the package's step makes the count global."""
    x, y = tokens
    model = token_model(
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        keras_batchfix.Model, micro_batches=2)
    result = keras_batchfix.diagnose_model(model, x, y)
    assert result.accumulation_mode == "micro_batches"
    assert result.accumulation_factor == pytest.approx(1.0, abs=1e-5)
    assert result.unequal_split_factor == pytest.approx(1.0, abs=1e-5)
    assert result.replica_factor_split == pytest.approx(1.0, abs=1e-5)
    assert result.verdict == "invariant" and result.ok
    assert "compile(micro_batches=k)" in str(result) and "exact" in result.advice


def test_global_count_model_needs_micro_batches_to_accumulate(tokens):
    x, y = tokens
    loss = keras_batchfix.compensate(
        token_sum, count=valid_tokens, normalizer=keras_batchfix.GlobalCount())
    plain = keras_batchfix.diagnose_model(
        token_model(loss, mask_zero=False), x, y)
    assert plain.unequal_split_factor == pytest.approx(1.0, abs=1e-5)
    assert plain.accumulation_factor == pytest.approx(tokens_ratio(y), rel=1e-5)
    assert plain.verdict == "accumulation" and "micro_batches" in plain.advice
    four = keras_batchfix.diagnose_model(
        token_model(loss, keras_batchfix.Model, mask_zero=False, micro_batches=4),
        x, y)
    assert four.accumulation_steps == 4
    assert four.accumulation_factor == pytest.approx(1.0, abs=1e-5)
    assert four.verdict == "invariant"


class IgnoresSampleWeights(keras.Model):
    """A `compute_loss` override that sets its own weights (as keras-hub's detectors)."""

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        return super().compute_loss(x=x, y=y, y_pred=y_pred, training=training)


def test_a_compute_loss_without_sample_weights_is_measured_by_moving_predictions(tokens):
    x, y = tokens
    model = token_model(
        keras.losses.SparseCategoricalCrossentropy(from_logits=True), IgnoresSampleWeights)
    result = keras_batchfix.diagnose_model(model, x, y)
    assert result.probes == {"replicas": "predictions", "accumulation": "predictions"}
    # The counts found by finite differences order the samples as the mask does.
    assert result.unequal_split_factor == pytest.approx(tokens_ratio(x), rel=2e-2)
    assert result.accumulation_factor == pytest.approx(tokens_ratio(x), rel=2e-2)
    assert result.verdict == "local_count"
    assert "compute_loss override" in result.advice and "count_weight" in result.advice
