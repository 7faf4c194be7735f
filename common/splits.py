"""Which subjects a model was trained on, recorded without their names, so that an evaluation can refuse test
data the generator has seen.

A unit is what the splits keep together: the subject folder of a NIfTI dataset, the file of a 2D image. The
run stores the SHA-256 of each unit's name (folder or file name: hospital exports name subjects by MRN or
accession number, so names never leave the run), per split, with the split's settings; generate.py copies
that record into generation.json, and the utility study and the memorization audit compare it with their own
val and test units.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from medgen.common.errors import UserError


def unit_name(source: str) -> str:
    """The name a unit is matched by: the subject folder's or the image file's name (the same subject under
    another root, or in another split folder, is the same subject)."""
    return Path(source).name


def digest(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()[:20]


def anonymous_key(slice_key: str) -> str:
    """'<subject folder>#slice<k>' -> 'sha256:<digest of the folder name>#slice<k>': what a manifest records of a
    real slice with --anonymize_sources, and what evaluation computes from its own real slices to pair them."""
    path, sep, rest = slice_key.partition("#")
    return f"sha256:{digest(unit_name(path))}{sep}{rest}"


def source_unit_digest(key: str) -> str:
    """The hashed unit of a real slice key as a manifest records it, plain or anonymous (anonymous_key)."""
    path = key.partition("#")[0]
    return path[len("sha256:"):] if path.startswith("sha256:") else digest(unit_name(path))


def units_record(data_cfg, train_sources: list[str], val_sources: list[str]) -> dict:
    """What a training run records of its data: the split settings and the hashed unit names per split."""
    hashed = lambda sources: sorted({digest(unit_name(s)) for s in sources})  # noqa: E731
    return {"data_dir_name": Path(data_cfg.data_dir).name if data_cfg.data_dir else None,
            "split_seed": data_cfg.split_seed, "val_fraction": data_cfg.val_fraction,
            "train": hashed(train_sources), "val": hashed(val_sources)}


def check_no_leak(records: dict[str, dict], sets: dict[str, list[str]], what: str) -> list[str]:
    """Refuse evaluation units (val/test sources) that a generator trained on, naming them; return notes on
    units that were the generator's validation data (it chose its best checkpoint on them)."""
    notes = []
    for model, rec in records.items():
        trained, validated = set(rec.get("train", ())), set(rec.get("val", ()))
        for split, sources in sets.items():
            names = sorted({unit_name(s) for s in sources})
            leaked = [n for n in names if digest(n) in trained]
            if leaked:
                shown = ", ".join(leaked[:10]) + (f" and {len(leaked) - 10} more" if len(leaked) > 10 else "")
                raise UserError(f"{what}: {len(leaked)} of the {len(names)} {split} subjects/images were in the "
                                f"training split of the {model} model that made the synthetic data ({shown}); "
                                "evaluate on data the generator never saw (the generator's own val split, a test "
                                "folder, or --split-seed / --val-fraction as the generator was trained)")
            seen = [n for n in names if digest(n) in validated]
            if seen:
                notes.append(f"{len(seen)} of the {len(names)} {split} subjects/images were the {model} model's "
                             "validation data (it picked its best checkpoint on them)")
    return notes
