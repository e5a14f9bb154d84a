"""The evaluations behind `diagnose`: the loss as `compile` applies it, on subsets of the batch.

`CompiledLoss` wraps the user's loss as `model.compile(loss=...)` does;
`LossProbe` evaluates it on ordered subsets of the samples, with one-hot
sample weights or moved predictions, and measures how a split reweighs
them (`split_weights`). `replica_objective` sums what simulated replicas
optimize, through `keras_batchfix.replicas.ReplicaSimulation`.
"""

import math

import keras
import numpy as np
from keras import ops

from keras_batchfix import kernels, normalizers, replicas
from keras_batchfix._keras_compat import compile_loss
from keras_batchfix.diagnostics import split_weights
from keras_batchfix.diagnostics.verdicts import MEAN_REDUCTIONS
from keras_batchfix.normalized_loss import NormalizedLoss, as_values, weighted_sum


class CompiledLoss:
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

        `kernels.jit`: one trace per shape on JAX; losses that cannot be
        traced run eagerly.
        """
        # A new function object: jax caches traces by function, and a bound
        # method compares equal to every other bound `self.__call__`.
        return kernels.jit(lambda y_true, y_pred, sample_weight=None: self(
            y_true, y_pred, sample_weight))


class LossProbe:
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
        """The samples ordered by their count (see `split_weights`)."""
        n = len(self.y_true)
        everything = np.arange(n)
        shares = None
        if self.linear:
            shares = split_weights.shares(lambda w: self.loss(everything, w), n)
        self.natural_shares = shares
        singles = [self.loss(np.array([i])) for i in range(n)]
        if shares is None:  # move one sample's predictions at a time
            moves = split_weights.noise_like(self.y_pred, seed=1)
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
        return split_weights.count_order(
            split_weights.relative_counts(shares, singles)
        )

    def split_factor(self, index, parts, objective):
        """`(factor, probe)` of `objective(parts' data)` against the loss of `index`."""

        def split(weights=None, delta=None):
            return objective(self.parts(index, parts, weights, delta))

        if self.linear and self.natural_shares is not None:
            if len(index) == len(self.y_true):  # the batch, reordered
                whole = self.natural_shares[index]
            else:
                whole = split_weights.shares(lambda w: self.loss(index, w), len(index))
            if whole is not None:
                shares = split_weights.shares(split, len(index))
                if shares is not None:
                    return split_weights.factor(shares, whole), "sample weights"
        moves = split_weights.noise_like(self.y_pred[index], seed=0)
        base_whole, base_split = self.loss(index), split()
        whole, shares = [], []
        for part in parts:
            delta = np.zeros_like(moves)
            delta[part] = moves[part]
            whole.append(self.loss(index, delta=delta) - base_whole)
            shares.append(split(delta=delta) - base_split)
        return split_weights.factor(shares, whole), "predictions"


def replica_objective(compiled, simulation):
    """`parts -> sum over the replicas of what each optimizes`, `parts` one per replica.

    Each part is a replica's `(y_true, y_pred, sample_weight)`; the replicas
    run in `simulation`.
    """

    def distributed(parts):
        with simulation:
            return float(sum(simulation.replica_losses(compiled, parts)))

    return distributed


def replica_ratio_same(fast, distributed, y_true, y_pred, sample_weight, r):
    """The replicas' summed objective over the one-device loss, same samples each."""

    def tile(x):
        return None if x is None else np.tile(x, (r,) + (1,) * (x.ndim - 1))

    single = float(fast(tile(y_true), tile(y_pred), tile(sample_weight)))
    if single == 0:
        return float("nan")
    return distributed([(y_true, y_pred, sample_weight)] * r) / single


def has_count(loss, y_true, y_pred):
    """Whether `loss` hands `micro_batches` a numerator and a count."""
    if not isinstance(loss, NormalizedLoss):
        return False
    _, count = loss.numerator_and_count(
        ops.convert_to_tensor(y_true, dtype=loss.dtype),
        ops.convert_to_tensor(y_pred, dtype=loss.dtype),
    )
    return count is not None


def micro_batches_loss(loss):
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
                (as_values(loss, "numerator", numerator, loss.dtype), sw)
            )
            count = as_values(loss, "count", count, "float32")
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

    fast = kernels.jit(value)
    return lambda parts: float(fast(parts))


def at_steady_state(loss):
    """A copy of `loss` whose stateful normalizer is replaced by `GlobalCount`.

    An EMA of the count is a constant over a few steps, so over one batch an
    `EMACount` loss scales with the batch; in training the EMA follows the
    typical count, which is what `GlobalCount` divides by at every batch size.
    """
    steady = type(loss).from_config(loss.get_config())
    steady.normalizer = normalizers.GlobalCount()
    return steady


def raw_values(loss_obj, loss_name, y_true, y_pred):
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


def non_finite_advice(loss_name, batch_sizes, y_true, y_pred, sample_weight):
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


def notes(
    steady_state, raw_shape, n, reduction, replica_ratio, exponent,
    exponent_sub, probes, unequal, accumulation, tolerance,
):
    """`diagnose`'s remarks on the return shape, the probes and the factors."""
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

    return notes
