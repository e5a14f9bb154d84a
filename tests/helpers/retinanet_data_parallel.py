"""The fixed RetinaNet on one JAX CPU device and under `DataParallel` over two.

Run by tests/integrations/test_retinanet.py as `python -m tests.helpers.retinanet_data_parallel`
(the two host devices must be set before JAX starts). Prints
`GAP <largest weight change> <largest gap to one device>`. 10 images in
batches of 4: the last batch of 2 splits 1 / 1.
"""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["KERAS_BACKEND"] = "jax"

import keras  # noqa: E402
import numpy as np  # noqa: E402

from tests.helpers.retinanet_problem import LEARNING_RATE, boxes_batch, detector  # noqa: E402


def train(epochs):
    model = detector(True)
    model.compile(optimizer=keras.optimizers.SGD(LEARNING_RATE))
    x, y = boxes_batch(10)
    model.fit(x, y, batch_size=4, epochs=epochs, shuffle=False, verbose=0)
    return [np.asarray(keras.ops.convert_to_numpy(w)) for w in model.trainable_weights]


def gap(got, want):
    return max(float(np.abs(a - b).max()) for a, b in zip(got, want))


def main():
    start, single = train(0), train(2)
    devices = keras.distribution.list_devices("cpu")
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
    print(f"GAP {gap(single, start)} {gap(train(2), single)}")


if __name__ == "__main__":
    main()
