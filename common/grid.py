"""Image grids as PNG: sample grids, dataset previews, mask outlines."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from medgen.common.data import pad_square
from medgen.common.fileio import atomic_write

OUTLINE_RGB = (1.0, 0.15, 0.1)


def outline(mask: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) {0,1} -> the mask's inner boundary (mask minus its 4-neighbour erosion)."""
    m = (mask > 0.5).float()
    eroded = -torch.nn.functional.max_pool2d(-m, 3, stride=1, padding=1)
    return (m - eroded).clamp(0, 1)


# label maps (common/labels.py) are shown in colour: BraTS's necrosis red, edema yellow, enhancing tumour blue
LABEL_RGB = {1: (1.0, 0.15, 0.1), 2: (1.0, 0.85, 0.1), 3: (0.2, 0.5, 1.0), 4: (0.2, 0.5, 1.0)}
OTHER_RGB = ((0.1, 0.9, 0.4), (0.9, 0.3, 0.9), (0.1, 0.9, 0.9))


def label_colour(label: int) -> torch.Tensor:
    return torch.tensor(LABEL_RGB.get(label, OTHER_RGB[label % len(OTHER_RGB)])).view(1, 3, 1, 1)


def is_label_map(x: torch.Tensor) -> bool:
    """Label ids beyond {0, 1} (an image is in [0, 1])."""
    return x.shape[1] == 1 and bool((x > 1).any()) and bool((x == x.round()).all())


def to_rgb(images: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
    """(N, C, H, W) in [0,1] with C in {1, 3} -> (N, 3, H, W); mask outlines painted on top when given (each
    label's in its colour for label maps); a label map itself is painted in its labels' colours."""
    images = images.detach().float().cpu()
    if is_label_map(images):
        rgb = torch.zeros(len(images), 3, *images.shape[2:])
        for label in images.unique().int().tolist():
            if label:
                rgb = torch.where(images == label, label_colour(label), rgb)
        return rgb
    images = images.clamp(0, 1)
    rgb = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images[:, :3]
    if masks is not None:
        masks = masks.detach().float().cpu()
        labels = [lab for lab in masks.unique().int().tolist() if lab] if is_label_map(masks) else [None]
        for label in labels:
            edge = outline(masks if label is None else (masks == label).float())
            colour = torch.tensor(OUTLINE_RGB).view(1, 3, 1, 1) if label is None else label_colour(label)
            rgb = rgb * (1 - edge) + colour * edge
    return rgb


def make_grid(images: torch.Tensor, nrow: int, pad: int = 2) -> np.ndarray:
    """(N, 3, H, W) in [0,1] -> (rows*H, nrow*W, 3) uint8 with `pad` black pixels between tiles."""
    n, _, h, w = images.shape
    rows = (n + nrow - 1) // nrow
    grid = torch.zeros(3, rows * (h + pad) + pad, nrow * (w + pad) + pad)
    for i in range(n):
        r, c = divmod(i, nrow)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = images[i]
    return (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def mid_planes(volumes: torch.Tensor) -> torch.Tensor:
    """(N, C, D, H, W) -> (3N, C, S, S): each volume's axial, coronal and sagittal mid-planes (superior at the top
    of the last two), zero-padded to one square size S = max(D, H, W)."""
    d, h, w = volumes.shape[2:]
    side = max(d, h, w)
    planes = [volumes[:, :, d // 2], volumes[:, :, :, h // 2].flip(2), volumes[:, :, :, :, w // 2].flip(2)]
    return torch.stack([pad_square(p, side) for p in planes], 1).flatten(0, 1)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 8, masks: torch.Tensor | None = None,
              scale: int = 1) -> Path:
    """A PNG grid of (N, C, H, W) images, or of volumes (N, C, D, H, W) shown as three mid-planes each."""
    if images.dim() == 5:
        images, nrow = mid_planes(images), nrow * 3
        masks = None if masks is None else mid_planes(masks)
    arr = make_grid(to_rgb(images, masks), nrow)
    img = Image.fromarray(arr)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    return atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))
