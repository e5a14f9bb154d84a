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
                        ("lr_rtol", -1), ("min_scale", 0)]:
        with pytest.raises(ValueError, match=rf"`{name}` must be .*received {name}={value!r}"):
            DetectorConfig(**{name: value})
