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

    Every strategy with collective all-reduce starts its instance keys at the
    same value, so two strategies in one process (other tests and `diagnose`
    make their own) can match an all-reduce with a stale one of the other
    ("Shape mismatch in the collective instance 100", TF 2.21).
    `ReductionToOneDevice` uses no collective keys. The default cross-device
    ops give the same results when run alone.
    """
    if keras.backend.backend() != "tensorflow":
        pytest.skip("tf.distribute needs the TensorFlow backend")
    return tf.distribute.MirroredStrategy(
        ["/cpu:0", "/cpu:1"], cross_device_ops=tf.distribute.ReductionToOneDevice()
    )
