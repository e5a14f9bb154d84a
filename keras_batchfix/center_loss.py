"""`CenterLoss`: center loss (Wen et al., ECCV 2016) as a Keras 3 layer.

docs/center_loss.md tells the whole story: replicas, labels, trainable
centers, the scale-free variant, the logged values and `micro_batches`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import keras
from keras import ops

from keras_batchfix import _validation, kernels, normalizers, replicas


Schedule = keras.optimizers.schedules.LearningRateSchedule


class _Terms(NamedTuple):
    """What `CenterLoss._terms` computes for one batch."""

    total: Any  # 1/2 sum_i ||x_i - c_{y_i}||^2, NaN if a label is invalid
    count: Any  # B: a Python int where static
    difference: Any  # x_i - c_{y_i}, the centers under stop_gradient
    labels: Any  # int32, 0 where invalid
    valid: Any  # 1.0 where the label is valid, else 0.0
    features: Any  # x_i as the loss sees them (normalized if scale-free)


@keras.saving.register_keras_serializable(package="keras_batchfix")
class CenterLoss(replicas.ReplicaThreadLosses, keras.layers.Layer):
    """Center loss (Wen et al., 2016): pulls each feature toward its class center.

    Called as `layer([features, labels])`, the layer returns the features and
    adds `loss_weight * L_C` to the model's loss, where

        L_C = 1/2 * sum_i ||x_i - c_{y_i}||^2 / divisor(B)

    for a batch of `B` features `x_i` (shape `(B, D)`), integer labels `y_i`
    and centers `c_j` (a `(num_classes, D)` weight of the layer); `divisor`
    is the `normalizer`'s (the global batch size by default). The gradient
    reaches the features only. In training (not when frozen) the centers
    then move by the paper's rule, `n_j` being the batch's count of class `j`:

        c_j <- c_j - alpha * sum_{i: y_i = j} (c_j - x_i) / (1 + n_j)

    A label outside `[0, num_classes)` or a non-integer float label makes
    `L_C` NaN on every backend, and its sample moves no center. Called with
    the features alone, the layer is the identity. On TensorFlow and torch
    `fit` logs `<name>_value` and `<name>_relative` (docs/center_loss.md).

    Args:
        num_classes: number of classes (rows of the centers).
        alpha: the center step: a float in `(0, 1]` or a
            `keras.optimizers.schedules.LearningRateSchedule` (evaluated at
            `layer.iterations`, the layer's training steps). With
            `centers_trainable=True`, a multiplier of the optimizer's
            learning rate: any float `> 0`.
        loss_weight: the weight of `L_C` in the model's loss, a float `>= 0`.
        centers_initializer: initializer of the centers; default normal
            with std `sqrt(2 / num_classes)`, untruncated.
        feat_dim: the feature dimension `D`; default: the first input's.
        centers_trainable: let the model's optimizer move the centers, with
            `alpha * sum_{i: y_i = j} (c_j - x_i) / (1 + n_j)` as gradient.
        normalizer: gives `divisor`; default `keras_batchfix.GlobalCount()`.
        scale_free: use `x_i / max(||x_i||, 1e-6)` for `x_i` in `L_C` and
            in the center rule.
        **kwargs: base `Layer` arguments (`name`, `dtype`, ...).

    Example:

    ```python
    images = keras.Input((28, 28, 1))
    labels = keras.Input((), dtype="int32")
    features = keras.layers.Dense(2)(keras.layers.Flatten()(images))
    features = keras_batchfix.CenterLoss(10, alpha=0.5, loss_weight=0.01)(
        [features, labels])
    model = keras.Model([images, labels], keras.layers.Dense(10)(features))
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(True))
    model.fit([x, y], y, batch_size=64)
    ```
    """

    def __init__(
        self,
        num_classes: int,
        alpha: float | Schedule = 0.5,
        loss_weight: float = 0.01,
        centers_initializer: Any = None,
        feat_dim: int | None = None,
        centers_trainable: bool = False,
        normalizer: Any = None,
        scale_free: bool = False,
        **kwargs: Any,
    ) -> None:
        # No autocast: float labels must stay exact under mixed precision.
        kwargs.setdefault("autocast", False)
        super().__init__(**kwargs)
        self.num_classes = _validation.integer("num_classes", num_classes, 1)
        if feat_dim is not None:
            feat_dim = _validation.integer("feat_dim", feat_dim, 1, "an integer >= 1 or None")
        self.centers_trainable = bool(centers_trainable)
        if isinstance(alpha, dict):
            alpha = keras.optimizers.schedules.deserialize(alpha)
        if not isinstance(alpha, Schedule):
            if self.centers_trainable:  # a multiplier of the optimizer's rate
                wanted, valid = "a float > 0", lambda v: v > 0
            else:  # the layer's own step: a larger one overshoots
                wanted, valid = "a float in (0, 1]", lambda v: 0 < v <= 1
            alpha = _validation.real(
                "alpha", alpha,
                f"{wanted} (with centers_trainable={self.centers_trainable}) "
                "or a `keras.optimizers.schedules.LearningRateSchedule`",
                valid,
            )
        self.alpha = alpha
        self.loss_weight = _validation.real(
            "loss_weight", loss_weight, "a float >= 0", lambda v: v >= 0)
        self.centers_initializer = keras.initializers.get(  # the report's
            centers_initializer  # kaiming_normal_(centers.t()): fan-in num_classes
            or keras.initializers.VarianceScaling(2.0, "fan_in", "untruncated_normal")
        )
        self.feat_dim = feat_dim
        self.normalizer = normalizers.get(normalizer)  # None: GlobalCount()
        self.scale_free = bool(scale_free)
        # Set by a `keras_batchfix.Model` compiled with `micro_batches`: the
        # layer then adds its numerator, and sums the center step's terms
        # over the batch's slices until the model calls `end_window()`.
        self.micro_batches = None
        self.tracker = (
            CenterLossMetrics(self.name) if kernels.layer_metrics_persist() else None
        )

    def build(self, input_shape: Any) -> None:
        shape = _features_shape(input_shape)
        _check_features(shape, self.feat_dim, build=True)
        self.feat_dim = int(shape[-1])
        k, d = self.num_classes, self.feat_dim

        def weight(name, shape, initializer="zeros", **kwargs):
            kwargs.setdefault("trainable", False)
            kwargs.setdefault("aggregation", "only_first_replica")
            return self.add_weight(
                shape=shape, initializer=initializer, name=name, **kwargs
            )

        trainable = self.centers_trainable  # then averaged as gradients are
        self.centers = weight(
            "centers", (k, d), self.centers_initializer, trainable=trainable,
            aggregation="mean" if trainable else "only_first_replica",
        )
        self.iterations = weight("iterations", (), dtype="int")
        if not self.centers_trainable:  # a batch's slices (`micro_batches`)
            self.window_sums = weight("window_sums", (k, d))
            self.window_counts = weight("window_counts", (k,))

    def compute_output_shape(self, input_shape: Any) -> tuple:
        return _features_shape(input_shape)

    def compute_output_spec(self, inputs: Any, training: Any = None) -> Any:
        features = inputs[0] if isinstance(inputs, (list, tuple)) else inputs
        return keras.KerasTensor(features.shape, dtype=features.dtype)

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        if not isinstance(inputs, (list, tuple)):
            return inputs  # no labels: identity
        if len(inputs) != 2:
            raise ValueError(
                "`CenterLoss` expects `[features, labels]` (or features "
                f"alone); received a sequence of {len(inputs)} tensors."
            )
        centers = ops.convert_to_tensor(self.centers)
        terms = self._terms(inputs[0], inputs[1], centers)
        numerator = self.loss_weight * terms.total
        # In a step run as slices the model divides the batch's sum once,
        # frozen layer or not; only a trainable layer moves its centers.
        in_slices = bool(training) and self.micro_batches is not None
        if not in_slices:
            divisor = self.normalizer.divisor(terms.count)
            numerator = replicas.to_keras(
                numerator, divisor, self.normalizer.is_global, route=replicas.ADD_LOSS
            )
        losses = [numerator]
        if training and self.trainable:
            self._center_step(centers, terms, in_slices, losses)
        self.add_loss(losses)
        if self.tracker is not None:
            total, x = ops.stop_gradient(terms.total), ops.stop_gradient(terms.features)
            squares = ops.sum(terms.valid * ops.sum(x * x, axis=-1))
            relative = terms.count * total / ops.maximum(squares, 1e-12)
            self.tracker.update_state(total, relative, terms.count)
        return inputs[0]

    def center_loss(self, features: Any, labels: Any) -> Any:
        """`L_C` of a batch for the current centers: a scalar, no state change.

        The layer's added loss is `loss_weight * center_loss(...)` (on one
        device; each replica adds its share). NaN if a label is invalid.
        """
        if not self.built:
            self.build([tuple(features.shape), tuple(labels.shape)])
        terms = self._terms(features, labels, ops.convert_to_tensor(self.centers))
        return terms.total / self.normalizer.divisor(terms.count)

    def end_window(self) -> None:
        """Moves the centers once for a batch run as slices; resets the sums.

            c_j <- c_j - alpha * S_j / (1 + N_j)

        `S_j = sum_{i: y_i = j} (c_j - x_i)` and `N_j` summed over the slices
        (and replicas). A `keras_batchfix.Model` with `micro_batches` calls it.
        """
        sums = ops.convert_to_tensor(self.window_sums)
        counts = ops.convert_to_tensor(self.window_counts)
        step = self._alpha() * sums / ops.expand_dims(1.0 + counts, -1)
        self.centers.assign(ops.convert_to_tensor(self.centers) - step)
        self.window_sums.assign(ops.zeros_like(sums))
        self.window_counts.assign(ops.zeros_like(counts))
        kernels.assign_add(self.iterations, 1)

    def _terms(self, features: Any, labels: Any, centers: Any) -> _Terms:
        """The one computation of `L_C`'s numerator, for the loss, the step and
        the metric; an invalid label reads row 0, with weight 0, and makes the
        total NaN (no host round-trip, so compiled code checks it too)."""
        features, labels, valid = self._prepare(features, labels)
        if self.scale_free:
            squares = ops.sum(ops.square(features), axis=-1, keepdims=True)
            features = features * ops.rsqrt(ops.maximum(squares, 1e-12))
        difference = features - kernels.take_rows(ops.stop_gradient(centers), labels)
        total = 0.5 * ops.sum(valid * ops.sum(difference * difference, axis=-1))
        count = features.shape[0]  # a Python int where static
        if count is None:
            count = ops.cast(ops.shape(features)[0], features.dtype)
        # sqrt(valid samples - B): 0, or NaN (the root of a negative number).
        total = total + ops.sqrt(ops.sum(valid) - count)
        return _Terms(total, count, difference, labels, valid, features)

    def _center_step(self, centers, terms, in_slices, losses):
        """The paper's step of one batch, summed over the replicas.

            alpha * delta_j = sum_{i: y_i = j} alpha / (1 + n_j) * (c_j - x_i)

        Applied to the centers; added to the window's sums when run as
        slices; a zero-valued loss term of that gradient if trainable.
        """
        k = self.num_classes
        counts = replicas.global_sum(kernels.segment_sum(terms.valid, terms.labels, k))
        offsets = ops.stop_gradient(terms.difference)  # x_i - c_{y_i}
        if in_slices:
            sums = kernels.segment_sum(-terms.valid[:, None] * offsets, terms.labels, k)
            kernels.assign_add(self.window_sums, replicas.global_sum(sums))
            kernels.assign_add(self.window_counts, counts)
            return
        factors = -terms.valid * kernels.take_rows(
            self._alpha() / (1.0 + counts), terms.labels
        )
        step = replicas.global_sum(
            kernels.segment_sum(factors[:, None] * offsets, terms.labels, k)
        )
        if self.centers_trainable:
            # Its gradient w.r.t. the centers is `step` on every replica.
            surrogate = ops.sum(step * (centers - ops.stop_gradient(centers)))
            losses.append(replicas.to_keras(surrogate, 1.0, False, route=replicas.ADD_LOSS))
        else:
            kernels.assign_sub(self.centers, step)
        kernels.assign_add(self.iterations, 1)

    def _alpha(self):
        if isinstance(self.alpha, Schedule):
            return ops.cast(self.alpha(self.iterations), self.centers.dtype)
        return self.alpha

    def _prepare(self, features, labels):
        """Cast and shape-checked features, int32 labels (0 where invalid), valid."""
        features = ops.cast(features, self.centers.dtype)
        shape, labels = tuple(features.shape), ops.convert_to_tensor(labels)
        _check_features(shape, self.feat_dim)
        label_shape = tuple(labels.shape)
        if len(label_shape) == 2 and label_shape[-1] == 1:
            labels = ops.squeeze(labels, axis=-1)
        size = labels.shape[0] if len(labels.shape) == 1 else "no rank 1"
        if size == "no rank 1" or size != shape[0] and None not in (size, shape[0]):
            raise ValueError(
                "`labels` must have shape (batch_size,) or (batch_size, 1) with "
                f"the batch size of `features`; received labels.shape={label_shape}, "
                f"features.shape={shape}."
            )
        is_float = "float" in keras.backend.standardize_dtype(labels.dtype)
        integral = labels == ops.round(labels) if is_float else None
        labels = ops.cast(labels, "int32")
        valid = (labels >= 0) & (labels < self.num_classes)
        if integral is not None:
            valid = valid & integral
        return features, ops.where(valid, labels, 0), ops.cast(valid, features.dtype)

    def get_config(self) -> dict:
        config = super().get_config()
        alpha = self.alpha
        if isinstance(alpha, Schedule):
            alpha = keras.optimizers.schedules.serialize(alpha)
        config.update(
            num_classes=self.num_classes,
            alpha=alpha,
            loss_weight=self.loss_weight,
            centers_initializer=keras.initializers.serialize(self.centers_initializer),
            feat_dim=self.feat_dim,
            centers_trainable=self.centers_trainable,
            normalizer=keras.saving.serialize_keras_object(self.normalizer),
            scale_free=self.scale_free,
        )
        return config


class CenterLossMetrics(keras.metrics.Metric):
    """The layer's logged values, means over the samples seen.

    `<name>_value`: of `1/2 ||x_i - c_{y_i}||^2`; `<name>_relative`: of each
    batch's `L_C / mean_i ||x_i||^2`. One variable
    `[sum_t total_t, sum_t B_t r_t, sum_t B_t]`, updated once a step.
    """

    def __init__(self, name: str, dtype: Any = None) -> None:
        super().__init__(name=f"{name}_metrics", dtype=dtype)
        self.layer_name = name
        self.sums = self.add_variable((3,), "zeros", name="sums")

    def update_state(self, total: Any, relative_sum: Any, count: Any) -> None:
        """Adds a batch: its total, `B` times its relative value, and `B`."""
        kernels.assign_add(self.sums, ops.stack([total, relative_sum, count]))

    def result(self) -> dict:
        means = ops.divide_no_nan(self.sums[:2], self.sums[2])
        return {
            f"{self.layer_name}_value": means[0],
            f"{self.layer_name}_relative": means[1],
        }


def _features_shape(input_shape):
    """The features' shape from the argument of `build` and friends."""
    if isinstance(input_shape, (list, tuple)) and input_shape and isinstance(
        input_shape[0], (list, tuple)
    ):
        return tuple(input_shape[0])
    return tuple(input_shape)


def _check_features(shape, feat_dim, build=False):
    """A named error unless `shape` is `(batch_size, feat_dim)`."""
    if len(shape) != 2 or (build and shape[-1] is None):
        raise ValueError(
            "`features` must have shape (batch_size, feat_dim), feat_dim known; "
            f"received shape {shape}."
        )
    if None not in (shape[-1], feat_dim) and shape[-1] != feat_dim:
        raise ValueError(
            f"The feature dimension of `features` ({shape[-1]}, shape {shape}) "
            f"must equal the centers' dimension `feat_dim` ({feat_dim}, centers "
            f"of shape (num_classes, {feat_dim}))."
        )
