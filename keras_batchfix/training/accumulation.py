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

from keras_batchfix import _keras_compat, _validation, replicas
from keras_batchfix.training import loss_terms
from keras_batchfix.training.loss_terms import batch_size, combine, forward_terms


def check_micro_batches(micro_batches):
    """`micro_batches` as an int >= 2, or None; a named error otherwise."""
    if micro_batches is None:
        return None
    return _validation.integer("micro_batches", micro_batches, 2)


# ------------------------------------------------------------------ slicing
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
    size = batch_size(x)
    bounds = micro_batch_bounds(size, model.micro_batches)
    return size, [
        (_slice(x, a, b), _slice(y, a, b), _slice(sample_weight, a, b))
        for a, b in bounds
    ]


def _end_window(model, groups, counts):
    """Each group's scale; stateful normalizers and center steps move once."""
    scales = []
    for key, group in groups.items():
        scales.append(loss_terms.scale(counts.get(key), group.normalizer, group.is_global))
    for group in groups.values():
        if getattr(group.normalizer, "stateful", False):
            group.normalizer.update()
    for layer in loss_terms.center_loss_layers(model):
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


def add(total, value):
    """`total + value`, where a `total` of None is nothing yet."""
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
            numerators[key] = add(numerators.get(key), tf.stop_gradient(group.numerator))
            if group.count is not None:
                counts[key] = add(counts.get(key), group.count)
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
                numerators[key] = add(numerators.get(key), group.numerator.detach())
                if group.count is not None:
                    counts[key] = add(counts.get(key), group.count)
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
    size = batch_size(data[0])
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
