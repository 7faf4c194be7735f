"""Which subjects a model was trained on, recorded without their names, so that an evaluation can refuse test
data the generator has seen.

A unit is what the splits keep together: the subject folder of a NIfTI dataset, the file of a 2D image. The
run stores a keyed digest (HMAC-SHA-256 with this site's secret key) of each unit's name, per split, with the
split's settings and the key's id; generate.py copies that record into generation.json, and the utility study
and the memorization audit compare it with their own val and test units. The key is what makes a digest
irreversible: hospital exports name subjects by MRN or accession number, and an unkeyed hash of such a name is
found by trying every candidate number (10^4 MRNs in milliseconds). It lives outside every output folder
(MEDGEN_KEY_FILE, default ~/.config/medgen/unit-key, made on first use); records made with another key cannot be
compared and are refused, naming both key ids. Records from before keyed digests (no key id) are read as the
unkeyed SHA-256 they are.
"""
from __future__ import annotations

import functools
import hashlib
import hmac
import os
import secrets
from pathlib import Path

from medgen.common.errors import UserError

KEY_ENV = "MEDGEN_KEY_FILE"
LEGACY = "sha256"          # the scheme of records written before keyed digests: plain SHA-256 of the name
KEYED_PREFIX = "hmac:"     # a manifest's anonymous slice key; "sha256:" marks a legacy (unkeyed) one


def unit_name(source: str) -> str:
    """The name a unit is matched by: the subject folder's or the image file's name (the same subject under
    another root, or in another split folder, is the same subject)."""
    return Path(source).name


def key_path() -> Path:
    given = os.environ.get(KEY_ENV)
    if given:
        return Path(given).expanduser()
    config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return config / "medgen" / "unit-key"


@functools.lru_cache(maxsize=4)
def _key_at(path: Path) -> bytes:
    """The site key at path, made (32 random bytes, readable by its owner only) when no file is there. Two
    processes making it at once agree: the key is linked onto its name, and whoever comes second reads it."""
    if not path.exists():
        if os.environ.get(KEY_ENV):
            raise UserError(f"{KEY_ENV}={path}: no such key file (it is made on first use only at the default "
                            "place; give the key file the training used, or unset the variable)")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(32))
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass
            finally:
                tmp.unlink()
        except OSError as e:
            raise UserError(f"cannot make the site key {path} ({e.strerror or e}); set {KEY_ENV} to a key file "
                            "(32 or more random bytes, kept outside every output folder)") from None
    try:
        key = path.read_bytes()
    except OSError as e:
        raise UserError(f"{KEY_ENV} {path}: cannot read the site key ({e.strerror or e})") from None
    if len(key) < 16:
        raise UserError(f"site key {path}: {len(key)} bytes; a key needs at least 16 random bytes")
    return key


def site_key() -> bytes:
    return _key_at(key_path())


def key_id() -> str:
    """What records name the key by: a digest of it that reveals nothing of the key."""
    return hmac.new(site_key(), b"medgen key id", hashlib.sha256).hexdigest()[:12]


def digest(name: str, scheme: str | None = None) -> str:
    """A unit name's digest: keyed with the site key (scheme None or this key's id), or the legacy unkeyed
    SHA-256 (scheme 'sha256'). A scheme naming another key is refused (check_scheme)."""
    if scheme == LEGACY:
        return hashlib.sha256(name.encode()).hexdigest()[:20]
    if scheme is not None:
        check_scheme(scheme, "a record")
    return hmac.new(site_key(), name.encode(), hashlib.sha256).hexdigest()[:20]


def scheme_of(record: dict) -> str:
    """The digest scheme of a units record: its key id, or legacy SHA-256 when it names none."""
    return record.get("key_id") or LEGACY


def check_scheme(scheme: str, what: str) -> None:
    if scheme != LEGACY and scheme != key_id():
        raise UserError(f"{what} was hashed with site key {scheme}, and this machine's key ({key_path()}) is "
                        f"{key_id()}: the subjects cannot be compared; set {KEY_ENV} to the key file the training "
                        "or generation used")


def anonymous_key(slice_key: str) -> str:
    """'<subject folder>#slice<k>' -> 'hmac:<keyed digest of the folder name>#slice<k>': what a manifest records
    of a real slice with --anonymize_sources, and what evaluation computes from its own real slices to pair them."""
    path, sep, rest = slice_key.partition("#")
    return f"{KEYED_PREFIX}{digest(unit_name(path))}{sep}{rest}"


def legacy_anonymous_key(slice_key: str) -> str:
    """The unkeyed 'sha256:' form that manifests written before keyed digests hold."""
    path, sep, rest = slice_key.partition("#")
    return f"sha256:{digest(unit_name(path), LEGACY)}{sep}{rest}"


def source_unit_digest(key: str) -> tuple[str, str]:
    """(scheme, digest) of the unit of a real slice key as a manifest records it: a path (keyed here), a keyed
    anonymous key, or a legacy 'sha256:' one."""
    path = key.partition("#")[0]
    if path.startswith(KEYED_PREFIX):
        return key_id(), path[len(KEYED_PREFIX):]
    if path.startswith("sha256:"):
        return LEGACY, path[len("sha256:"):]
    return key_id(), digest(unit_name(path))


def patient_units(sources: list[str], pattern: str | None) -> list[str]:
    """The unit of each image file: itself, or with a patient pattern (data.patient_pattern) its patient, named
    as a sibling of the file (<folder>/<patient>)."""
    if pattern is None:
        return list(sources)
    from medgen.common.imagefolder import IMAGE_SUFFIXES
    from medgen.common.names import patient_of
    return [str(Path(s).with_name(patient_of(s, pattern))) if Path(s).suffix.lower() in IMAGE_SUFFIXES else s
            for s in sources]


def units_record(data_cfg, train_sources: list[str], val_sources: list[str]) -> dict:
    """What a training run records of its data: the split settings and the hashed unit names per split (patients
    with data.patient_pattern, which is recorded too)."""
    pattern = getattr(data_cfg, "patient_pattern", None)
    hashed = lambda sources: sorted({digest(unit_name(s)) for s in patient_units(sources, pattern)})  # noqa: E731
    return {"key_id": key_id(), "data_dir_name": Path(data_cfg.data_dir).name if data_cfg.data_dir else None,
            "split_seed": data_cfg.split_seed, "val_fraction": data_cfg.val_fraction, "patient_pattern": pattern,
            "train": hashed(train_sources), "val": hashed(val_sources)}


def check_no_leak(records: dict[str, dict], sets: dict[str, list[str]], what: str) -> list[str]:
    """Refuse evaluation units (val/test sources) that a generator trained on, naming them; return notes on
    units that were the generator's validation data (it chose its best checkpoint on them)."""
    notes = []
    for model, rec in records.items():
        scheme = scheme_of(rec)
        check_scheme(scheme, f"{what}: the {model} model's record of its training subjects")
        trained, validated = set(rec.get("train", ())), set(rec.get("val", ()))
        for split, sources in sets.items():
            names = sorted({unit_name(s) for s in sources})
            leaked = [n for n in names if digest(n, scheme) in trained]
            if leaked:
                shown = ", ".join(leaked[:10]) + (f" and {len(leaked) - 10} more" if len(leaked) > 10 else "")
                raise UserError(f"{what}: {len(leaked)} of the {len(names)} {split} subjects/images were in the "
                                f"training split of the {model} model that made the synthetic data ({shown}); "
                                "evaluate on data the generator never saw (the generator's own val split, a test "
                                "folder, or --split-seed / --val-fraction as the generator was trained)")
            seen = [n for n in names if digest(n, scheme) in validated]
            if seen:
                notes.append(f"{len(seen)} of the {len(names)} {split} subjects/images were the {model} model's "
                             "validation data (it picked its best checkpoint on them)")
    return notes
