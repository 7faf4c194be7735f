"""Modes that generate images: one sequence given a mask, two sequences given a mask, class-conditional."""
from __future__ import annotations

import torch

from medgen.Generation.TrainGen.core.modes.base import Mode


class BravoMode(Mode):
    """Network input [noisy bravo, mask]; output one MRI image."""
    name = "bravo"
    generated_roles = ["bravo"]
    condition_roles = ["seg"]


class DualMode(Mode):
    """Network input [noisy T1-pre, noisy T1-gd, mask]; output both sequences."""
    name = "dual"
    generated_roles = ["t1_pre", "t1_gd"]
    condition_roles = ["seg"]


class ClassMode(Mode):
    """Class-conditional images (image folders) with classifier-free guidance (Ho & Salimans 2022).

    Training replaces a label by the null class (id = num_classes) with probability mode.labels.cfg_dropout;
    sampling runs the conditional and unconditional predictions in one batched forward pass and returns
    uncond + s * (cond - uncond)."""
    name = "class"
    image_folder = True
    generated_roles = ["image"]
    writes = "class_folders"
    needs = "label"

    def roles(self) -> list[str]:
        return ["image"]

    @property
    def out_channels(self) -> int:
        return self.image_channels or 1

    @property
    def in_channels(self) -> int:
        return self.out_channels

    @property
    def class_embeds(self) -> int:
        return self.num_classes + 1

    def split(self, batch: dict, train: bool = False, generator=None):
        labels = batch["labels"]
        if train and self.cfg.labels.cfg_dropout > 0:
            drop = torch.rand(labels.shape, generator=generator, device=labels.device) < self.cfg.labels.cfg_dropout
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return batch["images"] * 2 - 1, {"labels": labels}

    def forward(self, model, x_t, t, cond, guidance: float = 1.0):
        if guidance == 1.0:
            return model(x_t, t, class_labels=cond["labels"])
        null = torch.full_like(cond["labels"], self.num_classes)
        both = model(torch.cat([x_t, x_t]), torch.cat([t, t]), class_labels=torch.cat([cond["labels"], null]))
        c, u = both.chunk(2)
        return u + guidance * (c - u)

    def outputs(self, x):
        return {"image": ((x + 1) / 2).clamp(0, 1)}
