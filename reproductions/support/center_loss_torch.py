"""PyTorch side of the center-loss reproduction (center loss vs. LR decay).

Data: the `animal-mnist` package's 10,000 28x28 silhouettes of 10 animal
classes (MIT licence; `pip install animal-mnist --no-deps`), read from the
installed package's gzipped pickles, zero-padded to 32x32. A stratified
training subset of `n_train` images, a fixed 1,000-image validation set with
clean labels; a fraction `label_noise` of the training labels is replaced by
a uniformly drawn *other* class (per run seed).

Model: an ImageNet-style ResNet (7x7/2 stem, 3x3/2 max-pool, four stages of
basic blocks with BatchNorm at widths w, 2w, 4w, 8w, global average pool);
`width=64, blocks=2` is ResNet-18 with 512-d features. The activation is
ReLU or PReLU (one slope per activation, 0.25, as `torch.nn.PReLU()`).

Training, as in the report's code: SGD(lr, momentum 0.9, weight decay on every
parameter) on cross-entropy + lambda * center loss, the centers stepped by
their own SGD(lr=alpha) with the report's CenterLoss
(keras_batchfix/references/torch_center_loss.py); LR x0.5 after 1/3 and
x0.1 after 2/3 of the epochs.

Variants (one thing changed at a time against `relu`):
    relu          the report's set-up (baseline)
    prelu         PReLU instead of ReLU everywhere (seed: "problem goes away")
    prelu_last    ReLU everywhere except the block output that makes the
                  features (tests "all-positive ReLU features")
    alpha_sched   the center step alpha follows the LR schedule
    no_bn_wd      no weight decay on the BatchNorms that produce the features
    l2norm        center loss on L2-normalized features (the package's
                  `CenterLoss(scale_free=True)`)
"""

import gzip
import os
import pickle
import time

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from keras_batchfix.references.torch_center_loss import TorchCenterLoss

from .center_loss_statistics import VARIANTS, decay_epochs  # noqa: F401

NUM_CLASSES = 10
N_VAL = 1000


# ----------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------
def animal_mnist_arrays():
    """(images uint8 (10000, 28, 28), labels int64 (10000,)) from the package."""
    try:
        import animal_mnist
    except ImportError as e:  # pragma: no cover - message only
        raise ImportError(
            "The reproduction reads the `animal-mnist` package's data files: "
            "pip install animal-mnist --no-deps  (or: pip install "
            "'keras-batchfix[reproductions]')") from e
    folder = os.path.join(os.path.dirname(animal_mnist.__file__), "data",
                          "Animal_MNIST")
    with gzip.open(os.path.join(folder, "animal_data_version_3.gz")) as fh:
        x = np.asarray(pickle.load(fh), np.uint8)
    with gzip.open(os.path.join(folder, "animal_label_version_3.gz")) as fh:
        y = np.asarray(pickle.load(fh), np.int64)
    return x, y


def load_splits(n_train=2400, label_noise=0.0, noise_seed=0, split_seed=0):
    """Stratified train subset / 1,000 validation images, standardized, NCHW.

    Returns {"train": (x, noisy y), "val": (x, y), "train_clean_y": y,
    "noisy": bool mask of the flipped training labels}.
    """
    x, y = animal_mnist_arrays()
    x = np.pad(x.astype(np.float32) / 255.0, ((0, 0), (2, 2), (2, 2)))
    rng = np.random.RandomState(split_seed)
    per_tr, per_va = n_train // NUM_CLASSES, N_VAL // NUM_CLASSES
    tr, va = [], []
    for k in range(NUM_CLASSES):
        ids = rng.permutation(np.flatnonzero(y == k))
        va += list(ids[:per_va])
        tr += list(ids[per_va:per_va + per_tr])
    tr, va = rng.permutation(tr), np.array(va)
    mean, std = x[tr].mean(), x[tr].std()
    x = ((x - mean) / std)[:, None]
    ytr = y[tr].copy()
    nrng = np.random.RandomState(1000 + noise_seed)
    noisy = nrng.rand(len(ytr)) < label_noise
    ytr[noisy] = (ytr[noisy] + nrng.randint(1, NUM_CLASSES, noisy.sum())) \
        % NUM_CLASSES
    return {"train": (x[tr], ytr), "val": (x[va], y[va]),
            "train_clean_y": y[tr], "noisy": noisy}


def augment(x, gen, shift=3):
    """Random horizontal flip and translation by up to `shift` pixels."""
    b = x.shape[0]
    flip = (torch.rand(b, generator=gen) < 0.5).to(x.device)
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    xp = F.pad(x, (shift,) * 4, value=float(x.min()))
    dx = torch.randint(0, 2 * shift + 1, (b,), generator=gen)
    dy = torch.randint(0, 2 * shift + 1, (b,), generator=gen)
    h, w = x.shape[2:]
    return torch.stack([xp[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
                        for i in range(b)])


# ----------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------
def _act(kind):
    return nn.PReLU() if kind == "prelu" else nn.ReLU()


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride, act, out_act=None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.act1 = _act(act)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act2 = _act(out_act or act)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        return self.act2(out + (x if self.short is None else self.short(x)))


class ResNet(nn.Module):
    """ImageNet-style ResNet; width 64, blocks 2 = ResNet-18 (512-d features)."""

    def __init__(self, width=64, blocks=2, act="relu", last_act=None,
                 num_classes=NUM_CLASSES):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width),
            _act(act), nn.MaxPool2d(3, 2, 1))
        layers, cin = [], width
        widths = (width, 2 * width, 4 * width, 8 * width)
        for i, cout in enumerate(widths):
            for j in range(blocks):
                last = i == 3 and j == blocks - 1
                layers.append(BasicBlock(cin, cout, 2 if i and not j else 1,
                                         act, last_act if last else None))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.feat_dim = cin
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():  # torchvision's initialization
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out",
                                        nonlinearity="relu")

    def feature_bns(self):
        """The BatchNorms whose outputs are summed into the features."""
        last = self.layers[-1]
        return [last.bn2] + ([last.short[1]] if last.short is not None else [])

    def forward(self, x):
        f = F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1).flatten(1)
        return f, self.fc(f)


# ----------------------------------------------------------------------------
# schedule and diagnostics
# ----------------------------------------------------------------------------
def lr_factor(epoch, epochs):
    """1 before epochs/3, 0.5 before 2*epochs/3, then 0.1 (0-based epoch)."""
    d1, d2 = decay_epochs(epochs)
    return 1.0 if epoch < d1 else (0.5 if epoch < d2 else 0.1)


def decompose(feats, labels, centers, prefix):
    """The center loss of a set of features and its exact decomposition.

    With class means m_j and class fractions p_j of the set,

        L   = 1/2 mean_i ||x_i - c_{y_i}||^2
            = W + G,   W = 1/2 mean_i ||x_i - m_{y_i}||^2  (within-class scatter)
                       G = 1/2 sum_j p_j ||m_j - c_j||^2   (centers' lag)

    and the feature scale S = mean_i ||x_i||^2 (of which ||mean_i x_i||^2 is
    the common-mean part, large for all-positive ReLU features). Returns
    {prefix + name}: center, within, lag, sq (S), rel (L / S), within_rel
    (W / S), mean_sq (||mean x||^2 / S), feat_norm (mean ||x||), dead (units
    that are 0 for every sample).
    """
    x = np.asarray(feats, np.float64)
    y = np.asarray(labels).reshape(-1)
    c = np.asarray(centers, np.float64)
    sq = (x ** 2).sum(1)
    center = 0.5 * ((x - c[y]) ** 2).sum(1).mean()
    within = lag = 0.0
    for k in np.unique(y):
        xk = x[y == k]
        mk = xk.mean(0)
        within += 0.5 * ((xk - mk) ** 2).sum()
        lag += 0.5 * len(xk) * ((mk - c[k]) ** 2).sum()
    n = len(y)
    s = sq.mean()
    return {prefix + "center": center, prefix + "within": within / n,
            prefix + "lag": lag / n, prefix + "sq": s,
            prefix + "rel": center / s, prefix + "within_rel": within / n / s,
            prefix + "mean_sq": float((x.mean(0) ** 2).sum() / s),
            prefix + "feat_norm": float(np.sqrt(sq).mean()),
            prefix + "dead": float((np.abs(x).max(0) == 0).mean())}


def format_row(framework, variant, epochs, row):
    return (f"[{framework} {variant}] ep {row['epoch']:2d}/{epochs} "
            f"lr {row['lr']:.4f} ce {row['train_ce']:.3f}/{row['val_ce']:.3f} "
            f"acc {row['val_acc']:.3f} center {row['train_center']:.3f}/"
            f"{row['val_center']:.3f} W {row['tr_within']:.3f} "
            f"G {row['tr_lag']:.3f} |x|^2 {row['tr_sq']:.2f} "
            f"L/|x|^2 {row['tr_rel']:.4f} dead {row['tr_dead']:.2f} "
            f"({row['sec']:.0f}s)")


# ----------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------
def run(variant="relu", epochs=24, lr=0.05, momentum=0.9, weight_decay=5e-4,
        lamb=0.01, alpha=0.5, batch_size=64, width=64, blocks=2, seed=0,
        data=None, n_train=2400, label_noise=0.2, aug=False, n_eval=1000,
        device="cpu", log=print):
    """Train one variant; return one dict per epoch (on `device`).

    Each epoch logs the running (train-mode) cross-entropy and center loss,
    as the seed, and, in eval mode with the epoch-end centers, the
    decomposition of `decompose` on the first `n_eval` training images
    (noisy labels, the ones the centers see; prefix `tr_`) and on the
    validation set (`val_`).
    """
    torch.manual_seed(seed)
    np.random.seed(seed)
    if data is None:
        data = load_splits(n_train, label_noise, noise_seed=seed)
    act = "prelu" if variant == "prelu" else "relu"
    model = ResNet(width, blocks, act,
                   "prelu" if variant == "prelu_last" else None)
    center = TorchCenterLoss(NUM_CLASSES, model.feat_dim)
    model.to(device)
    center.to(device)
    groups = model.parameters()
    if variant == "no_bn_wd":
        fb = {id(p) for bn in model.feature_bns() for p in bn.parameters()}
        groups = [
            {"params": [p for p in model.parameters() if id(p) not in fb]},
            {"params": [p for p in model.parameters() if id(p) in fb],
             "weight_decay": 0.0}]
    opt = torch.optim.SGD(groups, lr=lr, momentum=momentum,
                          weight_decay=weight_decay)
    copt = center.make_optimizer(alpha)

    xtr, ytr = (torch.from_numpy(a).to(device) for a in data["train"])
    xva, yva = (torch.from_numpy(a).to(device) for a in data["val"])
    xev, yev = xtr[:n_eval], ytr[:n_eval]
    n = len(ytr)
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for epoch in range(epochs):
        t0 = time.time()
        f = lr_factor(epoch, epochs)
        for g in opt.param_groups:
            g["lr"] = lr * f
        for g in copt.param_groups:
            g["lr"] = alpha * (f if variant == "alpha_sched" else 1.0)
        model.train()
        perm = torch.randperm(n, generator=gen).to(device)
        tot = {"ce": 0.0, "center": 0.0, "sq": 0.0}
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            x, y = xtr[idx], ytr[idx]
            if aug:
                x = augment(x, gen)
            feat, logits = model(x)
            cfeat = F.normalize(feat, dim=1) if variant == "l2norm" else feat
            ce = F.cross_entropy(logits, y)
            cl = center(cfeat, y)
            opt.zero_grad()
            copt.zero_grad()
            (ce + lamb * cl).backward()
            opt.step()
            copt.step()
            b = len(y)
            tot["ce"] += ce.item() * b
            tot["center"] += cl.item() * b
            tot["sq"] += float((feat.detach() ** 2).sum())
        model.eval()
        row = {"epoch": epoch + 1, "lr": lr * f,
               "alpha": copt.param_groups[0]["lr"],
               "train_ce": tot["ce"] / n, "train_center": tot["center"] / n,
               "train_sq": tot["sq"] / n}
        with torch.no_grad():
            cen = center.centers.detach().cpu().numpy()
            for prefix, xs, ys in (("tr_", xev, yev), ("val_", xva, yva)):
                fs, logits = model(xs)
                cfs = F.normalize(fs, dim=1) if variant == "l2norm" else fs
                row.update(decompose(cfs.cpu().numpy(), ys.cpu().numpy(),
                                     cen, prefix))
                # scale and dead units of the raw features
                row[prefix + "raw_sq"] = float((fs ** 2).sum(1).mean())
                row[prefix + "dead"] = float((fs.abs().amax(0) == 0)
                                             .float().mean())
                row[prefix + "ce_eval"] = F.cross_entropy(logits, ys).item()
                row[prefix + "acc"] = (logits.argmax(1) == ys).float().mean().item()
            row["val_ce"] = row.pop("val_ce_eval")
            row["center_norm"] = float(np.linalg.norm(cen, axis=1).mean())
            fbn = model.feature_bns()[0]
            row["bn_gamma"] = fbn.weight.abs().mean().item()
            row["fc_norm"] = model.fc.weight.norm().item()
        row["sec"] = time.time() - t0
        rows.append(row)
        log(format_row("torch", variant, epochs, row))
    return rows
