import csv
import gzip
import signal
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest

from medgen.common.errors import UserError
from medgen.Generation.TrainGen.core.generation.conditions import MaskFilter
from medgen.Generation.TrainGen.core.generation.writers import read_rows, sample_seed
from medgen.Generation.TrainGen.generate import main as generate_main
from tests.conftest import ROOT, run_script, torchrun

GEN = "Generation/TrainGen/generate.py"
LOOSE = ["--max_components", "1000", "--max_mask_area", "1", "--min_mask_area", "0"]


def bravo_args(models, out, batch_size, n=32):
    return ["--seg_model", str(models["seg"]), "--image_model", str(models["bravo"]), "--num_images", str(n),
            "--num_steps", "8", "--seg_num_steps", "8", "--batch_size", str(batch_size), "--output_dir", str(out),
            "--device", "cpu", *LOOSE]


def arrays(out):
    """{relative file: array} of every sample file under out."""
    found = {}
    for path in sorted(out.rglob("sample_*/*.nii.gz")):
        found[str(path.relative_to(out))] = np.asanyarray(nib.load(str(path)).dataobj)
    return found


def manifest(out):
    with open(out / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def reference(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "bs8"
    assert generate_main(bravo_args(tiny_models, out, 8)) == 0
    return out


def test_same_samples_whatever_the_batch_size(tiny_models, reference, tmp_path):
    out = tmp_path / "bs5"
    assert generate_main(bravo_args(tiny_models, out, 5)) == 0
    a, b = arrays(reference), arrays(out)
    assert len(a) == 64 and a.keys() == b.keys()  # 32 samples x (seg, bravo)
    for name in a:
        assert a[name].tobytes() == b[name].tobytes(), name
        assert (reference / name).read_bytes() == (out / name).read_bytes(), name  # gzip mtime 0: same bytes
    # the ancestral DDPM sampler draws per-step noise: samples differ from one another
    assert not np.array_equal(a["sample_000000/bravo.nii.gz"], a["sample_000001/bravo.nii.gz"])


def test_manifest_lists_every_file_with_provenance(reference, tiny_models):
    rows = manifest(reference)
    assert [int(r["index"]) for r in rows] == list(range(32))
    listed = {f for r in rows for f in r["files"].split(";")}
    on_disk = {str(p.relative_to(reference)) for p in reference.rglob("sample_*/*") if p.is_file()}
    assert listed == on_disk
    from medgen.Generation.TrainGen.core.checkpoint import best_checkpoint
    from medgen.common.features import sha256_of
    r = rows[3]
    assert r["checkpoint_sha256"] == sha256_of(best_checkpoint(tiny_models["bravo"]))
    assert r["seg_checkpoint_sha256"] == sha256_of(best_checkpoint(tiny_models["seg"]))
    assert (r["strategy"], r["sampler"], r["steps"], r["seed"]) == ("ddpm", "ddpm", "8", "0")
    assert r["sample_seed"] == str(sample_seed(0, 3, 1))
    assert r["condition"].startswith("generated:seg_seed=") and int(r["mask_attempts"]) >= 1
    assert (reference / "preview_4x4.png").is_file() and (reference / "preview_8x8.png").is_file()
    assert not list(reference.rglob("*.tmp"))


def test_nifti_headers_are_fresh(reference):
    for name in ("seg", "bravo"):
        img = nib.load(str(reference / "sample_000000" / f"{name}.nii.gz"))
        h = img.header
        assert h["descrip"].item() == b"" and h["aux_file"].item() == b"" and len(h.extensions) == 0
        assert np.allclose(img.affine, np.eye(4)) and img.shape == (32, 32, 1)
    seg = np.asanyarray(nib.load(str(reference / "sample_000000" / "seg.nii.gz")).dataobj)
    assert seg.dtype == np.uint8 and set(np.unique(seg)) <= {0, 1}
    raw = gzip.decompress((reference / "sample_000000" / "bravo.nii.gz").read_bytes())
    assert b"tiny" not in raw and b"runs" not in raw and b"demo" not in raw  # no paths or names carried over


def test_killed_run_resumes_to_the_same_files(tiny_models, reference, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, GEN, *bravo_args(tiny_models, out, 4)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / ".rows").glob("*.json"))) < 8:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list((out / ".rows").glob("*.json")))
    assert 8 <= done_before < 32, "the run should have been killed mid-way"
    res = run_script(GEN, *bravo_args(tiny_models, out, 4))
    assert res.returncode == 0, res.stderr
    assert f"{done_before} already present were kept" in res.stdout
    assert len(manifest(out)) == 32 and len(read_rows(out)) == 32
    a, b = arrays(reference), arrays(out)
    assert a.keys() == b.keys() and all(a[k].tobytes() == b[k].tobytes() for k in a)
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_shards_divide_the_work_and_merge_the_manifest(tiny_models, reference, tmp_path):
    out = tmp_path / "sharded"
    for k in (1, 0):
        assert generate_main(bravo_args(tiny_models, out, 8) + ["--shard", f"{k}/2"]) == 0
        rows = manifest(out)
        assert len(rows) == (16 if k == 1 else 32)
    a, b = arrays(reference), arrays(out)
    assert a.keys() == b.keys() and all(a[k].tobytes() == b[k].tobytes() for k in a)


def test_torchrun_processes_match_one_process(tiny_models, tmp_path):
    # float reductions split their work by thread: equal results need equal threads per process, so the
    # reference runs here on one thread, torchrun's default per worker
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert generate_main(bravo_args(tiny_models, tmp_path / "one", 4, n=12)) == 0
    finally:
        torch.set_num_threads(threads)
    res = torchrun(GEN, *bravo_args(tiny_models, tmp_path / "ddp", 4, n=12), env={"OMP_NUM_THREADS": "1"},
                   timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "worker 1/2" in res.stdout and len(manifest(tmp_path / "ddp")) == 12
    a, b = arrays(tmp_path / "one"), arrays(tmp_path / "ddp")
    assert len(a) == 24 and a.keys() == b.keys() and all(a[k].tobytes() == b[k].tobytes() for k in a)


def test_generated_folder_trains(reference, tmp_path):
    res = run_script("Generation/TrainGen/train.py", "--config", "config/tiny.yaml", "--mode", "bravo",
                     "--data_dir", str(reference), "--max_steps", "2", "--batch_size", "4",
                     "--run_dir", str(tmp_path / "run"), "--set", f"data.cache_dir={tmp_path / 'cache'}")
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "run" / "ckpt_00000002.pt").is_file()


def test_real_masks_resize_png_and_progression(tiny_models, demo_root, tmp_path):
    out = tmp_path / "paired"
    args = ["--image_model", str(tiny_models["bravo_rflow"]), "--masks_from", str(demo_root / "brain"),
            "--num_images", "6", "--num_steps", "4", "--output_size", "64", "--png", "--progression",
            "--output_dir", str(out), "--device", "cpu"]
    assert generate_main(args) == 0
    rows = manifest(out)
    assert len(rows) == 6 and all("#slice" in r["condition"] and "demo_" in r["condition"] for r in rows)
    assert rows[0]["strategy"] == "rflow" and rows[0]["sampler"] == "euler"
    for r in rows:
        for f in r["files"].split(";"):
            assert (out / f).is_file()
    img = nib.load(str(out / "sample_000000" / "bravo.nii.gz"))
    seg = np.asanyarray(nib.load(str(out / "sample_000000" / "seg.nii.gz")).dataobj)
    assert img.shape == (64, 64, 1) and seg.any() and set(np.unique(seg)) <= {0, 1}
    assert (out / "sample_000000" / "bravo.png").is_file() and (out / "progression.png").is_file()


def test_class_counts_are_honoured(tiny_models, tmp_path):
    out = tmp_path / "cls"
    args = ["--image_model", str(tiny_models["class"]), "--class_counts", "melanoma=5,vascular=2",
            "--guidance_scale", "2", "--num_steps", "4", "--sampler", "ddim", "--batch_size", "3",
            "--output_dir", str(out), "--device", "cpu"]
    assert generate_main(args) == 0
    assert len(list((out / "melanoma").glob("*.png"))) == 5 and len(list((out / "vascular").glob("*.png"))) == 2
    assert not (out / "nevus").exists()
    rows = manifest(out)
    assert [r["class"] for r in rows] == ["melanoma"] * 5 + ["vascular"] * 2
    assert {r["guidance"] for r in rows} == {"2.0"}
    # the folder reads back as a class image dataset
    from medgen.common.imagefolder import find_image_splits
    splits, classes, problems = find_image_splits(out, None, 0.0, 0)
    assert classes == ["melanoma", "vascular"] and len(splits["train"]) == 7 and not problems


def test_mask_filter_rejects_what_it_should():
    f = MaskFilter(min_area=0.01, max_area=0.2, min_components=1, max_components=2)
    m = np.zeros((32, 32))
    assert f.reason(m) == "empty"
    m[5, 5] = 1
    assert f.reason(m) == "too small"                     # 1/1024 < 1 %
    m[:16, :16] = 1
    assert f.reason(m) == "too large"                     # 25 % > 20 %
    m = np.zeros((32, 32))
    m[2:6, 2:6] = m[10:14, 10:14] = m[20:24, 20:24] = 1
    assert f.reason(m) == "too many components"
    m[20:24, 20:24] = 0
    assert f.reason(m) is None
    m[6, 6] = 1                                           # diagonal neighbour: 8-connected, still 2 components
    assert f.reason(m) is None
    with pytest.raises(UserError):
        MaskFilter(min_area=0.5, max_area=0.1)


def test_rejected_masks_are_replaced_and_counted(tiny_models, reference, tmp_path, capsys):
    areas = sorted(float(np.asanyarray(nib.load(str(p)).dataobj).mean()) for p in reference.glob("sample_*/seg.nii.gz"))
    threshold = areas[len(areas) // 2]                   # about half of first draws now fail the area bound
    out = tmp_path / "strict"
    args = bravo_args(tiny_models, out, 8, n=8) + ["--min_mask_area", str(threshold), "--max_attempts", "60"]
    assert generate_main(args) == 0
    rows = manifest(out)
    assert len(rows) == 8                                # every rejected mask was replaced
    retried = [r for r in rows if int(r["mask_attempts"]) > 1]
    assert retried and all("too small" in r["mask_rejections"] for r in retried)
    assert "masks rejected: too small" in capsys.readouterr().out
    for p in out.glob("sample_*/seg.nii.gz"):
        assert np.asanyarray(nib.load(str(p)).dataobj).mean() >= threshold


@pytest.mark.parametrize("extra, message", [
    (["--strategy", "rflow"], "contradicts --image_model"),
    (["--mode", "dual"], "contradicts --image_model"),
    (["--sampler", "euler"], "does not fit strategy"),
    (["--class_counts", "a=1"], "applies to --mode class only"),
    (["--shard", "3/2"], "--shard"),
])
def test_contradictions_are_clear_errors(tiny_models, tmp_path, extra, message):
    res = run_script(GEN, *bravo_args(tiny_models, tmp_path / "x", 8, n=2), *extra)
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_changed_settings_into_the_same_folder_are_refused(tiny_models, reference):
    with pytest.raises(UserError, match="different settings"):
        generate_main(bravo_args(tiny_models, reference, 8) + ["--seed", "1"])


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_network_output_does_not_depend_on_the_batch(preset):
    import torch
    from medgen.Generation.TrainGen.core.config import build_config
    from medgen.Generation.TrainGen.core.generation.models import BatchInvariant
    from medgen.Generation.TrainGen.core.network import build_unet
    torch.manual_seed(0)
    net = build_unet(build_config({"model": {"preset": preset}}).model, 2, 1, num_class_embeds=3)
    for p in net.parameters():
        p.data.normal_(0, 0.05)  # a fresh UNet zero-initialises its output layer
    net = BatchInvariant(net.eval())
    x, t, y = torch.randn(10, 2, 32, 32), torch.full((10,), 321.0), torch.arange(10) % 3
    with torch.no_grad():
        full = net(x, t, class_labels=y)
        for bs in (1, 2, 3, 4, 7):
            parts = torch.cat([net(x[i:i + bs], t[i:i + bs], class_labels=y[i:i + bs]) for i in range(0, 10, bs)])
            assert torch.equal(full, parts), bs
