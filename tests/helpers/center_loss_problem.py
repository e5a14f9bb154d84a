"""NumPy references of `CenterLoss` and a small problem to train it on.

Written apart from `keras_batchfix/center_loss.py`: the paper's center rule
sample by sample, the loss, and one device's training of features `x @ W`
(for tests/test_center_loss.py, tests/test_center_loss_distributed.py and
the multi-process workers).
"""

import numpy as np

K, D = 4, 3  # classes, feature size


def numpy_center_step(centers, features, labels, alpha):
    """The paper's rule, sample by sample; labels outside [0, K) are skipped."""
    centers = np.asarray(centers, np.float64)
    sums = np.zeros_like(centers)
    counts = np.ones(len(centers))
    for x, y in zip(np.asarray(features, np.float64), labels):
        if 0 <= y < len(centers):
            sums[y] += centers[y] - x
            counts[y] += 1
    return centers - alpha * sums / counts[:, None]


def numpy_center_loss(centers, features, labels):
    """1/2 sum_i ||x_i - c_{y_i}||^2 / B (labels outside [0, K) count 0)."""
    total = 0.0
    for x, y in zip(np.asarray(features, np.float64), labels):
        if 0 <= y < len(centers):
            total += 0.5 * np.sum((x - centers[y]) ** 2)
    return total / len(features)


def batches(n, batch_size):
    return [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


# A problem for distributed training: features `x @ W` of inputs of size 5
# into `CenterLoss`, trained one epoch.
CENTER_LOSS_HYPERPARAMETERS = dict(batch_size=8, lr=0.5, lam=0.7, alpha=0.5)


def center_loss_problem(n):
    """Inputs, labels, start kernel and start centers for `n` samples."""
    rng = np.random.default_rng(10 + n)
    x = rng.normal(size=(n, 5)).astype("float32")
    y = rng.integers(0, K, size=n).astype("int32")
    return x, y, rng.normal(size=(5, D)), rng.normal(size=(K, D))


def numpy_center_loss_training(x, y, w, c, batch_size, lr, lam, alpha):
    """One device: SGD on lambda * L_C through features x @ W, then the center
    rule, batch by batch; returns the kernel, centers and mean batch loss."""
    losses, sizes = [], []
    for part in batches(len(x), batch_size):
        xb, yb = x[part].astype(np.float64), y[part]
        f = xb @ w
        losses.append(lam * numpy_center_loss(c, f, yb))
        sizes.append(len(yb))
        w = w - lr * xb.T @ (lam * (f - c[yb]) / len(yb))
        c = numpy_center_step(c, f, yb, alpha)
    return w, c, np.average(losses, weights=sizes)
