"""SSD multibox loss, normalized by the batch's positives at every batch size."""

from __future__ import annotations

import warnings

import keras
from keras import ops

from keras_batchfix import _validation, kernels
from keras_batchfix.normalized_loss import NormalizedLoss
from keras_batchfix.normalizers import EMACount, LocalCount

MINING_MODES = ("batch", "per_image")


@keras.saving.register_keras_serializable(package="keras_batchfix")
class SSDMultiboxLoss(NormalizedLoss):
    """SSD multibox loss with hard-negative mining (Liu et al., 2016).

    Formula:

        L = (sum_{a in P} CE_a + sum_{a in H} CE_a + alpha * sum_{a in P} SL1_a)
            / normalizer(|P|)

    over all anchors `a` of the batch, where `P` are the positive anchors
    (matched to an object), `H` the hard negatives (the background anchors with
    the largest cross-entropy), `CE_a = -sum_c y_true[a, c] log p[a, c]` the
    softmax cross-entropy and `SL1_a` the smooth L1 loss summed over the 4
    box offsets (`0.5 d^2` if `|d| < 1` else `|d| - 0.5`). With the default
    normalizer the divisor is `max(1, |P|)` summed over the replicas, and Keras
    optimizes and reports `L` itself at every batch size.

    Hard-negative mining:

    * `mining="batch"` (ssd_keras): `H` is the top-k over the negatives of the
      whole batch, `k = min(max(neg_pos_ratio * |P|, n_neg_min), |negatives|)`.
    * `mining="per_image"` (ssd.pytorch, torchvision): for each image `i`,
      `k_i = min(max(neg_pos_ratio * |P_i|, n_neg_min), |negatives_i|)`.

    `k` is truncated to an integer. Mining selects with masks of static
    shape (`keras_batchfix.kernels.top_k_mask`), so the loss runs under
    `jit_compile=True`.

    Layout (ssd_keras's): `y_true` and `y_pred` have shape
    `(batch, anchors, num_classes + 4)` or `(batch, anchors, num_classes + 12)`.
    The first `num_classes` entries are the one-hot target (background at
    index 0; an all-zero row marks a neutral anchor, neither positive nor
    negative) and, in `y_pred`, the class scores; the next 4 are the encoded
    box offsets; 8 optional trailing values (anchors and variances) are
    ignored.

    Inputs it cannot be right for (soft class targets; with
    `from_logits=False`, scores that are not probabilities) make the loss NaN
    on every backend, in compiled code too. An empty batch gives 0.0.
    `sample_weight` of shape `(batch,)` scales each image's share of the
    numerator, not the count. Details: docs/losses.md.

    Args:
        num_classes: number of classes including the background.
        neg_pos_ratio: hard negatives per positive, a float >= 0. Default 3.
        n_neg_min: the least number of hard negatives (per batch or per image,
            as the mining mode), an integer >= 0. Default 0.
        alpha: weight of the box loss, a float >= 0. Default 1.
        mining: `"batch"` (default) or `"per_image"`.
        from_logits: whether the class scores are logits (a stable
            log-softmax is applied) rather than softmax probabilities
            (clipped at 1e-15 before the log). Default False.
        normalizer: a `keras_batchfix.Normalizer`; default `GlobalCount()`.
        name: name of the loss.
        dtype: dtype of the computation (float32 by default, also under mixed
            precision).

    Example:

    ```python
    loss = keras_batchfix.SSDMultiboxLoss(num_classes=21, from_logits=True)
    model.compile(optimizer=keras.optimizers.SGD(1e-3, momentum=0.9), loss=loss)
    ```
    """

    def __init__(
        self,
        num_classes: int,
        neg_pos_ratio: float = 3.0,
        n_neg_min: int = 0,
        alpha: float = 1.0,
        mining: str = "batch",
        from_logits: bool = False,
        normalizer: LocalCount | EMACount | None = None,
        name: str = "ssd_multibox_loss",
        dtype: str | None = None,
    ) -> None:
        num_classes = _validation.integer(
            "num_classes", num_classes, 2, "an integer >= 2 (background included)"
        )
        neg_pos_ratio = _validation.real(
            "neg_pos_ratio", neg_pos_ratio, "a float >= 0", lambda v: v >= 0
        )
        n_neg_min = _validation.integer("n_neg_min", n_neg_min, 0)
        alpha = _validation.real("alpha", alpha, "a float >= 0", lambda v: v >= 0)
        if mining not in MINING_MODES:
            raise ValueError(
                f"Argument `mining` must be one of {MINING_MODES}; received "
                f"mining={mining!r}."
            )
        super().__init__(normalizer=normalizer, name=name, dtype=dtype)
        self.num_classes = num_classes
        self.neg_pos_ratio = neg_pos_ratio
        self.n_neg_min = n_neg_min
        self.alpha = alpha
        self.mining = mining
        self.from_logits = bool(from_logits)
        self._checked_logits = False  # see `_warn_if_probabilities`

    def __call__(self, y_true, y_pred, sample_weight=None):
        _validation.check_sample_weight(self.name, sample_weight, y_pred)
        return super().__call__(y_true, y_pred, sample_weight)

    def numerator_and_count(self, y_true, y_pred):
        self._check_shapes(y_true, y_pred)
        if 0 in tuple(y_pred.shape)[:2]:
            # An empty batch (or no anchors): nothing to mine; 0.0 with a
            # zero gradient, the same on every backend. The count still goes
            # through the normalizer (GlobalCount's all-reduce on every rank).
            return ops.sum(y_pred, axis=(1, 2)) * 0.0, ops.zeros((), "float32")
        n = self.num_classes
        # One split, not two slices: on torch its gradient is one
        # concatenation, where each slice's would be a zero-filled copy.
        class_targets, box_targets, _ = ops.split(y_true, [n, n + 4], axis=-1)
        class_scores, box_offsets, _ = ops.split(y_pred, [n, n + 4], axis=-1)

        # One-hot rows: the sum is 1 for positive and negative anchors, 0
        # for neutral ones, so the positives are the sum less the background.
        target_total = ops.sum(class_targets, axis=-1)
        if self.from_logits and not self._checked_logits:
            self._warn_if_probabilities(class_scores)
        if self.from_logits:
            cross_entropy = kernels.softmax_cross_entropy(
                class_targets, class_scores, target_total
            )
        else:
            log_probs = ops.log(ops.maximum(class_scores, 1e-15))
            cross_entropy = -ops.sum(class_targets * log_probs, axis=-1)

        negatives = class_targets[..., 0]
        positives = target_total - negatives
        hard_negatives = self._mine(cross_entropy, positives, negatives)

        box_loss = kernels.weighted_smooth_l1(
            box_offsets, box_targets, self.alpha * positives
        )
        per_image = ops.sum(
            (positives + hard_negatives) * cross_entropy + box_loss, axis=-1
        )
        invalid = _invalid_inputs(
            class_targets, target_total, class_scores, self.from_logits
        )
        per_image = per_image + ops.where(invalid, float("nan"), 0.0)
        return per_image, ops.sum(positives)

    def _warn_if_probabilities(self, class_scores):
        """Warns once if `from_logits=True` is given what look like probabilities.

        Checked on the first call with concrete values only (eager code: a
        direct call, torch's `fit`), never in a traced step (TensorFlow's or
        JAX's `fit`), where it would cost a host round-trip every step.
        """
        if not kernels.is_concrete(class_scores):
            return
        self._checked_logits = True
        row_sums = ops.sum(class_scores, axis=-1)
        nonnegative = ops.all(class_scores >= 0.0)
        normalized = ops.all(ops.abs(row_sums - 1.0) <= 1e-3)
        if bool(ops.logical_and(nonnegative, normalized)):  # one host sync, once
            warnings.warn(
                f"Loss {self.name!r} has from_logits=True, but every row of the "
                "class scores of `y_pred` is nonnegative and sums to 1: they look "
                "like probabilities (a softmax output), and the loss applies "
                "another softmax to them. Pass from_logits=False for "
                "probabilities, or feed the logits (the layer before the "
                "softmax).",
                stacklevel=3,
            )

    def _mine(self, cross_entropy, positives, negatives):
        """0/1 mask of the hard negatives, shape `(batch, anchors)`."""
        axis = -1  # per image: a row of `kernels.top_k_mask` is an image
        if self.mining == "batch":  # one row: the whole batch, (1, batch, anchors)
            axis = None
            # The scores are built in the row layout, not reshaped into it: a
            # reshape between them and the 31 counting passes lets XLA fuse
            # their computation (a strided read of `y_true`) into every pass
            # (the whole loss took 1.2x as long on JAX, 1.5x under TF XLA, CPU).
            cross_entropy = ops.expand_dims(cross_entropy, 0)
            negatives = ops.expand_dims(negatives, 0)
        is_negative = negatives > 0
        # Ranking scores: >= 0 for negatives, -1 for everything else.
        scores = ops.where(
            is_negative, ops.maximum(ops.stop_gradient(cross_entropy), 0.0), -1.0
        )
        wanted = ops.maximum(
            ops.floor(self.neg_pos_ratio * ops.sum(positives, axis=axis)),
            float(self.n_neg_min),
        )
        available = ops.sum(ops.cast(is_negative, "float32"), axis=axis)
        k = ops.cast(ops.minimum(wanted, available), "int32")
        mask = kernels.top_k_mask(scores, ops.reshape(k, (-1,)))
        return ops.cast(ops.reshape(mask, ops.shape(positives)), cross_entropy.dtype)

    def _check_shapes(self, y_true, y_pred):
        true_shape, pred_shape = tuple(y_true.shape), tuple(y_pred.shape)
        for arg, shape in (("y_pred", pred_shape), ("y_true", true_shape)):
            if len(shape) != 3:
                raise ValueError(
                    f"`{arg}` must have rank 3, (batch, anchors, num_classes + 4"
                    f" [+ 8]); received shape {shape}."
                )
        if any(
            t is not None and p is not None and t != p
            for t, p in zip(true_shape, pred_shape)
        ):
            raise ValueError(
                "`y_true` and `y_pred` must have the same shape; received "
                f"y_true.shape={true_shape}, y_pred.shape={pred_shape}."
            )
        depth = pred_shape[-1]
        wanted = (self.num_classes + 4, self.num_classes + 12)
        if depth is not None and depth not in wanted:
            raise ValueError(
                f"The last axis of `y_pred` must be num_classes + 4 = {wanted[0]}"
                f" (or {wanted[1]} with 8 trailing anchor/variance values) for "
                f"num_classes={self.num_classes}; received shape {pred_shape}."
            )

    def get_config(self):
        config = super().get_config()
        config.update(
            num_classes=self.num_classes,
            neg_pos_ratio=self.neg_pos_ratio,
            n_neg_min=self.n_neg_min,
            alpha=self.alpha,
            mining=self.mining,
            from_logits=self.from_logits,
        )
        return config


def _invalid_inputs(class_targets, target_total, class_scores, from_logits):
    """Whether the targets are not one-hot, or the probabilities are not ones.

    Per anchor, from row reductions only (no temporary of the targets' size
    on torch): the row sum and the background entry must be 0 or 1, and the
    sum of squares must equal the sum. That holds for one-hot and all-zero
    rows only, up to entries too small to change the row's float32 sum
    (below 2**-24 of it), which change the loss by less than its rounding.
    """
    background = class_targets[..., 0]
    invalid = ops.logical_or(
        ops.logical_or(_not_binary(target_total), _not_binary(background)),
        kernels.row_sum_of_squares(class_targets) != target_total,
    )
    if not from_logits:
        outside = ops.relu(-class_scores) + ops.relu(class_scores - 1.0)
        badness = ops.sum(outside, axis=-1) + ops.relu(
            ops.abs(ops.sum(class_scores, axis=-1) - 1.0) - 1e-3
        )
        invalid = ops.logical_or(invalid, ops.logical_not(badness == 0.0))
    return ops.any(invalid)


def _not_binary(x):
    return ops.logical_and(x != 0.0, x != 1.0)
