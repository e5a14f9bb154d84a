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
