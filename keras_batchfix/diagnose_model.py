"""`diagnose_model`: how a whole model's training loss scales with the batch and the replicas.

`diagnose` takes a loss function. Where a model normalizes its loss itself,
in a `compute_loss` override (keras-hub's detectors divide their `"sum"`
losses by the batch's positive anchors), only the model can be checked. This
evaluates `model.compute_loss` as `fit` does, on the user's `(x, y)`:

* tiled `k` times for `k` in `repeats`: the fitted exponent of the loss in
  the batch size (0 invariant, -1 divided by the batch size twice);
* split over `num_replicas` simulated `tf.distribute` replicas: the sum of
  what each replica hands Keras over the one-device loss, the *replica
  factor* (1 when exact; `num_replicas` when each replica divides by its own
  count and Keras sums the replicas, as a `"sum"` reduction does).

The replicas run one after the other on one device. What they would
all-reduce (`keras_batchfix.replicas.global_sum`: `GlobalCount`, `EMACount`,
`CenterLoss`) is recorded in a first pass and replayed summed in a second,
and Keras's mean reductions get `1 / num_replicas` as under `tf.distribute`.
"""

import dataclasses

import keras
import numpy as np
from keras import ops

from keras_batchfix import _validation, replicas
from keras_batchfix._keras_compat import print_msg
from keras_batchfix.diagnose import _check_verbose, _fmt, _repeats, _slope, diagnose

ADVICE = {
    "invariant": "The model's loss is exact at every batch size and replica split.",
    "replica_sum": (
        "Each replica normalizes by its own batch and Keras sums the replicas: "
        "on N devices the step is about N times one device's. Divide by the "
        "count summed over the replicas: weight the summed losses with "
        "keras_batchfix.count_weight(count, keras_batchfix.GlobalCount()) in "
        "compute_loss (keras-hub's RetinaNet: "
        "keras_batchfix.retinanet.RetinaNetObjectDetector)."
    ),
    "inverse_batch_size": (
        "The loss goes as 1 / batch size: it is divided by the batch size "
        "twice. Wrap the self-normalizing loss in keras_batchfix.compensate."
    ),
    "other": "The loss depends on the batch or the split in another way.",
    "non_finite": (
        "The model's loss is NaN or infinite on this batch: its scaling cannot "
        "be measured. Check the inputs and the loss for NaN, inf, a log of 0 "
        "or a division by a zero count, then diagnose again."
    ),
}


@dataclasses.dataclass
class ModelDiagnosis:
    """What `diagnose_model` found; `str()` of it is the report.

    Attributes:
        verdict: `"invariant"`, `"replica_sum"`, `"inverse_batch_size"`,
            `"other"` or `"non_finite"` (NaN or infinite) for the total
            loss; when the total is invariant but a compile-time output's
            loss is not, that output's `diagnose` verdict.
        advice: the fix in words.
        exponent: `d log(loss) / d log(B)` over repetitions of `(x, y)`.
        replica_factor: sum over the replicas of what each hands Keras,
            divided by the one-device loss, each replica seeing all of
            `(x, y)`.
        replica_factor_split: the same with `(x, y)` split into distinct
            parts.
        repetitions: `[(B, loss)]`.
        num_replicas: replicas of the split check.
        outputs: `{output name: Diagnosis}` for compile-time losses (empty
            when the model computes its loss in a `compute_loss` override).
    """

    verdict: str
    advice: str
    exponent: float
    replica_factor: float
    replica_factor_split: float
    repetitions: list
    num_replicas: int
    outputs: dict
    model_name: str = "model"

    @property
    def ok(self):
        return self.verdict == "invariant"

    def __str__(self):
        lines = [f"keras_batchfix.diagnose_model: {self.model_name}"]
        reps = ", ".join(f"B={b}: {value:.6g}" for b, value in self.repetitions)
        lines.append(f"  total loss, same samples repeated   {reps}")
        lines.append(f"  exponent of B: {_fmt(self.exponent)}")
        lines.append(
            f"  {self.num_replicas}-replica split (simulated): x"
            f"{_fmt(self.replica_factor)} (same samples per replica), x"
            f"{_fmt(self.replica_factor_split)} (distinct samples)"
        )
        for name, result in self.outputs.items():
            lines.append(
                f"  output {name!r}: {result.verdict} (exponent "
                f"{_fmt(result.exponent)}, replica x{_fmt(result.replica_ratio)})"
                f" -> fix: {result.fix}"
            )
        lines.append(f"VERDICT: {self.verdict}")
        lines.append(f"  {self.advice}")
        return "\n".join(lines)


def diagnose_model(
    model, x, y=None, repeats=(1, 2, 4), num_replicas=2, tolerance=0.1,
    verbose=0,
):
    """Finds out whether a model's training loss depends on the batch or the split.

    Args:
        model: a compiled `keras.Model` (its `compute_loss` may be
            overridden, as keras-hub's detectors do).
        x, y: one batch as `compute_loss` receives it in `fit` (arrays, or
            dicts / lists of arrays, batch on axis 0; for a keras-hub task,
            after its preprocessor).
        repeats: tiling factors for the batch-size exponent.
        num_replicas: replicas of the split check (>= 2).
        tolerance: how far an exponent may be from 0 or -1, and a replica
            factor from 1 or `num_replicas` (relatively), to count as it.
        verbose: 0 (default) prints nothing, 1 prints the report. Either
            way `print(result)` shows it.

    Returns:
        A `ModelDiagnosis` (`str()` of it is the report).

    Example:

    ```python
    result = keras_batchfix.diagnose_model(detector, images, {"boxes": b, "labels": l})
    result.verdict          # "replica_sum": 2 replicas take twice the step
    result.replica_factor   # 2.0
    ```
    """
    _check_verbose(verbose)
    if not getattr(model, "compiled", False):
        raise ValueError(
            "Argument `model` must be compiled: call `model.compile(...)` "
            "before `diagnose_model`."
        )
    num_replicas = _validation.integer("num_replicas", num_replicas, 2)
    repeats = _repeats(repeats)
    x = keras.tree.map_structure(np.asarray, x)
    y = None if y is None else keras.tree.map_structure(np.asarray, y)
    sizes = {a.shape[0] for a in keras.tree.flatten((x, y)) if a.ndim > 0}
    if len(sizes) != 1:
        raise ValueError(
            "`x` and `y` must share one batch size on axis 0; received batch "
            f"sizes {sorted(sizes)}."
        )
    n = sizes.pop()
    if n < num_replicas:
        raise ValueError(
            f"The batch must have at least num_replicas={num_replicas} samples "
            f"to split; received {n}."
        )

    def loss_of(xb, yb):
        y_pred = model(xb, training=False)
        return model.compute_loss(
            x=xb, y=yb, y_pred=y_pred, sample_weight=None, training=False
        )

    def tiled(k):
        return keras.tree.map_structure(
            lambda a: np.concatenate([a] * k, axis=0), (x, y)
        )

    repetitions = [(n * k, float(loss_of(*tiled(k)))) for k in repeats]
    exponent = _slope([b for b, _ in repetitions], [v for _, v in repetitions])
    single = float(loss_of(x, y))
    same = sum(_replica_losses(loss_of, [(x, y)] * num_replicas, num_replicas))
    bounds = np.linspace(0, n, num_replicas + 1).astype(int)
    parts = [
        keras.tree.map_structure(lambda a, lo=lo, hi=hi: a[lo:hi], (x, y))
        for lo, hi in zip(bounds[:-1], bounds[1:])
    ]
    split = sum(_replica_losses(loss_of, parts, num_replicas))
    factor = same / single if single else float("nan")
    factor_split = split / single if single else float("nan")

    if not all(np.isfinite([v for _, v in repetitions] + [single])):
        verdict = "non_finite"
    elif abs(exponent) <= tolerance and abs(factor - 1) <= tolerance:
        verdict = "invariant"
    elif abs(exponent) <= tolerance and abs(factor / num_replicas - 1) <= tolerance:
        verdict = "replica_sum"
    elif abs(exponent + 1) <= tolerance:
        verdict = "inverse_batch_size"
    else:
        verdict = "other"
    advice = ADVICE[verdict]
    outputs = _output_diagnoses(model, x, y, repeats, num_replicas, tolerance)
    if verdict == "invariant":
        # A small output's bug can hide in the total: any output decides.
        for name, output in outputs.items():
            if not output.ok:
                verdict, advice = output.verdict, f"Output {name!r}: {output.advice}"
                break
    result = ModelDiagnosis(
        verdict=verdict, advice=advice, exponent=exponent,
        replica_factor=factor, replica_factor_split=factor_split,
        repetitions=repetitions, num_replicas=num_replicas,
        outputs=outputs, model_name=model.name,
    )
    if verbose:
        print_msg(str(result))
    return result


def _replica_losses(loss_of, parts, num_replicas):
    """What each simulated replica hands Keras, its all-reduces replayed summed."""
    recorded = []
    for part in parts:
        calls = []

        def record(value, calls=calls):
            calls.append(keras.tree.map_structure(ops.convert_to_numpy, value))
            return value

        with replicas.simulated_replicas(num_replicas, record):
            loss_of(*part)
        recorded.append(calls)
    if len({len(calls) for calls in recorded}) != 1:
        raise ValueError(
            "The replicas made different numbers of all-reduces; the split "
            "cannot be simulated for this model."
        )
    totals = [
        keras.tree.map_structure(lambda *values: sum(values), *step)
        for step in zip(*recorded)
    ]
    losses = []
    for part in parts:
        pending = iter(totals)

        def replay(value):
            total = next(pending)
            return keras.tree.map_structure(
                lambda t, v: ops.convert_to_tensor(t, dtype=v.dtype), total, value
            )

        with replicas.simulated_replicas(num_replicas, replay):
            losses.append(float(loss_of(*part)))
    return losses


def _output_diagnoses(model, x, y, repeats, num_replicas, tolerance):
    """`diagnose` of each compile-time loss, when the model has its own outputs' losses."""
    losses = getattr(model, "loss", None)
    if not isinstance(losses, dict) or not isinstance(y, dict):
        return {}
    y_pred = model(x, training=False)
    if not isinstance(y_pred, dict):
        return {}
    results = {}
    for name, loss in losses.items():
        if name in y and name in y_pred and loss is not None:
            results[name] = diagnose(
                loss, y[name], ops.convert_to_numpy(y_pred[name]),
                repeats=repeats, num_replicas=num_replicas,
                tolerance=tolerance,
            )
    return results
