"""Overlap and distance scores of masks, shared by validation, segmentation of new images, faithfulness and the
downstream study (below all of them)."""
from __future__ import annotations

import numpy as np
import torch


def dice_iou(pred: torch.Tensor, true: torch.Tensor) -> tuple[float, float]:
    """Dice and IoU of two {0, 1} masks (1 and 1 when both are empty)."""
    inter = float((pred * true).sum())
    total = float(pred.sum() + true.sum())
    union = total - inter
    return (2 * inter / total if total else 1.0), (inter / union if union else 1.0)


def dice(pred: torch.Tensor, true: torch.Tensor, dims=None) -> torch.Tensor:
    """Dice of {0, 1} masks over `dims` (per image or volume by default; all dims for one figure over a set);
    1 where both are empty."""
    pred, true = pred.float(), true.float()
    dims = tuple(range(1, pred.dim())) if dims is None else dims
    inter = (pred * true).sum(dims)
    total = pred.sum(dims) + true.sum(dims)
    return torch.where(total > 0, 2 * inter / total.clamp_min(1e-9), torch.ones_like(total))


def hd95(pred: torch.Tensor, true: torch.Tensor, spacing: torch.Tensor | None) -> tuple[np.ndarray, np.ndarray]:
    """(HD95 per item, whether its prediction was empty). Items with an empty truth are NaN (left out, as Dice
    leaves them out); an empty prediction of a non-empty truth scores the image diagonal (px, or mm with
    `spacing`, (N, dims) in the tensors' axis order): the largest distance the grid holds, so that a model
    which finds nothing is not scored on the items it happened to find."""
    from monai.metrics import compute_hausdorff_distance
    has_true, has_pred = ((m.flatten(1).sum(1) > 0).numpy() for m in (true, pred))
    sizes = np.array(true.shape[2:], float)
    steps = np.ones((len(true), len(sizes))) if spacing is None else np.asarray(spacing, float)
    out = np.full(len(true), np.nan)
    both = has_true & has_pred
    if both.any():
        out[both] = compute_hausdorff_distance(pred[both], true[both], include_background=True, percentile=95,
                                               spacing=None if spacing is None else steps[both].tolist())[:, 0].numpy()
    empty = has_true & ~has_pred
    out[empty] = np.sqrt(((sizes * steps[empty]) ** 2).sum(1))
    return out, empty


def region_dice(pred: torch.Tensor, true: torch.Tensor, vocab) -> dict[str, float]:
    """{region: Dice over all the items together} of two label maps (common/labels.py regions; a binary
    vocabulary's one region is the mask itself). 1 for a region absent from both."""
    from medgen.common.labels import region_masks
    p, t = region_masks(pred, vocab), region_masks(true, vocab)
    return {name: dice_iou(p[name].float(), t[name].float())[0] for name in p}
