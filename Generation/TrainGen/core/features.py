"""RadImageNet ResNet-50 features, defined once for the perceptual loss (training) and FID (evaluation).

The network is a plain ResNet-50 written here (no torchvision import: its CPU wheels need a CUDA torch) with
torchvision's parameter names, so a RadImageNet PyTorch port in torchvision layout loads as it is.
Preprocessing follows RadImageNet: grey -> 3 channels, RGB -> BGR, subtract the mean [0.406, 0.456, 0.485]
(BGR order of the ImageNet mean), and the spatial mean of the last feature map gives 2048 features.
Weights are never downloaded: pass a local file (optim.perceptual_weights) or put it at
$MEDGEN_WEIGHTS/radimagenet_resnet50.pt (default ~/.cache/medgen/weights/); a SHA-256 is checked when given.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from Generation.TrainGen.core.checkpoint import safe_load
from Generation.TrainGen.core.errors import UserError

RADIMAGENET_FILE = "radimagenet_resnet50.pt"
BGR_MEAN = (0.406, 0.456, 0.485)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1):
        super().__init__()
        cout = width * self.expansion
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet50Features(nn.Module):
    """ResNet-50 trunk; forward returns the activations of layer1..layer4."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64)
        cin, layers = 64, []
        for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            mods = []
            for i in range(blocks):
                mods.append(Bottleneck(cin, width, stride if i == 0 else 1))
                cin = width * 4
            layers.append(nn.Sequential(*mods))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers

    @staticmethod
    def preprocess(images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [0, 1], C in {1, 3} RGB -> BGR, mean-subtracted."""
        rgb = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
        bgr = rgb.flip(1)
        return bgr - torch.tensor(BGR_MEAN, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(self.preprocess(images)))), 3, 2, 1)
        feats = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            feats.append(x)
        return feats

    def pooled(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 2048): spatial mean of the last feature map (the FID feature)."""
        return self(images)[-1].mean((2, 3))


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def default_weights_dir() -> Path:
    return Path(os.environ.get("MEDGEN_WEIGHTS", Path.home() / ".cache" / "medgen" / "weights"))


def load_radimagenet(path: str | Path | None = None, sha256: str | None = None) -> ResNet50Features:
    """The feature network in eval mode with frozen weights, or a UserError saying where the file goes."""
    path = Path(path) if path else default_weights_dir() / RADIMAGENET_FILE
    if not path.is_file():
        raise UserError(f"RadImageNet ResNet-50 weights not found at {path}. Download the PyTorch "
                        f"(torchvision-layout) ResNet-50 weights on a machine with internet access and copy them "
                        f"there, or pass the file with --set optim.perceptual_weights=PATH (the folder can be set "
                        f"with MEDGEN_WEIGHTS)")
    if sha256 and sha256_of(path) != sha256.lower():
        raise UserError(f"{path}: SHA-256 {sha256_of(path)} does not match the expected {sha256}")
    state = safe_load(path, "weights file")
    state = state.get("state_dict", state)
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.removeprefix("module.").startswith("fc.")}
    net = ResNet50Features()
    try:
        net.load_state_dict(state)
    except RuntimeError as err:
        raise UserError(f"{path}: not ResNet-50 weights in torchvision layout ({str(err).splitlines()[1:2]})") from None
    return net.eval().requires_grad_(False)


def perceptual_distance(net: ResNet50Features, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample mean over layers of the squared distance between channel-normalised activations
    (the LPIPS recipe without learned heads). a, b: (B, C, H, W) in [0, 1]; channels compared one by one."""
    out = torch.zeros(a.shape[0], device=a.device)
    for c in range(a.shape[1]):
        fa, fb = net(a[:, c:c + 1]), net(b[:, c:c + 1])
        for x, y in zip(fa, fb):
            x, y = F.normalize(x, dim=1), F.normalize(y, dim=1)
            out = out + (x - y).square().sum(1).mean((1, 2)) / len(fa)
    return out / a.shape[1]
