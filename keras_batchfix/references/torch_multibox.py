"""PyTorch reference of the SSD multibox loss, written apart from the Keras code.

Per-image mining follows ssd.pytorch's algorithm (rank every anchor's
background loss by a double argsort, positives excluded *before* ranking,
which is the fix of its ordering bug); batch mining follows ssd_keras (one
top-k over the negatives of the whole batch). Boolean indexing and argsort are
used on purpose: the Keras code uses static-shape masks and a threshold, so
the two share no mechanism.
"""

import torch
import torch.nn.functional as F


def multibox_loss(
    y_true,
    y_pred,
    num_classes,
    neg_pos_ratio=3.0,
    n_neg_min=0,
    alpha=1.0,
    mining="batch",
    from_logits=False,
):
    """(CE(positives) + CE(hard negatives) + alpha * SmoothL1(positives)) / max(1, N_pos).

    `y_true`, `y_pred`: tensors `(B, A, num_classes + 4 [+ 8])`, ssd_keras layout.
    """
    onehot = y_true[..., :num_classes]
    labels = onehot.argmax(-1)
    positive = onehot[..., 1:].sum(-1) > 0
    negative = onehot[..., 0] > 0
    scores = y_pred[..., :num_classes]
    if from_logits:
        log_p = F.log_softmax(scores, dim=-1)
    else:
        log_p = torch.log(scores.clamp(min=1e-15))
    ce = -log_p.gather(-1, labels.unsqueeze(-1)).squeeze(-1)

    with torch.no_grad():
        ranking_loss = ce.clone()
        ranking_loss[~negative] = -1.0  # positives and neutrals never mined
        if mining == "per_image":
            num_pos = positive.sum(1)
            num_neg_available = negative.sum(1)
            k = torch.clamp(
                torch.floor(neg_pos_ratio * num_pos.double()).long(), min=n_neg_min
            )
            k = torch.minimum(k, num_neg_available)
            _, order = ranking_loss.sort(dim=1, descending=True, stable=True)
            _, rank = order.sort(dim=1, stable=True)
            hard = rank < k.unsqueeze(1)
        elif mining == "batch":
            flat = ranking_loss.reshape(-1)
            k = max(int(neg_pos_ratio * int(positive.sum())), n_neg_min)
            k = min(k, int(negative.sum()))
            hard = torch.zeros_like(flat, dtype=torch.bool)
            if k > 0:
                hard[torch.topk(flat, k).indices] = True
            hard = hard.reshape(ranking_loss.shape)
        else:
            raise ValueError(mining)

    class_loss = ce[positive].sum() + ce[hard].sum()
    offsets = y_pred[..., num_classes : num_classes + 4][positive]
    targets = y_true[..., num_classes : num_classes + 4][positive]
    box_loss = F.smooth_l1_loss(offsets, targets, reduction="sum", beta=1.0)
    n_pos = positive.sum().to(ce.dtype)
    return (class_loss + alpha * box_loss) / torch.clamp(n_pos, min=1.0)
