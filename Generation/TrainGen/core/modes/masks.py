"""Modes that generate masks: unconditional (`seg`) and given an image (`segment`)."""
from __future__ import annotations

from medgen.Generation.TrainGen.core.modes.base import Mode


class SegMode(Mode):
    """Unconditional tumour masks [B, 1, H, W], or label maps (one channel per label, common/labels.py)."""
    name = "seg"
    generated_roles = ["seg"]


class SegmentMode(Mode):
    """Diffusion segmentation: a mask generated given the image: the NIfTI modality mode.segment.image_key (default
    bravo), or every channel of an image+mask PNG dataset (grey or RGB)."""
    name = "segment"
    generated_roles = ["seg"]
    validation = ("dice", "higher")
    needs = "image"                   # generate.py --images_from: masks for new images with this model

    @property
    def condition_roles(self) -> list[str]:
        return [self.cfg.segment.image_key]

    @property
    def in_channels(self) -> int:
        return self.out_channels + (self.image_channels or 1)

    def split(self, batch: dict, train: bool = False, generator=None):
        return self._role(batch, "seg") * 2 - 1, {"concat": batch["images"] * 2 - 1}
