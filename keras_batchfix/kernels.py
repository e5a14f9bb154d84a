"""Backend kernels of the losses: the one module that dispatches on the backend.

Each public function computes one thing in `keras.ops`, and where a backend
runs that form much slower than a native kernel, it calls the native kernel
instead; the forms are private, named `_<kernel>_keras` and `_<kernel>_torch`.
The package's other backend checks are here too (`is_concrete`,
`outside_gradient_trace`, `layer_metrics_persist`). The results agree on every backend (`tests/test_kernels.py`
compares each path with NumPy); `benchmarks/README.md` gives the timings
that justify each native path.

Native paths:

* torch (every op is its own kernel there, eagerly): `torch.topk` for the
  k-th largest score of hard-negative mining (31 bisection passes are some
  250 kernels), `torch.nn.functional.smooth_l1_loss` on the positive
  anchors only and `log_softmax`, `einsum` for a row's sum of squares,
  `index_add_` for segment sums (Keras's torch `segment_sum` broadcasts the
  ids to the data's shape and scatters), `index_select` for rows by index
  (Keras's torch `take` first remaps negative indices), `add_` and `sub_`
  for a variable's in-place update;
* TensorFlow: `tf.bitcast`, because Keras 3.15's TensorFlow `ops.view`
  checks the last axis in Python and fails on a dynamic one.
"""

import keras
from keras import ops


def _backend():
    return keras.backend.backend()


def bitcast(x, dtype):
    """`ops.view` between 32-bit dtypes, also for a dynamic last axis."""
    if _backend() == "tensorflow":
        import tensorflow as tf

        return tf.bitcast(x, dtype)
    return ops.view(x, dtype)


def kth_largest(scores, k):
    """The `k[r]`-th largest entry of each row of `scores` and how many are `>=` it.

    `scores`: float32 of shape `(rows, ...)`, a row being everything after the
    first axis; the entries that count are `>= 0` (negative ones are never
    the answer while `k[r]` is at most the row's number of non-negative
    entries). `k`: int32 `(rows,)`, each at least 1. Returns float32 and
    int32 tensors of shape `(rows,)`.

    Compiled backends: exact bisection on the float32 bit patterns (ordered
    like the values for non-negative floats), 31 passes of compare-and-count
    with static shapes, in a loop (XLA then reads the scores from memory
    rather than recomputing them inside every pass). Torch: `torch.topk` up
    to the largest `k`.
    """
    if _backend() == "torch":
        return _kth_largest_torch(scores, k)
    return _kth_largest_keras(scores, k)


def _kth_largest_keras(scores, k):
    """`kth_largest` in `keras.ops`: 31 compare-and-count passes."""
    bits = bitcast(scores, "int32")  # negative scores give negative ints
    # Invariant: count(bits >= low) >= k and count(bits >= high) < k.
    low = ops.zeros(ops.shape(k), dtype="int32")
    high = ops.full(ops.shape(k), 0x7F800001, dtype="int32")  # above +inf

    def halve(_, state):
        low, high, at_least_low = state
        middle = low + (high - low) // 2
        counts = count_per_row(bits >= per_row(middle, bits))
        enough = counts >= k
        return (
            ops.where(enough, middle, low),
            ops.where(enough, high, middle),
            ops.where(enough, counts, at_least_low),
        )

    # high - low < 2**31 halves to 1 in 31 passes.
    state = (low, high, count_per_row(bits >= 0))
    low, _, at_least_low = ops.fori_loop(0, 31, halve, state)
    return bitcast(low, "float32"), at_least_low


def _kth_largest_torch(scores, k):
    """`kth_largest` with `torch.topk` (torch backend only)."""
    import torch

    rows = scores.reshape(scores.shape[0], -1)
    k = k.long()
    largest = int(k.max()) if k.numel() else 0  # one host sync
    if largest == 0:
        kth = torch.zeros(rows.shape[0], dtype=rows.dtype, device=rows.device)
    else:
        largest = min(largest, rows.shape[1])
        if rows.shape[0] == 1:  # one k: the least of the top k, unsorted
            kth = torch.topk(rows, largest, dim=1, sorted=False).values.amin(1)
        else:
            top = torch.topk(rows, largest, dim=1).values
            kth = top.gather(1, (k - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
    at_least = (rows >= kth.unsqueeze(1)).sum(1, dtype=torch.int32)
    return kth, at_least


def top_k_mask(scores, k):
    """Boolean mask of the `k[r]` largest entries of each row of `scores`.

    `scores` has shape `(rows, ...)`: a row is everything after the first
    axis (in row-major order). Candidates are `>= 0`, entries that must never
    be selected are negative. `k` has shape `(rows,)` and must not exceed a
    row's number of candidates. Exactly `k[r]` entries are selected in row
    `r`; among equal scores the first ones win.

    No sort: the k-th largest value (`kth_largest`) is the threshold,
    and the mask is `scores >= threshold`, unless some row has more entries
    equal to its k-th largest than it may take: only then (an `ops.cond`) is
    the costlier first-come tie-break computed, a cumulative sum over the row.
    """
    scores = ops.convert_to_tensor(scores, dtype="float32")
    k = ops.convert_to_tensor(k, dtype="int32")
    threshold, at_least_kth = kth_largest(scores, ops.maximum(k, 1))
    threshold = per_row(threshold, scores)
    wanted = per_row(k, scores)
    no_excess_ties = ops.all(ops.logical_or(at_least_kth == k, k == 0))

    def all_at_least_kth():
        return scores >= threshold

    def first_ties_only():
        above = scores > threshold
        tied = scores == threshold
        flat_ties = ops.reshape(ops.cast(tied, "int32"), (ops.shape(scores)[0], -1))
        tie_rank = ops.reshape(ops.cumsum(flat_ties, axis=-1), ops.shape(scores))
        n_above = per_row(count_per_row(above), scores)
        return ops.logical_or(
            above, ops.logical_and(tied, tie_rank <= wanted - n_above)
        )

    selected = ops.cond(no_excess_ties, all_at_least_kth, first_ties_only)
    return ops.logical_and(selected, wanted > 0)


def count_per_row(mask):
    """Number of true entries of each row (all axes but the first), int32."""
    return ops.sum(ops.cast(mask, "int32"), axis=tuple(range(1, len(mask.shape))))


def per_row(values, like):
    """`values` of shape `(rows,)` reshaped to broadcast against `like`."""
    return ops.reshape(values, (-1,) + (1,) * (len(like.shape) - 1))


def smooth_l1(prediction, target):
    """Elementwise `0.5 d^2` if `|d| < 1` else `|d| - 0.5`, `d = prediction - target`."""
    if _backend() == "torch":
        return _smooth_l1_torch(prediction, target)
    return _smooth_l1_keras(prediction, target)


def _smooth_l1_keras(prediction, target):
    """`smooth_l1` in `keras.ops`."""
    difference = prediction - target
    absolute = ops.abs(difference)
    return ops.where(absolute < 1.0, 0.5 * difference**2, absolute - 0.5)


def _smooth_l1_torch(prediction, target):
    """`smooth_l1` with `torch.nn.functional.smooth_l1_loss` (torch backend only)."""
    import torch.nn.functional as F

    return F.smooth_l1_loss(prediction, target, reduction="none", beta=1.0)


def weighted_smooth_l1(prediction, target, weights):
    """`weights * sum_k smooth_l1(prediction, target)[..., k]`, shape of `weights`.

    `prediction`, `target`: `(..., 4)`; `weights`: `(...)`, zero for most
    rows (the box loss counts on positive anchors only). Compiled backends
    compute every row. Torch: only the rows of non-zero weight
    (`_weighted_smooth_l1_torch`), so the box term of an SSD loss costs
    its 1% of positives, not all anchors.
    """
    if _backend() == "torch":
        return _weighted_smooth_l1_torch(prediction, target, weights)
    return weights * ops.sum(smooth_l1(prediction, target), axis=-1)


def _weighted_smooth_l1_torch(prediction, target, weights):
    """`weighted_smooth_l1` on the rows of non-zero weight (torch backend only)."""
    import torch

    flat_weights = weights.reshape(-1)
    rows = torch.nonzero(flat_weights).squeeze(1)  # one host sync
    depth = prediction.shape[-1]
    losses = _smooth_l1_torch(
        prediction.reshape(-1, depth)[rows], target.reshape(-1, depth)[rows]
    ).sum(-1)
    out = torch.zeros_like(flat_weights).index_add(0, rows, losses * flat_weights[rows])
    return out.reshape(weights.shape)


def softmax_cross_entropy(targets, logits, target_total=None):
    """`-sum_c t_c log softmax(s)_c` over the last axis.

    Compiled (TensorFlow, JAX): `sum_c t_c * logsumexp(s) - sum_c t_c s_c`,
    which XLA fuses without materializing a log-softmax tensor. Torch: the
    fused `log_softmax` kernel, then the weighted sum. `target_total`,
    `sum_c t_c`, if already computed.
    """
    if _backend() == "torch":
        return _softmax_cross_entropy_torch(targets, logits)
    return _softmax_cross_entropy_keras(targets, logits, target_total)


def _softmax_cross_entropy_keras(targets, logits, target_total=None):
    """`sum_c t_c * logsumexp(s) - sum_c t_c s_c` (see `log_partition`)."""
    if target_total is None:
        target_total = ops.sum(targets, axis=-1)
    return target_total * log_partition(logits) - ops.sum(targets * logits, axis=-1)


def _softmax_cross_entropy_torch(targets, logits):
    """`-sum_c t_c log_softmax(s)_c`, materializing the log-softmax."""
    return -ops.sum(targets * ops.log_softmax(logits, axis=-1), axis=-1)


def log_partition(scores):
    """`log(sum(exp(scores), axis=-1))`, stable, with the usual gradient (softmax).

    The max is taken out under `stop_gradient`: the result does not depend on
    it, and XLA then fuses forward and backward into fewer passes than
    `ops.logsumexp` (which also guards against infinite maxima).
    """
    top = ops.stop_gradient(ops.max(scores, axis=-1, keepdims=True))
    return ops.log(ops.sum(ops.exp(scores - top), axis=-1)) + ops.squeeze(top, -1)


def row_sum_of_squares(x):
    """`sum(x * x, axis=-1)`. Torch: an `einsum` (no temporary of `x`'s size)."""
    if _backend() == "torch":
        return _row_sum_of_squares_torch(x)
    return ops.sum(x * x, axis=-1)


def _row_sum_of_squares_torch(x):
    """`row_sum_of_squares` with `torch.einsum` (torch backend only)."""
    import torch

    return torch.einsum("...c,...c->...", x, x)


def segment_sum(data, segment_ids, num_segments):
    """`ops.segment_sum` for ids in `[0, num_segments)` (int32, shape `(n,)`)."""
    if _backend() == "torch":
        return _segment_sum_torch(data, segment_ids, num_segments)
    return ops.segment_sum(data, segment_ids, num_segments)


def _segment_sum_torch(data, segment_ids, num_segments):
    """`segment_sum` with `torch.Tensor.index_add_` (torch backend only)."""
    import torch

    data, segment_ids = _torch_tensor(data), _torch_tensor(segment_ids)
    out = torch.zeros(
        (num_segments,) + tuple(data.shape[1:]), dtype=data.dtype, device=data.device
    )
    return out.index_add_(0, segment_ids.long(), data)


def take_rows(x, indices):
    """`ops.take(x, indices, axis=0)` for int32 `indices` in `[0, len(x))`.

    Torch: `index_select` (Keras's torch `take` also maps negative indices,
    two more kernels).
    """
    if _backend() == "torch":
        return _take_rows_torch(x, indices)
    return ops.take(x, indices, axis=0)


def _take_rows_torch(x, indices):
    """`take_rows` with `torch.index_select` (torch backend only)."""
    x, indices = _torch_tensor(x), _torch_tensor(indices)
    return x.index_select(0, indices)


def assign_add(variable, value):
    """`variable.assign_add(value)`; on torch in place (see `assign_sub`)."""
    if _backend() == "torch":
        return _assign_add_torch(variable, value)
    variable.assign_add(value)


def assign_sub(variable, value):
    """`variable.assign_sub(value)`; on torch in place, one pass over it.

    (Keras's torch `assign_sub` computes `variable - value`, then copies it
    into the variable: two passes, and a buffer of the variable's size.)
    """
    if _backend() == "torch":
        return _assign_sub_torch(variable, value)
    variable.assign_sub(value)


def _assign_add_torch(variable, value):
    """`assign_add` with `torch.Tensor.add_` (torch backend only)."""
    _update_in_place(variable, value, "add_")


def _assign_sub_torch(variable, value):
    """`assign_sub` with `torch.Tensor.sub_` (torch backend only)."""
    _update_in_place(variable, value, "sub_")


def _update_in_place(variable, value, method):
    import torch

    if not isinstance(value, (int, float)):  # torch takes Python numbers as they are
        value = _torch_tensor(value).to(variable.value.dtype)
    with torch.no_grad():
        getattr(variable.value, method)(value)


def is_concrete(tensor):
    """Whether `tensor` holds values now (eager), not a traced placeholder."""
    if _backend() == "tensorflow":
        import tensorflow as tf

        return tf.executing_eagerly()
    if _backend() == "jax":
        import jax

        return not isinstance(tensor, jax.core.Tracer)
    if _backend() == "torch":
        import torch

        if tensor.device.type == "meta":
            return False
        compiling = getattr(torch.compiler, "is_compiling", None)
        return not (compiling and compiling())
    return False


def outside_gradient_trace(values, y_pred):
    """Whether a training step's gradient provably cannot reach `values` from `y_pred`.

    JAX: `y_pred` is traced for the gradient and `values` is not on that
    trace. Torch: `y_pred` requires grad and `values` does not. TensorFlow
    (and outside a gradient): False; its `fit` says "No gradients provided".
    """
    if _backend() == "jax":
        import jax

        trace = getattr(y_pred, "_trace", None)  # JAX's tracers since 0.4.36
        return (
            isinstance(y_pred, jax.core.Tracer)
            and trace is not None
            and type(trace).__name__ != "DynamicJaxprTrace"  # jit, not grad
            and getattr(values, "_trace", None) is not trace
        )
    if _backend() == "torch":
        import torch

        return (
            torch.is_grad_enabled()
            and getattr(y_pred, "requires_grad", False)
            and not getattr(values, "requires_grad", True)
        )
    return False


def layer_metrics_persist():
    """Whether a metric a layer updates in `call` keeps its state in `fit`.

    Not on JAX: Keras's stateless JAX `fit` carries the model's trainable
    and non-trainable variables through `call`, not the metrics' variables
    (keras-team/keras#21639).
    """
    return _backend() != "jax"


def _torch_tensor(x):
    """`x` as it is if a torch tensor (no `keras.ops` call), else converted."""
    import torch

    return x if isinstance(x, torch.Tensor) else ops.convert_to_tensor(x)


def jit(function):
    """`function` compiled with `jax.jit` on JAX, else `function` itself.

    JAX compiles every op for every new shape when run eagerly; one trace
    per shape is much faster. A function that cannot be traced (it converts
    a traced value to NumPy) runs eagerly from its first such failure on.
    """
    if _backend() != "jax":
        return function
    import jax

    jitted = jax.jit(function)
    state = {"eager": False}

    def call(*args):
        if not state["eager"]:
            try:
                return jitted(*args)
            except jax.errors.JAXTypeError:
                state["eager"] = True
        return function(*args)

    return call
