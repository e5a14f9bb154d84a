"""The batch-size exponent of a run, from its short batches (NumPy only).

A loss that scales as `B ** beta` in the batch size `B` makes a short batch
of `b` samples read `(b / B) ** beta` times what a full batch would have read
at the same point of training. Each short batch is compared with its own
neighbours: with `y_t = log(loss_t)` and `level_t` the line through the
medians of `y` over the `neighbours` nearest full batches on each side of
`t`, read at `t` (only steps at the same learning rate; where one side is
missing, the line through the two nearest groups on the other),

    beta_t = (y_t - level_t) / log(b_t / B)

(`y_t - level_t` corrected for the log of a mean of fewer samples reading
low), and the run's exponent is the 20%-trimmed mean of the `beta_t` with
Yuen's 95% t interval. The falling trend of the loss cancels in the line, a
learning-rate decay is never straddled, and a spike in a neighbour (a
median) or at a short batch (trimmed) barely moves it. When the batches
repeat from epoch to epoch, a short batch's own samples shift every
`beta_t` alike; the interval then includes that offset
(`repeated_batch_offset`).

A verdict is named only when the interval supports it:

* `"inverse_batch_size"`: the interval excludes 0 and contains -1, or
  comes within 0.1 of it (a loss divided by the batch size twice;
  `keras_batchfix.compensate` fixes it);
* `"batch_size"`: it excludes 0 and contains (or comes within 0.1 of) +1
  (a sum over the batch);
* `"other"`: it stays more than 0.1 away from each of -1, 0 and +1;
* `"invariant"`: it contains (or comes within 0.1 of) 0 and lies within
  `(-invariant_width, invariant_width)`;
* `"inconclusive"` otherwise (too few or too noisy short batches), and
  `"unknown"` when no batch had another size than the usual one.

Example:

>>> losses = np.ones(70); losses[6::7] = 4.0      # every 7th batch: 4 of 16
>>> sizes = np.full(70, 16.0); sizes[6::7] = 4.0
>>> result = batch_size_exponent(losses, sizes)
>>> round(result.value, 3), result.verdict
(-1.0, 'inverse_batch_size')
"""

import dataclasses
import math
import warnings

import numpy as np

from ._stats import t975
from ._stats import trimmed_mean_interval

#: Half-width an interval must shrink to before it can rule out 0 or -1.
_SETTLING_HALF_WIDTH = 0.45
_TOLERANCE = 1e-9  # float round-off when an interval of width 0 "contains" 0
#: An interval within this of -1, 0 or +1 names it: which samples the short
#: batches hold biases a long run's narrow interval by a few hundredths.
_MARGIN = 0.1


@dataclasses.dataclass(frozen=True)
class BatchSizeExponent:
    """The loss's batch-size exponent in a run: `loss ~ B ** value`.

    Attributes:
        value: the trimmed mean of the short batches' `beta_t` (NaN without
            short batches).
        stderr: its standard error; `low`, `high`: the 95% interval.
        short_batches: short batches in the estimate.
        batch_size: the usual batch size `B`; `short_size`: the median
            size of the short batches.
        invariant_width: the interval must lie within +-this for
            `"invariant"`.
        repeated: whether the batches repeat from epoch to epoch (then the
            interval includes the short batch's own samples' offset).
    """

    value: float
    stderr: float
    low: float
    high: float
    short_batches: int
    batch_size: float = float("nan")
    short_size: float = float("nan")
    invariant_width: float = 0.5
    repeated: bool = False

    def _contains(self, target: float, margin: float = _TOLERANCE) -> bool:
        return self.low - margin <= target <= self.high + margin

    @property
    def significant(self) -> bool:
        """Whether the 95% interval excludes 0 (the batch size matters)."""
        return math.isfinite(self.low) and not self._contains(0.0)

    @property
    def verdict(self) -> str:
        """`"inverse_batch_size"`, `"batch_size"`, `"other"`, `"invariant"`,
        `"inconclusive"` or `"unknown"` (module docstring)."""
        if self.short_batches == 0:
            return "unknown"
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            return "inconclusive"
        if self.significant and self._contains(-1.0, _MARGIN):
            return "inverse_batch_size"
        if self.significant and self._contains(1.0, _MARGIN):
            return "batch_size"
        if self._contains(0.0, _MARGIN):
            inside = -self.invariant_width < self.low and self.high < self.invariant_width
            return "invariant" if inside else "inconclusive"
        if not (self._contains(-1.0, _MARGIN) or self._contains(1.0, _MARGIN)):
            return "other"
        return "inconclusive"

    def _settle(self) -> str:
        if self.repeated:
            return ("the batches repeat from epoch to epoch, so the short batch's own "
                    "samples cannot be told from a batch-size effect and more epochs "
                    "will not settle it; check one batch with keras_batchfix.diagnose")
        return (f"about {self.epochs_to_settle()} epochs would likely settle it, or "
                "check one batch with keras_batchfix.diagnose")

    def epochs_to_settle(self) -> int:
        """Short batches (epochs, one each) that would likely narrow the
        interval enough to name a verdict: `n * (half_width / 0.45) ** 2`."""
        half = self.high - self.low
        if not math.isfinite(half) or self.short_batches < 3:
            return max(12, 4 * self.short_batches)
        return max(self.short_batches + 1,
                   math.ceil(self.short_batches * (half / 2 / _SETTLING_HALF_WIDTH) ** 2))

    def message(self) -> str:
        """One sentence: the exponent, its interval and what it means."""
        if self.verdict == "unknown":
            return "the batch size never changed in this run: its effect on the loss is unknown"
        sizes = f"{self.short_batches} short batches"
        if math.isfinite(self.short_size) and math.isfinite(self.batch_size):
            sizes += f" of {self.short_size:g} against {self.batch_size:g}"
        if math.isfinite(self.low):
            scaling = (
                f"in this run your loss scales as B^{self.value:+.2f} ± "
                f"{(self.high - self.low) / 2:.2f} (95% CI, {sizes})"
            )
        else:
            scaling = f"in this run your loss scales as B^{self.value:+.2f} (no interval: {sizes})"
        advice = {
            "inverse_batch_size": "it is divided by the batch size twice; wrap it in "
            "keras_batchfix.compensate",
            "batch_size": "it is summed over the batch; return per-sample values or "
            "divide by the batch size",
            "invariant": "it does not depend on the batch size",
            "other": "it depends on the batch size, but as none of B^-1, B^0, B^+1"
            + (" (the batches repeat from epoch to epoch: the short batch's own "
               "samples may be the cause)" if self.repeated else "")
            + "; check it with keras_batchfix.diagnose",
            "inconclusive": "inconclusive: too few or too noisy short batches to tell "
            f"an invariant loss from one divided by the batch size twice; {self._settle()}",
        }[self.verdict]
        return f"{scaling}: {advice}"


def _side(y, candidates, count, need):
    """(median of `y`, median position) over the first `count` of `candidates`;
    NaNs with fewer than `need` of them."""
    chosen = candidates[:count]
    if chosen.size < need:
        return float("nan"), float("nan")
    return float(np.median(y[chosen])), float(np.median(chosen))


def _level(y, t, same, neighbours):
    """`y`'s local level at step `t` from the full steps `same` around it.

    The line through the medians (at their median positions) of the
    `neighbours` nearest full steps on each side, read at `t`; with one side
    only, the line through that side's nearest and next `neighbours` steps
    (a trend is extrapolated, not ignored). NaN without either.
    """
    need = (neighbours + 1) // 2
    before, after = same[same < t][::-1], same[same > t]
    left, right = _side(y, before, neighbours, need), _side(y, after, neighbours, need)
    if math.isnan(left[0]) and math.isnan(right[0]):
        return float("nan")
    if math.isnan(left[0]) or math.isnan(right[0]):
        near, rest = (right, after) if math.isnan(left[0]) else (left, before)
        far = _side(y, rest[neighbours:], neighbours, need)
        if math.isnan(far[0]):
            return near[0]
        left, right = near, far
    slope = (right[0] - left[0]) / (right[1] - left[1])
    return left[0] + slope * (t - left[1])


def short_batch_ratios(losses, batch_sizes, learning_rates=None, neighbours: int = 5):
    """(steps, log ratios `y_t - level_t`, `log(b_t / B)`) of the short batches.

    `level_t` as in the module docstring (`_level`); a short batch with fewer
    than `(neighbours + 1) // 2` usable full batches on both sides is skipped. The
    log ratios are corrected for the log of a mean of fewer samples reading
    low (`_full_batch_variance`).
    """
    losses = np.asarray(losses, dtype="float64")
    sizes = np.asarray(batch_sizes, dtype="float64")
    with np.errstate(divide="ignore", invalid="ignore"):
        y = np.where(np.isfinite(losses) & (losses > 0), np.log(losses), np.nan)
    usual = usual_batch_size(sizes)
    rates = (np.zeros(sizes.shape) if learning_rates is None
             else np.asarray(learning_rates, dtype="float64"))
    finite = np.isfinite(y) & np.isfinite(sizes)
    full = np.nonzero(finite & (sizes == usual))[0]
    steps, ratios, x = [], [], []
    for t in np.nonzero(finite & (sizes != usual) & (sizes > 0))[0]:
        same = full[np.isclose(rates[full], rates[t], rtol=1e-6, atol=0.0)
                    | (np.isnan(rates[full]) & np.isnan(rates[t]))]
        level = _level(y, t, same, neighbours)
        if math.isnan(level):
            continue
        steps.append(int(t))
        ratios.append(y[t] - level)
        x.append(math.log(sizes[t] / usual))
    steps, ratios = np.array(steps, dtype="int64"), np.array(ratios)
    if steps.size:
        # The log of a mean of b samples reads low by about `s2 * B / (2 b)`,
        # `s2` the variance of a full batch's log-loss: a short batch reads
        # lower than its neighbours by `s2 / 2 * (B / b - 1)` even at beta 0.
        ratios = ratios + 0.5 * _full_batch_variance(y, sizes == usual, neighbours) * (
            usual / sizes[steps] - 1.0)
    return steps, ratios, np.array(x)


def _full_batch_variance(y, full, neighbours):
    """Robust variance of the full batches' log-loss around their local median."""
    values = np.where(full, y, np.nan)
    padded = np.concatenate([np.full(neighbours, np.nan), values, np.full(neighbours, np.nan)])
    windows = np.lib.stride_tricks.sliding_window_view(padded, 2 * neighbours + 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        residual = values - np.nanmedian(windows, axis=1)
    residual = residual[np.isfinite(residual)]
    if residual.size < 10:
        return 0.0
    # The median of 2k + 1 values around a step leaves about 1 - 1 / (2k + 1) of its variance.
    spread = 1.4826 * float(np.median(np.abs(residual)))
    return spread**2 / (1.0 - 1.0 / (2 * neighbours + 1))


def repeated_batch_offset(losses, batch_sizes, neighbours: int = 5, min_correlation=0.5):
    """(whether the batches repeat each epoch, variance of a full batch's own offset).

    With short batches every `P` steps (one an epoch), the full batches'
    residuals `e_t = y_t - median(y_{t-k..t+k})` are correlated with
    `e_{t+P}` when every epoch holds the same batches (`fit` on TensorFlow
    after `keras.utils.set_random_seed` does this with arrays). Then a
    batch's own samples lift or lower its loss by the same offset every
    epoch, of variance `cov(e_t, e_{t+P})` for a full batch: a short batch's
    offset does not average out over epochs. `(False, 0.0)` otherwise.
    """
    losses = np.asarray(losses, dtype="float64")
    sizes = np.asarray(batch_sizes, dtype="float64")
    usual = usual_batch_size(sizes)
    short = np.nonzero(np.isfinite(sizes) & (sizes != usual))[0]
    gaps = np.unique(np.diff(short))
    if short.size < 4 or gaps.size != 1 or gaps[0] < 3:
        return False, 0.0
    period = int(gaps[0])
    with np.errstate(divide="ignore", invalid="ignore"):
        y = np.where((sizes == usual) & (losses > 0), np.log(losses), np.nan)
    padded = np.concatenate([np.full(neighbours, np.nan), y, np.full(neighbours, np.nan)])
    windows = np.lib.stride_tricks.sliding_window_view(padded, 2 * neighbours + 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        residual = y - np.nanmedian(windows, axis=1)
    a, b = residual[:-period], residual[period:]
    keep = np.isfinite(a) & np.isfinite(b)
    if keep.sum() < 10:
        return False, 0.0
    a, b = a[keep] - a[keep].mean(), b[keep] - b[keep].mean()
    if min(float(np.mean(a * a)), float(np.mean(b * b))) < 1e-12:  # no batch-to-batch spread
        return False, 0.0
    covariance = float(np.mean(a * b))
    correlation = covariance / max(float(np.sqrt(np.mean(a * a) * np.mean(b * b))), 1e-300)
    if correlation < min_correlation:
        return False, 0.0
    return True, max(covariance, 0.0)


def usual_batch_size(batch_sizes) -> float:
    """The most common batch size (the largest of equally common ones).

    >>> usual_batch_size([16, 16, 4, 16, 16, 4])
    16.0
    """
    sizes = np.asarray(batch_sizes, dtype="float64")
    sizes = sizes[np.isfinite(sizes)]
    if sizes.size == 0:
        return float("nan")
    values, counts = np.unique(sizes, return_counts=True)
    return float(values[counts == counts.max()].max())


def batch_size_exponent(losses, batch_sizes, learning_rates=None, neighbours: int = 5,
                        trim: float = 0.2, invariant_width: float = 0.5) -> BatchSizeExponent:
    """The batch-size exponent `beta` of a run (`loss ~ B ** beta`), from its short batches.

    Each short batch's `beta_t = (y_t - level_t) / log(b_t / B)` against its
    `neighbours` full batches on each side at the same learning rate; the
    `trim`-trimmed mean over the run with Yuen's 95% t interval (module
    docstring), widened by a short batch's own offset when the batches
    repeat from epoch to epoch (`repeated_batch_offset`).

    Args:
        losses: 1-D per-step losses (non-positive or non-finite ones skipped).
        batch_sizes: 1-D per-step batch sizes, the same shape.
        learning_rates: 1-D per-step learning rates, or None (one rate).
        neighbours: full batches on each side of a short one.
        trim: fraction cut from each end before averaging.
        invariant_width: the half-width an `"invariant"` interval must fit in.

    Returns:
        A `BatchSizeExponent`.

    Example:

    >>> losses = np.linspace(2.0, 1.0, 84); losses[6::7] *= 16 / 4
    >>> sizes = np.full(84, 16.0); sizes[6::7] = 4.0
    >>> round(batch_size_exponent(losses, sizes).value, 2)
    -1.0
    """
    losses = np.asarray(losses, dtype="float64")
    sizes = np.asarray(batch_sizes, dtype="float64")
    if losses.shape != sizes.shape:
        raise ValueError(
            "Arguments `losses` and `batch_sizes` must have the same shape; "
            f"received {losses.shape} and {sizes.shape}."
        )
    steps, ratios, x = short_batch_ratios(losses, sizes, learning_rates, neighbours)
    usual = usual_batch_size(sizes)
    short_size = float(np.median(sizes[steps])) if steps.size else float("nan")
    if steps.size == 0:
        nan = float("nan")
        return BatchSizeExponent(nan, nan, nan, nan, 0, usual, short_size, invariant_width)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        value, stderr, df = trimmed_mean_interval(ratios / x, trim)
    repeated, offset = repeated_batch_offset(losses, sizes, neighbours)
    if repeated:  # the short batch's own offset, common to all epochs
        stderr = math.sqrt(stderr**2 + offset * usual / short_size / float(np.mean(x)) ** 2)
    half = t975(df) * stderr if steps.size >= 3 else float("nan")
    return BatchSizeExponent(value, stderr, value - half, value + half, int(steps.size),
                             usual, short_size, invariant_width, repeated)


def exponent_spikes(batch_sizes, exponent: BatchSizeExponent, min_ratio: float = 1.1):
    """Short batches that the run's exponent inflates by `min_ratio` or more.

    Only with the verdict `"inverse_batch_size"`, under which a short batch
    of `b` reads `B / b` times high; other verdicts flag nothing (an
    `"other"` exponent names no cause a short batch's loss could be
    corrected by).

    >>> exp = BatchSizeExponent(-1.0, 0.05, -1.1, -0.9, 12)
    >>> exponent_spikes([16, 16, 4], exp).tolist()
    [False, False, True]
    """
    sizes = np.asarray(batch_sizes, dtype="float64")
    if exponent.verdict != "inverse_batch_size":
        return np.zeros(sizes.shape, dtype=bool)
    usual = usual_batch_size(sizes)
    with np.errstate(divide="ignore", invalid="ignore"):
        inflation = usual / sizes
    return np.nan_to_num(inflation, nan=0.0) >= min_ratio
