"""Starts test processes on 127.0.0.1, waits for them within a bound, reads results.

The one launcher of the tests that start processes (multi-worker
TensorFlow, torch DDP, multi-process JAX): each process prints one line
`RESULT <json of name -> list of weights>`.
"""

import contextlib
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_loopback_ports(count):
    """`count` distinct free TCP ports on 127.0.0.1."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_loopback_port():
    return free_loopback_ports(1)[0]


@contextlib.contextmanager
def started(module, runs, env, timeout_s):
    """Starts `python -m module *args` for each run; yields `wait`; kills at exit.

    A run is `(args, log_path)` or `(args, log_path, env of its own)`.
    `wait()` returns when every process exited with 0, and fails at the first
    error or at `timeout_s` after the start (a process whose peer died would
    otherwise wait for it until then).
    """
    processes = []
    deadline = time.monotonic() + timeout_s

    def wait():
        while True:
            codes = [p.poll() for p in processes]
            for code, run in zip(codes, runs):
                if code not in (None, 0):
                    pytest.fail(f"{run[1].name} failed:\n{run[1].read_text()[-3000:]}")
            if None not in codes:
                return
            if time.monotonic() > deadline:
                logs = "\n".join(run[1].read_text()[-1500:] for run in runs)
                pytest.fail(f"{module} processes timed out after {timeout_s} s:\n{logs}")
            time.sleep(0.2)

    try:
        for args, log_path, *own in runs:
            process_env = dict(os.environ, PYTHONPATH=ROOT, **env, **(own[0] if own else {}))
            with open(log_path, "w") as log:
                processes.append(subprocess.Popen(
                    [sys.executable, "-m", module, *args],
                    cwd=ROOT, env=process_env, stdout=log, stderr=subprocess.STDOUT,
                ))
        yield wait
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
            p.wait()


def run_all(module, runs, env, timeout_s):
    """`started(...)`, waited for."""
    with started(module, runs, env, timeout_s) as wait:
        wait()


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
