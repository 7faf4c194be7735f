"""Preview grids of a dataset on disk, read through the same loaders training uses."""
from __future__ import annotations

from pathlib import Path

import torch

from medgen.common import data as nifti
from medgen.common.grid import save_grid
from medgen.common.imagefolder import find_image_splits, load_images

PREVIEW_ROLES = ["t1_pre", "t1_gd", "bravo"]


def preview_brain(root: Path, out: Path, n_subjects: int = 8, layout: str = "original") -> Path:
    """One row per subject: the slice with the most tumour, each sequence with the mask outlined, then the mask."""
    lay = nifti.LAYOUTS[layout]
    subjects = [s for split in nifti.find_splits(root, lay, 0.2, 0).values() for s in split][:n_subjects]
    roles = [r for r in PREVIEW_ROLES if r in lay.patterns]
    tiles, outlines = [], []
    for subject in subjects:
        vols, problems = nifti.load_subject(subject, lay, roles + ["seg"])
        if not vols:
            continue
        side = max(vols["seg"].shape[:2])
        sl = nifti.Preprocess(side, image_roles=roles, tumour=lay.tumour)(vols)
        area = sl["masks"].flatten(1).sum(1)
        k = int(area.argmax()) if area.max() > 0 else len(area) // 2
        for c in range(len(roles)):
            tiles.append(sl["images"][k, c:c + 1])
            outlines.append(sl["masks"][k])
        tiles.append(sl["masks"][k].float())
        outlines.append(torch.zeros_like(sl["masks"][k]))
    return save_grid(torch.stack(tiles), out, nrow=len(roles) + 1, masks=torch.stack(outlines), scale=2)


def preview_lesions(root: Path, out: Path, per_class: int = 6) -> Path:
    """One row per class."""
    splits, classes, _ = find_image_splits(root, None, 0.0, 0)
    items = [it for c in classes for it in [x for x in splits["train"] if x[1] == c][:per_class]]
    tensors, _ = load_images(items, classes, 48)
    return save_grid(tensors["images"], out, nrow=per_class, scale=2)
