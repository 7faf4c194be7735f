"""Where a training run's data live and which modalities its mode reads, and train.py --check_data."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from medgen.common import data as nifti
from medgen.common import imagefolder
from medgen.common.dataset import SliceData, csv_columns, load_split, print_problems, scan_split
from medgen.common.errors import lookup


@dataclass
class DataSource:
    root: Path
    roles: list[str]
    kind: str                   # nifti | images (class folders) | pairs (image + mask PNG folders)
    cache_dir: Path | None
    demo: bool = False          # no data_dir was given: the embedded phantoms

    def split(self, data_cfg, split: str) -> SliceData:
        return load_split(data_cfg, self.root, split, self.roles, self.cache_dir, self.kind, data_cfg.num_workers)


def data_source(cfg) -> DataSource:
    """Where the data of this config live and which modalities its mode reads."""
    from medgen.config.paths import PathConfig
    from medgen.Generation.TrainGen.core.modes import MODES
    mode = lookup(MODES, cfg.mode.name, "--mode")(cfg.mode)
    if cfg.runtime.control_from:             # a ControlNet run reads the masks its control takes
        from medgen.Generation.TrainGen.core.control import ControlledMode
        mode = ControlledMode(mode)
    paths = PathConfig.from_compute(cfg.paths.compute)
    image_folder = cfg.data.format == "images" or (cfg.data.format == "auto" and mode.image_folder)
    root = Path(cfg.data.data_dir) if cfg.data.data_dir else paths.default_data_dir(image_folder)
    cache_dir = Path(cfg.data.cache_dir) if cfg.data.cache_dir else paths.slice_cache
    pairs = cfg.data.format == "pairs" or (cfg.data.format == "auto" and mode.needs == "image"
                                           and imagefolder.is_pair_folder(root))
    kind = "pairs" if pairs else "images" if image_folder else "nifti"
    return DataSource(root, mode.roles(), kind, cache_dir if cfg.data.cache else None,
                      demo=not cfg.data.data_dir and paths.compute == "local")


def check_every_modality(cfg, src: DataSource) -> int:
    """--check_data without --mode on NIfTI data: every modality the layout names that a subject has is read
    in full and checked (a NaN in t1_pre is found even when no mode reads it). 1 if anything is fatal."""
    layout = nifti.layout_from_config(cfg.data)
    splits = nifti.find_splits(src.root, layout, cfg.data.val_fraction, cfg.data.split_seed)
    subjects = [s for split in splits.values() for s in split]
    n_fatal, seen = 0, set()
    for subject in tqdm(subjects, desc="checking", leave=False, disable=len(subjects) < 20):
        roles = [r for r in layout.patterns if nifti.subject_files(subject, layout, [r])[0]]
        seen.update(roles)
        problems = nifti.load_subject(subject, layout, roles)[1]
        print_problems([("" if p.fatal else "warning: ") + str(p) for p in problems])
        n_fatal += sum(p.fatal for p in problems)
    if n_fatal and not cfg.data.skip_bad:
        print(f"{src.root}: {n_fatal} problem(s) found in {len(subjects)} subjects", file=sys.stderr)
        return 1
    print(f"{src.root}: OK ({len(subjects)} subjects; modalities {', '.join(r for r in layout.patterns if r in seen)})")
    return 0


def check_data(cfg, every_modality: bool = False) -> int:
    """--check_data: scan every split in full; one line per problem; 1 if anything fatal (unless skip_bad).
    every_modality (no --mode given): on NIfTI data, check every modality present, not only the mode's."""
    src = data_source(cfg)
    if every_modality and src.kind == "nifti":
        return check_every_modality(cfg, src)
    if src.kind == "pairs":
        splits = imagefolder.find_pair_splits(src.root, cfg.data.val_fraction, cfg.data.split_seed,
                                              cfg.data.patient_pattern)[0]
    elif src.kind == "images":
        splits = imagefolder.find_image_splits(src.root, cfg.data.labels_csv, cfg.data.val_fraction, 0,
                                               csv_columns(cfg.data), cfg.data.patient_pattern)[0]
    else:
        splits = nifti.find_splits(src.root, nifti.layout_from_config(cfg.data), cfg.data.val_fraction,
                                   cfg.data.split_seed)
    n_fatal, n_slices = 0, {}
    for split in splits:
        data, lines, fatal = scan_split(cfg.data, src.root, split, src.roles, src.cache_dir, src.kind,
                                        cfg.data.num_workers)
        print_problems(lines)
        n_fatal += fatal
        n_slices[split] = len(data)
    unit = "volumes" if cfg.data.spatial_dims == 3 else "slices"
    summary = ", ".join(f"{s}: {n} {unit}" for s, n in n_slices.items())
    if n_fatal:
        print(f"{src.root}: {n_fatal} problem(s) found ({summary}); fix them or pass --skip_bad", file=sys.stderr)
        return 1
    print(f"{src.root}: OK ({summary}; modalities {', '.join(src.roles)})")
    return 0
