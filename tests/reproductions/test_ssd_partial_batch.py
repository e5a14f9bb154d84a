"""`reproductions/ssd_partial_batch.py --quick`: the spikes are there, the fix has none."""

import csv
import os
import subprocess
import sys

import keras

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "reproductions", "ssd_partial_batch.py")


def test_quick_reproduction(tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run(
        [sys.executable, SCRIPT, "--quick", "--backend", keras.backend.backend(),
         "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "checks passed" in result.stdout
    for name in ("steps.csv", "spikes.csv", "table.md", "ssd_partial_batch.png"):
        assert (tmp_path / name).stat().st_size > 0

    # Quick mode: 52 images in batches of 16, so the last batch has 4: B / b = 4.
    with open(tmp_path / "spikes.csv") as f:
        spikes = list(csv.DictReader(f))
    ratios = {}
    for row in spikes:
        ratios.setdefault(row["variant"], []).append(float(row["spike_ratio"]))
    assert len(ratios["a_bug"]) == 3  # one short batch per epoch
    assert all(2.8 < r < 5.5 for r in ratios["a_bug"]), ratios
    for variant in ("c_ssd_multibox", "f_torch"):
        assert all(0.6 < r < 1.5 for r in ratios[variant]), ratios

    # Per-step losses: the bug's short-batch loss, times its batch size, is the
    # batch's normalized loss, which (c) reports directly at the first short batch.
    with open(tmp_path / "steps.csv") as f:
        steps = list(csv.DictReader(f))
    first_short = {
        r["variant"]: r for r in steps if r["short"] == "True" and r["epoch"] == "0"
    }
    bug, fixed = first_short["a_bug"], first_short["c_ssd_multibox"]
    assert int(bug["batch_size"]) == 4
    assert abs(float(bug["reported"]) * 4 / float(fixed["reported"]) - 1) < 1e-3


def _rows(variant, losses, sizes, epoch_length):
    return [dict(variant=variant, step=t, epoch=t // epoch_length,
                 step_in_epoch=t % epoch_length, batch_size=b, short=b < max(sizes),
                 reported=loss, batch_loss=loss)
            for t, (loss, b) in enumerate(zip(losses, sizes))]


def test_statistics_on_a_constructed_run():
    """The statistics module on a run built by hand: every 4th batch holds 4
    images instead of 16 and reports 4x the loss (a loss divided by its batch
    size twice), on a slowly falling curve with 3% noise."""
    import numpy as np

    from reproductions.support import ssd_statistics

    rng = np.random.default_rng(0)
    n = 40
    sizes = [4 if t % 4 == 3 else 16 for t in range(n)]
    trend = np.exp(-np.arange(n) / 60.0) * np.exp(rng.normal(0.0, 0.03, n))
    bug = trend * np.where(np.array(sizes) == 4, 4.0, 1.0)
    steps = _rows("a_bug", bug, sizes, 4) + _rows("c_ssd_multibox", trend, sizes, 4)
    spikes, summary, gap = ssd_statistics.summarize(steps, {"a_bug": 0.48, "c_ssd_multibox": 0.03})
    a, c = summary["a_bug"], summary["c_ssd_multibox"]
    assert len(a["ratios"]) == 10 and len(spikes) == 20
    assert all(3.3 < r < 4.8 for r in a["ratios"]), a["ratios"]
    assert all(0.8 < r < 1.25 for r in c["ratios"]), c["ratios"]
    assert abs(a["beta"] + 1) < 0.1 and a["verdict"] == "inverse_batch_size"
    assert c["verdict"] == "invariant"
    assert set(a["flagged"]) == {"short_batch"} and len(a["flagged"]) == 10
    assert c["flagged"] == []
    # the final loss: the mean batch loss of the last epoch's full batches
    assert np.isclose(a["final_loss"], trend[-4:-1].mean())
    assert ssd_statistics.check(summary, {}, 4.0) == []
    assert gap == {}
