"""Evaluation: numerics against reference implementations, weight handling, and the CLIs end to end with
feature-network weights created here (the published files cannot be downloaded on CI machines)."""
import json

import numpy as np
import pytest
import scipy.linalg
import torch
from monai.metrics.regression import compute_ms_ssim
from skimage.metrics import peak_signal_noise_ratio

from medgen.eval.obj_eval.core import metrics as M
from medgen.eval.obj_eval.core.networks import (WEIGHT_FILES, InceptionFID, LPIPS, load_fid_network, load_lpips,
                                         lpips_heads_file, resolve_weights)
from medgen.common.errors import UserError
from medgen.common.features import ResNet50Features, sha256_of
from medgen.Generation.TrainGen.generate import main as generate_main
from tests.conftest import run_script


def scipy_frechet(mu1, s1, mu2, s2):
    """The pytorch-fid formula with scipy.linalg.sqrtm, as the reference."""
    covmean, _ = scipy.linalg.sqrtm(s1.dot(s2), disp=False)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))


def test_frechet_distance_matches_scipy_reference():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 32))
    b = rng.normal(size=(400, 32)) @ rng.normal(size=(32, 32)) * 0.3 + 0.5
    mu1, s1 = M.gaussian_stats(a)
    mu2, s2 = M.gaussian_stats(b)
    ours, ref = M.frechet_distance(mu1, s1, mu2, s2), scipy_frechet(mu1, s1, mu2, s2)
    assert ref > 1 and abs(ours - ref) / ref < 1e-8
    assert abs(M.frechet_distance(mu1, s1, mu1, s1)) < 1e-8           # identical statistics: 0
    res = M.fid_from_features(a, a.copy(), n_boot=5)
    assert abs(res["value"]) < 1e-8 and res["n"] == {"real": 500, "synthetic": 500} and len(res["ci95"]) == 2


def test_psnr_and_mae_match_references():
    rng = np.random.default_rng(1)
    a, b = rng.random((4, 1, 16, 16)), rng.random((4, 1, 16, 16))
    ours = M.psnr(torch.from_numpy(a), torch.from_numpy(b), 1.0).numpy()
    ref = [peak_signal_noise_ratio(a[i], b[i], data_range=1.0) for i in range(4)]
    assert np.allclose(ours, ref, rtol=1e-12)
    assert np.allclose(M.mae(torch.from_numpy(a), torch.from_numpy(b)).numpy(), np.abs(a - b).reshape(4, -1).mean(1))
    assert M.mae(torch.from_numpy(a), torch.from_numpy(a)).abs().max() == 0


@pytest.mark.parametrize("size", [32, 64, 128])
def test_ms_ssim_matches_monai(size):
    g = torch.Generator().manual_seed(size)
    x = torch.rand(3, 1, size, size, generator=g)
    y = (x + 0.2 * torch.randn(3, 1, size, size, generator=g)).clamp(0, 1)
    window, weights = M.ms_ssim_settings(size)
    ours = M.ms_ssim(x, y, 1.0, window, weights)
    ref = compute_ms_ssim(y_pred=x, y=y, spatial_dims=2, data_range=1.0, kernel_size=window, weights=weights).flatten()
    assert torch.allclose(ours.float(), ref, atol=1e-5), (ours, ref)
    assert torch.allclose(M.ms_ssim(x, x, 1.0, window, weights), torch.ones(3, dtype=torch.float64))


def test_ms_ssim_window_fits_the_image():
    assert M.ms_ssim_settings(128)[0] == 7 and len(M.ms_ssim_settings(128)[1]) == 5
    assert M.ms_ssim_settings(256) == (11, tuple(w / sum(M.MS_SSIM_WEIGHTS) for w in M.MS_SSIM_WEIGHTS))
    w, ws = M.ms_ssim_settings(32)
    assert w >= 7 and abs(sum(ws) - 1) < 1e-12


def test_architectures_have_the_published_layouts():
    inc = InceptionFID()
    assert sum(p.numel() for p in inc.parameters()) == 23_850_960   # torchvision Inception-v3, 1008 classes, no aux
    assert inc.state_dict()["Mixed_7c.branch_pool.conv.weight"].shape == (192, 2048, 1, 1)
    assert sum(p.numel() for k, p in LPIPS("alex").named_parameters() if k.startswith("features")) == 2_469_696
    assert sum(p.numel() for k, p in LPIPS("vgg").named_parameters() if k.startswith("features")) == 14_714_688
    with torch.no_grad():
        assert inc.eval()(torch.rand(2, 1, 40, 40)).shape == (2, 2048)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Feature-network files in the published layouts, with random values."""
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("weights")
    inc = InceptionFID()
    for m in inc.modules():  # random running stats so features are not all equal
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2)
    files = {"inception": d / "inception_test.pth", "radimagenet": d / "radimagenet_test.pt", "alex": d / "alex_test.pth"}
    torch.save(inc.state_dict(), files["inception"])
    torch.save(ResNet50Features().state_dict(), files["radimagenet"])
    alex = {k: v for k, v in LPIPS("alex").state_dict().items() if k.startswith("features.")}
    alex["classifier.1.weight"] = torch.zeros(2, 2)  # the rest of a torchvision file is ignored
    torch.save(alex, files["alex"])
    return files


def test_missing_weights_say_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDGEN_WEIGHTS", str(tmp_path))
    for kind in ("inception", "alex"):
        with pytest.raises(UserError, match=f"not found at {tmp_path}/{WEIGHT_FILES[kind]}.*MEDGEN_WEIGHTS"):
            resolve_weights(kind)


def test_checksums_are_checked(weights, tmp_path):
    named = tmp_path / WEIGHT_FILES["inception"]
    named.write_bytes(weights["inception"].read_bytes())
    with pytest.raises(UserError, match="does not start with 6726825d"):
        load_fid_network("inception", named)
    with pytest.raises(UserError, match="does not match"):
        load_fid_network("inception", weights["inception"], "0" * 64)
    net, digest = load_fid_network("inception", weights["inception"], sha256_of(weights["inception"]))
    assert digest == sha256_of(weights["inception"])
    with pytest.raises(UserError, match="not FID Inception-v3 weights"):
        load_fid_network("inception", weights["alex"])


def test_lpips_uses_the_packages_heads_and_is_zero_for_identical(weights):
    net, _ = load_lpips("alex", weights["alex"])
    heads = torch.load(lpips_heads_file("alex"), map_location="cpu", weights_only=True)
    for i in range(5):
        assert torch.equal(net.lins[i].weight, heads[f"lin{i}.model.1.weight"])
    x = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        assert net(x, x).abs().max() < 1e-6
        d = net(x, torch.rand(3, 1, 32, 32))
    assert (d > 0).all()  # the shipped heads are non-negative


def test_lpips_equals_the_lpips_package_where_both_run(weights):
    pytest.importorskip("torchvision", reason="the lpips package needs torchvision, which this machine lacks")
    import lpips
    ref = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False)
    ours, _ = load_lpips("alex", weights["alex"])
    # same trunk weights in both (pnet_rand: the package would otherwise download them)
    tv = [m for m in ref.net.modules() if isinstance(m, torch.nn.Conv2d)]
    mine = [ours.features[k] for k in ("0", "3", "6", "8", "10")]
    for a, b in zip(tv, mine):
        a.weight.data.copy_(b.weight)
        a.bias.data.copy_(b.bias)
    x, y = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(ref(x, y, normalize=True).flatten(), ours(x, y), atol=1e-5)


@pytest.fixture(scope="module")
def paired_set(tiny_models, demo_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("evalgen") / "paired"
    assert generate_main(["--image_model", str(tiny_models["bravo_rflow"]), "--masks_from",
                          str(demo_root / "brain" / "val"), "--num_images", "10", "--num_steps", "3",
                          "--output_dir", str(out), "--device", "cpu"]) == 0
    return out


def test_run_evaluation_end_to_end(paired_set, demo_root, weights, tmp_path):
    real = demo_root / "brain" / "val"
    args = ["--synthetic_dir", str(paired_set), "--real-dir", str(real), "--metrics", "all", "--positive-only",
            "--output", str(tmp_path / "ev"), "--bootstrap", "3", "--max-pairs", "20",
            "--inception-weights", str(weights["inception"]), "--radimagenet_weights", str(weights["radimagenet"]),
            "--alex-weights", str(weights["alex"])]
    env = {"MEDGEN_CACHE": str(tmp_path / "cache")}
    res = run_script("eval/obj_eval/run_evaluation.py", *args, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    names = {r["metric"]: r for r in result["metrics"]}
    assert set(names) == {"fid_inception", "fid_radimagenet", "kid_inception", "kid_radimagenet", "mae", "psnr",
                          "ms_ssim_quality", "lpips_quality", "ms_ssim_diversity", "lpips_diversity"}
    kid = names["kid_inception"]       # random Inception weights map these images to nearly one point: KID ~ 0
    assert kid["se"] is not None and kid["se"] >= 0 and kid["n"] == names["fid_inception"]["n"], kid
    for r in names.values():
        assert r.get("available", True), r
        assert r["n"] and r["method"] and r["value"] is not None and np.isfinite(r["value"])
    assert names["fid_inception"]["n"] == {"real": result["n_real"], "synthetic": 10}
    assert names["fid_inception"]["method"]["weights_sha256"] == sha256_of(weights["inception"])
    assert "warning" in names["fid_inception"] and "floor" in names["fid_inception"]
    assert names["mae"]["n"] == 10 and names["mae"]["method"]["pairs_by"].startswith("conditioning mask")
    assert names["ms_ssim_quality"]["method"]["window"] == 7 and names["psnr"]["method"]["data_range"] == 1.0
    for f in ("report.md", "metrics.png", "samples.png"):
        assert (tmp_path / "ev" / f).is_file()
    assert "| fid_inception" in (tmp_path / "ev" / "report.md").read_text()
    cached = list((tmp_path / "cache" / "fid_features").glob("inception-*.npy"))
    assert len(cached) == 1
    again = run_script("eval/obj_eval/metrics/fid.py", "--synthetic-dir", str(paired_set), "--real_dir", str(real),
                       "--positive-only", "--weights", str(weights["inception"]), "--output", str(tmp_path / "ev2"),
                       "--bootstrap", "0", env=env)
    assert again.returncode == 0, again.stderr[-2000:]
    fid2 = json.loads((tmp_path / "ev2" / "metrics.json").read_text())["metrics"][0]
    assert fid2["method"]["real_features_cache"] == str(cached[0])
    assert abs(fid2["value"] - names["fid_inception"]["value"]) < 1e-9 * max(1, abs(fid2["value"]))
    rep = run_script("eval/obj_eval/generate_report.py", "--results", str(tmp_path / "ev"), str(tmp_path / "ev2"),
                     "--output", str(tmp_path / "cmp.md"))
    assert rep.returncode == 0 and "fid_inception" in (tmp_path / "cmp.md").read_text()


def test_identical_sets_give_zero_and_one(paired_set, weights, tmp_path):
    res = run_script("eval/obj_eval/run_evaluation.py", "--synthetic-dir", str(paired_set), "--real-dir",
                     str(paired_set), "--metrics", "fid,mae,ms_ssim", "--feature-network", "inception",
                     "--inception-weights", str(weights["inception"]), "--bootstrap", "0", "--output",
                     str(tmp_path / "same"), env={"MEDGEN_CACHE": str(tmp_path / "cache")})
    assert res.returncode == 0, res.stderr[-2000:]
    names = {r["metric"]: r for r in json.loads((tmp_path / "same" / "metrics.json").read_text())["metrics"]}
    assert abs(names["fid_inception"]["value"]) < 1e-6
    assert names["mae"]["value"] == 0 and names["mae"]["method"]["pairs_by"] == "sample id"
    assert abs(names["ms_ssim_quality"]["value"] - 1) < 1e-9


def test_without_pairs_the_metrics_say_so(tiny_models, demo_root, tmp_path):
    res = run_script("eval/obj_eval/metrics/mae_psnr.py", "--synthetic-dir", str(demo_root / "brain" / "val"),
                     "--real-dir", str(demo_root / "brain" / "train"), env={"MEDGEN_CACHE": str(tmp_path / "c")})
    assert res.returncode == 2 and "need pairs" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize("args, message", [
    (["--metrics", "fid,nope"], "unknown metric 'nope'"),
    (["--feature-network", "clip"], "--feature-network 'clip' is unknown"),
    (["--real-dir", "/nonexistent"], "/nonexistent: folder does not exist"),
])
def test_bad_flags_are_clear_errors(paired_set, tmp_path, args, message):
    base = {"--synthetic-dir": str(paired_set), "--real-dir": str(paired_set)}
    for k, v in zip(args[::2], args[1::2]):
        base[k] = v
    flat = [x for kv in base.items() for x in kv] + [a for a in args if a.startswith("--") and a not in base]
    res = run_script("eval/obj_eval/run_evaluation.py", *flat, "--output", str(tmp_path / "o"))
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_fid_without_weights_is_a_clear_error(paired_set, tmp_path):
    res = run_script("eval/obj_eval/metrics/fid.py", "--synthetic-dir", str(paired_set), "--real-dir",
                     str(paired_set), env={"MEDGEN_WEIGHTS": str(tmp_path)})
    assert res.returncode == 2 and "inception weights not found" in res.stderr and "Traceback" not in res.stderr


def test_image_folders_evaluate(tiny_models, demo_root, tmp_path):
    out = tmp_path / "lesions"
    assert generate_main(["--image_model", str(tiny_models["class"]), "--num_images", "6", "--num_steps", "3",
                          "--sampler", "ddim", "--output_dir", str(out), "--device", "cpu"]) == 0
    res = run_script("eval/obj_eval/metrics/ms_ssim.py", "--mode", "diversity", "--synthetic-dir", str(out),
                     "--real-dir", str(demo_root / "lesions"), "--output", str(tmp_path / "ev"),
                     env={"MEDGEN_CACHE": str(tmp_path / "c")})
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    rec = result["metrics"][0]
    assert rec["metric"] == "ms_ssim_diversity" and rec["n"] == 15 and 0 < rec["value"] <= 1   # 6 samples: 15 pairs
    assert result["n_synthetic"] == 6 and result["image_size"] == 32 and "floor" in rec
