"""keras-hub's D-FINE depends on its batch: the numbers of docs/keras_hub.md#d-fine.

On the tiny D-FINE of reproductions/support/d_fine.py (random weights, BatchNorm
frozen, TensorFlow backend), prints

1. keras-hub's loss of 3 full images in one order and in the reverse order,
   and the mean of the single images' losses (the fix's loss);
2. how far two images' logits move when predicted in a batch of 4 instead
   of 2 (keras-hub's forward pass mixes the images of a batch);
3. with `--mirrored`, the fixed detector trained one epoch (7 images, batches
   of 4, SGD) on one device and under `MirroredStrategy` over 2 logical
   CPUs: the largest weight change and the largest gap between the two.

    python reproductions/d_fine_batch_dependence.py             # 1 and 2, about a minute on 2 CPUs
    python reproductions/d_fine_batch_dependence.py --mirrored  # and 3, several minutes

Deterministic for a given keras-hub, Keras and TensorFlow on one machine.
"""

import argparse

import tensorflow as tf  # noqa: E402

tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2
)

import keras  # noqa: E402
import numpy as np  # noqa: E402

from support.d_fine import LEARNING_RATE, boxes_batch, detector  # noqa: E402


def loss(model, x, y):
    return float(model.compute_loss(x, y, model(x), None))


def order():
    x, y = boxes_batch(3, full=True)
    reverse = {k: v[::-1] for k, v in y.items()}
    model = detector(False)
    singles = [loss(model, x[i:i + 1], {k: v[i:i + 1] for k, v in y.items()})
               for i in range(3)]
    print(f"keras-hub, 3 full images: {loss(model, x, y):.4f}; reversed: "
          f"{loss(model, x[::-1], reverse):.4f}; mean of the single images: "
          f"{np.mean(singles):.4f}; the fix: {loss(detector(True), x, y):.4f}")


def forward():
    model = detector(True)
    x, _ = boxes_batch(4)
    full = np.asarray(model(x, training=True)["logits"])
    half = np.asarray(model(x[:2], training=True)["logits"])
    print(f"logits of images 0-1, batch of 4 vs batch of 2: largest gap "
          f"{np.abs(full[:2] - half).max():.3g}")


def trained(x, y, strategy=None, epochs=1):
    scope = strategy.scope() if strategy else keras.utils.custom_object_scope({})
    with scope:
        model = detector(True)
        model.compile(optimizer=keras.optimizers.SGD(LEARNING_RATE))
    model.fit(x, y, batch_size=4, epochs=epochs, shuffle=False, verbose=0)
    return [np.asarray(keras.ops.convert_to_numpy(w)) for w in model.trainable_weights]


def gap(got, want):
    return max(float(np.abs(a - b).max()) for a, b in zip(got, want))


def mirrored():
    strategy = tf.distribute.MirroredStrategy(
        ["/cpu:0", "/cpu:1"], cross_device_ops=tf.distribute.ReductionToOneDevice())
    x, y = boxes_batch(7)
    single = trained(x, y)
    print(f"fixed, one device: largest weight change {gap(single, trained(x, y, epochs=0)):.3g}")
    print(f"fixed, MirroredStrategy vs one device: largest gap "
          f"{gap(trained(x, y, strategy), single):.3g}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mirrored", action="store_true")
    args = parser.parse_args(argv)
    order()
    forward()
    if args.mirrored:
        mirrored()


if __name__ == "__main__":
    main()
