"""Lesions inserted into real scans (the inpaint mode, RePaint with any image model, generate.py --inpaint_into and
its evaluation) and mask control for a frozen generator (ControlNet), with the bad inputs of each."""
from __future__ import annotations

import csv
import json
import os
import shutil
import socket

import nibabel as nib
import numpy as np
import pytest
import torch

import medgen
from medgen.common.data import to_slices
from medgen.common.errors import UserError
from medgen.Generation.TrainGen.core.config import build_config, stored_config
from medgen.Generation.TrainGen.core.inpainting import compose, dilate, random_blobs, renoise
from medgen.Generation.TrainGen.core.strategies import STRATEGIES
from tests.conftest import run_script

GENERATE = "Generation/TrainGen/generate.py"
UTILITY = "eval/obj_eval/run_utility.py"


# ---------------------------------------------------------------- regions and the known-region constraint
@pytest.mark.parametrize("shape", [(24, 24), (8, 16, 16)])
def test_random_regions_lie_on_the_brain_and_are_seeded(shape):
    fg = torch.zeros(6, 1, *shape, dtype=torch.bool)
    fg[..., 4:-4, 4:-4] = True
    a = random_blobs(fg, torch.Generator().manual_seed(1))
    b = random_blobs(fg, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == fg.shape and set(a.unique().tolist()) <= {0.0, 1.0}
    assert bool((a.flatten(1).sum(1) > 0).all())
    grown = dilate(a, 1)
    assert bool((grown >= a).all()) and float(grown.sum()) > float(a.sum())


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_a_jump_back_keeps_the_forward_marginal(name):
    """RePaint's jump from t_next back to t must give a(t) x0 + s(t) noise in law, for every strategy."""
    st = STRATEGIES[name](build_config({"strategy": {"name": name}}).strategy)
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((20000, 1, 1, 1), 0.6)
    t_next, t = 0.3, 0.7
    a_n, s_n = (float(v) for v in st.coefficients(torch.tensor([t_next])))
    x_next = a_n * x0 + s_n * torch.randn(x0.shape, generator=g)
    x_t = renoise(st, x_next, t_next, t, g)
    a_t, s_t = (float(v) for v in st.coefficients(torch.tensor([t])))
    assert abs(float(x_t.mean()) - a_t * 0.6) < 0.02 and abs(float(x_t.std()) - s_t) < 0.02


def test_composition_keeps_the_known_pixels_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    known, generated = torch.rand(2, 1, 16, 16, generator=g), torch.rand(2, 1, 16, 16, generator=g)
    hole = (torch.rand(2, 1, 16, 16, generator=g) > 0.7).float()
    out = compose(generated, known, hole)
    assert torch.equal(out[hole == 0], known[hole == 0]) and torch.equal(out[hole == 1], generated[hole == 1])


# ---------------------------------------------------------------- generate.py --inpaint_into
@pytest.fixture(scope="module")
def inpaint_run(demo_root, tmp_path_factory):
    """An inpaint model trained on the phantoms' label maps long enough to paint edema bright on the FLAIR-like
    sequence (100 steps of a narrow tiny UNet)."""
    root = tmp_path_factory.mktemp("inpaint")
    return medgen.train(["tiny", {"data.labels": "brats2021", "optim.max_steps": 100, "optim.epochs": 10_000,
                                  "optim.lr": 3e-3, "runtime.val_interval": 10_000, "strategy.sample_steps": 10,
                                  "model.channels": [16, 32, 32]}], mode="inpaint", strategy="rflow",
                        data_dir=str(demo_root / "brain"), run_dir=str(root / "run"))


def read(folder, name):
    return to_slices(np.asanyarray(nib.load(str(folder / f"{name}.nii.gz")).dataobj).astype(np.float32))[0]


def test_inserted_lesions_keep_the_scan_and_look_like_lesions(inpaint_run, demo_root, tmp_path):
    from medgen.Generation.TrainGen.core.inserting import read_scans
    out = tmp_path / "inserted"
    args = ["--image_model", str(inpaint_run), "--inpaint_into", str(demo_root / "brain" / "test"), "--masks_from",
            str(demo_root / "brain" / "train"), "--num_images", "12", "--max_lesion_area", "0.06",
            "--max_attempts", "100", "--output_dir", str(out)]
    res = run_script(GENERATE, *args)
    assert res.returncode == 0, res.stderr
    scans = read_scans(str(demo_root / "brain" / "test"), medgen.load(inpaint_run).model)
    by_key = {k: i for i, k in enumerate(scans.sources)}
    rows = list(csv.DictReader(open(out / "manifest.csv")))
    assert len(rows) == 12 and all(r["lesion"].startswith("mask:") and r["placement_shift"] for r in rows)
    for r in rows:
        sample = out / r["sample_id"]
        assert {p.name for p in sample.iterdir()} == {"bravo.nii.gz", "seg.nii.gz", "region.nii.gz"}
        region = read(sample, "region") > 0.5
        source = scans.images[by_key[r["condition"]], 0].numpy()
        assert np.array_equal(read(sample, "bravo")[~region], source[~region])      # the scan as acquired
        assert (read(sample, "seg")[region] > 0).any()                             # the lesion is in its region
    assert json.loads((out / "generation.json").read_text())["inpaint"]["margin"] == 2
    again = run_script(GENERATE, *args)                                            # resumable: nothing redone
    assert again.returncode == 0 and "12 already present were kept" in again.stdout
    result = medgen.evaluate(out, demo_root / "brain" / "test", metrics="all", image_type="bravo")
    recs = {r["metric"]: r for r in result["metrics"]}
    assert recs["inpaint_outside_max_abs_diff"]["value"] == 0.0
    edema = recs["inpaint_contrast_2"]
    # the painted edema is bright on the FLAIR-like sequence; the tissue that was there before is not
    assert edema["value"] > 1.3 and edema["value"] > edema["real"]["value"] + 0.3, edema
    assert recs["inpaint_seam"]["value"] is not None
    study = run_script(UTILITY, "--real_dir", str(demo_root / "brain"), "--synthetic_dir", str(out),
                       "--output", str(tmp_path / "utility"))                # the test scans are not training data
    assert study.returncode == 2 and "test subjects/images were in the training split of the inserted scans" \
        in study.stderr, study.stderr


def test_the_utility_study_adds_lesions_inserted_into_the_subsets_own_scans(inpaint_run, demo_root, tmp_path):
    out = tmp_path / "inserted"
    res = run_script(GENERATE, "--image_model", str(inpaint_run), "--inpaint_into", str(demo_root / "brain" / "train"),
                     "--masks_from", str(demo_root / "brain" / "train"), "--num_images", "16", "--max_lesion_area",
                     "0.06", "--max_attempts", "100", "--output_dir", str(out))
    assert res.returncode == 0, res.stderr
    sources = {r["condition"].split("#")[0] for r in csv.DictReader(open(out / "manifest.csv"))}
    train = sorted(str(s) for s in (demo_root / "brain" / "train").iterdir())
    assert sorted(sources) == train                           # spread over the subjects, not the first scans
    res = run_script(UTILITY, "--real_dir", str(demo_root / "brain"), "--synthetic_dir", str(out), "--recipes",
                     "real,real+synthetic", "--real_fraction", "0.5,1", "--seeds", "2", "--preset", "tiny",
                     "--max_steps", "3", "--audit", "memorization", "--output", str(tmp_path / "utility"))
    assert res.returncode == 0, res.stderr
    summary = json.loads((tmp_path / "utility" / "utility.json").read_text())
    added = {(r["real_fraction"], r["recipe"]): r["n_synthetic"] for r in summary["rows"]}
    assert set(added) == {(f, n) for f in (0.5, 1.0) for n in ("real", "real+inpainted inserted x1")}
    assert added[(1.0, "real+inpainted inserted x1")] == [16, 16]       # every edit is of a training scan
    assert all(0 < n < 16 for n in added[(0.5, "real+inpainted inserted x1")])   # only the half subset's own
    assert not summary["audit"] and any("memorization audit" in n and "does not apply" in n
                                        for n in summary["notes"])
    assert "lesions inserted into the subset's own scans" in (tmp_path / "utility" / "utility.md").read_text()


def test_repaint_inserts_with_any_mask_conditioned_model(tiny_models, demo_root, tmp_path):
    out = tmp_path / "repaint"
    scans = tmp_path / "scans"
    shutil.copytree(demo_root / "brain" / "test", scans)
    args = [GENERATE, "--image_model", str(tiny_models["bravo"]), "--inpaint_into", str(scans), "--masks_from",
            str(demo_root / "brain" / "train"), "--num_images", "3", "--num_steps", "4", "--repaint_jumps", "2",
            "--max_lesion_area", "0.06", "--max_attempts", "100", "--output_dir", str(out)]
    res = run_script(*args)
    assert res.returncode == 0, res.stderr
    assert "RePaint, 2 jump(s) per step" in res.stdout
    for sample in sorted(out.glob("sample_*")):
        region = read(sample, "region") > 0.5
        assert region.any() and not region.all()
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    subject = next(p for p in sorted((demo_root / "brain" / "train").iterdir()) if p.is_dir())
    shutil.copytree(subject, scans / subject.name)         # the same folder now holds another scan
    res = run_script(*[("6" if a == "3" else a) for a in args])          # and a longer run is asked for
    assert res.returncode == 2 and "the files read from --inpaint_into changed" in res.stderr, res.stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_insertion_bad_inputs_are_one_line(inpaint_run, tiny_models, demo_root, tmp_path):
    base = [GENERATE, "--image_model", str(inpaint_run), "--inpaint_into", str(demo_root / "brain" / "test"),
            "--output_dir", str(tmp_path / "out")]
    empty = tmp_path / "empty"
    shutil.copytree(demo_root / "brain" / "test" / "demo_008", empty / "s0")
    img = nib.load(str(empty / "s0" / "seg.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros(img.shape, np.uint8), img.affine), empty / "s0" / "seg.nii.gz")
    cases = [(["--masks_from", str(demo_root / "brain" / "train"), "--max_lesion_area", "0.0001",
               "--min_lesion_area", "0.00001"], "no lesion could be placed"),          # nothing fits the range
             (["--masks_from", str(demo_root / "brain" / "train"), "--max_lesion_area", "0.0001",
               "--min_lesion_area", "0.00001", "--anonymize_sources"], "no lesion could be placed in hmac:"),
             (["--masks_from", str(empty)], f"{empty}: the 'train' split has no usable slices"),   # no lesion
             (["--seg_model", str(tiny_models["seg"])], "masks of binary"),            # another vocabulary
             ([], "exactly one of --seg_model"),
             (["--masks_from", str(demo_root / "brain" / "train"), "--inpaint_margin", "-1"], "--inpaint_margin")]
    for extra, message in cases:
        res = run_script(*base, *extra)
        assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr, (extra, res.stderr)
    res = run_script(GENERATE, "--image_model", str(tiny_models["class"]), "--inpaint_into",
                     str(demo_root / "brain" / "test"), "--masks_from", str(demo_root / "brain" / "train"),
                     "--output_dir", str(tmp_path / "o2"))
    assert res.returncode == 2 and "does not generate one image sequence" in res.stderr
    binary, offgrid = tmp_path / "binary", tmp_path / "offgrid" / "train"
    shutil.copytree(demo_root / "brain" / "test", binary)
    for seg in binary.glob("*/seg.nii.gz"):                     # the scans' own tumours as binary masks
        img = nib.load(str(seg))
        nib.save(nib.Nifti1Image((np.asarray(img.dataobj) > 0).astype(np.uint8), img.affine), seg)
    for k, subject in enumerate(sorted((demo_root / "brain" / "train").iterdir())[:2]):
        shutil.copytree(subject, offgrid / subject.name)
    bravo = next(offgrid.glob("*/bravo.nii.gz"))                 # one scan on another grid than its mask
    img = nib.load(str(bravo))
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[::2].copy(), img.affine), bravo)
    for into, masks, message in ((binary, demo_root / "brain" / "train", f"--inpaint_into {binary}: every mask "
                                  "holds only 0 and 1, binary masks"),
                                 (demo_root / "brain" / "test", offgrid.parent, f"{bravo}: shape")):
        res = run_script(GENERATE, "--image_model", str(inpaint_run), "--inpaint_into", str(into), "--masks_from",
                         str(masks), "--output_dir", str(tmp_path / "o3"))
        assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert not (tmp_path / "o3").exists()


# ---------------------------------------------------------------- ControlNet
@pytest.fixture(scope="module")
def frozen_run(demo_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("frozen")
    return medgen.train(["tiny", {"optim.max_steps": 3, "runtime.val_interval": 100, "strategy.sample_steps": 3}],
                        mode="image", strategy="rflow", data_dir=str(demo_root / "brain"), run_dir=str(root / "run"))


def test_a_controlnet_trains_beside_a_frozen_run_and_starts_as_it(frozen_run, demo_root, tmp_path):
    from medgen.Generation.TrainGen.core.parts import build_network, build_parts
    frozen = torch.load(frozen_run / "best.pt", weights_only=True)
    run = medgen.train(["tiny", {"optim.max_steps": 3, "runtime.val_interval": 100, "data.labels": "brats2021"}],
                       control_from=str(frozen_run), data_dir=str(demo_root / "brain"), positive_only=True,
                       run_dir=str(tmp_path / "control"))
    state = torch.load(run / "best.pt", weights_only=True)
    meta = state["meta"]["control"]
    assert meta["frozen_run"] == str((frozen_run / "best.pt").resolve()) and len(meta["frozen_sha256"]) == 64
    ema = {k[len("ema_model."):]: v for k, v in state["ema"].items() if k.startswith("ema_model.")}
    frozen_ema = {k[len("ema_model."):]: v for k, v in frozen["ema"].items() if k.startswith("ema_model.")}
    assert all(torch.equal(ema[f"base.{k}"], v) for k, v in frozen_ema.items())       # the frozen run is unchanged
    cfg = stored_config(state["config"])
    _, mode = build_parts(cfg, None, 1)
    net = build_network(cfg, mode).eval()                  # a fresh ControlNet adds nothing: zero convolutions
    net.base.load_state_dict({k: v for k, v in frozen_ema.items()})
    from medgen.Generation.TrainGen.core.control import copy_matching
    copy_matching(net.control, net.base.state_dict())
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([10.0, 500.0])
    mask = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(net(torch.cat([x, mask], 1), t), net.base(x, t), atol=1e-6)
    res = run_script(GENERATE, "--image_model", str(run), "--masks_from", str(demo_root / "brain" / "test"),
                     "--output_dir", str(tmp_path / "gen"))
    assert res.returncode == 0, res.stderr
    assert {p.name for p in (tmp_path / "gen" / "sample_000000").iterdir()} == {"seg.nii.gz", "bravo.nii.gz"}
    exported = medgen.export(run, tmp_path / "export")                  # carries the frozen weights with it
    want = medgen.load(run).sample(masks=demo_root / "brain" / "test", seed=0).images["bravo"]
    assert torch.equal(medgen.load(exported).sample(masks=demo_root / "brain" / "test", seed=0).images["bravo"], want)


def test_a_changed_or_other_frozen_run_is_refused(frozen_run, demo_root, tmp_path):
    copy = tmp_path / "frozen"
    shutil.copytree(frozen_run, copy)
    args = dict(control_from=str(copy), data_dir=str(demo_root / "brain"), positive_only=True,
                run_dir=str(tmp_path / "control"))
    run = medgen.train(["tiny", {"optim.max_steps": 2, "runtime.val_interval": 100}], **args)
    state = torch.load(copy / "best.pt", weights_only=True)
    state["step"] += 1                                     # the frozen run's file changes after the ControlNet
    torch.save(state, copy / "best.pt")
    res = run_script(GENERATE, "--image_model", str(run), "--masks_from", str(demo_root / "brain" / "test"),
                     "--output_dir", str(tmp_path / "gen"))
    assert res.returncode == 2 and "changed since the ControlNet was trained" in res.stderr
    before = (run / "config.yaml").read_bytes()
    with pytest.raises(UserError, match="as it was then; its weights have changed since"):   # its weights differ now
        medgen.train(["tiny", {"optim.max_steps": 4, "runtime.val_interval": 100}], resume="auto", **args)
    assert (run / "config.yaml").read_bytes() == before          # a refused resume changes nothing in the run
    with pytest.raises(UserError, match="a ControlNet run itself"):
        medgen.train(["tiny", {"optim.max_steps": 2}], control_from=str(run), data_dir=str(demo_root / "brain"),
                     run_dir=str(tmp_path / "c2"))


def test_a_controlnet_needs_an_unconditional_monai_run(tiny_models, demo_root, tmp_path):
    with pytest.raises(UserError, match="a ControlNet adds mask control to an unconditional run"):
        medgen.train(["tiny", {"optim.max_steps": 2}], control_from=str(tiny_models["bravo"]),
                     data_dir=str(demo_root / "brain"), run_dir=str(tmp_path / "c"))


def test_control_from_checks_the_frozen_run_before_training(frozen_run, tiny_models, demo_root, tmp_path, capsys):
    args = dict(data_dir=str(demo_root / "brain"), positive_only=True)
    short = ["tiny", {"optim.max_steps": 1, "runtime.val_interval": 100}]
    with pytest.raises(UserError, match="mode 'seg'; a ControlNet adds mask control to an unconditional run"):
        medgen.train(short, control_from=str(tiny_models["seg"]), run_dir=str(tmp_path / "c_seg"), **args)
    live = tmp_path / "live"
    shutil.copytree(frozen_run, live)
    (live / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getppid(), "since": "now"}))
    with pytest.raises(UserError, match="that run is still training"):
        medgen.train(short, control_from=str(live), run_dir=str(tmp_path / "c_live"), **args)
    assert not (tmp_path / "c_seg").exists() and not (tmp_path / "c_live").exists()
    best_only = tmp_path / "best_only"                       # the folder generate.py samples: best.pt alone
    best_only.mkdir()
    shutil.copy(frozen_run / "best.pt", best_only / "best.pt")
    capsys.readouterr()
    run = medgen.train(short, control_from=str(best_only), strategy="ddpm", image_size=64,
                       run_dir=str(tmp_path / "c_best"), **args)
    note = capsys.readouterr().out
    assert "takes the frozen run's" in note and "strategy 'rflow' (this run's settings said 'ddpm')" in note
    assert "image_size 32 (this run's settings said 64)" in note
    assert stored_config(torch.load(run / "best.pt", weights_only=True)["config"]).strategy.name == "rflow"


def test_a_perfect_insertion_has_a_seam_score_of_one_at_every_margin(monkeypatch):
    """A perfect insertion: the same phantom drawn with and without its tumours (the same random draws), the
    tumour scan inside the region (the lesion grown by the margin), the healthy scan outside, as the inserter
    composes. Band pixels by the lesion's own edge used to dominate the score (2.0 at margin 0, 1.06 at 2 px in
    the evidence review); away from them it reads 1 at every margin, and an added step reads above 1."""
    from medgen.common.data import fit_square
    from medgen.eval.obj_eval.core.inpainting import seam_ratios
    import medgen.Generation.TrainGen.core.phantom as P
    real_tumours = P._tumours
    edited, source, lesion = [], [], []
    for i in range(8):
        monkeypatch.setattr(P, "_tumours", real_tumours)
        t = P.make_subject(9, i, (64, 64, 24))
        monkeypatch.setattr(P, "_tumours", lambda *a: tuple(np.zeros_like(m) for m in real_tumours(*a)))
        h = P.make_subject(9, i, (64, 64, 24))
        fg = h["bravo"][h["bravo"] > 0]
        lo, hi = np.percentile(fg, (0.5, 99.5))                  # one scale for both versions of the scan
        read = lambda v, mode="bilinear": fit_square(torch.from_numpy(to_slices(v))[:, None], 32, None, mode)  # noqa: E731
        ts, hs = (read(np.clip((v["bravo"] - lo) / (hi - lo), 0, 1).astype(np.float32)) for v in (t, h))
        lab = read(t["seg"].astype(np.float32), "nearest")
        keep = (lab > 0).flatten(1).sum(1) >= 8
        edited.append(ts[keep]), source.append(hs[keep]), lesion.append(lab[keep] > 0)
    ts, hs, lesion = torch.cat(edited), torch.cat(source), torch.cat(lesion)
    assert len(ts) >= 20
    for margin in range(5):
        region = dilate(lesion.float(), margin) > 0.5
        ratio, unscored = seam_ratios(torch.where(region, ts, hs), hs, region, lesion)
        if margin <= 1:                                          # the whole band lies by the lesion
            assert len(ratio) + unscored == len(ts)
        if len(ratio):
            assert abs(ratio.mean() - 1) < 0.02, (margin, ratio.mean())
        if margin >= 2:
            assert unscored == 0
            step = torch.where(region, (ts + 0.15).clamp(0, 1), hs)     # a visible edge: the region brighter
            assert seam_ratios(step, hs, region, lesion)[0].mean() > 1.2
