"""Segment Anything's automatic mask generation ("segment everything"), per tile, in plain torch.

The official generator prompts the model with a regular grid of points, keeps each point's three
candidate masks whose predicted IoU and *stability* pass thresholds, and removes duplicates by
non-maximum suppression on the masks' boxes. Stability is the IoU between the mask thresholded a little
above and a little below the mask threshold (``offset``): a mask whose outline barely moves is stable.

Here the tile is the image (no crop layers: tiles already bound the resolution), and the NMS is a small
greedy one, as torchvision's is not available. Instances cut by the tile's edge are merged with their
neighbours' views by the stitching stage (``geobatch.instances``), not here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class EverythingSettings:
    """The official generator's knobs, with its defaults (``SamAutomaticMaskGenerator``)."""

    points_per_side: int = 32  # the grid has points_per_side ** 2 points
    points_per_batch: int = 64  # points decoded at once (memory: 3 masks per point at tile size)
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7


def point_grid(per_side: int) -> np.ndarray:
    """``per_side ** 2`` points (x, y) in [0, 1]², each at the centre of a cell of a regular grid."""
    offset = 1 / (2 * per_side)
    side = np.linspace(offset, 1 - offset, per_side)
    x, y = np.meshgrid(side, side)
    return np.stack([x.ravel(), y.ravel()], axis=1)


def stability_scores(logits, mask_threshold: float, offset: float):
    """Per mask (leading axes kept): pixels above ``threshold + offset`` over pixels above ``threshold - offset``.

    An empty mask scores 0.
    """
    inner = (logits > mask_threshold + offset).flatten(-2).sum(-1)
    outer = (logits > mask_threshold - offset).flatten(-2).sum(-1)
    return inner.float() / outer.clamp(min=1).float()


def mask_boxes(masks):
    """The box (x0, y0, x1, y1; inclusive pixel indexes) of each non-empty bool mask ``(n, h, w)``."""
    import torch

    rows, cols = masks.any(dim=2), masks.any(dim=1)
    height, width = masks.shape[1:]
    top = torch.where(rows, torch.arange(height, device=masks.device), height).min(dim=1).values
    bottom = torch.where(rows, torch.arange(height, device=masks.device), -1).max(dim=1).values
    left = torch.where(cols, torch.arange(width, device=masks.device), width).min(dim=1).values
    right = torch.where(cols, torch.arange(width, device=masks.device), -1).max(dim=1).values
    return torch.stack([left, top, right, bottom], dim=1).float()


def box_iou(a, b):
    """IoU of every box of ``a`` (n, 4) with every box of ``b`` (m, 4), boxes as inclusive pixel indexes."""
    import torch

    area_a = (a[:, 2] - a[:, 0] + 1) * (a[:, 3] - a[:, 1] + 1)
    area_b = (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)
    low = torch.maximum(a[:, None, :2], b[None, :, :2])
    high = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (high - low + 1).clamp(min=0).prod(dim=2)
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def non_maximum_suppression(boxes, scores, iou_threshold: float):
    """Indexes of the boxes kept, best score first: each box that overlaps a better kept one by IoU
    > ``iou_threshold`` is dropped. O(n²) memory in the number of boxes (a tile's masks: thousands at most)."""
    import torch

    order = torch.argsort(scores, descending=True)
    overlaps = box_iou(boxes[order], boxes[order]) > iou_threshold
    suppressed = torch.zeros(len(order), dtype=torch.bool, device=boxes.device)
    keep = []
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= overlaps[i]
    return order[torch.tensor(keep, dtype=torch.long, device=boxes.device)]
