"""medgen fetch-weights KIND [--dest DIR]: download a feature network's weights from where they are published,
check them, and put them where the metrics and the perceptual loss look ($MEDGEN_WEIGHTS, default
~/.cache/medgen/weights). Nothing else in medgen downloads anything, and nothing downloads at import.

    inception    pt_inception-2015-12-05-6726825d.pth  FID Inception-v3 (pytorch-fid's release; torch-fidelity's file)
    lpips-alex   alexnet-owt-7be5be79.pth              LPIPS AlexNet trunk (torchvision's file; the heads ship in lpips)
    lpips-vgg    vgg16-397923af.pth                    LPIPS VGG-16 trunk (torchvision's file)
    radimagenet  radimagenet_resnet50.pt               RadImageNet ResNet-50 (the PyTorch port MONAI Generative loads)

Checks: a full SHA-256 when one is given (--sha256) or published; else the SHA-256 prefix that the published file
name carries (the torch.hub convention: the first 8 hex digits); RadImageNet publishes no digest, so the digest of
the downloaded file is printed and recorded beside it (radimagenet_resnet50.pt.sha256) to pin later runs with.
A download that ends early, an HTML page instead of a weights file, or a digest that does not match is an error
and leaves nothing under the file's name. --url fetches from a mirror instead.
"""
from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from medgen.common.args import Flag, Real, Text, validated
from medgen.common.cli import HelpFormatter, add_flag
from medgen.common.errors import UserError
from medgen.common.weightfiles import HASH_IN_NAME, RADIMAGENET_FILE, default_weights_dir, sha256_of


@dataclass(frozen=True)
class Source:
    file: str                      # the name the tools look for in the weights folder
    url: str                       # where it is published
    what: str
    sha256: str | None = None      # a published full digest, when there is one


SOURCES = {
    "inception": Source("pt_inception-2015-12-05-6726825d.pth",
                        "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                        "pt_inception-2015-12-05-6726825d.pth", "FID Inception-v3"),
    "lpips-alex": Source("alexnet-owt-7be5be79.pth", "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
                         "LPIPS AlexNet trunk"),
    "lpips-vgg": Source("vgg16-397923af.pth", "https://download.pytorch.org/models/vgg16-397923af.pth",
                        "LPIPS VGG-16 trunk"),
    # the file behind github.com/Warvito/radimagenet-models (RadImageNet-ResNet50_notop.pth), on Google Drive;
    # confirm=t skips the page Drive shows before large files
    "radimagenet": Source(RADIMAGENET_FILE, "https://drive.usercontent.google.com/download?"
                          "id=1VOWHgOq0rm7OkE_JxlWXhMAH4CvcXUHT&export=download&confirm=t", "RadImageNet ResNet-50"),
}
CHUNK = 1 << 20


def check_digest(digest: str, file_name: str, expected: str | None, where: str) -> None:
    """The full expected digest when there is one, else the prefix the published name carries."""
    if expected:
        if digest != expected.lower():
            raise UserError(f"{where}: SHA-256 {digest} does not match the expected {expected.lower()} (a different "
                            "or corrupted file; nothing was kept)")
        return
    m = HASH_IN_NAME.search(file_name)
    if m and not digest.startswith(m.group(1)):
        raise UserError(f"{where}: SHA-256 {digest[:16]}... does not start with {m.group(1)}, the prefix the "
                        f"published name {file_name} promises (a different or corrupted file; nothing was kept)")


STALL_S = 60.0          # no byte for this long: the server stalled
DEADLINE_S = 3600.0     # the whole download: RadImageNet (~100 MB) takes minutes on a slow link, never an hour


def check_url(url: str) -> str:
    """An http(s) or file URL, else one UserError naming it."""
    from urllib.parse import urlsplit
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https", "file") or (parts.scheme != "file" and not parts.netloc):
        raise UserError(f"--url {url!r}: not an http(s):// or file:// address")
    return url


def download(url: str, dest: Path, stall_s: float = STALL_S, deadline_s: float = DEADLINE_S,
             progress: bool = True) -> str:
    """Stream url into dest (a temp file the caller renames), returning the SHA-256; a short read, an HTTP error,
    an HTML page, a server silent for stall_s or a download longer than deadline_s is a UserError."""
    import time
    from tqdm import tqdm
    h = hashlib.sha256()
    got, expected = 0, None
    start = time.monotonic()
    try:
        with urllib.request.urlopen(check_url(url), timeout=stall_s) as resp, open(dest, "wb") as f:
            expected = int(resp.headers.get("Content-Length") or 0) or None
            read = getattr(resp, "read1", resp.read)        # what has arrived: a trickle still meets the deadline
            with tqdm(total=expected, unit="B", unit_scale=True, desc=Path(dest).name, disable=not progress,
                      leave=False) as bar:
                while True:
                    chunk = read(CHUNK)
                    if not chunk:
                        break
                    if got == 0 and chunk.lstrip()[:15].lower().startswith((b"<!doctype", b"<html")):
                        raise UserError(f"{url}: the server sent a web page, not a weights file (a login or "
                                        "confirmation page); download it in a browser and copy it into the "
                                        "weights folder")
                    f.write(chunk)
                    h.update(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
                    if time.monotonic() - start > deadline_s:
                        raise UserError(f"{url}: the download took longer than --deadline {deadline_s:g} s "
                                        f"({got} bytes so far; nothing was kept)")
            f.flush()
            os.fsync(f.fileno())
    except urllib.error.HTTPError as err:
        raise UserError(f"{url}: HTTP {err.code} {err.reason}") from None
    except http.client.IncompleteRead as err:
        raise UserError(f"{url}: the download ended after {got + len(err.partial)} of {expected} bytes (truncated; "
                        "nothing was kept)") from None
    except (urllib.error.URLError, OSError, TimeoutError, http.client.HTTPException, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise UserError(f"{url}: download failed ({reason}); this machine may have no internet access: fetch "
                        "on one that has and copy the file into the weights folder") from None
    if expected is not None and got != expected:
        raise UserError(f"{url}: the download ended after {got} of {expected} bytes (truncated; nothing was kept)")
    return h.hexdigest()


def check_loadable(file: Path, where: str) -> None:
    """The file loads as PyTorch weights (weights only, onto the meta device: no code runs, no memory is used)
    and holds tensors; a zip or pickle of something else is refused."""
    import torch
    try:
        state = torch.load(file, map_location="meta", weights_only=True)
    except Exception as err:  # noqa: BLE001 - whatever the reason, not a weights file
        raise UserError(f"{where}: not a PyTorch weights file ({type(err).__name__}; nothing was kept)") from None
    values = state.values() if isinstance(state, dict) else [state]
    if not any(isinstance(v, torch.Tensor) or isinstance(v, dict) for v in values):
        raise UserError(f"{where}: loads, but holds no tensors (not a weights file; nothing was kept)")


def recorded_digest(folder: Path, file: str) -> str | None:
    record = folder / f"{file}.sha256"
    try:
        return record.read_text().split()[0]
    except (OSError, IndexError):
        return None


@validated(kind=Text(), dest=Text(optional=True, path=True), url=Text(optional=True), sha256=Text(optional=True),
           force=Flag(), progress=Flag(), stall_s=Real(0, 3600, low_open=True),
           deadline_s=Real(0, 86400, low_open=True))
def fetch_weights(kind: str, dest: str | Path | None = None, url: str | None = None, sha256: str | None = None,
                  force: bool = False, progress: bool = True, stall_s: float = STALL_S,
                  deadline_s: float = DEADLINE_S) -> Path:
    """Download one kind of weights into dest (default: the weights folder) and check it; returns the file. A
    file already there is checked against the published digest, or the one recorded when it was fetched."""
    if kind not in SOURCES:
        raise UserError(f"unknown weights {kind!r} (choose from {', '.join(SOURCES)})")
    src = SOURCES[kind]
    folder = Path(dest) if dest else default_weights_dir()
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--dest {folder}: exists and is not a folder")
    target = folder / src.file
    expected = sha256 or src.sha256
    if url is not None:
        check_url(url)
    if target.is_file() and not force:
        pinned = expected or recorded_digest(folder, src.file)
        try:
            check_digest(sha256_of(target), src.file, pinned, str(target))
        except UserError as err:
            raise UserError(f"{str(err).replace('; nothing was kept', '')}; it was left in place: fetch again "
                            "with --force to replace it") from None
        return target
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{src.file}.", suffix=".part")
    os.close(fd)
    try:
        digest = download(url or src.url, Path(tmp), stall_s, deadline_s, progress=progress)
        check_digest(digest, src.file, expected, url or src.url)
        check_loadable(Path(tmp), url or src.url)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    if not expected and not HASH_IN_NAME.search(src.file):   # nothing published to check against: record it
        (folder / f"{src.file}.sha256").write_text(f"{digest}  {src.file}\n")
    return target


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="medgen fetch-weights", description=__doc__, formatter_class=HelpFormatter,
                                allow_abbrev=False)
    p.add_argument("kinds", nargs="+", metavar="KIND", choices=sorted(SOURCES) + ["all"],
                   help=f"{', '.join(SOURCES)} or all")
    add_flag(p, "dest", default=None, metavar="DIR", help="the weights folder (default $MEDGEN_WEIGHTS, else "
                                                          "~/.cache/medgen/weights)")
    add_flag(p, "url", default=None, help="download from this mirror instead of the published location (one KIND)")
    add_flag(p, "sha256", default=None, help="the full SHA-256 the file must have (one KIND)")
    add_flag(p, "force", action="store_true", help="download again even when the file is there and checks out")
    add_flag(p, "stall_timeout", type=Real(0, 3600, low_open=True), default=STALL_S,
             help="seconds without a byte before the download is given up")
    add_flag(p, "deadline", type=Real(0, 86400, low_open=True), default=DEADLINE_S,
             help="seconds the whole download may take")
    args = p.parse_args(argv)
    kinds = list(SOURCES) if "all" in args.kinds else list(dict.fromkeys(args.kinds))
    if (args.url or args.sha256) and len(kinds) != 1:
        raise UserError("--url and --sha256 apply to one KIND at a time")
    for kind in kinds:
        path = fetch_weights(kind, args.dest, args.url, args.sha256, args.force, stall_s=args.stall_timeout,
                             deadline_s=args.deadline)
        print(f"{kind}: {path} (SHA-256 {sha256_of(path)})")
    return 0
