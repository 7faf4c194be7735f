"""Where the conditioning of generated samples comes from: the quality filter for generated masks, the class
plan of label-conditioned modes, and a real dataset's conditioning roles (--masks_from)."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from medgen.common.data import MASK_ROLE
from medgen.common.errors import UserError
from medgen.common.labels import check_not_binary
from medgen.common.names import check_name
from medgen.Generation.TrainGen.core.generation.models import Model


MIN_MASK_PIXELS = 4       # a tumour smaller than 2x2 pixels is noise at any resolution (0.0005 of 32x32 is 0.5 px)
FIX = {"empty": "train the seg model longer", "too small": "lower --min_mask_area",
       "too large": "raise --max_mask_area", "too few components": "lower --min_components",
       "too many components": "raise --max_components"}


@dataclass
class MaskFilter:
    """Rejects generated masks that are empty or outside component-count and area bounds (area as a fraction
    of the image or volume, and at least MIN_MASK_PIXELS; components 8-connected, 26 in 3D). enabled=False
    (--no_mask_filter) accepts every mask, for smoke tests of an untrained model."""
    min_area: float = 0.0005
    max_area: float = 0.25
    min_components: int = 1
    max_components: int = 8
    enabled: bool = True

    def __post_init__(self):
        if not (0 <= self.min_area <= self.max_area <= 1):
            raise UserError("--min_mask_area and --max_mask_area must satisfy 0 <= min <= max <= 1")
        if not (1 <= self.min_components <= self.max_components):
            raise UserError("--min_components and --max_components must satisfy 1 <= min <= max")

    def reason(self, mask: np.ndarray, vocab=None) -> str | None:
        """None when the mask is accepted, else why it is rejected. A label map (vocab not binary): the area
        bounds and the fewest components apply to the whole lesion (any label; a tumour may lack necrosis), the
        most components to each label too, and the reason names the label ('too many components of ED')."""
        if not self.enabled:
            return None
        labels = np.asarray(mask)
        mask = labels > 0.5
        area = float(mask.mean())
        if area == 0:
            return "empty"
        if area < self.min_area or mask.sum() < MIN_MASK_PIXELS:
            return "too small"
        if area > self.max_area:
            return "too large"
        structure = np.ones((3,) * mask.ndim)
        n = ndimage.label(mask, structure=structure)[1]
        if n < self.min_components:
            return "too few components"
        if n > self.max_components:
            return "too many components"
        if vocab is not None and not vocab.binary:
            for label, name in zip(vocab.ids, vocab.names):
                if ndimage.label(labels == label, structure=structure)[1] > self.max_components:
                    return f"too many components of {name}"
        return None


def parse_class_counts(text: str, class_names: list[str], unconditional_ok: bool = True) -> list[int]:
    """'melanoma=5900,nevus=100' -> the class id of every index, classes in the order given; 'none=N' asks for N
    unconditional samples (the null label, id len(class_names)), which needs a model trained with label
    dropout."""
    plan = []
    for item in text.split(","):
        name, sep, count = item.strip().partition("=")
        if not sep or not count.strip().isdigit():
            raise UserError(f"--class_counts: expected name=count, got {item.strip()!r}")
        check_name(name, "--class_counts")
        if name == "none" and "none" not in class_names:
            if not unconditional_ok:
                raise UserError("--class_counts none: the model was trained without label dropout "
                                "(mode.labels.cfg_dropout 0), so it has no unconditional prediction")
            plan += [len(class_names)] * int(count)
            continue
        if name not in class_names:
            raise UserError(f"--class_counts: unknown class {name!r} (the model knows: {', '.join(class_names)})")
        plan += [class_names.index(name)] * int(count)
    if not plan:
        raise UserError("--class_counts asks for no images")
    return plan


def balance_counts(source, balance_to: int | None = None) -> tuple[list[str], dict[str, int], dict[str, int]]:
    """(class names, images per class in the data, images to generate per class) for --balance: a class image
    folder (its train/ split when it has one) or a labels CSV (ISIC, APTOS or filename,label). Each class is
    filled up to the majority count, or to balance_to."""
    from medgen.common import imagefolder
    from medgen.common.data import is_nifti_dataset
    src = Path(source)
    if src.is_file() and src.suffix.lower() == ".csv":
        items, _ = imagefolder.read_labels_csv(src.parent, src)
    elif not src.is_dir():
        raise UserError(f"--balance {src}: no such folder or CSV file")
    elif is_nifti_dataset(src):
        raise UserError(f"--balance {src}: a NIfTI dataset has no classes to balance (give a class image folder "
                        "or a labels CSV)")
    else:
        items, _ = imagefolder.list_items(src / "train" if (src / "train").is_dir() else src, None)
    have: dict[str, int] = {}
    for _, name in items:
        have[name] = have.get(name, 0) + 1
    names = sorted(have)
    target = balance_to if balance_to is not None else max(have.values())
    if balance_to is not None and balance_to < 1:
        raise UserError("--balance_to must be at least 1")
    need = {n: max(0, target - have[n]) for n in names}
    if not any(need.values()):
        raise UserError(f"--balance {src}: nothing to generate, every class already has {target} or more images "
                        f"({', '.join(f'{n} {have[n]}' for n in names)})")
    return names, have, need


def parse_class_models(items: list[str]) -> dict[str, str]:
    """['melanoma=runs/mel', ...] -> {class name: run}."""
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise UserError(f"--class_model: expected NAME=RUN, got {item!r}")
        if name.strip() in out:
            raise UserError(f"--class_model: class {name.strip()!r} is given twice")
        out[name.strip()] = path.strip()
    return out


def load_real_conditions(directory: str, model: Model, positive_only: bool = True, skip_bad: bool = False,
                         compute: str = "auto") -> tuple[torch.Tensor, list[str]]:
    """The model's condition roles (masks, or any modality a mode conditions on) from every split of a NIfTI
    dataset, preprocessed as its training data (size, crop, layout), as (N, C, H, W) in [0, 1] (label maps: their
    ids) ordered by (subject, slice). Slices without mask voxels are left out when a mask is among the roles,
    unless positive_only is False."""
    from medgen.config.paths import PathConfig
    from medgen.common.dataset import load_folder
    roles = model.mode.condition_roles
    data_cfg = replace(model.cfg.data, data_dir=str(directory), positive_only=positive_only, format="nifti",
                       skip_bad=skip_bad)
    cache = PathConfig.from_compute(compute).slice_cache if data_cfg.cache else None
    data = load_folder(data_cfg, Path(directory), roles, cache)
    if len(data) == 0:
        raise UserError(f"--masks_from {directory}: no usable slices of {', '.join(roles)}")
    if MASK_ROLE in roles:
        check_not_binary(data.masks, model.mode.vocab, f"--masks_from {directory}")
    image_roles = [r for r in roles if r != MASK_ROLE]
    channels = [data.masks.float() if r == MASK_ROLE else
                data.images[:, image_roles.index(r)][:, None].float().clamp(0, 1) for r in roles]
    keys = data.slice_keys()
    order = sorted(range(len(keys)), key=lambda i: (data.sources[i], data.slice_index[i]))
    return torch.cat(channels, 1)[order], [keys[i] for i in order]
