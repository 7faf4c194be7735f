"""The downstream task's data: the real train/val/test splits and the synthetic sets, as tensors with the units
the statistics resample (the subject folder of a NIfTI slice, the file of a 2D image).

Every set is read by the training loaders (common.dataset), so a synthetic folder written by generate.py, a
NIfTI dataset, images/ + masks/ PNG folders and class image folders all work, preprocessed exactly as for
training. Masks are binary (the layout's tumour labels), or label maps with a vocabulary (labels=brats2021, ...:
common/labels.py), scored per region.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from medgen.common import data as nifti
from medgen.common import imagefolder
from medgen.common.data import GENERATED_MARKER, SPLIT_NAMES, DataConfig, is_nifti_dataset
from medgen.common.dataset import SliceData, load_split
from medgen.common.errors import UserError
from medgen.common.labels import BINARY, Vocabulary, config_fields, vocabulary
from medgen.common.splits import check_scheme, patient_units, source_unit_digest, unit_name
from medgen.config.paths import PathConfig
from medgen.eval.obj_eval.core.inpainting import is_inpainted
from medgen.eval.obj_eval.core.inputs import existing_folder, manifest_conditions, native_size
from medgen.eval.obj_eval.utility.scores import MIN_TEST_UNITS

TASKS = ("segmentation", "classification")


@dataclass
class TaskSet:
    name: str                      # what it is, for messages and the report ("real test", "synthetic S")
    images: torch.Tensor           # (N, C, H, W) float32 in [0, 1]; volumes (N, C, D, H, W)
    targets: torch.Tensor          # segmentation: (N, 1, H, W) float {0, 1} or label ids; classification: (N,) int64
    units: list[str]               # the resampling unit of each item: subject folder or image file
    ids: list[str]                 # '<subject>#slice<k>' or the image path relative to the dataset
    classes: list[str] = field(default_factory=list)
    spacing: torch.Tensor | None = None   # volumes: (N, 3) grid spacing in mm, (D, H, W) order (HD95 in mm)
    vocab: Vocabulary = BINARY            # segmentation: what the mask values mean
    edited_from: dict[str, tuple] | None = None  # --inpaint_into: {sample folder: (scheme, digest) of its scan}

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, index) -> "TaskSet":
        index = [int(i) for i in index]
        return TaskSet(self.name, self.images[index], self.targets[index], [self.units[i] for i in index],
                       [self.ids[i] for i in index], self.classes,
                       None if self.spacing is None else self.spacing[index], self.vocab, self.edited_from)

    def unit_index(self) -> tuple[list[str], np.ndarray]:
        """(unit names in first-seen order, the unit number of each item)."""
        names: dict[str, int] = {}
        idx = np.array([names.setdefault(u, len(names)) for u in self.units], dtype=np.int64)
        return list(names), idx

    def counts(self) -> np.ndarray:
        return np.bincount(self.targets.numpy(), minlength=len(self.classes))


def concat(name: str, parts: list[TaskSet]) -> TaskSet:
    parts = [p for p in parts if len(p)]
    spacing = torch.cat([p.spacing for p in parts]) if all(p.spacing is not None for p in parts) else None
    return TaskSet(name, torch.cat([p.images for p in parts]), torch.cat([p.targets for p in parts]),
                   [u for p in parts for u in p.units], [i for p in parts for i in p.ids], parts[0].classes, spacing,
                   parts[0].vocab)


def kind_of(root: Path) -> str:
    if is_nifti_dataset(root):
        return "nifti"
    return "pairs" if imagefolder.is_pair_folder(root) else "images"


def task_of(root: Path) -> str:
    return "classification" if kind_of(root) == "images" else "segmentation"


def _config(root: Path, size, positive_only: bool, layout: str, val_fraction: float, seed: int,
            skip_bad: bool = False, vocab: Vocabulary = BINARY, labels_csv: str | None = None,
            patient_pattern: str | None = None) -> DataConfig:
    """`size`: the evaluation size in px, or a volume grid [H, W, D] (whole volumes, data.spatial_dims 3);
    `labels_csv`: a flat image folder's labels, as the trainer's data.labels_csv."""
    volume = list(size) if isinstance(size, (list, tuple)) else None
    return DataConfig(data_dir=str(root), image_size=128 if volume else size, positive_only=positive_only,
                      layout=layout, val_fraction=val_fraction, split_seed=seed, format="auto", skip_bad=skip_bad,
                      spatial_dims=3 if volume else 2, volume_shape=volume or [64, 64, 48], labels_csv=labels_csv,
                      patient_pattern=patient_pattern, **config_fields(vocab))


def _split_names(cfg: DataConfig, root: Path, kind: str) -> list[str]:
    if kind == "nifti":
        splits = nifti.find_splits(root, nifti.layout_from_config(cfg), cfg.val_fraction, cfg.split_seed)
    elif kind == "pairs":
        splits = imagefolder.find_pair_splits(root, cfg.val_fraction, cfg.split_seed, cfg.patient_pattern)[0]
    else:
        splits = imagefolder.find_image_splits(root, cfg.labels_csv, cfg.val_fraction, cfg.split_seed, None,
                                               cfg.patient_pattern)[0]
    return [s for s, items in splits.items() if items]


def _to_taskset(name: str, data: SliceData, kind: str, root: Path, vocab: Vocabulary = BINARY,
                patient_pattern: str | None = None) -> TaskSet:
    images = data.images.float()
    if kind == "images":
        targets = data.labels.long()
    else:
        if data.masks is None:
            raise UserError(f"{root}: no masks to train a segmenter on (segmentation needs seg files or masks/)")
        targets = (data.masks > 0).float() if vocab.binary else data.masks.float()
    if kind == "nifti":
        ids = [f"{Path(s).name}#slice{k}" if k >= 0 else Path(s).name for s, k in zip(data.sources, data.slice_index)]
    else:
        ids = [str(Path(s).resolve().relative_to(root.resolve())) for s in data.sources]
    spacing = data.spacing.float() if data.spacing is not None else None
    units = patient_units(list(data.sources), patient_pattern if kind != "nifti" else None)
    return TaskSet(name, images, targets, units, ids, list(data.class_names), spacing, vocab)


def _load(root: Path, split: str, kind: str, cfg: DataConfig, roles: list[str], compute: str, name: str) -> TaskSet:
    cache = PathConfig.from_compute(compute).slice_cache
    data = load_split(cfg, root, split, roles, cache, kind)
    skipped = [p for p in data.problems if p.startswith("skipped")]
    if skipped:   # a synthetic set: a blank sample is a generation failure, counted and named, not a stop
        warn(f"{name}: {len(skipped)} sample(s) left out, e.g. {skipped[0]}")
    return _to_taskset(name, data, kind, root, vocabulary(cfg) if kind == "nifti" else BINARY, cfg.patient_pattern)


def carve(ts: TaskSet, fraction: float, seed: int, names: tuple[str, str]) -> tuple[TaskSet, TaskSet]:
    """Split a set by unit (whole subjects stay together): (the rest, about `fraction` of the units)."""
    units, idx = ts.unit_index()
    order = np.random.default_rng(seed).permutation(len(units))
    n_held = max(1, int(round(len(units) * fraction))) if len(units) > 1 else 0
    held = np.isin(idx, order[:n_held])
    rest, out = ts.subset(np.flatnonzero(~held)), ts.subset(np.flatnonzero(held))
    rest.name, out.name = names
    return rest, out


def dataset_root(path, flag: str) -> tuple[Path, str | None]:
    """A dataset root, given the root or its train/ split folder (then the root, and a note saying so)."""
    p = existing_folder(path, flag)
    if p.name in SPLIT_NAMES and (p.parent / "train").is_dir():
        if p.name != "train":
            raise UserError(f"{flag} {p}: this is the {p.name} split; give the training data (the dataset root "
                            f"{p.parent} or its train/ folder)")
        return p.parent, (f"{flag} {p} is a train split: its dataset root {p.parent} is read (train/ is the "
                          "training data, val/ and test/ the held-out data)")
    return p, None


def generator_records(synthetic_dirs: list) -> dict[str, dict]:
    """{'<folder> <role> model': training-units record} from each synthetic folder's generation.json (generate.py
    writes what each model trained on, hashed: common/splits.py); folders without one give nothing."""
    import json
    out = {}
    for d in synthetic_dirs:
        path = Path(d) / GENERATED_MARKER
        try:
            rec = json.loads(path.read_text()).get("training_data") or {} if path.is_file() else {}
        except (OSError, ValueError):
            rec = {}
        out.update({f"{Path(d).name} {role}": r for role, r in rec.items() if isinstance(r, dict)})
    return out


def split_settings(records: dict[str, dict], split_seed: int | None, val_fraction: float | None) -> tuple[int, float, str]:
    """(split seed, val fraction, where they come from) for a flat dataset: the flags, else the generator's own
    (its image model's first), else the training defaults."""
    recs = sorted(records.items(), key=lambda kv: not kv[0].endswith(" image"))
    seed = split_seed if split_seed is not None else next((r["split_seed"] for _, r in recs if "split_seed" in r), None)
    frac = val_fraction if val_fraction is not None else next((r["val_fraction"] for _, r in recs
                                                               if "val_fraction" in r), None)
    how = "--split-seed/--val-fraction" if split_seed is not None or val_fraction is not None else \
        "the generator's split settings" if seed is not None else "the training defaults"
    default = DataConfig()
    return (default.split_seed if seed is None else seed), (default.val_fraction if frac is None else frac), how


def load_real(root, size: int, image_roles: list[str], positive_only: bool = False, layout: str = "original",
              seed: int = 0, compute: str = "auto", generators: dict[str, dict] | None = None,
              split_seed: int | None = None, val_fraction: float | None = None,
              flag: str = "--real_dir", vocab: Vocabulary = BINARY, labels_csv: str | None = None,
              patient_pattern: str | None = None) -> tuple[dict[str, TaskSet], list[str]]:
    """({'train', 'val', 'test'}: TaskSet, notes). A flat folder is split as the generator split it (its record
    in `generators`, or --split-seed / --val-fraction); a flat image folder with a labels CSV (`labels_csv`,
    as the trainer's data.labels_csv: APTOS train_images/ + train.csv) is read and split as the trainer reads
    it; `patient_pattern` (as data.patient_pattern) makes each image file's patient its unit: a flat folder is
    split by patient, and a patient with images in two given splits is refused; a missing test split is carved
    from val by subject (half of it), a missing val split from train (a fifth); the notes say so. Any val or
    test unit that a generator trained on is refused, naming it (generators None: no synthetic data to check
    against)."""
    from medgen.common.splits import check_no_leak
    root = existing_folder(root, flag)
    kind = "images" if labels_csv else kind_of(root)
    if labels_csv and not Path(labels_csv).is_file():
        raise UserError(f"--labels-csv {labels_csv}: no such file")
    s_seed, s_frac, how = split_settings(generators or {}, split_seed, val_fraction)
    patient_pattern = patient_setting(generators or {}, patient_pattern, kind)
    cfg = _config(root, size, positive_only, layout, s_frac, s_seed, vocab=vocab if kind == "nifti" else BINARY,
                  labels_csv=labels_csv, patient_pattern=patient_pattern)
    roles = image_roles + ["seg"] if kind == "nifti" else []
    names = _split_names(cfg, root, kind)
    if "train" not in names:
        raise UserError(f"{flag} {root}: no training split (expected {root}/train/ or a flat folder of "
                        f"subjects or class folders)")
    for s in ("val", "test"):
        if (root / s).is_dir() and s not in names:
            raise UserError(f"{flag} {root}: the {s} split ({root / s}) is empty")
    sets = {s: _load(root, s, kind, cfg, roles, compute, f"real {s}") for s in ("train", "val", "test") if s in names}
    notes = []
    by = "subject" if kind == "nifti" else f"patient (--patient-pattern {patient_pattern!r})" if patient_pattern \
        else "image file"
    if labels_csv or not any((root / s).is_dir() for s in SPLIT_NAMES):
        notes.append(f"{root} has no split folders: split by {by} with seed {s_seed} and val fraction {s_frac:g} "
                     f"({how})" + ("" if kind == "nifti" or patient_pattern else
                                   "; a patient with several images (views, visits, both eyes) can have images on "
                                   "both sides, which the content check does not see: give --patient-pattern (a "
                                   "regex for the patient in the file names) or split by patient into train/ val/ "
                                   "test/ folders yourself"))
    if "val" not in sets:
        sets["train"], sets["val"] = carve(sets["train"], 0.2, seed, ("real train", "real val"))
        notes.append(f"no val split in {root}: a fifth of the training subjects (seeded) is the validation set")
    if "test" not in sets:
        n_val = len(set(sets["val"].units))
        if n_val < 2:
            raise UserError(f"{flag} {root}: no test split, and too few validation subjects to carve one "
                            f"(add {root}/test/)")
        sets["val"], sets["test"] = carve(sets["val"], 0.5, seed, ("real val", "real test"))
        n_test = len(set(sets["test"].units))
        notes.append(f"no test split in {root}: {n_test} of the {n_val} validation subjects (seeded) are the test "
                     f"set; add {root}/test/ for a fixed one" +
                     (f" (warning: {n_test} test subjects is too few for a verdict, which needs {MIN_TEST_UNITS})"
                      if n_test < MIN_TEST_UNITS else ""))
    for s in ("val", "test"):
        if len(sets[s]) == 0:
            raise UserError(f"{flag} {root}: the {s} split is empty")
    if patient_pattern and kind != "nifti":
        check_patients_apart(sets, f"{flag} {root}")
    check_no_copies(sets, f"{flag} {root}")
    if generators:
        notes += check_no_leak(generators, {s: sets[s].units for s in ("val", "test")}, f"{flag} {root}")
    elif generators is not None:
        notes.append("no generator record (a synthetic folder from generate.py holds one): the test subjects could "
                     "not be checked against the generator's training data")
    return sets, notes


def patient_setting(records: dict[str, dict], given: str | None, kind: str) -> str | None:
    """The patient pattern of the study: the flag, else the generator's (its training record). A flag that
    differs from the generator's would compare other units than the ones it recorded: refused."""
    from medgen.common.names import patient_regex
    if given is not None:
        patient_regex(given, "--patient-pattern")
    recorded = next((r["patient_pattern"] for r in records.values() if r.get("patient_pattern")), None)
    if given is not None and recorded is not None and given != recorded:
        raise UserError(f"--patient-pattern {given!r}: the generator grouped its training images by "
                        f"{recorded!r}; give the same pattern, so that its training patients are the ones checked")
    if given is not None and kind == "nifti":
        raise UserError("--patient-pattern: NIfTI data are already grouped by subject folder; the pattern is for "
                        "image folders")
    return given if given is not None else recorded if kind != "nifti" else None


def check_patients_apart(sets: dict[str, TaskSet], what: str) -> None:
    """Refuse a patient with images in two splits (given split folders that were not split by patient)."""
    seen: dict[str, str] = {}
    for split in ("train", "val", "test"):
        for unit in dict.fromkeys(sets[split].units):
            other = seen.setdefault(unit_name(unit), split)
            if other != split:
                raise UserError(f"{what}: patient {unit_name(unit)!r} has images in both the {other} and the {split} "
                                "split: a patient's images belong on one side (move them, or split the flat "
                                "folder with --patient-pattern)")


def check_no_copies(sets: dict[str, TaskSet], what: str) -> None:
    """Refuse val or test subjects whose content copies a training subject (common/leaks.py): a renamed
    re-release, a symlink or a re-cased copy is a leak that a name check cannot see."""
    from medgen.common.leaks import MATCH_RMS, find_copies
    train = sets["train"]
    for split in ("val", "test"):
        copies = find_copies(train.images, train.units, sets[split].images, sets[split].units)
        if copies:
            shown = "; ".join(f"{unit_name(c.unit)} copies {unit_name(c.source)} ({c.matched} of its {c.informative} "
                              "slices)" for c in copies[:5]) + (f"; and {len(copies) - 5} more" if len(copies) > 5
                                                                else "")
            raise UserError(f"{what}: {len(copies)} {split} subject(s)/image(s) hold the same images as training "
                            f"subjects, identical to within an RMS of {MATCH_RMS:g}: {shown}; a held-out copy of "
                            "training data (a re-release under new ids, a renamed folder, a symlink) makes every "
                            "score optimistic: remove it from one split")


def load_synthetic(root, size: int, image_roles: list[str], real: TaskSet, compute: str = "auto",
                   native: int | None = None) -> TaskSet:
    """A whole synthetic folder as one set, checked against the real data: the same task, channels and classes,
    and images at least as large as the evaluation size (upsampled synthetic images would be judged on blur).
    `native`: the folder's image size when already read (native_sizes)."""
    root = existing_folder(root, "--synthetic_dir")
    kind = kind_of(root)
    real_task = "classification" if real.classes else "segmentation"
    if task_of(root) != real_task:
        raise UserError(f"--synthetic_dir {root}: a {task_of(root)} dataset, but --real_dir is a {real_task} one")
    native = native if native is not None or not isinstance(size, int) else native_size(root, "--synthetic_dir")
    if isinstance(size, int) and native < size:
        raise UserError(f"--synthetic_dir {root}: images are {native} px, smaller than the evaluation size {size} "
                        f"px (--image_size {native}, or generate at {size} px)")
    cfg = _config(root, size, False, "original", 0.0, 0, skip_bad=True, vocab=real.vocab if kind == "nifti" else BINARY)
    roles = image_roles + ["seg"] if kind == "nifti" else []
    parts = [_load(root, s, kind, cfg, roles, compute, f"synthetic {root.name}") for s in _split_names(cfg, root, kind)]
    if not parts:
        raise UserError(f"--synthetic_dir {root}: no images")
    ts = concat(f"synthetic {root.name}", parts)
    if ts.images.shape[1] != real.images.shape[1]:
        raise UserError(f"--synthetic_dir {root}: {ts.images.shape[1]}-channel images, the real data has "
                        f"{real.images.shape[1]} channel(s)")
    if real.classes:
        unknown = sorted(set(ts.classes) - set(real.classes))
        if unknown:
            raise UserError(f"--synthetic_dir {root}: class {unknown[0]!r} is not a class of the real data "
                            f"({', '.join(real.classes)})")
        remap = torch.tensor([real.classes.index(c) for c in ts.classes], dtype=torch.long)
        ts.targets, ts.classes = remap[ts.targets], list(real.classes)
    ts.edited_from = edited_sources(root)
    return ts


def edited_sources(root: Path) -> dict[str, tuple[str, str]] | None:
    """A folder that generate.py --inpaint_into wrote: {sample folder name: the hashed unit (subject or image) of
    the real scan its lesion was inserted into, as (digest scheme, digest)}, from the manifest; None for any other
    folder."""
    if not is_inpainted(root):
        return None
    out = {name: source_unit_digest(cond) for name, cond in manifest_conditions(root).items() if cond}
    for scheme in {s for s, _ in out.values()}:
        check_scheme(scheme, f"--synthetic_dir {root}: the manifest's source scans")
    if not out:
        raise UserError(f"--synthetic_dir {root}: lesions inserted into real scans (generation.json), but its "
                        "manifest.csv names no source scan")
    return out


def mask_vocabulary(synthetic_dirs: list, given: str | None) -> Vocabulary:
    """The label vocabulary to read masks with: --labels when given, else the one the synthetic folders'
    generator recorded in generation.json (binary without a record); folders of different vocabularies, or a
    --labels that contradicts their record, are refused."""
    from medgen.common.labels import PRESETS, from_record
    import json
    recorded = {}
    for d in synthetic_dirs:
        path = Path(d) / GENERATED_MARKER
        try:
            rec = json.loads(path.read_text()).get("labels") if path.is_file() else None
        except (OSError, ValueError):
            rec = None
        if rec:
            recorded[str(d)] = from_record(rec)
    names = {v.name for v in recorded.values()}
    if len(set(recorded.values())) > 1:
        raise UserError("--synthetic_dir: the folders hold masks of different label vocabularies (" +
                        ", ".join(f"{d}: {v.describe()}" for d, v in recorded.items()) + ")")
    if given and names and given not in names:
        d, v = next(iter(recorded.items()))
        raise UserError(f"--labels {given}: {d} holds masks of the vocabulary {v.describe()} (its generation.json); "
                        f"pass --labels {v.name}")
    if given == "custom":
        raise UserError("--labels custom: a custom vocabulary is read from the synthetic folders' generation.json")
    if given:
        if given not in PRESETS:
            raise UserError(f"--labels {given!r} is unknown (choose from {', '.join(PRESETS)})")
        return PRESETS[given]
    return next(iter(recorded.values())) if recorded else BINARY


def native_sizes(synthetic_dirs: list[str]) -> dict[str, int]:
    """{folder: its image size}, each folder's files read once."""
    return {d: native_size(existing_folder(d, "--synthetic_dir"), "--synthetic_dir") for d in synthetic_dirs}


def default_size(natives: dict[str, int], real_dir: str) -> int:
    """The evaluation size: the smallest native size among the synthetic sets (the real set's without any)."""
    if natives:
        return min(natives.values())
    return native_size(existing_folder(real_dir, "--real_dir"), "--real_dir")


def describe(ts: TaskSet) -> str:
    units = len(set(ts.units))
    extra = (", " + ", ".join(f"{c} {n}" for c, n in zip(ts.classes, ts.counts()))) if ts.classes else ""
    if ts.edited_from:
        extra += f", lesions inserted into scans of {len(set(ts.edited_from.values()))} real training subjects/images"
    return f"{ts.name}: {len(ts)} images from {units} {'subjects' if units < len(ts) else 'files'}{extra}"


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)
