"""Training losses on logits: BCEWithLogits (the original design) and BCE + soft Dice, optionally
weighted per pixel (the U-Net paper's border weight map, `cellseg.targets`), and the loss of the
optional distance-map output."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_dice_loss(logits: torch.Tensor, targets: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - soft Dice of sigmoid(logits) against {0, 1} targets, per sample, averaged over the batch.

    `smooth` keeps a crop without cells (and none predicted) at a loss near 0 instead of 0/0.
    """
    probabilities = torch.sigmoid(logits).flatten(1)
    targets = targets.flatten(1)
    overlap = (probabilities * targets).sum(dim=1)
    total = probabilities.sum(dim=1) + targets.sum(dim=1)
    return (1 - (2 * overlap + smooth) / (total + smooth)).mean()


def segmentation_loss(
    logits: torch.Tensor, targets: torch.Tensor, kind: str = "bce", weights: torch.Tensor | None = None
) -> torch.Tensor:
    """`kind` "bce": BCEWithLogits; "bce_dice": BCEWithLogits + soft Dice (equal weights).

    `logits` and `targets` are (N, 1, H, W); `weights`, of the same shape, weighs the BCE term
    per pixel (mean of weighted terms, so a weight of 1 everywhere is the plain loss).
    """
    loss = F.binary_cross_entropy_with_logits(logits, targets, weight=weights)
    if kind == "bce_dice":
        loss = loss + soft_dice_loss(logits, targets)
    elif kind != "bce":
        raise ValueError(f"unknown loss {kind!r}: use 'bce' or 'bce_dice'")
    return loss


def distance_map_loss(logits: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
    """BCEWithLogits of the distance-map output against the normalised distance (soft targets in
    [0, 1], 0 on background), over every pixel: its minimum is at sigmoid(logits) = distance."""
    return F.binary_cross_entropy_with_logits(logits, distance)
