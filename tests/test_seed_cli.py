"""The seed's commands as their users run them: glob model paths, run-name templates, the documented defaults
and --help, user plugins, published label-CSV layouts, diversity without a real set, the phantom notice."""
import json

import pytest
import torch
from PIL import Image

from medgen.Generation.TrainGen.core.config import build_config
from medgen.common.errors import UserError
from medgen.Generation.TrainGen.core.generation.models import resolve_glob
from medgen.common.imagefolder import read_labels_csv
from medgen.Generation.TrainGen.core.modes import MODES, Mode, TrainingMode
from medgen.Generation.TrainGen.core.strategies import DiffusionStrategy, Strategy
from tests.conftest import run_script

TRAIN = "Generation/TrainGen/train.py"


def test_model_glob_resolves_to_exactly_one(tmp_path):
    for name in ("Diffusion_seg_128_20260101-000000", "Diffusion_bravo_128_20260101-000000",
                 "Diffusion_bravo_128_20260202-000000"):
        (tmp_path / name).mkdir()
    assert resolve_glob(str(tmp_path / "Diffusion_seg_128_*"), "--seg_model") == tmp_path / \
        "Diffusion_seg_128_20260101-000000"
    with pytest.raises(UserError, match=r"matches 2 paths, not one: .*20260101.*; .*20260202"):
        resolve_glob(str(tmp_path / "Diffusion_bravo_128_*"), "--image_model")
    with pytest.raises(UserError, match="matches nothing"):
        resolve_glob(str(tmp_path / "Diffusion_dual_*"), "--image_model")


def test_generate_takes_a_glob_for_a_run(tiny_models, demo_root, tmp_path):
    from medgen.Generation.TrainGen.generate import main as generate_main
    pattern = str(tiny_models["bravo_rflow"]).replace("bravo_rflow", "bravo_rfl*")
    assert generate_main(["--image_model", pattern, "--num_images", "2", "--num_steps", "2", "--masks_from",
                          str(demo_root / "brain" / "val"), "--output_dir", str(tmp_path / "o"), "--device",
                          "cpu"]) == 0
    assert (tmp_path / "o" / "sample_000001" / "bravo.nii.gz").is_file()


def test_run_name_template_and_documented_defaults(tmp_path, monkeypatch):
    cfg = build_config()
    assert cfg.mode.name == "seg" and cfg.runtime.val_interval == 30
    from medgen.Generation.TrainGen.core.run import resolve_run_dir
    from medgen.Generation.TrainGen.core.runtime import init_runtime
    cfg = build_config({"paths": {"run_name": "Diffusion_{mode}_{image_size}_{timestamp}"}})
    run = resolve_run_dir(cfg, init_runtime(cfg.runtime))
    assert run.name.startswith("Diffusion_seg_128_")
    with pytest.raises(UserError, match="unknown or malformed field 'size'"):
        build_config({"paths": {"run_name": "{size}_{timestamp}"}})
    with pytest.raises(UserError, match="must contain {timestamp}"):
        build_config({"paths": {"run_name": "fixed"}})


def test_help_shows_defaults_and_choices():
    out = " ".join(run_script(TRAIN, "--help").stdout.split())   # argparse wraps lines
    assert "-> mode.name (default seg; one of seg, bravo, dual, class, segment, image, inpaint)" in out
    assert "-> optim.lr (default 0.0001)" in out and "-> runtime.val_interval (default 30)" in out
    gen = " ".join(run_script("Generation/TrainGen/generate.py", "--help").stdout.split())
    assert "(default: 64)" in gen and "{auto,cpu,cuda}" in gen


def test_base_classes_have_the_documented_names():
    assert DiffusionStrategy is Strategy and TrainingMode is Mode
    assert all(issubclass(m, TrainingMode) for m in MODES.values())


def test_a_plugin_registers_a_mode_without_package_edits(demo_root, tmp_path):
    plugin = tmp_path / "my_modes.py"
    plugin.write_text("from Generation.TrainGen.core.modes import MODES, TrainingMode\n\n\n"
                      "class SegFromBravo(TrainingMode):\n"
                      "    name = 'seg_from_bravo'\n"
                      "    generated_roles = ['seg']\n"
                      "    condition_roles = ['bravo']\n\n\n"
                      "MODES['seg_from_bravo'] = SegFromBravo\n")
    res = run_script(TRAIN, "--plugin", str(plugin), "--config", "config/tiny.yaml", "--mode", "seg_from_bravo",
                     "--data_dir", str(demo_root / "brain"), "--max_steps", "2", "--run_dir", str(tmp_path / "run"),
                     env={"MEDGEN_CACHE": str(tmp_path / "c")})
    assert res.returncode == 0, res.stderr[-1500:]
    state = torch.load(tmp_path / "run" / "ckpt_00000002.pt", weights_only=True)
    assert state["meta"]["mode"] == "seg_from_bravo"
    res = run_script(TRAIN, "--mode", "seg_from_bravo", "--max_steps", "1", "--run_dir", str(tmp_path / "r2"))
    assert res.returncode == 2 and "--mode 'seg_from_bravo' is unknown" in res.stderr
    broken = tmp_path / "broken.py"
    broken.write_text("raise ValueError('bad plugin')\n")
    res = run_script(TRAIN, "--plugin", str(broken), "--max_steps", "1")
    assert res.returncode == 2 and "--plugin" in res.stderr and "ValueError: bad plugin" in res.stderr


def _images(root, names):
    root.mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(names):
        Image.new("L", (16, 16), 20 * i).save(root / n)


def test_isic_and_aptos_label_files_are_read(tmp_path):
    _images(tmp_path / "isic", ["ISIC_0000000.jpg", "ISIC_0000001.jpg", "ISIC_0000002.jpg"])
    (tmp_path / "isic.csv").write_text("image,MEL,NV,BCC,UNK\nISIC_0000000,1.0,0.0,0.0,0.0\n"
                                       "ISIC_0000001,0.0,1.0,0.0,0.0\nISIC_0000002,0.0,1.0,0.0,0.0\n")
    items, problems = read_labels_csv(tmp_path / "isic", tmp_path / "isic.csv")
    assert not problems and [(p.name, c) for p, c in items] == [("ISIC_0000000.jpg", "MEL"),
                                                                ("ISIC_0000001.jpg", "NV"), ("ISIC_0000002.jpg", "NV")]
    _images(tmp_path / "aptos", ["000c1434d8d7.png", "001639a390f0.png"])
    (tmp_path / "aptos.csv").write_text("id_code,diagnosis\n000c1434d8d7,2\n001639a390f0,4\n")
    items, _ = read_labels_csv(tmp_path / "aptos", tmp_path / "aptos.csv")
    assert [(p.name, c) for p, c in items] == [("000c1434d8d7.png", "2"), ("001639a390f0.png", "4")]
    (tmp_path / "custom.csv").write_text("file,grade\n000c1434d8d7.png,0\n")
    with pytest.raises(UserError, match="match no known layout"):
        read_labels_csv(tmp_path / "aptos", tmp_path / "custom.csv")
    items, _ = read_labels_csv(tmp_path / "aptos", tmp_path / "custom.csv", "file", "grade")
    assert items[0][1] == "0" and items[0][0].is_file()


def test_isic_csv_trains_through_check_data(tmp_path):
    names = [f"ISIC_{i:07d}.jpg" for i in range(8)]
    _images(tmp_path / "isic", names)
    rows = "".join(f"{n[:-4]},{int(i % 2 == 0)}.0,{int(i % 2 == 1)}.0\n" for i, n in enumerate(names))
    (tmp_path / "labels.csv").write_text("image,MEL,NV\n" + rows)
    res = run_script(TRAIN, "--check_data", "--mode", "class", "--data_dir", str(tmp_path / "isic"),
                     "--set", f"data.labels_csv={tmp_path / 'labels.csv'}", env={"MEDGEN_CACHE": str(tmp_path / "c")})
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-1000:]


def test_ms_ssim_diversity_needs_no_real_dir(tiny_models, tmp_path):
    from medgen.Generation.TrainGen.generate import main as generate_main
    out = tmp_path / "lesions"
    assert generate_main(["--image_model", str(tiny_models["class"]), "--num_images", "4", "--num_steps", "2",
                          "--sampler", "ddim", "--output_dir", str(out), "--device", "cpu"]) == 0
    res = run_script("eval/obj_eval/metrics/ms_ssim.py", "--mode", "diversity", "--synthetic-dir", str(out),
                     "--output", str(tmp_path / "ev"))
    assert res.returncode == 0, res.stderr[-1500:]
    rec = json.loads((tmp_path / "ev" / "metrics.json").read_text())["metrics"][0]
    assert rec["metric"] == "ms_ssim_diversity" and rec["n"] == 6 and "floor" not in rec
    res = run_script("eval/obj_eval/metrics/ms_ssim.py", "--mode", "quality", "--synthetic-dir", str(out))
    assert res.returncode == 2 and "--real-dir is needed for --mode quality" in res.stderr


def test_training_on_the_phantoms_says_so(tmp_path):
    res = run_script(TRAIN, "--config", "config/tiny.yaml", "--max_steps", "1", "--run_dir", str(tmp_path / "run"),
                     env={"MEDGEN_CACHE": str(tmp_path / "c")})
    assert res.returncode == 0, res.stderr[-1000:]
    assert res.stdout.splitlines()[0].startswith("no --data_dir: training on the built-in demo phantoms")


def test_readme_user_mode_trains_generates_and_evaluates(demo_root, tmp_path):
    """The README's own example (a strategy and a mode in a user file, passed with --plugin) goes through
    training, generation with a manifest, and evaluation, without any other file touched."""
    import re
    from tests.conftest import ROOT
    readme = (ROOT / "docs" / "training.md").read_text()
    section = readme[readme.index("## Adding a strategy or a mode"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    plugin = tmp_path / "my_modes.py"
    plugin.write_text(code)
    env = {"MEDGEN_CACHE": str(tmp_path / "c")}
    run = tmp_path / "run"
    res = run_script(TRAIN, "--plugin", str(plugin), "--config", "config/tiny.yaml", "--mode", "t1gd_from_pre",
                     "--strategy", "ddpm_x0", "--data_dir", str(demo_root / "brain"), "--max_steps", "3",
                     "--run_dir", str(run), env=env)
    assert res.returncode == 0, res.stderr[-1500:]
    out = tmp_path / "synth"
    res = run_script("Generation/TrainGen/generate.py", "--plugin", str(plugin), "--image_model", str(run),
                     "--masks_from", str(demo_root / "brain" / "val"), "--num_images", "4", "--num_steps", "3",
                     "--sampler", "ddim", "--output_dir", str(out), "--device", "cpu", env=env)
    assert res.returncode == 0, res.stderr[-1500:]
    for f in ("t1_pre.nii.gz", "seg.nii.gz", "t1_gd.nii.gz"):
        assert (out / "sample_000003" / f).is_file()
    with open(out / "manifest.csv") as f:
        rows = list(__import__("csv").DictReader(f))
    assert len(rows) == 4 and all("#slice" in r["condition"] for r in rows)
    res = run_script("eval/obj_eval/run_evaluation.py", "--synthetic-dir", str(out), "--real-dir",
                     str(demo_root / "brain" / "val"), "--image-type", "t1_gd", "--metrics", "mae,psnr,ms_ssim",
                     "--output", str(tmp_path / "ev"), env=env)
    assert res.returncode == 0, res.stderr[-1500:]
    recs = {r["metric"]: r for r in json.loads((tmp_path / "ev" / "metrics.json").read_text())["metrics"]}
    assert recs["mae"]["n"] == 4 and recs["mae"]["method"]["pairs_by"].startswith("conditioning")
    res = run_script("Generation/TrainGen/generate.py", "--plugin", str(plugin), "--image_model", str(run),
                     "--num_images", "2", "--output_dir", str(tmp_path / "x"), env=env)
    assert res.returncode == 2 and "conditioned on t1_pre, seg: give a real dataset" in res.stderr
