"""The loss of one slice as terms: `numerator / divisor(count)`, summed over slices.

A batch run in slices (`keras_batchfix.training.accumulation`) needs each
part of the loss as a numerator and a count, so that the numerators'
gradients and the counts can be added up over the slices and divided once.
This module turns a model's compiled losses, its `CenterLoss` layers and
its other `add_loss` values into such terms:

* a `NormalizedLoss`: its `numerator_and_count`;
* a Keras `Loss`, reduced as Keras reduces it: by the valid entries under a
  mask, by the weight sum for `"mean_with_sample_weight"`, by the number of
  values otherwise (no count for `"sum"`), with the count global over the
  replicas;
* a `CenterLoss` running in slices: its numerator over the slice's samples;
* any other `add_loss` value: a per-step value spread evenly over the slices.
"""

import keras
from keras import ops

from keras_batchfix import _keras_compat, normalizers, replicas
from keras_batchfix.center_loss import CenterLoss
from keras_batchfix.normalized_loss import NormalizedLoss, as_values, weighted_sum


def batch_size(data):
    first = next(v for v in keras.tree.flatten(data) if v is not None)
    size = first.shape[0]
    return size if size is not None else ops.shape(first)[0]


class Term:
    """One additive part of the loss: `numerator / divisor(count)`.

    Terms with equal `key` share a count and a normalizer and are summed
    before differentiation. `normalizer` is None for a term without a count
    (then `is_global` says whether the replicas' values add up or average).
    """

    def __init__(self, key, numerator, count=None, normalizer=None, is_global=True):
        self.key = key
        self.numerator = numerator
        self.count = count
        self.normalizer = normalizer
        self.is_global = normalizer.is_global if normalizer is not None else is_global


def normalizer_key(normalizer):
    if getattr(normalizer, "stateful", False):
        return id(normalizer)
    return type(normalizer).__name__


def _loss_name(loss):
    return getattr(loss, "name", None) or repr(loss)


def _normalized_loss_term(path, loss, y_true, y_pred, sample_weight):
    mask = _keras_compat.get_keras_mask(y_pred)
    y_true = ops.convert_to_tensor(y_true, dtype=loss.dtype)
    y_pred = ops.convert_to_tensor(y_pred, dtype=loss.dtype)
    numerator, count = loss.numerator_and_count(y_true, y_pred)
    if count is None:
        raise ValueError(
            f"Loss {_loss_name(loss)!r} normalizes itself (it has no `count`), "
            "so its micro-batches cannot be combined into the batch's loss. "
            "With `micro_batches`, hand the numerator and the count "
            "separately: `keras_batchfix.compensate(numerator, count=...)`."
        )
    numerator = as_values(loss, "numerator", numerator, loss.dtype)
    count = as_values(loss, "count", count, "float32")
    key = ("count", path, normalizer_key(loss.normalizer))
    return Term(key, weighted_sum(numerator, sample_weight, mask), count, loss.normalizer)


def _keras_loss_term(path, loss, y_true, y_pred, sample_weight):
    """Numerator and count of a Keras `Loss` reduced as Keras reduces it."""
    in_mask = _keras_compat.get_keras_mask(y_pred)
    y_true = keras.tree.map_structure(
        lambda v: ops.convert_to_tensor(v, dtype=loss.dtype), y_true
    )
    y_pred = keras.tree.map_structure(
        lambda v: ops.convert_to_tensor(v, dtype=loss.dtype), y_pred
    )
    values = loss.call(y_true, y_pred)
    out_mask = _keras_compat.get_keras_mask(values)
    mask = in_mask if out_mask is None else (
        out_mask if in_mask is None else in_mask & out_mask
    )
    reduction = loss.reduction
    if len(values.shape) == 0 and reduction != "sum":
        raise ValueError(
            f"Loss {_loss_name(loss)!r} returns a scalar, so its micro-batches "
            "cannot be combined into the batch's loss. With `micro_batches`, "
            "return per-sample values, or hand the numerator and the count "
            "separately: `keras_batchfix.compensate(numerator, count=...)`."
        )
    numerator = _keras_compat.reduce_weighted_values(
        values, sample_weight, mask, reduction="sum", dtype=loss.dtype
    )
    if reduction == "sum":
        return Term(("sum",), numerator, is_global=True)
    if reduction == "mean_with_sample_weight":
        weights = _keras_compat.apply_mask(sample_weight, mask, loss.dtype, "sum")
        if weights is None:
            weights = ops.ones_like(values)
        count = ops.sum(ops.cast(weights, "float32"))
        return Term(("weights", path), numerator, count, normalizers.GlobalCount())
    if reduction not in ("sum_over_batch_size", "mean"):
        raise ValueError(
            f"Loss {_loss_name(loss)!r} has reduction {reduction!r}; with "
            "`micro_batches` a compiled loss must be reduced with "
            "'sum_over_batch_size', 'mean', 'mean_with_sample_weight' or 'sum'."
        )
    global_count = normalizers.GlobalCount()
    if mask is not None:  # Keras divides by the valid entries
        count = ops.sum(ops.cast(mask, "float32"))
        return Term(("mask", path), numerator, count, global_count)
    # Keras divides by the number of values: the samples times a per-sample
    # size that is the same for every slice of a batch.
    shape = ops.shape(values)
    per_sample = 1
    for dim in shape[1:]:
        per_sample = per_sample * dim
    numerator = numerator / ops.cast(per_sample, numerator.dtype)
    count = ops.cast(shape[0], "float32")
    return Term(("samples", normalizer_key(global_count)), numerator, count, global_count)


def _leaf(path, nest):
    """The entry of `nest` at `path` (keys and indices, as Keras's losses have)."""
    for key in path:
        nest = nest[key]
    return nest


def all_layers(layer):
    """`layer`'s layers, nested models' layers included."""
    for sublayer in getattr(layer, "layers", ()):
        yield sublayer
        yield from all_layers(sublayer)


def center_loss_layers(model):
    return [layer for layer in all_layers(model) if isinstance(layer, CenterLoss)]


def forward_terms(model, x, y, sample_weight, slices):
    """Runs `model` on one slice; returns `(y_pred, terms of its loss)`."""
    y_pred = model(x, training=True)
    return y_pred, terms_of_pass(model, x, y, y_pred, sample_weight, slices)


def terms_of_pass(model, x, y, y_pred, sample_weight, slices):
    """The terms of the loss of the pass of `model` on `x` that made `y_pred`.

    A `CenterLoss` (run as slices) adds its numerator, a sum over the
    slice's samples. Any other `add_loss` value (a regularizer) is taken as
    a per-step value and spread evenly over the batch's `slices`.
    """
    terms = []
    own = set()
    for layer in center_loss_layers(model):
        for value in layer.losses:
            own.add(id(value))
            count = ops.cast(batch_size(x), "float32")
            key = ("samples", normalizer_key(layer.normalizer))
            terms.append(Term(key, value, count, layer.normalizer))
    others = [value for value in model.losses if id(value) not in own]
    return loss_terms(model, y, y_pred, sample_weight, others, slices) + terms


def loss_terms(model, y, y_pred, sample_weight, layer_losses, slices):
    """The terms of `model`'s compiled loss on one slice, and of `layer_losses`.

    Each of `layer_losses` is taken as a per-step value (a weight
    regularizer), spread evenly over the `slices` of the batch.
    """
    terms = []
    for path, loss, weight in _keras_compat.flat_compiled_losses(model, y, y_pred):
        y_t = _leaf(path, y)
        y_p = _leaf(path, y_pred)
        sw = sample_weight
        if sw is not None and keras.tree.is_nested(sw):
            sw = _leaf(path, sw)
        if isinstance(loss, NormalizedLoss):
            term = _normalized_loss_term(path, loss, y_t, y_p, sw)
        else:
            term = _keras_loss_term(path, loss, y_t, y_p, sw)
        if weight is not None:
            term.numerator = term.numerator * weight
        terms.append(term)
    for value in layer_losses:
        value = ops.cast(value, "float32") / float(slices)
        terms.append(Term(("per step",), value, is_global=False))
    return terms


def combine(terms):
    """Terms with one key summed: `{key: Term}` in order of appearance."""
    groups = {}
    for term in terms:
        if term.key not in groups:
            groups[term.key] = Term(
                term.key, term.numerator, term.count, term.normalizer, term.is_global
            )
            continue
        group = groups[term.key]  # one count for the key: kept as it is
        group.numerator = group.numerator + ops.cast(term.numerator, group.numerator.dtype)
    return groups


def scale(count, normalizer, is_global):
    """What the summed gradients of a term are multiplied by at the update."""
    one = ops.ones((), dtype="float32")
    if normalizer is None:
        return replicas.to_keras(one, 1.0, is_global, route=replicas.COMPILED)
    return replicas.to_keras(
        one, normalizer.divisor(count), normalizer.is_global, route=replicas.COMPILED
    )
