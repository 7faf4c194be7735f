"""Feature networks for the metrics, defined here without torchvision (its CPU wheels need a CUDA torch), with
the parameter names of the published weight files so those files load as they are.

  inception  Inception-v3 as used for FID (pytorch-fid's FIDInception blocks: average pools that exclude the
             padding, a max pool in the last block), weights pt_inception-2015-12-05-6726825d.pth, the file
             pytorch-fid and torch-fidelity use. Input: bilinear resize to 299, [0, 1] -> [-1, 1]; features:
             the 2048-d average pool.
  radimagenet  RadImageNet ResNet-50 (common/features.py, shared with the perceptual loss).
  lpips      AlexNet (default) or VGG-16 trunk from the torchvision weight file, with the lpips package's
             v0.1 linear heads (read from the installed package's files, no lpips import).

Weights are never downloaded implicitly (`medgen fetch-weights KIND` downloads and checks them, on request). A file
comes from --weights PATH or from the weights folder ($MEDGEN_WEIGHTS,
default ~/.cache/medgen/weights) under its published name. Published names carry the first 8 hex digits of
the file's SHA-256 (the torch.hub convention), which is checked; --weights-sha256 pins the full digest.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from medgen.common.fileio import safe_load
from medgen.common.errors import UserError
from medgen.common import features

WEIGHT_FILES = {
    "inception": "pt_inception-2015-12-05-6726825d.pth",
    "radimagenet": features.RADIMAGENET_FILE,
    "alex": "alexnet-owt-7be5be79.pth",
    "vgg": "vgg16-397923af.pth",
}
WHERE = {
    "inception": "https://github.com/mseitzer/pytorch-fid/releases (fid_weights)",
    "radimagenet": features.RADIMAGENET_SOURCE,
    "alex": "https://download.pytorch.org/models/",
    "vgg": "https://download.pytorch.org/models/",
}


def resolve_weights(kind: str, path: str | Path | None = None, sha256: str | None = None) -> tuple[Path, str]:
    """(file, its SHA-256) for a feature network, or a UserError that says where to put the file."""
    fetch = {"alex": "lpips-alex", "vgg": "lpips-vgg"}.get(kind, kind)
    return features.resolve_weights(path, WEIGHT_FILES[kind], kind, WHERE[kind], "--weights PATH", sha256, fetch)


# ---------------------------------------------------------------- Inception-v3 (FID)
class Conv(nn.Module):
    """conv (no bias) + batch norm (eps 1e-3) + ReLU, named conv/bn as in the weight file."""

    def __init__(self, cin, cout, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg3(x):
    return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)


class BlockA(nn.Module):
    def __init__(self, cin, pool):
        super().__init__()
        self.branch1x1 = Conv(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = Conv(cin, 48, 1), Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = Conv(cin, 64, 1), Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = Conv(96, 96, 3, padding=1)
        self.branch_pool = Conv(cin, pool, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(_avg3(x))], 1)


class BlockB(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = Conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = Conv(cin, 64, 1), Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = Conv(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, 2)], 1)


class BlockC(nn.Module):
    def __init__(self, cin, c7):
        super().__init__()
        row, col = {"kernel": (1, 7), "padding": (0, 3)}, {"kernel": (7, 1), "padding": (3, 0)}
        self.branch1x1 = Conv(cin, 192, 1)
        self.branch7x7_1, self.branch7x7_2 = Conv(cin, c7, 1), Conv(c7, c7, **row)
        self.branch7x7_3 = Conv(c7, 192, **col)
        self.branch7x7dbl_1, self.branch7x7dbl_2 = Conv(cin, c7, 1), Conv(c7, c7, **col)
        self.branch7x7dbl_3, self.branch7x7dbl_4 = Conv(c7, c7, **row), Conv(c7, c7, **col)
        self.branch7x7dbl_5 = Conv(c7, 192, **row)
        self.branch_pool = Conv(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for m in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                  self.branch7x7dbl_5):
            d = m(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg3(x))], 1)


class BlockD(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = Conv(cin, 192, 1), Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1, self.branch7x7x3_2 = Conv(cin, 192, 1), Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3, self.branch7x7x3_4 = Conv(192, 192, (7, 1), padding=(3, 0)), Conv(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, 2)], 1)


class BlockE(nn.Module):
    def __init__(self, cin, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = Conv(cin, 320, 1)
        self.branch3x3_1 = Conv(cin, 384, 1)
        self.branch3x3_2a, self.branch3x3_2b = Conv(384, 384, (1, 3), padding=(0, 1)), Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1, self.branch3x3dbl_2 = Conv(cin, 448, 1), Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = Conv(cin, 192, 1)

    def forward(self, x):
        a = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pool = F.max_pool2d(x, 3, 1, 1) if self.max_pool else _avg3(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(a), self.branch3x3_2b(a),
                          self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d), self.branch_pool(pool)], 1)


class InceptionFID(nn.Module):
    """Inception-v3 trunk of the FID weights; forward: (B, C, H, W) in [0, 1] -> (B, 2048) pool features."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3, self.Conv2d_2a_3x3 = Conv(3, 32, 3, stride=2), Conv(32, 32, 3)
        self.Conv2d_2b_3x3, self.Conv2d_3b_1x1, self.Conv2d_4a_3x3 = Conv(32, 64, 3, padding=1), Conv(64, 80, 1), Conv(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = BlockA(192, 32), BlockA(256, 64), BlockA(288, 64)
        self.Mixed_6a = BlockB(288)
        self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e = (BlockC(768, 128), BlockC(768, 160),
                                                                      BlockC(768, 160), BlockC(768, 192))
        self.Mixed_7a = BlockD(768)
        self.Mixed_7b, self.Mixed_7c = BlockE(1280, max_pool=False), BlockE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)  # in the weight file; unused for features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images[:, :3]
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, 2)))
        x = F.max_pool2d(x, 3, 2)
        for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
                     "Mixed_7a", "Mixed_7b", "Mixed_7c"):
            x = getattr(self, name)(x)
        return x.mean((2, 3))


class RadImageNetFID(nn.Module):
    """RadImageNet ResNet-50: (B, C, H, W) in [0, 1] -> (B, 2048) spatial mean of layer4."""

    def __init__(self, trunk: features.ResNet50Features):
        super().__init__()
        self.trunk = trunk

    def forward(self, images):
        return self.trunk.pooled(images)


FID_NETWORKS = ("inception", "radimagenet")


def check_fid_network(kind: str) -> None:
    if kind not in FID_NETWORKS:
        raise UserError(f"--feature-network {kind!r} is unknown (choose {' or '.join(FID_NETWORKS)})")


def load_fid_network(kind: str, path=None, sha256=None) -> tuple[nn.Module, str]:
    """(network in eval mode, weights SHA-256) for kind = inception | radimagenet."""
    check_fid_network(kind)
    file, digest = resolve_weights(kind, path, sha256)
    if kind == "inception":
        return features.load_into(InceptionFID(), features.weights_state(file), file, "FID Inception-v3"), digest
    return RadImageNetFID(features.radimagenet_from_file(file)), digest


# ---------------------------------------------------------------- LPIPS
# torchvision `features` layers: (index, in, out, kernel, stride, padding) convs; 'M' max pools (3/2 AlexNet,
# 2/2 VGG); LPIPS taps the ReLU after the listed conv indices.
TRUNKS = {
    "alex": ([(0, 3, 64, 11, 4, 2), "M", (3, 64, 192, 5, 1, 2), "M", (6, 192, 384, 3, 1, 1),
              (8, 384, 256, 3, 1, 1), (10, 256, 256, 3, 1, 1)], (0, 3, 6, 8, 10), 3),
    "vgg": ([(0, 3, 64, 3, 1, 1), (2, 64, 64, 3, 1, 1), "M", (5, 64, 128, 3, 1, 1), (7, 128, 128, 3, 1, 1), "M",
             (10, 128, 256, 3, 1, 1), (12, 256, 256, 3, 1, 1), (14, 256, 256, 3, 1, 1), "M",
             (17, 256, 512, 3, 1, 1), (19, 512, 512, 3, 1, 1), (21, 512, 512, 3, 1, 1), "M",
             (24, 512, 512, 3, 1, 1), (26, 512, 512, 3, 1, 1), (28, 512, 512, 3, 1, 1)], (2, 7, 14, 21, 28), 2),
}
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)


class LPIPS(nn.Module):
    """LPIPS v0.1 (Zhang et al. 2018): distance between channel-normalised trunk activations, weighted by the
    learned 1x1 heads, averaged over space, summed over layers. Inputs (B, C, H, W) in [0, 1]."""

    MIN_SIZE = {"alex": 31, "vgg": 16}  # smallest input the trunk's strides and pools leave a feature map for

    def __init__(self, net: str = "alex"):
        super().__init__()
        self.net_name, self.min_size = net, self.MIN_SIZE[net]
        layers, self.taps, pool = TRUNKS[net]
        self.features = nn.ModuleDict()
        self.plan, chans = [], []
        for item in layers:
            if item == "M":
                self.plan.append(("pool", pool))
                continue
            idx, cin, cout, k, s, p = item
            self.features[str(idx)] = nn.Conv2d(cin, cout, k, s, p)
            self.plan.append(("conv", str(idx)))
            if idx in self.taps:
                chans.append(cout)
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in chans)
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1))

    def trunk(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = (x * 2 - 1 - self.shift) / self.scale
        out = []
        for kind, arg in self.plan:
            if kind == "pool":
                x = F.max_pool2d(x, 3 if arg == 3 else 2, 2)
            else:
                x = F.relu(self.features[arg](x))
                if int(arg) in self.taps:
                    out.append(x)
        return out

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(B,) distances."""
        rgb = lambda x: x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x[:, :3]  # noqa: E731
        fa, fb = self.trunk(rgb(a)), self.trunk(rgb(b))
        total = torch.zeros(a.shape[0], device=a.device)
        for lin, x, y in zip(self.lins, fa, fb):
            x = x / (x.square().sum(1, keepdim=True).sqrt() + 1e-10)
            y = y / (y.square().sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + lin((x - y).square()).mean((1, 2, 3))
        return total


def lpips_heads_file(net: str) -> Path:
    """The v0.1 linear heads shipped inside the installed lpips package (found without importing it)."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the lpips package is not installed (make venv installs it with --no-deps)")
    path = Path(list(spec.submodule_search_locations)[0]) / "weights" / "v0.1" / f"{net}.pth"
    if not path.is_file():
        raise UserError(f"{path}: the lpips package's v0.1 {net} heads are missing (reinstall lpips)")
    return path


def load_lpips(net: str = "alex", path=None, sha256=None) -> tuple[LPIPS, str]:
    """(LPIPS network, trunk weights SHA-256): trunk from the torchvision weight file, heads from lpips."""
    if net not in TRUNKS:
        raise UserError(f"--lpips-net {net!r} is unknown (choose alex or vgg)")
    file, digest = resolve_weights(net, path, sha256)
    model = LPIPS(net)
    state = {k: v for k, v in features.weights_state(file).items() if k.startswith("features.")}
    heads = safe_load(lpips_heads_file(net), "lpips heads")
    state.update({f"lins.{k[3]}.weight": v for k, v in heads.items()})  # 'lin0.model.1.weight' -> 'lins.0.weight'
    state.update({"shift": model.shift, "scale": model.scale})
    return features.load_into(model, state, file, f"torchvision {net} trunk"), digest
