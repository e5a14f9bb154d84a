"""The SSD reproduction's two figures, from the per-step rows of `ssd.step_rows`.

`spikes_figure`: the loss each optimizer minimized (top) and the same SSD
loss for every run (bottom). `agreement_figure`: the per-step gap between
Keras and PyTorch against a band of what rounding alone gives.
"""

import os

import numpy as np

from .ssd_statistics import by_variant

COLORS = dict(a_bug="tab:red", b_compensate="navy", c_ssd_multibox="limegreen",
              d_drop_short="tab:gray", e_bug_clipnorm="tab:orange", f_torch="tab:purple",
              g_torch_jitter="tab:brown")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _style(variant):
    """(c) wide and pale under a thin dashed (b): identical numbers, both seen."""
    if variant == "c_ssd_multibox":
        return dict(lw=3.2, alpha=0.45, zorder=2)
    if variant == "b_compensate":
        return dict(lw=0.9, ls=(0, (4, 2)), zorder=4)
    if variant == "f_torch":
        return dict(lw=1.0, ls=":", zorder=3)
    return dict(lw=1.0, zorder=3)


def spikes_figure(steps, labels, learning_rates, base_lr, summary, args, footer, path):
    plt = _pyplot()
    runs = by_variant(steps)
    scale = int(round(max(learning_rates.values()) / base_lr))
    short = args.num_images % args.batch_size
    fig, axes = plt.subplots(2, 1, figsize=(11, 9.5), sharex=True)
    for ax in axes:
        for e in range(1, args.epochs):
            ax.axvline(e, color="k", lw=0.4, alpha=0.15, zorder=0)
    handles = []
    for variant, rows in runs.items():
        if variant == "g_torch_jitter":
            continue  # a control of the second figure
        x = np.array([r["position"] for r in rows])
        is_short = np.array([r["short"] for r in rows], bool)
        kw = dict(color=COLORS[variant], **_style(variant))
        # What the optimizer follows: its loss times its learning rate, in
        # units of the fixes' rate (the buggy runs use `scale` times it).
        followed = np.array([r["reported"] for r in rows]) * learning_rates[variant] / base_lr
        (line,) = axes[0].plot(x, followed, label=labels[variant], **kw)
        axes[0].plot(x[is_short], followed[is_short], "o", color=COLORS[variant], ms=3.5,
                     zorder=kw["zorder"])
        axes[1].plot(x, [r["batch_loss"] for r in rows], **kw)
        handles.append(line)
    axes[0].set_yscale("log")
    axes[0].set_ylabel(f"loss x its learning rate / {base_lr:g}")
    axes[0].set_title(
        f"What each optimizer minimizes, scaled to the fixes' learning rate: loss x lr / {base_lr:g}.\n"
        f"(a), (d), (e) divide by the batch size twice, so their loss is {scale}x smaller on a full "
        f"batch. They run at {scale}x the learning rate,\nwhich makes their full-batch steps the "
        f"fixes' steps. What remains is the bug: the short batch of {short} (dots) counts "
        f"{args.batch_size / short:g}x.", fontsize=9.5, loc="left")
    axes[1].set_yscale("log")
    axes[1].set_ylabel("SSD loss of the batch\nsum / max(1, N_pos)")
    fix = summary.get("c_ssd_multibox", {}).get("final_loss")
    clip = summary.get("e_bug_clipnorm", {}).get("final_loss")
    clip_note = ""
    if fix is not None and clip is not None:
        clip_note = (f"\n(e) Clipping stops this run's collapse, but not the bug: its short batch "
                     f"still counts {args.batch_size / short:g}x (top),\nand it ends at {clip:.2f} "
                     f"against {fix:.2f} for the fixes (mean over the last epoch).")
    axes[1].set_title("Effect on training: the same SSD loss for every run; (b) and (c) coincide "
                      "(identical numbers)." + clip_note, fontsize=9.5, loc="left")
    axes[1].set_xlabel("epoch")
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8.5, frameon=False,
               bbox_to_anchor=(0.5, 0.035))
    fig.text(0.99, 0.005, footer, ha="right", va="bottom", fontsize=7.5, color="0.35")
    fig.tight_layout(rect=(0, 0.09, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _rolling_band(values, half, low=10, high=90):
    """Percentiles of the positive `values` within `half` steps of each step."""
    v = np.where(values > 0, values, np.nan)
    lo, hi = np.full(v.shape, np.nan), np.full(v.shape, np.nan)
    for t in range(v.size):
        window = v[max(0, t - half): t + half + 1]
        if np.isfinite(window).any():
            lo[t], hi[t] = np.nanpercentile(window, [low, high])
    return lo, hi


def agreement_figure(steps, gap, footer, path, title):
    plt = _pyplot()
    x_all = np.array([r["position"] for r in by_variant(steps)["f_torch"]])
    fig, ax = plt.subplots(figsize=(11, 4.6))
    if "torch_torch" in gap:
        rel = np.asarray(gap["torch_torch"]["rel"], float)
        lo, hi = _rolling_band(rel, 8)
        ax.fill_between(x_all[: rel.size], lo, hi, color="tab:brown", alpha=0.3, lw=0,
                        label="rounding control: PyTorch (f) against PyTorch from weights x (1 + 1e-7 "
                              "noise) (g); 10th-90th percentile over 17 steps")
    rel = np.asarray(gap["keras_torch"]["rel"], float)
    shown = np.where(rel > 0, rel, np.nan)  # equal in float32: a gap in the line
    ax.semilogy(x_all[: rel.size], shown, color="k", lw=0.8, marker=".", ms=2.5,
                label="Keras SSDMultiboxLoss (c) against PyTorch (f), per step")
    ax.set_ylabel("relative gap of the batch loss")
    ax.set_xlabel("epoch (steps where both losses are equal in float32 are left out)")
    ax.set_title(title, fontsize=10, loc="left")
    fig.legend(loc="lower left", fontsize=8, ncol=2, frameon=False, bbox_to_anchor=(0.05, 0.03))
    fig.text(0.99, 0.005, footer, ha="right", va="bottom", fontsize=7.5, color="0.35")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def agreement_title(gap):
    """The figure's conclusion, as the data gives it."""
    k, t = gap["keras_torch"], gap.get("torch_torch")
    if t is None:
        return "Keras against PyTorch: same weights, batches and SGD"
    if k["median"] <= 2 * t["median"]:
        until = lambda g: "the end" if g["first_above"] is None else f"step {g['first_above']}"
        return (f"Keras tracks PyTorch as closely as PyTorch tracks itself: they agree to 1e-3 "
                f"until {until(k)} (the control: {until(t)}),\nthen drift apart as far as a 1e-7 "
                f"perturbation of the weights does (median gap {k['median']:.1e}; control "
                f"{t['median']:.1e})")
    return (f"Keras drifts from PyTorch more than rounding explains: median gap "
            f"{k['median']:.1e}, rounding control {t['median']:.1e}")


def write_csvs(out, steps, spikes):
    keys = ["variant", "step", "epoch", "step_in_epoch", "position", "batch_size", "short",
            "n_pos", "reported", "batch_loss"]
    with open(os.path.join(out, "steps.csv"), "w") as f:
        f.write(",".join(keys) + "\n")
        for r in steps:
            f.write(",".join(f"{r[k]:.9g}" if isinstance(r[k], float) else str(r[k])
                             for k in keys) + "\n")
    with open(os.path.join(out, "spikes.csv"), "w") as f:
        f.write("variant,epoch,step,spike_ratio,disturbance\n")
        for s in spikes:
            f.write(f"{s['variant']},{s['epoch']},{s['step']},{s['spike_ratio']:.4f},"
                    f"{s['disturbance']:.4f}\n")
