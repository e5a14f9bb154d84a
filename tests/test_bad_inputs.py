"""Bad and edge inputs: a named error, a warning or a documented value (issue 29).

One row per case: what is built or called, and what must come of it: an
exception of a type whose message matches a pattern (the argument, the value
received, what was wanted), a warning, or a result whose `str()` matches.
Runs on the backend KERAS_BACKEND selects (tensorflow, jax, torch); add a
row with every new check.
"""

import collections
import contextlib
import io
import re
import warnings

import keras
import numpy as np
import pytest
from keras import ops

from keras_batchfix import CenterLoss, EMACount, SpikeMonitor, SSDMultiboxLoss
from keras_batchfix import compensate, diagnose
from keras_batchfix.__main__ import main as cli_main
from keras_batchfix.spikes import report as spike_report
from keras_batchfix.spikes.analysis import DetectorConfig

BACKEND = keras.backend.backend()

Raises = collections.namedtuple("Raises", "type pattern")
Warns = collections.namedtuple("Warns", "category pattern")
Says = collections.namedtuple("Says", "pattern")  # str(result) matches

C, A = 3, 5  # SSD: classes (background included), anchors


def ssd_batch(batch, logits=False):
    """One-hot targets and softmax probabilities (or logits), `(batch, A, C + 4)`."""
    rng = np.random.default_rng(29)
    y_true = np.zeros((batch, A, C + 4), "float32")
    classes = rng.integers(0, C, (batch, A))
    y_true[np.arange(batch)[:, None], np.arange(A)[None], classes] = 1.0
    y_true[..., C:] = rng.normal(size=(batch, A, 4))
    y_pred = np.zeros_like(y_true)
    scores = rng.normal(size=(batch, A, C))
    y_pred[..., :C] = scores if logits else np.exp(scores) / np.exp(scores).sum(-1, keepdims=True)
    y_pred[..., C:] = rng.normal(size=(batch, A, 4))
    return y_true, y_pred


def per_sample_error(y_true, y_pred):
    return ops.mean(ops.square(y_true - y_pred), axis=(1, 2))


def none_loss(y_true, y_pred):
    return None


def value_and_gradient(loss, y_true, y_pred):
    """`loss(y_true, y_pred)` and the sum of |d loss / d y_pred|, on this backend."""
    if BACKEND == "jax":
        import jax

        value, grad = jax.value_and_grad(lambda p: loss(y_true, p))(y_pred)
    elif BACKEND == "torch":
        import torch

        pred = torch.tensor(y_pred, requires_grad=True)
        value = loss(y_true, pred)
        value.backward()
        grad = pred.grad
    else:
        import tensorflow as tf

        pred = tf.constant(y_pred)
        with tf.GradientTape() as tape:
            tape.watch(pred)
            value = loss(y_true, pred)
        grad = tape.gradient(value, pred)
    grad = ops.convert_to_numpy(grad)
    return f"{float(ops.convert_to_numpy(value))} grad{grad.shape} sum {np.abs(grad).sum()}"


def fit_one_epoch(loss):
    """A one-layer model fit for 2 steps; returns how far the kernel moved."""
    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).normal(size=(8, 3)).astype("float32")
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss=loss)
    before = model.get_weights()[0]
    model.fit(x, np.ones((8, 1), "float32"), batch_size=4, verbose=0)
    return float(np.abs(model.get_weights()[0] - before).max())


def monitor_summary_with_nan_steps():
    """10 steps whose last 8 batches hold NaN inputs: the monitor's summary."""
    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).normal(size=(40, 3)).astype("float32")
    x[8:] = np.nan
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    monitor = SpikeMonitor(verbose=0, plot=False)
    model.fit(x, np.ones((40, 1), "float32"), batch_size=4, shuffle=False,
              verbose=0, callbacks=[monitor])
    return spike_report.summary(monitor.steps, monitor.report)


def cli(*argv):
    """`python -m keras_batchfix ...`: the exit status and what went to stderr."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        status = cli_main(list(argv))
    return f"exit {status}: {err.getvalue()}"


y_true4, y_pred4 = ssd_batch(4)
EMPTY = ssd_batch(0)

CASES = [
    # --- the regression: alpha is a learning-rate multiplier when trainable
    pytest.param(
        lambda: CenterLoss(10, alpha=10.0, centers_trainable=True).alpha,
        Says(r"^10\.0$"), id="CenterLoss-alpha10-trainable",
    ),
    pytest.param(
        lambda: CenterLoss(10, alpha=10.0),
        Raises(ValueError, r"`alpha` must be a float in \(0, 1\] \(with "
               r"centers_trainable=False\).*received alpha=10\.0"),
        id="CenterLoss-alpha10-own-step",
    ),
    pytest.param(
        lambda: CenterLoss(10, alpha=-1.0, centers_trainable=True),
        Raises(ValueError, r"`alpha` must be a float > 0.*received alpha=-1\.0"),
        id="CenterLoss-alpha-negative-trainable",
    ),
    # --- silent before: named errors now
    pytest.param(
        lambda: SSDMultiboxLoss(C, neg_pos_ratio=float("nan")),
        Raises(ValueError, r"`neg_pos_ratio` must be a float >= 0; received neg_pos_ratio=nan"),
        id="SSD-neg_pos_ratio-nan",
    ),
    pytest.param(
        lambda: SSDMultiboxLoss(C, neg_pos_ratio=float("inf")),
        Raises(ValueError, r"`neg_pos_ratio` must be .*received neg_pos_ratio=inf"),
        id="SSD-neg_pos_ratio-inf",
    ),
    pytest.param(
        lambda: SSDMultiboxLoss(C, alpha=-1),
        Raises(ValueError, r"`alpha` must be a float >= 0; received alpha=-1\."),
        id="SSD-alpha-negative",
    ),
    pytest.param(
        lambda: SSDMultiboxLoss(C, n_neg_min=1.5),
        Raises(ValueError, r"`n_neg_min` must be an integer >= 0; received n_neg_min=1\.5"),
        id="SSD-n_neg_min-fraction",
    ),
    pytest.param(
        lambda: CenterLoss(10, loss_weight=-0.01),
        Raises(ValueError, r"`loss_weight` must be a float >= 0; received loss_weight=-0\.01"),
        id="CenterLoss-loss_weight-negative",
    ),
    pytest.param(
        lambda: CenterLoss(10, feat_dim=2.5),
        Raises(ValueError, r"`feat_dim` must be an integer >= 1 or None; received feat_dim=2\.5"),
        id="CenterLoss-feat_dim-fraction",
    ),
    pytest.param(
        lambda: diagnose("mse", np.ones((4, 2)), np.full((4, 2), np.nan), verbose=False),
        Says(r"VERDICT: non_finite -> fix: unknown\n.*NaN or infinite.*y_pred 8 of 8"),
        id="diagnose-all-nan",
    ),
    pytest.param(
        lambda: DetectorConfig(half_window=2.5),
        Raises(ValueError, r"`half_window` must be an integer >= 1; received half_window=2\.5"),
        id="DetectorConfig-half_window-fraction",
    ),
    pytest.param(
        lambda: SpikeMonitor(half_window=2.5),
        Raises(ValueError, r"`half_window` must be an integer >= 1; received half_window=2\.5"),
        id="SpikeMonitor-half_window-fraction",
    ),
    pytest.param(
        lambda: SpikeMonitor(lookback=-1),
        Raises(ValueError, r"`lookback` must be an integer >= 0; received lookback=-1"),
        id="SpikeMonitor-lookback-negative",
    ),
    pytest.param(
        monitor_summary_with_nan_steps,
        Says(r"^SpikeMonitor: 10 steps \(8 with a NaN or infinite loss\), 0 spikes\n"
             r"  NaN or infinite loss: 8 steps, at steps 2, 3, 4, 5, 6, 7, 8, 9 "
             r"\(first: epoch 0, batch 2\)"),
        id="SpikeMonitor-8-of-10-steps-nan",
    ),
    pytest.param(
        lambda: fit_one_epoch(compensate(lambda y_true, y_pred: 0.5)),
        Raises(ValueError, r"'compensated_lambda' returned a constant \(0\.5\), which "
               r"does not depend on `y_pred`"),
        id="compensate-python-constant",
    ),
    pytest.param(  # TensorFlow's fit reports it itself
        lambda: fit_one_epoch(compensate(lambda y_true, y_pred: ops.convert_to_tensor(0.5))),
        Raises(ValueError, r"does not depend on `y_pred`|No gradients provided"),
        id="compensate-tensor-constant",
    ),
    pytest.param(
        lambda: fit_one_epoch(compensate(lambda y_true, y_pred: ops.mean(y_true, axis=-1))),
        Raises(ValueError, r"does not depend on `y_pred`|No gradients provided"),
        id="compensate-y_true-only",
    ),
    # --- vague before: the argument, the value and what was wanted
    pytest.param(
        lambda: SSDMultiboxLoss(C)(y_true4, y_pred4, sample_weight=np.ones(3)),
        Raises(ValueError, r"`sample_weight` of loss 'ssd_multibox_loss' must have one "
               r"weight per sample: shape \(4,\).*y_pred of shape \(4, 5, 7\); received "
               r"sample_weight of shape \(3,\)"),
        id="SSD-sample_weight-length",
    ),
    pytest.param(
        lambda: compensate(per_sample_error)(y_true4, y_pred4, sample_weight=np.ones((5, 1))),
        Raises(ValueError, r"`sample_weight` of loss 'compensated_per_sample_error'.*"
               r"shape \(4,\).*received sample_weight of shape \(5, 1\)"),
        id="compensate-sample_weight-length",
    ),
    pytest.param(
        lambda: diagnose(none_loss, np.ones((4, 2)), np.ones((4, 2)), verbose=False),
        Raises(ValueError, r"Loss 'none_loss' must return numeric loss values.*returned None"),
        id="diagnose-loss-returns-None",
    ),
    pytest.param(
        lambda: diagnose("mse", np.ones((4, 2)), np.ones((4, 2)), repeats=(1, 2.5),
                         verbose=False),
        Raises(ValueError, r"`repeats` must be two or more distinct integers >= 1.*"
               r"received repeats=\(1, 2\.5\)"),
        id="diagnose-repeats-fraction",
    ),
    pytest.param(
        lambda: round(EMACount(momentum=np.float32(0.9)).momentum, 6),
        Says(r"^0\.9$"), id="EMACount-momentum-numpy",
    ),
    pytest.param(
        lambda: EMACount(initial_value=np.int64(30)).initial_value,
        Says(r"^30\.0$"), id="EMACount-initial_value-numpy",
    ),
    pytest.param(
        lambda: (SSDMultiboxLoss(np.int64(C), neg_pos_ratio=np.float32(3.0)).neg_pos_ratio,
                 CenterLoss(np.int32(4), alpha=np.float64(0.5)).alpha,
                 SpikeMonitor(threshold=np.float32(5), half_window=np.int64(3)).config.half_window),
        Says(r"^\(3\.0, 0\.5, 3\)$"), id="numpy-scalars-accepted",
    ),
    pytest.param(
        lambda: EMACount(momentum=np.bool_(True)),
        Raises(ValueError, r"`momentum` must be a float in \[0, 1\); received momentum="),
        id="EMACount-momentum-bool",
    ),
    pytest.param(
        lambda: CenterLoss(10, loss_weight="0.01x"),
        Raises(ValueError, r"`loss_weight` must be a float >= 0; received loss_weight='0\.01x'"),
        id="CenterLoss-loss_weight-string",
    ),
    pytest.param(
        lambda: SpikeMonitor(threshold="5"),
        Raises(ValueError, r"`threshold` must be a number > 0; received threshold='5'"),
        id="SpikeMonitor-threshold-string",
    ),
    pytest.param(
        lambda: SpikeMonitor(log_dir=5),
        Raises(ValueError, r"`log_dir` must be a folder path \(a str or os\.PathLike\) or "
               r"None; received log_dir=5"),
        id="SpikeMonitor-log_dir-int",
    ),
    pytest.param(
        lambda: cli("diagnose", "mse", "--data", "batch.npz", "--repeats", "1,x"),
        Says(r"^exit 1: error: Argument `--repeats` must be two or more distinct integers "
             r">= 1, comma-separated \(e\.g\. 1,2,4\); received --repeats='1,x'"),
        id="cli-repeats-not-integers",
    ),
    # --- the crash: an empty batch is 0.0 with a zero gradient everywhere
    pytest.param(
        lambda: value_and_gradient(SSDMultiboxLoss(C), *EMPTY),
        Says(r"^0\.0 grad\(0, 5, 7\) sum 0\.0$"), id="SSD-empty-batch",
    ),
    pytest.param(
        lambda: value_and_gradient(SSDMultiboxLoss(C, mining="per_image", from_logits=True),
                                   *EMPTY),
        Says(r"^0\.0 grad\(0, 5, 7\) sum 0\.0$"), id="SSD-empty-batch-per-image-logits",
    ),
    # --- right, but most likely not meant: a warning (eager calls only)
    pytest.param(
        lambda: SSDMultiboxLoss(C, from_logits=True)(y_true4, y_pred4),
        Warns(UserWarning, r"from_logits=True, but every row .* nonnegative and sums "
              r"to 1: they look like probabilities"),
        id="SSD-from_logits-given-probabilities",
    ),
]


@pytest.mark.parametrize("make, expected", CASES)
def test_bad_input(make, expected):
    if isinstance(expected, Raises):
        with pytest.raises(expected.type, match=expected.pattern):
            make()
    elif isinstance(expected, Warns):
        with pytest.warns(expected.category, match=expected.pattern):
            make()
    else:
        result = str(make())
        assert re.search(expected.pattern, result, re.DOTALL), result


def test_logits_give_no_probability_warning():
    y_true, logits = ssd_batch(4, logits=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SSDMultiboxLoss(C, from_logits=True)(y_true, logits)
        SSDMultiboxLoss(C)(y_true4, y_pred4, sample_weight=np.ones((4, 1)))

