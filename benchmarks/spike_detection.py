"""How well `SpikeMonitor`'s detectors find spikes, on synthetic loss traces.

NumPy only (no Keras, no TensorFlow): each trace is a loss curve of
`epochs * steps_per_epoch` steps, each step the mean of its batch's
per-sample losses, `trend_t * Gamma(b / cv**2, cv**2 / b)` (mean `trend_t`,
coefficient of variation `cv / sqrt(b)`), where each epoch ends with a short
batch of `b_last = B / ratio` samples. Families of traces:

* `short`: the short batch is inflated by `B / b_last` (a loss divided by the
  batch size twice), for `ratio` in 1.25, 1.5, 2, 3, 4 and 8; every short
  batch is a labelled spike;
* `data`: the loss is batch-size invariant, and 4 full batches each hold one
  bad sample that lifts the batch's loss 2-5x: those are the labelled spikes;
* `clean`: batch-size invariant, nothing planted (the controls).

Each family is run on four curves: `falling` (exponential decay to a floor,
per-sample cv 1), `flat` (constant, cv 1), `plateau` (falls for a third of the
run, then flat, cv 1) and `noisy` (falling, cv 3); half of the traces have
learning-rate decays (the loss drops to 0.6x at 50% and 75% of the run).

Detectors (see `keras_batchfix.spikes.analysis`):

* `trailing (old)`: the previous monitor's rule, median and MAD of the 50
  steps before, threshold 6 (kept here for comparison);
* `local, batch size ignored`: the two-sided local baseline on the log-loss
  (`local_scores`), every step on the same scale;
* `local`: the same, with a short batch's scale widened by `sqrt(B / b)`
  (a mean of fewer samples is noisier), as `analyze` runs it;
* `exponent`: short batches flagged by a significant negative batch-size
  exponent (`batch_size_exponent`, `exponent_spikes`);
* `combined`: `analyze`, what `SpikeMonitor` reports (`local | exponent`).

Printed per detector: recall of the short-batch spikes of 2x or more per
curve (the targets: >= 95% on falling and on flat curves), recall per ratio
(all curves), recall of the data spikes, precision over all traces, and false
alarms per 1000 steps on the clean traces (the target: < 1); then whether the
defaults (`combined`) meet the targets (exit status 1 if not). Deterministic
given `--seeds` (NumPy's `default_rng`).

    python benchmarks/spike_detection.py            # 12 seeds
    python benchmarks/spike_detection.py --quick    # 2 seeds (CI)
"""

import argparse
import importlib.util
import os
import sys

import numpy as np


def _load_analysis():
    """`keras_batchfix.spikes.analysis` without importing the package (and Keras).

    `keras_batchfix/spikes/` is loaded as a stand-alone package of its own
    name, so that its modules' relative imports resolve without
    `keras_batchfix/__init__.py`.
    """
    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "keras_batchfix",
                          "spikes")
    spec = importlib.util.spec_from_file_location(
        "batchfix_spikes", os.path.join(folder, "__init__.py"),
        submodule_search_locations=[folder],
    )
    package = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = package
    spec.loader.exec_module(package)
    return importlib.import_module("batchfix_spikes.analysis")


analysis = _load_analysis()

BATCH = 64
RATIOS = (1.25, 1.5, 2.0, 3.0, 4.0, 8.0)
CURVES = {"falling": 1.0, "flat": 1.0, "plateau": 1.0, "noisy": 3.0}  # per-sample cv
LAYOUTS = ((7, 12), (20, 15), (50, 10))  # (steps per epoch, epochs)


def trend(curve, n):
    t = np.arange(n, dtype="float64")
    if curve == "flat":
        return np.ones(n)
    if curve == "plateau":
        t = np.minimum(t, n / 3)
        return 0.1 + 2.0 * np.exp(-t / (n / 12))
    return 0.1 + 2.0 * np.exp(-t / (n / 4))  # falling, noisy


def make_trace(rng, family, curve, layout, ratio, lr_decay):
    """(losses, batch sizes, learning rates, labels, label ratios) of one run."""
    steps_per_epoch, epochs = layout
    n = steps_per_epoch * epochs
    cv = CURVES[curve]
    sizes = np.full(n, BATCH, dtype="float64")
    last = max(1, round(BATCH / ratio))
    sizes[steps_per_epoch - 1 :: steps_per_epoch] = last
    level = trend(curve, n)
    rates = np.full(n, 0.1)
    if lr_decay:
        for at in (n // 2, (3 * n) // 4):
            level[at:] *= 0.6
            rates[at:] *= 0.1
    losses = level * rng.gamma(sizes / cv**2, cv**2 / sizes)
    labels = np.zeros(n, dtype=bool)
    label_ratio = np.zeros(n)
    if family == "short":
        short = sizes < BATCH
        losses[short] *= BATCH / sizes[short]
        labels[short] = True
        label_ratio[short] = ratio
    elif family == "data":
        full = np.nonzero(sizes == BATCH)[0]
        full = full[full >= analysis.DetectorConfig().half_window]
        where = rng.choice(full, size=4, replace=False)
        losses[where] *= rng.uniform(2.0, 5.0, size=4)
        labels[where] = True
    return losses, sizes, rates, labels, label_ratio


def trailing_spikes(losses, threshold=6.0, window=50, min_history=10, min_scale=1e-3):
    """The previous monitor's rule: median and MAD of the `window` steps before."""
    n = losses.size
    spikes = np.zeros(n, dtype=bool)
    for t in range(min_history, n):
        history = losses[max(0, t - window) : t]
        median = np.median(history)
        scale = max(1.4826 * np.median(np.abs(history - median)), min_scale * abs(median))
        spikes[t] = (losses[t] - median) / scale > threshold
    return spikes


DETECTORS = {
    "trailing (old)": lambda l, s, r: trailing_spikes(l),
    "local, batch size ignored": lambda l, s, r: analysis.local_scores(l).spikes,
    "local": lambda l, s, r: analysis.local_scores(l, batch_sizes=s).spikes,
    "exponent": lambda l, s, r: analysis.exponent_spikes(
        s, analysis.batch_size_exponent(l, s)
    ),
    "combined (default)": lambda l, s, r: analysis.analyze(l, s, r).spikes,
}


def run(seeds):
    """Counts per detector: {name: {metric: [hits, total]}}."""
    counts = {name: {} for name in DETECTORS}

    def add(name, key, hits, total):
        entry = counts[name].setdefault(key, [0, 0])
        entry[0] += int(hits)
        entry[1] += int(total)

    index = 0
    for seed in range(seeds):
        for family in ("short", "data", "clean"):
            ratios = RATIOS if family == "short" else (4.0,)
            for curve in CURVES:
                for layout in LAYOUTS:
                    for ratio in ratios:
                        rng = np.random.default_rng([seed, index])
                        index += 1
                        lr_decay = bool(index % 2)
                        losses, sizes, rates, labels, label_ratio = make_trace(
                            rng, family, curve, layout, ratio, lr_decay
                        )
                        for name, detect in DETECTORS.items():
                            found = detect(losses, sizes, rates)
                            hits = found & labels
                            add(name, "flagged", found.sum(), 0)
                            add(name, "true", hits.sum(), 0)
                            if family == "clean":
                                add(name, "clean", found.sum(), losses.size)
                            elif family == "data":
                                add(name, "data", hits.sum(), labels.sum())
                            else:
                                add(name, f"ratio {ratio:g}", hits.sum(), labels.sum())
                                if ratio >= 2:
                                    add(name, f">=2x {curve}", hits.sum(), labels.sum())
    return counts


def rate(entry):
    hits, total = entry
    return hits / total if total else float("nan")


def table(counts):
    """Markdown table, one row per detector."""
    header = (
        ["detector"] + [f"recall >=2x {curve}" for curve in CURVES]
        + [f"recall {r:g}x" for r in RATIOS]
        + ["recall data spikes", "precision", "false alarms / 1000 clean steps"]
    )
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, c in counts.items():
        flagged, true = c["flagged"][0], c["true"][0]
        cells = [name] + [f"{rate(c[f'>=2x {curve}']):.1%}" for curve in CURVES]
        cells += [f"{rate(c[f'ratio {r:g}']):.1%}" for r in RATIOS]
        cells += [
            f"{rate(c['data']):.1%}",
            f"{true / flagged:.1%}" if flagged else "n/a",
            f"{1000 * rate(c['clean']):.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=12)
    parser.add_argument("--quick", action="store_true", help="2 seeds (CI)")
    args = parser.parse_args()
    seeds = 2 if args.quick else args.seeds
    counts = run(seeds)
    clean_steps = counts["local"]["clean"][1]
    print(
        f"spike detection: {seeds} seeds, batch {BATCH}, layouts (steps per epoch, epochs) "
        f"{LAYOUTS}, {clean_steps} clean steps"
    )
    print(table(counts))
    default = counts["combined (default)"]
    targets = [
        (f"recall >=2x falling {rate(default['>=2x falling']):.1%} >= 95%",
         rate(default[">=2x falling"]) >= 0.95),
        (f"recall >=2x flat {rate(default['>=2x flat']):.1%} >= 95%",
         rate(default[">=2x flat"]) >= 0.95),
        (f"false alarms {1000 * rate(default['clean']):.2f} / 1000 clean steps < 1",
         1000 * rate(default["clean"]) < 1),
    ]
    for text, ok in targets:
        print(f"target {'met' if ok else 'NOT MET'}: {text}")
    sys.exit(0 if all(ok for _, ok in targets) else 1)


if __name__ == "__main__":
    main()
