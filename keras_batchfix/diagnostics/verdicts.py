"""The verdicts of `diagnose` and `diagnose_model`, their fixes, and the report's words.

One set of verdict words serves both. A verdict is decided in this order:
NaN or infinite loss values, the batch exponent, the replica factor with
the same samples on every replica, then the two split factors
(`docs/diagnose.md` tells them in full).
"""

import math

import keras
import numpy as np

from keras_batchfix.normalized_loss import NormalizedLoss

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
#: The verdicts of a loss exact on one device that a split reweighs.
SPLIT_VERDICTS = ("replica_split", "accumulation", "local_count")

#: How the micro-batches of gradient accumulation are combined.
KERAS_ACCUMULATION = "keras"  # `gradient_accumulation_steps`: mean of the losses
MICRO_BATCHES = "micro_batches"  # `compile(micro_batches=k)`: summed, divided once

MEAN_REDUCTIONS = ("sum_over_batch_size", "mean", "mean_with_sample_weight")


def fix_for(verdict, model=False):
    """The fix `verdict` calls for; of a model's total loss if `model`.

    A model whose replicas each divide by their own batch (`"replica_scaling"`
    of a `compute_loss`) needs the count summed over the replicas.
    """
    if model and verdict == "replica_scaling":
        return "global_count"
    return FIXES[verdict]


def fmt(value):
    """A factor or exponent for the report: 3 significant digits, nan, inf."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "nan"
    if math.isinf(value):
        return "inf"
    return f"{value:.3g}"


def batch_exponent(batch_sizes, values):
    """`d log|loss| / d log(B)`: the least-squares slope (NaN if not measurable)."""
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


def is_off(value, tolerance):
    """Whether a factor is measured and away from 1 (relatively)."""
    return not math.isnan(value) and not abs(value - 1) <= tolerance


def classify(
    exponent, replica_ratio, tolerance, unequal=float("nan"),
    accumulation=float("nan"),
):
    """The verdict of finite measurements (see `FIXES`)."""
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
    if is_off(unequal, tolerance) and is_off(accumulation, tolerance):
        return "local_count"
    if is_off(unequal, tolerance):
        return "replica_split"
    if is_off(accumulation, tolerance):
        return "accumulation"
    return "invariant"


def split_lines(result):
    """The report's lines on the unequal split and the accumulation."""
    how = "Keras's gradient_accumulation_steps, the mean of the micro-batches' " \
        "losses" if result.accumulation_mode == KERAS_ACCUMULATION else \
        "compile(micro_batches=k): numerators and counts summed, divided once"
    lines = [
        f"  unequal counts over {result.num_replicas} replicas: sample weights "
        f"up to x{fmt(result.unequal_split_factor)} apart (1 exact)",
        f"  accumulation over {result.accumulation_steps} micro-batches ({how}):"
        f" sample weights up to x{fmt(result.accumulation_factor)} apart "
        "(1 exact)",
    ]
    keras_factor = getattr(result, "keras_accumulation_factor", None)
    if result.accumulation_mode != KERAS_ACCUMULATION and keras_factor is not None:
        lines.append(
            "  under Keras's own gradient_accumulation_steps: "
            f"x{fmt(keras_factor)}"
        )
    return lines


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
        f"x{fmt(unequal)} differently than on one device"
    )
    accumulation_text = (
        f"under Keras's gradient_accumulation_steps={steps}, the mean of the "
        "micro-batches' own losses, each micro-batch divides by its own "
        f"count: samples weigh up to x{fmt(accumulation)} differently than "
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
                f"samples weigh up to x{fmt(unequal)} differently: " + not_additive
            )
        return f"Exact on one device, but {replicas_text}. Fix: {replica_fix}."
    if verdict == "accumulation":
        if micro:
            return (
                f"Exact on one device and across replicas, but over {steps} "
                f"micro-batches samples weigh up to x{fmt(accumulation)} "
                "differently: " + not_additive
            )
        return (
            f"Exact on one device and across replicas, but {accumulation_text}."
            f" Fix: {accumulation_fix}."
        )
    if counts_global and micro:
        return (
            f"Exact on one device, but split over {num_replicas} replicas "
            f"samples weigh up to x{fmt(unequal)} differently, and over "
            f"{steps} micro-batches up to x{fmt(accumulation)}: " + not_additive
        )
    return (
        f"Exact on one device, but {subject} divides by the count of whatever "
        f"batch it is given: {replicas_text}; and {accumulation_text}. Fix: "
        f"{both_fix}."
    )


def counts_globally(loss_obj):
    """Whether a loss divides by the count of all replicas (a global normalizer)."""
    return isinstance(loss_obj, NormalizedLoss) and getattr(
        loss_obj.normalizer, "is_global", False
    )


def loss_advice(
    verdict, exponent, raw_shape, loss_obj, num_replicas,
    unequal=float("nan"), accumulation=float("nan"),
    accumulation_mode=KERAS_ACCUMULATION, steps=2, keras_factor=float("nan"),
    tolerance=0.1,
):
    """What `diagnose` advises for `verdict` (`"non_finite"` aside)."""
    if verdict == "invariant":
        text = (
            "No fix needed: the loss is independent "
            + exact_splits(unequal, accumulation, steps, num_replicas)
            + "."
        )
        if accumulation_mode == MICRO_BATCHES and is_off(keras_factor, tolerance):
            text += (
                " Accumulate with keras_batchfix.Model and compile(..., "
                "micro_batches=k): Keras's own gradient_accumulation_steps "
                "divides each micro-batch by its own count (sample weights "
                f"x{fmt(keras_factor)} apart)."
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
    if verdict in SPLIT_VERDICTS:
        return split_advice(
            verdict, unequal, accumulation, num_replicas, steps,
            accumulation_mode, counts_global=counts_globally(loss_obj),
        )
    return (
        f"The loss scales as B^{exponent:.3g}, none of the usual cases: check "
        "how it normalizes (a clamped or nonlinear count?) and compare with "
        "keras_batchfix.compensate(..., count=...)."
    )


def model_advice(
    verdict, exponent, replica_factor, num_replicas, unequal, accumulation,
    steps, accumulation_mode, overrides_compute_loss,
):
    """What `diagnose_model` advises for `verdict` on a model's total loss.

    `overrides_compute_loss`: the model computes its loss in its own
    `compute_loss`, which `compile(micro_batches=k)` cannot slice.
    """
    if verdict == "invariant":
        return (
            "The model's loss is exact: independent "
            + exact_splits(unequal, accumulation, steps, num_replicas)
            + "."
        )
    if verdict == "non_finite":
        return (
            "The model's loss is NaN or infinite on this batch: its scaling "
            "cannot be measured. Check the inputs and the loss for NaN, inf, "
            "a log of 0 or a division by a zero count, then diagnose again."
        )
    if verdict == "inverse_batch_size":
        return (
            "The loss goes as 1 / batch size: it is divided by the batch size "
            "twice. Wrap the self-normalizing loss in keras_batchfix.compensate."
        )
    if verdict == "batch_size":
        return (
            "The loss grows with the batch size: a sum over the batch. Divide "
            "it by a count (keras_batchfix.count_weight) or use a mean reduction."
        )
    if verdict == "replica_scaling":
        return (
            f"Split over {num_replicas} replicas the step is x"
            f"{fmt(replica_factor)} one device's: each replica normalizes by "
            "its own batch and Keras sums the replicas. Divide by the count "
            "summed over the replicas: weight the summed losses with "
            "keras_batchfix.count_weight(count, keras_batchfix.GlobalCount()) "
            "in compute_loss (keras-hub's RetinaNet: "
            "keras_batchfix.retinanet.RetinaNetObjectDetector)."
        )
    if verdict not in SPLIT_VERDICTS:
        return (
            f"The loss scales as B^{fmt(exponent)}, none of the usual cases: "
            "it depends on the batch or the split in another way."
        )
    if accumulation_mode == MICRO_BATCHES or not overrides_compute_loss:
        return split_advice(
            verdict, unequal, accumulation, num_replicas, steps,
            accumulation_mode, counts_global=accumulation_mode == MICRO_BATCHES,
            model=True,
        )
    sentences = []
    if verdict in ("replica_split", "local_count"):
        sentences.append(
            f"Split over {num_replicas} replicas with unequal counts, samples "
            f"weigh up to x{fmt(unequal)} differently than on one device: the "
            "model's compute_loss divides by the count of each replica's batch."
            " Fix: weight its losses with keras_batchfix.count_weight(count, "
            "keras_batchfix.GlobalCount())."
        )
    if verdict in ("accumulation", "local_count"):
        sentences.append(
            f"Under Keras's gradient_accumulation_steps={steps}, samples weigh "
            f"up to x{fmt(accumulation)} differently than in one pass: "
            "each micro-batch divides by its own count, and compile("
            "micro_batches=k) slices compiled losses, not a compute_loss "
            "override. Fix: train without gradient accumulation (a larger "
            "batch, or more replicas with a global count)."
        )
    return " ".join(sentences)
