"""`diagnose_model`: does a model's training loss depend on the batch size and its splits?

`diagnose` takes a loss function. Where a model normalizes its loss itself,
in a `compute_loss` override (keras-hub's detectors divide their `"sum"`
losses by the batch's positive anchors) or through Keras's masks (an
`Embedding(mask_zero=True)` makes a mean loss one over the valid tokens),
only the model can be checked: this evaluates `model.compute_loss` as `fit`
does, and with `compile(micro_batches=k)` (`keras_batchfix.Model`) as its
step computes it.
"""

import dataclasses
from typing import Optional, Sequence

import keras
import numpy as np
from keras import ops

from keras_batchfix import replicas
from keras_batchfix._keras_compat import print_msg
from keras_batchfix.diagnostics import arguments, loss_check, model_probe, split_weights
from keras_batchfix.diagnostics.verdicts import (
    KERAS_ACCUMULATION,
    MICRO_BATCHES,
    batch_exponent,
    classify,
    fix_for,
    fmt,
    model_advice,
    split_lines,
)


@dataclasses.dataclass
class ModelDiagnosis:
    """What `diagnose_model` found; `str()` of it is the report.

    Attributes:
        verdict: a verdict of `diagnose` (`verdicts.FIXES`) for the total
            loss; when the total is invariant but a compile-time output's
            loss is not, that output's verdict. `"replica_scaling"` with
            `replica_factor` close to `num_replicas`: each replica divides
            by its own batch and Keras sums the replicas.
        advice: the fix in words; `fix` the verdict's fix.
        exponent: `d log(loss) / d log(B)` over repetitions of `(x, y)`
            (`repetitions`: `[(B, loss)]`).
        replica_factor: sum over `num_replicas` simulated replicas of what
            each hands Keras, over the one-device loss, each replica seeing
            all of `(x, y)` (1 when exact); `replica_factor_split` the same
            with `(x, y)` split, fewest counts on the first replica.
        outputs: `{output name: Diagnosis}` of compile-time losses (empty
            for a `compute_loss` override).
        unequal_split_factor: `max_i r_i / min_i r_i` on that split, `r_i`
            sample `i`'s weight in the replicas' loss over its weight in
            the one-device loss (1 when exact); `accumulation_factor` the
            same over `accumulation_steps` micro-batches, combined as
            `accumulation_mode` says (`"keras"`: the mean of the
            micro-batches' `compute_loss`; `"micro_batches"`: the model's
            `compile(micro_batches=k)` step).
        all_reduces: the all-reduces of one simulated replica's step.
        probes: how each factor was measured: `"sample weights"` (exact) or
            `"predictions"` (finite differences).
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
    unequal_split_factor: float = float("nan")
    accumulation_factor: float = float("nan")
    accumulation_steps: int = 2
    accumulation_mode: str = KERAS_ACCUMULATION
    probes: dict = dataclasses.field(default_factory=dict)
    fix: str = "unknown"
    all_reduces: int = 0

    @property
    def ok(self) -> bool:
        """True when no fix is needed."""
        return self.verdict == "invariant"

    def __str__(self) -> str:
        lines = [f"keras_batchfix.diagnose_model: {self.model_name}"]
        reps = ", ".join(f"B={b}: {value:.6g}" for b, value in self.repetitions)
        lines.append(f"  total loss, same samples repeated   {reps}")
        lines.append(f"  exponent of B: {fmt(self.exponent)}")
        lines.append(
            f"  {self.num_replicas}-replica split (simulated, "
            f"{self.all_reduces} all-reduces per replica): x"
            f"{fmt(self.replica_factor)} (same samples per replica), x"
            f"{fmt(self.replica_factor_split)} (distinct samples, fewest "
            "counts on replica 0)"
        )
        lines.extend(split_lines(self))
        for name, result in self.outputs.items():
            lines.append(
                f"  output {name!r}: {result.verdict} (exponent "
                f"{fmt(result.exponent)}, replica x{fmt(result.replica_ratio)}"
                f", unequal split x{fmt(result.unequal_split_factor)}, "
                f"accumulation x{fmt(result.accumulation_factor)})"
                f" -> fix: {result.fix}"
            )
        lines.append(f"VERDICT: {self.verdict} -> fix: {self.fix}")
        lines.append(f"  {self.advice}")
        return "\n".join(lines)


def diagnose_model(
    model: keras.Model,
    x,
    y=None,
    repeats: Sequence[int] = (1, 2, 4),
    num_replicas: int = 2,
    tolerance: float = 0.1,
    verbose: int = 0,
    accumulation_steps: Optional[int] = None,
) -> ModelDiagnosis:
    """Finds out whether a model's training loss depends on the batch or its splits.

    Evaluates `model.compute_loss` as `fit` does on `(x, y)` tiled `k` times
    (the exponent `d log(loss) / d log(B)`), over `num_replicas` simulated
    replicas (the replica factor), and on splits with unequal counts over
    the replicas and `accumulation_steps` micro-batches. With `L(w)` the
    one-pass loss under sample weights `w` and `O(w)` the split's,

        r_i = (O(e_i) - O(0)) / (L(e_i) - L(0))      (e_i one-hot)
        factor = max_i r_i / min_i r_i                (1 when exact)

    Args:
        model: a compiled `keras.Model` (its `compute_loss` may be
            overridden, as keras-hub's detectors do).
        x: inputs of one batch as `compute_loss` receives them in `fit`
            (arrays, or dicts / lists of arrays, batch on axis 0).
        y: targets of the same batch (same structures), or None.
        repeats: tiling factors of the exponent (two or more).
        num_replicas: replicas of the split checks (>= 2).
        tolerance: how far an exponent may be from -1, 0 or +1 (and a
            factor from 1, relatively) to count as it.
        verbose: 0 prints nothing, 1 prints the report.
        accumulation_steps: micro-batches of the accumulation check (>= 2);
            default the model's `micro_batches`, else 2.

    Returns:
        A `ModelDiagnosis`; `str()` of it is the report.

    Example:

    ```python
    result = keras_batchfix.diagnose_model(detector, images, {"boxes": b, "labels": l})
    result.verdict          # "replica_scaling": 2 replicas take twice the step
    result.replica_factor   # 2.0
    ```
    """
    arguments.check_verbose(verbose)
    if not getattr(model, "compiled", False):
        raise ValueError(
            "Argument `model` must be compiled: call `model.compile(...)` "
            "before `diagnose_model`."
        )
    num_replicas = arguments.check_replicas(num_replicas)
    repeats = arguments.check_repeats(repeats)
    micro_batches = getattr(model, "micro_batches", None)
    if accumulation_steps is None:
        accumulation_steps = micro_batches or 2
    accumulation_steps = arguments.check_steps(accumulation_steps)
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

    probe = model_probe.ModelProbe(model, x, y, micro_batches)

    def tiled(k):
        return keras.tree.map_structure(
            lambda a: np.concatenate([a] * k, axis=0), (x, y)
        )

    repetitions = [(n * k, probe.one_pass(*tiled(k))) for k in repeats]
    exponent = batch_exponent([b for b, _ in repetitions], [v for _, v in repetitions])
    single = probe.one_pass(x, y)
    simulation = replicas.ReplicaSimulation(num_replicas)

    def replicated_loss(parts):
        with simulation:
            return sum(simulation.replica_losses(probe.step, parts))

    same = replicated_loss([(x, y)] * num_replicas)
    order = probe.count_order()
    rep_index, rep_parts = split_weights.equal_parts(order, num_replicas)
    parts = [probe.args(rep_index[part]) for part in rep_parts]
    split = replicated_loss(parts)
    whole_split = probe.one_pass(*probe.args(rep_index))
    factor = same / single if single else float("nan")
    factor_split = split / whole_split if whole_split else float("nan")

    def replicated(index, parts, weights, delta):
        args = [probe.args(index[p], weights, delta, p) for p in parts]
        return replicated_loss(args)

    unequal, replica_probe = probe.split_factor(rep_index, rep_parts, replicated)
    steps = min(accumulation_steps, n)
    acc_index, acc_parts = split_weights.equal_parts(order, steps)
    if micro_batches:
        mode = MICRO_BATCHES

        def accumulated(index, parts, weights, delta):
            return probe.package_pass(
                *probe.args(index, weights, delta), steps=len(parts)
            )
    else:
        mode = KERAS_ACCUMULATION

        def accumulated(index, parts, weights, delta):
            return sum(
                probe.one_pass(*probe.args(index[p], weights, delta, p))
                for p in parts
            ) / len(parts)

    accumulation_factor, accumulation_probe = probe.split_factor(
        acc_index, acc_parts, accumulated
    )

    if not all(np.isfinite([v for _, v in repetitions] + [single])):
        verdict = "non_finite"
    else:
        verdict = classify(
            exponent, factor, tolerance, unequal, accumulation_factor
        )
    advice = model_advice(
        verdict, exponent, factor, num_replicas, unequal, accumulation_factor,
        len(acc_parts), mode, _overrides_compute_loss(model),
    )
    outputs = _output_diagnoses(
        model, x, y, repeats, num_replicas, tolerance, accumulation_steps
    )
    fix = fix_for(verdict, model=True)
    if verdict == "invariant":
        # A small output's bug can hide in the total: any output decides.
        for name, output in outputs.items():
            if not output.ok:
                verdict, fix = output.verdict, output.fix
                advice = f"Output {name!r}: {output.advice}"
                break
    result = ModelDiagnosis(
        verdict=verdict, fix=fix, advice=advice, exponent=exponent,
        replica_factor=factor, replica_factor_split=factor_split,
        repetitions=repetitions, num_replicas=num_replicas,
        outputs=outputs, model_name=model.name,
        unequal_split_factor=unequal, accumulation_factor=accumulation_factor,
        accumulation_steps=len(acc_parts), accumulation_mode=mode,
        probes={"replicas": replica_probe, "accumulation": accumulation_probe},
        all_reduces=simulation.all_reduces,
    )
    if verbose:
        print_msg(str(result))
    return result


def _overrides_compute_loss(model):
    """Whether the model's class computes its loss in its own `compute_loss`."""
    from keras_batchfix.training.model import NormalizerUpdates  # imports this package

    for cls in type(model).__mro__:
        if cls is keras.Model:
            return False
        if cls is not NormalizerUpdates and "compute_loss" in vars(cls):
            return True
    return False


def _output_diagnoses(model, x, y, repeats, num_replicas, tolerance, steps):
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
            results[name] = loss_check.diagnose(
                loss, y[name], ops.convert_to_numpy(y_pred[name]),
                repeats=repeats, num_replicas=num_replicas,
                tolerance=tolerance, accumulation_steps=steps,
            )
    return results
