"""Where pretrained weights files live and how they are checked (a SHA-256, in full or as the prefix a published
name carries), apart from the networks that load them, so that `medgen fetch-weights` runs without torch."""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from medgen.common.errors import UserError

RADIMAGENET_FILE = "radimagenet_resnet50.pt"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def default_weights_dir() -> Path:
    return Path(os.environ.get("MEDGEN_WEIGHTS", Path.home() / ".cache" / "medgen" / "weights"))


HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,})\.pth?$")  # torch.hub convention: a SHA-256 prefix in the name


def resolve_weights(path, default_name: str, what: str, where: str, flag: str, sha256: str | None = None,
                    fetch: str | None = None):
    """(file, its SHA-256) of a pretrained weights file, or a UserError that says how to get it (`fetch`: the
    KIND of `medgen fetch-weights KIND`). A full sha256 is checked when given, else the SHA-256 prefix a
    published name carries."""
    path = Path(path) if path else default_weights_dir() / default_name
    if not path.is_file():
        raise UserError(f"{what} weights not found at {path}. Nothing is downloaded implicitly: run `medgen "
                        f"fetch-weights {fetch}` on a machine with internet (it checks the file and puts it in "
                        f"$MEDGEN_WEIGHTS, default ~/.cache/medgen/weights; copy that folder to machines without "
                        f"internet), or fetch {default_name} from {where} yourself and copy it there, or pass {flag}")
    digest = sha256_of(path)
    if sha256:
        if digest != sha256.lower():
            raise UserError(f"{path}: SHA-256 {digest} does not match the expected {sha256}")
    else:
        m = HASH_IN_NAME.search(path.name)
        if m and not digest.startswith(m.group(1)):
            raise UserError(f"{path}: SHA-256 {digest[:16]}... does not start with {m.group(1)}, the prefix its "
                            f"name promises (a corrupt or different file)")
    return path, digest
