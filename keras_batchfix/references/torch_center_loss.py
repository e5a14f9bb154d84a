"""PyTorch reference for center loss: the algorithm of the report "Decaying learning rate spikes center loss", re-written.

The report's code (after jxgu1016/MNIST_center_loss_pytorch) computes, for features
`x` of shape `(B, D)`, integer labels `y` of shape `(B,)` and centers `c` of
shape `(num_classes, D)`:

    forward:   L = sum_i ||x_i - c_{y_i}||^2 / 2 / B
    backward:  dL/dx_i = (x_i - c_{y_i}) / B * grad_output
               "dL/dc_j" = sum_{i: y_i = j} (c_j - x_i) / (1 + n_j)

The center "gradient" is not the true gradient of `L`: it is divided by
`1 + n_j` (`n_j` = samples of class `j` in the batch) instead of `B`, and it
is NOT multiplied by `grad_output`, so the loss weight `lambda` never scales
the center step. The centers are an `nn.Parameter` stepped by their own
`torch.optim.SGD(lr=alpha)`, which gives the paper's rule

    c_j <- c_j - alpha * sum_{i: y_i = j} (c_j - x_i) / (1 + n_j).

This module is a test reference (float64-friendly, no CUDA assumptions).

Example:

    center = TorchCenterLoss(num_classes=10, feat_dim=2)
    center_opt = center.make_optimizer(alpha=0.5)
    loss = xent + 0.01 * center(features, labels)
    loss.backward(); model_opt.step(); center_opt.step()
"""

import torch
from torch import nn


class CenterLossFunction(torch.autograd.Function):
    """Custom autograd function with the report's (non-true) center gradient."""

    @staticmethod
    def forward(ctx, features, labels, centers, batch_size):
        labels = labels.long()
        ctx.save_for_backward(features, labels, centers, batch_size)
        gathered = centers.index_select(0, labels)
        return (features - gathered).pow(2).sum() / 2.0 / batch_size

    @staticmethod
    def backward(ctx, grad_output):
        features, labels, centers, batch_size = ctx.saved_tensors
        gathered = centers.index_select(0, labels)
        # Feature gradient: the true gradient, scaled by the upstream gradient.
        grad_features = grad_output * (features - gathered) / batch_size
        # Center "gradient": per-class sum of (c - x) over (1 + n_j).
        # Not scaled by grad_output nor by the batch size (seed behaviour).
        counts = torch.ones(
            centers.shape[0], dtype=centers.dtype, device=centers.device
        )
        counts = counts.index_add(
            0, labels, torch.ones_like(labels, dtype=centers.dtype)
        )
        sums = torch.zeros_like(centers).index_add(0, labels, gathered - features)
        grad_centers = sums / counts.unsqueeze(1)
        return grad_features, None, grad_centers, None


class TorchCenterLoss(nn.Module):
    """Center loss with its own centers parameter, as in the report's code.

    Args:
        num_classes: number of classes (rows of the centers).
        feat_dim: feature dimension (columns of the centers).
        size_average: divide the loss by the batch size (seed default True).
        centers: optional initial centers, array-like of shape
            `(num_classes, feat_dim)`; default Kaiming-normal as in the seed
            (`kaiming_normal_` on the transposed centers, i.e. normal with
            std `sqrt(2 / num_classes)`).
        dtype: dtype of the centers when they are initialized here.
    """

    def __init__(
        self, num_classes, feat_dim, size_average=True, centers=None,
        dtype=torch.float32,
    ):
        super().__init__()
        self.num_classes = int(num_classes)
        self.feat_dim = int(feat_dim)
        self.size_average = bool(size_average)
        if centers is None:
            data = torch.empty(self.num_classes, self.feat_dim, dtype=dtype)
            nn.init.kaiming_normal_(data.t())
        else:
            data = torch.as_tensor(centers).clone().detach()
            if tuple(data.shape) != (self.num_classes, self.feat_dim):
                raise ValueError(
                    f"`centers` must have shape ({self.num_classes}, "
                    f"{self.feat_dim}); received shape {tuple(data.shape)}."
                )
        self.centers = nn.Parameter(data)

    def forward(self, features, labels):
        batch = features.shape[0]
        features = features.reshape(batch, -1)
        if features.shape[1] != self.feat_dim:
            raise ValueError(
                f"Feature dimension {features.shape[1]} does not match the "
                f"centers' dimension {self.feat_dim}."
            )
        labels = labels.reshape(-1).long()
        divisor = torch.full(
            (1,), float(batch if self.size_average else 1),
            dtype=features.dtype, device=features.device,
        )
        return CenterLossFunction.apply(features, labels, self.centers, divisor)

    def make_optimizer(self, alpha=0.5):
        """The report's optimizer for the centers: plain SGD with lr=alpha."""
        return torch.optim.SGD(self.parameters(), lr=alpha)


def center_step_numpy(centers, features, labels, alpha):
    """NumPy version of the paper's center update (for cross-checks)."""
    import numpy as np

    centers = np.asarray(centers, dtype=np.float64)
    features = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    sums = np.zeros_like(centers)
    counts = np.ones(centers.shape[0])
    for x, y in zip(features, labels):
        sums[y] += centers[y] - x
        counts[y] += 1
    return centers - alpha * sums / counts[:, None]
