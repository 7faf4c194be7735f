"""Intensity per label region, real against synthetic: do the generated sequences put enhancement and edema where
the label map says? For each sequence and label, the mean intensity inside the label divided by the mean of the
normal tissue (non-zero pixels outside the whole lesion) of the same subject or sample, and with T1-pre and T1-gd
both present the enhancement ratio (T1-gd / T1-pre inside the label, over the same ratio in normal tissue). A
subject (real) or sample (synthetic) is one unit: its slices are pooled, the mean over units carries a bootstrap
interval over units, and a label absent from a unit leaves that unit out for it."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from medgen.common.data import DataConfig
from medgen.common.dataset import load_folder
from medgen.common.errors import UserError
from medgen.common.labels import Vocabulary, config_fields
from medgen.config.paths import PathConfig
from medgen.eval.obj_eval.core import metrics as M
from medgen.eval.obj_eval.core.inputs import existing_folder

SEQUENCES = ("t1_pre", "t1_gd", "bravo", "t2")
MIN_UNITS = 2            # units with a label below which its figure is not given


def sequences_of(root: Path) -> list[str]:
    """The image sequences a generated folder holds (its first sample's files), in SEQUENCES order."""
    sample = next((d for d in sorted(Path(root).glob("sample_*")) if d.is_dir()), None)
    have = {p.name.split(".")[0] for p in sample.iterdir()} if sample else set()
    return [s for s in SEQUENCES if s in have]


def unit_sums(root: Path, roles: list[str], vocab: Vocabulary, size: int, layout: str, compute: str) -> dict:
    """{role: {label or 'normal': (intensity sum, pixel count) per unit}} of a NIfTI folder."""
    cfg = DataConfig(data_dir=str(root), image_size=size, layout=layout, format="nifti", val_fraction=0.0,
                     positive_only=True, **config_fields(vocab))
    data = load_folder(cfg, root, roles + ["seg"], PathConfig.from_compute(compute).slice_cache)
    units = list(dict.fromkeys(data.sources))
    unit_of = torch.tensor([units.index(s) for s in data.sources])
    return tensor_sums(data.images.float(), data.masks.float(), unit_of, roles, vocab)


def tensor_sums(images: torch.Tensor, labels: torch.Tensor, unit_of: torch.Tensor, roles: list[str],
                vocab: Vocabulary) -> dict:
    """unit_sums of tensors: images (N, C, ...) with one channel per role, label maps (N, 1, ...), the unit of
    each item."""
    n = int(unit_of.max()) + 1 if len(unit_of) else 0
    labels = labels[:, 0].long()
    normal = (labels == 0) & (images.amax(1) > 0)              # brain outside the lesion
    total = lambda x: torch.zeros(n, dtype=torch.float64).index_add_(  # noqa: E731
        0, unit_of, x.flatten(1).sum(1).double()).numpy()
    regions = [("normal", normal)] + [(name, labels == i) for i, name in zip(vocab.ids, vocab.names)]
    return {role: {name: (total(images[:, k] * mask), total(mask.float())) for name, mask in regions}
            for k, role in enumerate(roles)}


def ratios(sums: dict, roles: list[str], vocab: Vocabulary) -> dict[str, np.ndarray]:
    """{'intensity_<role>_<label>': per-unit contrast, 'enhancement_<label>': ...} from unit_sums."""
    out = {f"intensity_{role}_{name}": _ratio(sums[role], name) for role in roles for name in vocab.names}
    if "t1_pre" in roles and "t1_gd" in roles:
        out.update({f"enhancement_{name}": _ratio(sums["t1_gd"], name) / _ratio(sums["t1_pre"], name)
                    for name in vocab.names})
    return out


def _ratio(per: dict, label: str) -> np.ndarray:
    """Mean inside `label` over mean of normal tissue, per unit (NaN where either is empty)."""
    (s, c), (sn, cn) = per[label], per["normal"]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((c > 0) & (cn > 0) & (sn > 0), (s / np.maximum(c, 1)) / (sn / np.maximum(cn, 1)), np.nan)


def _summary(values: np.ndarray, seed: int) -> dict:
    v = values[np.isfinite(values)]
    return {"value": float(v.mean()) if len(v) >= MIN_UNITS else None, "n": int(len(v)),
            "ci95": M.bootstrap_mean_ci(v, 1000, seed) if len(v) >= MIN_UNITS else None}


def region_intensity_records(synthetic_dir, real_dir, vocab: Vocabulary, size: int, layout: str = "original",
                             compute: str = "auto", seed: int = 0) -> list[dict]:
    """One record per (sequence, label) and per label's enhancement ratio: synthetic value and CI, the real
    images' value beside it (`real`), the units counted."""
    syn_root, real_root = existing_folder(synthetic_dir, "--synthetic-dir"), existing_folder(real_dir, "--real-dir")
    roles = sequences_of(syn_root)
    if not roles:
        raise UserError(f"--synthetic-dir {syn_root}: no generated sequences (sample_*/<sequence>.nii.gz)")
    if vocab.binary:
        raise UserError("region intensities need label maps (--labels brats2021, or a generation.json that records "
                        "one); these masks are binary")
    syn, real = (ratios(unit_sums(r, roles, vocab, size, lay, compute), roles, vocab)
                  for r, lay in ((syn_root, "original"), (real_root, layout)))
    method = {"units": "subjects (real) and samples (synthetic), slices pooled", "normal": "non-zero pixels "
              "outside the whole lesion", "ci": "bootstrap over units (1000 resamples)"}
    records = []
    for metric in syn:
        s, r = _summary(syn[metric], seed), _summary(real[metric], seed)
        role_label = metric.split("_", 1)[1]
        what = (f"mean {role_label.rsplit('_', 1)[0]} in {role_label.rsplit('_', 1)[1]} / in normal tissue"
                if metric.startswith("intensity_") else
                f"(T1-gd / T1-pre in {role_label}) over the same ratio in normal tissue")
        records.append({"metric": metric, **s, "n": {"synthetic": s["n"], "real": r["n"]}, "real": r,
                        "method": {**method, "ratio": what}})
    return records
