"""What the reproductions share: one process per Keras backend, and what ran them.

Keras fixes its backend when it is imported, so a script that compares
backends runs itself once per backend, as `script --worker BACKEND ...`:
the worker prints its result as one line `RESULT <json>` and
`run_worker` returns it. The worker imports this checkout's
`keras_batchfix`, whatever is installed.

A script imports it as `from support.backends import ...`: Python puts a
script's own folder first on `sys.path`.
"""

import csv
import json
import os
import subprocess
import sys

BACKENDS = ("tensorflow", "jax", "torch")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def device_and_version(backend):
    """(what the backend computes on, its framework's version), in a worker."""
    if backend == "torch":
        import torch

        gpu = torch.cuda.is_available()
        return (torch.cuda.get_device_name(0) if gpu else "CPU"), torch.__version__
    if backend == "jax":
        import jax

        device = jax.devices()[0]
        return ("CPU" if device.platform == "cpu" else device.device_kind), jax.__version__
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    return ("GPU " + gpus[0].name if gpus else "CPU"), tf.__version__


def emit(result):
    """Hands a worker's result (JSON-serializable) to `run_worker`."""
    print("RESULT " + json.dumps(result), flush=True)


def run_worker(script, backend, arguments=()):
    """Runs `script --worker BACKEND *arguments` on that backend; its result.

    The worker's other output is printed; if it fails, its error is printed
    and this process exits.
    """
    path = os.environ.get("PYTHONPATH")
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=ROOT if not path else ROOT + os.pathsep + path)
    done = subprocess.run(
        [sys.executable, os.path.abspath(script), "--worker", backend, *arguments],
        env=env, capture_output=True, text=True)
    result = None
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
        else:
            print(line, flush=True)
    if done.returncode or result is None:
        sys.exit(f"the {backend} worker failed:\n{done.stderr[-3000:]}")
    return result


def write_csv(path, rows):
    """`rows` (dicts with the same keys) as a CSV file with a header."""
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
