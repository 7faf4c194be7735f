"""Tumour sub-regions: label vocabularies, the one-channel-per-label coding, label-map generation in 2D and 3D with
each strategy, conditioning on label maps, the per-label mask filter and nesting counts, per-region faithfulness
and intensities, and the bad inputs of each."""
from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

import medgen
from medgen.common.errors import UserError
from medgen.common.labels import BINARY, PRESETS, custom_vocabulary, decode, encode, nesting_violations
from medgen.Generation.TrainGen.core.config import build_config
from medgen.Generation.TrainGen.core.generation.conditions import MaskFilter
from tests.conftest import run_script
from tests.test_training import TINY3D, tiny_cfg

BRATS = PRESETS["brats2021"]


# ---------------------------------------------------------------- vocabularies and coding
def test_presets_regions_and_custom_vocabularies():
    assert dict(BRATS.regions) == {"WT": (1, 2, 4), "TC": (1, 4), "ET": (4,)}
    assert dict(PRESETS["brats2023"].regions) == {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)}
    v = custom_vocabulary({"edema": 2, "core": 1}, {"lesion": ["core", "edema"]})
    assert v.ids == (1, 2) and v.names == ("core", "edema") and dict(v.regions) == {"lesion": (1, 2)}
    assert dict(custom_vocabulary({"a": 3, "b": 5}, None).regions) == {"a": (3,), "b": (5,), "all": (3, 5)}
    for labels, regions, message in [({"a": 1, "b": 1}, None, "id 1 is given to a and b"),
                                     ({"a": 0}, None, "ids must be integers 1-255"),
                                     ({"a": 1}, {"r": ["c"]}, "names 'c'"),
                                     ({"a": 1, "b": 2}, {"a": ["a", "b"]}, "has the name of a label"),
                                     ({"a": 1}, {"r": ["a", "a"]}, "lists a label twice"),
                                     ({"a:b;c": 1}, None, "'a:b;c' is not a usable label"),    # manifest fields
                                     ({"../x": 1}, None, "'../x' is not a usable"),
                                     ({"": 1}, None, "'' is not a usable"),
                                     ({"a": 1}, {"r;s": ["a"]}, "'r;s' is not a usable")]:
        with pytest.raises(UserError, match=message):
            custom_vocabulary(labels, regions)
    with pytest.raises(UserError, match="data.labels 'brats2000' is unknown"):
        build_config({"data": {"labels": "brats2000"}})
    with pytest.raises(UserError, match="data.custom_labels: id 2"):
        build_config({"data": {"labels": "custom", "custom_labels": {"x": 2, "y": 2}}})
    with pytest.raises(UserError, match="data.custom_labels is given but data.labels is 'brats2021'"):
        build_config({"data": {"labels": "brats2021", "custom_labels": {"a": 1, "b": 2, "c": 4}}})


def test_decoding_only_ever_gives_vocabulary_values_and_inverts_the_coding():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 8, 8, generator=g) * 2                    # any network output, even far outside [-1, 1]
    assert set(decode(x, BRATS).unique().tolist()) == {0.0, 1.0, 2.0, 4.0}
    labels = torch.tensor([0, 1, 2, 4]).repeat(16).view(64, 1, 1, 1).expand(64, 1, 8, 8).float()
    assert torch.equal(decode(encode(labels, BRATS) * 2 - 1, BRATS), labels)
    binary = (torch.rand(4, 1, 8, 8, generator=g) > 0.5).float()
    assert torch.equal(encode(binary, BINARY), binary)                 # the binary vocabulary is today's mask
    y = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1
    assert torch.equal(decode(y, BINARY), ((y + 1) / 2 > 0.5).float())


def test_nesting_and_the_per_label_mask_filter():
    labels = np.zeros((12, 12), np.uint8)
    labels[2:9, 2:9] = 2                                             # edema around
    labels[3:8, 3:8] = 4                                             # an enhancing rim
    labels[4:7, 4:7] = 1                                             # around a necrotic core
    assert nesting_violations(labels, BRATS) == {"NCR in TC": 0, "TC in WT": 0}
    labels[10, 10] = 1                                               # necrosis on its own in the background
    assert nesting_violations(labels, BRATS) == {"NCR in TC": 1, "TC in WT": 1}
    spots = np.zeros((16, 16), np.uint8)
    spots[4:8, 4:8] = 4
    spots[3, 4] = spots[3, 7] = spots[8, 5] = 2                      # three edema spots, each touching the rim
    f = MaskFilter(min_area=0.001, max_area=0.5, max_components=2)
    assert f.reason(spots, BRATS) == "too many components of ED"     # the lesion is one component, the edema 3
    assert MaskFilter(min_area=0.001, max_area=0.5, max_components=3).reason(spots, BRATS) is None
    spots[12, 12] = spots[14, 14] = 4
    assert f.reason(spots, BRATS) == "too many components"           # now the whole lesion has three


def test_binary_reading_of_the_phantom_label_maps_is_the_tumour(demo_root):
    from medgen.common.dataset import load_split
    seg = nib.load(str(demo_root / "brain" / "train" / "demo_000" / "seg.nii.gz")).get_fdata()
    assert set(np.unique(seg)) == {0, 1, 2, 4}
    for labels, expect in (("binary", {0, 1}), ("brats2021", {0, 1, 2, 4})):
        cfg = build_config({"data": {"labels": labels, "image_size": 32}}).data
        data = load_split(cfg, demo_root / "brain", "train", ["seg"], None)
        assert set(data.masks.unique().tolist()) == expect
        if labels == "binary":
            binary = data.masks
        else:
            assert torch.equal(binary, torch.isin(data.masks, torch.tensor([1, 4])).to(torch.uint8))   # core + rim


# ---------------------------------------------------------------- generating label maps
@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("strategy", ["ddpm", "rflow"])
def test_label_map_seg_models_generate_only_vocabulary_values(demo_root, tmp_path, strategy, dims):
    sections = {"data": {"labels": "brats2021"}, "optim": {"max_steps": 2}, "runtime": {"val_interval": 100}}
    if dims == 3:
        sections.update(data={**TINY3D["data"], "labels": "brats2021"}, optim={"batch_size": 2, "max_steps": 2})
    cfg = tiny_cfg(demo_root, tmp_path, "seg", strategy, **sections)
    run = medgen.train(cfg)
    state = torch.load(run / "best.pt", weights_only=True)
    assert state["meta"]["labels"]["ids"] == [1, 2, 4]
    res = run_script("Generation/TrainGen/generate.py", "--seg_model", str(run), "--num_images", "3",
                     "--num_steps", "3", "--no_mask_filter", "--output_dir", str(tmp_path / "out"))
    assert res.returncode == 0, res.stderr
    for k in range(3):
        seg = nib.load(str(tmp_path / "out" / f"sample_{k:06d}" / "seg.nii.gz")).get_fdata()
        assert set(np.unique(seg)) <= {0, 1, 2, 4} and seg.ndim == 3
    rows = json.loads((tmp_path / "out" / "generation.json").read_text())
    assert rows["labels"]["name"] == "brats2021"
    manifest = (tmp_path / "out" / "manifest.csv").read_text()
    assert "NCR:" in manifest and "NCR in TC:" in manifest


@pytest.fixture(scope="module")
def label_runs(demo_root, tmp_path_factory):
    """A label-map seg model (a few steps) and a dual model trained on the phantoms' label maps long enough to
    put enhancement where ET is (100 steps of a narrow tiny UNet: about 15 s on one core)."""
    root = tmp_path_factory.mktemp("labels")
    data = str(demo_root / "brain")
    common = {"data.labels": "brats2021", "runtime.val_interval": 10_000, "optim.epochs": 10_000}
    seg = medgen.train(["tiny", {**common, "optim.max_steps": 2}], mode="seg", strategy="rflow", data_dir=data,
                       run_dir=str(root / "seg"), positive_only=True)
    dual = medgen.train(["tiny", {**common, "optim.max_steps": 100, "optim.lr": 3e-3, "strategy.sample_steps": 10,
                                  "model.channels": [16, 32, 32]}], mode="dual", strategy="rflow", data_dir=data,
                        run_dir=str(root / "dual"), positive_only=True)
    return {"seg": seg, "dual": dual, "root": root}


def test_a_dual_model_puts_enhancement_where_the_label_map_says(label_runs, demo_root, tmp_path):
    test = demo_root / "brain" / "test"
    out = medgen.load(label_runs["dual"]).sample(masks=test, seed=0)
    assert set(out.images["seg"].unique().tolist()) == {0, 1, 2, 4}      # the real label maps, as conditioning
    out.save(tmp_path / "synth")
    result = medgen.evaluate(tmp_path / "synth", test, metrics="all", image_type="t1_gd", output=tmp_path / "eval")
    recs = {r["metric"]: r for r in result["metrics"]}
    assert recs["enhancement_ET"]["real"]["value"] > 1.5                  # the phantoms' enhancing rim
    et, ed = recs["enhancement_ET"]["value"], recs["enhancement_ED"]["value"]
    # binary conditioning cannot say where the rim and the edema are; the label map does
    assert et > 1.3 and et > ed + 0.25, (et, ed)
    assert recs["intensity_t1_gd_ET"]["value"] > recs["intensity_t1_pre_ET"]["value"] + 0.3
    assert "enhancement_ET" in (tmp_path / "eval" / "report.md").read_text()


def test_chained_label_maps_and_vocabulary_mismatches(label_runs, tiny_models, demo_root, tmp_path):
    res = run_script("Generation/TrainGen/generate.py", "--seg_model", str(label_runs["seg"]), "--image_model",
                     str(label_runs["dual"]), "--num_images", "2", "--no_mask_filter", "--output_dir",
                     str(tmp_path / "chain"))
    assert res.returncode == 0, res.stderr
    assert {p.name for p in (tmp_path / "chain" / "sample_000000").iterdir()} == {"seg.nii.gz", "t1_pre.nii.gz",
                                                                                  "t1_gd.nii.gz"}
    res = run_script("Generation/TrainGen/generate.py", "--seg_model", str(label_runs["seg"]), "--image_model",
                     str(tiny_models["bravo"]), "--num_images", "2", "--output_dir", str(tmp_path / "bad"))
    assert res.returncode == 2 and "makes masks of the vocabulary brats2021" in res.stderr
    assert "Traceback" not in res.stderr
    binary = tmp_path / "binary"                                     # binary masks given to a label-map model
    for k in range(2):
        subject = binary / "test" / f"s{k}"
        subject.mkdir(parents=True)
        img = nib.load(str(demo_root / "brain" / "test" / f"demo_{8 + k:03d}" / "seg.nii.gz"))
        nib.save(nib.Nifti1Image((np.asarray(img.dataobj) > 0).astype(np.uint8), img.affine), subject / "seg.nii.gz")
    res = run_script("Generation/TrainGen/generate.py", "--image_model", str(label_runs["dual"]), "--masks_from",
                     str(binary), "--output_dir", str(tmp_path / "bad2"))
    assert res.returncode == 2 and "binary masks" in res.stderr and str(binary) in res.stderr
    shutil.copytree(binary / "test", binary / "train")                # and trained as label maps: refused too
    with pytest.raises(UserError, match="--data_dir .*binary masks"):
        medgen.train(["tiny", {"data.labels": "brats2021", "optim.max_steps": 1}], mode="seg", data_dir=str(binary),
                     run_dir=str(tmp_path / "bin_run"))
    assert not (tmp_path / "bin_run").exists()
    dual = medgen.load(label_runs["dual"])
    with pytest.raises(UserError, match=r"holds \[3\], not labels of brats2021"):
        dual.sample(masks=torch.full((1, 1, 32, 32), 3.0))
    with pytest.raises(UserError, match="binary masks"):
        dual.sample(masks=torch.ones(1, 1, 32, 32))
    with pytest.raises(UserError, match=r"in \[0, 1\]"):                # a label map to a binary model
        medgen.load(tiny_models["bravo"]).sample(masks=torch.full((1, 1, 32, 32), 4.0))


def test_a_label_outside_the_vocabulary_is_one_line_naming_the_file(demo_root, tmp_path):
    import shutil
    data = tmp_path / "data"
    shutil.copytree(demo_root / "brain" / "train" / "demo_000", data / "train" / "s0")
    shutil.copytree(demo_root / "brain" / "train" / "demo_001", data / "train" / "s1")
    bad = data / "train" / "s1" / "seg.nii.gz"
    img = nib.load(str(bad))
    arr = np.asarray(img.dataobj).copy()
    arr[arr == 4] = 3                                                # a BraTS 2023 ET label in a 2021 dataset
    nib.save(nib.Nifti1Image(arr, img.affine), bad)
    res = run_script("Generation/TrainGen/train.py", "--check_data", "--data_dir", str(data), "--set",
                     "data.labels=brats2021", "--mode", "seg")
    assert res.returncode == 1 and f"{bad}: mask values {{3}} are not labels" in res.stderr


# ---------------------------------------------------------------- faithfulness and the downstream study per region
def real_slices_as_synthetic(test_dir, out):
    """The real test slices (bravo and their label maps) written as generate.py writes samples."""
    from medgen.common.dataset import load_folder
    from medgen.Generation.TrainGen.core.generation.writers import nifti_bytes
    cfg = build_config({"data": {"labels": "brats2021", "image_size": 32, "positive_only": True}}).data
    data = load_folder(cfg, test_dir, ["bravo", "seg"], None)
    for i in range(len(data)):
        folder = out / f"sample_{i:06d}"
        folder.mkdir(parents=True)
        (folder / "bravo.nii.gz").write_bytes(nifti_bytes(data.images[i, 0].float().numpy(), False))
        (folder / "seg.nii.gz").write_bytes(nifti_bytes(data.masks[i, 0].numpy(), True))
    (out / "generation.json").write_text(json.dumps({"labels": BRATS.record()}))
    return out


FAST = {"preset": "tiny", "max_steps": 60, "val_every": 30}


def test_faithfulness_and_the_study_score_each_region(demo_root, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDGEN_CACHE", str(tmp_path / "cache"))
    test = demo_root / "brain" / "test"
    synth = real_slices_as_synthetic(test, tmp_path / "synth")
    result = medgen.evaluate(synth, test, metrics="faithfulness", real_train_dir=demo_root / "brain",
                             positive_only=True, downstream=FAST)
    rec = next(r for r in result["metrics"] if r["metric"] == "faithfulness_dice")
    assert list(rec["regions"]) == ["WT", "TC", "ET"]
    for region, r in rec["regions"].items():     # the real test images themselves score at the ceiling
        assert r["value"] == r["ceiling"]["mean"] and r["n"] == r["ceiling"]["n"] > 0, region
        assert len(r["bins"]) == 3
    study = medgen.utility(demo_root / "brain", synth, output=tmp_path / "study", seeds=2, recipes="real",
                           real_fraction="1", positive_only=True, audit="none", bootstrap=200, val_every=30,
                           preset="tiny", max_steps=30, device="cpu", compute="local")
    metrics = study["rows"][0]["metrics"]
    assert {"dice_subject_WT", "dice_subject_TC", "dice_subject_ET", "hd95_slice_ET"} <= set(metrics)
    assert "Dice per subject WT" in (tmp_path / "study" / "utility.md").read_text()


def test_a_segment_model_predicts_label_maps_scored_per_region(demo_root, tmp_path):
    run = medgen.train(["tiny", {"data.labels": "brats2021", "optim.max_steps": 2, "runtime.val_interval": 100,
                                 "strategy.sample_steps": 3}], mode="segment", strategy="rflow",
                       data_dir=str(demo_root / "brain"), run_dir=str(tmp_path / "run"), positive_only=True)
    log = (run / "train.log").read_text()
    assert "val_dice_WT=" in log and "val_dice_ET=" in log
    res = run_script("Generation/TrainGen/generate.py", "--image_model", str(run), "--images_from",
                     str(demo_root / "brain" / "test"), "--ensemble", "2", "--output_dir", str(tmp_path / "seg"))
    assert res.returncode == 0, res.stderr
    summary = json.loads((tmp_path / "seg" / "segmentation.json").read_text())
    assert list(summary["regions"]) == ["WT", "TC", "ET"]
    assert "Dice ET" in (tmp_path / "seg" / "segmentation.md").read_text()
    for vol in (tmp_path / "seg" / "volumes").glob("*/seg.nii.gz"):
        assert set(np.unique(nib.load(str(vol)).get_fdata())) <= {0, 1, 2, 4}


def test_resuming_with_another_vocabulary_is_refused(demo_root, tmp_path):
    args = dict(mode="seg", strategy="rflow", data_dir=str(demo_root / "brain"), run_dir=str(tmp_path / "run"),
                positive_only=True)
    medgen.train(["tiny", {"optim.max_steps": 2, "runtime.val_interval": 100}], **args)
    with pytest.raises(UserError, match="label vocabulary binary .* this run has brats2021"):
        medgen.train(["tiny", {"optim.max_steps": 4, "runtime.val_interval": 100, "data.labels": "brats2021"}],
                     resume="auto", **args)


def test_tumour_labels_choose_what_a_binary_mask_keeps(demo_root, tmp_path):
    """The phantoms' BraTS 2021 maps read as binary keep the core (1 + 4) by the original layout; with
    data.tumour_labels [1, 2, 4] the binary mask is the whole tumour, edema included, as a BraTS user reads WT."""
    from medgen.common.data import DataConfig
    from medgen.common.dataset import load_split
    root = demo_root / "brain"
    read = lambda **kw: load_split(DataConfig(data_dir=str(root), image_size=32, **kw), root, "val", ["bravo", "seg"],  # noqa: E731
                                   tmp_path / "cache", "nifti")
    maps = read(labels="brats2021").masks
    core, whole = read().masks, read(tumour_labels=[1, 2, 4]).masks
    assert set(core.unique().tolist()) <= {0, 1} and set(whole.unique().tolist()) <= {0, 1}
    assert torch.equal(core.bool(), (maps == 1) | (maps == 4))
    assert torch.equal(whole.bool(), maps > 0) and whole.sum() > core.sum()
    for bad, why in (([], "a list of label ids above 0"), ([0, 1], "a list of label ids above 0"),
                     (["x"], "a list of label ids above 0")):
        with pytest.raises(UserError, match=why):
            DataConfig(tumour_labels=bad)
    with pytest.raises(UserError, match="data.tumour_labels is for binary masks"):
        DataConfig(tumour_labels=[1, 2], labels="brats2021")
