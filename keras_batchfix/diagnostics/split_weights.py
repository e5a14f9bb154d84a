"""How a split of the batch reweighs its samples (for `diagnose` and `diagnose_model`).

A loss `L(w)` evaluated on a batch with per-sample weights `w` (Keras's
`sample_weight`) is linear in `w` for every reduction but
`"mean_with_sample_weight"`: `L(w) = sum_i w_i c_i`, where the share
`c_i = L(e_i) - L(0)` (`e_i` one-hot) is sample `i`'s weight times its loss.
A split objective `O` (the micro-batches of gradient accumulation, or the
replicas of data parallelism) over the same samples has shares `s_i`, and

    r_i = s_i / c_i

is how much more the split weighs sample `i` than one pass does. The split
is exact up to a common scale when all `r_i` are equal; its *factor* is

    factor = max_i r_i / min_i r_i       (1 when exact)

Each share is one evaluation with a one-hot weight: no gradient, no finite
difference, and exact to float rounding (a sample's share is computed from
its own values only). Where the loss is not linear in `w` (it returns a
scalar, or ignores `sample_weight` as a `compute_loss` that sets its own
weights does), each part `j` of the split is moved instead (its predictions
plus seeded noise) and `r_j = (O(moved) - O) / (L(moved) - L)`, a finite
difference exact to about 1e-3 in float32; the samples' counts are found
the same way, moving one sample at a time.
"""

import math

import numpy as np

#: A share below this fraction of the largest is taken as zero.
TINY = 1e-6


def shares(evaluate, size):
    """`c_i = f(e_i) - f(0)` for `i < size`, or None if `f` is not linear in `w`.

    `evaluate(weights)` returns the loss (a float) with per-sample weights
    `weights` of shape `(size,)`. A loss that ignores the weights, rejects
    them (`ValueError`, `TypeError`), or is not affine in them gives None.
    """
    try:
        zero = evaluate(np.zeros(size, "float32"))
        ones = evaluate(np.ones(size, "float32"))
        half = evaluate(np.full(size, 0.5, "float32"))
    except (ValueError, TypeError):
        return None
    scale = max(abs(zero), abs(ones), 1e-30)
    if not all(math.isfinite(v) for v in (zero, ones, half)):
        return None
    if abs(ones - zero) <= TINY * scale:  # weights ignored (or a zero loss)
        return None
    if abs(2.0 * (half - zero) - (ones - zero)) > 1e-4 * scale:
        return None
    eye = np.eye(size, dtype="float32")
    values = np.array([evaluate(eye[i]) - zero for i in range(size)], "float64")
    if not np.all(np.isfinite(values)):
        return None
    if abs(values.sum() - (ones - zero)) > 1e-4 * max(scale, np.abs(values).sum()):
        return None
    return values


def factor(split, whole):
    """`max r / min r` of `r = split / whole`, over the samples (or parts) that count.

    1.0 when the split weighs every sample as one pass does, up to a common
    scale. `inf` when a sample counts in one and not in the other, or its
    weight changes sign; NaN when nothing was measured.
    """
    if split is None or whole is None:
        return float("nan")
    split = np.asarray(split, "float64")
    whole = np.asarray(whole, "float64")
    if split.size == 0 or not (np.all(np.isfinite(split)) and np.all(np.isfinite(whole))):
        return float("nan")
    big = max(np.abs(whole).max(), np.abs(split).max())
    if big == 0:
        return float("nan")
    counted = np.abs(whole) > TINY * big
    if np.any(np.abs(split[~counted]) > TINY * big):
        return float("inf")
    if not np.any(counted):
        return float("nan")
    ratios = split[counted] / whole[counted]
    if np.any(ratios <= 0):
        return float("inf")
    return float(ratios.max() / ratios.min())


def relative_counts(shares_, singles):
    """`c_i / l_i`: each sample's count over the batch's.

    With shares `c_i` of the batch's loss and each sample's loss alone
    `l_i`, `c_i / l_i` is `C_i / C` for a loss divided by a count of its
    batch, and a constant for a plain mean. (With finite differences: the
    change of the batch's loss over the change of the sample's own, when
    the sample's predictions move.) 0 where the sample has no loss.
    """
    singles = np.asarray(singles, "float64")
    with np.errstate(divide="ignore", invalid="ignore"):
        counts = np.where(singles != 0, np.asarray(shares_, "float64") / singles, 0.0)
    return np.where(np.isfinite(counts), counts, 0.0)


def count_order(counts):
    """The samples ordered by their `counts`, fewest first (a stable argsort).

    Ties (equal counts, up to 1e-3 of the largest, the precision of finite
    differences) keep their given order.
    """
    counts = np.asarray(counts, "float64")
    top = np.abs(counts).max() if counts.size else 0.0
    if top > 0:
        counts = np.round(counts / top, 3)
    return np.argsort(counts, kind="stable")


def equal_parts(order, parts):
    """`order` without `len(order) % parts` samples from its middle, and its parts.

    The parts are contiguous and of equal size, so the first holds the
    samples of fewest counts and the last those of most.
    """
    order = np.asarray(order)
    drop = len(order) % parts
    if drop:
        middle = (len(order) - drop) // 2
        order = np.concatenate([order[:middle], order[middle + drop :]])
    return order, np.split(np.arange(len(order)), parts)


def noise_like(array, seed):
    """Seeded noise of twice the array's spread (2 where it has none).

    Large moves: the change they make to the loss must stand well above
    its float32 rounding (a small symmetric move changes a loss only to
    second order). A ratio of changes is exact for any move where the loss
    is a sum of per-sample terms over a count that the predictions do not
    set.
    """
    array = np.asarray(array)
    spread = float(np.std(array)) if array.size else 0.0
    rng = np.random.default_rng(seed)
    return (2.0 * (spread or 1.0) * rng.normal(size=array.shape)).astype(array.dtype)

