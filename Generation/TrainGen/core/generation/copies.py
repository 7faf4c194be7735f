"""generate.py --reject_copies: a generated image closer to a training image than the held-out 1st-percentile
threshold (the k-th smallest of the validation images' nearest-training-image distances, k = round(0.01 (n+1)))
is dropped and drawn again: the memorization audit's criterion and copy distance (common/neighbours.py: pixel
correlation, searched over moves of up to 1/8 of the side, flips and crops or zooms of 0.8-1.25). The training
and validation splits are the image model's own, read as it was trained."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from medgen.common.errors import UserError
from medgen.common.neighbours import CopyIndex, order_threshold

HELDOUT_QUANTILE = 0.01


@dataclass
class CopyCheck:
    train: CopyIndex               # the training images
    threshold: float               # held-out nearest-neighbour distance order statistic
    n_train: int
    n_heldout: int

    @classmethod
    def for_model(cls, model) -> "CopyCheck":
        from medgen.Generation.TrainGen.core.datasource import data_source
        src = data_source(model.cfg)
        if not src.root.is_dir():
            raise UserError(f"--reject_copies: the image model's training data {src.root} (data.data_dir of "
                            f"{model.path}) is not on this machine")
        train = src.split(model.cfg.data, "train")
        held = src.split(model.cfg.data, "val")
        if train.images is None or held.images is None or len(held) == 0:
            raise UserError(f"--reject_copies: {src.root} needs training and validation images (the threshold is "
                            "the validation images' distance to the training images)")
        roles = [r for r in model.mode.generated_roles]
        channels = ([train.channels.index(r) for r in roles] if all(r in train.channels for r in roles)
                    else list(range(train.images.shape[1])))
        index = CopyIndex(train.images[:, channels].float())
        d_held, _ = index.query(held.images[:, channels].float())
        return cls(index, order_threshold(d_held, HELDOUT_QUANTILE)[0], len(train), len(held))

    def distances(self, images: torch.Tensor) -> np.ndarray:
        """Copy distance to the nearest training image of each (B, C, H, W) image in [0, 1]."""
        return self.train.query(images.float().cpu())[0]
