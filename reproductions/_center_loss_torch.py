"""PyTorch side of the seed-003 reproduction (center loss vs. LR decay).

A small ResNet (basic blocks + BatchNorm, ReLU or PReLU) on scikit-learn's
bundled 8x8 digits, trained as in seed 003: SGD(lr, momentum 0.9, weight
decay) on cross-entropy + lambda * center loss, the centers stepped by their
own SGD(lr=alpha) with the seed's CenterLoss semantics
(keras_batchfix/references/torch_center_loss.py), the LR multiplied by 0.5 at 1/3 and
by 0.1 at 2/3 of the epochs (seed: lr, lr/2, lr/10).

Variants (one mechanism changed at a time):
    relu          the seed's set-up (baseline)
    prelu         PReLU instead of ReLU everywhere (seed: "problem goes away")
    alpha_sched   the center step alpha follows the LR schedule
    no_bn_wd      no weight decay on the BatchNorm(s) that produce the features
    l2norm        center loss on L2-normalized features
"""

import time

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from keras_batchfix.references.torch_center_loss import TorchCenterLoss

VARIANTS = ("relu", "prelu", "alpha_sched", "no_bn_wd", "l2norm")


# ----------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------
def load_digits_splits(num_classes=8, seed=0):
    """Digits 0..num_classes-1, standardized, split 60/20/20 (stratified)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    keep = d.target < num_classes
    x = d.images[keep].astype(np.float32) / 16.0
    y = d.target[keep].astype(np.int64)
    rng = np.random.RandomState(seed)
    idx = {"train": [], "val": [], "test": []}
    for k in range(num_classes):
        ids = rng.permutation(np.flatnonzero(y == k))
        n = len(ids)
        a, b = int(0.6 * n), int(0.8 * n)
        idx["train"] += list(ids[:a])
        idx["val"] += list(ids[a:b])
        idx["test"] += list(ids[b:])
    mean, std = x[idx["train"]].mean(), x[idx["train"]].std()
    x = (x - mean) / std
    out = {}
    for k, ids in idx.items():
        ids = np.array(ids)
        out[k] = (x[ids][:, None, :, :], y[ids])  # NCHW
    return out


# ----------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------
def _act(kind, channels):
    return nn.PReLU() if kind == "prelu" else nn.ReLU()


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride, act):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.act1 = _act(act, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act2 = _act(act, cout)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        sc = x if self.short is None else self.short(x)
        return self.act2(out + sc)


class SmallResNet(nn.Module):
    """stem -> [w] -> [2w, /2] -> [4w, /2] -> global avg pool -> feat (4w) -> fc."""

    def __init__(self, num_classes=8, width=16, act="relu", blocks=1):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
            _act(act, width),
        )
        layers, cin = [], width
        for i, cout in enumerate((width, 2 * width, 4 * width)):
            for j in range(blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                layers.append(BasicBlock(cin, cout, stride, act))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.feat_dim = cin
        self.fc = nn.Linear(cin, num_classes)

    def feature_bns(self):
        """The BatchNorms whose outputs are summed into the feature layer."""
        last = self.layers[-1]
        bns = [last.bn2]
        if last.short is not None:
            bns.append(last.short[1])
        return bns

    def forward(self, x):
        f = self.layers(self.stem(x))
        f = F.adaptive_avg_pool2d(f, 1).flatten(1)
        return f, self.fc(f)


# ----------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------
def lr_factor(epoch, epochs):
    """Seed schedule scaled: 1 before epochs/3, 0.5 before 2*epochs/3, then 0.1."""
    d1, d2 = decay_epochs(epochs)
    return 1.0 if epoch < d1 else (0.5 if epoch < d2 else 0.1)


def decay_epochs(epochs):
    return int(round(epochs / 3)), int(round(2 * epochs / 3))


def augment(x, shift, noise, gen):
    """Random translation by up to `shift` pixels (zero padded) + Gaussian noise."""
    if shift:
        b = x.shape[0]
        xp = F.pad(x, (shift,) * 4)
        dx = torch.randint(0, 2 * shift + 1, (b,), generator=gen)
        dy = torch.randint(0, 2 * shift + 1, (b,), generator=gen)
        x = torch.stack([xp[i, :, dy[i]:dy[i] + 8, dx[i]:dx[i] + 8]
                         for i in range(b)])
    if noise:
        x = x + noise * torch.randn(x.shape, generator=gen)
    return x


def diagnostics(feats, labels, centers, num_classes, prefix):
    """Per-split diagnostics (NumPy; shared by the PyTorch and Keras runs).

    feats: (N, D) features fed to the center loss, labels: (N,), centers:
    (num_classes, D). Returns {prefix + name: value}:
      center          0.5 * mean ||x - c_y||^2 (the center loss on this split)
      feat_norm       mean ||x||
      rel_center      center / mean ||x||^2 (scale-free center loss)
      mean_to_center  mean over classes of ||mean_{y=j} x - c_j|| (center lag)
      dead            fraction of feature units that are 0 for every sample
    """
    feats = np.asarray(feats, np.float64)
    labels = np.asarray(labels).reshape(-1)
    centers = np.asarray(centers, np.float64)
    sq = (feats ** 2).sum(1)
    center = 0.5 * ((feats - centers[labels]) ** 2).sum(1).mean()
    lag = [np.linalg.norm(feats[labels == k].mean(0) - centers[k])
           for k in range(num_classes) if (labels == k).any()]
    return {
        prefix + "center": center,
        prefix + "feat_norm": np.sqrt(sq).mean(),
        prefix + "rel_center": center / sq.mean(),
        prefix + "mean_to_center": float(np.mean(lag)),
        prefix + "dead": float((np.abs(feats).max(0) == 0).mean()),
    }


def format_row(framework, variant, epochs, row):
    return (f"[{framework} {variant}] epoch {row['epoch']:3d}/{epochs} "
            f"lr {row['lr']:.4f} ce {row['train_ce']:.3f}/{row['val_ce']:.3f} "
            f"center {row['train_center']:.3f}/{row['val_center']:.3f} "
            f"|f| {row['val_feat_norm']:.2f} |c| {row['center_norm']:.2f} "
            f"lag {row['val_mean_to_center']:.3f} "
            f"dead {row['eval_train_dead']:.2f} acc {row['val_acc']:.3f} "
            f"({row['sec']:.1f}s)")


def run(variant="relu", epochs=30, lr=0.05, momentum=0.9, weight_decay=5e-4,
        lamb=0.01, alpha=0.5, batch_size=32, width=16, blocks=1, num_classes=8,
        seed=0, data=None, log=print, init=None, shift=0, noise=0.0):
    """Train one variant; return one dict per epoch."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    if data is None:
        data = load_digits_splits(num_classes, seed=0)
    act = "prelu" if variant == "prelu" else "relu"
    model = SmallResNet(num_classes, width, act, blocks)
    if init == "orthogonal":
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.orthogonal_(m.weight)
    center = TorchCenterLoss(num_classes, model.feat_dim)

    if variant == "no_bn_wd":
        fb = {id(p) for bn in model.feature_bns() for p in bn.parameters()}
        groups = [
            {"params": [p for p in model.parameters() if id(p) not in fb]},
            {"params": [p for p in model.parameters() if id(p) in fb],
             "weight_decay": 0.0},
        ]
    else:
        groups = model.parameters()
    opt = torch.optim.SGD(groups, lr=lr, momentum=momentum,
                          weight_decay=weight_decay)
    copt = center.make_optimizer(alpha)

    xtr, ytr = (torch.from_numpy(a) for a in data["train"])
    xva, yva = (torch.from_numpy(a) for a in data["val"])
    n = len(ytr)
    rows = []
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        t0 = time.time()
        f = lr_factor(epoch, epochs)
        for g in opt.param_groups:
            g["lr"] = lr * f
        for g in copt.param_groups:
            g["lr"] = alpha * (f if variant == "alpha_sched" else 1.0)
        model.train()
        perm = torch.randperm(n, generator=gen)
        s = {"ce": 0.0, "center": 0.0, "sq": 0.0, "lag": 0.0, "nlag": 0}
        alive = torch.zeros(model.feat_dim, dtype=torch.bool)
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            x, y = augment(xtr[idx], shift, noise, gen), ytr[idx]
            feat, logits = model(x)
            cfeat = F.normalize(feat, dim=1) if variant == "l2norm" else feat
            ce = F.cross_entropy(logits, y)
            cl = center(cfeat, y)
            loss = ce + lamb * cl
            opt.zero_grad()
            copt.zero_grad()
            loss.backward()
            opt.step()
            copt.step()
            b = len(y)
            with torch.no_grad():
                s["ce"] += ce.item() * b
                s["center"] += cl.item() * b
                s["sq"] += (cfeat ** 2).sum().item()
                alive |= (feat.abs() > 0).any(0)
                for k in y.unique():
                    m = y == k
                    s["lag"] += torch.linalg.norm(
                        cfeat[m].mean(0) - center.centers[k]).item()
                    s["nlag"] += 1
        # epoch-end passes in eval mode with the current centers
        model.eval()
        row = {"epoch": epoch + 1, "lr": lr * f,
               "alpha": copt.param_groups[0]["lr"],
               "train_ce": s["ce"] / n, "train_center": s["center"] / n,
               "train_batch_mean_to_center": s["lag"] / s["nlag"],
               "train_rel_center": s["center"] / s["sq"],
               "train_dead": 1.0 - alive.float().mean().item()}
        with torch.no_grad():
            cen = center.centers.detach().numpy()
            for split, (xs, ys) in (("train", (xtr, ytr)), ("val", (xva, yva))):
                fs, logits = model(xs)
                cfs = F.normalize(fs, dim=1) if variant == "l2norm" else fs
                d = diagnostics(cfs.numpy(), ys.numpy(), cen, num_classes,
                                "eval_" + split + "_" if split == "train"
                                else "val_")
                d[("eval_train_" if split == "train" else "val_") + "dead"] = \
                    float((fs.abs().amax(0) == 0).float().mean())
                row.update(d)
                if split == "val":
                    row["val_ce"] = F.cross_entropy(logits, ys).item()
                    row["val_acc"] = (logits.argmax(1) == ys).float().mean().item()
            row["center_norm"] = float(np.linalg.norm(cen, axis=1).mean())
            fbn = model.feature_bns()[0]
            row["bn_gamma"] = fbn.weight.abs().mean().item()
            row["bn_beta"] = fbn.bias.mean().item()
            row["fc_norm"] = model.fc.weight.norm().item()
        row["sec"] = time.time() - t0
        rows.append(row)
        log(format_row("torch", variant, epochs, row))
    return rows
