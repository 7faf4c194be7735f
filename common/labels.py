"""Label vocabularies: what the values of a mask mean, how a model sees them, and the regions they are scored on.

A vocabulary names the foreground label ids of a dataset (data.labels): `binary` (one tumour label, today's
masks), the BraTS presets (2021: 1 NCR necrotic core, 2 ED edema, 4 ET enhancing tumour; 2023: 1 NCR, 2 SNFH,
3 ET) or a custom list (data.custom_labels). Its regions are unions of labels, BraTS's evaluation regions by
default: WT (whole tumour, every label), TC (tumour core, NCR + ET), ET.

Encoding (what a network generates and is conditioned on): one channel per label, 1 inside the label and 0
outside (x * 2 - 1 in the diffusion space, so +1 / -1). Decoding: a pixel is background where every channel is
below the middle (0 in [-1, 1]), else the label of its largest channel. The decoded map therefore only ever
holds the vocabulary's values. Why this and not the alternatives:
  * a single channel of label values (scaled ids) orders unordered classes: edema would sit "between" necrosis
    and enhancing tumour, and a value on its way from 1 to 4 decodes to 2 at every boundary;
  * analog bits (Chen et al. 2022) need ceil(log2(K + 1)) channels but can decode to codes outside the
    vocabulary (3 bits hold 8 codes for 4 values), which must then be mapped somewhere, and a bit shared by
    two labels couples their errors;
  * one-hot with a background channel (K + 1 channels, argmax) decodes the same maps; the background channel
    is implied here (a fixed score of 0), so the K channels are exactly the conditioning channels a generated
    map feeds into an image model, and the binary vocabulary is the K = 1 case of the same rule: one channel,
    threshold 0.5 in [0, 1], bit for bit today's masks.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np   # torch is imported where a function needs it: the config layer runs without it

from medgen.common.errors import UserError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Vocabulary:
    name: str
    ids: tuple[int, ...]                        # foreground label ids, in channel order
    names: tuple[str, ...]                      # one per id
    regions: tuple[tuple[str, tuple[int, ...]], ...]   # (region name, label ids it unites), in report order
    nesting: tuple[tuple[str, str], ...] = ()   # (inner, outer) regions: an inner component should not touch
                                                # pixels outside the outer region (necrosis ringed by enhancing
                                                # tumour, the core ringed by edema)

    @property
    def binary(self) -> bool:
        return self.name == "binary"

    @property
    def channels(self) -> int:
        return len(self.ids)

    def name_of(self, label: int) -> str:
        return self.names[self.ids.index(label)]

    def region_ids(self, region: str) -> tuple[int, ...]:
        return dict(self.regions)[region]

    def record(self) -> dict:
        """What a checkpoint and an export store: enough to refuse data and models of another vocabulary."""
        return {"name": self.name, "ids": list(self.ids), "names": list(self.names),
                "regions": {r: list(ids) for r, ids in self.regions}}

    def describe(self) -> str:
        return f"{self.name} (" + ", ".join(f"{i} {n}" for i, n in zip(self.ids, self.names)) + ")"


BINARY = Vocabulary("binary", (1,), ("tumour",), (("tumour", (1,)),))
PRESETS = {
    "binary": BINARY,
    "brats2021": Vocabulary("brats2021", (1, 2, 4), ("NCR", "ED", "ET"),
                            (("WT", (1, 2, 4)), ("TC", (1, 4)), ("ET", (4,))), (("NCR", "TC"), ("TC", "WT"))),
    "brats2023": Vocabulary("brats2023", (1, 2, 3), ("NCR", "SNFH", "ET"),
                            (("WT", (1, 2, 3)), ("TC", (1, 3)), ("ET", (3,))), (("NCR", "TC"), ("TC", "WT"))),
}
LABEL_CHOICES = (*PRESETS, "custom")


NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$")


def custom_vocabulary(labels: dict[str, int], regions: dict[str, list[str]] | None) -> Vocabulary:
    """data.labels=custom: data.custom_labels {name: id} (ids 1-255, each once), data.regions {region: [label
    names]} (default: every label alone, and 'all' of them)."""
    if not labels or not isinstance(labels, dict):
        raise UserError("data.labels=custom needs data.custom_labels (label name -> id, e.g. {edema: 2})")
    for name in [*labels, *(regions or {})]:
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise UserError(f"data.custom_labels / data.regions: {name!r} is not a usable label or region name "
                            "(1-32 letters, digits, '_' or '-', starting with a letter or digit: names become "
                            "manifest fields and report columns)")
    ids = list(labels.values())
    if any(not isinstance(i, int) or not 1 <= i <= 255 for i in ids):
        raise UserError(f"data.custom_labels: ids must be integers 1-255 (0 is the background), got {labels}")
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise UserError(f"data.custom_labels: id {dup} is given to "
                        f"{' and '.join(n for n, i in labels.items() if i == dup)} (each id names one label)")
    order = sorted(labels, key=labels.get)
    if regions is None:
        regions = {**{n: [n] for n in order}, **({"all": order} if len(order) > 1 else {})}
    out = []
    for region, members in regions.items():
        unknown = [m for m in members if m not in labels]
        if unknown or not members:
            raise UserError(f"data.regions: region {region!r} names {unknown[0] if unknown else 'no label'!r}, "
                            f"not a label of data.custom_labels ({', '.join(order)})")
        if len(set(members)) != len(members):
            raise UserError(f"data.regions: region {region!r} lists a label twice ({', '.join(members)})")
        if region in labels and sorted(members) != [region]:
            raise UserError(f"data.regions: region {region!r} has the name of a label but covers "
                            f"{', '.join(members)}: regions that overlap a label's name would be read as that label")
        out.append((region, tuple(sorted(labels[m] for m in members))))
    return Vocabulary("custom", tuple(labels[n] for n in order), tuple(order), tuple(out))


def vocabulary(data_cfg) -> Vocabulary:
    """The vocabulary of a data config (data.labels, data.custom_labels, data.regions)."""
    name = getattr(data_cfg, "labels", "binary")
    if name == "custom":
        return custom_vocabulary(data_cfg.custom_labels or {}, data_cfg.regions)
    if name not in PRESETS:
        raise UserError(f"data.labels {name!r} is unknown (choose from {', '.join(LABEL_CHOICES)})")
    for field in ("custom_labels", "regions"):
        if getattr(data_cfg, field, None):
            raise UserError(f"data.{field} is given but data.labels is {name!r}, whose labels are fixed; set "
                            f"data.labels=custom to use your own, or leave data.{field} out")
    return PRESETS[name]


def from_record(record: dict | None) -> Vocabulary:
    """The vocabulary a checkpoint stored (an older checkpoint stored none: binary)."""
    if not record:
        return BINARY
    if record["name"] in PRESETS:
        return PRESETS[record["name"]]
    return Vocabulary("custom", tuple(record["ids"]), tuple(record["names"]),
                      tuple((r, tuple(ids)) for r, ids in record["regions"].items()))


# ---------------------------------------------------------------- encoding
def encode(labels: torch.Tensor, vocab: Vocabulary) -> torch.Tensor:
    """(N, 1, ...) label ids -> (N, K, ...) float {0, 1}, one channel per label. Binary: the mask itself."""
    if vocab.binary:
        return labels.float()
    import torch
    return torch.cat([(labels == i).float() for i in vocab.ids], 1)


def decode(x: torch.Tensor, vocab: Vocabulary) -> torch.Tensor:
    """(N, K, ...) channels in [-1, 1] -> (N, 1, ...) float label ids: background where every channel is below
    0, else the label of the largest channel. Binary: (x + 1) / 2 > 0.5, as masks always were."""
    if vocab.binary:
        return (((x + 1) / 2).clamp(0, 1) > 0.5).float()
    import torch
    best = x.argmax(1, keepdim=True)
    ids = torch.tensor(vocab.ids, dtype=x.dtype, device=x.device)
    return torch.where(x.amax(1, keepdim=True) > 0, ids[best], torch.zeros_like(best, dtype=x.dtype))


def region_masks(labels: torch.Tensor, vocab: Vocabulary) -> dict[str, torch.Tensor]:
    """{region: boolean mask} of a label map (any shape)."""
    import torch
    return {name: torch.isin(labels, torch.tensor(ids, device=labels.device)) for name, ids in vocab.regions}


def foreground(labels) -> np.ndarray | torch.Tensor:
    """The whole lesion (any label) of a label map or binary mask."""
    return labels > 0


# ---------------------------------------------------------------- checks
def check_not_binary(masks, vocab: Vocabulary, where: str) -> None:
    """Binary 0/1 masks read for a vocabulary of several labels would all become its first label (the whole
    tumour as NCR): refused, naming where they came from."""
    if masks is None or vocab.binary or len(vocab.ids) < 2 or len(masks) == 0:
        return
    if float(masks.max()) <= 1:
        raise UserError(f"{where}: every mask holds only 0 and 1, binary masks; the model is for label maps of "
                        f"{vocab.describe()} (data.labels): give label maps, or use a binary model "
                        "(data.labels binary)")


def unknown_values(values, vocab: Vocabulary) -> list[int]:
    """The label values outside the vocabulary (and 0)."""
    allowed = {0, *vocab.ids}
    return sorted(int(v) for v in np.unique(np.asarray(values)) if int(v) not in allowed or v != int(v))


def nesting_violations(labels: np.ndarray, vocab: Vocabulary) -> dict[str, int]:
    """{'NCR in TC': k, ...}: for each (inner, outer) pair of the vocabulary, the connected components of the
    inner region that touch (8-/26-connected) a pixel outside the outer region. Real BraTS tumours have some
    (a core at the brain's edge has no edema around it); the count says how often generated maps break the
    nesting compared with real ones."""
    from scipy import ndimage
    if not vocab.nesting:
        return {}
    labels = np.asarray(labels)
    out = {}
    structure = np.ones((3,) * labels.ndim, bool)
    regions = {name: np.isin(labels, ids) for name, ids in vocab.regions}
    regions.update({n: labels == i for i, n in zip(vocab.ids, vocab.names)})
    for inner, outer in vocab.nesting:
        comps, n = ndimage.label(regions[inner], structure=structure)
        outside = ~regions[outer]
        touching = ndimage.binary_dilation(outside, structure=structure) & (comps > 0)
        out[f"{inner} in {outer}"] = int(len(np.unique(comps[touching]))) if n else 0
    return out


def config_fields(vocab: Vocabulary) -> dict:
    """The data config fields (labels, custom_labels, regions) that give this vocabulary back."""
    if vocab.name != "custom":
        return {"labels": vocab.name}
    return {"labels": "custom", "custom_labels": dict(zip(vocab.names, vocab.ids)),
            "regions": {r: [vocab.name_of(i) for i in ids] for r, ids in vocab.regions}}
