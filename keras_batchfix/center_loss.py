"""`CenterLoss`: center loss (Wen et al., ECCV 2016) as a Keras 3 layer.

A port of the PyTorch `CenterLoss` of the report "Decaying learning rate
spikes center loss" (after
jxgu1016/MNIST_center_loss_pytorch): the loss is the batch mean of half the
squared distance of each feature to its class center, its gradient reaches
the features only, and the centers move by the paper's rule, not by the
model's optimizer.
"""

import keras
from keras import ops

from keras_batchfix import _validation, kernels, normalizers, replicas


def _report_initializer():
    """Kaiming-normal as the report's code: `kaiming_normal_(centers.t())`.

    On the transposed `(feat_dim, num_classes)` tensor PyTorch's fan-in is
    `num_classes`, so the centers are N(0, 2 / num_classes), untruncated.
    Keras's fan-in of a `(num_classes, feat_dim)` weight is `num_classes` too.
    """
    return keras.initializers.VarianceScaling(
        scale=2.0, mode="fan_in", distribution="untruncated_normal"
    )


@keras.saving.register_keras_serializable(package="keras_batchfix")
class CenterLoss(replicas.ReplicaThreadLosses, keras.layers.Layer):
    """Center loss layer: adds `loss_weight * L_C` and returns the features.

    For a batch of `B` features `x_i` (shape `(B, D)`) with integer labels
    `y_i` and centers `c_j` (a `(num_classes, D)` variable of the layer):

        L_C = 1/2 * sum_i ||x_i - c_{y_i}||^2 / divisor(B)

    `loss_weight * L_C` is added with `add_loss` (in training and in
    evaluation). Its gradient reaches the features only, never the centers.
    In training (`training=True`, i.e. in `fit`; never in `evaluate` or
    `predict`, nor when the layer is frozen with `layer.trainable = False`)
    the centers then move by the paper's rule, computed from the centers the
    loss used:

        c_j <- c_j - alpha * sum_{i: y_i = j} (c_j - x_i) / (1 + n_j)

    with `n_j` the number of samples of class `j` in the batch. As in the report's code,
    `loss_weight` does not scale the center step and the centers get no
    momentum, weight decay or learning-rate schedule from the model's
    optimizer. To make the step follow the model's schedule (as the original
    Caffe code, where centers are solver parameters, effectively did), pass
    `alpha=` a `keras.optimizers.schedules.LearningRateSchedule`: it is
    evaluated at the layer's own step counter `layer.iterations` (training
    steps from 0, like `optimizer.iterations`, and saved with the model), e.g.
    `PiecewiseConstantDecay(boundaries, [0.5, 0.25, 0.05])` with the
    boundaries of the model's learning-rate schedule.

    Batch size and replicas: the batch size `B` is the count, and
    `divisor` is the `normalizer`'s (default `GlobalCount()`: `B` summed
    over the replicas). `L_C` is then a mean over the global batch, so a
    short last batch has the same scale as a full one, and under
    `tf.distribute` (mirrored or multi-worker) or torch DDP the optimized
    loss and gradient are exactly those of one device on the global batch,
    also when it splits unevenly (`keras_batchfix.replicas` gives the
    replica factor). The per-class sums and counts of the center update are
    summed over the replicas too: every replica applies the same global
    update, and the replicas' centers stay identical. With JAX
    (`keras.distribution`) one program sees the global batch. (Keras's
    logged `loss` averages the replicas' values weighted by their local batch
    sizes; it is exact when the global batch splits evenly, the gradient
    always is.)

    Labels: shape `(B,)` or `(B, 1)`, integers or integer-valued floats. A
    batch with a label outside `[0, num_classes)` or a non-integer float
    label gets a NaN loss, on every backend and in compiled code alike (no
    host round-trip), so `fit` shows `loss: nan` at once
    (`keras.callbacks.TerminateOnNaN` stops it); such samples do not move
    the centers. `layer.center_loss(features, labels)` raises a
    `ValueError` for them instead.

    Called with the features alone (`layer(features)`) the layer is the
    identity and adds no loss. For an inference model without labels, take
    the features tensor that feeds the layer:
    `keras.Model(images, model.get_layer("embedding").output)`.

    Scale-free option (`scale_free=True`): `L_C` scales with the squared
    feature norm, so it can rise while the classes get tighter relative to
    their size (the rise after the last LR decay in "Decaying learning rate
    spikes center loss" is such a rise; see docs/center_loss.md). With `scale_free=True` the loss and the center rule
    use the L2-normalized features

        x^_i = x_i / max(||x_i||, 1e-6),
        L_C = 1/2 * sum_i ||x^_i - c_{y_i}||^2 / B,

    so `L_C` is unchanged when the features are multiplied by any positive
    factor (per sample, too), the centers live at the unit-sphere scale, and
    the gradient goes through the normalization (NormFace-style). The layer
    still returns the raw features.

    Mixed precision: the layer does not autocast its inputs; it computes in
    the centers' dtype (float32 under `mixed_float16`), so float labels stay
    exact, and returns the features unchanged.

    Logging: `layer.center_loss(features, labels)` returns the unweighted
    `L_C` for the current centers (no state change). On the TensorFlow and
    torch backends the layer also tracks a metric (`layer.tracker`) that
    logs two means over the samples seen: `"<layer name>_value"` (default
    `"center_loss_value"`), the unweighted `L_C` of each batch in `fit` and
    `evaluate`, and `"<layer name>_relative"`, the batch's `L_C / mean_i ||x_i||^2`
    (features as the loss sees them: normalized ones with `scale_free=True`,
    where it equals `L_C`), which falls when the clusters tighten relative to
    the feature scale whatever the scale does. On JAX, Keras's stateless `fit` drops metric updates
    made inside a layer's `call`, so the metric is not created there; log
    the cross-entropy as a compiled metric instead and read
    `L_C = (loss - crossentropy) / loss_weight`.

    Why not `compile(loss={"embedding": ...})`: a compiled loss is not told
    whether Keras is training or evaluating (the centers would move in
    `evaluate`), and it cannot own the centers variable (it would be neither
    saved with the model nor serializable). The layer form is correct on all
    backends.

    Args:
        num_classes: number of classes (rows of the centers).
        alpha: center step, a float in `(0, 1]` (default 0.5; the paper's
            range: a larger step overshoots the class mean) or a
            `keras.optimizers.schedules.LearningRateSchedule`. With
            `centers_trainable=True` a learning-rate multiplier: any float
            `> 0` (centers at lr 0.5 beside a model at lr 0.05: `alpha=10`).
        loss_weight: lambda, the weight of `L_C` in the model's loss, a
            float >= 0. Default 0.01.
        centers_initializer: initializer of the `(num_classes, D)` centers;
            default Kaiming-normal as the report's code (untruncated normal with std
            `sqrt(2 / num_classes)`).
        feat_dim: optional feature dimension `D`; default: taken from the
            first input. A different input dimension raises `ValueError`.
        centers_trainable: opt in to training the centers with the model's
            optimizer (then they get its learning rate, schedule, momentum and
            weight decay). The optimizer receives the "gradient"
            `alpha * sum_{i: y_i = j}(c_j - x_i) / (1 + n_j)` (the report's,
            times `alpha`, which acts as a learning-rate multiplier) and the
            layer applies no update of its own. Default False.
        normalizer: how the batch size becomes the divisor of `L_C`;
            default `keras_batchfix.GlobalCount()` (the global batch).
            `LocalCount()` averages the replicas' means instead.
        scale_free: compute `L_C` and the center rule on the L2-normalized
            features `x_i / ||x_i||` (see above). Default False (the report's
            unnormalized loss).
        **kwargs: base `Layer` arguments (`name`, `dtype`, ...).

    Example:

    ```python
    images = keras.Input((28, 28, 1))
    labels = keras.Input((), dtype="int32")
    features = keras.layers.Dense(2)(keras.layers.Flatten()(images))
    features = keras_batchfix.CenterLoss(10, alpha=0.5, loss_weight=0.01)(
        [features, labels]
    )
    logits = keras.layers.Dense(10)(features)
    model = keras.Model([images, labels], logits)
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(True))
    model.fit([x, y], y, batch_size=64)
    ```

    Scale-free: `keras_batchfix.CenterLoss(10, scale_free=True)` in place of
    the layer above; `fit` then logs `center_loss_value` (on normalized
    features) and `center_loss_relative`.
    """

    def __init__(
        self,
        num_classes,
        alpha=0.5,
        loss_weight=0.01,
        centers_initializer=None,
        feat_dim=None,
        centers_trainable=False,
        normalizer=None,
        scale_free=False,
        **kwargs,
    ):
        # No autocast: float labels must not become float16 under mixed
        # precision (exact only up to 2048); the loss runs in the centers'
        # dtype.
        kwargs.setdefault("autocast", False)
        super().__init__(**kwargs)
        num_classes = _validation.integer("num_classes", num_classes, 1)
        if feat_dim is not None:
            feat_dim = _validation.integer(
                "feat_dim", feat_dim, 1, "an integer >= 1 or None"
            )
        if isinstance(alpha, dict):
            alpha = keras.optimizers.schedules.deserialize(alpha)
        if not isinstance(
            alpha, keras.optimizers.schedules.LearningRateSchedule
        ):
            if centers_trainable:  # a multiplier of the optimizer's rate
                wanted, valid = "a float > 0", lambda v: v > 0
            else:  # the layer's own step: a larger one overshoots
                wanted, valid = "a float in (0, 1]", lambda v: 0 < v <= 1
            alpha = _validation.real(
                "alpha",
                alpha,
                f"{wanted} (with centers_trainable={bool(centers_trainable)}) "
                "or a `keras.optimizers.schedules.LearningRateSchedule`",
                valid,
            )
        self.num_classes = num_classes
        self.alpha = alpha
        self.loss_weight = _validation.real(
            "loss_weight", loss_weight, "a float >= 0", lambda v: v >= 0
        )
        self.centers_initializer = keras.initializers.get(
            centers_initializer or _report_initializer()
        )
        self.feat_dim = feat_dim
        self.centers_trainable = bool(centers_trainable)
        self.normalizer = normalizers.get(normalizer)
        self.scale_free = bool(scale_free)
        self.supports_masking = False
        # Set by a `keras_batchfix.Model` compiled with `micro_batches`: the
        # layer then adds its numerator and sums the center step's terms
        # over the batch's slices until the model calls `end_window()`.
        self.micro_batches = None
        if keras.backend.backend() != "jax":
            self.tracker = CenterLossMetrics(self.name)
        else:
            self.tracker = None

    # ------------------------------------------------------------------ build

    def build(self, input_shape):
        features_shape = _features_shape(input_shape)
        if len(features_shape) != 2:
            raise ValueError(
                "`features` must have shape (batch_size, feat_dim); received "
                f"shape {tuple(features_shape)}."
            )
        dim = features_shape[-1]
        if dim is None:
            raise ValueError(
                "The last axis of `features` must be known to build the "
                f"centers; received shape {tuple(features_shape)}."
            )
        if self.feat_dim is not None and dim != self.feat_dim:
            raise ValueError(_dim_error(dim, self.feat_dim, features_shape))
        self.feat_dim = int(dim)
        self.centers = self.add_weight(
            shape=(self.num_classes, self.feat_dim),
            initializer=self.centers_initializer,
            trainable=self.centers_trainable,
            aggregation=(
                "mean" if self.centers_trainable else "only_first_replica"
            ),
            name="centers",
        )
        self.iterations = self.add_weight(
            shape=(),
            initializer="zeros",
            dtype="int",
            trainable=False,
            aggregation="only_first_replica",
            name="iterations",
        )
        if not self.centers_trainable:
            # sum_{i: y_i=j} (c_j - x_i) and n_j of a batch's slices so far.
            self.window_sums = self.add_weight(
                shape=(self.num_classes, self.feat_dim), initializer="zeros",
                trainable=False, aggregation="only_first_replica",
                name="window_sums",
            )
            self.window_counts = self.add_weight(
                shape=(self.num_classes,), initializer="zeros",
                trainable=False, aggregation="only_first_replica",
                name="window_counts",
            )

    def compute_output_shape(self, input_shape):
        return tuple(_features_shape(input_shape))

    def compute_output_spec(self, inputs, training=None):
        features = inputs[0] if isinstance(inputs, (list, tuple)) else inputs
        return keras.KerasTensor(features.shape, dtype=features.dtype)

    # ------------------------------------------------------------------ call

    def call(self, inputs, training=None):
        if not isinstance(inputs, (list, tuple)):
            return inputs  # no labels: identity
        if len(inputs) != 2:
            raise ValueError(
                "`CenterLoss` expects `[features, labels]` (or features "
                f"alone); received a sequence of {len(inputs)} tensors."
            )
        features_in, labels = inputs
        features, labels, valid = self._prepare(features_in, labels)
        features = self._loss_features(features)
        centers = ops.convert_to_tensor(self.centers)
        gathered = kernels.take_rows(ops.stop_gradient(centers), labels)
        difference = features - gathered  # x_i - c_{y_i}
        local_sum = _half_squared_norm_sum(difference, valid)
        local_batch = features.shape[0]  # a Python int where static
        if local_batch is None:
            local_batch = ops.cast(ops.shape(features)[0], features.dtype)
        # NaN for a batch with an invalid label (see the class docstring):
        # sqrt(valid samples - B) is 0, or the root of a negative number.
        poison = ops.sqrt(ops.sum(valid) - local_batch)

        # In a step run as slices the model divides the batch's sum once,
        # frozen layer or not; only a trainable layer moves its centers.
        in_slices = bool(training) and self.micro_batches is not None
        training = bool(training) and self.trainable
        numerator = self.loss_weight * local_sum + poison
        if in_slices:  # the model divides the batch's sum once
            losses = [numerator]
        else:
            losses = [
                replicas.to_keras(
                    numerator,
                    self.normalizer.divisor(local_batch),
                    self.normalizer.is_global,
                    route=replicas.ADD_LOSS,
                )
            ]
        if training:
            # n_j over all replicas. The steps need c_{y_i} - x_i, that is
            # -difference: the sign goes into each sample's factor (which
            # is 0 for an invalid label), not into another pass.
            counts = replicas.global_sum(
                kernels.segment_sum(valid, labels, self.num_classes)
            )
            offsets = ops.stop_gradient(difference)
            if in_slices:
                sums = kernels.segment_sum(
                    -valid[:, None] * offsets, labels, self.num_classes
                )
                kernels.assign_add(self.window_sums, replicas.global_sum(sums))
                kernels.assign_add(self.window_counts, counts)
            else:
                self._step_centers(centers, offsets, valid, labels, counts, losses)
                kernels.assign_add(self.iterations, 1)
        self.add_loss(losses)
        if self.tracker is not None:
            local_sum = ops.stop_gradient(local_sum)
            detached = ops.stop_gradient(features)
            squares = ops.sum(valid * ops.sum(detached * detached, axis=-1))
            self.tracker.update_state(
                local_sum + poison,
                local_batch * local_sum / ops.maximum(squares, 1e-12),
                local_batch,
            )
        return features_in

    def _step_centers(self, centers, offsets, valid, labels, counts, losses):
        """The center step of one batch (a surrogate loss term if trainable).

            alpha * delta_j = sum_{i: y_i=j} (alpha / (1 + n_j)) (c_j - x_i)

        each sample's `c_{y_i} - x_i = -offsets_i` scaled (0 for an invalid
        label) before the per-class sum (the sum over all replicas), so the
        step costs one pass over the centers.
        """
        rate = self._current_alpha() / (1.0 + counts)
        factors = -valid * kernels.take_rows(rate, labels)
        scaled = factors[:, None] * offsets
        step = replicas.global_sum(
            kernels.segment_sum(scaled, labels, self.num_classes)
        )
        if self.centers_trainable:
            # Zero-valued term whose gradient w.r.t. the centers is
            # alpha * delta, the same on every replica (delta is global):
            # the replicas' mean of it.
            surrogate = ops.sum(step * (centers - ops.stop_gradient(centers)))
            losses.append(
                replicas.to_keras(surrogate, 1.0, False, route=replicas.ADD_LOSS)
            )
        else:
            kernels.assign_sub(self.centers, step)

    def _loss_features(self, features):
        """The features the loss uses: `x / max(||x||, 1e-6)` if scale-free."""
        if not self.scale_free:
            return features
        squares = ops.sum(ops.square(features), axis=-1, keepdims=True)
        return features * ops.rsqrt(ops.maximum(squares, 1e-12))

    def end_window(self):
        """Steps the centers once for a batch run in slices, and resets the sums.

            c_j <- c_j - alpha * S_j / (1 + N_j)

        with `S_j = sum_{i: y_i=j} (c_j - x_i)` and `N_j` summed over the
        slices (and the replicas): the step of one pass over the batch. A
        `keras_batchfix.Model` compiled with `micro_batches` calls it.
        """
        sums = ops.convert_to_tensor(self.window_sums)
        counts = ops.convert_to_tensor(self.window_counts)
        delta = sums / ops.expand_dims(1.0 + counts, -1)
        self.centers.assign(
            ops.convert_to_tensor(self.centers) - self._current_alpha() * delta
        )
        self.window_sums.assign(ops.zeros_like(sums))
        self.window_counts.assign(ops.zeros_like(counts))
        kernels.assign_add(self.iterations, 1)

    def center_loss(self, features, labels):
        """Unweighted `L_C` of a batch for the current centers (a scalar).

        No state changes (centers, step counter and metric stay as they are).
        Called eagerly, labels outside `[0, num_classes)` raise a `ValueError`.
        """
        if not self.built:
            self.build([tuple(features.shape), tuple(labels.shape)])
        if _is_concrete(ops.convert_to_tensor(labels)):
            self._check_label_values(ops.convert_to_tensor(labels))
        features, labels, valid = self._prepare(features, labels)
        features = self._loss_features(features)
        gathered = kernels.take_rows(ops.convert_to_tensor(self.centers), labels)
        total = _half_squared_norm_sum(features - gathered, valid)
        batch = ops.cast(ops.shape(features)[0], features.dtype)
        return total / ops.maximum(batch, 1.0)

    def _current_alpha(self):
        schedule_type = keras.optimizers.schedules.LearningRateSchedule
        if isinstance(self.alpha, schedule_type):
            step = self.iterations
            return ops.cast(self.alpha(step), self.centers.dtype)
        return self.alpha

    def _prepare(self, features, labels):
        """Casts, checks shapes and labels; returns features, labels, valid.

        `valid` is 1.0 for the samples whose label lies in
        `[0, num_classes)`, 0.0 for the others (whose label becomes 0).
        """
        dtype = self.centers.dtype
        features = ops.cast(features, dtype)
        shape = tuple(features.shape)
        if len(shape) != 2:
            raise ValueError(
                "`features` must have shape (batch_size, feat_dim); received "
                f"shape {shape}."
            )
        if shape[-1] is not None and shape[-1] != self.feat_dim:
            raise ValueError(_dim_error(shape[-1], self.feat_dim, shape))
        labels = ops.convert_to_tensor(labels)
        label_shape = tuple(labels.shape)
        if len(label_shape) == 2 and label_shape[-1] == 1:
            labels = ops.squeeze(labels, axis=-1)
        elif len(label_shape) != 1:
            raise ValueError(
                "`labels` must have shape (batch_size,) or (batch_size, 1); "
                f"received shape {label_shape} (features of shape {shape})."
            )
        if (
            shape[0] is not None
            and label_shape[0] is not None
            and shape[0] != label_shape[0]
        ):
            raise ValueError(
                "`features` and `labels` must have the same batch size; "
                f"received features.shape={shape}, labels.shape={label_shape}."
            )
        integral = labels == ops.round(labels) if _is_float(labels) else None
        labels = ops.cast(labels, "int32")
        valid = (labels >= 0) & (labels < self.num_classes)
        if integral is not None:
            valid = valid & integral
        # Out-of-range labels (compiled code only) read row 0, weighted 0.
        return features, ops.where(valid, labels, 0), ops.cast(valid, dtype)

    def _check_label_values(self, labels):
        values = ops.convert_to_numpy(labels)
        if values.size == 0:
            return
        if values.dtype.kind == "f":
            bad = values[values != values.round()]
            if bad.size:
                raise ValueError(
                    "`labels` must be integers or integer-valued floats; "
                    "received non-integer values such as "
                    f"{bad.flat[0].item()!r}."
                )
        low, high = values.min().item(), values.max().item()
        if low < 0 or high >= self.num_classes:
            raise ValueError(
                "`labels` must lie in [0, num_classes) = "
                f"[0, {self.num_classes}); "
                f"received labels from {low} to {high}."
            )

    # ---------------------------------------------------------- serialization

    def get_config(self):
        config = super().get_config()
        alpha = self.alpha
        if isinstance(alpha, keras.optimizers.schedules.LearningRateSchedule):
            alpha = keras.optimizers.schedules.serialize(alpha)
        config.update(
            num_classes=self.num_classes,
            alpha=alpha,
            loss_weight=self.loss_weight,
            centers_initializer=keras.initializers.serialize(
                self.centers_initializer
            ),
            feat_dim=self.feat_dim,
            centers_trainable=self.centers_trainable,
            normalizer=keras.saving.serialize_keras_object(self.normalizer),
            scale_free=self.scale_free,
        )
        return config


class CenterLossMetrics(keras.metrics.Metric):
    """The layer's two logged values, means over the samples seen.

    `<name>_value`, the mean of `L_C`, and `<name>_relative`, the mean of
    `L_C / mean_i ||x_i||^2`, each batch weighted by its size: one variable,
    `[sum_t w_t v_t, sum_t w_t r_t, sum_t w_t]`, updated once a step.
    """

    def __init__(self, name, dtype=None):
        super().__init__(name=f"{name}_metrics", dtype=dtype)
        self.layer_name = name
        self.sums = self.add_variable((3,), "zeros", name="sums")

    def update_state(self, value_sum, relative_sum, weight):
        """Adds a batch: the sums of its values and relative values, its weight."""
        # (`assign_add` casts to the variable's dtype.)
        kernels.assign_add(self.sums, ops.stack([value_sum, relative_sum, weight]))

    def result(self):
        means = ops.divide_no_nan(self.sums[:2], self.sums[2])
        return {
            f"{self.layer_name}_value": means[0],
            f"{self.layer_name}_relative": means[1],
        }


def _half_squared_norm_sum(differences, valid):
    """1/2 sum_i ||x_i - c_{y_i}||^2 over the samples with a valid label.

    `differences`: the rows `x_i - c_{y_i}`; `valid`: 1 or 0 per row.
    """
    return 0.5 * ops.sum(valid * ops.sum(differences * differences, axis=-1))


def _features_shape(input_shape):
    """The features' shape from the argument of `build` and friends."""
    if (
        isinstance(input_shape, (list, tuple))
        and len(input_shape) > 0
        and isinstance(input_shape[0], (list, tuple))
    ):
        return tuple(input_shape[0])
    return tuple(input_shape)


def _dim_error(seen, wanted, shape):
    return (
        f"The feature dimension of `features` ({seen}, shape {tuple(shape)}) "
        f"must equal the centers' dimension `feat_dim` ({wanted}, centers of "
        f"shape (num_classes, {wanted}))."
    )


def _is_float(tensor):
    return "float" in str(keras.backend.standardize_dtype(tensor.dtype))


def _is_concrete(tensor):
    """Whether `tensor` holds values now (eager), not a traced placeholder."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.executing_eagerly()
    if backend == "jax":
        import jax

        return not isinstance(tensor, jax.core.Tracer)
    if backend == "torch":
        import torch

        if tensor.device.type == "meta":
            return False
        compiling = getattr(torch.compiler, "is_compiling", None)
        return not (compiling and compiling())
    return False
