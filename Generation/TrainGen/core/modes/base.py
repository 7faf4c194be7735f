"""A mode says what is generated and what conditions it.

Data arrive in [0, 1] (masks {0, 1}, or label ids); the diffusion space is [-1, 1]. A mode splits a batch into the
clean target x0 and the conditioning, builds the network input from the noisy sample and the conditioning
(channel concatenation for images and masks, class labels for the class embedding), and turns a generated
tensor back into named outputs. A mask is coded with the run's label vocabulary (`vocab`, common/labels.py):
one channel for a binary mask, one channel per label for label maps, whether it is generated or conditions.

A mode also declares, as data, what generation and validation need to know, so that neither compares a
mode's name: what it needs at sampling time (`needs`), how its samples are written (`writes`), and how a
validation is scored (`validation`). A new mode subclasses, registers itself in MODES, and generates.
"""
from __future__ import annotations

import torch

from medgen.common.data import MASK_ROLE
from medgen.common.labels import BINARY, decode, encode


class TrainingMode:
    """The base class of every mode (the name the original research code documents); `Mode` is the same
    class."""
    name = "base"
    image_folder = False              # True: reads class image folders instead of NIfTI subjects
    generated_roles: list[str] = []   # data roles that are generated (in channel order)
    condition_roles: list[str] = []   # data roles concatenated as conditioning channels
    writes = "subjects"               # samples as <sample>/<role>.nii.gz; "class_folders": <class>/<sample>.png
    validation = ("loss", "lower")    # validation score and which direction is better; ("dice", "higher"):
                                      # Dice of the mode.segment.ensemble-averaged sample against the real mask
    vocab = BINARY                    # the label vocabulary of masks (set from data.labels by build_parts)

    @property
    def needs(self) -> str | None:
        """What sampling is conditioned on, and so where it can come from in generate.py:
        None     nothing (unconditional);
        'mask'   only masks: a seg model (--seg_model) or a real dataset's masks (--masks_from DIR);
        'roles'  other data roles (e.g. an MRI sequence): a real dataset holding them (--masks_from DIR);
        'label'  a class label (--class_counts);  'image'  an image to segment (--images_from DIR)."""
        if not self.condition_roles:
            return None
        return "mask" if all(r == MASK_ROLE for r in self.condition_roles) else "roles"

    @property
    def makes_masks(self) -> bool:
        """Unconditional masks: such a model can be the --seg_model of a mask-conditioned one."""
        return self.needs is None and self.generated_roles == [MASK_ROLE]

    def written_roles(self) -> list[str]:
        """The roles a generated sample is written with: its conditioning, then what was generated."""
        return list(dict.fromkeys(self.condition_roles + self.generated_roles))

    def __init__(self, cfg, num_classes: int | None = None, image_channels: int | None = None):
        self.cfg = cfg    # this mode's config section (ModeConfig), as a strategy gets its StrategyConfig
        self.num_classes = num_classes
        self.image_channels = image_channels

    def roles(self) -> list[str]:
        return list(dict.fromkeys(self.generated_roles + self.condition_roles))

    def role_channels(self, role: str) -> int:
        """Channels a role takes in the network: one per label for a mask, one for an image sequence."""
        return self.vocab.channels if role == MASK_ROLE else 1

    @property
    def out_channels(self) -> int:
        return sum(self.role_channels(r) for r in self.generated_roles)

    @property
    def in_channels(self) -> int:
        return self.out_channels + sum(self.role_channels(r) for r in self.condition_roles)

    @property
    def class_embeds(self) -> int | None:
        return None

    def _role(self, batch: dict, role: str) -> torch.Tensor:
        """A role's channels in [0, 1]: a mask coded with the vocabulary, an image sequence as it is."""
        if role == MASK_ROLE:
            return encode(batch["masks"], self.vocab)
        return batch["images"][:, self.image_roles.index(role)].unsqueeze(1)

    @property
    def image_roles(self) -> list[str]:
        return [r for r in self.roles() if r != MASK_ROLE]

    def split(self, batch: dict, train: bool = False, generator=None) -> tuple[torch.Tensor, dict]:
        """batch -> (x0 in [-1, 1], cond). cond['concat'] holds conditioning channels in [-1, 1]."""
        x0 = torch.cat([self._role(batch, r) for r in self.generated_roles], 1) * 2 - 1
        cond = {}
        if self.condition_roles:
            cond["concat"] = torch.cat([self._role(batch, r) for r in self.condition_roles], 1) * 2 - 1
        return x0, cond

    def condition(self, values: torch.Tensor) -> dict:
        """The conditioning of generation from the condition roles' values, (B, one channel per role, ...) in
        [0, 1] with masks as label ids (real data, or a seg model's outputs): coded as split() codes them."""
        parts = [encode(values[:, k:k + 1], self.vocab) if r == MASK_ROLE else values[:, k:k + 1]
                 for k, r in enumerate(self.condition_roles)]
        return {"concat": torch.cat(parts, 1) * 2 - 1}

    def forward(self, model, x_t: torch.Tensor, t: torch.Tensor, cond: dict, guidance: float = 1.0):
        """The network's prediction for x_t at time t (guidance is used by class mode only)."""
        net_in = torch.cat([x_t, cond["concat"]], 1) if "concat" in cond else x_t
        return model(net_in, t)

    def outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Generated tensor in [-1, 1] -> {role: tensor}: images in [0, 1], masks decoded to {0, 1} or label ids."""
        out, k = {}, 0
        for role in self.generated_roles:
            n = self.role_channels(role)
            part = x[:, k:k + n]
            out[role] = decode(part, self.vocab) if role == MASK_ROLE else ((part + 1) / 2).clamp(0, 1)
            k += n
        return out


Mode = TrainingMode
