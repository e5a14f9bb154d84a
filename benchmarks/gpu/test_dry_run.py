"""`benchmarks/gpu/run.sh --dry-run`: every step runs at toy sizes and the bundle holds its outputs.

Outside `tests/` (the README's test command): `.ci/run` runs it on its own,
`python -m pytest -q benchmarks/gpu/test_dry_run.py`.
"""

import os
import shutil
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu", "run.sh")

EXPECTED = [
    "benchmarks/results/gpu/MANIFEST.md",
    "benchmarks/results/gpu/loss_speed.txt",
    "benchmarks/results/gpu/center_loss_speed_b32.txt",
    "benchmarks/results/gpu/center_loss_speed_b128.txt",
    "reproductions/results/gpu/MANIFEST.md",
    "reproductions/results/gpu/center_loss_lr_decay/runs.csv",
    "reproductions/results/gpu/center_loss_lr_decay/summary.csv",
    "reproductions/results/gpu/logs/center_loss_lr_decay_seed0.log",
] + [
    f"reproductions/results/gpu/ssd_partial_batch_{backend}/{name}"
    for backend in ("jax", "torch")
    for name in ("steps.csv", "spikes.csv", "table.md", "ssd_partial_batch.png")
]


def test_dry_run(tmp_path):
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    for module in ("jax", "torch", "matplotlib", "animal_mnist"):
        pytest.importorskip(module)
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
    env.pop("GPU_RUN_LOGGING", None)
    done = subprocess.run(
        ["bash", SCRIPT, "--dry-run"], env=env, cwd=ROOT,
        capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]

    assert (tmp_path / "run.log").stat().st_size > 0
    manifest = (tmp_path / "manifest.md").read_text()
    assert "dry run" in manifest and "failed steps: none" in manifest
    with tarfile.open(tmp_path / "gpu_results.tar.gz") as tar:
        members = {m.name: m for m in tar.getmembers()}
        for name in EXPECTED:
            assert name in members and members[name].size > 0, name
        if os.path.exists(os.path.join(ROOT, "benchmarks", "accumulation_speed.py")):
            assert "benchmarks/results/gpu/accumulation_speed.txt" in members
        table = tar.extractfile("benchmarks/results/gpu/loss_speed.txt").read().decode()
    assert " 128 jax jit " in table and " 128 torch eager " in table
    assert len(os.listdir(tmp_path)) <= 8  # the device returns at most 8 files
