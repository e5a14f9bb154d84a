"""The seed-003 reproduction (center loss vs. LR decay) runs and logs sane numbers.

Runs reproductions/center_loss_lr_decay.py in `--quick` mode (6 epochs, LR
decays after epochs 2 and 4): PyTorch (seed semantics) for the baseline and
the scheduled-alpha variant, Keras (keras_batchfix.CenterLoss) for the
baseline, and checks the logged schedule, the diagnostics' internal
consistency, that the centers actually move and track the class means in both
frameworks, and that PyTorch and Keras agree on the scale of the center loss.
"""

import csv
import importlib.util
import math
import os

import numpy as np
import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SCRIPT = os.path.join(_ROOT, "reproductions", "center_loss_lr_decay.py")


def _load():
    spec = importlib.util.spec_from_file_location("center_loss_lr_decay",
                                                  _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("matplotlib")
    mod = _load()
    out = str(tmp_path_factory.mktemp("center_loss_lr_decay"))
    rows = {}
    rows.update(mod.main(["--quick", "--backend", "torch",
                          "--variants", "relu,alpha_sched", "--out", out]))
    torch_csv = open(os.path.join(out, "center_loss_lr_decay.csv")).read()
    out_k = os.path.join(out, "keras")
    rows.update(mod.main(["--quick", "--backend", "keras",
                          "--variants", "relu", "--out", out_k]))
    return mod, rows, out, out_k, torch_csv


def test_outputs_written(quick_run):
    mod, rows, out, out_k, torch_csv = quick_run
    for d in (out, out_k):
        for name in ("center_loss_lr_decay.csv", "peaks.csv",
                     "center_loss_lr_decay.png"):
            assert os.path.getsize(os.path.join(d, name)) > 0
    with open(os.path.join(out_k, "center_loss_lr_decay.csv")) as fh:
        keras_rows = list(csv.DictReader(fh))
    assert [r["epoch"] for r in keras_rows] == [str(e) for e in range(1, 7)]
    assert set(keras_rows[0]) == set(mod.COLUMNS)
    assert torch_csv.count("\ntorch,relu,") == 6
    assert torch_csv.count("\ntorch,alpha_sched,") == 6


def test_schedule_logged(quick_run):
    _, rows, *_ = quick_run
    lrs = [0.05, 0.05, 0.025, 0.025, 0.005, 0.005]
    for key, rs in rows.items():
        assert np.allclose([r["lr"] for r in rs], lrs), key
    # the center step follows the LR only in the alpha_sched variant
    assert np.allclose([r["alpha"] for r in rows[("torch", "relu")]], 0.5)
    assert np.allclose([r["alpha"] for r in rows[("torch", "alpha_sched")]],
                       [10 * x for x in lrs])


def test_diagnostics_consistent(quick_run):
    _, rows, *_ = quick_run
    for key, rs in rows.items():
        for r in rs:
            for name in ("train_ce", "train_center", "val_center", "val_ce",
                         "eval_train_feat_norm", "center_norm"):
                assert math.isfinite(r[name]) and r[name] >= 0, (key, name)
            # rel_center = center / mean ||x||^2 and mean ||x||^2 >= (mean ||x||)^2
            mean_sq = r["val_center"] / r["val_rel_center"]
            assert mean_sq >= r["val_feat_norm"] ** 2 * (1 - 1e-6), key
            assert 0.0 <= r["eval_train_dead"] <= 1.0


def test_training_and_centers_work(quick_run):
    """Both frameworks learn the digits, and the centers follow the features:
    the class means end up much closer to their centers than the centers'
    initial random distance, and the center loss falls."""
    _, rows, *_ = quick_run
    for key in (("torch", "relu"), ("keras", "relu")):
        rs = rows[key]
        assert rs[-1]["val_acc"] > 0.9, key
        assert rs[-1]["train_center"] < 0.7 * rs[0]["train_center"], key
        # centers start N(0, 2/8) per coordinate: ||c|| ~ 0.5 sqrt(D) = 4
        # away from any class mean; after training they sit near the means.
        assert rs[-1]["eval_train_mean_to_center"] < 0.35 * rs[-1][
            "eval_train_feat_norm"], key


def test_frameworks_agree(quick_run):
    """PyTorch with the seed's CenterLoss and Keras with
    keras_batchfix.CenterLoss give the same scale of center loss, feature
    norm and cross-entropy (different random inits, so loosely)."""
    _, rows, *_ = quick_run
    t, k = rows[("torch", "relu")], rows[("keras", "relu")]
    for name, tol in (("train_center", 0.5), ("eval_train_feat_norm", 0.3),
                      ("val_center", 0.6)):
        a = np.mean([r[name] for r in t[-2:]])
        b = np.mean([r[name] for r in k[-2:]])
        assert abs(a - b) <= tol * max(a, b), (name, a, b)
