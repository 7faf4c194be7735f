"""Modes: WHAT is generated. MODES maps a --mode name to its class; register your own the same way."""
from medgen.Generation.TrainGen.core.modes.base import Mode, TrainingMode
from medgen.Generation.TrainGen.core.modes.masks import SegMode, SegmentMode
from medgen.Generation.TrainGen.core.modes.images import BravoMode, ClassMode, DualMode
from medgen.Generation.TrainGen.core.modes.inpaint import ImageMode, InpaintMode

MODES: dict[str, type[Mode]] = {
    "seg": SegMode,
    "bravo": BravoMode,
    "dual": DualMode,
    "class": ClassMode,
    "segment": SegmentMode,
    "image": ImageMode,
    "inpaint": InpaintMode,
}

__all__ = ["MODES", "Mode", "TrainingMode"]
