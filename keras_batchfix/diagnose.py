"""`diagnose`: does a loss's scale depend on the batch size Keras feeds it?

A loss that normalizes by a count taken from the batch (matched boxes, valid
tokens) and returns per-sample values is divided by the batch size a second
time by Keras's default reduction (`"sum_over_batch_size"`): its value, and
its gradient, go as `1 / batch_size`, and the short last batch of an epoch
spikes. A loss that returns an unnormalized sum goes as `batch_size`. A loss
that returns a scalar is passed through by every reduction and, under
`tf.distribute`, skips Keras's `1 / num_replicas` factor.

`diagnose` measures all three on the samples you give it, with the reduction
`model.compile` will apply, and says which fix applies.
"""

import dataclasses
import math

import keras
import numpy as np
from keras import ops

from keras_batchfix import _validation, normalizers, replicas
from keras_batchfix._keras_compat import compile_loss
from keras_batchfix._keras_compat import print_msg
from keras_batchfix.normalized_loss import NormalizedLoss

MEAN_REDUCTIONS = ("sum_over_batch_size", "mean", "mean_with_sample_weight")

#: Verdicts, and the fix each calls for.
FIXES = {
    "invariant": "none",
    "inverse_batch_size": "compensate",
    "batch_size": "reduction",
    "replica_scaling": "compensate",
    "other": "unknown",
    "non_finite": "unknown",
}


@dataclasses.dataclass
class Diagnosis:
    """What `diagnose` found. `str(diagnosis)` is the report (`print(result)`).

    Attributes:
        verdict: `"invariant"`, `"inverse_batch_size"` (the loss goes as
            `1 / B`), `"batch_size"` (goes as `B`), `"replica_scaling"`
            (batch-size invariant, but a replica split changes it),
            `"other"` (an exponent that is none of -1, 0, +1) or
            `"non_finite"` (the loss is NaN or infinite on the samples, so
            nothing could be measured; the advice counts the non-finite
            entries of the inputs).
        fix: `"none"`, `"compensate"`, `"reduction"` or `"unknown"`.
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
            `num_replicas` distinct parts (shows composition effects).
        replica_mode: `"mirrored"` (a real `tf.distribute.MirroredStrategy`)
            or `"simulated"` (Keras's own reduction code run with the replica
            count set; the rule `tf.distribute` applies).
        notes: further remarks (shape interactions, caveats).
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
            f"replica), x{_fmt(self.replica_ratio_split)} (distinct samples)"
        )
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


def _fmt(value):
    return "nan" if value is None or not math.isfinite(value) else f"{value:.3g}"


def diagnose(
    loss,
    y_true,
    y_pred,
    sample_weight=None,
    repeats=(1, 2, 4),
    num_replicas=2,
    tolerance=0.1,
    verbose=0,
):
    """Finds out whether (and how) a loss's scale depends on the batch size.

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
      with the replica count set (scalar returns skip the `1/num_replicas`).

    Args:
        loss: what you pass to `compile`: a function `(y_true, y_pred) ->
            values`, a `keras.losses.Loss`, or a Keras loss name.
        y_true, y_pred: one batch of targets and predictions (arrays with the
            batch on axis 0; at least 2 samples). Single-output models only.
        sample_weight: optional `(B,)` weights.
        repeats: tiling factors for the repetition measurement.
        num_replicas: replicas of the split check (>= 2).
        tolerance: how far from -1, 0 or +1 an exponent (and from 1 a replica
            ratio, relatively) may be to count as that value.
        verbose: 0 (default) prints nothing, 1 prints the report. Either
            way `print(result)` shows it.

    Returns:
        A `Diagnosis` (`str()` of it is the report; `.verdict`, `.fix`,
        `.exponent`, `.replica_ratio`, ... for scripts and tests).

    Example:

    ```python
    def my_loss(y_true, y_pred):  # per image, divided by the batch's positives
        positives = ops.sum(y_true[..., 0])
        per_image = ops.sum(y_true[..., 0] * ops.square(y_true[..., 1] - y_pred[..., 0]), 1)
        return per_image / ops.maximum(positives, 1.0)

    result = keras_batchfix.diagnose(my_loss, y_true, y_pred)
    result.verdict   # "inverse_batch_size"
    result.fix       # "compensate": compile(loss=keras_batchfix.compensate(my_loss))
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

    steady_state = isinstance(loss, NormalizedLoss) and normalizers.stateful(
        loss.normalizer
    )
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

    # 4. Replica split.
    replica_mode, replica_ratio, replica_ratio_split = _replica_check(
        compiled, y_true, y_pred, sample_weight, num_replicas
    )

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

    non_finite = [b for _, b, value in repetitions if not math.isfinite(value)]
    if non_finite:
        verdict = "non_finite"
        advice = _non_finite_advice(
            loss_name, non_finite, y_true, y_pred, sample_weight
        )
    else:
        verdict = _classify(exponent, replica_ratio, num_replicas, tolerance)
        advice = _advice(verdict, exponent, raw_shape, loss_obj, num_replicas)
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
    )
    if verbose:
        print_msg(str(result))
    return result


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
        if keras.backend.backend() != "jax":
            return self
        import jax

        # A new function object: jax caches traces by function, and a bound
        # method compares equal to every other bound `self.__call__`.
        jitted = jax.jit(lambda y_true, y_pred, sw: self(y_true, y_pred, sw))
        state = {"eager": False}

        def call(y_true, y_pred, sample_weight=None):
            if not state["eager"]:
                try:
                    return jitted(y_true, y_pred, sample_weight)
                except jax.errors.JAXTypeError:
                    state["eager"] = True
            return self(y_true, y_pred, sample_weight)

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


def _classify(exponent, replica_ratio, num_replicas, tolerance):
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
    return "invariant"


def _advice(verdict, exponent, raw_shape, loss_obj, num_replicas):
    if verdict == "invariant":
        return (
            "No fix needed: Keras's reduction keeps this loss's scale "
            "independent of the batch size and of a replica split."
        )
    if verdict == "inverse_batch_size":
        return (
            "The loss divides by a count from the batch and Keras divides by "
            "the batch size again: short batches get a loss and gradient "
            "B/b times too large. Fix: compile(loss=keras_batchfix."
            "compensate(your_loss)) (or return the un-normalized values and "
            "pass count=... to compensate). Multiplying by the batch size "
            "works on one device only."
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
    return (
        f"The loss scales as B^{exponent:.3g}, none of the usual cases: check "
        "how it normalizes (a clamped or nonlinear count?) and compare with "
        "keras_batchfix.compensate(..., count=...)."
    )


# ---------------------------------------------------------------------------
# Replica split
# ---------------------------------------------------------------------------


def _replica_check(compiled, y_true, y_pred, sample_weight, num_replicas):
    """Returns (mode, ratio with identical replicas, ratio with a split)."""
    n = y_true.shape[0]
    r = num_replicas

    def tile(x):
        return None if x is None else np.tile(x, (r,) + (1,) * (x.ndim - 1))

    same = [(y_true, y_pred, sample_weight)] * r
    whole_same = (tile(y_true), tile(y_pred), tile(sample_weight))
    usable = (n // r) * r
    if usable >= r:
        size = usable // r
        split = [
            (
                y_true[i * size : (i + 1) * size],
                y_pred[i * size : (i + 1) * size],
                None
                if sample_weight is None
                else sample_weight[i * size : (i + 1) * size],
            )
            for i in range(r)
        ]
        whole_split = (
            y_true[:usable],
            y_pred[:usable],
            None if sample_weight is None else sample_weight[:usable],
        )
    else:  # pragma: no cover (n >= 2 and r >= 2 make this unreachable for r<=n)
        split, whole_split = None, None

    devices = _tf_devices(r)
    if devices is not None:
        mode = "mirrored"
        distributed = _mirrored(compiled, devices)
    else:
        mode = "simulated"
        distributed = _simulated(compiled, r)

    fast = compiled.compiled()

    def ratio(parts, whole):
        if parts is None:
            return float("nan")
        single = float(fast(*whole))
        total = distributed(parts)
        if single == 0:
            return float("nan")
        return total / single

    return mode, ratio(same, whole_same), ratio(split, whole_split)


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

    def distributed(parts):
        def value_fn(context):
            yt, yp, sw = parts[context.replica_id_in_sync_group]
            return (
                tf.constant(yt),
                tf.constant(yp),
                tf.constant(1.0 if sw is None else sw),
            )

        values = strategy.experimental_distribute_values_from_function(value_fn)
        has_weights = parts[0][2] is not None

        @tf.function
        def step(values):
            def replica_fn(yt, yp, sw):
                return compiled(yt, yp, sw if has_weights else None)

            per_replica = strategy.run(replica_fn, args=values)
            return strategy.reduce("SUM", per_replica, axis=None)

        return float(step(values))

    return distributed


def _simulated(compiled, num_replicas):
    fast = compiled.compiled()  # only ever traced and run under _replicas
    global_count = _global_count_loss(compiled.inner)

    def distributed(parts):
        if global_count is None:
            with replicas.simulated_replicas(num_replicas):
                return float(sum(float(fast(*part)) for part in parts))
        # GlobalCount all-reduces the count: give every replica the sum of
        # the replicas' counts (run eagerly, since the sum differs per call).
        counts = [
            float(
                global_count.numerator_and_count(
                    ops.convert_to_tensor(yt, dtype=global_count.dtype),
                    ops.convert_to_tensor(yp, dtype=global_count.dtype),
                )[1]
            )
            for yt, yp, _ in parts
        ]

        def summed(value):
            return ops.convert_to_tensor(sum(counts), dtype=value.dtype)

        with replicas.simulated_replicas(num_replicas, summed):
            return float(sum(float(compiled(*part)) for part in parts))

    return distributed


def _global_count_loss(loss):
    """The loss if it is a `NormalizedLoss` with a global count."""
    if isinstance(loss, NormalizedLoss) and getattr(
        loss.normalizer, "is_global", False
    ):
        return loss
    return None
