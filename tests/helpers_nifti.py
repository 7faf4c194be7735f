"""Small NIfTI writers for tests (real nibabel files, no mocks)."""
from pathlib import Path

import nibabel as nib
import numpy as np


def save(path: Path, data: np.ndarray, affine=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


def pattern_volume(kind: str, shape=(24, 24, 8)) -> np.ndarray:
    """Distinct spatial patterns so that channel order and orientation can be read back."""
    x, y, z = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    base = {"left": x < shape[0] // 2, "anterior": y >= shape[1] // 2, "ring": (x - 12) ** 2 + (y - 12) ** 2 < 40,
            "all": np.ones(shape, bool)}[kind]
    return (100 + 800 * base + (z % 2)).astype(np.float32)


def mask_volume(shape=(24, 24, 8), labels=(1,)) -> np.ndarray:
    m = np.zeros(shape, np.uint8)
    for i, lab in enumerate(labels):
        m[4 + 4 * i: 8 + 4 * i, 10:14, 2:6] = lab
    return m
