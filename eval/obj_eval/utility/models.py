"""The downstream networks (MONAI) and their one training loop.

Segmentation: MONAI BasicUNet, Dice + cross-entropy on one sigmoid channel for a binary mask, or on K + 1 softmax
channels (background and each label) for label maps. Classification: MONAI ResNet (basic blocks) with a linear
head. Both expose `features(x)`: globally pooled deep encoder maps, the
domain feature space of the Fréchet distance, precision/recall and the memorization audit.

Training is seeded and deterministic on CPU: the same data, settings and seed give the same weights. It runs a
fixed number of steps (the same budget for every recipe, so a recipe does not win by training longer; or
--epochs over its own data), validates on the real validation split every `val_every` steps and keeps the best
state; it stops early after `patience` validations without improvement.
"""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.networks.nets import BasicUNet, ResNet
from torch import nn
from tqdm import tqdm

from medgen.common.errors import UserError
from medgen.common.fileio import atomic_write
from medgen.common.labels import BINARY
from medgen.common.overlap import dice, region_dice
from medgen.eval.obj_eval.utility.names import PRESETS



@dataclass
class TrainSettings:
    task: str = "segmentation"
    preset: str = "tiny"
    max_steps: int | None = None          # None: the preset's
    epochs: float | None = None           # instead of max_steps: passes over each recipe's own training set
    batch_size: int | None = None
    lr: float | None = None
    val_every: int | None = None
    patience: int = 5                     # validations without improvement before stopping
    device: str = "cpu"
    bf16: bool = True                     # CUDA only
    compile: bool = False

    def resolved(self) -> "TrainSettings":
        p = PRESETS[self.preset]
        return TrainSettings(self.task, self.preset, self.max_steps or p["max_steps"], self.epochs,
                             self.batch_size or p["batch_size"], self.lr or p["lr"], self.val_every or p["val_every"],
                             self.patience, self.device, self.bf16, self.compile)

    def key(self) -> dict:
        """What changes the trained weights (not the device flags' names, which do not on CPU)."""
        d = asdict(self.resolved())
        d.pop("compile")
        return d


class Segmenter(nn.Module):
    """BasicUNet with one sigmoid output (binary masks), or K + 1 softmax outputs: background, then the
    vocabulary's labels in order (label maps)."""

    def __init__(self, in_channels: int, features, spatial_dims: int = 2, vocab=BINARY):
        super().__init__()
        self.vocab = vocab
        self.net = BasicUNet(spatial_dims=spatial_dims, in_channels=in_channels,
                             out_channels=1 if vocab.binary else vocab.channels + 1, features=tuple(features))

    def forward(self, x):
        return self.net(x)

    def features(self, x):
        """The two deepest encoder maps (down_3, down_4), each pooled by mean and by max: instance norm makes
        a map's spatial mean nearly constant, so the mean alone would describe little."""
        n = self.net
        h3 = n.down_3(n.down_2(n.down_1(n.conv_0(x))))
        h4 = n.down_4(h3)
        return torch.cat([h.flatten(2).mean(2) for h in (h3, h4)] + [h.flatten(2).amax(2) for h in (h3, h4)], 1)


class Classifier(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, layers, planes):
        super().__init__()
        self.backbone = ResNet("basic", list(layers), list(planes), spatial_dims=2, n_input_channels=in_channels,
                               conv1_t_size=3, conv1_t_stride=1, no_max_pool=True, feed_forward=False)
        self.head = nn.Linear(planes[-1], num_classes)

    def forward(self, x):
        return self.head(self.backbone(x))

    def features(self, x):
        return self.backbone(x)


def build(settings: TrainSettings, in_channels: int, num_classes: int, spatial_dims: int = 2,
          vocab=BINARY) -> nn.Module:
    p = PRESETS[settings.preset]
    if settings.task == "segmentation":
        return Segmenter(in_channels, p["unet"], spatial_dims, vocab)
    return Classifier(in_channels, num_classes, p["layers"], p["planes"])


def _min_size(settings: TrainSettings) -> int:
    # BasicUNet halves the size four times, and instance norm needs more than one element at the deepest level
    return 32 if settings.task == "segmentation" else 8


def _autocast(device: torch.device, bf16: bool):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda")


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, task: str, device, batch_size: int = 128,
            bf16: bool = True) -> torch.Tensor:
    """Segmentation: foreground probabilities (N, 1, H, W), or for label maps the probabilities of background and
    each label (N, K + 1, H, W); classification: class probabilities (N, K)."""
    model.eval()
    device = torch.device(device)
    binary = task != "segmentation" or getattr(model, "vocab", BINARY).binary
    out = []
    for i in range(0, len(images), batch_size):
        with _autocast(device, bf16):
            logits = model(images[i:i + batch_size].to(device)).float()
        out.append((torch.sigmoid(logits) if task == "segmentation" and binary else logits.softmax(1)).cpu())
    return torch.cat(out) if out else torch.zeros(0)


def labels_of(probs: torch.Tensor, vocab) -> torch.Tensor:
    """A segmenter's prediction as a mask: {0, 1} at 0.5 (binary), or the label ids of the most probable class."""
    if vocab.binary:
        return (probs > 0.5).float()
    ids = torch.tensor((0, *vocab.ids), dtype=torch.float32)
    return ids[probs.argmax(1, keepdim=True)]


def class_index(labels: torch.Tensor, vocab) -> torch.Tensor:
    """Label ids -> class indices 0..K (0 background), the softmax channels' order."""
    out = torch.zeros_like(labels)
    for k, i in enumerate(vocab.ids, start=1):
        out = torch.where(labels == i, torch.full_like(labels, k), out)
    return out


@torch.no_grad()
def features(model: nn.Module, images: torch.Tensor, device, batch_size: int = 128) -> np.ndarray:
    model.eval()
    out = [model.features(images[i:i + batch_size].to(device)).float().cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(out).numpy().astype(np.float64) if out else np.zeros((0, 1))


def validation_score(model, task: str, val, device, bf16: bool) -> float:
    """Higher is better: Dice over the whole validation set (segmentation), balanced accuracy (classification)."""
    probs = predict(model, val.images, task, device, bf16=bf16)
    if task == "segmentation" and not val.vocab.binary:       # label maps: the mean Dice over the regions
        per_region = region_dice(labels_of(probs, val.vocab), val.targets, val.vocab)
        return float(np.mean(list(per_region.values())))
    if task == "segmentation":
        return float(dice(probs > 0.5, val.targets > 0.5, dims=tuple(range(probs.dim()))))
    from sklearn.metrics import balanced_accuracy_score
    return float(balanced_accuracy_score(val.targets.numpy(), probs.argmax(1).numpy()))


def train(settings: TrainSettings, train_set, val_set, seed: int, desc: str = "train") -> tuple[nn.Module, dict]:
    """(the best model on the validation split, its log)."""
    s = settings.resolved()
    smallest = min(train_set.images.shape[2:])
    if smallest < _min_size(s):
        raise UserError(f"the downstream {s.task} network needs images of at least {_min_size(s)} px on every side "
                        f"(these have {smallest}): raise --image_size (or --volume_shape)")
    if len(train_set) == 0:
        raise UserError(f"{desc}: no training images")
    device = torch.device(s.device)
    torch.manual_seed(seed)
    vocab = getattr(train_set, "vocab", BINARY)
    model = build(s, train_set.images.shape[1], max(1, len(train_set.classes)), train_set.images.dim() - 2,
                  vocab).to(device)
    step_fn = torch.compile(model) if s.compile and device.type == "cuda" else model
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=1e-4)
    if s.task != "segmentation":
        loss_fn = nn.CrossEntropyLoss()
    elif vocab.binary:
        loss_fn = DiceCELoss(sigmoid=True, batch=True)
    else:                 # label maps: softmax over background and the labels, targets as class indices
        dice_ce = DiceCELoss(softmax=True, to_onehot_y=True, batch=True)
        loss_fn = lambda logits, y: dice_ce(logits, class_index(y, vocab))  # noqa: E731
    per_epoch = max(1, -(-len(train_set) // s.batch_size))
    steps = int(round(s.epochs * per_epoch)) if s.epochs else s.max_steps
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, s.lr, total_steps=max(steps, 2), pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    x_all, y_all = train_set.images, train_set.targets
    best, best_state, since, history, order = -1.0, None, 0, [], torch.empty(0, dtype=torch.long)
    bar = tqdm(range(steps), desc=desc, leave=False, disable=steps < 200)
    step = 0
    for step in bar:
        if len(order) < s.batch_size:
            order = torch.cat([order, torch.randperm(len(train_set), generator=gen)])
        idx, order = order[:s.batch_size], order[s.batch_size:]
        x, y = x_all[idx].to(device), y_all[idx].to(device)
        flip = torch.rand(len(idx), generator=gen) < 0.5          # horizontal flips, the one augmentation
        flip = flip.to(device).view(-1, *[1] * (x.dim() - 1))
        x = torch.where(flip, x.flip(-1), x)
        if s.task == "segmentation":
            y = torch.where(flip, y.flip(-1), y)
        model.train()
        with _autocast(device, s.bf16):
            loss = loss_fn(step_fn(x).float(), y)
        loss_value = float(loss.detach())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % s.val_every == 0 or step + 1 == steps:
            score = validation_score(model, s.task, val_set, device, s.bf16)
            history.append([step + 1, round(loss_value, 5), round(score, 5)])
            bar.set_postfix(loss=f"{loss_value:.3f}", val=f"{score:.3f}")
            if score > best:
                best, best_state, since = score, copy.deepcopy(model.state_dict()), 0
            else:
                since += 1
                if since >= s.patience:
                    break
    if best_state is not None:
        model.load_state_dict(best_state)
    return model, {"steps": step + 1, "planned_steps": steps, "best_val": best, "history": history,
                   "val_metric": "dice" if s.task == "segmentation" else "balanced_accuracy"}


def content_key(*parts) -> str:
    """A hash of tensors and JSON-able settings: the cache key of a trained reference model."""
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, torch.Tensor):
            t = p.detach().cpu().contiguous()
            h.update(str((t.dtype, tuple(t.shape))).encode())
            h.update(t.numpy().tobytes())
        else:
            h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:20]


def cached_reference(settings: TrainSettings, train_set, val_set, seed: int, cache_dir: Path) -> tuple[nn.Module, dict]:
    """The downstream model trained on the real training data, cached by content (data, settings, seed): the
    segmenter of the faithfulness check and the feature network of the domain metrics."""
    s = settings.resolved()
    key = content_key(train_set.images, train_set.targets, val_set.images, val_set.targets, s.key(), seed,
                      train_set.classes, getattr(train_set, "vocab", BINARY).record())
    path = Path(cache_dir) / f"{s.task}-{s.preset}-{key}.pt"
    model = build(s, train_set.images.shape[1], max(1, len(train_set.classes)), train_set.images.dim() - 2,
                  getattr(train_set, "vocab", BINARY))
    if path.is_file():
        try:
            stored = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(stored["state"])
            return model.to(s.device), {**stored["log"], "cache": str(path), "cached": True}
        except Exception:  # noqa: BLE001 - a damaged cache file is retrained
            path.unlink(missing_ok=True)
    model, log = train(settings, train_set, val_set, seed, desc="reference model (real train)")
    state = {k: v.cpu() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: torch.save({"state": state, "log": log}, tmp))
    return model, {**log, "cache": str(path), "cached": False}
