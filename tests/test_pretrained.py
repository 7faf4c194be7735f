"""Starting from diffusers-format weights: a tiny UNet2DModel saved with save_pretrained, our backend's
prediction against diffusers' own forward, fine-tuning with train.py --init_from and generating, and the
folder's failure modes."""
import json
import shutil

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

from medgen.common.errors import UserError
from medgen.Generation.TrainGen.core import pretrained
from medgen.Generation.TrainGen.core.config import build_config
from medgen.Generation.TrainGen.core.modes import MODES
from medgen.Generation.TrainGen.core.network import build_unet
from tests.conftest import run_script


def save_pipeline(root, prediction="epsilon", beta_schedule="linear"):
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=8, attention_head_dim=8)
    with torch.no_grad():                      # a non-trivial function: the saved zero-init conv_out would hide errors
        for p in unet.parameters():
            p.add_(0.02 * torch.randn_like(p))
    unet.save_pretrained(root / "unet")
    DDPMScheduler(num_train_timesteps=1000, beta_schedule=beta_schedule,
                  prediction_type=prediction).save_pretrained(root / "scheduler")
    return unet.eval()


def our_net(root, mode_name, num_classes=None, image_channels=None):
    cfg = build_config({"model": {"preset": "tiny"}, "strategy": {"name": "ddpm"}, "mode": {"name": mode_name},
                        "runtime": {"init_from": str(root)}})
    cfg, _ = pretrained.apply_to_config(cfg, pretrained.read_folder(root))
    mode = MODES[mode_name](cfg.mode, num_classes, image_channels)
    net = build_unet(cfg.model, mode.in_channels, mode.out_channels, mode.class_embeds)
    folder = pretrained.read_folder(root)
    net.unet.load_state_dict(pretrained.adapt_state(pretrained.read_weights(folder), net.unet.state_dict(),
                                                    mode.out_channels)[0])
    return net.eval(), cfg


def test_backend_equals_diffusers_forward_before_fine_tuning(tmp_path):
    ref = save_pipeline(tmp_path / "pipe")
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([10, 700])
    mask = (torch.rand(2, 1, 32, 32) > 0.8).float() * 2 - 1
    with torch.no_grad():
        want = ref(x.repeat(1, 3, 1, 1), t).sample.mean(1, keepdim=True)   # grey image as RGB, output averaged
        net, cfg = our_net(tmp_path / "pipe", "bravo")                      # image + mask channels -> 1
        got = net(torch.cat([x, mask], 1), t.float())
        assert torch.allclose(got, want, atol=1e-5)
        rgb = torch.rand(2, 3, 32, 32) * 2 - 1
        net3, _ = our_net(tmp_path / "pipe", "class", num_classes=3, image_channels=3)
        assert torch.allclose(net3(rgb, t.float(), class_labels=torch.tensor([0, 2])), ref(rgb, t).sample, atol=1e-5)
    assert cfg.model.backend == "diffusers" and cfg.model.unet2d["block_out_channels"] == [16, 32]
    assert cfg.strategy.num_timesteps == 1000 and cfg.strategy.ddpm.prediction == "epsilon"


def test_fine_tune_one_class_and_generate(demo_root, tmp_path):
    save_pipeline(tmp_path / "pipe", prediction="v_prediction")
    one_class = tmp_path / "melanoma_only"
    shutil.copytree(demo_root / "lesions" / "melanoma", one_class / "melanoma")
    res = run_script("Generation/TrainGen/train.py", "--config", "config/tiny.yaml", "--mode", "class", "--strategy",
                     "ddpm", "--init_from", str(tmp_path / "pipe"), "--data_dir", str(one_class), "--max_steps", "3",
                     "--val_interval", "100", "--run_dir", str(tmp_path / "run"),
                     "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", "data.val_fraction=0.25")
    assert res.returncode == 0, res.stderr[-800:]
    assert "strategy.ddpm.prediction: 'epsilon' -> 'v'" in res.stdout               # the printed override
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "backend: diffusers" in saved and "prediction: v" in saved    # the pretrained schedule, stored
    out = tmp_path / "gen"
    res = run_script("Generation/TrainGen/generate.py", "--image_model", str(tmp_path / "run"), "--num_images", "3",
                     "--sampler", "dpmpp_2m", "--num_steps", "4", "--output_dir", str(out), "--device", "cpu")
    assert res.returncode == 0, res.stderr[-800:]
    assert len(list((out / "melanoma").glob("*.png"))) == 3


def test_bad_diffusers_folders(tmp_path):
    save_pipeline(tmp_path / "pipe")
    cfg = build_config({"runtime": {"init_from": str(tmp_path / "pipe")}})
    with pytest.raises(UserError, match="folder does not exist"):
        pretrained.read_folder(tmp_path / "missing")
    broken = tmp_path / "broken"
    shutil.copytree(tmp_path / "pipe", broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="unreadable weights"):
        pretrained.read_weights(pretrained.read_folder(broken))
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(UserError, match="no weights file"):
        pretrained.read_folder(broken)
    other = tmp_path / "vae"
    shutil.copytree(tmp_path / "pipe", other)
    conf = json.loads((other / "unet" / "config.json").read_text())
    (other / "unet" / "config.json").write_text(json.dumps({**conf, "_class_name": "AutoencoderKL"}))
    with pytest.raises(UserError, match="not a UNet2DModel"):
        pretrained.read_folder(other)
    scaled = tmp_path / "scaled"
    save_pipeline(scaled, beta_schedule="scaled_linear")
    with pytest.raises(UserError, match="cannot be represented by the ddpm strategy"):
        pretrained.apply_to_config(cfg, pretrained.read_folder(scaled))
    v = tmp_path / "v"
    save_pipeline(v, prediction="v_prediction")
    explicit = build_config({"strategy": {"ddpm": {"prediction": "epsilon", "schedule": "cosine"}}})
    with pytest.raises(UserError, match="strategy.ddpm.schedule"):
        pretrained.apply_to_config(explicit, pretrained.read_folder(v))
    with pytest.raises(UserError, match="--strategy ddpm"):
        pretrained.apply_to_config(build_config({"strategy": {"name": "rflow"}}), pretrained.read_folder(v))
    res = run_script("Generation/TrainGen/train.py", "--config", "config/tiny.yaml", "--init_from", str(broken),
                     "--mode", "class", "--max_steps", "1")
    assert res.returncode == 2 and "Traceback" not in res.stderr and "no weights file" in res.stderr
