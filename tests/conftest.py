"""Test set-up: quiet TensorFlow, and two logical CPUs for tf.distribute tests.

The logical devices must exist before TensorFlow initializes, so they are
configured here, at import time, when the backend is TensorFlow.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402

if keras.backend.backend() == "tensorflow":
    import tensorflow as tf

    _cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        _cpu,
        [tf.config.LogicalDeviceConfiguration()] * 2,
    )


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def mirrored_strategy():
    """One `MirroredStrategy` over the two logical CPUs for the whole session.

    A second strategy over the same devices restarts the collective instance
    keys, and TensorFlow then matches its first all-reduce with a stale one of
    the previous strategy ("Shape mismatch in the collective instance 100")
    whenever their shapes differ. Sharing one strategy avoids that.
    """
    if keras.backend.backend() != "tensorflow":
        pytest.skip("tf.distribute needs the TensorFlow backend")
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
