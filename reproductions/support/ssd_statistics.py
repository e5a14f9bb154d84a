"""The SSD reproduction's statistics, from the per-step rows of `ssd.step_rows`.

Spikes are found by the package's own analysis
(`keras_batchfix.spikes.analysis.analyze`, what `SpikeMonitor` runs after
`fit`) on the loss each run's optimizer minimized:

* spike ratio of a short batch: `exp(residual_t)`, the step's loss over its
  local baseline (the geometric mean of the medians of the loss over the 5
  steps on each side);
* the run's batch-size exponent `beta` (`loss ~ B ** beta`: -1 for a loss
  divided by the batch size twice, 0 for a fixed one), with its 95% interval;
* the steps the analysis flags, and the causes it names.

Two statistics of this reproduction's own:

* disturbance after a short batch: over the `AFTER` steps that follow it,
  the largest batch loss relative to run (d) on the same images (the same
  batches without the short one), divided by that relative loss at the step
  just before, minus 1;
* the gap between two runs: `|loss_1 - loss_2| / |loss_2|` per step.
"""

import math

import numpy as np

from keras_batchfix.spikes.analysis import analyze

AFTER = 5  # steps after a short batch searched for a disturbance
Z95 = 1.959964
GAPS = {  # name: (run, reference run)
    "keras_torch": ("c_ssd_multibox", "f_torch"),
    "torch_torch": ("g_torch_jitter", "f_torch"),
}


def by_variant(steps):
    """The rows of `steps` grouped by run, in order."""
    runs = {}
    for row in steps:
        runs.setdefault(row["variant"], []).append(row)
    return runs


def spike_analysis(rows, learning_rate):
    """`analyze` on a run's optimized loss; its short-batch ratios and exponent."""
    losses = np.array([r["reported"] for r in rows], dtype="float64")
    sizes = np.array([r["batch_size"] for r in rows], dtype="float64")
    report = analyze(losses, sizes, np.full(losses.shape, learning_rate))
    short = np.array([r["short"] for r in rows], dtype=bool)
    ratios = np.exp(report.scores.residual[short])
    flagged = [report.causes[t] for t in np.flatnonzero(report.spikes)]
    return dict(report=report, ratios=ratios.tolist(), flagged=flagged,
                beta=report.exponent.value, beta_ci=Z95 * report.exponent.stderr,
                verdict=report.exponent.verdict)


def disturbances(rows, reference):
    """The disturbance after each short batch of `rows` (NaN where undefined)."""
    rel = lambda i: rows[i]["batch_loss"] / reference[(rows[i]["epoch"], rows[i]["step_in_epoch"])]
    out = []
    for t, row in enumerate(rows):
        if not row["short"]:
            continue
        following = [i for i in range(t + 1, min(len(rows), t + 1 + AFTER)) if not rows[i]["short"]]
        if reference and following and t > 0 and not rows[t - 1]["short"]:
            out.append(max(rel(i) for i in following) / rel(t - 1) - 1.0)
        else:
            out.append(float("nan"))
    return out


def summarize(steps, learning_rates):
    """Per-spike rows, a summary per run, and the gaps of `GAPS`."""
    runs = by_variant(steps)
    reference = {(r["epoch"], r["step_in_epoch"]): r["batch_loss"]
                 for r in runs.get("d_drop_short", [])}
    spikes, summary = [], {}
    for variant, rows in runs.items():
        s = spike_analysis(rows, learning_rates[variant])
        s["disturbances"] = disturbances(rows, reference)
        short = [r for r in rows if r["short"]]
        for r, ratio, dist in zip(short, s["ratios"], s["disturbances"]):
            spikes.append(dict(variant=variant, epoch=r["epoch"], step=r["step"],
                               spike_ratio=ratio, disturbance=dist))
        last = rows[-1]["epoch"]
        s["final_loss"] = float(np.mean([r["batch_loss"] for r in rows
                                         if r["epoch"] == last and not r["short"]]))
        summary[variant] = s
    gap = {}
    for name, (one, other) in GAPS.items():
        if one not in runs or other not in runs:
            continue
        a = np.array([r["batch_loss"] for r in runs[one]])
        b = np.array([r["batch_loss"] for r in runs[other]])
        n = min(len(a), len(b))
        rel = np.abs(a[:n] - b[:n]) / np.abs(b[:n])
        above = np.flatnonzero(rel > 1e-3)
        gap[name] = dict(rel=rel, first=float(rel[0]), median=float(np.median(rel)),
                         max=float(rel.max()), argmax=int(rel.argmax()),
                         first_above=int(above[0]) if len(above) else None,
                         final=abs(summary[one]["final_loss"] / summary[other]["final_loss"] - 1))
    return spikes, summary, gap


def _spread(values):
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return "—"
    return f"{min(values):.2f} / {np.median(values):.2f} / {max(values):.2f}"


def format_table(summary, gap, labels, learning_rates, clipnorm, header):
    """The Markdown table the script prints and writes to `table.md`."""
    lines = [
        header, "",
        "| variant | lr | batch-size exponent (95% CI) | steps flagged by `analyze` (cause) "
        "| spike ratio at the short batches: min / median / max "
        "| disturbance after a short batch: median / largest | final loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for variant, label in labels.items():
        if variant not in summary:
            continue
        s = summary[variant]
        causes = {}
        for cause in s["flagged"]:
            causes[cause] = causes.get(cause, 0) + 1
        flagged = ", ".join(f"{n} ({c})" for c, n in sorted(causes.items())) or "0"
        beta = (f"{s['beta']:+.2f} ± {s['beta_ci']:.2f} ({s['verdict']})"
                if math.isfinite(s["beta"]) else "— (one batch size)")
        d = [x for x in s["disturbances"] if math.isfinite(x)]
        dist = f"{100 * np.median(d):+.0f}% / {100 * max(d):+.0f}%" if d else "—"
        lr = f"{learning_rates[variant]:.3g}" + (
            f", clipnorm {clipnorm:.3g}" if variant == "e_bug_clipnorm" else "")
        lines.append(f"| {label} | {lr} | {beta} | {flagged} | {_spread(s['ratios'])} "
                     f"| {dist} | {s['final_loss']:.3f} |")
    lines += [
        "",
        "Exponent, flagged steps and spike ratio: `keras_batchfix.spikes.analysis.analyze` on the "
        "loss each run minimized (spike ratio = the loss of a short batch over its local baseline). "
        f"Disturbance: over the {AFTER} steps after a short batch, the largest batch loss relative "
        "to (d) on the same images, over that relative loss just before the short batch, minus 1. "
        "Final loss: the batch loss (CE + SmoothL1) / max(1, N_pos), averaged over the last "
        "epoch's full batches.",
    ]
    for name, label in (("keras_torch", "Keras (c) against PyTorch (f)"),
                        ("torch_torch", "Control: PyTorch (g) against PyTorch (f)")):
        if name in gap:
            g = gap[name]
            above = "never" if g["first_above"] is None else f"from step {g['first_above']}"
            lines += ["", f"{label}, batch loss per step: relative gap {g['first']:.1e} at "
                      f"step 0, above 1e-3 {above}, median {g['median']:.1e}, largest "
                      f"{g['max']:.1e} (step {g['argmax']}); final losses differ by "
                      f"{100 * g['final']:.2f}%."]
    return "\n".join(lines)


def check(summary, gap, expected):
    """The quick mode's checks: the bug spikes by about B / b_last, the fixes do not.

    Returns the failures (an empty list when all hold).
    """
    failures = []
    bug, fixed = summary["a_bug"], summary["c_ssd_multibox"]
    # Until the first short batch (a) and (c) take the same steps (lr x B on
    # a loss B times smaller), so there the ratio of their spike ratios is
    # B / b_last up to the steps after it.
    first = bug["ratios"][0] / fixed["ratios"][0]
    if abs(first / expected - 1) > 0.05:
        failures.append(f"first short batch: spike(a) / spike(c) = {first:.3f}, expected {expected:.2f}")
    for r in bug["ratios"]:
        if not 0.6 * expected <= r <= 1.6 * expected:
            failures.append(f"(a) spike ratio {r:.2f} not near B / b_last = {expected:.2f}")
    for name, variant in (("(c)", "c_ssd_multibox"), ("(f)", "f_torch")):
        for r in summary.get(variant, {}).get("ratios", []):
            if not 0.5 <= r <= 1.6:
                failures.append(f"{name} spike ratio {r:.2f} not near 1")
    if "keras_torch" in gap and gap["keras_torch"]["first"] > 1e-5:
        failures.append(f"Keras and PyTorch differ by {gap['keras_torch']['first']:.1e} at step 0")
    return failures
