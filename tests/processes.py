"""Starts test processes on 127.0.0.1, waits for them within a bound, reads results.

Used by tests/test_torch_ddp.py and tests/test_jax_multi_process.py: each
process prints one line `RESULT <json of name -> list of weights>`.
"""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_loopback_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_all(module, runs, env, timeout_s):
    """Runs `python -m module *args` for each `(args, log_path)` of `runs`.

    Fails at the first process that exits with an error or at the deadline;
    kills whatever still runs when it returns.
    """
    env = dict(os.environ, PYTHONPATH=ROOT, **env)
    processes = []
    deadline = time.monotonic() + timeout_s
    try:
        for args, log_path in runs:
            with open(log_path, "w") as log:
                processes.append(subprocess.Popen(
                    [sys.executable, "-m", module, *args],
                    cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                ))
        while True:
            codes = [p.poll() for p in processes]
            for code, (_, log_path) in zip(codes, runs):
                if code not in (None, 0):
                    pytest.fail(f"{log_path.name} failed:\n{log_path.read_text()[-3000:]}")
            if None not in codes:
                return
            if time.monotonic() > deadline:
                pytest.fail(f"{module} processes timed out after {timeout_s} s")
            time.sleep(0.2)
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
            p.wait()


def printed_weights(log_path):
    """The weights a process printed, as name -> list of arrays."""
    lines = [
        line for line in log_path.read_text().splitlines()
        if line.startswith("RESULT ")
    ]
    assert lines, log_path.read_text()[-3000:]
    return {
        name: [np.asarray(w) for w in ws]
        for name, ws in json.loads(lines[0][len("RESULT "):]).items()
    }


def printed_line(module, prefix, timeout_s):
    """Runs `python -m module` to its end; the text after `prefix` on its first such line."""
    out = subprocess.run(
        [sys.executable, "-m", module], cwd=ROOT, capture_output=True,
        text=True, timeout=timeout_s, env=dict(os.environ, PYTHONPATH=ROOT),
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith(prefix)]
    assert lines, out.stderr[-3000:]
    return lines[0][len(prefix):]
