"""`diagnose_model`: how a whole model's training loss scales with the batch, the replicas and accumulation.

`diagnose` takes a loss function. Where a model normalizes its loss itself,
in a `compute_loss` override (keras-hub's detectors divide their `"sum"`
losses by the batch's positive anchors), or through Keras's masks (an
`Embedding(mask_zero=True)` makes a mean loss one over the valid tokens),
only the model can be checked. This evaluates `model.compute_loss` as `fit`
does, on the user's `(x, y)`:

* tiled `k` times for `k` in `repeats`: the fitted exponent of the loss in
  the batch size (0 invariant, -1 divided by the batch size twice);
* split over `num_replicas` simulated `tf.distribute` replicas: the sum of
  what each replica hands Keras over the one-device loss, the *replica
  factor* (1 when exact; `num_replicas` when each replica divides by its own
  count and Keras sums the replicas, as a `"sum"` reduction does);
* split with unequal counts (the samples ordered by their count, as
  `keras_batchfix.diagnose` does), over the replicas and over the
  micro-batches of gradient accumulation: how far apart the split puts the
  samples' weights (1 when exact).

The replicas run one after the other on one device. What they would
all-reduce (`keras_batchfix.replicas.global_sum`: `GlobalCount`, `EMACount`,
`CenterLoss`) is recorded in a first pass and replayed summed in a second,
and Keras's mean reductions get `1 / num_replicas` as under `tf.distribute`.
A model compiled with `micro_batches` (`keras_batchfix.Model`) is evaluated
as its training step computes the loss: numerators and counts summed over
the micro-batches (and all-reduced over the replicas), divided once.
"""

import dataclasses

import keras
import numpy as np
from keras import ops

from keras_batchfix import _keras_compat, _split_weights, _validation, accumulation, replicas
from keras_batchfix._keras_compat import print_msg
from keras_batchfix.diagnose import (
    KERAS_ACCUMULATION,
    MICRO_BATCHES,
    _check_steps,
    _check_verbose,
    _fmt,
    _repeats,
    _slope,
    diagnose,
    exact_splits,
    split_advice,
    split_lines,
    split_verdict,
)

ADVICE = {
    "invariant": "The model's loss is exact at every batch size and replica split.",
    "replica_sum": (
        "Each replica normalizes by its own batch and Keras sums the replicas: "
        "on N devices the step is about N times one device's. Divide by the "
        "count summed over the replicas: weight the summed losses with "
        "keras_batchfix.count_weight(count, keras_batchfix.GlobalCount()) in "
        "compute_loss (keras-hub's RetinaNet: "
        "keras_batchfix.integrations.retinanet.RetinaNetObjectDetector)."
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
            `"replica_split"` (a replica split with unequal counts reweighs
            the samples), `"accumulation"` (gradient accumulation reweighs
            them), `"local_count"` (both: each replica and each micro-batch
            divides by its own count), `"other"` or `"non_finite"` (NaN or
            infinite) for the total loss; when the total is invariant but a
            compile-time output's loss is not, that output's `diagnose`
            verdict.
        advice: the fix in words.
        exponent: `d log(loss) / d log(B)` over repetitions of `(x, y)`.
        replica_factor: sum over the replicas of what each hands Keras,
            divided by the one-device loss, each replica seeing all of
            `(x, y)`.
        replica_factor_split: the same with `(x, y)` split into distinct
            parts, ordered by their count (fewest on the first replica).
        repetitions: `[(B, loss)]`.
        num_replicas: replicas of the split check.
        outputs: `{output name: Diagnosis}` for compile-time losses (empty
            when the model computes its loss in a `compute_loss` override).
        unequal_split_factor: on that split, `max_i r_i / min_i r_i` with
            `r_i` sample `i`'s weight in the replicas' summed loss over its
            weight in the one-device loss (1 when exact; see
            `keras_batchfix.diagnose`).
        accumulation_factor: the same for `accumulation_steps` micro-batches
            of the samples ordered by their count, against one pass.
        accumulation_steps: micro-batches of the accumulation check.
        accumulation_mode: `"keras"` (Keras's `gradient_accumulation_steps`:
            the mean of the micro-batches' `compute_loss`) or
            `"micro_batches"` (the model's `compile(micro_batches=k)` step).
        probes: how each factor was measured: `"sample weights"` (one-hot
            sample weights, exact) or `"predictions"` (finite differences of
            each part's predictions).
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
            f"{_fmt(self.replica_factor_split)} (distinct samples, fewest "
            "counts on replica 0)"
        )
        lines.extend(split_lines(self))
        for name, result in self.outputs.items():
            lines.append(
                f"  output {name!r}: {result.verdict} (exponent "
                f"{_fmt(result.exponent)}, replica x{_fmt(result.replica_ratio)}"
                f", unequal split x{_fmt(result.unequal_split_factor)}, "
                f"accumulation x{_fmt(result.accumulation_factor)})"
                f" -> fix: {result.fix}"
            )
        lines.append(f"VERDICT: {self.verdict}")
        lines.append(f"  {self.advice}")
        return "\n".join(lines)


def diagnose_model(
    model, x, y=None, repeats=(1, 2, 4), num_replicas=2, tolerance=0.1,
    verbose=0, accumulation_steps=None,
):
    """Finds out whether a model's training loss depends on the batch or its splits.

    Besides the batch exponent and the replica factor, the samples are
    ordered by their count and split into equal parts, fewest counts first,
    over the replicas and over `accumulation_steps` micro-batches; with
    `L(w)` the one-pass loss under per-sample weights `w` and `O(w)` the
    split's,

        r_i = (O(e_i) - O(0)) / (L(e_i) - L(0))      (e_i one-hot)
        factor = max_i r_i / min_i r_i                (1 when exact)

    `O` is the replicas' summed loss, or the mean of the micro-batches'
    `compute_loss` (Keras's `gradient_accumulation_steps`); for a model
    compiled with `micro_batches` (`keras_batchfix.Model`), its own step's
    loss. A `compute_loss` that ignores `sample_weight` is measured per part,
    by finite differences of the part's predictions.

    Args:
        model: a compiled `keras.Model` (its `compute_loss` may be
            overridden, as keras-hub's detectors do).
        x, y: one batch as `compute_loss` receives it in `fit` (arrays, or
            dicts / lists of arrays, batch on axis 0; for a keras-hub task,
            after its preprocessor).
        repeats: tiling factors for the batch-size exponent.
        num_replicas: replicas of the split checks (>= 2).
        tolerance: how far an exponent may be from 0 or -1, and a factor
            from 1 or `num_replicas` (relatively), to count as it.
        verbose: 0 (default) prints nothing, 1 prints the report. Either
            way `print(result)` shows it.
        accumulation_steps: micro-batches of the accumulation check (>= 2);
            default the model's `micro_batches`, else 2.

    Returns:
        A `ModelDiagnosis` (`str()` of it is the report).

    Example:

    ```python
    result = keras_batchfix.diagnose_model(detector, images, {"boxes": b, "labels": l})
    result.verdict          # "replica_sum": 2 replicas take twice the step
    result.replica_factor   # 2.0
    result = keras_batchfix.diagnose_model(masked_token_model, tokens, targets)
    result.verdict          # "local_count": replicas and micro-batches divide by their own tokens
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
    micro_batches = getattr(model, "micro_batches", None)
    if accumulation_steps is None:
        accumulation_steps = micro_batches or 2
    accumulation_steps = _check_steps(accumulation_steps)
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

    probe = _ModelProbe(model, x, y, micro_batches)

    def tiled(k):
        return keras.tree.map_structure(
            lambda a: np.concatenate([a] * k, axis=0), (x, y)
        )

    repetitions = [(n * k, probe.one_pass(*tiled(k))) for k in repeats]
    exponent = _slope([b for b, _ in repetitions], [v for _, v in repetitions])
    single = probe.one_pass(x, y)
    same = sum(_replica_losses(
        probe.step, [(x, y)] * num_replicas, num_replicas
    ))
    order = probe.count_order()
    rep_index, rep_parts = _split_weights.equal_parts(order, num_replicas)
    parts = [probe.args(rep_index[part]) for part in rep_parts]
    split = sum(_replica_losses(probe.step, parts, num_replicas))
    whole_split = probe.one_pass(*probe.args(rep_index))
    factor = same / single if single else float("nan")
    factor_split = split / whole_split if whole_split else float("nan")

    def replicated(index, parts, weights, delta):
        args = [probe.args(index[p], weights, delta, p) for p in parts]
        return sum(_replica_losses(probe.step, args, num_replicas))

    unequal, replica_probe = probe.split_factor(rep_index, rep_parts, replicated)
    steps = min(accumulation_steps, n)
    acc_index, acc_parts = _split_weights.equal_parts(order, steps)
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
    elif abs(exponent) <= tolerance and abs(factor - 1) <= tolerance:
        verdict = split_verdict(unequal, accumulation_factor, tolerance)
    elif abs(exponent) <= tolerance and abs(factor / num_replicas - 1) <= tolerance:
        verdict = "replica_sum"
    elif abs(exponent + 1) <= tolerance:
        verdict = "inverse_batch_size"
    else:
        verdict = "other"
    advice = _advice(
        verdict, model, unequal, accumulation_factor, num_replicas,
        len(acc_parts), mode,
    )
    outputs = _output_diagnoses(
        model, x, y, repeats, num_replicas, tolerance, accumulation_steps
    )
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
        unequal_split_factor=unequal, accumulation_factor=accumulation_factor,
        accumulation_steps=len(acc_parts), accumulation_mode=mode,
        probes={"replicas": replica_probe, "accumulation": accumulation_probe},
    )
    if verbose:
        print_msg(str(result))
    return result


def _overrides_compute_loss(model):
    """Whether the model's class computes its loss in its own `compute_loss`."""
    from keras_batchfix.model import NormalizerUpdates

    for cls in type(model).__mro__:
        if cls is keras.Model:
            return False
        if cls is not NormalizerUpdates and "compute_loss" in vars(cls):
            return True
    return False


def _advice(verdict, model, unequal, accumulation_factor, num_replicas, steps, mode):
    if verdict == "invariant":
        return (
            "The model's loss is exact: independent "
            + exact_splits(unequal, accumulation_factor, steps, num_replicas)
            + "."
        )
    if verdict not in ("replica_split", "accumulation", "local_count"):
        return ADVICE[verdict]
    if mode == MICRO_BATCHES or not _overrides_compute_loss(model):
        return split_advice(
            verdict, unequal, accumulation_factor, num_replicas, steps, mode,
            counts_global=mode == MICRO_BATCHES, model=True,
        )
    sentences = []
    if verdict in ("replica_split", "local_count"):
        sentences.append(
            f"Split over {num_replicas} replicas with unequal counts, samples "
            f"weigh up to x{_fmt(unequal)} differently than on one device: the "
            "model's compute_loss divides by the count of each replica's batch."
            " Fix: weight its losses with keras_batchfix.count_weight(count, "
            "keras_batchfix.GlobalCount())."
        )
    if verdict in ("accumulation", "local_count"):
        sentences.append(
            f"Under Keras's gradient_accumulation_steps={steps}, samples weigh "
            f"up to x{_fmt(accumulation_factor)} differently than in one pass: "
            "each micro-batch divides by its own count, and compile("
            "micro_batches=k) slices compiled losses, not a compute_loss "
            "override. Fix: train without gradient accumulation (a larger "
            "batch, or more replicas with a global count)."
        )
    return " ".join(sentences)


class _ModelProbe:
    """The model's loss on ordered subsets of `(x, y)`, with probe weights or moved predictions."""

    def __init__(self, model, x, y, micro_batches):
        self.model, self.x, self.y = model, x, y
        self.micro_batches = micro_batches
        self.shapes = _value_shapes(model, x, y)
        self.natural_shares = None  # the samples' shares, set by count_order

    # -- evaluation ------------------------------------------------------
    def args(self, index, weights=None, delta=None, part=None):
        """`(x, y, weights, delta)` of the samples `index`.

        `weights` and `delta` are given for a whole ordered batch; `part`
        picks the rows of one part of it.
        """
        take = (lambda v: v) if part is None else (lambda v: v[part])
        data = keras.tree.map_structure(lambda a: a[index], (self.x, self.y))
        return (
            *data,
            None if weights is None else take(weights),
            None if delta is None else keras.tree.map_structure(take, delta),
        )

    def forward(self, x, delta=None):
        y_pred = self.model(x, training=False)
        return y_pred if delta is None else _moved(y_pred, delta)

    def one_pass(self, x, y, weights=None, delta=None):
        """`model.compute_loss` on one batch, as `fit` computes it."""
        # New containers: a compute_loss may write into its `y` (keras-hub's).
        x, y = keras.tree.map_structure(lambda a: a, (x, y))
        y_pred = self.forward(x, delta)
        return _float(self.model.compute_loss(
            x=x, y=y, y_pred=y_pred, sample_weight=self.sample_weight(weights, y_pred),
            training=False,
        ))

    def step(self, x, y, weights=None, delta=None):
        """What one replica's training step optimizes on its batch."""
        if self.micro_batches:
            return self.package_pass(x, y, weights, delta, self.micro_batches)
        return self.one_pass(x, y, weights, delta)

    def package_pass(self, x, y, weights=None, delta=None, steps=2):
        """The loss of `compile(micro_batches=steps)`'s step on one batch.

        As `keras_batchfix.accumulation`: each term's numerators and counts
        summed over the micro-batches, the summed numerator times the
        term's scale (its replica factor over its divisor of the summed
        count). The forward passes run with `training=False`.
        """
        size = keras.tree.flatten(x)[0].shape[0]
        bounds = accumulation.micro_batch_bounds(size, steps)
        numerators, counts, groups = {}, {}, {}
        for start, stop in bounds:
            rows = slice(start, stop)
            xs, ys = keras.tree.map_structure(lambda a: a[rows], (x, y))  # new
            y_pred = self.forward(
                xs, None if delta is None else keras.tree.map_structure(
                    lambda d: d[rows], delta)
            )
            sw = self.sample_weight(
                None if weights is None else weights[rows], y_pred
            )
            for key, group in accumulation.combine(
                _terms(self.model, xs, ys, y_pred, sw, len(bounds))
            ).items():
                groups.setdefault(key, group)
                numerators[key] = numerators.get(key, 0.0) + _float(group.numerator)
                if group.count is not None:
                    counts[key] = accumulation._add(counts.get(key), group.count)
        return sum(
            numerators[key] * _float(accumulation.scale(
                counts.get(key), group.normalizer, group.is_global
            ))
            for key, group in groups.items()
        )

    def sample_weight(self, weights, y_pred):
        """Per-sample `weights` shaped for each output's loss values."""
        if weights is None:
            return None
        weights = np.asarray(weights, "float32")

        def shaped(tail):
            column = weights.reshape((-1,) + (1,) * len(tail))
            return np.ascontiguousarray(np.broadcast_to(column, (len(weights),) + tail))

        if isinstance(self.shapes, tuple):
            return shaped(self.shapes)
        return {key: shaped(tail) for key, tail in self.shapes.items()} if isinstance(
            self.shapes, dict) else [shaped(tail) for tail in self.shapes]

    # -- measurements ----------------------------------------------------
    def count_order(self):
        """The samples ordered by their count (see `_split_weights`)."""
        n = keras.tree.flatten(self.x)[0].shape[0]
        everything = np.arange(n)
        shares = _split_weights.shares(
            lambda w: self.one_pass(*self.args(everything, w)), n
        )
        self.natural_shares = shares
        singles = [self.one_pass(*self.args(np.array([i]))) for i in range(n)]
        if shares is None:  # move one sample's predictions at a time
            moves = self.moves(everything)
            base = self.one_pass(*self.args(everything))
            shares, singles_moved = [], []
            for i in range(n):
                one = np.array([i])
                shares.append(self.one_pass(
                    *self.args(everything, None, _rows_only(moves, one))) - base)
                singles_moved.append(self.one_pass(
                    *self.args(one, None, moves, one)) - singles[i])
            singles = singles_moved
        return _split_weights.count_order(
            _split_weights.relative_counts(shares, singles)
        )

    def moves(self, index):
        """Seeded noise like the predictions of the samples `index`."""
        y_pred = keras.tree.map_structure(
            ops.convert_to_numpy, self.forward(self.args(index)[0])
        )
        return keras.tree.map_structure(
            lambda a: _split_weights.noise_like(a, seed=0)
            if np.issubdtype(a.dtype, np.floating) else np.zeros_like(a),
            y_pred,
        )

    def split_factor(self, index, parts, objective):
        """`(factor, probe)` of `objective(index, parts, weights, delta)` against one pass."""
        size = len(index)
        whole = self.natural_shares
        if whole is not None:
            if size == len(whole):  # the batch, reordered
                whole = whole[index]
            else:
                whole = _split_weights.shares(
                    lambda w: self.one_pass(*self.args(index, w)), size
                )
        if whole is not None:
            split = _split_weights.shares(
                lambda w: objective(index, parts, w, None), size
            )
            if split is not None:
                return _split_weights.factor(split, whole), "sample weights"
        moves = self.moves(index)
        base_whole = self.one_pass(*self.args(index))
        base_split = objective(index, parts, None, None)
        whole, split = [], []
        for part in parts:
            delta = _rows_only(moves, part)
            whole.append(self.one_pass(*self.args(index, None, delta)) - base_whole)
            split.append(objective(index, parts, None, delta) - base_split)
        return _split_weights.factor(split, whole), "predictions"


def _rows_only(moves, rows):
    """`moves` with every row but `rows` zero."""

    def only(m):
        delta = np.zeros_like(m)
        delta[rows] = m[rows]
        return delta

    return keras.tree.map_structure(only, moves)


def _float(value):
    """A scalar tensor as a Python float (detached on torch)."""
    return float(ops.convert_to_numpy(value))


def _terms(model, x, y, y_pred, sample_weight, slices):
    """`accumulation.forward_terms` on predictions already made (no training pass)."""
    terms, own = [], set()
    for layer in accumulation.center_loss_layers(model):
        for value in layer.losses:
            own.add(id(value))
            count = ops.cast(keras.tree.flatten(x)[0].shape[0], "float32")
            key = ("samples", accumulation._normalizer_key(layer.normalizer))
            terms.append(accumulation.Term(key, value, count, layer.normalizer))
    others = [value for value in model.losses if id(value) not in own]
    return accumulation.loss_terms(
        model, y, y_pred, sample_weight, others, slices
    ) + terms


def _value_shapes(model, x, y):
    """Each compiled output loss's values' shape after the batch axis.

    A tuple for one output, else a structure like the outputs' (`()` when
    unknown). Keras broadcasts a sample weight only to values of its own
    rank, and the torch backend not at all where a mask meets it.
    """
    try:
        y_pred = model(keras.tree.map_structure(lambda a: a[:1], x), training=False)
        y_one = keras.tree.map_structure(lambda a: a[:1], y)
        flat = _keras_compat.flat_compiled_losses(model, y_one, y_pred)
    except Exception:  # a compute_loss override with targets of its own
        return ()
    shapes = {}
    for path, loss, _ in flat:
        if loss is None:
            continue
        y_t, y_p = y_one, y_pred
        try:
            for key in path:
                y_t, y_p = y_t[key], y_p[key]
            values = loss.call(
                ops.convert_to_tensor(y_t), ops.convert_to_tensor(y_p)
            )
            shapes[tuple(path)] = tuple(int(d) for d in values.shape[1:])
        except Exception:
            shapes[tuple(path)] = ()
    if list(shapes) in ([], [()]):
        return shapes.get((), ())
    if all(len(path) == 1 for path in shapes) and isinstance(y_pred, dict):
        return {name: shapes.get((name,), ()) for name in y_pred}
    if all(len(path) == 1 for path in shapes) and isinstance(y_pred, (list, tuple)):
        return [shapes.get((i,), ()) for i in range(len(y_pred))]
    return ()


def _moved(y_pred, delta):
    """`y_pred + delta`, each output keeping its Keras mask."""

    def move(value, d):
        moved = value + ops.convert_to_tensor(d, dtype=value.dtype)
        mask = _keras_compat.get_keras_mask(value)
        if mask is not None:
            _keras_compat.set_keras_mask(moved, mask)
        return moved

    return keras.tree.map_structure(move, y_pred, delta)


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
            results[name] = diagnose(
                loss, y[name], ops.convert_to_numpy(y_pred[name]),
                repeats=repeats, num_replicas=num_replicas,
                tolerance=tolerance, accumulation_steps=steps,
            )
    return results
