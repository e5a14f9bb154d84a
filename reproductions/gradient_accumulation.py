"""Gradient accumulation with a count-normalized SSD loss: naive vs exact.

A small SSD-like model (4 conv layers, 2 feature maps) trains for one epoch
with `SSDMultiboxLoss(mining="per_image")` and plain SGD three ways, from
the same initial weights, on the same images in the same order:

  (r) reference  plain steps on batches of 12 (the last one short)
  (n) naive      micro-batches of 6, `SGD(..., gradient_accumulation_steps=2)`
  (e) exact      (n) with `sample_weight=keras_batchfix.window_weights(...)`

Each image has its own number of positive anchors, so the two micro-batches
of a window have different counts: naively each is divided by its own count
and Keras averages the two gradients. It prints the largest weight gap of
(n) and (e) to (r), on the scale of the weights, and the time per epoch of
(e) over (n) (the weights are computed once, before `fit`).

    python reproductions/gradient_accumulation.py           # 94 images
    python reproductions/gradient_accumulation.py --quick   # 22 images
"""

import argparse
import time

import keras
import numpy as np
from keras import ops

from keras_batchfix import GlobalCount, SSDMultiboxLoss, window_weights
from keras_batchfix.references.ssd_data import random_batch

IMAGE_SIZE, NUM_CLASSES, BOXES, MICRO, STEPS = 32, 4, 3, 6, 2


def build_model():
    layers = keras.layers
    depth = NUM_CLASSES + 4
    inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3))
    x = layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(inputs)
    f1 = layers.Conv2D(16, 3, strides=2, padding="same", activation="relu")(x)
    f2 = layers.Conv2D(16, 3, strides=2, padding="same", activation="relu")(f1)
    heads = [
        layers.Reshape((-1, depth))(layers.Conv2D(BOXES * depth, 3, padding="same")(f))
        for f in (f1, f2)
    ]
    return keras.Model(inputs, layers.Concatenate(axis=1)(heads))


def make_data(num_images, anchors, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.uniform(-1, 1, (num_images, IMAGE_SIZE, IMAGE_SIZE, 3))
    y_true = np.concatenate([
        random_batch(rng, 1, anchors, NUM_CLASSES, rng.uniform(0.002, 0.06))[0]
        for _ in range(num_images)
    ])
    return images.astype("float32"), y_true


def train(initial, images, y_true, batch_size, steps=None, sample_weight=None):
    model = build_model()
    model.set_weights(initial)
    model.compile(
        keras.optimizers.SGD(0.002, gradient_accumulation_steps=steps),
        SSDMultiboxLoss(NUM_CLASSES, mining="per_image", normalizer=GlobalCount()),
    )
    window = MICRO * STEPS  # warm-up on one whole window: traces the step
    model.fit(images[:window], y_true[:window], batch_size=batch_size, epochs=1,
              verbose=0, shuffle=False,
              sample_weight=None if sample_weight is None else sample_weight[:window])
    model.set_weights(initial)  # plain SGD: no optimizer state but iterations
    start = time.perf_counter()
    model.fit(images, y_true, batch_size=batch_size, epochs=1, verbose=0,
              shuffle=False, sample_weight=sample_weight)
    return [ops.convert_to_numpy(w) for w in model.weights], time.perf_counter() - start


def gap(a, b):
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="22 images")
    args = parser.parse_args(argv)
    num_images = 22 if args.quick else 94  # micro-batches of 6, the last of 4
    keras.utils.set_random_seed(0)
    model = build_model()
    initial = model.get_weights()
    images, y_true = make_data(num_images, model.output.shape[1])
    positives = y_true[..., 1:NUM_CLASSES].max(-1).sum(-1)
    reference, _ = train(initial, images, y_true, MICRO * STEPS)
    naive, naive_s = train(initial, images, y_true, MICRO, STEPS)
    weights = window_weights(positives, MICRO, STEPS)
    exact, exact_s = train(initial, images, y_true, MICRO, STEPS, weights)
    scale = max(float(np.abs(w).max()) for w in reference)
    print(f"backend {keras.backend.backend()}, {num_images} images, "
          f"positives per image {int(positives.min())}-{int(positives.max())}, "
          f"micro-batches of {MICRO}, gradient_accumulation_steps={STEPS}")
    print(f"weight change in the epoch: {gap(reference, initial):.3e} "
          f"(largest weight {scale:.3f})")
    print(f"naive accumulation vs batches of {MICRO * STEPS}: {gap(naive, reference):.3e}")
    print(f"exact (window_weights) vs batches of {MICRO * STEPS}: {gap(exact, reference):.3e}")
    print(f"step time exact / naive: {exact_s / naive_s:.2f} "
          f"({exact_s:.2f} s / {naive_s:.2f} s per epoch)")


if __name__ == "__main__":
    main()
