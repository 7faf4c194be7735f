"""generate.py --reject_copies: a generated image closer to a training image than the 1st percentile of the
real held-out images' nearest-training-image distances is dropped and drawn again (the memorization audit's
criterion, eval/obj_eval/utility/audit.py; distance sqrt(2 - 2 r) with r the Pearson correlation of the
preprocessed images). The training and validation splits are the image model's own, read as it was trained."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from common.errors import UserError
from common.neighbours import nearest, unit_rows

HELDOUT_PERCENTILE = 1.0


@dataclass
class CopyCheck:
    train: torch.Tensor            # unit rows of the training images (N, D)
    threshold: float               # held-out nearest-neighbour distance percentile
    n_train: int
    n_heldout: int

    @classmethod
    def for_model(cls, model) -> "CopyCheck":
        from Generation.TrainGen.core.datasource import data_source
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
        rows = unit_rows(train.images[:, channels].float())
        d_held, _ = nearest(unit_rows(held.images[:, channels].float()), rows)
        return cls(rows, float(np.percentile(d_held, HELDOUT_PERCENTILE)), len(train), len(held))

    def distances(self, images: torch.Tensor) -> np.ndarray:
        """Nearest-training-image distance of each (B, C, H, W) image in [0, 1]."""
        return nearest(unit_rows(images.float().cpu()), self.train)[0]
