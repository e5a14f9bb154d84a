"""`diagnose_model` on models whose loss is compiled (dicts of outputs, loss weights).

keras-hub's RetinaNet (a `compute_loss` override) is in tests/test_retinanet.py.
"""

import keras
import numpy as np
import pytest

import keras_batchfix
from tests.composition import box_errors_self_normalized, cell_data, positive_count


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
