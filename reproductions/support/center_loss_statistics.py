"""The center-loss reproduction's statistics: per-run ratios and the summary.

`center_loss_lr_decay.py` trains the runs and appends them to `runs.csv`
(one row per run and epoch); `analyze` computes, for every run and logged
quantity, the rise after each learning-rate decay against the same
statistic at control epochs without a decay (`ratios`), writes them to
`ratios.csv`, and their mean, sd, min and max over seeds to `summary.csv`.
NumPy only: the tests import it without torch.
"""

import csv
import os

import numpy as np

VARIANTS = ("relu", "prelu", "prelu_last", "alpha_sched", "no_bn_wd", "l2norm")
KEY = ("framework", "variant", "noise", "aug", "width", "seed")
EPOCH_COLUMNS = [
    "epoch", "lr", "alpha", "train_ce", "train_center", "train_sq",
    "val_ce", "val_acc", "val_center", "tr_acc", "tr_center", "tr_within",
    "tr_lag", "tr_sq", "tr_raw_sq", "tr_rel", "tr_within_rel", "tr_mean_sq",
    "tr_feat_norm", "tr_dead", "val_within", "val_lag", "val_raw_sq",
    "val_rel", "center_norm", "train_relative", "sec"]
RATIO_KEYS = ("train_center", "val_center", "tr_center", "tr_within",
              "tr_lag", "tr_raw_sq", "tr_rel", "tr_within_rel", "tr_mean_sq",
              "tr_dead", "train_ce")
RISE = 1.10  # a "rise": peak after the 2nd decay >= +10% and above controls


def decay_epochs(epochs):
    """Epochs completed before each decay: 1/3 and 2/3 of the run."""
    return int(round(epochs / 3)), int(round(2 * epochs / 3))


def ratios(values, epochs):
    """After/at ratios of a per-epoch series (index 0 = epoch 1).

    With the decays after epochs d1, d2 (1/3, 2/3 of the run), phase length
    P = d1 and window h = P // 2:

        decay_k   = max(v[d_k + 1 .. d_k + h]) / v[d_k]   (peak after decay k)
        control_k = max(v[c_k + 1 .. c_k + h]) / v[c_k],  c_k = d_k - h
                    (the same statistic at an epoch without a decay, whose
                    window ends just before decay k)
        end3      = v[last epoch] / v[d2]   (change over the last phase)
        step_k    = v[d_k + 1] / v[d_k]     (first epoch after decay k)
    """
    v = np.asarray(values, np.float64)
    d1, d2 = decay_epochs(epochs)
    h = max(1, d1 // 2)

    def peak(at):
        return float(v[at:at + h].max() / v[at - 1])

    with np.errstate(divide="ignore", invalid="ignore"):  # 0/0 for dead
        return _ratios(v, d1, d2, h, peak)


def _ratios(v, d1, d2, h, peak):
    return {"decay1": peak(d1), "decay2": peak(d2), "control1": peak(d1 - h),
            "control2": peak(d2 - h), "end3": float(v[-1] / v[d2 - 1]),
            "step1": float(v[d1] / v[d1 - 1]), "step2": float(v[d2] / v[d2 - 1])}


def is_rise(r):
    return r["decay2"] >= RISE and r["decay2"] > max(r["control1"],
                                                     r["control2"])


def read_runs(path):
    if not os.path.exists(path):
        return {}
    runs = {}
    with open(path) as fh:
        for row in csv.DictReader(fh):
            key = tuple(row[k] for k in KEY)
            runs.setdefault(key, []).append(
                {k: float(x) for k, x in row.items() if k not in KEY})
    return runs


def write_runs(path, runs):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(list(KEY) + EPOCH_COLUMNS)
        for key in sorted(runs, key=_sort_key):
            for r in runs[key]:
                w.writerow(list(key) + [f"{r.get(c, float('nan')):.6g}"
                                        for c in EPOCH_COLUMNS])


def _sort_key(key):
    fw, variant, noise, aug, width, seed = key
    order = VARIANTS.index(variant) if variant in VARIANTS else 99
    return (fw != "torch", int(width), float(noise), int(aug), order,
            int(seed))


def run_key(fw, variant, noise, aug, width, seed):
    return (fw, variant, f"{float(noise):g}", str(int(aug)), str(int(width)),
            str(int(seed)))


def analyze(out, log=print):
    """ratios.csv and summary.csv from runs.csv; returns the summary rows."""
    runs = read_runs(os.path.join(out, "runs.csv"))
    per_run = []
    for key in sorted(runs, key=_sort_key):
        rows = runs[key]
        epochs = len(rows)
        for q in RATIO_KEYS:
            r = ratios([row[q] for row in rows], epochs)
            per_run.append(dict(zip(KEY, key), quantity=q, **r,
                                rise=int(is_rise(r))))
    with open(os.path.join(out, "ratios.csv"), "w", newline="") as fh:
        cols = list(KEY) + ["quantity", "decay1", "decay2", "control1",
                            "control2", "end3", "step1", "step2", "rise"]
        w = csv.DictWriter(fh, cols)
        w.writeheader()
        for r in per_run:
            w.writerow({k: (f"{x:.4f}" if isinstance(x, float) else x)
                        for k, x in r.items()})
    groups = {}
    for r in per_run:
        groups.setdefault(tuple(r[k] for k in KEY[:-1]) + (r["quantity"],),
                          []).append(r)
    summary = []
    for g, rs in groups.items():
        s = dict(zip(KEY[:-1] + ("quantity",), g), n=len(rs),
                 rises=sum(r["rise"] for r in rs),
                 seeds=" ".join(r["seed"] for r in rs))
        for stat in ("decay1", "decay2", "control1", "control2", "end3",
                     "step1", "step2"):
            x = np.array([r[stat] for r in rs])
            s[stat + "_mean"] = float(x.mean())
            s[stat + "_sd"] = float(x.std(ddof=1)) if len(x) > 1 else 0.0
            s[stat + "_min"], s[stat + "_max"] = float(x.min()), float(x.max())
        summary.append(s)
    with open(os.path.join(out, "summary.csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, list(summary[0]))
        w.writeheader()
        for s in summary:
            w.writerow({k: (f"{x:.4f}" if isinstance(x, float) else x)
                        for k, x in s.items()})
    log("\nrunning train center loss, ratios (mean +- sd over seeds); "
        f"rise = peak after decay 2 >= {RISE:.2f} and above both controls")
    log(f"{'framework variant noise aug width':38s} n  rises  decay1       "
        "decay2       control1     control2     end3")
    for s in summary:
        if s["quantity"] != "train_center":
            continue
        name = (f"{s['framework']} {s['variant']} {s['noise']} {s['aug']} "
                f"{s['width']}")
        log(f"{name:38s} {s['n']}  {s['rises']}/{s['n']}   " + "  ".join(
            f"{s[k + '_mean']:.3f}+-{s[k + '_sd']:.3f}"
            for k in ("decay1", "decay2", "control1", "control2", "end3")))
    return summary
