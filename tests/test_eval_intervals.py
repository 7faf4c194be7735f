"""The evaluation's intervals and inputs mean what the report says: the FID and diversity intervals cover their
targets at about the nominal rate in simulations, and real slices saved as 'synthetic' by the generator's
writer score as exact copies (no second normalisation)."""
import csv
import json

import numpy as np
import torch

from medgen.eval.obj_eval.core import metrics as M
from medgen.eval.obj_eval.core.evaluate import Options, evaluate, write_outputs
from medgen.eval.obj_eval.core.inputs import load_set
from medgen.eval.obj_eval.core.report import markdown
from medgen.common.data import GENERATED_MARKER
from medgen.Generation.TrainGen.core.generation.writers import ROWS_DIR, nifti_bytes, sample_id, write_manifest
from tests.helpers_nifti import mask_volume, save


def test_fid_interval_contains_the_value_and_covers_the_fid_at_this_n():
    """Fixed real features; a generator whose FID at N=150 is known from 1500 fresh sets. The old interval
    (percentiles of FID on resampled sets) lay above the value and covered this target almost never."""
    rng = np.random.default_rng(0)
    d, n_real, n_syn = 12, 300, 150
    real = rng.normal(size=(n_real, d))
    scale = np.linspace(0.7, 1.6, d)
    gen = lambda n: rng.normal(size=(n, d)) * scale + 0.15  # noqa: E731
    target = np.mean([M.fid_from_features(real, gen(n_syn), 0)["value"] for _ in range(1500)])
    hits, contains, biases = [], [], []
    for rep in range(80):
        res = M.fid_from_features(real, gen(n_syn), 150, seed=rep)
        lo, hi = res["ci95"]
        hits.append(lo <= target <= hi)
        contains.append(lo <= res["value"] <= hi)
        biases.append(res["resampling_bias"])
    assert all(contains)
    assert 0.87 <= np.mean(hits) <= 1.0, np.mean(hits)
    assert np.mean(biases) > 0   # resampling with replacement raises FID: the shift the interval removes


def test_fid_interval_in_many_dimensions_contains_the_value():
    """d=128, N=300 (the issue's case is d=256, N=1000): the uncentred bootstrap percentiles lie entirely above
    the value; the re-centred interval contains it."""
    rng = np.random.default_rng(3)
    d = 128
    real = rng.normal(size=(600, d))
    synth = rng.normal(size=(300, d)) * 1.1 + 0.05
    res = M.fid_from_features(real, synth, 40, seed=0)
    lo, hi = res["ci95"]
    assert lo <= res["value"] <= hi
    assert lo + res["resampling_bias"] > res["value"]      # what the old interval reported: above the value


def test_diversity_interval_resamples_samples_not_pairs():
    """A mean over all pairs of 60 samples: the interval that resamples samples covers the population mean at
    about 95%; resampling the (dependent) pairs, as before, covers it far less often."""
    rng = np.random.default_rng(1)
    sim = lambda a, b: np.exp(-np.abs(a - b))  # noqa: E731
    pop = rng.normal(size=400_000)
    truth = sim(pop[:200_000], pop[200_000:]).mean()
    n = 60
    i, j = np.triu_indices(n, 1)
    ours, naive, widths = [], [], []
    for rep in range(150):
        x = rng.normal(size=n)
        v = sim(x[i], x[j])
        lo, hi = M.pairwise_mean_ci(i, j, v, n, 400, rep)
        ours.append(lo <= truth <= hi)
        widths.append((hi - lo) / np.subtract(*M.bootstrap_mean_ci(v, 400, rep)[::-1]))
        nlo, nhi = M.bootstrap_mean_ci(v, 400, rep)
        naive.append(nlo <= truth <= nhi)
    assert 0.88 <= np.mean(ours) <= 1.0, np.mean(ours)
    assert np.mean(naive) < 0.7 and np.median(widths) > 2.5


def test_diversity_interval_with_a_subset_of_pairs():
    """max_pairs < all pairs: the same weighting works on the pairs that were drawn."""
    i, j = M.diversity_pairs(40, 200, 0)
    v = np.random.default_rng(2).random(len(i))
    lo, hi = M.pairwise_mean_ci(i, j, v, 40)
    assert lo < v.mean() < hi


def _brightness_ramp_dataset(root):
    """Two subjects whose brightness grows along z: a per-slice stretch would change every slice."""
    for s in range(2):
        x, y, z = np.meshgrid(np.arange(24), np.arange(24), np.arange(10), indexing="ij")
        vol = ((x - 12) ** 2 + (y - 12) ** 2 < 90) * (200 + 60 * z + 7 * x + 3 * s + 5 * y * (z % 3)).astype(np.float32)
        save(root / f"sub{s}" / "bravo.nii.gz", vol.astype(np.float32))
        save(root / f"sub{s}" / "seg.nii.gz", mask_volume((24, 24, 10)))
    return root


def _copies_through_the_writer(real, out):
    """Every real slice saved by generate.py's writer as a sample conditioned on that slice, with its manifest."""
    out.mkdir()
    (out / GENERATED_MARKER).write_text(json.dumps({"mode": "bravo"}))
    for k, (img, key) in enumerate(zip(real.images, real.paths)):
        sid = sample_id(k)
        (out / sid).mkdir()
        (out / sid / "bravo.nii.gz").write_bytes(nifti_bytes(img[0].numpy(), False))
        (out / sid / "seg.nii.gz").write_bytes(nifti_bytes(np.zeros(img.shape[1:], np.float32), True))
        row = {"index": k, "sample_id": sid, "condition": key, "files": f"{sid}/seg.nii.gz;{sid}/bravo.nii.gz"}
        (out / ROWS_DIR).mkdir(exist_ok=True)
        (out / ROWS_DIR / f"{sid}.json").write_text(json.dumps(row))
    write_manifest(out)


def test_real_slices_saved_as_synthetic_score_as_exact_copies(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDGEN_CACHE", str(tmp_path / "cache"))
    real_dir = _brightness_ramp_dataset(tmp_path / "real")
    real = load_set(real_dir)
    _copies_through_the_writer(real, tmp_path / "synth")
    with open(tmp_path / "synth" / "manifest.csv") as f:
        assert len(list(csv.DictReader(f))) == len(real) > 10
    synth = load_set(tmp_path / "synth", what="--synthetic-dir")
    assert torch.equal(synth.images, real.images)      # read as written: no second normalisation

    from tests.test_eval import InceptionFID  # the FID network with random weights saved by this test
    torch.manual_seed(0)
    net = InceptionFID()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2)
    torch.save(net.state_dict(), tmp_path / "inc.pth")
    o = Options(str(tmp_path / "synth"), str(real_dir), metrics=("fid", "mae", "psnr", "ms_ssim"),
                feature_networks=("inception",), weights={"inception": str(tmp_path / "inc.pth")}, bootstrap=0,
                device="cpu", floor=False)
    result = evaluate(o)
    names = {r["metric"]: r for r in result["metrics"]}
    assert names["mae"]["value"] == 0 and names["mae"]["n"] == len(real)
    assert names["mae"]["method"]["pairs_by"].startswith("conditioning mask")
    assert names["psnr"]["value"] == M.PSNR_CAP_DB and names["psnr"]["method"]["identical_pairs"] == len(real)
    assert abs(names["ms_ssim_quality"]["value"] - 1) < 1e-12
    assert abs(names["fid_inception"]["value"]) < 1e-6
    write_outputs(result, tmp_path / "ev")
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["metrics"]


def test_report_says_when_ms_ssim_is_not_the_literature_setting():
    rec = lambda w, k: {"metric": "ms_ssim_quality", "value": 0.9, "n": 3, "method": {"window": w, "scales": k}}  # noqa: E731
    base = {"synthetic_dir": "s", "real_dir": "r", "n_synthetic": 3, "n_real": 3, "image_type": "bravo",
            "positive_only": False, "seed": 0}
    small = markdown({**base, "image_size": 128, "metrics": [rec(7, 5)]})
    assert "7-px window and 5 scales" in small and "not comparable" in small
    assert "not comparable" not in markdown({**base, "image_size": 256, "metrics": [rec(11, 5)]})
