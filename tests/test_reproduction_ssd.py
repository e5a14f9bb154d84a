"""`reproductions/ssd_partial_batch.py --quick`: the spikes are there, the fix has none."""

import csv
import os
import subprocess
import sys

import keras

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
