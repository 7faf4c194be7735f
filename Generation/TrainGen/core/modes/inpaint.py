"""Modes of one MRI sequence (mode.sequence, default bravo): unconditional images (`image`, the base model a
ControlNet adds mask control to) and lesion inpainting (`inpaint`).

`inpaint` generates the sequence given the image with a region blanked out, the region, and the lesion's label
map inside it (common/labels.py coding). Training regions are the real tumour grown by mode.inpaint.margin
pixels, or, for a share mode.inpaint.random_regions of the samples (and every sample without a tumour), a random
lesion-shaped region on the brain; the label-map channels always say what the region really holds, so the
model learns to paint a lesion where the map has one and healthy tissue where it has none. At sampling the
region comes from the lesion to insert (grown by the margin), and the pixels outside it are the input's
(core/inpainting.py)."""
from __future__ import annotations

import torch

from medgen.common.data import MASK_ROLE
from medgen.common.labels import encode
from medgen.Generation.TrainGen.core.inpainting import dilate, random_blobs
from medgen.Generation.TrainGen.core.modes.base import Mode


class ImageMode(Mode):
    """Network input [noisy sequence]; output one MRI sequence, with no conditioning."""
    name = "image"

    @property
    def generated_roles(self) -> list[str]:
        return [self.cfg.sequence]


class InpaintMode(Mode):
    """Network input [noisy sequence, the sequence outside the region, the region, the lesion's label map]."""
    name = "inpaint"
    needs = "inpaint"                 # generate.py --inpaint_into DIR: real scans and lesion masks

    @property
    def generated_roles(self) -> list[str]:
        return [self.cfg.sequence]

    @property
    def condition_roles(self) -> list[str]:
        return [MASK_ROLE]            # read with the data; the network sees it as described above

    @property
    def in_channels(self) -> int:
        return self.out_channels + 2 + self.vocab.channels

    def region(self, lesion: torch.Tensor, image: torch.Tensor, train: bool, generator=None) -> torch.Tensor:
        """The region to regenerate: the lesion grown by the margin; in training, for a random share of samples
        and for every sample without a lesion, a random lesion-shaped region on the brain instead."""
        o = self.cfg.inpaint
        grown = dilate(lesion > 0, o.margin)
        if not train:
            return grown
        blobs = random_blobs(image.amax(1, keepdim=True) > 0, generator)
        has = (lesion > 0).flatten(1).any(1)
        pick = (torch.rand(len(lesion), generator=generator, device=lesion.device) < o.random_regions) | ~has
        return torch.where(pick.view(-1, *[1] * (lesion.dim() - 1)), blobs, grown)

    def inputs(self, image: torch.Tensor, hole: torch.Tensor, lesion: torch.Tensor) -> dict:
        """The conditioning of (image in [0, 1], region {0, 1}, label map) in [-1, 1], and what sampling keeps."""
        known = image * 2 - 1
        inside = lesion * hole                                  # the label map says what the region holds
        concat = torch.cat([known * (1 - hole), hole * 2 - 1, encode(inside, self.vocab) * 2 - 1], 1)
        return {"concat": concat, "known": known, "hole": hole}

    def split(self, batch: dict, train: bool = False, generator=None):
        image = self._role(batch, self.cfg.sequence)
        hole = self.region(batch["masks"], image, train, generator)
        return image * 2 - 1, self.inputs(image, hole, batch["masks"])
