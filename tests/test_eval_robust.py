"""Evaluation that never loses computed numbers: MS-SSIM at every small size, one failing metric recorded as
unavailable while the others are kept, metrics.json written as each metric family finishes, single-metric
scripts merging into one metrics.json, and an unreadable FID feature cache rebuilt."""
import json

import numpy as np
import pytest
import torch
from monai.metrics.regression import compute_ms_ssim

from medgen.eval.obj_eval.core import evaluate as E
from medgen.eval.obj_eval.core import metrics as M
from tests.conftest import run_script
from tests.test_eval import paired_set, weights  # noqa: F401  (fixtures)


@pytest.mark.parametrize("size", range(8, 65))
def test_ms_ssim_works_at_every_size_from_8_to_64(size):
    g = torch.Generator().manual_seed(size)
    x = torch.rand(2, 1, size, size, generator=g)
    y = (x + 0.1 * torch.randn(2, 1, size, size, generator=g)).clamp(0, 1)
    window, weights_ = M.ms_ssim_settings(size)
    assert window >= 7 and window % 2 == 1 and window <= size // 2 ** (len(weights_) - 1)
    ours = M.ms_ssim(x, y, 1.0, window, weights_)
    assert torch.allclose(M.ms_ssim(x, x, 1.0, window, weights_), torch.ones(2, dtype=torch.float64))
    assert ((0 < ours) & (ours < 1)).all()
    if len(weights_) > 1:  # MONAI's MS-SSIM needs at least two scales
        ref = compute_ms_ssim(y_pred=x, y=y, spatial_dims=2, data_range=1.0, kernel_size=window,
                              weights=weights_).flatten()
        assert torch.allclose(ours.float(), ref, atol=1e-5)


def test_run_evaluation_all_metrics_at_20_px(paired_set, weights, demo_root, tmp_path):  # noqa: F811
    res = run_script("eval/obj_eval/run_evaluation.py", "--synthetic-dir", str(paired_set), "--real-dir",
                     str(demo_root / "brain" / "val"), "--metrics", "all", "--image_size", "20", "--positive-only",
                     "--inception-weights", str(weights["inception"]), "--radimagenet-weights",
                     str(weights["radimagenet"]), "--alex-weights", str(weights["alex"]), "--bootstrap", "0",
                     "--output", str(tmp_path / "ev"), env={"MEDGEN_CACHE": str(tmp_path / "c")})
    assert res.returncode == 0, res.stderr[-2000:]
    recs = {r["metric"]: r for r in json.loads((tmp_path / "ev" / "metrics.json").read_text())["metrics"]}
    assert len(recs) == 10          # 8 metrics and a KID beside each FID
    for name, r in recs.items():
        if name.startswith("lpips"):   # AlexNet's strides leave no feature map below 31 px: said, not crashed
            assert r["available"] is False and "at least 31 px (these are 20 px)" in r["reason"], r
        else:
            assert r.get("available", True) and r["value"] is not None, r
    assert recs["ms_ssim_quality"]["method"]["window"] == 9


def _options(paired_set, demo_root, **kw):  # noqa: F811
    return E.Options(str(paired_set), str(demo_root / "brain" / "val"), metrics=("mae", "psnr", "ms_ssim"),
                     positive_only=True, device="cpu", **kw)


def test_a_failing_metric_is_recorded_and_the_others_kept(paired_set, demo_root, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("MEDGEN_CACHE", str(tmp_path / "c"))

    def broken(size):
        raise RuntimeError("Calculated padded input size per channel: (10 x 10). Kernel size: (11 x 1)")
    monkeypatch.setattr(M, "ms_ssim_settings", broken)
    result = E.evaluate(_options(paired_set, demo_root), tmp_path / "ev")
    names = {r["metric"]: r for r in result["metrics"]}
    assert names["mae"]["value"] > 0 and names["psnr"]["value"] > 0
    for n in ("ms_ssim_quality", "ms_ssim_diversity"):
        assert names[n]["available"] is False and "failed: RuntimeError: Calculated padded" in names[n]["reason"]


def test_metrics_are_written_as_they_are_computed(paired_set, demo_root, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("MEDGEN_CACHE", str(tmp_path / "c"))

    def killed(*args, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(E, "diversity_records", killed)
    with pytest.raises(KeyboardInterrupt):
        E.evaluate(_options(paired_set, demo_root), tmp_path / "ev")
    saved = {r["metric"] for r in json.loads((tmp_path / "ev" / "metrics.json").read_text())["metrics"]}
    assert saved == {"mae", "psnr", "ms_ssim_quality"}


def test_single_metric_scripts_merge_into_one_metrics_json(paired_set, demo_root, tmp_path):  # noqa: F811
    common = ["--synthetic-dir", str(paired_set), "--real-dir", str(demo_root / "brain" / "val"), "--positive-only",
              "--output", str(tmp_path / "ev")]
    env = {"MEDGEN_CACHE": str(tmp_path / "c")}
    assert run_script("eval/obj_eval/metrics/mae_psnr.py", *common, env=env).returncode == 0
    res = run_script("eval/obj_eval/metrics/ms_ssim.py", "--mode", "quality", *common, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert {r["metric"] for r in result["metrics"]} == {"mae", "psnr", "ms_ssim_quality"}
    assert "| mae" in (tmp_path / "ev" / "report.md").read_text()


def test_unreadable_fid_feature_cache_is_rebuilt(paired_set, weights, demo_root, tmp_path):  # noqa: F811
    args = ["eval/obj_eval/metrics/fid.py", "--synthetic-dir", str(paired_set), "--real-dir",
            str(demo_root / "brain" / "val"), "--weights", str(weights["inception"]), "--bootstrap", "0",
            "--positive-only", "--output", str(tmp_path / "ev")]           # fewer real slices through Inception
    env = {"MEDGEN_CACHE": str(tmp_path / "c")}
    first = run_script(*args, env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    cache = next((tmp_path / "c" / "fid_features").glob("*.npy"))
    value = json.loads((tmp_path / "ev" / "metrics.json").read_text())["metrics"][0]["value"]
    cache.write_bytes(cache.read_bytes()[:100])   # truncated by a crash or a full disk
    again = run_script(*args, env=env)
    assert again.returncode == 0 and "unreadable FID feature cache; rebuilding" in again.stderr, again.stderr[-2000:]
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["metrics"][0]["value"] == pytest.approx(value)
    assert np.load(cache).shape[1] == 2048
