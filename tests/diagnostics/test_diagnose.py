"""Tests of `keras_batchfix.diagnose` and its command line (any backend)."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from keras import ops

import keras_batchfix
from keras_batchfix.__main__ import main
from tests.helpers.seed_losses import N_CLASSES
from tests.helpers.seed_losses import ssd_batch
from tests.helpers.seed_losses import ssd_keras_style_loss
from tests.helpers.seed_losses import ssd_keras_style_loss_times_batch
from tests.helpers.seed_losses import ssd_numerator
from tests.helpers.seed_losses import ssd_positives
from tests.helpers.seed_losses import unnormalized_sum
from keras_batchfix.references.token_data import VOCAB, token_data
from tests.helpers.token_losses import token_sum, valid_tokens

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def batch():
    return ssd_batch(batch_size=8, anchors=12, seed=1)


def run(loss, batch, **kwargs):
    y_true, y_pred = batch
    return keras_batchfix.diagnose(loss, y_true, y_pred, **kwargs)


def positives_ratio(batch, parts=2):
    """Positives of the part with most over the part with fewest, by hand.

    The images sorted by their positives (stable) and cut into `parts`
    equal parts: a loss divided by each part's own count weighs the
    samples of the first part this many times more than the last's.
    """
    positives = batch[0][..., 1:N_CLASSES].max(axis=-1).sum(axis=1)
    halves = np.split(np.sort(positives, kind="stable"), parts)
    return halves[-1].sum() / halves[0].sum()


def keras_evaluate(loss, y_true, y_pred):
    """The loss Keras itself reports for one batch, via compile + evaluate."""
    model = keras.Sequential([keras.Input(y_pred.shape[1:]), keras.layers.Identity()])
    model.compile(loss=loss)
    return model.evaluate(y_pred, y_true, batch_size=len(y_pred), verbose=0)


@pytest.mark.parametrize(
    "loss",
    [
        "mse",
        keras.losses.MeanAbsoluteError(),
        keras.losses.Huber(),
        keras.losses.CategoricalCrossentropy(from_logits=True),
    ],
    ids=["mse", "mae", "huber", "cce"],
)
def test_builtin_losses_are_invariant(loss, batch):
    y_true, y_pred = batch
    if isinstance(loss, keras.losses.CategoricalCrossentropy):
        y_true, y_pred = y_true[..., :N_CLASSES], y_pred[..., :N_CLASSES]
    result = run(loss, (y_true, y_pred))
    assert result.verdict == "invariant" and result.fix == "none" and result.ok
    assert abs(result.exponent) < 1e-3
    assert result.replica_ratio == pytest.approx(1.0, rel=1e-4)


def test_diagnose_reduces_like_compile(batch):
    # The value at repetition 1 is what Keras's own compile/evaluate reports.
    y_true, y_pred = batch
    for loss in (ssd_keras_style_loss, "mse"):
        result = run(loss, batch)
        reported = keras_evaluate(loss, y_true, y_pred)
        assert result.repetitions[0][2] == pytest.approx(reported, rel=1e-5)


def test_ssd_keras_style_without_batch_size_is_inverse(batch):
    result = run(ssd_keras_style_loss, batch)
    assert result.verdict == "inverse_batch_size"
    assert result.fix == "compensate"
    assert result.exponent == pytest.approx(-1.0, abs=1e-3)
    # Independent property of the bug: loss(k copies) * k is constant.
    values = [k * value for k, _, value in result.repetitions]
    np.testing.assert_allclose(values, values[0], rtol=1e-5)
    assert result.spike_factor(32, 4) == pytest.approx(8.0, rel=1e-2)
    assert "compensate" in result.advice and "compensate" in str(result)


def test_ssd_keras_style_with_batch_size_is_batch_invariant_not_split_invariant(batch):
    # `* batch_size` undoes Keras's mean, but each replica and each
    # micro-batch still divides by its own positives.
    result = run(ssd_keras_style_loss_times_batch, batch)
    assert abs(result.exponent) < 1e-3
    assert result.spike_factor(32, 4) == pytest.approx(1.0, abs=1e-2)
    assert result.verdict == "local_count" and result.fix == "global_count"
    expected = positives_ratio(batch)
    assert result.unequal_split_factor == pytest.approx(expected, rel=1e-5)
    assert result.accumulation_factor == pytest.approx(expected, rel=1e-5)
    assert "GlobalCount" in result.advice and "micro_batches" in result.advice


def test_compensate_fixes_the_ssd_keras_style_loss(batch):
    fixed = keras_batchfix.compensate(ssd_keras_style_loss)
    result = run(fixed, batch)
    assert abs(result.exponent) < 1e-3  # the batch size is fixed;
    assert result.verdict == "local_count"  # the count of each split is not
    assert result.accumulation_mode == "keras"  # no count to hand over
    # The compensated value is the per-batch normalized loss, independently:
    y_true, y_pred = batch
    per_image = ssd_keras_style_loss(
        ops.convert_to_tensor(y_true), ops.convert_to_tensor(y_pred)
    )
    expected = float(ops.sum(per_image))
    assert result.repetitions[0][2] == pytest.approx(expected, rel=1e-5)


def test_package_ssd_loss(batch):
    # LocalCount: exact on one device and under micro_batches, but each
    # replica divides by its own positives.
    loss = keras_batchfix.SSDMultiboxLoss(
        num_classes=N_CLASSES, from_logits=True, normalizer=keras_batchfix.LocalCount()
    )
    result = run(loss, batch, repeats=(1, 2))
    assert abs(result.exponent) < 1e-3
    assert result.replica_ratio == pytest.approx(1.0, rel=1e-4)
    assert result.verdict == "replica_split" and result.fix == "global_count"
    assert result.unequal_split_factor == pytest.approx(positives_ratio(batch), rel=1e-4)
    assert result.accumulation_mode == "micro_batches"
    assert result.accumulation_factor == pytest.approx(1.0, abs=1e-5)
    exact = keras_batchfix.SSDMultiboxLoss(  # the default normalizer: GlobalCount
        num_classes=N_CLASSES, from_logits=True, mining="per_image"
    )
    result = run(exact, batch, repeats=(1, 2))
    assert result.verdict == "invariant" and result.ok
    assert result.unequal_split_factor == pytest.approx(1.0, abs=1e-5)
    assert result.accumulation_factor == pytest.approx(1.0, abs=1e-5)


def test_an_ema_count_loss_is_diagnosed(batch):
    """An EMACount loss is diagnosed at its steady state, its EMA untouched."""
    normalizer = keras_batchfix.EMACount(momentum=0.5, initial_value=10.0)
    loss = keras_batchfix.SSDMultiboxLoss(
        num_classes=N_CLASSES, from_logits=True, normalizer=normalizer
    )
    result = run(loss, batch, repeats=(1, 2))
    assert result.verdict == "invariant"
    assert float(ops.convert_to_numpy(normalizer.ema)) == 10.0  # not moved


def test_unnormalized_sum_scales_with_batch(batch):
    result = run(unnormalized_sum, batch)
    assert result.verdict == "batch_size" and result.fix == "reduction"
    assert result.exponent == pytest.approx(1.0, abs=1e-3)
    assert result.return_shape == ()


def test_sum_reduction_is_reported_as_the_cause(batch):
    loss = keras.losses.MeanSquaredError(reduction="sum")
    result = run(loss, batch)
    assert result.verdict == "batch_size"
    assert "sum_over_batch_size" in result.advice


def test_scalar_mean_loss_fails_the_replica_check(batch):
    # Batch-invariant, but a scalar skips Keras's 1/num_replicas under
    # tf.distribute: the split objective is num_replicas times too large.
    def scalar_mse(y_true, y_pred):
        return ops.mean(ops.square(y_true - y_pred))

    for replicas in (2, 4):
        result = run(scalar_mse, batch, num_replicas=replicas)
        assert result.verdict == "replica_scaling" and result.fix == "compensate"
        assert abs(result.exponent) < 1e-3
        assert result.replica_ratio == pytest.approx(replicas, rel=1e-4)
    fixed = run(keras_batchfix.compensate(scalar_mse), batch)
    assert fixed.verdict == "invariant"


def test_global_count_makes_any_split_exact(batch):
    # Independent property: with the count all-reduced, the replicas' summed
    # objective is the single-device loss even for distinct halves whose
    # positives differ; with a per-replica count it is not.
    positives = batch[0][..., 1:N_CLASSES].max(axis=-1).sum(axis=1)
    order = np.argsort(positives, kind="stable")  # few positives first
    batch = (batch[0][order], batch[1][order])
    halves = np.split(positives[order], 2)
    assert halves[0].sum() * 1.4 < halves[1].sum()  # the split is uneven
    local = keras_batchfix.compensate(
        ssd_numerator, count=ssd_positives, normalizer=keras_batchfix.LocalCount()
    )
    glob = keras_batchfix.compensate(ssd_numerator, count=ssd_positives)  # GlobalCount
    local_result, global_result = run(local, batch), run(glob, batch)
    assert global_result.verdict == "invariant"
    assert local_result.verdict == "replica_split"  # the halves' counts differ
    assert global_result.replica_ratio == pytest.approx(1.0, rel=1e-5)
    assert global_result.replica_ratio_split == pytest.approx(1.0, rel=1e-5)
    # Per-replica counts: sum_r num_r / (2 C_r), over num / C, by hand.
    numerator = ops.convert_to_numpy(
        ssd_numerator(ops.convert_to_tensor(batch[0]), ops.convert_to_tensor(batch[1]))
    )
    num_halves, count_halves = np.split(numerator, 2), halves
    expected = sum(
        n.sum() / (2 * c.sum()) for n, c in zip(num_halves, count_halves)
    ) / (numerator.sum() / positives.sum())
    assert local_result.replica_ratio_split == pytest.approx(expected, rel=1e-4)
    assert abs(expected - 1.0) > 5e-3


def test_shape_notes(batch):
    result = run("mse", batch)
    assert result.return_shape == ("B", 12)
    assert any("1/12" in note for note in result.notes)


def test_rejects_bad_input(batch):
    y_true, y_pred = batch
    with pytest.raises(ValueError, match="at least 2"):
        keras_batchfix.diagnose("mse", y_true[:1], y_pred[:1])
    with pytest.raises(ValueError, match="same batch size"):
        keras_batchfix.diagnose("mse", y_true, y_pred[:4])
    with pytest.raises(ValueError, match="repeats"):
        keras_batchfix.diagnose("mse", y_true, y_pred, repeats=(1,))


def test_report_printed_once(batch, capsys):
    # Keras's `verbose` convention: 0 (the default) prints nothing, so
    # `print(result)` shows the report once; 1 prints it.
    result = run(ssd_keras_style_loss, batch)
    assert capsys.readouterr().out == ""
    print(result)
    assert capsys.readouterr().out.count("VERDICT:") == 1
    run(ssd_keras_style_loss, batch, verbose=1)
    assert capsys.readouterr().out.count("VERDICT: inverse_batch_size") == 1
    with pytest.raises(ValueError, match="`verbose` must be 0 or 1"):
        run("mse", batch, verbose=2)


@pytest.fixture
def npz(tmp_path, batch):
    path = tmp_path / "batch.npz"
    np.savez(path, y_true=batch[0], y_pred=batch[1])
    return str(path)


def test_cli_in_process(npz, capsys):
    spec = "tests.helpers.seed_losses:ssd_keras_style_loss"
    assert main(["diagnose", spec, "--data", npz]) == 0
    out = capsys.readouterr().out
    assert "VERDICT: inverse_batch_size" in out and "compensate" in out
    assert "accumulation over 2 micro-batches" in out
    assert out.count("VERDICT:") == 1
    assert main(["diagnose", spec, "--data", npz, "--strict"]) == 3
    capsys.readouterr()
    assert main(["diagnose", "mse", "--data", npz, "--json", "--strict"]) == 0
    report = json.loads(capsys.readouterr().out)  # JSON only, no report
    assert report["verdict"] == "invariant"
    assert report["accumulation_factor"] == pytest.approx(1.0, abs=1e-6)
    assert main(["diagnose", spec, "--data", npz, "--json", "--accumulation-steps", "4"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["accumulation_steps"] == 4 and report["accumulation_factor"] > 1.1
    assert main(["diagnose", "tests.helpers.seed_losses:nope", "--data", npz]) == 1
    assert "nope" in capsys.readouterr().err
    assert main(["diagnose", "tests.helpers.seed_losses.ema_count_ssd_loss", "--data", npz]) == 1
    assert "did you mean 'tests.helpers.seed_losses:ema_count_ssd_loss'" in capsys.readouterr().err
    spec = "tests.helpers.seed_losses:ema_count_ssd_loss"
    assert main(["diagnose", spec, "--data", npz, "--strict"]) == 0
    assert "VERDICT: invariant" in capsys.readouterr().out


def test_cli_subprocess(tmp_path):
    # The real `python -m keras_batchfix` entry point, on a tiny batch.
    path = tmp_path / "small.npz"
    y_true, y_pred = ssd_batch(batch_size=4, anchors=6, seed=2)
    np.savez(path, y_true=y_true, y_pred=y_pred)
    spec = "tests.helpers.seed_losses:ssd_keras_style_loss_times_batch"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    command = [sys.executable, "-m", "keras_batchfix", "diagnose", spec]
    proc = subprocess.run(
        command + ["--data", str(path), "--repeats", "1,2"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "exponent of B: " in proc.stdout
    assert "accumulation over 2 micro-batches" in proc.stdout
    assert "VERDICT: local_count -> fix: global_count" in proc.stdout


# ------------------------------------------- accumulation and unequal splits
def token_batch(size=16):
    """Padded next-token targets (lengths 3..12) and random logits."""
    _, y = token_data()
    logits = np.random.default_rng(5).normal(size=y[:size].shape + (VOCAB,))
    return y[:size], logits.astype("float32")


def tokens_ratio(y_true, parts=2):
    """Valid tokens of the part with most over the part with fewest, by hand."""
    counts = np.split(np.sort((y_true > 0).sum(axis=1), kind="stable"), parts)
    return counts[-1].sum() / counts[0].sum()


def test_global_count_token_loss_is_exact_under_accumulation():
    y_true, logits = token_batch()
    loss = keras_batchfix.compensate(
        token_sum, count=valid_tokens, normalizer=keras_batchfix.GlobalCount()
    )
    result = run(loss, (y_true, logits))
    assert result.accumulation_mode == "micro_batches"
    assert abs(result.accumulation_factor - 1.0) < 1e-6
    assert abs(result.unequal_split_factor - 1.0) < 1e-6
    assert result.probes == {"replicas": "sample weights", "accumulation": "sample weights"}
    assert result.verdict == "invariant" and result.ok
    assert "No fix needed" in result.advice and "unequal counts" in result.advice
    # Keras's own accumulation of it weighs short sequences more, by the
    # halves' token counts (the split really had unequal counts):
    expected = tokens_ratio(y_true)
    assert expected > 1.5
    assert result.keras_accumulation_factor == pytest.approx(expected, rel=1e-5)
    assert "gradient_accumulation_steps" in result.advice
    assert "accumulation over 2 micro-batches" in str(result)
    four = run(loss, (y_true, logits), accumulation_steps=4)
    assert abs(four.accumulation_factor - 1.0) < 1e-6
    assert four.keras_accumulation_factor == pytest.approx(
        tokens_ratio(y_true, 4), rel=1e-5
    )


def test_local_count_token_loss_is_exact_accumulated_not_split():
    y_true, logits = token_batch()
    loss = keras_batchfix.compensate(
        token_sum, count=valid_tokens, normalizer=keras_batchfix.LocalCount()
    )
    result = run(loss, (y_true, logits))
    assert abs(result.accumulation_factor - 1.0) < 1e-6  # counts summed
    assert result.unequal_split_factor == pytest.approx(tokens_ratio(y_true), rel=1e-5)
    assert result.verdict == "replica_split" and result.fix == "global_count"
    assert "GlobalCount" in result.advice


def test_per_batch_normalized_loss_is_not_exact_under_accumulation(batch):
    # ssd_keras's layout: each micro-batch divides by its own positives.
    result = run(ssd_keras_style_loss, batch)
    assert result.accumulation_mode == "keras"
    assert result.accumulation_factor == pytest.approx(positives_ratio(batch), rel=1e-5)
    assert abs(result.accumulation_factor - 1.0) > 0.2
    four = run(ssd_keras_style_loss, batch, accumulation_steps=4)
    assert four.accumulation_factor == pytest.approx(positives_ratio(batch, 4), rel=1e-5)
    assert "accumulation" in str(result) and "x1.5" in str(result)


def test_plain_mean_and_sum_are_exact_under_accumulation(batch):
    mean = run("mse", batch)
    assert abs(mean.accumulation_factor - 1.0) < 1e-6
    assert abs(mean.unequal_split_factor - 1.0) < 1e-6
    # A scalar sum: measured by moving each part's predictions; Keras's mean
    # of k sums is 1/k of it for every sample (the exponent's business).
    total = run(unnormalized_sum, batch)
    assert total.probes["accumulation"] == "predictions"
    assert total.accumulation_factor == pytest.approx(1.0, abs=1e-4)
    assert total.verdict == "batch_size"


def test_no_exact_verdict_without_unequal_counts(batch):
    for loss in ("mse", keras_batchfix.compensate(
        ssd_numerator, count=ssd_positives, normalizer=keras_batchfix.GlobalCount()
    )):
        result = run(loss, batch)
        assert result.verdict == "invariant"
        assert "every replica split" not in str(result)
        assert "split with unequal counts" in result.advice


def test_rejects_bad_accumulation_steps(batch):
    for steps in (1, 2.5, True):
        with pytest.raises(ValueError, match="accumulation_steps"):
            run("mse", batch, accumulation_steps=steps)
