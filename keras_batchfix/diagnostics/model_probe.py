"""The evaluations behind `diagnose_model`: the model's `compute_loss` on subsets of the batch.

`ModelProbe` evaluates the loss as `fit` computes it (or as a
`compile(micro_batches=k)` step does), on ordered subsets of `(x, y)`, with
one-hot sample weights or moved predictions, and measures how a split
reweighs the samples (`split_weights`).
"""

import keras
import numpy as np
from keras import ops

from keras_batchfix import _keras_compat
from keras_batchfix.training import accumulation, loss_terms
from keras_batchfix.diagnostics import split_weights


class ModelProbe:
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

        As `keras_batchfix.training.accumulation`: each term's numerators and counts
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
            for key, group in loss_terms.combine(
                loss_terms.terms_of_pass(self.model, xs, ys, y_pred, sw, len(bounds))
            ).items():
                groups.setdefault(key, group)
                numerators[key] = numerators.get(key, 0.0) + _float(group.numerator)
                if group.count is not None:
                    counts[key] = accumulation.add(counts.get(key), group.count)
        return sum(
            numerators[key] * _float(loss_terms.scale(
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
        """The samples ordered by their count (see `split_weights`)."""
        n = keras.tree.flatten(self.x)[0].shape[0]
        everything = np.arange(n)
        shares = split_weights.shares(
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
        return split_weights.count_order(
            split_weights.relative_counts(shares, singles)
        )

    def moves(self, index):
        """Seeded noise like the predictions of the samples `index`."""
        y_pred = keras.tree.map_structure(
            ops.convert_to_numpy, self.forward(self.args(index)[0])
        )
        return keras.tree.map_structure(
            lambda a: split_weights.noise_like(a, seed=0)
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
                whole = split_weights.shares(
                    lambda w: self.one_pass(*self.args(index, w)), size
                )
        if whole is not None:
            split = split_weights.shares(
                lambda w: objective(index, parts, w, None), size
            )
            if split is not None:
                return split_weights.factor(split, whole), "sample weights"
        moves = self.moves(index)
        base_whole = self.one_pass(*self.args(index))
        base_split = objective(index, parts, None, None)
        whole, split = [], []
        for part in parts:
            delta = _rows_only(moves, part)
            whole.append(self.one_pass(*self.args(index, None, delta)) - base_whole)
            split.append(objective(index, parts, None, delta) - base_split)
        return split_weights.factor(split, whole), "predictions"


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
