"""`diagnose`: does a loss's scale depend on the batch size Keras feeds it?

A loss that normalizes by a count taken from the batch (matched boxes, valid
tokens) and returns per-sample values is divided by the batch size a second
time by Keras's default reduction (`"sum_over_batch_size"`): its value, and
its gradient, go as `1 / batch_size`, and the short last batch of an epoch
spikes. A loss that returns an unnormalized sum goes as `batch_size`. A loss
that returns a scalar is passed through by every reduction and, under
`tf.distribute`, skips Keras's `1 / num_replicas` factor.

A loss that divides by a count of the batch it is given (valid tokens,
Keras's mean over a mask) is exact on one device but not when the batch is
split: across replicas with unequal counts each replica divides by its own,
and Keras's `gradient_accumulation_steps=k` averages the `k` micro-batches'
own losses. `diagnose` splits the samples ordered by their count (few on
one side, many on the other) and measures how the split reweighs them.

`diagnose` measures all of this on the samples you give it, with the
reduction `model.compile` will apply, and says which fix applies.
"""

import dataclasses
import math

import keras
import numpy as np
from keras import ops

from keras_batchfix import _split_weights, _validation, normalizers, replicas
from keras_batchfix._keras_compat import compile_loss
from keras_batchfix._keras_compat import print_msg
from keras_batchfix.normalized_loss import NormalizedLoss, _as_values, weighted_sum

MEAN_REDUCTIONS = ("sum_over_batch_size", "mean", "mean_with_sample_weight")

#: Verdicts, and the fix each calls for.
FIXES = {
    "invariant": "none",
    "inverse_batch_size": "compensate",
    "batch_size": "reduction",
    "replica_scaling": "compensate",
    "replica_split": "global_count",
    "accumulation": "micro_batches",
    "local_count": "global_count",
    "other": "unknown",
    "non_finite": "unknown",
}

#: How the micro-batches of gradient accumulation are combined.
KERAS_ACCUMULATION = "keras"  # `gradient_accumulation_steps`: mean of the losses
MICRO_BATCHES = "micro_batches"  # `compile(micro_batches=k)`: summed, divided once


@dataclasses.dataclass
class Diagnosis:
    """What `diagnose` found. `str(diagnosis)` is the report (`print(result)`).

    Attributes:
        verdict: `"invariant"`, `"inverse_batch_size"` (the loss goes as
            `1 / B`), `"batch_size"` (goes as `B`), `"replica_scaling"`
            (batch-size invariant, but a replica split scales it),
            `"replica_split"` (a split with unequal counts reweighs the
            samples), `"accumulation"` (gradient accumulation reweighs them),
            `"local_count"` (both: each part divides by its own count),
            `"other"` (an exponent that is none of -1, 0, +1) or
            `"non_finite"` (the loss is NaN or infinite on the samples, so
            nothing could be measured; the advice counts the non-finite
            entries of the inputs).
        fix: `"none"`, `"compensate"`, `"reduction"`, `"global_count"`,
            `"micro_batches"` or `"unknown"`.
        advice: the fix in words (what to change in your code).
        exponent: `d log(loss) / d log(B)` over repetitions of the same
            samples (the batch-size effect alone).
        exponent_subbatches: the same, fitted on disjoint sub-batches of the
            samples (the batch-size effect plus composition effects).
        repetitions: `[(k, B, loss)]`, the samples tiled `k` times.
        subbatches: `[(B, mean loss over the disjoint sub-batches of size B)]`.
        return_shape: shape the loss returns before Keras reduces it, with
            `"B"` for the batch axis (e.g. `("B",)`, `()`, `("B", 100)`).
        reduction: the reduction `compile` applies (`None` if the loss
            reduces itself).
        num_replicas: replicas of the split check.
        replica_ratio: (sum over replicas of what each replica optimizes) /
            (single-device loss), each replica seeing the same samples:
            1 when a replica split leaves the objective unchanged.
        replica_ratio_split: the same ratio with the samples split into
            `num_replicas` distinct parts, ordered by their count (the
            replica of fewest counts first).
        replica_mode: `"mirrored"` (a real `tf.distribute.MirroredStrategy`)
            or `"simulated"` (Keras's own reduction code run with the replica
            count set; the rule `tf.distribute` applies).
        notes: further remarks (shape interactions, caveats).
        unequal_split_factor: on that split, `max_i r_i / min_i r_i` with
            `r_i` sample `i`'s weight in the replicas' summed objective over
            its weight in the one-device loss: 1 when exact (see
            `keras_batchfix.diagnose`).
        accumulation_factor: the same for `accumulation_steps`
            micro-batches of the samples ordered by their count.
        accumulation_steps: micro-batches of the accumulation check.
        accumulation_mode: `"keras"` (Keras's `gradient_accumulation_steps`:
            the mean of the micro-batches' losses) or `"micro_batches"` (a
            loss with a count, as `keras_batchfix.Model`'s
            `compile(micro_batches=k)` accumulates it).
        keras_accumulation_factor: for `"micro_batches"`, the factor under
            Keras's own `gradient_accumulation_steps` (else the same as
            `accumulation_factor`).
        probes: how each factor was measured: `"sample weights"` (one-hot
            weights, exact) or `"predictions"` (finite differences).
    """

    verdict: str
    fix: str
    advice: str
    exponent: float
    exponent_subbatches: float
    repetitions: list
    subbatches: list
    return_shape: tuple
    reduction: object
    num_replicas: int
    replica_ratio: float
    replica_ratio_split: float
    replica_mode: str
    notes: list
    loss_name: str = "loss"
    tolerance: float = 0.1
    unequal_split_factor: float = float("nan")
    accumulation_factor: float = float("nan")
    accumulation_steps: int = 2
    accumulation_mode: str = KERAS_ACCUMULATION
    keras_accumulation_factor: float = float("nan")
    probes: dict = dataclasses.field(default_factory=dict)

    @property
    def ok(self):
        """True when no fix is needed."""
        return self.fix == "none"

    def spike_factor(self, batch_size, last_batch_size):
        """Loss of a short batch relative to a full one, from the exponent.

        `(last_batch_size / batch_size) ** exponent`: 8.0 for a loss divided
        by the batch size twice, with batches of 32 and a last batch of 4;
        1.0 when invariant.
        """
        return (last_batch_size / batch_size) ** self.exponent

    def to_dict(self):
        return dataclasses.asdict(self)

    def __str__(self):
        lines = [f"keras_batchfix.diagnose: {self.loss_name}"]
        shape = "(" + ", ".join(str(d) for d in self.return_shape) + (
            ",)" if len(self.return_shape) == 1 else ")"
        )
        lines.append(
            f"  returns shape {shape}; compile reduces it with "
            f"reduction={self.reduction!r}"
        )
        reps = ", ".join(
            f"B={b}: {value:.6g}" for _, b, value in self.repetitions
        )
        lines.append(f"  same samples repeated   {reps}")
        subs = ", ".join(f"B={b}: {value:.6g}" for b, value in self.subbatches)
        lines.append(f"  disjoint sub-batches    {subs}")
        lines.append(
            f"  exponent of B: {_fmt(self.exponent)} (repetitions), "
            f"{_fmt(self.exponent_subbatches)} (sub-batches); "
            "0 invariant, -1 divided by B twice, +1 unnormalized sum"
        )
        lines.append(
            f"  {self.num_replicas}-replica split ({self.replica_mode}): "
            f"objective x{_fmt(self.replica_ratio)} (same samples per "
            f"replica), x{_fmt(self.replica_ratio_split)} (distinct samples, "
            "fewest counts on replica 0)"
        )
        lines.extend(split_lines(self))
        if len(self.repetitions) > 1:
            big = self.repetitions[-1][1]
            lines.append(
                f"  a last batch of {max(1, big // 8)} after batches of {big}"
                f" would weigh x{_fmt(self.spike_factor(big, max(1, big // 8)))}"
            )
        for note in self.notes:
            lines.append(f"  note: {note}")
        lines.append(f"VERDICT: {self.verdict} -> fix: {self.fix}")
        lines.append(f"  {self.advice}")
        return "\n".join(lines)


_fmt = _split_weights.fmt


def split_lines(result):
    """The report's lines on the unequal split and the accumulation."""
    how = "Keras's gradient_accumulation_steps, the mean of the micro-batches' " \
        "losses" if result.accumulation_mode == KERAS_ACCUMULATION else \
        "compile(micro_batches=k): numerators and counts summed, divided once"
    lines = [
        f"  unequal counts over {result.num_replicas} replicas: sample weights "
        f"up to x{_fmt(result.unequal_split_factor)} apart (1 exact)",
        f"  accumulation over {result.accumulation_steps} micro-batches ({how}):"
        f" sample weights up to x{_fmt(result.accumulation_factor)} apart "
        "(1 exact)",
    ]
    keras_factor = getattr(result, "keras_accumulation_factor", None)
    if result.accumulation_mode != KERAS_ACCUMULATION and keras_factor is not None:
        lines.append(
            "  under Keras's own gradient_accumulation_steps: "
            f"x{_fmt(keras_factor)}"
        )
    return lines


def diagnose(
    loss,
    y_true,
    y_pred,
    sample_weight=None,
    repeats=(1, 2, 4),
    num_replicas=2,
    tolerance=0.1,
    verbose=0,
    accumulation_steps=2,
):
    """Finds out whether (and how) a loss's scale depends on the batch and its splits.

    The loss is wrapped exactly as `model.compile(loss=loss)` wraps it
    (Keras's `CompileLoss`: a plain function gets a `LossFunctionWrapper`
    with `reduction="sum_over_batch_size"`, a string is resolved, a
    `keras.losses.Loss` keeps its own reduction), and evaluated

    * on the given samples tiled `k` times for `k` in `repeats`: the samples
      do not change, only the batch size, so the fitted exponent
      `d log(loss) / d log(B)` is the batch-size effect alone (0 invariant,
      -1 the "divided by the batch size twice" bug, +1 an unnormalized sum);
    * on disjoint sub-batches of sizes 1, 2, 4, ... (their mean loss), for
      the exponent including composition effects;
    * split across `num_replicas` replicas as `tf.distribute` would: the sum
      of what each replica optimizes (Keras sums replica gradients) divided
      by the single-device loss. With two or more TensorFlow logical devices
      a real `MirroredStrategy` is used; otherwise Keras's reduction code runs
      with the replica count set (scalar returns skip the `1/num_replicas`);
    * split with unequal counts, over the replicas and over
      `accumulation_steps` micro-batches: the samples are ordered by their
      count (`c_i / l_i`, below) and cut into equal parts, fewest counts
      first. For each sample, with `L(w)` the one-device loss under
      per-sample weights `w` and `O(w)` the split's objective,

          r_i = (O(e_i) - O(0)) / (L(e_i) - L(0))      (e_i one-hot)
          factor = max_i r_i / min_i r_i                (1 when exact)

      `c_i = L(e_i) - L(0)` is sample `i`'s share of the loss (the loss is
      linear in its weights) and `l_i` its loss alone. `O` is the sum over
      the replicas, or, for accumulation, the mean of the micro-batches'
      losses (Keras's `gradient_accumulation_steps`); a loss that hands
      its count (`compensate(..., count=...)`, `SSDMultiboxLoss`) is
      accumulated as `keras_batchfix.Model`'s `compile(micro_batches=k)`
      does: `sum_m numerator_m / divisor(sum_m count_m)`. A uniform `r`
      (`1/k` for a summed loss) is the batch exponent's, not a
      reweighting. A loss not linear in its weights (a scalar return) is
      measured per part instead, by finite differences of its predictions.

    Args:
        loss: what you pass to `compile`: a function `(y_true, y_pred) ->
            values`, a `keras.losses.Loss`, or a Keras loss name.
        y_true, y_pred: one batch of targets and predictions (arrays with the
            batch on axis 0; at least 2 samples). Single-output models only.
        sample_weight: optional `(B,)` weights.
        repeats: tiling factors for the repetition measurement.
        num_replicas: replicas of the split checks (>= 2).
        tolerance: how far from -1, 0 or +1 an exponent (and from 1 a replica
            ratio or a factor, relatively) may be to count as that value.
        verbose: 0 (default) prints nothing, 1 prints the report. Either
            way `print(result)` shows it.
        accumulation_steps: micro-batches of the accumulation check (>= 2).

    Returns:
        A `Diagnosis` (`str()` of it is the report; `.verdict`, `.fix`,
        `.exponent`, `.replica_ratio`, `.unequal_split_factor`,
        `.accumulation_factor`, ... for scripts and tests).

    Example:

    ```python
    def my_loss(y_true, y_pred):  # per image, divided by the batch's positives
        positives = ops.sum(y_true[..., 0])
        per_image = ops.sum(y_true[..., 0] * ops.square(y_true[..., 1] - y_pred[..., 0]), 1)
        return per_image / ops.maximum(positives, 1.0)

    result = keras_batchfix.diagnose(my_loss, y_true, y_pred)
    result.verdict              # "inverse_batch_size"
    result.fix                  # "compensate": compile(loss=keras_batchfix.compensate(my_loss))
    result.accumulation_factor  # e.g. 2.5: micro-batches with few positives weigh more
    ```
    """
    _check_verbose(verbose)
    y_true = _as_array(y_true, "y_true")
    y_pred = _as_array(y_pred, "y_pred")
    n = y_true.shape[0]
    if y_pred.shape[0] != n:
        raise ValueError(
            "`y_true` and `y_pred` must have the same batch size; received "
            f"{y_true.shape[0]} and {y_pred.shape[0]}."
        )
    if n < 2:
        raise ValueError(
            f"`diagnose` needs at least 2 samples; received batch size {n}."
        )
    if sample_weight is not None:
        sample_weight = _as_array(sample_weight, "sample_weight")
    repeats = _repeats(repeats)
    num_replicas = _validation.integer("num_replicas", num_replicas, 2)
    tolerance = _validation.real(
        "tolerance", tolerance, "a float > 0", lambda v: v > 0
    )
    accumulation_steps = _check_steps(accumulation_steps)

    steady_state = isinstance(loss, NormalizedLoss) and loss.normalizer.stateful
    if steady_state:
        loss = _at_steady_state(loss)
    compiled = _compiled_loss(loss, y_true, y_pred)
    loss_obj = compiled.inner
    loss_name = getattr(loss_obj, "name", None) or getattr(
        loss, "__name__", repr(loss)
    )
    # The values before Keras reduces them: first, so that a loss returning
    # no numbers is named (not a conversion error deep in Keras).
    raw = _raw_values(loss_obj, loss_name, y_true, y_pred)

    fast = compiled.compiled()

    def evaluate(yt, yp, sw):
        return float(fast(yt, yp, sw))

    def sw_take(index):
        return None if sample_weight is None else sample_weight[index]

    # 1. Same samples, repeated: the batch-size effect alone.
    repetitions = []
    for k in repeats:
        reps = (k,) + (1,) * (y_true.ndim - 1)
        yt, yp = np.tile(y_true, reps), np.tile(y_pred, (k,) + (1,) * (y_pred.ndim - 1))
        sw = None if sample_weight is None else np.tile(
            sample_weight, (k,) + (1,) * (sample_weight.ndim - 1)
        )
        repetitions.append((k, k * n, evaluate(yt, yp, sw)))
    exponent = _slope([b for _, b, _ in repetitions], [v for _, _, v in repetitions])

    # 2. Disjoint sub-batches of sizes 1, 2, 4, ..., n.
    subbatches = []
    sizes = [2**i for i in range(int(math.log2(n)) + 1) if 2**i < n] + [n]
    for size in sizes:
        chunks = [
            evaluate(
                y_true[i : i + size],
                y_pred[i : i + size],
                sw_take(slice(i, i + size)),
            )
            for i in range(0, n - size + 1, size)
        ]
        subbatches.append((size, float(np.mean(chunks))))
    exponent_sub = _slope([b for b, _ in subbatches], [v for _, v in subbatches])

    # 3. Return shape (before Keras reduces it).
    raw_shape = tuple(ops.shape(raw))
    return_shape = tuple(
        "B" if (i == 0 and d == n) else int(d) for i, d in enumerate(raw_shape)
    )
    reduction = getattr(loss_obj, "reduction", None)

    # 4. Replica split: same samples on every replica, and distinct samples
    # ordered by their count (fewest on replica 0).
    probe = _Probe(fast, y_true, y_pred, sample_weight, rank=len(raw_shape))
    order = probe.count_order()
    replica_mode, distributed = _replica_setup(compiled, num_replicas)
    replica_ratio = _replica_ratio_same(
        fast, distributed, y_true, y_pred, sample_weight, num_replicas
    )
    rep_index, rep_parts = _split_weights.equal_parts(order, num_replicas)
    whole_split = probe.loss(rep_index)
    total = distributed(probe.parts(rep_index, rep_parts))
    replica_ratio_split = total / whole_split if whole_split else float("nan")
    unequal, replica_probe = probe.split_factor(rep_index, rep_parts, distributed)

    # 5. Accumulation over micro-batches, ordered by count.
    acc_index, acc_parts = _split_weights.equal_parts(
        order, min(accumulation_steps, n)
    )

    def keras_accumulated(parts):
        return sum(float(fast(*part)) for part in parts) / len(parts)

    keras_factor, keras_probe = probe.split_factor(
        acc_index, acc_parts, keras_accumulated
    )
    if _has_count(loss_obj, y_true, y_pred):
        accumulation_mode = MICRO_BATCHES
        accumulation, accumulation_probe = probe.split_factor(
            acc_index, acc_parts, _micro_batches_loss(loss_obj)
        )
    else:
        accumulation_mode = KERAS_ACCUMULATION
        accumulation, accumulation_probe = keras_factor, keras_probe

    notes = []
    if steady_state:
        notes.append(
            "EMACount diagnosed at its steady state, the moving average equal "
            "to each batch's global count (as GlobalCount)."
        )
    if len(raw_shape) == 0:
        if math.isfinite(replica_ratio) and abs(replica_ratio - 1) <= tolerance:
            notes.append(
                "the loss returns a scalar (Keras's reduction passes it "
                "through); a replica split leaves its objective unchanged."
            )
        else:
            notes.append(
                "the loss returns a scalar: every Keras reduction passes it "
                "through unchanged and, on TensorFlow, it skips the "
                "1/num_replicas factor of tf.distribute."
            )
    elif len(raw_shape) >= 2 and reduction in MEAN_REDUCTIONS:
        per_sample = int(np.prod(raw_shape[1:]))
        notes.append(
            f"Keras divides by all {n * per_sample} returned elements, not by "
            f"the {n} samples: a constant factor 1/{per_sample} on a "
            "per-sample mean (not batch dependent; return shape (B,) to "
            "average per sample)."
        )
    elif len(raw_shape) >= 1 and raw_shape[0] != n:
        notes.append(
            f"the returned values' first axis ({raw_shape[0]}) is not the "
            f"batch ({n}): `sample_weight` and masks will not line up."
        )
    if replica_mode == "simulated":
        notes.append(
            "replica split simulated with Keras's reduction code (no 2 "
            "TensorFlow devices here): a loss that reads "
            "num_replicas_in_sync itself is seen as on one replica."
        )
    if (
        math.isfinite(exponent)
        and math.isfinite(exponent_sub)
        and abs(exponent_sub - exponent) > tolerance
    ):
        notes.append(
            "the sub-batch exponent differs from the repetition exponent: "
            "the loss also depends on which samples share a batch (batch "
            "statistics, clamped counts, in-batch mining); the verdict uses "
            "the repetition exponent."
        )
    probes = {"replicas": replica_probe, "accumulation": accumulation_probe}
    if "predictions" in probes.values():
        notes.append(
            "the loss is not linear in per-sample weights (a scalar return, "
            "reduction='mean_with_sample_weight'): "
            "the split factors are finite differences of each part's "
            "predictions (float32: about 1e-3)."
        )
    for name, value in (("unequal-count split", unequal), ("accumulation", accumulation)):
        if math.isnan(value):
            notes.append(f"the {name} factor could not be measured (a zero loss?).")

    non_finite = [b for _, b, value in repetitions if not math.isfinite(value)]
    if non_finite:
        verdict = "non_finite"
        advice = _non_finite_advice(
            loss_name, non_finite, y_true, y_pred, sample_weight
        )
    else:
        verdict = _classify(
            exponent, replica_ratio, num_replicas, tolerance, unequal, accumulation
        )
        advice = _advice(
            verdict, exponent, raw_shape, loss_obj, num_replicas,
            unequal=unequal, accumulation=accumulation,
            accumulation_mode=accumulation_mode, steps=len(acc_parts),
            keras_factor=keras_factor, tolerance=tolerance,
        )
    result = Diagnosis(
        verdict=verdict,
        fix=FIXES[verdict],
        advice=advice,
        exponent=exponent,
        exponent_subbatches=exponent_sub,
        repetitions=repetitions,
        subbatches=subbatches,
        return_shape=return_shape,
        reduction=reduction,
        num_replicas=num_replicas,
        replica_ratio=replica_ratio,
        replica_ratio_split=replica_ratio_split,
        replica_mode=replica_mode,
        notes=notes,
        loss_name=str(loss_name),
        tolerance=tolerance,
        unequal_split_factor=unequal,
        accumulation_factor=accumulation,
        accumulation_steps=len(acc_parts),
        accumulation_mode=accumulation_mode,
        keras_accumulation_factor=keras_factor,
        probes=probes,
    )
    if verbose:
        print_msg(str(result))
    return result


def _check_steps(accumulation_steps):
    """`accumulation_steps` as an int; a named error unless an integer >= 2."""
    return _validation.integer("accumulation_steps", accumulation_steps, 2)


class _Probe:
    """The loss on ordered subsets of the batch, with probe weights or moved predictions."""

    def __init__(self, fast, y_true, y_pred, sample_weight, rank):
        self.fast = fast
        self.y_true, self.y_pred, self.sample_weight = y_true, y_pred, sample_weight
        self.linear = rank > 0  # per-sample values: weights probe samples
        self.natural_shares = None  # the samples' shares, set by count_order
        # Keras broadcasts weights only to values of their rank.
        self.rank = rank if sample_weight is None else sample_weight.ndim

    def data(self, index, weights=None, delta=None):
        """`(y_true, y_pred, sample_weight)` of samples `index`."""
        y_pred = self.y_pred[index]
        if delta is not None:
            y_pred = y_pred + delta
        sw = None if self.sample_weight is None else self.sample_weight[index]
        if weights is not None:
            weights = np.asarray(weights, "float32").reshape(
                (-1,) + (1,) * (self.rank - 1)
            )
            sw = weights if sw is None else sw * weights
        return self.y_true[index], y_pred, sw

    def loss(self, index, weights=None, delta=None):
        return float(self.fast(*self.data(index, weights, delta)))

    def parts(self, index, parts, weights=None, delta=None):
        return [
            self.data(
                index[part],
                None if weights is None else weights[part],
                None if delta is None else delta[part],
            )
            for part in parts
        ]

    def count_order(self):
        """The samples ordered by their count (see `_split_weights`)."""
        n = len(self.y_true)
        everything = np.arange(n)
        shares = None
        if self.linear:
            shares = _split_weights.shares(lambda w: self.loss(everything, w), n)
        self.natural_shares = shares
        singles = [self.loss(np.array([i])) for i in range(n)]
        if shares is None:  # move one sample's predictions at a time
            moves = _split_weights.noise_like(self.y_pred, seed=1)
            base = self.loss(everything)
            shares, singles_moved = [], []
            for i in range(n):
                delta = np.zeros_like(moves)
                delta[i] = moves[i]
                shares.append(self.loss(everything, delta=delta) - base)
                singles_moved.append(
                    self.loss(np.array([i]), delta=moves[i : i + 1]) - singles[i]
                )
            singles = singles_moved
        return _split_weights.count_order(
            _split_weights.relative_counts(shares, singles)
        )

    def split_factor(self, index, parts, objective):
        """`(factor, probe)` of `objective(parts' data)` against the loss of `index`."""

        def split(weights=None, delta=None):
            return objective(self.parts(index, parts, weights, delta))

        if self.linear and self.natural_shares is not None:
            if len(index) == len(self.y_true):  # the batch, reordered
                whole = self.natural_shares[index]
            else:
                whole = _split_weights.shares(lambda w: self.loss(index, w), len(index))
            if whole is not None:
                shares = _split_weights.shares(split, len(index))
                if shares is not None:
                    return _split_weights.factor(shares, whole), "sample weights"
        moves = _split_weights.noise_like(self.y_pred[index], seed=0)
        base_whole, base_split = self.loss(index), split()
        whole, shares = [], []
        for part in parts:
            delta = np.zeros_like(moves)
            delta[part] = moves[part]
            whole.append(self.loss(index, delta=delta) - base_whole)
            shares.append(split(delta=delta) - base_split)
        return _split_weights.factor(shares, whole), "predictions"


def _has_count(loss, y_true, y_pred):
    """Whether `loss` hands `micro_batches` a numerator and a count."""
    if not isinstance(loss, NormalizedLoss):
        return False
    _, count = loss.numerator_and_count(
        ops.convert_to_tensor(y_true, dtype=loss.dtype),
        ops.convert_to_tensor(y_pred, dtype=loss.dtype),
    )
    return count is not None


def _micro_batches_loss(loss):
    """`parts -> sum_m sum_i w_i numerator_{m,i} / divisor(sum_m count_m)`.

    What `compile(micro_batches=k)` optimizes for a `NormalizedLoss` with a
    count: the numerators and the counts of the micro-batches summed, and
    divided once (`keras_batchfix.training.accumulation`); `parts` holds each
    micro-batch's `(y_true, y_pred, sample_weight)`. Jitted on JAX.
    """

    def value(parts):
        numerators, total = [], None
        for y_true, y_pred, sw in parts:
            numerator, count = loss.numerator_and_count(
                ops.convert_to_tensor(y_true, dtype=loss.dtype),
                ops.convert_to_tensor(y_pred, dtype=loss.dtype),
            )
            numerators.append(
                (_as_values(loss, "numerator", numerator, loss.dtype), sw)
            )
            count = _as_values(loss, "count", count, "float32")
            total = count if total is None else total + count
        divisor = loss.normalizer.divisor(total)
        result = 0.0
        for numerator, sw in numerators:
            values = replicas.to_keras(
                numerator, divisor, loss.normalizer.is_global,
                route=replicas.COMPILED,
            )
            weights = None if sw is None else ops.convert_to_tensor(sw, dtype=loss.dtype)
            result = result + weighted_sum(values, weights)
        return result

    fast = _jitted(value)
    return lambda parts: float(fast(parts))


def _check_verbose(verbose):
    if verbose not in (0, 1):
        raise ValueError(f"Argument `verbose` must be 0 or 1; received {verbose!r}.")


def _repeats(repeats):
    """The sorted distinct tiling factors; a named error unless two or more >= 1."""
    try:
        factors = sorted({_validation.integer("repeats", k, 1) for k in repeats})
    except (TypeError, ValueError):
        factors = []
    if len(factors) < 2:
        raise ValueError(
            "Argument `repeats` must be two or more distinct integers >= 1 "
            f"(tiling factors, e.g. (1, 2, 4)); received repeats={repeats!r}."
        )
    return factors


def _raw_values(loss_obj, loss_name, y_true, y_pred):
    """The loss's unreduced values on the batch; a `ValueError` naming the
    loss if they are not numbers (`None`, a string, ...)."""
    raw = loss_obj.call(
        ops.convert_to_tensor(y_true, dtype=loss_obj.dtype),
        ops.convert_to_tensor(y_pred, dtype=loss_obj.dtype),
    )
    problem = None
    if raw is None or isinstance(raw, (str, bytes)):
        problem = f"it returned {raw!r}"
    else:
        try:
            raw = ops.convert_to_tensor(raw)
        except (TypeError, ValueError) as error:
            problem = f"it returned a {type(raw).__name__} ({error})"
        else:
            dtype = keras.backend.standardize_dtype(raw.dtype)
            if "float" not in dtype and "int" not in dtype:
                problem = f"it returned values of dtype {dtype}"
    if problem is not None:
        raise ValueError(
            f"Loss {str(loss_name)!r} must return numeric loss values (a tensor "
            f"of shape (batch_size,), (batch_size, ...) or ()); {problem}."
        )
    return raw


def _non_finite_advice(loss_name, batch_sizes, y_true, y_pred, sample_weight):
    """What `diagnose` says when the loss is NaN or infinite."""
    counts = []
    for name, array in (
        ("y_true", y_true), ("y_pred", y_pred), ("sample_weight", sample_weight)
    ):
        if array is None or array.dtype.kind not in "fc":
            continue
        bad = int(np.sum(~np.isfinite(array)))
        if bad:
            counts.append(f"{name} {bad} of {array.size}")
    if counts:
        inputs = "The inputs hold NaN or infinite entries: " + ", ".join(counts)
    else:
        inputs = "The inputs are finite: the loss itself makes the NaN or infinity"
    sizes = ", ".join(str(b) for b in batch_sizes)
    return (
        f"The loss {loss_name!r} is NaN or infinite (at B={sizes}): its batch-size "
        f"scaling cannot be measured. {inputs}. Fix the inputs (or the loss: a "
        "log of 0, a division by a zero count), then diagnose again."
    )


def _as_array(x, name):
    if isinstance(x, (list, tuple, dict)):
        raise ValueError(
            f"`{name}` must be one array (single-output models); received a "
            f"{type(x).__name__}."
        )
    x = np.asarray(keras.ops.convert_to_numpy(x))
    if x.ndim == 0:
        raise ValueError(f"`{name}` must have a batch axis; received a scalar.")
    return x


class _Compiled:
    """The loss as `compile` applies it: `CompileLoss` of the user's loss."""

    def __init__(self, loss, y_true, y_pred):
        self.compile_loss, self.inner = compile_loss(
            loss, ops.convert_to_tensor(y_true), ops.convert_to_tensor(y_pred)
        )

    def __call__(self, y_true, y_pred, sample_weight=None):
        return self.compile_loss(
            ops.convert_to_tensor(y_true),
            ops.convert_to_tensor(y_pred),
            None if sample_weight is None else ops.convert_to_tensor(sample_weight),
        )

    def compiled(self):
        """A function like `self`, compiled where eager ops are slow (JAX).

        JAX compiles every op for every new shape when run eagerly; one
        `jax.jit` per shape is much faster. Each call returns a fresh jitted
        function, so a trace made under `_replicas` is never reused outside.
        Losses that cannot be traced run eagerly.
        """
        # A new function object: jax caches traces by function, and a bound
        # method compares equal to every other bound `self.__call__`.
        return _jitted(lambda y_true, y_pred, sample_weight=None: self(
            y_true, y_pred, sample_weight))


def _jitted(function):
    """`function` under `jax.jit` on JAX (eager if it cannot be traced), else itself."""
    if keras.backend.backend() != "jax":
        return function
    import jax

    jitted = jax.jit(function)
    state = {"eager": False}

    def call(*args):
        if not state["eager"]:
            try:
                return jitted(*args)
            except jax.errors.JAXTypeError:
                state["eager"] = True
        return function(*args)

    return call


def _at_steady_state(loss):
    """A copy of `loss` whose stateful normalizer is replaced by `GlobalCount`.

    An EMA of the count is a constant over a few steps, so over one batch an
    `EMACount` loss scales with the batch; in training the EMA follows the
    typical count, which is what `GlobalCount` divides by at every batch size.
    """
    steady = type(loss).from_config(loss.get_config())
    steady.normalizer = normalizers.GlobalCount()
    return steady


def _compiled_loss(loss, y_true, y_pred):
    return _Compiled(loss, y_true, y_pred)


def _slope(batch_sizes, values):
    """Least-squares slope of log|value| against log(batch size)."""
    values = np.asarray(values, dtype="float64")
    signs = np.sign(values)
    if not np.all(np.isfinite(values)) or np.any(values == 0):
        return float("nan")
    if np.any(signs != signs[0]):
        return float("nan")
    x = np.log(np.asarray(batch_sizes, dtype="float64"))
    y = np.log(np.abs(values))
    if np.ptp(x) == 0:
        return float("nan")
    return float(np.polyfit(x, y, 1)[0])


def _off(value, tolerance):
    """Whether a factor is measured and away from 1 (relatively)."""
    return not math.isnan(value) and not abs(value - 1) <= tolerance


def _classify(
    exponent, replica_ratio, num_replicas, tolerance,
    unequal=float("nan"), accumulation=float("nan"),
):
    if not math.isfinite(exponent):
        return "other"
    if abs(exponent + 1) <= tolerance:
        return "inverse_batch_size"
    if abs(exponent - 1) <= tolerance:
        return "batch_size"
    if abs(exponent) > tolerance:
        return "other"
    if math.isfinite(replica_ratio) and abs(replica_ratio - 1) > tolerance:
        return "replica_scaling"
    return split_verdict(unequal, accumulation, tolerance)


def split_verdict(unequal, accumulation, tolerance):
    """The verdict of a loss exact on one device, from its split factors."""
    if _off(unequal, tolerance) and _off(accumulation, tolerance):
        return "local_count"
    if _off(unequal, tolerance):
        return "replica_split"
    if _off(accumulation, tolerance):
        return "accumulation"
    return "invariant"


def exact_splits(unequal, accumulation, steps, num_replicas):
    """What the measurements show exact, in words (for an `invariant` verdict)."""
    exact, unknown = [], []
    (exact if math.isfinite(unequal) else unknown).append(
        f"a {num_replicas}-replica split with unequal counts"
    )
    (exact if math.isfinite(accumulation) else unknown).append(
        f"gradient accumulation over {steps} micro-batches"
    )
    text = "of the batch size"
    if exact:
        text += ", of " + " and of ".join(exact)
    if unknown:
        text += " (not measured: " + ", ".join(unknown) + ")"
    return text


def _global(loss_obj):
    return isinstance(loss_obj, NormalizedLoss) and getattr(
        loss_obj.normalizer, "is_global", False
    )


def _advice(
    verdict, exponent, raw_shape, loss_obj, num_replicas,
    unequal=float("nan"), accumulation=float("nan"),
    accumulation_mode=KERAS_ACCUMULATION, steps=2, keras_factor=float("nan"),
    tolerance=0.1,
):
    if verdict == "invariant":
        text = (
            "No fix needed: the loss is independent "
            + exact_splits(unequal, accumulation, steps, num_replicas)
            + "."
        )
        if accumulation_mode == MICRO_BATCHES and _off(keras_factor, tolerance):
            text += (
                " Accumulate with keras_batchfix.Model and compile(..., "
                "micro_batches=k): Keras's own gradient_accumulation_steps "
                "divides each micro-batch by its own count (sample weights "
                f"x{_fmt(keras_factor)} apart)."
            )
        return text
    if verdict == "inverse_batch_size":
        return (
            "The loss divides by a count from the batch and Keras divides by "
            "the batch size again: short batches get a loss and gradient "
            "B/b times too large. Fix: compile(loss=keras_batchfix."
            "compensate(your_loss)) (or return the un-normalized values and "
            "pass count=... to compensate). Multiplying by the batch size "
            "works on one device only. For replicas and gradient "
            "accumulation, hand the count: keras_batchfix.compensate("
            "numerator, count=..., normalizer=keras_batchfix.GlobalCount())."
        )
    if verdict == "batch_size":
        if (
            isinstance(loss_obj, keras.losses.Loss)
            and getattr(loss_obj, "reduction", None) == "sum"
            and len(raw_shape) >= 1
        ):
            return (
                "The loss is reduced with reduction='sum': it grows with the "
                "batch. Fix: reduction='sum_over_batch_size' (the default)."
            )
        return (
            "The loss returns a sum over the batch: it grows with the batch "
            "size. Fix: return per-sample values of shape (B,) and keep the "
            "default reduction 'sum_over_batch_size' (or divide by the batch "
            "size, or by a count with keras_batchfix.compensate(..., count=...))."
        )
    if verdict == "replica_scaling":
        return (
            f"Batch-size invariant, but split over {num_replicas} replicas the "
            "objective changes (a scalar return skips Keras's 1/num_replicas "
            "under tf.distribute). Fix: return per-sample values of shape (B,)"
            " so Keras's reduction scales it, or wrap it with "
            "keras_batchfix.compensate(your_loss)."
        )
    if verdict in ("replica_split", "accumulation", "local_count"):
        return split_advice(
            verdict, unequal, accumulation, num_replicas, steps,
            accumulation_mode, counts_global=_global(loss_obj),
        )
    return (
        f"The loss scales as B^{exponent:.3g}, none of the usual cases: check "
        "how it normalizes (a clamped or nonlinear count?) and compare with "
        "keras_batchfix.compensate(..., count=...)."
    )


GLOBAL_COUNT_FIX = (
    "keras_batchfix.compensate(numerator, count=..., "
    "normalizer=keras_batchfix.GlobalCount())"
)
MICRO_BATCHES_FIX = (
    "keras_batchfix.Model(...) and compile(..., micro_batches=k) instead of "
    "the optimizer's gradient_accumulation_steps=k"
)


def split_advice(
    verdict, unequal, accumulation, num_replicas, steps, accumulation_mode,
    counts_global=False, model=False,
):
    """Advice for the split verdicts, of a loss (`diagnose`) or a model.

    `counts_global`: the replicas divide by the count of them all already
    (a `GlobalCount`, the package's step), so a split that is still
    inexact has a numerator that is not a sum over samples.
    """
    subject = "the model's loss" if model else "the loss"
    replicas_text = (
        f"split over {num_replicas} replicas with unequal counts (say long "
        "sequences on one, short on the other), each replica divides by its "
        "own count and the replicas' losses are averaged: samples weigh up to "
        f"x{_fmt(unequal)} differently than on one device"
    )
    accumulation_text = (
        f"under Keras's gradient_accumulation_steps={steps}, the mean of the "
        "micro-batches' own losses, each micro-batch divides by its own "
        f"count: samples weigh up to x{_fmt(accumulation)} differently than "
        "in one pass over the batch"
    )
    not_additive = (
        f"{subject} hands its counts, but a numerator (or count) depends on "
        "which samples share a part (in-batch mining as SSDMultiboxLoss("
        "mining='batch'), batch statistics), so the parts cannot add up to "
        "the whole. Fix: per-sample terms (mining='per_image')."
    )
    if model:
        replica_fix = (
            "keras_batchfix.Model(...) with compile(..., micro_batches=k): its "
            "step divides Keras's mean losses (masked ones included) and the "
            "package's losses by the count summed over the micro-batches and "
            f"the replicas; or compile a loss with a global count, {GLOBAL_COUNT_FIX}"
        )
        accumulation_fix = (
            f"{MICRO_BATCHES_FIX}: its step sums the micro-batches' numerators "
            "and counts (of Keras's mean losses, masked ones included, and of "
            "the package's losses) and divides once"
        )
        both_fix = replica_fix + " (then accumulate with micro_batches too)"
    else:
        replica_fix = (
            f"divide by the count of all replicas, {GLOBAL_COUNT_FIX} (a "
            "package loss: normalizer=keras_batchfix.GlobalCount())"
        )
        accumulation_fix = (
            f"{MICRO_BATCHES_FIX}: it sums the micro-batches' numerators and "
            "counts and divides once (the loss must hand its count: "
            "keras_batchfix.compensate(numerator, count=...))"
        )
        both_fix = (
            f"hand the count to the package, {GLOBAL_COUNT_FIX}, and "
            f"accumulate with {MICRO_BATCHES_FIX}"
        )
    micro = accumulation_mode == MICRO_BATCHES
    if verdict == "replica_split":
        if counts_global:
            return (
                f"Exact on one device, but split over {num_replicas} replicas "
                f"samples weigh up to x{_fmt(unequal)} differently: " + not_additive
            )
        return f"Exact on one device, but {replicas_text}. Fix: {replica_fix}."
    if verdict == "accumulation":
        if micro:
            return (
                f"Exact on one device and across replicas, but over {steps} "
                f"micro-batches samples weigh up to x{_fmt(accumulation)} "
                "differently: " + not_additive
            )
        return (
            f"Exact on one device and across replicas, but {accumulation_text}."
            f" Fix: {accumulation_fix}."
        )
    if counts_global and micro:
        return (
            f"Exact on one device, but split over {num_replicas} replicas "
            f"samples weigh up to x{_fmt(unequal)} differently, and over "
            f"{steps} micro-batches up to x{_fmt(accumulation)}: " + not_additive
        )
    return (
        f"Exact on one device, but {subject} divides by the count of whatever "
        f"batch it is given: {replicas_text}; and {accumulation_text}. Fix: "
        f"{both_fix}."
    )


# ---------------------------------------------------------------------------
# Replica split
# ---------------------------------------------------------------------------


def _replica_setup(compiled, num_replicas):
    """`(mode, distributed)`: `distributed(parts)` sums the replicas' objectives.

    `parts` holds one `(y_true, y_pred, sample_weight)` per replica.
    """
    devices = _tf_devices(num_replicas)
    if devices is not None:
        return "mirrored", _mirrored(compiled, devices)
    return "simulated", _simulated(compiled, num_replicas)


def _replica_ratio_same(fast, distributed, y_true, y_pred, sample_weight, r):
    """The replicas' summed objective over the one-device loss, same samples each."""

    def tile(x):
        return None if x is None else np.tile(x, (r,) + (1,) * (x.ndim - 1))

    single = float(fast(tile(y_true), tile(y_pred), tile(sample_weight)))
    if single == 0:
        return float("nan")
    return distributed([(y_true, y_pred, sample_weight)] * r) / single


def _tf_devices(num_replicas):
    if keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    for kind in ("GPU", "CPU"):
        devices = tf.config.list_logical_devices(kind)
        if len(devices) >= num_replicas:
            return [d.name for d in devices[:num_replicas]]
    return None


def _mirrored(compiled, devices):
    import tensorflow as tf

    # No collective ops: their instance keys clash between strategies.
    strategy = tf.distribute.MirroredStrategy(
        devices, cross_device_ops=tf.distribute.ReductionToOneDevice()
    )
    steps = {}  # one traced step with weights and one without

    def step_for(has_weights):
        if has_weights not in steps:

            @tf.function
            def step(values):
                def replica_fn(yt, yp, sw):
                    return compiled(yt, yp, sw if has_weights else None)

                per_replica = strategy.run(replica_fn, args=values)
                return strategy.reduce("SUM", per_replica, axis=None)

            steps[has_weights] = step
        return steps[has_weights]

    def distributed(parts):
        def value_fn(context):
            yt, yp, sw = parts[context.replica_id_in_sync_group]
            return (
                tf.constant(yt),
                tf.constant(yp),
                tf.constant(1.0 if sw is None else sw),
            )

        values = strategy.experimental_distribute_values_from_function(value_fn)
        return float(step_for(parts[0][2] is not None)(values))

    return distributed


def _simulated(compiled, num_replicas):
    fast = compiled.compiled()  # only ever traced and run under _replicas
    global_count = _global_count_loss(compiled.inner)
    if global_count is None:

        def distributed(parts):
            with replicas.simulated_replicas(num_replicas):
                return float(sum(float(fast(*part)) for part in parts))

        return distributed

    # GlobalCount all-reduces the count: give every replica the sum of the
    # replicas' counts, an argument of the (jitted) replica's loss.
    def count_of(y_true, y_pred):
        return global_count.numerator_and_count(
            ops.convert_to_tensor(y_true, dtype=global_count.dtype),
            ops.convert_to_tensor(y_pred, dtype=global_count.dtype),
        )[1]

    def replica_loss(y_true, y_pred, sample_weight, total):
        def summed(value):
            return ops.cast(total, value.dtype)

        with replicas.simulated_replicas(num_replicas, summed):
            return compiled(y_true, y_pred, sample_weight)

    count_of, replica_loss = _jitted(count_of), _jitted(replica_loss)

    def distributed(parts):
        total = sum(float(count_of(yt, yp)) for yt, yp, _ in parts)
        total = np.asarray(total, "float32")
        return float(sum(float(replica_loss(*part, total)) for part in parts))

    return distributed


def _global_count_loss(loss):
    """The loss if it is a `NormalizedLoss` with a global count."""
    if isinstance(loss, NormalizedLoss) and getattr(
        loss.normalizer, "is_global", False
    ):
        return loss
    return None
