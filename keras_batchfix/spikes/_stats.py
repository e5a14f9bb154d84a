"""Small statistics for `exponent.py`: a t quantile and Yuen's trimmed mean (NumPy only)."""

import math

import numpy as np

#: t quantiles of a two-sided 95% interval for 1..30 degrees of freedom.
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)
_Z975 = 1.959964


def t975(df: int) -> float:
    """The 97.5% quantile of Student's t with `df` degrees of freedom.

    A table up to 30, the Cornish-Fisher expansion beyond (error < 1e-4).

    >>> t975(7), round(t975(1000), 3)
    (2.365, 1.962)
    """
    if df < 1:
        return float("nan")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def trimmed_mean_interval(values, trim: float = 0.2):
    """(trimmed mean, standard error, degrees of freedom) of `values` (Yuen).

    `g = floor(trim * n)` values are cut from each end; the standard error is
    `sqrt((n - 1) * s_w**2 / (h * (h - 1)))`, `s_w**2` the variance of the
    `g`-winsorized values and `h = n - 2 g`, with `h - 1` degrees of freedom.
    NaNs when fewer than 2 values remain.

    >>> trimmed_mean_interval([1.0, 2.0, 3.0, 4.0, 100.0])[0]
    3.0
    """
    x = np.sort(np.asarray(values, dtype="float64"))
    n = x.size
    g = int(math.floor(trim * n))
    h = n - 2 * g
    if h < 2:
        nan = float("nan")
        return (float(x.mean()) if n else nan), nan, 0
    mean = float(x[g : n - g].mean())
    winsorized = np.clip(x, x[g], x[n - g - 1])
    variance = float(np.var(winsorized, ddof=1))
    return mean, math.sqrt((n - 1) * variance / (h * (h - 1))), h - 1
