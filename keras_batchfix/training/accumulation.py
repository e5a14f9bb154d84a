"""Exact gradient accumulation: one update per batch of `fit`, run as micro-batches.

Keras's `gradient_accumulation_steps=k` applies the mean of `k` micro-steps'
gradients. A loss divided by a count of its own micro-batch (positives,
valid tokens, samples of a short batch) then trains on the mean of
per-micro-batch means, not on the loss of the window; learning-rate
schedules count micro-steps, and windows run across epochs.

`model.compile(..., micro_batches=k)` on a `keras_batchfix.Model` (or a model
with `keras_batchfix.NormalizerUpdates`) makes every batch of `fit` one
optimizer step on that batch's loss, computed in `k` forward and backward
passes over slices of it, so that only one slice's activations are held at
a time. Every term of the loss hands over its numerator and its count;
their gradients and counts are added up over the slices and divided once:

    grad = sum over terms g of scale_g * sum_m grad(numerator_{g,m})
    scale_g = replica factor / divisor_g(sum_m count_{g,m})

with `divisor_g` the term's normalizer (global over the replicas for
Keras's own mean losses). The update is the one of a single pass over the
whole batch, on every strategy; the optimizer counts updates, so schedules,
momentum and Adam see the big-batch run, and a short last batch is one
short update.

Terms that share a count and a normalizer share one backward pass; each
further term costs one more backward pass per slice and one more
gradient-sized buffer.
"""

import keras
from keras import ops

from keras_batchfix import _keras_compat, _validation, normalizers, replicas
from keras_batchfix.center_loss import CenterLoss
from keras_batchfix.normalized_loss import NormalizedLoss, _as_values, weighted_sum


def check_micro_batches(micro_batches):
    """`micro_batches` as an int >= 2, or None; a named error otherwise."""
    if micro_batches is None:
        return None
    return _validation.integer("micro_batches", micro_batches, 2)


# ------------------------------------------------------------------ slicing
def _batch_size(data):
    first = next(v for v in keras.tree.flatten(data) if v is not None)
    size = first.shape[0]
    return size if size is not None else ops.shape(first)[0]


def micro_batch_bounds(size, micro_batches):
    """`(start, stop)` of each slice: sizes differ by at most one.

    With a Python `size` (JAX, torch, a static TensorFlow shape) empty slices
    are left out; with a tensor (a dynamic TensorFlow batch) a batch smaller
    than `micro_batches` leaves some slices empty.
    """
    quotient, remainder = size // micro_batches, size % micro_batches
    starts = [
        i * quotient + (min(i, remainder) if isinstance(size, int)
                        else ops.minimum(i, remainder))
        for i in range(micro_batches + 1)
    ]
    bounds = list(zip(starts[:-1], starts[1:]))
    if isinstance(size, int):
        bounds = [(start, stop) for start, stop in bounds if stop > start]
    return bounds


def _slice(data, start, stop):
    return keras.tree.map_structure(
        lambda v: None if v is None else v[start:stop], data
    )


# -------------------------------------------------------------------- terms
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


def _normalizer_key(normalizer):
    if normalizers.stateful(normalizer):
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
    numerator = _as_values(loss, "numerator", numerator, loss.dtype)
    count = _as_values(loss, "count", count, "float32")
    key = ("count", path, _normalizer_key(loss.normalizer))
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
    return Term(("samples", _normalizer_key(global_count)), numerator, count, global_count)


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
    """Runs `model` on one slice; returns `(y_pred, terms of its loss)`.

    A `CenterLoss` (run as slices) adds its numerator, a sum over the
    slice's samples. Any other `add_loss` value (a regularizer) is taken as
    a per-step value and spread evenly over the batch's `slices`.
    """
    y_pred = model(x, training=True)
    terms = []
    own = set()
    for layer in center_loss_layers(model):
        for value in layer.losses:
            own.add(id(value))
            count = ops.cast(_batch_size(x), "float32")
            key = ("samples", _normalizer_key(layer.normalizer))
            terms.append(Term(key, value, count, layer.normalizer))
    others = [value for value in model.losses if id(value) not in own]
    return y_pred, loss_terms(model, y, y_pred, sample_weight, others, slices) + terms


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


def _check_model(model):
    steps = getattr(model.optimizer, "gradient_accumulation_steps", None)
    if steps:
        raise ValueError(
            "Argument `micro_batches` replaces the optimizer's "
            f"`gradient_accumulation_steps` (received {steps}): pass one of "
            "them. With `micro_batches=k`, `fit`'s `batch_size` is the batch of "
            "one update, and each is run as k slices."
        )


# -------------------------------------------------------------- train steps
def train_step(model, *args):
    """`model.train_step` with `model.micro_batches` slices per batch."""
    backend = keras.backend.backend()
    if backend == "jax":
        return _jax_train_step(model, *args)
    if backend == "tensorflow":
        return _tensorflow_train_step(model, *args)
    if backend == "torch":
        return _torch_train_step(model, *args)
    raise ValueError(f"`micro_batches` does not support the {backend!r} backend.")


def _window(model, data):
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    size = _batch_size(x)
    bounds = micro_batch_bounds(size, model.micro_batches)
    return size, [
        (_slice(x, a, b), _slice(y, a, b), _slice(sample_weight, a, b))
        for a, b in bounds
    ]


def _end_window(model, groups, counts):
    """Each group's scale; stateful normalizers and center steps move once."""
    scales = []
    for key, group in groups.items():
        scales.append(scale(counts.get(key), group.normalizer, group.is_global))
    for group in groups.values():
        if normalizers.stateful(group.normalizer):
            group.normalizer.update()
    for layer in center_loss_layers(model):
        if layer.trainable:
            layer.end_window()
    return scales


def _record_loss(model, groups, numerators, scales, size):
    value = sum(
        ops.cast(numerators[key], "float32") * s for key, s in zip(groups, scales)
    )
    if keras.backend.backend() == "tensorflow":
        value = value * float(replicas.num_replicas())  # as Keras logs it
    _keras_compat.loss_tracker(model).update_state(value, sample_weight=size)


def _add(total, value):
    return value if total is None else total + value


def _tensorflow_train_step(model, data):
    import tensorflow as tf

    _check_model(model)
    size, window = _window(model, data)
    weights = model.trainable_weights
    sums, numerators, counts, groups = {}, {}, {}, None
    for x, y, sample_weight in window:
        with tf.GradientTape(persistent=True) as tape:
            y_pred, terms = forward_terms(model, x, y, sample_weight, len(window))
            groups = combine(terms)
            objectives = {
                key: model.optimizer.scale_loss(group.numerator)
                for key, group in groups.items()
            }
        for key, group in groups.items():
            gradients = tape.gradient(
                objectives[key], [w.value for w in weights],  # tf.Variables
                unconnected_gradients=tf.UnconnectedGradients.ZERO,
            )
            sums[key] = gradients if key not in sums else [
                _tf_add(a, b) for a, b in zip(sums[key], gradients)
            ]
            numerators[key] = _add(numerators.get(key), tf.stop_gradient(group.numerator))
            if group.count is not None:
                counts[key] = _add(counts.get(key), group.count)
        del tape
        model.compute_metrics(x, y, y_pred, sample_weight)
    scales = _end_window(model, groups, counts)
    gradients = []
    for i, weight in enumerate(weights):
        gradient = None
        for key, s in zip(groups, scales):
            term = _tf_scale(sums[key][i], ops.cast(s, weight.dtype))
            gradient = term if gradient is None else _tf_add(gradient, term)
        gradients.append(gradient)
    model.optimizer.apply_gradients(zip(gradients, weights))
    _record_loss(model, groups, numerators, scales, size)
    return model.get_metrics_result()


def _tf_add(a, b):
    """Sum of two gradients; sparse ones (embeddings) stay sparse, as in one pass."""
    import tensorflow as tf

    sparse = (isinstance(a, tf.IndexedSlices), isinstance(b, tf.IndexedSlices))
    if all(sparse):
        return tf.IndexedSlices(
            tf.concat([a.values, b.values], 0),
            tf.concat([a.indices, b.indices], 0),
            a.dense_shape,
        )
    return tf.convert_to_tensor(a) + tf.convert_to_tensor(b)


def _tf_scale(gradient, factor):
    import tensorflow as tf

    if isinstance(gradient, tf.IndexedSlices):
        return tf.IndexedSlices(
            gradient.values * factor, gradient.indices, gradient.dense_shape
        )
    return gradient * factor


def _torch_train_step(model, data):
    import torch

    _check_model(model)
    size, window = _window(model, data)
    replicas.check_equal_over_processes(
        len(window), "the slices of this batch (give every process at least "
        f"micro_batches={model.micro_batches} samples of each batch)"
    )
    weights = model.trainable_weights[:]
    parameters = [w.value for w in weights]
    sums, numerators, counts, groups = {}, {}, {}, None
    model.zero_grad()
    for x, y, sample_weight in window:
        y_pred, terms = forward_terms(model, x, y, sample_weight, len(window))
        groups = combine(terms)
        keys = list(groups)
        for i, key in enumerate(keys):
            objective = model.optimizer.scale_loss(groups[key].numerator)
            retain = i < len(keys) - 1
            if i == 0:  # the first group adds up in `.grad`, as Keras's step does
                objective.backward(retain_graph=retain)
                continue
            gradients = torch.autograd.grad(
                objective, parameters, retain_graph=retain,
                allow_unused=True, materialize_grads=True,
            )
            sums[key] = list(gradients) if key not in sums else [
                a.add_(b) for a, b in zip(sums[key], gradients)
            ]
        with torch.no_grad():
            for key, group in groups.items():
                numerators[key] = _add(numerators.get(key), group.numerator.detach())
                if group.count is not None:
                    counts[key] = _add(counts.get(key), group.count)
            model.compute_metrics(x, y, y_pred, sample_weight)
    with torch.no_grad():
        scales = _end_window(model, groups, counts)
        gradients = [
            (torch.zeros_like(p) if p.grad is None else p.grad).mul_(scales[0])
            for p in parameters
        ]
        for key, s in zip(keys[1:], scales[1:]):
            gradients = [g.add_(h.mul_(s)) for g, h in zip(gradients, sums[key])]
        model.optimizer.apply(gradients, weights)
        _record_loss(model, groups, numerators, scales, size)
    return model.get_metrics_result()


def _jax_train_step(model, state, data):
    """The step as a `jax.lax.scan` over equal slices (a Python loop otherwise).

    The carry holds one gradient sum per group of terms, the numerators and
    counts, and the non-trainable and metric variables.
    """
    import jax
    import jax.numpy as jnp

    _check_model(model)
    trainable, non_trainable, optimizer_variables, metrics_variables = state
    data = keras.utils.unpack_x_y_sample_weight(data)
    size = _batch_size(data[0])
    bounds = micro_batch_bounds(size, model.micro_batches)
    static = {}  # the groups' keys and normalizers: Python objects

    def numerators_of(trainable, non_trainable, batch):
        x, y, sample_weight = batch
        mapping = list(zip(model.trainable_variables, trainable))
        mapping += list(zip(model.non_trainable_variables, non_trainable))
        with keras.StatelessScope(state_mapping=mapping, collect_losses=True) as scope:
            y_pred, terms = forward_terms(model, x, y, sample_weight, len(bounds))
            static["groups"] = combine(terms)
        groups = static["groups"].values()
        values = [group.numerator for group in groups]
        counts = [jnp.zeros(()) if g.count is None else g.count for g in groups]
        return values, (counts, y_pred, _current(scope, model.non_trainable_variables))

    def slice_step(carry, batch):
        sums, numerators, counts, non_trainable, metrics_variables = carry
        values, pullback, (step_counts, y_pred, non_trainable) = jax.vjp(
            lambda t: numerators_of(t, non_trainable, batch), trainable, has_aux=True
        )
        for i in range(len(values)):
            cotangent = [jnp.zeros_like(v) for v in values]
            cotangent[i] = jnp.ones_like(values[i])
            sums[i] = [a + b for a, b in zip(sums[i], pullback(cotangent)[0])]
        numerators = [a + b for a, b in zip(numerators, values)]
        counts = [a + b for a, b in zip(counts, step_counts)]
        mapping = list(zip(model.metrics_variables, metrics_variables))
        with keras.StatelessScope(state_mapping=mapping) as scope:
            model.compute_metrics(batch[0], batch[1], y_pred, batch[2])
        metrics_variables = _current(scope, model.metrics_variables)
        return (sums, numerators, counts, non_trainable, metrics_variables), None

    shapes = jax.eval_shape(
        lambda: numerators_of(trainable, non_trainable, _slice(data, *bounds[0]))[0]
    )
    carry = (
        [[jnp.zeros_like(t) for t in trainable] for _ in shapes],
        [jnp.zeros((), shape.dtype) for shape in shapes],
        [jnp.zeros(()) for _ in shapes],
        non_trainable,
        metrics_variables,
    )
    if size % model.micro_batches == 0:  # equal slices: one traced slice
        stacked = keras.tree.map_structure(
            lambda v: None if v is None
            else v.reshape((model.micro_batches, -1) + tuple(v.shape[1:])),
            data,
        )
        carry, _ = jax.lax.scan(slice_step, carry, stacked)
    else:
        for start, stop in bounds:
            carry, _ = slice_step(carry, _slice(data, start, stop))
    sums, numerators, counts, non_trainable, metrics_variables = carry

    groups = static["groups"]
    keys = list(groups)
    mapping = list(zip(model.metrics_variables, metrics_variables))
    mapping += list(zip(model.non_trainable_variables, non_trainable))
    with keras.StatelessScope(state_mapping=mapping) as scope:
        scales = _end_window(model, groups, dict(zip(keys, counts)))
        _record_loss(model, groups, dict(zip(keys, numerators)), scales, size)
        logs = model.get_metrics_result()
    metrics_variables = _current(scope, model.metrics_variables)
    non_trainable = _current(scope, model.non_trainable_variables)
    gradients = [
        sum(group[i] * s for group, s in zip(sums, scales))
        for i in range(len(trainable))
    ]
    trainable, optimizer_variables = model.optimizer.stateless_apply(
        optimizer_variables, gradients, trainable
    )
    return logs, (trainable, non_trainable, optimizer_variables, metrics_variables)


def _current(scope, variables):
    values = []
    for variable in variables:
        value = scope.get_current_value(variable)
        values.append(variable.value if value is None else value)
    return values
