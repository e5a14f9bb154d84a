"""torch DDP under Keras's `fit`: gradients averaged over the processes, data sharded.

Keras 3's torch `fit` calls the Keras model itself, so a
`torch.nn.parallel.DistributedDataParallel` wrapper around it would never
run. Two pieces make a `torch.distributed` process group train as one device
on the global batch:

* `average_gradients_over_processes(model)`: a hook on every trainable
  weight averages its gradient over the process group, as DDP does;
* `shard_batches(x, y, batch_size=...)`: each process's part of each global
  batch, so that every process runs the same number of steps (each gradient
  all-reduce needs all of them).

The package's count-normalized losses (`SSDMultiboxLoss`,
`compensate(..., count=...)` with `normalizer=GlobalCount()`, `CenterLoss`)
are then exact however a batch splits; a Keras mean loss is the mean of the
processes' own means, exact only when the shares are equal (see
docs/distributed.md). The full recipe, launch included: examples/torch_ddp.py.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

from keras_batchfix import replicas


def average_gradients_over_processes(model: keras.Model) -> list[Any]:
    """Makes Keras's torch `fit` average each gradient over the process group.

    Registers a hook on every trainable weight of `model` that replaces the
    weight's gradient by its mean over the `torch.distributed` process
    group, as `DistributedDataParallel` does:

        grad <- (sum over processes p of grad_p) / world_size

    so each process applies the same update and the weights stay equal (the
    package's losses multiply their share by `world_size` to undo the
    average; `keras_batchfix.replicas.keras_factor`). Call it once, after
    the model is built and before `fit`; every process must build the same
    initial weights and train on its part of each global batch
    (`shard_batches`), with `shuffle=False`. The all-reduce runs one weight
    at a time, without DDP's bucketing or overlap: exact, slower for large
    models.

    Args:
        model: a built Keras model on the torch backend.

    Returns:
        The hooks' handles (`handle.remove()` undoes one).

    Raises:
        ValueError: without the torch backend or an initialized process group.

    Example:

    ```python
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    model = build_model()
    torch_ddp.average_gradients_over_processes(model)
    x_part, y_part, weights = torch_ddp.shard_batches(x, y, batch_size=32)
    model.fit(x_part, y_part, sample_weight=weights, batch_size=16, shuffle=False)
    ```
    """
    dist = replicas._torch_process_group()
    if dist is None:
        raise ValueError(
            "average_gradients_over_processes needs the torch backend and an "
            "initialized `torch.distributed` process group; received backend "
            f"{keras.backend.backend()!r} without one."
        )
    world_size = dist.get_world_size()

    def average(gradient):
        total = gradient.detach().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total / world_size

    return [
        weight.value.register_hook(average) for weight in model.trainable_weights
    ]


def shard_batches(
    x: Any,
    y: Any = None,
    sample_weight: Any = None,
    *,
    batch_size: int,
    rank: int | None = None,
    world_size: int | None = None,
    pad_empty: bool = False,
) -> tuple[Any, Any, Any]:
    """This process's part of each global batch of `batch_size` samples.

    The data is cut into global batches of `batch_size` in order (the last
    one shorter), and each batch into `world_size` consecutive shares: rank
    `r` gets `n // world_size` samples, one more when `r < n % world_size`
    (the first ranks take the larger shares). Each process then trains with
    `fit(..., batch_size=batch_size // world_size, shuffle=False)` and sees
    its share of global batch `k` at step `k`, like one device that sees
    batch `k` whole.

    Every process must run the same number of steps. A last batch with
    fewer samples than processes leaves some ranks an empty share; they
    would run one step less and the gradient all-reduces would stop
    matching (gloo: "collective mismatch", then "Connection reset by peer"
    on the other ranks). That raises a `ValueError` on every rank, before
    training, unless `pad_empty=True`: an empty share then gets one sample
    of zeros (inputs and targets) with sample weight 0. It adds nothing to
    a weighted numerator, and nothing to a count taken from an all-zero
    target (`SSDMultiboxLoss`'s neutral anchors, a count of flags or valid
    tokens): those losses stay exact with `normalizer=GlobalCount()`. A
    count of samples (`CenterLoss`, a Keras mean loss) counts it: pick a
    data size whose last batch has at least `world_size` samples instead.

    Args:
        x: the inputs, an array or a nest (dict, list) of arrays, all with
            the same number of samples.
        y: the targets, the same way, or None.
        sample_weight: per-sample weights, shape `(num_samples,)` (or a
            nest of them, one per output), or None.
        batch_size: the global batch size, a multiple of `world_size`.
        rank: this process's rank; default: `torch.distributed.get_rank()`.
        world_size: number of processes; default: the process group's.
        pad_empty: pad empty shares with a zero-weight sample of zeros
            instead of raising.

    Returns:
        `(x_part, y_part, sample_weight_part)`, NumPy, in the structure of
        the arguments. `sample_weight_part` is None when `sample_weight` is
        None and `pad_empty` is False; otherwise 1 (or the given weight) for
        real samples and 0 for padding, on every rank alike. A loss that
        returns a scalar cannot take it: return per-sample values.

    Example:

    ```python
    # 33 samples in batches of 16 over 2 processes: the last batch splits 1 + 0.
    x_part, y_part, weights = torch_ddp.shard_batches(
        x, y, batch_size=16, pad_empty=True)
    model.fit(x_part, y_part, sample_weight=weights, batch_size=8, shuffle=False)
    ```
    """
    rank, world_size = _rank_and_world_size(rank, world_size)
    if (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, (int, np.integer))
        or batch_size < world_size
        or batch_size % world_size
    ):
        raise ValueError(
            "Argument `batch_size` must be a positive multiple of the world "
            f"size {world_size} (each process's batch in `fit` is "
            f"batch_size / world_size); received batch_size={batch_size!r}."
        )
    if not isinstance(pad_empty, bool):
        raise ValueError(
            f"Argument `pad_empty` must be a bool; received pad_empty={pad_empty!r}."
        )
    arrays = {"x": x, "y": y, "sample_weight": sample_weight}
    arrays = {
        name: keras.tree.map_structure(np.asarray, value)
        for name, value in arrays.items() if value is not None
    }
    lengths = {
        f"{name}{_path(path)}": len(leaf) if leaf.ndim else None
        for name, value in arrays.items()
        for path, leaf in _leaves(value)
    }
    if len(set(lengths.values())) != 1 or None in lengths.values():
        raise ValueError(
            "Arguments `x`, `y` and `sample_weight` must hold arrays with the "
            f"same number of samples (first axis); received lengths {lengths}."
        )
    size = next(iter(lengths.values()))
    if size == 0:
        raise ValueError("Argument `x` must hold at least one sample; received 0.")
    last = size % batch_size or batch_size
    if last < world_size and not pad_empty:
        empty = list(range(last, world_size))
        raise ValueError(
            f"The last batch of {last} sample(s) ({size} samples in batches "
            f"of {batch_size}) leaves rank(s) {empty} of {world_size} "
            "processes without a sample: they would run one training step "
            "less and the processes' gradient all-reduces would stop "
            "matching. Use a number of samples whose last batch has at least "
            f"{world_size} (e.g. drop the last {last}), or pass "
            "pad_empty=True for a zero-weight sample of zeros there."
        )
    weights = arrays.get("sample_weight")
    if weights is None and pad_empty:
        weights = np.ones(size, "float32")
    pieces = []  # (start, stop) of this rank's share of each batch, or None
    for start in range(0, size, batch_size):
        n = min(batch_size, size - start)
        bounds = np.cumsum(
            [0] + [n // world_size + (r < n % world_size) for r in range(world_size)]
        )
        share = (start + int(bounds[rank]), start + int(bounds[rank + 1]))
        pieces.append(share if share[0] < share[1] else None)

    def take(array):
        """This rank's shares of `array`; a sample of zeros for an empty one."""
        return np.concatenate([
            array[share[0]:share[1]] if share is not None
            else np.zeros((1,) + array.shape[1:], array.dtype)
            for share in pieces
        ])

    parts = {
        name: keras.tree.map_structure(take, arrays[name])
        for name in ("x", "y") if name in arrays
    }
    return (
        parts["x"],
        parts.get("y"),
        None if weights is None else keras.tree.map_structure(take, weights),
    )


def _rank_and_world_size(rank, world_size):
    """`(rank, world_size)`: the arguments, or the process group's where None."""
    if rank is None or world_size is None:
        dist = replicas._torch_process_group()
        if dist is None:
            raise ValueError(
                "Arguments `rank` and `world_size` are needed without an "
                "initialized `torch.distributed` process group (on the torch "
                f"backend); received rank={rank!r}, world_size={world_size!r}."
            )
        rank = dist.get_rank() if rank is None else rank
        world_size = dist.get_world_size() if world_size is None else world_size
    for name, value, low in (("world_size", world_size, 1), ("rank", rank, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(
                f"Argument `{name}` must be an integer >= {low}; received "
                f"{name}={value!r}."
            )
    if rank >= world_size:
        raise ValueError(
            f"Argument `rank` must be below world_size={world_size}; received "
            f"rank={rank!r}."
        )
    return int(rank), int(world_size)


def _leaves(nest):
    """`(path, leaf)` pairs of a nest of arrays."""
    if isinstance(nest, dict):
        return [(((key,) + path), leaf) for key in nest for path, leaf in _leaves(nest[key])]
    if isinstance(nest, (list, tuple)):
        return [(((i,) + path), leaf) for i, item in enumerate(nest) for path, leaf in _leaves(item)]
    return [((), nest)]


def _path(path):
    return "".join(f"[{key!r}]" for key in path)
