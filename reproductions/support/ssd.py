"""The SSD reproduction's machinery: data, models, and the training loops.

`reproductions/ssd_partial_batch.py` tells the story; this module holds
what it runs: a synthetic detection set whose size is not a multiple of the
batch size, a tiny SSD in Keras and the same network in PyTorch (weights
copied), a fixed batch order shared by every run, and one training loop per
framework that records the loss of every step.
"""

import time

from keras_batchfix.references.machine import cpu_name


IMAGE_SIZE = 64
NUM_CLASSES = 4  # background + rectangle, ellipse, triangle
FEATURE_MAPS = [(16, 16), (8, 8), (4, 4)]
SCALES = [0.15, 0.3, 0.55, 0.85]
ASPECT_RATIOS = (1.0, 2.0, 0.5)


def make_dataset(num_images, seed, size=IMAGE_SIZE, max_objects=5):
    """Images `(n, size, size, 3)` in [-1, 1], padded boxes (xyxy px) and labels.

    Class 1 is a reddish rectangle, 2 a greenish ellipse, 3 a bluish triangle
    (shape and hue both tell the class, so that a tiny model learns in a few
    hundred CPU steps); backgrounds are gratings of random colour plus noise.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    images = np.empty((num_images, size, size, 3), dtype="float32")
    boxes = np.zeros((num_images, max_objects, 4), dtype="float32")
    labels = np.full((num_images, max_objects), -1, dtype="int64")
    for i in range(num_images):
        image = rng.uniform(0.2, 0.8, size=3) * np.ones((size, size, 3))
        for _ in range(2):  # texture: two oriented gratings and noise
            f = rng.uniform(0.1, 0.6, size=2)
            image += rng.uniform(0.05, 0.15, size=3) * np.sin(
                f[0] * xx + f[1] * yy + rng.uniform(0, 2 * np.pi)
            )[..., None]
        image += rng.normal(0.0, 0.04, size=image.shape)
        for j in range(rng.integers(1, max_objects + 1)):
            label = int(rng.integers(1, NUM_CLASSES))
            w = rng.uniform(10.0, 30.0)
            h = float(np.clip(w * np.exp(rng.uniform(-0.5, 0.5)), 8.0, 36.0))
            x0, y0 = rng.uniform(0, size - w), rng.uniform(0, size - h)
            u, v = (xx - x0) / w, (yy - y0) / h  # box coordinates in [0, 1]
            if label == 1:  # rectangle
                mask = (u >= 0) & (u <= 1) & (v >= 0) & (v <= 1)
            elif label == 2:  # ellipse
                mask = (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
            else:  # triangle, apex up
                mask = (v >= 0) & (v <= 1) & (np.abs(u - 0.5) <= v / 2)
            color = np.full(3, 0.15) + rng.uniform(-0.1, 0.1, size=3)
            color[label - 1] = rng.uniform(0.8, 1.0)  # class hue: red, green, blue
            image[mask] = color
            boxes[i, j] = (x0, y0, x0 + w, y0 + h)
            labels[i, j] = label
        images[i] = np.clip(image, 0.0, 1.0) * 2.0 - 1.0  # in [-1, 1]
    return images, boxes, labels


def batch_plan(num_images, batch_size, epochs, seed, drop_short=False):
    """Same shuffled order for every variant: list of (epoch, index array)."""
    import numpy as np

    rng = np.random.default_rng(seed + 1)
    plan = []
    for epoch in range(epochs):
        order = rng.permutation(num_images)
        for start in range(0, num_images, batch_size):
            idx = order[start : start + batch_size]
            if drop_short and len(idx) < batch_size:
                continue
            plan.append((epoch, idx))
    return plan


def build_keras_model(keras, n_boxes):
    layers = keras.layers
    depth = NUM_CLASSES + 4
    inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3))
    x = layers.Conv2D(16, 3, padding="same", activation="relu")(inputs)
    x = layers.Conv2D(32, 3, strides=2, padding="same", activation="relu")(x)
    f1 = layers.Conv2D(32, 3, strides=2, padding="same", activation="relu")(x)
    f2 = layers.Conv2D(64, 3, strides=2, padding="same", activation="relu")(f1)
    f3 = layers.Conv2D(64, 3, strides=2, padding="same", activation="relu")(f2)
    heads = []
    for f in (f1, f2, f3):
        h = layers.Conv2D(n_boxes * depth, 3, padding="same")(f)
        heads.append(layers.Reshape((-1, depth))(h))
    outputs = layers.Concatenate(axis=1)(heads)  # logits + offsets
    return keras.Model(inputs, outputs, name="tiny_ssd")


def build_torch_model(keras_model, n_boxes):
    """The Keras model in torch.nn, with its weights copied."""
    import numpy as np
    import torch
    from torch import nn
    import torch.nn.functional as F

    convs = [l for l in keras_model.layers if l.__class__.__name__ == "Conv2D"]
    depth = NUM_CLASSES + 4

    class TinySSD(nn.Module):
        def __init__(self):
            super().__init__()
            self.convs = nn.ModuleList(
                nn.Conv2d(c.kernel.shape[2], c.kernel.shape[3], 3) for c in convs
            )
            self.strides = [c.strides[0] for c in convs]

        def conv(self, i, x):
            if self.strides[i] == 1:  # "same", stride 1: one pixel each side
                x = F.pad(x, (1, 1, 1, 1))
            else:  # "same", stride 2, even size: Keras/TF pad bottom/right only
                x = F.pad(x, (0, 1, 0, 1))
            return F.conv2d(x, self.convs[i].weight, self.convs[i].bias, stride=self.strides[i])

        def forward(self, x):  # x: NHWC like Keras
            x = x.permute(0, 3, 1, 2)
            x = F.relu(self.conv(0, x))
            x = F.relu(self.conv(1, x))
            f1 = F.relu(self.conv(2, x))
            f2 = F.relu(self.conv(3, f1))
            f3 = F.relu(self.conv(4, f2))
            outs = []
            for i, f in zip((5, 6, 7), (f1, f2, f3)):
                h = self.conv(i, f).permute(0, 2, 3, 1)  # NHWC: anchor order of Keras
                outs.append(h.reshape(h.shape[0], -1, depth))
            return torch.cat(outs, dim=1)

    model = TinySSD()
    with torch.no_grad():
        for conv, keras_conv in zip(model.convs, convs):
            kernel, bias = keras_conv.get_weights()  # kernel (kh, kw, in, out)
            conv.weight.copy_(torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))))
            conv.bias.copy_(torch.from_numpy(np.ascontiguousarray(bias)))
    return model


def train_keras(keras, model, loss, optimizer, plan, images, y_true, name, log):
    import numpy as np

    model.compile(optimizer=optimizer, loss=loss)
    rows = []
    start = time.time()
    for step, (epoch, idx) in enumerate(plan):
        reported = float(model.train_on_batch(images[idx], y_true[idx]))
        if not np.isfinite(reported):
            log(f"  {name}: non-finite loss at step {step}; stopping this variant")
            break
        record_step(rows, plan, step, len(idx), reported, name, start, log)
    return rows, time.time() - start


def record_step(rows, plan, step, batch_size, reported, name, start, log):
    """Appends a step's row; logs progress at the last step of an epoch."""
    epoch = plan[step][0]
    rows.append(dict(step=step, epoch=epoch, batch_size=batch_size, reported=reported))
    if step + 1 == len(plan) or plan[step + 1][0] != epoch:
        log(
            f"  {name:15s} epoch {epoch + 1:2d}/{plan[-1][0] + 1}  last batch loss "
            f"{reported:.4g}  ({time.time() - start:.0f} s)"
        )


def train_torch(model, plan, images, y_true, lr, momentum, name, log):
    import torch

    from keras_batchfix.references.torch_multibox import multibox_loss

    torch.manual_seed(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    rows = []
    start = time.time()
    images_t = torch.from_numpy(images)
    y_true_t = torch.from_numpy(y_true)
    for step, (epoch, idx) in enumerate(plan):
        idx_t = torch.from_numpy(idx)
        optimizer.zero_grad()
        loss = multibox_loss(
            y_true_t[idx_t], model(images_t[idx_t]), NUM_CLASSES, from_logits=True
        )
        loss.backward()
        optimizer.step()
        reported = float(loss.detach())
        record_step(rows, plan, step, len(idx), reported, name, start, log)
    return rows, time.time() - start


def buggy_grad_norms(model, plan, images, y_true, batch_size):
    """Global gradient norms of the buggy loss at the initial weights (torch copy)."""
    import numpy as np
    import torch

    from keras_batchfix.references.torch_multibox import multibox_loss

    norms = []
    first_epoch = [idx for epoch, idx in plan if epoch == 0 and len(idx) == batch_size]
    for idx in first_epoch:
        model.zero_grad()
        idx_t = torch.from_numpy(idx)
        loss = multibox_loss(
            torch.from_numpy(y_true[idx]), model(torch.from_numpy(images[idx])),
            NUM_CLASSES, from_logits=True,
        ) / len(idx)  # the buggy loss: sum / (N_pos * b)
        loss.backward()
        norms.append(float(torch.sqrt(sum((p.grad**2).sum() for p in model.parameters()))))
        del idx_t
    model.zero_grad()
    return float(np.median(norms))


def hardware_name():
    """The CPU, and the GPU Keras computes on when there is one."""
    cpu = cpu_name()
    try:  # Keras's steps run on the GPU when there is one; PyTorch's on the CPU
        import torch

        if torch.cuda.is_available():
            return f"{cpu}, {torch.cuda.get_device_name(0)} GPU"
    except ImportError:  # pragma: no cover
        pass
    return cpu


def step_rows(variant, rows, plan, batch_size, n_pos, buggy):
    """One dict per step of a run: where it is, its batch, and two losses.

    `reported` is the loss the run's optimizer minimized; `batch_loss` the
    batch's SSD loss `sum / max(1, N_pos)`, the same quantity for every run
    (a buggy run reports it divided by its batch's size).
    """
    steps = []
    per_epoch = {}
    for epoch, _ in plan:
        per_epoch[epoch] = per_epoch.get(epoch, 0) + 1
    seen = {}
    for r, (epoch, idx) in zip(rows, plan):
        in_epoch = seen.get(epoch, 0)
        seen[epoch] = in_epoch + 1
        b = len(idx)
        steps.append(dict(
            variant=variant, step=r["step"], epoch=epoch, step_in_epoch=in_epoch,
            position=epoch + in_epoch / per_epoch[epoch], batch_size=b,
            short=b < batch_size, n_pos=int(n_pos[idx].sum()), reported=r["reported"],
            batch_loss=r["reported"] * b if buggy else r["reported"],
        ))
    return steps
