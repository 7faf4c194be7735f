"""Whole volumes (data.spatial_dims 3) and latent diffusion: preprocessing against by-hand references, the
3D train -> generate -> evaluate path end to end, the autoencoder stage and a latent run decoded to images,
and the bad input of both."""
import json

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.metrics import SSIMMetric
from PIL import Image

from medgen.common import data as nifti
from medgen.common.dataset import load_split
from medgen.common.errors import UserError
from medgen.common.features import ResNet50Features
from medgen.common.grid import mid_planes
from medgen.config.paths import REPO_ROOT
from medgen.eval.obj_eval.core import metrics as M
from medgen.Generation.TrainGen.core.config import build_config, load_yaml
from medgen.Generation.TrainGen.core.run import train
from tests.conftest import run_script
from tests.helpers_nifti import save
from tests.test_training import tiny_cfg

TINY3D = load_yaml(REPO_ROOT / "config" / "tiny3d.yaml")


def vol_cfg(demo_root, tmp_path, mode="bravo", strategy="rflow", **sections):
    """The tiny 3D preset (16x16x8 volumes) on the test phantoms (8 subjects of 32x32x24)."""
    return tiny_cfg(demo_root, tmp_path, mode, strategy, data={**TINY3D["data"],
                                                               "cache_dir": str(tmp_path / "cache")},
                    optim={"batch_size": 2, **sections.pop("optim", {})}, **sections)


# ---------------------------------------------------------------- preprocessing
def test_smaller_volume_is_padded_never_resized():
    vol = torch.rand(1, 1, 5, 10, 12)
    out = nifti.fit_volume(vol, (8, 16, 16), None, "area")
    # in-plane first padded to a 12x12 square, then each axis padded up to the grid, centred
    ref = F.pad(vol, (0, 0, 1, 1))                       # H 10 -> 12
    ref = F.pad(ref, (2, 2, 2, 2, 1, 2))                 # W 12 -> 16, H 12 -> 16, D 5 -> 8
    assert out.shape == (1, 1, 8, 16, 16) and torch.equal(out, ref)


def test_larger_volume_is_area_downsampled_and_masks_nearest():
    vol = torch.rand(1, 1, 16, 32, 32)
    out = nifti.fit_volume(vol, (8, 16, 16), None, "area")
    ref = vol.reshape(1, 1, 8, 2, 16, 2, 16, 2).mean((3, 5, 7))     # block means: area for a factor of 2
    assert torch.allclose(out, ref, atol=1e-6)
    mask = (torch.rand(1, 1, 16, 32, 32) > 0.7).float()
    m = nifti.fit_volume(mask, (8, 16, 16), None, "nearest")
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    assert nifti.grid_spacing((2.0, 1.0, 1.0), (16, 32, 32), (8, 16, 16), None) == [4.0, 2.0, 2.0]
    assert nifti.grid_spacing((2.0, 1.0, 1.0), (5, 10, 12), (8, 16, 16), None) == [2.0, 1.0, 1.0]


def test_volume_loader_keeps_orientation_and_spacing(tmp_path):
    """One subject read as a volume equals its RAS slices stacked; the grid spacing comes from the affine."""
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    x, y, z = np.meshgrid(np.arange(16), np.arange(16), np.arange(8), indexing="ij")
    bravo = (1 + x + 16 * y + 256 * z).astype(np.float32)
    seg = ((x < 4) & (z == 2)).astype(np.uint8)
    for sub in ("s0", "s1"):
        save(tmp_path / "d" / sub / "bravo.nii.gz", bravo, affine)
        save(tmp_path / "d" / sub / "seg.nii.gz", seg, affine)
    cfg = build_config({"data": {"spatial_dims": 3, "volume_shape": [16, 16, 8], "val_fraction": 0.0,
                                 "norm_percentiles": [0, 100]}}).data
    data = load_split(cfg, tmp_path / "d", "train", ["bravo", "seg"], None)
    assert data.images.shape == (2, 1, 8, 16, 16) and data.masks.shape == (2, 1, 8, 16, 16)
    slices = nifti.to_slices(nifti.normalise(bravo, (0, 100)))
    assert torch.allclose(data.images[0, 0].float(), torch.from_numpy(slices).float(), atol=1e-3)
    assert torch.equal(data.masks[0, 0], torch.from_numpy(nifti.to_slices(seg)))
    assert data.spacing[0].tolist() == [3.0, 2.0, 2.0]


def test_2d_data_asked_for_3d_is_one_clear_error(demo_root, tmp_path):
    cfg = build_config({"data": {"spatial_dims": 3}, "mode": {"name": "class"}}).data
    with pytest.raises(UserError, match="needs NIfTI volumes"):
        load_split(cfg, demo_root / "lesions", "train", ["image"], None, kind="images")
    for sub in ("a", "b"):
        save(tmp_path / "flat" / sub / "bravo.nii.gz", np.ones((16, 16), np.float32))
        save(tmp_path / "flat" / sub / "seg.nii.gz", np.zeros((16, 16), np.uint8))
    cfg = build_config({"data": {"spatial_dims": 3, "val_fraction": 0.0}}).data
    with pytest.raises(UserError, match="2D slices, not volumes"):
        load_split(cfg, tmp_path / "flat", "train", ["bravo", "seg"], None)


def test_mid_planes_are_the_three_central_cuts():
    v = torch.arange(2 * 4 * 6 * 8, dtype=torch.float32).view(1, 2, 4, 6, 8)
    p = mid_planes(v)
    assert p.shape == (3, 2, 8, 8)
    assert torch.equal(p[0, :, 1:7, :], v[0, :, 2])                          # axial, padded 6 -> 8 rows
    assert torch.equal(p[1, :, 2:6, :], v[0, :, :, 3].flip(1))               # coronal, superior on top
    assert torch.equal(p[2, :, 2:6, 1:7], v[0, :, :, :, 4].flip(1))          # sagittal


def test_ms_ssim_3d_single_scale_equals_monai():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 1, 12, 16, 16, generator=g)
    b = (a + 0.2 * torch.rand(3, 1, 12, 16, 16, generator=g)).clamp(0, 1)
    ours = M.ms_ssim(a, b, 1.0, 7, (1.0,))
    ref = SSIMMetric(spatial_dims=3, data_range=1.0, kernel_type="gaussian", win_size=7, kernel_sigma=1.5)(a, b)
    assert torch.allclose(ours.float(), ref.flatten().float(), atol=1e-5)


# ---------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def volume_runs(demo_root, tmp_path_factory):
    """A 3D seg model and a 3D bravo model, trained a few steps on 16x16x8 volumes."""
    root = tmp_path_factory.mktemp("vol")
    runs = {}
    for mode, strategy in (("seg", "ddpm"), ("bravo", "rflow")):
        cfg = vol_cfg(demo_root, root / mode, mode, strategy, optim={"max_steps": 6, "epochs": 2},
                      runtime={"val_interval": 1})
        assert train(cfg) == 0
        runs[mode] = root / mode / "run"
    return runs


def test_3d_bravo_trains_generates_and_evaluates(volume_runs, demo_root, tmp_path):
    run = volume_runs["bravo"]
    assert (run / "samples" / "epoch_0001.png").is_file()
    state = torch.load(run / "best.pt", weights_only=False)
    spacing = state["meta"]["spacing"]
    out = tmp_path / "synth"
    res = run_script("Generation/TrainGen/generate.py", "--image_model", str(run), "--masks_from",
                     str(demo_root / "brain"), "--num_images", "4", "--batch_size", "2", "--num_steps", "3",
                     "--output_dir", str(out), "--png")
    assert res.returncode == 0, res.stderr
    img = nib.load(str(out / "sample_000000" / "bravo.nii.gz"))
    mask = nib.load(str(out / "sample_000000" / "seg.nii.gz"))
    assert img.shape == mask.shape == (16, 16, 8)                   # RAS (X, Y, Z) of the 16x16x8 grid
    assert np.allclose(img.header.get_zooms(), [spacing[2], spacing[1], spacing[0]])
    assert np.array_equal(img.affine, mask.affine)
    assert (out / "preview_4x4.png").is_file() and (out / "sample_000000" / "bravo.png").is_file()
    # the loaders read the synthetic set back as volumes
    cfg = build_config({"data": {"spatial_dims": 3, "volume_shape": [16, 16, 8], "val_fraction": 0.0}}).data
    back = load_split(cfg, out, "train", ["bravo", "seg"], None)
    assert back.images.shape == (4, 1, 8, 16, 16)

    weights = tmp_path / "radimagenet_test.pt"
    torch.manual_seed(0)
    torch.save(ResNet50Features().state_dict(), weights)
    res = run_script("eval/obj_eval/run_evaluation.py", "--synthetic-dir", str(out), "--real-dir",
                     str(demo_root / "brain"), "--spatial-dims", "3", "--metrics", "fid,mae,psnr,ms_ssim",
                     "--feature-network", "radimagenet", "--radimagenet-weights", str(weights),
                     "--output", str(tmp_path / "eval"), "--bootstrap", "0")
    assert res.returncode == 0, res.stderr
    result = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    recs = {r["metric"]: r for r in result["metrics"]}
    planes = [recs[f"fid_radimagenet_{p}"]["value"] for p in ("axial", "coronal", "sagittal")]
    assert recs["fid_radimagenet_2.5d"]["value"] == pytest.approx(np.mean(planes))
    volumes = {"synthetic_volumes": 4, "real_volumes": 10}                 # every split of the demo's 10 subjects
    assert recs["fid_radimagenet_axial"]["n"] == {"synthetic": 4 * 8, "real": 10 * 8, **volumes}  # every axial slice
    assert recs["fid_radimagenet_sagittal"]["n"] == {"synthetic": 4 * 16, "real": 10 * 16, **volumes}
    assert "4 synthetic and 10 real volumes" in recs["fid_radimagenet_axial"]["warning"]    # the warning is by volume
    assert "kid_radimagenet_2.5d" in recs
    assert recs["mae"]["n"] == 4 and recs["ms_ssim_diversity"]["n"] == 6
    assert result["volume_shape"] == [16, 16, 8]


def test_3d_chained_seg_to_bravo(volume_runs, tmp_path):
    out = tmp_path / "chained"
    res = run_script("Generation/TrainGen/generate.py", "--seg_model", str(volume_runs["seg"]), "--image_model",
                     str(volume_runs["bravo"]), "--num_images", "2", "--num_steps", "2", "--seg_num_steps", "3",
                     "--seg_sampler", "ddim", "--min_mask_area", "0", "--max_mask_area", "1",
                     "--max_components", "1000", "--output_dir", str(out))
    assert res.returncode == 0, res.stderr
    mask = np.asanyarray(nib.load(str(out / "sample_000001" / "seg.nii.gz")).dataobj)
    assert mask.shape == (16, 16, 8) and set(np.unique(mask)) <= {0, 1}


def test_3d_generate_refuses_2d_only_flags(volume_runs, tmp_path):
    res = run_script("Generation/TrainGen/generate.py", "--image_model", str(volume_runs["bravo"]),
                     "--masks_from", "nowhere", "--output_size", "32", "--output_dir", str(tmp_path / "o"))
    assert res.returncode == 2 and "--output_size works on 2D samples" in res.stderr
    assert "Traceback" not in res.stderr


# ---------------------------------------------------------------- latent diffusion
def latent_cfg(demo_root, tmp_path, dims, optim=None, **sections):
    data = {**TINY3D["data"]} if dims == 3 else {"image_size": 16, "positive_only": True}
    return tiny_cfg(demo_root, tmp_path, "bravo", "rflow", data={**data, "cache_dir": str(tmp_path / "cache")},
                    optim={"batch_size": 4, "epochs": 1, "max_steps": 4, "lr": 1e-3, **(optim or {})}, **sections)


def ae_cfg(demo_root, tmp_path, dims):
    """The autoencoder stage: 2 levels (a 2x smaller grid), 2 latent channels."""
    return latent_cfg(demo_root, tmp_path, dims, runtime={"stage": "autoencoder"},
                      latent={"channels": [8, 16], "latent_channels": 2})


@pytest.mark.parametrize("dims", [2, 3])
def test_latent_diffusion_end_to_end(demo_root, tmp_path, dims):
    """Autoencoder a few steps, diffusion on its latents, generation decoded to images of the data's size."""
    assert train(ae_cfg(demo_root, tmp_path / "ae", dims)) == 0
    ae_run = tmp_path / "ae" / "run"
    assert list(ae_run.glob("ckpt_*.pt")) and list((ae_run / "samples").glob("reconstruction_*.png"))
    cfg = latent_cfg(demo_root, tmp_path / "ld", dims, optim={"max_steps": None, "batch_size": 2},
                     runtime={"val_interval": 1}, latent={"autoencoder": str(ae_run)})
    assert train(cfg) == 0
    state = torch.load(tmp_path / "ld" / "run" / "best.pt", weights_only=False)
    assert state["meta"]["latent_scale"] > 0 and (tmp_path / "ld" / "run" / "samples" / "epoch_0001.png").is_file()
    assert "latent diffusion: in the latent space of" in (tmp_path / "ld" / "run" / "train.log").read_text()
    # the network works on the 2x smaller latent grid with the autoencoder's 2 channels (+ the mask)
    first = next(v for k, v in state["model"].items() if k.startswith("conv_in") and k.endswith("weight"))
    assert first.shape[1] == 2 + 1
    out = tmp_path / "synth"
    res = run_script("Generation/TrainGen/generate.py", "--image_model", str(tmp_path / "ld" / "run"),
                     "--masks_from", str(demo_root / "brain"), "--num_images", "2", "--num_steps", "3",
                     "--output_dir", str(out))
    assert res.returncode == 0, res.stderr
    arr = np.asanyarray(nib.load(str(out / "sample_000000" / "bravo.nii.gz")).dataobj)
    assert arr.shape == ((16, 16, 8) if dims == 3 else (16, 16, 1)) and 0 <= arr.min() and arr.max() <= 1
    if dims == 2:   # an autoencoder retrained in place would decode the run's latents wrongly: refused
        ckpt = next(ae_run.glob("ckpt_*.pt"))
        state = torch.load(ckpt, weights_only=False)
        state["autoencoder"] = {k: v + 1e-3 if v.is_floating_point() else v for k, v in state["autoencoder"].items()}
        torch.save(state, ckpt)
        res = run_script("Generation/TrainGen/generate.py", "--image_model", str(tmp_path / "ld" / "run"),
                         "--masks_from", str(demo_root / "brain"), "--num_images", "2", "--output_dir",
                         str(tmp_path / "again"))
        assert res.returncode == 2 and "changed since the run was trained" in res.stderr


def test_latent_bad_input_is_one_clear_line(demo_root, tmp_path):
    assert train(ae_cfg(demo_root, tmp_path / "ae", 2)) == 0
    ae_run = tmp_path / "ae" / "run"
    res = run_script("Generation/TrainGen/train.py", "--config", "config/tiny.yaml", "--data_dir",
                     str(demo_root / "brain"), "--mode", "dual", "--latent", str(ae_run), "--image_size", "16",
                     "--max_steps", "1", "--run_dir", str(tmp_path / "x"), "--set", f"data.cache_dir={tmp_path / 'c'}")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "codes bravo (trained for mode bravo); mode dual generates t1_pre, t1_gd" in res.stderr.strip().splitlines()[-1]
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    diffusion = tmp_path / "diffusion_run"
    assert train(tiny_cfg(demo_root, diffusion, "bravo", "rflow", optim={"max_steps": 1},
                          runtime={"val_interval": 100})) == 0
    cases = [({"data": {**TINY3D["data"]}}, "the autoencoder is 2D, the data are 3D"),
             ({"data": {"image_size": 15}}, "not divisible by the autoencoder's downsampling factor 2"),
             ({"data": {"image_size": 20}}, "latent grid 10x10 does not divide by 4"),
             ({"latent": {"autoencoder": str(tmp_path / "nothing")}}, "--latent: checkpoint not found"),
             ({"latent": {"autoencoder": str(corrupt)}}, str(corrupt)),
             ({"latent": {"autoencoder": str(diffusion / "run")}}, "not an autoencoder run")]
    for sections, expected in cases:
        cfg = tiny_cfg(demo_root, tmp_path / "bad", "bravo", "rflow", **{"latent": {"autoencoder": str(ae_run)},
                                                                          "data": {"image_size": 16}, **sections})
        with pytest.raises(UserError, match=expected.replace("(", r"\(").replace(")", r"\)")):
            train(cfg)


def test_sample_form_of_fid_equals_the_matrix_root_form():
    """The fast path FID takes when N < dimensions gives the d x d formula's value (and scipy's sqrtm)."""
    from scipy import linalg
    rng = np.random.default_rng(0)
    real, syn = rng.random((40, 96)), rng.random((30, 96)) * 1.2 + 0.1
    mu1, s1 = M.gaussian_stats(real)
    mu2, s2 = M.gaussian_stats(syn)
    matrix_form = M.frechet_distance(mu1, s1, mu2, s2)
    diff = mu1 - mu2
    scipy_form = diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(linalg.sqrtm(s1 @ s2)).real
    assert M.frechet_from_samples(real, syn) == pytest.approx(matrix_form, rel=1e-7)
    assert M.fid_from_features(real, syn, 0)["value"] == pytest.approx(scipy_form, rel=1e-6)


def test_random_flip_mirrors_images_and_masks_together(demo_root, tmp_path):
    """Volumes are flipped left-right by default, image and mask alike, about half of them; slices are not."""
    from tests.test_training import make_trainer
    tr = make_trainer(vol_cfg(demo_root, tmp_path))
    batch = tr.train_data.batch(torch.arange(6))
    out = tr.flipped(batch)
    flipped = [not torch.equal(out["images"][i], batch["images"][i]) for i in range(6)]
    for i in range(6):
        expect = batch["images"][i].flip(-1) if flipped[i] else batch["images"][i]
        assert torch.equal(out["images"][i], expect)
        assert torch.equal(out["masks"][i], batch["masks"][i].flip(-1) if flipped[i] else batch["masks"][i])
    assert 0 < sum(flipped) < 6
    flat = make_trainer(tiny_cfg(demo_root, tmp_path / "2d"))
    b2 = flat.train_data.batch(torch.arange(4))
    assert all(torch.equal(flat.flipped(b2)[k], b2[k]) for k in b2)


def test_utility_harness_runs_a_3d_segmenter(demo_root, tmp_path):
    """run_utility.py --spatial-dims 3: a 3D BasicUNet per recipe and seed, and the memorization audit flags
    real training volumes offered as synthetic ones as copies."""
    out = tmp_path / "utility"
    res = run_script("eval/obj_eval/run_utility.py", "--real_dir", str(demo_root / "brain"), "--synthetic_dir",
                     str(demo_root / "brain" / "train"), "--spatial-dims", "3", "--volume-shape", "32,32,32",
                     "--recipes", "real,real+synthetic", "--seeds", "2", "--preset", "tiny", "--max_steps", "4",
                     "--audit", "memorization", "--output", str(out), "--compute", "local",
                     env={"MEDGEN_CACHE": str(tmp_path / "cache")})
    assert res.returncode == 0, res.stderr[-2000:]
    study = json.loads((out / "utility.json").read_text())
    assert study["image_size"] == [32, 32, 32] and len(study["rows"]) == 2
    mem = next(r for r in study["audit"] if r["metric"] == "memorization")
    assert mem["value"] > 0.95
    md = (out / "utility.md").read_text()
    assert "32x32x32 volumes" in md and "HD95 per volume (mm)" in md
    assert set(study["rows"][0]["metrics"]) == {"dice_subject", "hd95_volume"}


def test_autoencoder_stage_resumes_exactly(demo_root, tmp_path):
    """4 steps straight equal 2 steps, a stop, and --resume auto to 4: weights, discriminator and optimizer."""
    def stage(root, max_steps, resume=None):
        cfg = latent_cfg(demo_root, root, 2, optim={"max_steps": max_steps, "epochs": 3},
                         runtime={"stage": "autoencoder", **({"resume": resume} if resume else {})},
                         latent={"channels": [8, 16], "latent_channels": 2})
        assert train(cfg) == 0
        return torch.load(sorted((root / "run").glob("ckpt_*.pt"))[-1], weights_only=False)
    straight = stage(tmp_path / "a", 7)
    stage(tmp_path / "b", 3)
    resumed = stage(tmp_path / "b", 7, resume="auto")
    assert straight["step"] == resumed["step"] == 7 and straight["epoch"] == resumed["epoch"] == 1
    for key in ("autoencoder", "discriminator"):
        assert all(torch.equal(straight[key][k], resumed[key][k]) for k in straight[key])
    assert torch.equal(straight["rng"]["cpu"], resumed["rng"]["cpu"])


def test_autoencoder_stage_honours_a_preemption_request(demo_root, tmp_path):
    """The SLURM trap's .preempt file: the stage checkpoints at its next log interval, leaves .requeue, stops."""
    run = tmp_path / "ae" / "run"
    run.mkdir(parents=True)
    (run / ".preempt").touch()
    cfg = latent_cfg(demo_root, tmp_path / "ae", 2, optim={"max_steps": 50, "epochs": 5},
                     runtime={"stage": "autoencoder", "log_interval": 2},
                     latent={"channels": [8, 16], "latent_channels": 2})
    assert train(cfg) == 0
    assert (run / ".requeue").is_file() and not (run / ".preempt").exists()
    assert [p.name for p in run.glob("ckpt_*.pt")] == ["ckpt_00000002.pt"]


def test_segment_volumes_and_class_latents_reach_generation(demo_root, tmp_path):
    """The modes that need an image (segment, 3D) or a label (class, in a latent space) generate too."""
    cfg = vol_cfg(demo_root, tmp_path / "segment", "segment", "ddpm", optim={"max_steps": 2},
                  runtime={"val_interval": 100})
    assert train(cfg) == 0
    res = run_script("Generation/TrainGen/generate.py", "--image_model", str(tmp_path / "segment" / "run"),
                     "--images_from", str(demo_root / "brain" / "val"), "--num_steps", "2",
                     "--output_dir", str(tmp_path / "masks"))
    assert res.returncode == 0, res.stderr[-2000:]
    mask = np.asanyarray(nib.load(str(tmp_path / "masks" / "sample_000000" / "seg.nii.gz")).dataobj)
    assert mask.shape == (16, 16, 8) and set(np.unique(mask)) <= {0, 1}

    latent = {"channels": [8, 16], "latent_channels": 2}
    stage = {"data": {"image_size": 16}, "optim": {"batch_size": 4, "max_steps": 2}}
    assert train(tiny_cfg(demo_root, tmp_path / "cae", "class", "ddpm", runtime={"stage": "autoencoder"},
                          latent=latent, **stage)) == 0
    assert train(tiny_cfg(demo_root, tmp_path / "cld", "class", "ddpm", runtime={"val_interval": 100},
                          latent={"autoencoder": str(tmp_path / "cae" / "run")}, **stage)) == 0
    res = run_script("Generation/TrainGen/generate.py", "--image_model", str(tmp_path / "cld" / "run"),
                     "--num_images", "4", "--num_steps", "2", "--guidance_scale", "2",
                     "--output_dir", str(tmp_path / "classes"))
    assert res.returncode == 0, res.stderr[-2000:]
    pngs = sorted((tmp_path / "classes").glob("*/sample_*.png"))
    assert len(pngs) == 4 and all(Image.open(p).size == (16, 16) for p in pngs)   # decoded to the data's size


def test_volume_autoencoder_perceptual_term_is_2_5d(demo_root, tmp_path):
    """With RadImageNet weights (made here), a volume autoencoder's perceptual term is the mean of three
    per-axis distances on a fifth of the slices: zero for a perfect reconstruction, positive otherwise."""
    from medgen.Generation.TrainGen.core.autoencoder import perceptual_term, slice_sample
    torch.manual_seed(0)
    net = ResNet50Features().eval()
    x = torch.rand(2, 1, 10, 16, 20) * 2 - 1
    sample = slice_sample(x, x)
    assert [a.shape for a, _ in sample] == [(2 * 2, 1, 16, 20), (2 * 3, 1, 10, 20), (2 * 4, 1, 10, 16)]
    assert all(torch.equal(a, b) for a, b in sample)
    with torch.no_grad():
        assert float(perceptual_term(net, x, x)) == pytest.approx(0, abs=1e-6)
        assert float(perceptual_term(net, x.flip(-1), x)) > 0
    weights = tmp_path / "radimagenet.pt"
    torch.save(net.state_dict(), weights)
    cfg = latent_cfg(demo_root, tmp_path / "ae", 3, optim={"max_steps": 2, "perceptual_weights": str(weights)},
                     runtime={"stage": "autoencoder", "log_interval": 1},
                     latent={"channels": [8, 16], "latent_channels": 2})
    assert train(cfg) == 0
    assert "perceptual=" in (tmp_path / "ae" / "run" / "train.log").read_text()
