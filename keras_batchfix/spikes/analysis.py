"""Spikes in a per-step loss curve, and their causes (NumPy only, no Keras).

Everything here works on plain arrays with one entry per training step: the
loss of that step's batch, its batch size, the learning rate and, when known,
the global gradient norm. `SpikeMonitor` feeds it what it recorded during
`fit`; `benchmarks/spike_detection.py` feeds it synthetic traces.

Two detectors, each measured against the other in the benchmark:

* `local_scores`, a two-sided local baseline on the log-loss. With
  `y_t = log(loss_t)`, `left_t` and `right_t` the medians of `y` over the
  `half_window` steps before and after `t`:

      baseline_t = (left_t + right_t) / 2        (linear trends cancel)
      residual_t = y_t - baseline_t
      excess_t   = y_t - max(left_t, right_t)    (above both sides)
      scale_t    = max(1.4826 * median_{|s - t| <= scale_window} |residual_s|,
                       min_scale) * sqrt(max(B / b_t, 1))
      score_t    = residual_t / scale_t

  (`b_t` the step's batch size, `B` the usual one: a mean of fewer samples
  is noisier.) Step `t` is a spike when `score_t > threshold` and
  `excess_t > threshold * scale_t / 2`: a step above its trend *and* above
  both of its neighbourhoods, so a falling curve or a drop after a
  learning-rate decay (level shifts) is not a spike. A side needs at least
  `(half_window + 1) // 2` steps: the first steps of a run are not scored,
  and at its end the left side's trend is extrapolated.

* `batch_size_exponent` (`keras_batchfix.spikes.exponent`), a direct test
  of the cause: each short batch against the full batches around it,

      beta_t = (y_t - level_t) / log(b_t / B),

  pooled over the run's short batches (a trimmed mean with a 95% t
  interval). The loss scales as `B**beta`: `beta = 0` for a loss that does
  not depend on the batch size, `-1` for one divided by the batch size twice
  (the short batch of `b` reads `B / b` times high), `+1` for an unnormalized
  sum. A verdict is named only when the interval supports it, otherwise it
  is `"inconclusive"`.

`analyze` runs both, flags a step when the local detector does or when it is
a short batch that the named exponent inflates by `min_ratio` or more, and
names causes with `attribute`.

Example:

>>> losses = np.full(70, 1.0); losses[6::7] = 4.0   # every 7th batch is 4x
>>> sizes = np.full(70, 16); sizes[6::7] = 4          # ... and 4 samples
>>> report = analyze(losses, sizes, np.full(70, 0.1))
>>> int(report.spikes.sum()), report.causes[6]
(10, 'short_batch')
>>> round(report.exponent.value, 2)
-1.0
"""

import dataclasses
import importlib.util
import os
import warnings

import numpy as np


def _load_validation():
    """`keras_batchfix._validation`, loaded by its path, not through the package.

    This module imports no Keras: `benchmarks/spike_detection.py` loads it
    by path alone, and so it loads the package's `_validation.py`.
    """
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(package, "_validation.py")
    spec = importlib.util.spec_from_file_location("keras_batchfix_validation", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_validation = _load_validation()

from .exponent import BatchSizeExponent  # noqa: E402  (after the loader above)
from .exponent import batch_size_exponent as _batch_size_exponent  # noqa: E402
from .exponent import exponent_spikes as _exponent_spikes  # noqa: E402
from .exponent import usual_batch_size  # noqa: E402



@dataclasses.dataclass(frozen=True)
class DetectorConfig:
    """Settings shared by `local_scores`, `batch_size_exponent` and `analyze`.

    Attributes:
        threshold: score above which a step is a spike (robust SDs of the
            log-loss around its local baseline).
        half_window: steps on each side of the local baseline.
        scale_window: steps on each side over which the scale is estimated.
        min_scale: floor of the scale, in log units (0.02: 2%), so that a
            nearly noiseless loss does not turn rounding into spikes.
        neighbours: full batches on each side of a short batch for its
            local level (`batch_size_exponent`).
        trim: fraction of the short batches' `beta_t` cut from each end
            before averaging.
        invariant_width: the exponent's 95% interval must lie within
            +-this for the verdict `"invariant"`.
        min_ratio: with the verdict `"inverse_batch_size"`, the short
            batches that read at least this factor high (`B / b`) are spikes.
        lookback: steps back a short batch, a learning-rate change or a
            gradient-norm spike may explain a spike.
        lr_rtol: relative learning-rate change that counts as a change.
    """

    threshold: float = 5.0
    half_window: int = 5
    scale_window: int = 20
    min_scale: float = 0.02
    neighbours: int = 5
    trim: float = 0.2
    invariant_width: float = 0.5
    min_ratio: float = 1.1
    lookback: int = 2
    lr_rtol: float = 0.05

    def __post_init__(self):
        # (name, minimum, whether the minimum itself is allowed); the
        # windows and `lookback` are integers. Stored as plain floats and ints.
        checks = (
            ("threshold", 0, False), ("half_window", 1, True),
            ("scale_window", 1, True), ("min_scale", 0, False),
            ("neighbours", 1, True), ("invariant_width", 0, False),
            ("min_ratio", 1, True), ("lookback", 0, True), ("lr_rtol", 0, True),
        )
        for name, low, inclusive in checks:
            value = getattr(self, name)
            if name in ("half_window", "scale_window", "lookback", "neighbours"):
                value = _validation.integer(name, value, low)
            else:
                value = _validation.real(
                    name, value, f"a number {'>=' if inclusive else '>'} {low}",
                    (lambda v: v >= low) if inclusive else (lambda v: v > low),
                )
            object.__setattr__(self, name, value)  # (the dataclass is frozen)
        trim = _validation.real("trim", self.trim, "a number in [0, 0.5)",
                                lambda v: 0 <= v < 0.5)
        object.__setattr__(self, "trim", trim)


@dataclasses.dataclass(frozen=True)
class LocalScores:
    """Output of `local_scores`: one value per step (NaN where undefined)."""

    residual: np.ndarray
    excess: np.ndarray
    scale: np.ndarray
    score: np.ndarray
    spikes: np.ndarray


@dataclasses.dataclass(frozen=True)
class SpikeReport:
    """Output of `analyze`: per-step arrays, the causes, and the exponent."""

    scores: LocalScores
    spikes: np.ndarray
    causes: list
    exponent: BatchSizeExponent
    usual_batch_size: float


def _window_median(values, start, stop, min_count=1):
    """Median of `values[t + start : t + stop]` for every step `t`, NaN where
    the window (clipped to the array) holds fewer than `min_count` finite values."""
    n = values.size
    pad = max(abs(start), abs(stop))
    padded = np.concatenate([np.full(pad, np.nan), values, np.full(pad, np.nan)])
    windows = np.lib.stride_tricks.sliding_window_view(padded, stop - start)
    windows = windows[pad + start : pad + start + n]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN windows
        median = np.nanmedian(windows, axis=1)
    return np.where(np.sum(np.isfinite(windows), axis=1) >= min_count, median, np.nan)


def local_scores(losses, config: DetectorConfig = DetectorConfig(),
                 batch_sizes=None) -> LocalScores:
    """Scores every step against a two-sided local baseline (module docstring).

    With `batch_sizes`, the scale of a batch of `b_t < B` samples is
    `scale_t * sqrt(B / b_t)`: the mean of fewer samples is noisier, and a
    short batch that is merely unlucky is not a spike.

    Args:
        losses: 1-D per-step losses (> 0; other entries are skipped).
        config: a `DetectorConfig`.
        batch_sizes: 1-D per-step batch sizes, or None (all alike).

    Returns:
        A `LocalScores`.

    Example:

    >>> losses = np.exp(-np.arange(60) / 20.0); losses[30] *= 3.0
    >>> np.nonzero(local_scores(losses).spikes)[0]
    array([30])
    """
    losses = np.asarray(losses, dtype="float64")
    with np.errstate(divide="ignore", invalid="ignore"):
        y = np.where(losses > 0, np.log(losses), np.nan)
    h = int(config.half_window)
    need = (h + 1) // 2
    left = _window_median(y, -h, 0, need)
    right = _window_median(y, 1, h + 1, need)
    # Without a right side (the end of the run), the left side's trend is
    # extrapolated from its median and the one before it, `h` steps apart.
    far_left = _window_median(y, -2 * h, -h, need)
    trend = np.nan_to_num((left - far_left) / h) * (h + 1) / 2
    one_sided = np.isnan(right)
    baseline = np.where(one_sided, left + trend, (left + right) / 2)
    upper = np.where(one_sided, left + trend, np.fmax(left, right))
    residual = y - baseline
    excess = y - upper
    w = int(config.scale_window)
    spread = 1.4826 * _window_median(np.abs(residual), -w, w + 1)
    scale = np.fmax(spread, config.min_scale)
    if batch_sizes is not None:
        sizes = np.asarray(batch_sizes, dtype="float64")
        with np.errstate(divide="ignore", invalid="ignore"):
            scale = scale * np.sqrt(np.fmax(usual_batch_size(sizes) / sizes, 1.0))
    score = residual / scale
    with np.errstate(invalid="ignore"):
        spikes = (score > config.threshold) & (excess > 0.5 * config.threshold * scale)
    return LocalScores(residual, excess, scale, score, spikes)


def batch_size_exponent(losses, batch_sizes, learning_rates=None,
                        config: DetectorConfig = DetectorConfig()) -> BatchSizeExponent:
    """The run's batch-size exponent with `config`'s settings.

    `keras_batchfix.spikes.exponent.batch_size_exponent` with `neighbours`,
    `trim` and `invariant_width` from `config`.

    >>> losses = np.ones(70); losses[6::7] = 4.0
    >>> sizes = np.full(70, 16.0); sizes[6::7] = 4.0
    >>> batch_size_exponent(losses, sizes).verdict
    'inverse_batch_size'
    """
    return _batch_size_exponent(losses, batch_sizes, learning_rates, config.neighbours,
                                config.trim, config.invariant_width)


def exponent_spikes(batch_sizes, exponent: BatchSizeExponent,
                    config: DetectorConfig = DetectorConfig()) -> np.ndarray:
    """Short batches the named exponent inflates by `config.min_ratio` or more.

    >>> exp = BatchSizeExponent(-1.0, 0.05, -1.1, -0.9, 12)
    >>> exponent_spikes([16, 16, 4], exp).tolist()
    [False, False, True]
    """
    return _exponent_spikes(batch_sizes, exponent, config.min_ratio)


def _changed(values, rtol):
    """`|v_t - v_{t-1}| > rtol * |v_{t-1}|` per step (False at step 0)."""
    values = np.asarray(values, dtype="float64")
    changed = np.zeros(values.shape, dtype=bool)
    if values.size > 1:
        previous, current = values[:-1], values[1:]
        with np.errstate(invalid="ignore"):
            changed[1:] = np.abs(current - previous) > rtol * np.abs(previous)
    return changed


def attribute(spikes, batch_sizes, learning_rates, grad_norms=None,
              config: DetectorConfig = DetectorConfig()) -> list:
    """Names the visible cause of each spike.

    * `"short_batch"`: the step's batch is smaller than the usual one;
      `"after_short_batch"`: one of the `lookback` steps before was
      (momentum carries its inflated gradient forward);
    * `"lr_change"`: the learning rate changed by more than `lr_rtol`
      (relative) at the step or up to `lookback` steps before (a schedule's
      step, a callback);
    * `"grad_norm"`, for a spike no batch size or learning rate explains:
      the gradient norm spiked (by `local_scores` on it) at the step or up to
      `lookback` steps before;
    * `"unknown"`: none of these (a bad sample, a data-order effect).

    Returns a list of strings, `""` for steps that are not spikes.

    >>> attribute([False, True], [16, 16], [0.1, 0.2])
    ['', 'lr_change']
    """
    spikes = np.asarray(spikes, dtype=bool)
    sizes = np.asarray(batch_sizes, dtype="float64")
    with np.errstate(invalid="ignore"):
        short = sizes < usual_batch_size(sizes)
    lr_changed = _changed(learning_rates, config.lr_rtol)
    grad_spiked = np.zeros(spikes.shape, dtype=bool)
    if grad_norms is not None and np.any(np.isfinite(grad_norms)):
        grad_spiked = local_scores(grad_norms, config).spikes
    k = int(config.lookback)
    causes = []
    for t in np.arange(spikes.size):
        if not spikes[t]:
            causes.append("")
            continue
        recent = slice(max(0, t - k), t + 1)
        found = []
        if short[t]:
            found.append("short_batch")
        elif np.any(short[max(0, t - k) : t]):
            found.append("after_short_batch")
        if np.any(lr_changed[recent]):
            found.append("lr_change")
        if not found and np.any(grad_spiked[recent]):
            found.append("grad_norm")
        causes.append("+".join(found) or "unknown")
    return causes


def analyze(losses, batch_sizes, learning_rates, grad_norms=None,
            config: DetectorConfig = DetectorConfig()) -> SpikeReport:
    """Spikes of a run, their causes and the batch-size exponent.

    `spikes = local_scores(...).spikes | exponent_spikes(...)`: a step is a
    spike when it stands out locally, or when it is a short batch that the
    run's batch-size exponent, named by its interval, inflates (see the
    module docstring). Returns a `SpikeReport`.
    """
    losses = np.asarray(losses, dtype="float64")
    scores = local_scores(losses, config, batch_sizes)
    exponent = batch_size_exponent(losses, batch_sizes, learning_rates, config)
    spikes = scores.spikes | exponent_spikes(batch_sizes, exponent, config)
    causes = attribute(spikes, batch_sizes, learning_rates, grad_norms, config)
    return SpikeReport(scores, spikes, causes, exponent, usual_batch_size(batch_sizes))
