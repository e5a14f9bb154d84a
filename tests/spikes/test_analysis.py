"""Tests of `keras_batchfix.spikes.analysis` (NumPy only, backend-independent)."""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

from keras_batchfix.spikes import analysis as spike_analysis
from keras_batchfix.spikes.analysis import DetectorConfig
from keras_batchfix.spikes.analysis import analyze
from keras_batchfix.spikes.analysis import attribute
from keras_batchfix.spikes.analysis import batch_size_exponent
from keras_batchfix.spikes.analysis import local_scores
from keras_batchfix.spikes.exponent import BatchSizeExponent
from keras_batchfix.spikes.exponent import trimmed_mean_interval


def falling(n, rng=None, noise=0.0):
    losses = 0.1 + 2.0 * np.exp(-np.arange(n) / (n / 4))
    if rng is not None:
        losses *= np.exp(noise * rng.normal(size=n))
    return losses


def test_module_imports_no_keras():
    # Loaded as benchmarks/spike_detection.py loads it: the spikes folder as a
    # stand-alone package. The analysis must not pull in Keras or TensorFlow.
    folder = os.path.dirname(spike_analysis.__file__)
    code = (
        "import importlib, importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('sp', {os.path.join(folder, '__init__.py')!r}, "
        f"submodule_search_locations=[{folder!r}])\n"
        "package = importlib.util.module_from_spec(spec); sys.modules['sp'] = package\n"
        "spec.loader.exec_module(package)\n"
        "importlib.import_module('sp.analysis')\n"
        "assert not {'keras', 'tensorflow', 'jax', 'torch'} & set(sys.modules), sorted(sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert importlib.util.find_spec("keras_batchfix.spikes.analysis") is not None


def test_local_scores_find_a_spike_on_a_falling_curve():
    # The trailing median of a falling curve lags above it, which hid 3x
    # spikes in the old monitor; the two-sided baseline cancels the trend.
    rng = np.random.default_rng(0)
    losses = falling(300, rng, noise=0.05)
    losses[[100, 200]] *= [3.0, 2.0]
    scores = local_scores(losses)
    assert list(np.nonzero(scores.spikes)[0]) == [100, 200]
    assert scores.score[100] > 10


def test_level_shifts_and_trends_are_not_spikes():
    rng = np.random.default_rng(1)
    drop = np.ones(200)
    drop[100:] = 0.3  # a learning-rate decay
    rise = np.ones(200)
    rise[100:] = 3.0  # a warm-up step
    for losses in (falling(400), drop, rise, falling(400, rng, noise=0.1), drop * falling(200)):
        assert not np.any(local_scores(losses).spikes)


def test_the_last_step_of_a_run_is_scored():
    # The run's last step has no right side: the left side's trend is extrapolated.
    losses = falling(70)
    losses[-1] *= 2.0
    assert np.nonzero(local_scores(losses).spikes)[0].tolist() == [69]
    assert not np.any(local_scores(falling(70)).spikes)


def test_a_short_batch_is_scored_on_a_wider_scale():
    rng = np.random.default_rng(2)
    losses = np.exp(0.1 * rng.normal(size=100))
    sizes = np.full(100, 64)
    sizes[50] = 4
    losses[50] = 2.0  # about 7 SDs of a full batch, under 2 SDs of a batch of 4
    assert local_scores(losses).spikes[50]
    assert not local_scores(losses, batch_sizes=sizes).spikes[50]


def short_batch_run(ratio, epochs=12, steps=7, noise=0.1, seed=3, inflated=True):
    rng = np.random.default_rng(seed)
    n = epochs * steps
    sizes = np.full(n, 16.0)
    sizes[steps - 1 :: steps] = 16 / ratio
    losses = falling(n, rng, noise) * (16 / sizes if inflated else 1.0)
    return losses, sizes


@pytest.mark.parametrize("ratio", [1.5, 4.0])
def test_batch_size_exponent_of_a_double_division(ratio):
    losses, sizes = short_batch_run(ratio)
    exponent = batch_size_exponent(losses, sizes)
    assert exponent.value == pytest.approx(-1.0, abs=3 * exponent.stderr)
    assert exponent.stderr < 0.3 and exponent.significant
    assert exponent.verdict == "inverse_batch_size"
    message = exponent.message()
    assert message.startswith(f"in this run your loss scales as B^{exponent.value:+.2f} ± ")
    assert "divided by the batch size twice; wrap it in keras_batchfix.compensate" in message


def test_batch_size_exponent_of_an_invariant_loss():
    losses, sizes = short_batch_run(4.0, inflated=False)
    exponent = batch_size_exponent(losses, sizes)
    assert not exponent.significant and exponent.verdict == "invariant"
    assert abs(exponent.value) < 4 * exponent.stderr
    same = batch_size_exponent(np.ones(10), np.full(10, 16))
    assert np.isnan(same.value) and same.verdict == "unknown"
    with pytest.raises(ValueError, match="same shape"):
        batch_size_exponent(np.ones(3), np.ones(4))


def test_analyze_flags_small_short_batch_spikes_through_the_exponent():
    # 1.5x in noise of 10%: no single spike stands out (local score < 5),
    # but the run's exponent is significant and flags all 12.
    losses, sizes = short_batch_run(1.5)
    short = sizes < 16
    assert np.sum(local_scores(losses, batch_sizes=sizes).spikes[short]) < 6
    report = analyze(losses, sizes, np.full(losses.size, 0.1))
    assert np.array_equal(report.spikes, short)
    assert {report.causes[t] for t in np.nonzero(short)[0]} == {"short_batch"}


def test_attribute_each_cause():
    n = 40
    spikes = np.zeros(n, bool)
    spikes[[5, 6, 20, 30, 35]] = True
    sizes = np.full(n, 16.0)
    sizes[5] = 4
    rates = np.full(n, 0.1)
    rates[19:] = 0.5  # a schedule's step at 19 (a spike one step later)
    grad_norms = np.ones(n)
    grad_norms[30] = 10.0
    causes = attribute(spikes, sizes, rates, grad_norms)
    assert causes[5] == "short_batch"
    assert causes[6] == "after_short_batch"
    assert causes[20] == "lr_change"
    assert causes[30] == "grad_norm"
    assert causes[35] == "unknown"
    assert causes[0] == "" and len(causes) == n
    # Without gradient norms the gradient-norm spike is unexplained.
    assert attribute(spikes, sizes, rates)[30] == "unknown"
    # Beyond `lookback` steps a change explains nothing.
    assert attribute(spikes, sizes, rates, config=DetectorConfig(lookback=0))[6] == "unknown"


def test_config_errors_name_the_argument():
    for name, value in [("threshold", 0), ("half_window", 0), ("min_ratio", 0.5),
                        ("lr_rtol", -1), ("min_scale", 0), ("neighbours", 2.5),
                        ("trim", 0.5), ("trim", "0.2"), ("invariant_width", 0)]:
        with pytest.raises(ValueError, match=rf"`{name}` must be .*received {name}={value!r}"):
            DetectorConfig(**{name: value})


# The batch-size exponent from short batches against their neighbours.

B = 64


def epoch_run(beta, last, epochs=12, steps=20, noise=0.0, seed=0, spikes=True):
    """A falling log-linear loss with two learning-rate decays (at epochs 4 and
    8: the loss drops to 0.6x), `steps - 1` full batches and one of `last`
    an epoch, the short ones scaled by `(last / B) ** beta`; with `spikes`,
    8 unrelated full-batch spikes (some beside a short batch) and one short
    batch 3x high."""
    rng = np.random.default_rng(seed)
    n = epochs * steps
    sizes = np.full(n, float(B))
    sizes[steps - 1 :: steps] = last
    rates = np.full(n, 0.1)
    losses = 2.0 * np.exp(-np.arange(n) / 150.0)
    for at in (n // 3, 2 * n // 3):
        rates[at:] *= 0.1
        losses[at:] *= 0.6
    losses *= (sizes / B) ** beta * np.exp(noise * rng.normal(size=n))
    if spikes:
        ends = np.arange(steps - 1, n, steps)
        losses[[ends[1] - 1, ends[2] + 1, ends[5] - 2, ends[6] + 1, 33, 95, 151, 207]] *= 5.0
        losses[ends[4]] *= 3.0
    return losses, sizes, rates


@pytest.mark.parametrize("beta, verdict", [(-1.0, "inverse_batch_size"), (0.0, "invariant"),
                                           (1.0, "batch_size"), (-0.5, "other")])
@pytest.mark.parametrize("last", [56, 20])
def test_exponent_exact_under_a_trend_decays_and_unrelated_spikes(beta, verdict, last):
    losses, sizes, rates = epoch_run(beta, last)
    exponent = batch_size_exponent(losses, sizes, rates)
    assert exponent.value == pytest.approx(beta, abs=0.01)
    assert exponent.high - exponent.low < 0.1
    assert exponent.verdict == verdict and exponent.short_batches == 12


def test_exponent_inconclusive_on_too_little_data():
    losses, sizes, rates = epoch_run(-1.0, 56, epochs=2, spikes=False)
    exponent = batch_size_exponent(losses, sizes, rates)
    assert exponent.short_batches == 2 and exponent.verdict == "inconclusive"
    message = exponent.message()
    assert "inconclusive" in message and "epochs would likely settle it" in message
    assert "keras_batchfix.diagnose" in message
    assert "wrap it in keras_batchfix.compensate" not in message


def test_a_wide_interval_is_never_worded_as_a_certainty():
    # An invariant loss, 12 short batches of 56 in 15% noise: the interval
    # holds 0 but is too wide to rule out -1.
    losses, sizes, rates = epoch_run(0.0, 56, noise=0.15, seed=4, spikes=False)
    exponent = batch_size_exponent(losses, sizes, rates)
    assert exponent.low < 0.0 < exponent.high and exponent.high - exponent.low > 1.0
    assert exponent.verdict == "inconclusive"
    assert "does not depend on the batch size" not in exponent.message()
    assert not np.any(analyze(losses, sizes, rates).spikes[sizes < B])


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("last", [56, 16])
def test_clean_runs_are_not_flagged(seed, last):
    # Gamma-distributed per-sample losses (cv 1), batch-size invariant.
    rng = np.random.default_rng([seed, last])
    _, sizes, rates = epoch_run(0.0, last, spikes=False)
    level, _, _ = epoch_run(0.0, B, spikes=False)
    losses = level * rng.gamma(sizes, 1.0 / sizes)
    report = analyze(losses, sizes, rates)
    assert not np.any(report.spikes[sizes < B])
    assert report.exponent.verdict in ("invariant", "inconclusive")


def test_repeated_batches_widen_the_interval():
    # Every epoch holds the same batches: each batch lifts its loss by its
    # own factor (5% spread), the short batch's by 6%. That offset is the
    # same every epoch, so more epochs do not average it out.
    rng = np.random.default_rng(5)
    losses, sizes, rates = epoch_run(0.0, 56, spikes=False)
    offsets = 0.05 * rng.normal(size=20)
    offsets[-1] = 0.06
    losses *= np.exp(np.tile(offsets, 12) + 0.01 * rng.normal(size=losses.size))
    exponent = batch_size_exponent(losses, sizes, rates)
    assert exponent.repeated and exponent.verdict == "inconclusive"
    assert exponent.low < -1.0 and exponent.high > 0.0
    assert "more epochs will not settle it" in exponent.message()
    # Fresh batches each epoch, the same spread: not repeated, and narrow.
    fresh, _, _ = epoch_run(0.0, 56, spikes=False)
    fresh *= np.exp(0.05 * rng.normal(size=fresh.size))
    assert not batch_size_exponent(fresh, sizes, rates).repeated


@pytest.mark.parametrize("low, high, verdict", [
    (-1.34, -0.16, "inverse_batch_size"), (-1.05, -0.95, "inverse_batch_size"),
    (-0.93, -0.89, "inverse_batch_size"), (-1.2, 0.3, "inconclusive"),
    (-0.2, 0.2, "invariant"), (0.02, 0.15, "invariant"), (-0.6, 0.6, "inconclusive"),
    (0.8, 1.2, "batch_size"), (-0.6, -0.4, "other"), (1.5, 1.7, "other"),
    (float("nan"), float("nan"), "inconclusive"),
])
def test_verdicts_follow_the_interval(low, high, verdict):
    exponent = BatchSizeExponent((low + high) / 2, (high - low) / 4, low, high, 12)
    assert exponent.verdict == verdict
    if verdict == "inconclusive":
        assert "inconclusive" in exponent.message()
    assert BatchSizeExponent(float("nan"), float("nan"), float("nan"), float("nan"), 0).verdict \
        == "unknown"


def test_trimmed_mean_interval_against_a_hand_computation():
    # 10 values, 20% trimmed: 2 cut from each end, winsorized to [3, 8].
    values = [1.0, 9.0, 2.0, 8.0, 3.0, 7.0, 4.0, 6.0, 5.0, 50.0]
    mean, stderr, df = trimmed_mean_interval(values)
    kept = [3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
    winsorized = [3.0, 3.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 8.0, 8.0]
    assert mean == pytest.approx(sum(kept) / 6)
    assert stderr == pytest.approx(np.sqrt(9 * np.var(winsorized, ddof=1) / (6 * 5)))
    assert df == 5
