"""`diagnose`: does a loss's scale depend on the batch size and on how the batch is split?

A loss that divides by a count of its batch (matched boxes, valid tokens)
and returns per-sample values is divided by the batch size again by Keras's
default reduction: it goes as `1 / B`, and a short last batch spikes. One
that divides by the count of whatever batch it is given is exact on one
device, but not across replicas with unequal counts, nor under Keras's
gradient accumulation. `diagnose` measures both on your samples, with the
reduction `model.compile` applies, and names the fix (`docs/diagnose.md`).
"""

import dataclasses
import math
from typing import Any, Callable, Sequence, Union

import keras
import numpy as np
from keras import ops

from keras_batchfix import _validation, kernels, replicas
from keras_batchfix._keras_compat import print_msg
from keras_batchfix.diagnostics import arguments, loss_probe, split_weights
from keras_batchfix.diagnostics.verdicts import (
    FIXES,
    KERAS_ACCUMULATION,
    MICRO_BATCHES,
    batch_exponent,
    classify,
    fmt,
    loss_advice,
    split_lines,
)
from keras_batchfix.normalized_loss import NormalizedLoss


@dataclasses.dataclass
class Diagnosis:
    """What `diagnose` found. `str(diagnosis)` is the report.

    Attributes:
        verdict: one of `verdicts.FIXES`: `"invariant"`,
            `"inverse_batch_size"` (goes as `1 / B`), `"batch_size"` (as
            `B`), `"replica_scaling"` (a replica split scales it),
            `"replica_split"` / `"accumulation"` (a split with unequal
            counts over the replicas / micro-batches reweighs the samples),
            `"local_count"` (both), `"other"`, `"non_finite"`.
        fix: `"none"`, `"compensate"`, `"reduction"`, `"global_count"`,
            `"micro_batches"` or `"unknown"`; `advice` says it in words.
        exponent: `d log(loss) / d log(B)` over the samples tiled `k` times
            (`repetitions`: `[(k, B, loss)]`); `exponent_subbatches` the same
            over disjoint sub-batches (`subbatches`: `[(B, mean loss)]`).
        return_shape: the loss's values before Keras reduces them, `"B"`
            for the batch axis; `reduction`: what `compile` applies.
        replica_ratio: sum over `num_replicas` simulated replicas of what
            each optimizes, over the one-device loss, each replica seeing
            all the samples (1 when exact); `replica_ratio_split` the same
            with the samples split, fewest counts on replica 0.
        unequal_split_factor: `max_i r_i / min_i r_i` on that split, `r_i`
            sample `i`'s weight in the replicas' objective over its weight
            on one device (1 when exact); `accumulation_factor` the same
            over `accumulation_steps` micro-batches, combined as
            `accumulation_mode` says (`"keras"`: the mean of the
            micro-batches' losses; `"micro_batches"`: numerators and counts
            summed, `keras_batchfix.Model`'s `compile(micro_batches=k)`),
            and `keras_accumulation_factor` under Keras's own accumulation.
        replica_mode: `"simulated"` (`keras_batchfix.replicas.ReplicaSimulation`).
        all_reduces: the all-reduces (`replicas.global_sum` calls) of one
            simulated replica's loss.
        probes: how each factor was measured: `"sample weights"` (exact) or
            `"predictions"` (finite differences, about 1e-3).
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
    reduction: Any
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
    all_reduces: int = 0

    @property
    def ok(self) -> bool:
        """True when no fix is needed."""
        return self.fix == "none"

    def spike_factor(self, batch_size: int, last_batch_size: int) -> float:
        """Loss of a short batch relative to a full one, from the exponent.

        `(last_batch_size / batch_size) ** exponent`: 8.0 for a loss divided
        by the batch size twice, with batches of 32 and a last batch of 4;
        1.0 when invariant.
        """
        return (last_batch_size / batch_size) ** self.exponent

    def to_dict(self) -> dict:
        """The fields as a dict (the command line's `--json`)."""
        return dataclasses.asdict(self)

    def __str__(self) -> str:
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
            f"  exponent of B: {fmt(self.exponent)} (repetitions), "
            f"{fmt(self.exponent_subbatches)} (sub-batches); "
            "0 invariant, -1 divided by B twice, +1 unnormalized sum"
        )
        lines.append(
            f"  {self.num_replicas}-replica split ({self.replica_mode}, "
            f"{self.all_reduces} all-reduces per replica): "
            f"objective x{fmt(self.replica_ratio)} (same samples per "
            f"replica), x{fmt(self.replica_ratio_split)} (distinct samples, "
            "fewest counts on replica 0)"
        )
        lines.extend(split_lines(self))
        if len(self.repetitions) > 1:
            big = self.repetitions[-1][1]
            lines.append(
                f"  a last batch of {max(1, big // 8)} after batches of {big}"
                f" would weigh x{fmt(self.spike_factor(big, max(1, big // 8)))}"
            )
        for note in self.notes:
            lines.append(f"  note: {note}")
        lines.append(f"VERDICT: {self.verdict} -> fix: {self.fix}")
        lines.append(f"  {self.advice}")
        return "\n".join(lines)


def diagnose(
    loss: Union[str, Callable, keras.losses.Loss],
    y_true,
    y_pred,
    sample_weight=None,
    repeats: Sequence[int] = (1, 2, 4),
    num_replicas: int = 2,
    tolerance: float = 0.1,
    verbose: int = 0,
    accumulation_steps: int = 2,
) -> Diagnosis:
    """Finds out whether (and how) a loss's scale depends on the batch and its splits.

    The loss is wrapped as `model.compile(loss=loss)` wraps it and evaluated
    on the samples tiled `k` times for `k` in `repeats` (the exponent
    `d log(loss) / d log(B)`: 0 invariant, -1 divided by the batch size
    twice, +1 an unnormalized sum), on simulated replicas, and on splits
    with unequal counts: the samples ordered by their count and cut into
    `num_replicas` replicas or `accumulation_steps` micro-batches, fewest
    counts first. With `L(w)` the one-device loss under sample weights `w`
    and `O(w)` the split's objective,

        r_i = (O(e_i) - O(0)) / (L(e_i) - L(0))      (e_i one-hot)
        factor = max_i r_i / min_i r_i                (1 when exact)

    Args:
        loss: what you pass to `compile`: a function `(y_true, y_pred) ->
            values`, a `keras.losses.Loss`, or a Keras loss name.
        y_true: targets of one batch (batch on axis 0, 2+ samples).
        y_pred: predictions of the same batch. Single-output models only.
        sample_weight: optional `(B,)` weights.
        repeats: tiling factors of the exponent (two or more).
        num_replicas: replicas of the split checks (>= 2).
        tolerance: how far an exponent may be from -1, 0 or +1 (and a
            factor from 1, relatively) to count as it.
        verbose: 0 prints nothing, 1 prints the report.
        accumulation_steps: micro-batches of the accumulation check (>= 2).

    Returns:
        A `Diagnosis`; `str()` of it is the report.

    Example:

    ```python
    def box_loss(y_true, y_pred):  # per image, over the batch's positives
        positives = ops.sum(y_true[..., 0])
        errors = ops.sum(y_true[..., 0] * ops.square(y_true[..., 1] - y_pred[..., 0]), 1)
        return errors / ops.maximum(positives, 1.0)

    result = keras_batchfix.diagnose(box_loss, y_true, y_pred)
    result.verdict              # "inverse_batch_size"
    result.fix                  # "compensate"
    ```
    """
    arguments.check_verbose(verbose)
    y_true = arguments.as_array(y_true, "y_true")
    y_pred = arguments.as_array(y_pred, "y_pred")
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
        sample_weight = arguments.as_array(sample_weight, "sample_weight")
    repeats = arguments.check_repeats(repeats)
    num_replicas = arguments.check_replicas(num_replicas)
    tolerance = _validation.real(
        "tolerance", tolerance, "a float > 0", lambda v: v > 0
    )
    accumulation_steps = arguments.check_steps(accumulation_steps)

    steady_state = isinstance(loss, NormalizedLoss) and loss.normalizer.stateful
    if steady_state:
        loss = loss_probe.at_steady_state(loss)
    compiled = loss_probe.CompiledLoss(loss, y_true, y_pred)
    loss_obj = compiled.inner
    loss_name = getattr(loss_obj, "name", None) or getattr(
        loss, "__name__", repr(loss)
    )
    # The values before Keras reduces them: first, so that a loss returning
    # no numbers is named (not a conversion error deep in Keras).
    raw = loss_probe.raw_values(loss_obj, loss_name, y_true, y_pred)

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
    exponent = batch_exponent([b for _, b, _ in repetitions], [v for _, _, v in repetitions])

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
    exponent_sub = batch_exponent([b for b, _ in subbatches], [v for _, v in subbatches])

    # 3. Return shape (before Keras reduces it).
    raw_shape = tuple(ops.shape(raw))
    return_shape = tuple(
        "B" if (i == 0 and d == n) else int(d) for i, d in enumerate(raw_shape)
    )
    reduction = getattr(loss_obj, "reduction", None)

    # 4. Replica split: same samples on every replica, and distinct samples
    # ordered by their count (fewest on replica 0).
    probe = loss_probe.LossProbe(fast, y_true, y_pred, sample_weight, rank=len(raw_shape))
    order = probe.count_order()
    simulation = replicas.ReplicaSimulation(num_replicas, compile=kernels.jit)
    distributed = loss_probe.replica_objective(compiled, simulation)
    replica_ratio = loss_probe.replica_ratio_same(
        fast, distributed, y_true, y_pred, sample_weight, num_replicas
    )
    rep_index, rep_parts = split_weights.equal_parts(order, num_replicas)
    whole_split = probe.loss(rep_index)
    total = distributed(probe.parts(rep_index, rep_parts))
    replica_ratio_split = total / whole_split if whole_split else float("nan")
    unequal, replica_probe = probe.split_factor(rep_index, rep_parts, distributed)

    # 5. Accumulation over micro-batches, ordered by count.
    acc_index, acc_parts = split_weights.equal_parts(
        order, min(accumulation_steps, n)
    )

    def keras_accumulated(parts):
        return sum(float(fast(*part)) for part in parts) / len(parts)

    keras_factor, keras_probe = probe.split_factor(
        acc_index, acc_parts, keras_accumulated
    )
    if loss_probe.has_count(loss_obj, y_true, y_pred):
        accumulation_mode = MICRO_BATCHES
        accumulation, accumulation_probe = probe.split_factor(
            acc_index, acc_parts, loss_probe.micro_batches_loss(loss_obj)
        )
    else:
        accumulation_mode = KERAS_ACCUMULATION
        accumulation, accumulation_probe = keras_factor, keras_probe

    probes = {"replicas": replica_probe, "accumulation": accumulation_probe}
    notes = loss_probe.notes(
        steady_state, raw_shape, n, reduction, replica_ratio, exponent,
        exponent_sub, probes, unequal, accumulation, tolerance,
    )

    non_finite = [b for _, b, value in repetitions if not math.isfinite(value)]
    if non_finite:
        verdict = "non_finite"
        advice = loss_probe.non_finite_advice(
            loss_name, non_finite, y_true, y_pred, sample_weight
        )
    else:
        verdict = classify(exponent, replica_ratio, tolerance, unequal, accumulation)
        advice = loss_advice(
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
        replica_mode="simulated",
        notes=notes,
        loss_name=str(loss_name),
        tolerance=tolerance,
        unequal_split_factor=unequal,
        accumulation_factor=accumulation,
        accumulation_steps=len(acc_parts),
        accumulation_mode=accumulation_mode,
        keras_accumulation_factor=keras_factor,
        probes=probes,
        all_reduces=simulation.all_reduces,
    )
    if verbose:
        print_msg(str(result))
    return result
