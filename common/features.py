"""RadImageNet ResNet-50 features, defined once for the perceptual loss (training) and FID (evaluation).

The network is a plain ResNet-50 written here (no torchvision import: its CPU wheels need a CUDA torch) with
torchvision's parameter names. Two layouts of the weights load as they are, told apart by their keys:
  keras        the PyTorch port of the official Keras weights (RadImageNet-ResNet50_notop) that MONAI
               Generative's perceptual loss loads (repository Warvito/radimagenet-models, radimagenet_resnet50):
               every convolution has a bias, a block's stride sits on its first 1x1 convolution (as in Keras),
               batch-norm eps 1.001e-5. Recognised by the key 'conv1.bias'.
  torchvision  torchvision's resnet50 layout (no conv biases, stride on the 3x3 convolution, eps 1e-5), as
               written by ports that load the weights into torchvision's model.
No SHA-256 of either file is published: the digest of the file used is recorded (metrics.json, checkpoint
meta), and --radimagenet-sha256 / optim.perceptual_sha256 pins it.
Preprocessing follows RadImageNet: grey -> 3 channels, RGB -> BGR, subtract the mean [0.406, 0.456, 0.485]
(BGR order of the ImageNet mean), and the spatial mean of the last feature map gives 2048 features.
Weights are never downloaded implicitly (`medgen fetch-weights radimagenet` does, on request): pass a local file
(optim.perceptual_weights) or put it at $MEDGEN_WEIGHTS/radimagenet_resnet50.pt (default ~/.cache/medgen/weights/);
a SHA-256 is checked when given.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from medgen.common.fileio import safe_load
from medgen.common.weightfiles import RADIMAGENET_FILE, resolve_weights, sha256_of  # noqa: F401 (re-exported)
from medgen.common.errors import UserError

RADIMAGENET_SOURCE = ("github.com/Warvito/radimagenet-models (its RadImageNet-ResNet50_notop.pth: the PyTorch port "
                      "of the official Keras weights that MONAI Generative's perceptual loss uses; a torchvision-"
                      "layout ResNet-50 port loads too)")
BGR_MEAN = (0.406, 0.456, 0.485)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1, keras: bool = False):
        super().__init__()
        cout, eps, bias = width * self.expansion, (1.001e-5 if keras else 1e-5), keras
        s1, s2 = (stride, 1) if keras else (1, stride)   # Keras strides the 1x1 convolution, torchvision the 3x3
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, s1, bias=bias), nn.BatchNorm2d(width, eps=eps)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, s2, 1, bias=bias), nn.BatchNorm2d(width, eps=eps)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=bias), nn.BatchNorm2d(cout, eps=eps)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=bias), nn.BatchNorm2d(cout, eps=eps))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet50Features(nn.Module):
    """ResNet-50 trunk; forward returns the activations of layer1..layer4. keras=True: the layout of the
    Keras-converted RadImageNet weights (see the module docstring)."""

    def __init__(self, keras: bool = False):
        super().__init__()
        eps = 1.001e-5 if keras else 1e-5
        self.conv1, self.bn1 = nn.Conv2d(3, 64, 7, 2, 3, bias=keras), nn.BatchNorm2d(64, eps=eps)
        cin, layers = 64, []
        for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            mods = []
            for i in range(blocks):
                mods.append(Bottleneck(cin, width, stride if i == 0 else 1, keras))
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


def weights_state(path: Path) -> dict:
    """A weights file's state dict (unwrapping 'state_dict' and DataParallel's 'module.' prefix)."""
    state = safe_load(path, "weights file")
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_into(net: nn.Module, state: dict, path: Path, what: str) -> nn.Module:
    """net with the state loaded strictly, in eval mode and frozen; a mismatch is one UserError line."""
    try:
        net.load_state_dict(state)
    except RuntimeError as err:
        detail = [ln.strip() for ln in str(err).splitlines() if ln.strip()][1:2]
        raise UserError(f"{path}: not {what} weights ({detail[0][:160] if detail else err})") from None
    return net.eval().requires_grad_(False)


def radimagenet_from_file(path: Path) -> ResNet50Features:
    """Either published layout (keras port or torchvision), told apart by the stem convolution's bias."""
    state = {k: v for k, v in weights_state(path).items() if not k.startswith("fc.")}  # a classifier head is ignored
    return load_into(ResNet50Features(keras="conv1.bias" in state), state, path, "ResNet-50")


def load_radimagenet(path: str | Path | None = None, sha256: str | None = None) -> ResNet50Features:
    """The feature network in eval mode with frozen weights, or a UserError saying where the file goes."""
    file, _ = resolve_weights(path, RADIMAGENET_FILE, "RadImageNet ResNet-50", RADIMAGENET_SOURCE,
                              "--set optim.perceptual_weights=PATH", sha256, "radimagenet")
    return radimagenet_from_file(file)


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
