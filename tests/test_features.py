"""RadImageNet feature network: loading machinery with weights the test creates, and the perceptual loss."""
import pytest
import torch

from medgen.common.errors import UserError
from medgen.common.features import (ResNet50Features, load_radimagenet, perceptual_distance,
                                               sha256_of)
from tests.test_training import make_trainer, tiny_cfg


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "radimagenet_resnet50.pt"
    state = ResNet50Features().state_dict()
    state["fc.weight"] = torch.zeros(10, 2048)  # a classifier head in the file is ignored
    torch.save(state, path)
    return path


def test_missing_weights_say_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDGEN_WEIGHTS", str(tmp_path))
    with pytest.raises(UserError, match=f"not found at {tmp_path}/radimagenet_resnet50.pt.*MEDGEN_WEIGHTS"):
        load_radimagenet()


def test_checksum_is_checked(weights):
    assert isinstance(load_radimagenet(weights, sha256_of(weights)), ResNet50Features)
    with pytest.raises(UserError, match="does not match"):
        load_radimagenet(weights, "0" * 64)


def test_wrong_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "w.pt"
    torch.save({"conv1.weight": torch.zeros(1)}, bad)
    with pytest.raises(UserError, match="not ResNet-50 weights"):
        load_radimagenet(bad)


def test_preprocessing_grey_to_bgr_minus_mean():
    grey = torch.full((1, 1, 4, 4), 0.5)
    out = ResNet50Features.preprocess(grey)
    assert out.shape == (1, 3, 4, 4)
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([0.5 - 0.406, 0.5 - 0.456, 0.5 - 0.485]))
    rgb = torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)
    assert torch.allclose(ResNet50Features.preprocess(rgb).flatten(), torch.tensor([0.3 - 0.406, 0.2 - 0.456, 0.1 - 0.485]))


def test_perceptual_distance_zero_for_identical_and_pooled_shape(weights):
    net = load_radimagenet(weights)
    a, b = torch.rand(2, 2, 32, 32), torch.rand(2, 2, 32, 32)
    assert torch.allclose(perceptual_distance(net, a, a), torch.zeros(2), atol=1e-6)
    assert (perceptual_distance(net, a, b) > 0).all()
    assert net.pooled(a[:, :1]).shape == (2, 2048)


def test_training_with_perceptual_loss(demo_root, tmp_path, weights):
    base = tiny_cfg(demo_root, tmp_path)
    with_p = tiny_cfg(demo_root, tmp_path, optim={"perceptual_weight": 1.0, "perceptual_weights": str(weights)})
    batch = make_trainer(base).train_data.batch(torch.arange(4))
    losses = []
    for cfg in (base, with_p):
        tr = make_trainer(cfg)
        tr.net.load_state_dict(make_trainer(base).net.state_dict())
        g = torch.Generator().manual_seed(0)
        loss, _, _ = tr.loss(batch, torch.randn(4, 1, 32, 32, generator=g), torch.tensor([11, 201, 501, 901]) / 1000)
        losses.append(loss)
    assert losses[1] > losses[0]
    tr.train_step([batch])
    assert tr.step == 1


class _KerasPortBlock(torch.nn.Module):
    """The Keras-converted RadImageNet bottleneck as that port defines it (biases, stride on the first 1x1,
    eps 1.001e-5): an independent reference for the layout, written out here."""

    def __init__(self, cin, width, stride):
        super().__init__()
        conv = lambda i, o, k, s=1: torch.nn.Conv2d(i, o, k, s, k // 2, bias=True)  # noqa: E731
        bn = lambda c: torch.nn.BatchNorm2d(c, eps=1.001e-5)  # noqa: E731
        self.conv1, self.bn1 = conv(cin, width, 1, stride), bn(width)
        self.conv2, self.bn2 = conv(width, width, 3), bn(width)
        self.conv3, self.bn3 = conv(width, width * 4, 1), bn(width * 4)
        self.downsample = (torch.nn.Sequential(conv(cin, width * 4, 1, stride), bn(width * 4))
                           if stride != 1 or cin != width * 4 else None)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn3(self.conv3(torch.relu(self.bn2(self.conv2(y)))))
        return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


class _KerasPortResNet50(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = torch.nn.Conv2d(3, 64, 7, 2, 3, bias=True), torch.nn.BatchNorm2d(64, eps=1.001e-5)
        cin = 64
        for n, (width, blocks, stride) in enumerate(((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))):
            mods = []
            for i in range(blocks):
                mods.append(_KerasPortBlock(cin, width, stride if i == 0 else 1))
                cin = width * 4
            setattr(self, f"layer{n + 1}", torch.nn.Sequential(*mods))

    def forward(self, x):
        x = torch.nn.functional.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def test_keras_port_layout_loads_and_matches_its_own_forward(tmp_path):
    """The RadImageNet port MONAI Generative uses (conv biases, stride on the 1x1 convolution) loads, for FID and
    the perceptual loss alike, and computes what that layout computes."""
    torch.manual_seed(1)
    ref = _KerasPortResNet50().eval()
    for m in ref.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "RadImageNet-ResNet50_notop.pth"
    torch.save(ref.state_dict(), path)
    assert "conv1.bias" in ref.state_dict()
    net = load_radimagenet(path)
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        expected = ref(ResNet50Features.preprocess(x)).mean((2, 3))
        assert torch.allclose(net.pooled(x), expected, atol=1e-5)
    from medgen.eval.obj_eval.core.networks import load_fid_network
    fid_net, digest = load_fid_network("radimagenet", path)
    assert digest == sha256_of(path)
