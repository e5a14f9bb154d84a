"""`reproductions/gradient_accumulation.py --quick`: `micro_batches` is one pass, Keras's accumulation is not.

Runs the script on the current backend (3 epochs of the token model, 12
updates) and checks its table: the package's run ends within 1e-5 of one
pass over batches of 32 (relative to how far that run's weights moved),
Keras's `gradient_accumulation_steps` more than 1e-3 away, with the
schedule as written and with its boundary counted in micro-steps.
"""

import csv
import os
import subprocess
import sys

import keras

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "reproductions", "gradient_accumulation.py")


def test_quick_reproduction(tmp_path):
    result = subprocess.run(
        [sys.executable, SCRIPT, "--quick", "--backend", keras.backend.backend(),
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for name in ("updates.csv", "table.csv", "table.md", "gradient_accumulation.png"):
        assert (tmp_path / name).stat().st_size > 0, name

    with open(tmp_path / "table.csv") as handle:
        (row,) = list(csv.DictReader(handle))
    assert row["backend"] == keras.backend.backend()
    assert int(row["updates"]) == 12
    assert float(row["moved"]) > 0.1  # the reference run trained
    assert float(row["gap c"]) < 1e-5, row  # micro_batches=4: one pass
    assert float(row["gap b"]) > 1e-3, row  # Keras's accumulation
    assert float(row["gap b'"]) > 1e-3, row  # ... with the schedule in micro-steps
    assert abs(float(row["loss c"]) / float(row["loss a"]) - 1) < 1e-5

    with open(tmp_path / "updates.csv") as handle:
        updates = list(csv.DictReader(handle))
    rates = {}
    for update in updates:
        rates.setdefault(update["run"], []).append(float(update["learning_rate"]))
    assert len(rates["c"]) == 12 and rates["c"] == rates["a"] == rates["b'"]
    assert rates["a"].count(0.5) == 6  # the decay after update 6 ...
    assert rates["b"].count(0.5) == 1  # ... comes after update 1 under Keras's counter
