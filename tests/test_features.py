"""RadImageNet feature network: loading machinery with weights the test creates, and the perceptual loss."""
import pytest
import torch

from Generation.TrainGen.core.errors import UserError
from Generation.TrainGen.core.features import (ResNet50Features, load_radimagenet, perceptual_distance,
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
        loss, _, _ = tr.loss(batch, torch.randn(4, 1, 32, 32, generator=g), torch.tensor([10, 200, 500, 900]))
        losses.append(loss)
    assert losses[1] > losses[0]
    tr.train_step([batch])
    assert tr.step == 1
