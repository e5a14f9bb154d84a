"""Backend kernels of the losses: the one module that dispatches on the backend.

Each function computes one thing in `keras.ops`, and where a backend runs
that form much slower than a native kernel, it calls the native kernel
instead. The results agree on every backend (`tests/test_kernels.py`
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
        return kth_largest_by_topk(scores, k)
    return kth_largest_by_bisection(scores, k)


def kth_largest_by_bisection(scores, k):
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


def kth_largest_by_topk(scores, k):
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


def count_per_row(mask):
    """Number of true entries of each row (all axes but the first), int32."""
    return ops.sum(ops.cast(mask, "int32"), axis=tuple(range(1, len(mask.shape))))


def per_row(values, like):
    """`values` of shape `(rows,)` reshaped to broadcast against `like`."""
    return ops.reshape(values, (-1,) + (1,) * (len(like.shape) - 1))


def smooth_l1(prediction, target):
    """Elementwise `0.5 d^2` if `|d| < 1` else `|d| - 0.5`, `d = prediction - target`."""
    if _backend() == "torch":
        return smooth_l1_by_torch(prediction, target)
    return smooth_l1_by_where(prediction, target)


def smooth_l1_by_where(prediction, target):
    """`smooth_l1` in `keras.ops`."""
    difference = prediction - target
    absolute = ops.abs(difference)
    return ops.where(absolute < 1.0, 0.5 * difference**2, absolute - 0.5)


def smooth_l1_by_torch(prediction, target):
    """`smooth_l1` with `torch.nn.functional.smooth_l1_loss` (torch backend only)."""
    import torch.nn.functional as F

    return F.smooth_l1_loss(prediction, target, reduction="none", beta=1.0)


def weighted_smooth_l1(prediction, target, weights):
    """`weights * sum_k smooth_l1(prediction, target)[..., k]`, shape of `weights`.

    `prediction`, `target`: `(..., 4)`; `weights`: `(...)`, zero for most
    rows (the box loss counts on positive anchors only). Compiled backends
    compute every row. Torch: only the rows of non-zero weight
    (`weighted_smooth_l1_of_nonzero`), so the box term of an SSD loss costs
    its 1% of positives, not all anchors.
    """
    if _backend() == "torch":
        return weighted_smooth_l1_of_nonzero(prediction, target, weights)
    return weights * ops.sum(smooth_l1(prediction, target), axis=-1)


def weighted_smooth_l1_of_nonzero(prediction, target, weights):
    """`weighted_smooth_l1` on the rows of non-zero weight (torch backend only)."""
    import torch

    flat_weights = weights.reshape(-1)
    rows = torch.nonzero(flat_weights).squeeze(1)  # one host sync
    depth = prediction.shape[-1]
    losses = smooth_l1_by_torch(
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
        return cross_entropy_via_log_softmax(targets, logits)
    return cross_entropy_via_log_partition(targets, logits, target_total)


def cross_entropy_via_log_partition(targets, logits, target_total=None):
    """`sum_c t_c * logsumexp(s) - sum_c t_c s_c` (see `log_partition`)."""
    if target_total is None:
        target_total = ops.sum(targets, axis=-1)
    return target_total * log_partition(logits) - ops.sum(targets * logits, axis=-1)


def cross_entropy_via_log_softmax(targets, logits, target_total=None):
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
        return row_sum_of_squares_by_einsum(x)
    return ops.sum(x * x, axis=-1)


def row_sum_of_squares_by_einsum(x):
    """`row_sum_of_squares` with `torch.einsum` (torch backend only)."""
    import torch

    return torch.einsum("...c,...c->...", x, x)


def segment_sum(data, segment_ids, num_segments):
    """`ops.segment_sum` for ids in `[0, num_segments)` (int32, shape `(n,)`)."""
    if _backend() == "torch":
        return segment_sum_by_index_add(data, segment_ids, num_segments)
    return ops.segment_sum(data, segment_ids, num_segments)


def segment_sum_by_index_add(data, segment_ids, num_segments):
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
        return take_rows_by_index_select(x, indices)
    return ops.take(x, indices, axis=0)


def take_rows_by_index_select(x, indices):
    """`take_rows` with `torch.index_select` (torch backend only)."""
    x, indices = _torch_tensor(x), _torch_tensor(indices)
    return x.index_select(0, indices)


def assign_add(variable, value):
    """`variable.assign_add(value)`; on torch in place (see `assign_sub`)."""
    if _backend() == "torch":
        return assign_add_in_place(variable, value)
    variable.assign_add(value)


def assign_sub(variable, value):
    """`variable.assign_sub(value)`; on torch in place, one pass over it.

    (Keras's torch `assign_sub` computes `variable - value`, then copies it
    into the variable: two passes, and a buffer of the variable's size.)
    """
    if _backend() == "torch":
        return assign_sub_in_place(variable, value)
    variable.assign_sub(value)


def assign_add_in_place(variable, value):
    """`assign_add` with `torch.Tensor.add_` (torch backend only)."""
    _update_in_place(variable, value, "add_")


def assign_sub_in_place(variable, value):
    """`assign_sub` with `torch.Tensor.sub_` (torch backend only)."""
    _update_in_place(variable, value, "sub_")


def _update_in_place(variable, value, method):
    import torch

    if not isinstance(value, (int, float)):  # torch takes Python numbers as they are
        value = _torch_tensor(value).to(variable.value.dtype)
    with torch.no_grad():
        getattr(variable.value, method)(value)


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
