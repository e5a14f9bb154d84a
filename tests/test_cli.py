"""`python -m keras_batchfix`: `--help` and `--version` import no backend."""

import os
import subprocess
import sys

import pytest

import keras_batchfix

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY = {"keras", "tensorflow", "jax", "jaxlib", "torch"}


def run(*args, timeout=60):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def imported_top_level(importtime_stderr):
    """Top-level packages named in `python -X importtime` output."""
    names = set()
    for line in importtime_stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return names


@pytest.mark.parametrize("flag", ["--help", "--version"])
def test_imports_no_backend(flag):
    proc = run("-X", "importtime", "-m", "keras_batchfix", flag)
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = imported_top_level(proc.stderr)
    assert "keras_batchfix" in imported
    assert not imported & HEAVY, sorted(imported & HEAVY)


def test_version():
    proc = run("-m", "keras_batchfix", "--version")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == f"keras-batchfix {keras_batchfix.__version__}"


def test_help_lists_the_command():
    proc = run("-m", "keras_batchfix", "--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "diagnose" in proc.stdout and "--version" in proc.stdout


def test_import_registers_serializable_classes():
    # A plain `import keras_batchfix` loads the API, so `load_model` finds the
    # package's classes without any further import; the references (torch)
    # stay out.
    code = (
        "import sys, keras, keras_batchfix, types; "
        "assert 'keras_batchfix.references' not in sys.modules; "
        "assert isinstance(keras_batchfix.diagnose, types.FunctionType); "
        "assert keras.saving.get_registered_object('keras_batchfix>CenterLoss') "
        "is keras_batchfix.CenterLoss"
    )
    proc = run("-c", code, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_public_names():
    for name in keras_batchfix.__all__:
        assert getattr(keras_batchfix, name) is not None
    assert callable(keras_batchfix.diagnose) and callable(keras_batchfix.compensate)
    assert set(keras_batchfix.__all__) <= set(dir(keras_batchfix))
    with pytest.raises(AttributeError, match="no_such_name"):
        keras_batchfix.no_such_name
