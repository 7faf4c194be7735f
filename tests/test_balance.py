"""generate.py --balance / --balance_to / --class_model: exactly the missing images per class, a class image
folder that the loaders (and run_utility.py) read back, per-class models, and the bad inputs."""
import csv
import re
import shutil

import pytest

from medgen.common import imagefolder
from medgen.common.errors import UserError
from medgen.eval.obj_eval.utility import data as utility_data
from tests.conftest import run_script

GEN = "Generation/TrainGen/generate.py"


def imbalanced(demo_root, root, counts):
    for name, n in counts.items():
        (root / name).mkdir(parents=True)
        for f in sorted((demo_root / "lesions" / name).iterdir())[:n]:
            shutil.copy(f, root / name / f.name)
    return root


def counts_of(folder):
    items, _ = imagefolder.list_items(folder, None)
    out = {}
    for _, c in items:
        out[c] = out.get(c, 0) + 1
    return out


def test_balance_generates_exactly_the_missing_counts(demo_root, tiny_models, tmp_path):
    real = imbalanced(demo_root, tmp_path / "real", {"melanoma": 7, "nevus": 3, "vascular": 5})
    out = tmp_path / "balanced"
    res = run_script(GEN, "--image_model", str(tiny_models["class"]), "--balance", str(real), "--num_steps", "3",
                     "--output_dir", str(out), "--device", "cpu")
    assert res.returncode == 0, res.stderr[-800:]
    assert counts_of(out) == {"nevus": 4, "vascular": 2}
    with open(out / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["class"] for r in rows) == ["nevus"] * 4 + ["vascular"] * 2
    assert all(r["files"].startswith(r["class"] + "/") for r in rows)
    # read back as a class folder by the utility study's loaders, classes mapped onto the real ones
    train = utility_data.load_real(real, 32, [], compute="local")[0]["train"]
    syn = utility_data.load_synthetic(out, 32, [], train, compute="local")
    assert syn.counts().tolist() == [0, 4, 2] and syn.classes == ["melanoma", "nevus", "vascular"]

    out2 = tmp_path / "to10"
    res = run_script(GEN, "--image_model", str(tiny_models["class"]), "--balance", str(real), "--balance_to", "10",
                     "--num_steps", "3", "--output_dir", str(out2), "--device", "cpu")
    assert res.returncode == 0, res.stderr[-800:]
    assert counts_of(out2) == {"melanoma": 3, "nevus": 7, "vascular": 5}


def test_class_model_draws_its_class_and_samples_do_not_change(demo_root, tiny_models, tmp_path):
    real = imbalanced(demo_root, tmp_path / "real", {"melanoma": 6, "nevus": 2, "vascular": 6})
    own = tmp_path / "nevus_run"
    shutil.copytree(tiny_models["class"], own)                  # the same weights, loaded as a second model
    args = ["--balance", str(real), "--num_steps", "3", "--device", "cpu", "--batch_size", "3"]
    one = run_script(GEN, "--image_model", str(tiny_models["class"]), "--output_dir", str(tmp_path / "one"), *args)
    two = run_script(GEN, "--image_model", str(tiny_models["class"]), "--class_model", f"nevus={own}",
                     "--output_dir", str(tmp_path / "two"), *args)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-800:]
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").glob("*/*.png"))
    assert [str(f).split("/")[0] for f in files] == ["nevus"] * 4
    for f in files:   # a sample depends on its seed and weights only, not on which model object draws it
        assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes()
    only = run_script(GEN, "--class_model", f"nevus={own}", "--balance", str(real), "--num_steps", "3",
                      "--device", "cpu", "--output_dir", str(tmp_path / "only"))
    assert only.returncode == 0, only.stderr[-800:]
    assert counts_of(tmp_path / "only") == {"nevus": 4}


def test_balance_bad_input(demo_root, tiny_models, tmp_path):
    real = imbalanced(demo_root, tmp_path / "real", {"melanoma": 4, "nevus": 2})
    model = str(tiny_models["class"])
    cases = [(["--image_model", model, "--balance", str(demo_root / "brain")], "NIfTI dataset has no classes"),
             (["--image_model", model, "--balance", str(real), "--class_model", f"vascular={model}"],
              "not a class of --balance"),
             (["--image_model", model, "--balance_to", "5"], "--balance_to needs --balance"),
             (["--image_model", model, "--balance", str(tmp_path / "nope")], "no such folder"),
             (["--class_model", f"nevus={model}", "--balance", str(real), "--balance_to", "5"],
              "no model draws class 'melanoma'"),
             (["--image_model", model, "--balance", str(real), "--balance_to", "1"], "nothing to generate"),
             (["--image_model", str(tiny_models["bravo"]), "--balance", str(real)], "applies to --mode class only")]
    from medgen.Generation.TrainGen.generate import main as generate
    for extra, message in cases:
        with pytest.raises(UserError, match=message):
            generate([*extra, "--output_dir", str(tmp_path / "o"), "--device", "cpu"])
    res = run_script(GEN, *cases[0][0], "--output_dir", str(tmp_path / "o"), "--device", "cpu")
    assert res.returncode == 2 and "Traceback" not in res.stderr and re.search(cases[0][1], res.stderr)
