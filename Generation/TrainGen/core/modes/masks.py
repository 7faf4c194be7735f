"""Modes that generate masks: unconditional (`seg`) and given an image (`segment`)."""
from __future__ import annotations

from Generation.TrainGen.core.modes.base import Mode


class SegMode(Mode):
    """Unconditional tumour masks, [B, 1, H, W]."""
    name = "seg"
    generated_roles = ["seg"]


class SegmentMode(Mode):
    """Diffusion segmentation: a mask generated given the image (mode.image_key, default bravo)."""
    name = "segment"
    generated_roles = ["seg"]

    @property
    def condition_roles(self) -> list[str]:
        return [self.cfg.mode.image_key]
