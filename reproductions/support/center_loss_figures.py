"""The center-loss reproduction's figures, from `runs.csv` and the summary.

`plot_main`: the running train center loss of relu against prelu (and
l2norm) at one set-up, every seed thin and their mean thick, with the
learning-rate decays marked. `plot_mechanism`: the change over the last
phase (`end3`) of the center loss and its parts, per variant.
"""

import os

import numpy as np

from .center_loss_statistics import decay_epochs, read_runs


def plot_main(out, framework="torch", width=None, noise="0.2", aug="0"):
    """relu vs prelu (and l2norm) at one set-up: every seed thin, mean thick."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = read_runs(os.path.join(out, "runs.csv"))
    if width is None:
        widths = sorted({k[4] for k in runs if k[0] == framework}, key=int)
        width = widths[0] if widths else "32"
    chosen = {}
    for k, rows in runs.items():
        if k[0] == framework and k[2] == noise and k[3] == aug \
                and k[4] == width:
            chosen.setdefault(k[1], []).append((k[5], rows))
    if not chosen:
        return None
    panels = [
        ("rel_d2", "train center loss / its value at the LR x0.1 decay\n"
                   "(l2norm: center loss on unit features)"),
        ("train_center", "train center loss (running, as the seed logs)"),
        ("val_center", "validation center loss"),
        ("train_ce", "train cross-entropy (running, noisy labels)"),
        ("tr_raw_sq", "feature scale  mean ||x||^2  (train)"),
        ("tr_rel", "center loss / mean ||x||^2  (train)"),
        ("tr_within", "within-class scatter W  (train)"),
        ("tr_lag", "centers' lag G = 1/2 sum p_j ||m_j - c_j||^2"),
        ("tr_mean_sq", "share of ||x||^2 in the common mean"),
    ]
    colors = {"relu": "tab:red", "prelu": "tab:blue", "l2norm": "tab:green",
              "prelu_last": "tab:purple", "alpha_sched": "tab:orange",
              "no_bn_wd": "tab:brown"}
    shown = [v for v in ("relu", "prelu") if v in chosen] or list(chosen)
    fig, axes = plt.subplots(3, 3, figsize=(17, 13))
    any_rows = next(iter(chosen.values()))[0][1]
    epochs = len(any_rows)
    d1, d2 = decay_epochs(epochs)
    for ax, (q, title) in zip(axes.flat, panels):
        for v in (shown + [x for x in ("l2norm",) if x in chosen]
                  if q == "rel_d2" else shown):
            if q == "rel_d2":
                curves = np.array([[r["train_center"] / rows[d2 - 1][
                    "train_center"] for r in rows] for _, rows in chosen[v]])
            else:
                curves = np.array([[r[q] for r in rows]
                                   for _, rows in chosen[v]])
            ep = np.arange(1, curves.shape[1] + 1)
            for c in curves:
                ax.plot(ep, c, color=colors.get(v, "k"), lw=0.7, alpha=0.35)
            ax.plot(ep, curves.mean(0), color=colors.get(v, "k"), lw=2.2,
                    label=f"{v.upper() if v != 'l2norm' else v} "
                          f"(mean of {len(curves)} seeds)")
        for d, txt in ((d1, "LR x0.5"), (d2, "LR x0.1")):
            ax.axvline(d + 0.5, color="k", ls=":", lw=1)
            ax.text(d + 0.7, 0.97, txt, transform=ax.get_xaxis_transform(),
                    va="top", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        if q in ("train_center", "val_center", "tr_raw_sq", "tr_lag",
                 "tr_within"):
            ax.set_yscale("log")
            lo = min(np.nanmin([r[q] for _, rows in chosen[v]
                                for r in rows[3:]]) for v in shown)
            hi = max(np.nanmax([r[q] for _, rows in chosen[v]
                                for r in rows[3:]]) for v in shown)
            ax.set_ylim(lo / 1.2, hi * 1.2)  # the first epochs are far off
        if q == "rel_d2":
            ax.axhline(1.0, color="k", lw=0.8)
            ax.set_ylim(0.7, 1.5)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=9)
    fig.suptitle(
        f"Center loss around LR decays, ReLU vs PReLU ({framework}; "
        f"animal-mnist, 2,400 train images, label noise {noise}, "
        f"{'with' if aug == '1' else 'no'} augmentation;\nResNet-18 layout, "
        f"width {width} = {8 * int(width)}-d features; SGD lr 0.05, x0.5 "
        "after epoch 8, x0.1 after epoch 16; center loss lambda 0.01, "
        "alpha 0.5; thin lines: single seeds)", fontsize=12)
    fig.tight_layout()
    path = os.path.join(out, "center_loss_lr_decay.png")
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_mechanism(out, summary):
    """End-of-last-phase ratios per set-up: center loss, scale, L/S."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {}
    for s in summary:
        name = (f"{s['framework']} {s['variant']}\nnoise {s['noise']}"
                f"{' aug' if s['aug'] == '1' else ''} w{s['width']}")
        by.setdefault(name, {})[s["quantity"]] = s
    names = list(by)
    if not names:
        return None
    quantities = [("train_center", "center loss (running)"),
                  ("tr_raw_sq", "mean ||x||^2"),
                  ("tr_within", "within-class scatter W"),
                  ("tr_rel", "center loss / ||x||^2")]
    fig, ax = plt.subplots(figsize=(max(10, 1.3 * len(names)), 6))
    width = 0.8 / len(quantities)
    for i, (q, label) in enumerate(quantities):
        m = [by[n][q]["end3_mean"] if q in by[n] else np.nan for n in names]
        lo = [by[n][q]["end3_mean"] - by[n][q]["end3_min"] if q in by[n]
              else 0 for n in names]
        hi = [by[n][q]["end3_max"] - by[n][q]["end3_mean"] if q in by[n]
              else 0 for n in names]
        ax.bar(np.arange(len(names)) + (i - 1.5) * width, m, width,
               yerr=[lo, hi], capsize=2, label=label)
    ax.axhline(1.0, color="k", lw=1)
    ax.set_xticks(np.arange(len(names)))
    ax.set_xticklabels([f"{n}\n(n={by[n]['train_center']['n']})"
                        for n in names], fontsize=8)
    ax.set_ylabel("value at the last epoch / value at the 2nd LR decay\n"
                  "(bar: mean over seeds; whiskers: min..max)")
    ax.set_title("What changes over the last phase (after LR x0.1): "
                 "> 1 = rose, < 1 = fell  (l2norm: center loss on unit "
                 "features; its mean ||x||^2 is of the raw features)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = os.path.join(out, "mechanism.png")
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
