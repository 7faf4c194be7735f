"""The README's recipes run as written, on smaller budgets: every block marked `<!-- recipe: NAME -->` is
read from the README, its commands run in order on the test session's demo data, and each recipe's outputs
are checked. What the test changes, and only that (adapt(); test_the_test_changes_only_budgets checks it):
the demo data's location (the session's smaller phantoms instead of `.cache/demo`), the output root
(`runs/recipes` -> a temporary folder), and budgets: training steps (BUDGET), sampling steps and validation
samples of a training (TRAIN_EXTRA), image counts, and the mask filter of a seg model trained for two steps
(its masks are noise, which the filter would redraw for ever: NO_FILTER). Sizes, modes, strategies, models and
every other flag stay as printed. `python Generation/TrainGen/demo.py` is the one command not run: the
session's demo fixture has written the same layout already."""
from __future__ import annotations

import json
import re
import shlex
import subprocess

import nibabel as nib
import pytest
from PIL import Image

from tests.conftest import ROOT, run_script

RECIPE = re.compile(r"<!-- recipe: (\w+) -->\n```(bash|python)\n(.*?)```", re.S)
BUDGET = [(r"--epochs \d+", "--max_steps 2"), (r"--max_steps 200", "--max_steps 3"),
          (r"--num_images \d+", "--num_images 4")]
BUDGET_FLAGS = {"--epochs", "--max_steps", "--num_images"}
# every training validates and samples with 4 steps, and its models generate with them (the run's default);
# a recipe that trains for the preset's epochs trains for two steps
TRAIN_EXTRA = ["--set", "strategy.sample_steps=4", "--set", "runtime.num_val_samples=4"]
NO_FILTER = ("--no_mask_filter", ("masks=seg, ", "masks=seg, mask_filter=False, "))   # CLI, API


def adapt(cmd: str, demo, runs) -> str | list[str]:
    """A README command as the test runs it: argv words, or a Python block's text (module docstring)."""
    for pattern, small in BUDGET:
        cmd = re.sub(pattern, small, cmd)
    cmd = cmd.replace(".cache/demo", str(demo)).replace("runs/recipes", str(runs))
    if "\n" in cmd:                                      # a Python block
        return cmd.replace(*NO_FILTER[1])
    words = shlex.split(cmd)
    if words[0] not in ("python", "medgen"):              # a shell line (mkdir, cp)
        return ["sh", "-c", cmd]
    if words[0] == "medgen":                             # the installed command is medgen/cli.py
        words = ["python", "medgen/cli.py", *words[1:]]
    if words[0] == "python" and words[1].endswith("train.py") and "--check_data" not in words:
        words += TRAIN_EXTRA + ([] if "--max_steps" in words else ["--max_steps", "2"])
    if words[0] == "python" and words[1].endswith("generate.py") and "--seg_model" in words:
        words.append(NO_FILTER[0])
    return words


def readme_recipes() -> dict[str, list[str]]:
    """{name: commands}: continuation lines joined, comments and blank lines dropped; a Python block is one
    command, its whole text."""
    text = (ROOT / "README.md").read_text()
    out = {}
    for name, lang, block in RECIPE.findall(text):
        if lang == "python":
            out[name] = [block]
            continue
        joined = block.replace("\\\n", " ")
        out[name] = [" ".join(line.split()) for line in joined.splitlines()
                     if line.strip() and not line.lstrip().startswith("#")]
    return out


JOBS = ["data", "class", "finetune", "chain", "labels", "inpaint", "control", "segment", "utility", "volumes", "latent",
        "export", "api"]


def run_python(code: str, folder, env: dict):
    """A README Python block, saved as a script and run from the repository root like the other commands (in
    this process unless the suite runs scripts in subprocesses)."""
    script = folder / "readme_block.py"
    script.write_text(code)
    return run_script(str(script), env=env, timeout=240)


def test_the_readme_has_a_recipe_per_job():
    assert list(readme_recipes()) == JOBS


@pytest.fixture(scope="module")
def ran(demo_root, tmp_path_factory):
    """Every recipe's commands, in the README's order: {name: [(command, returncode, stderr tail)]}."""
    runs = tmp_path_factory.mktemp("recipes")
    env = {"MEDGEN_CACHE": str(runs / "cache")}
    results = {}
    for name, commands in readme_recipes().items():
        results[name] = []
        for cmd in commands:
            if cmd == "python Generation/TrainGen/demo.py":
                continue
            words = adapt(cmd, demo_root, runs)
            if isinstance(words, str):
                res = run_python(words, runs, env)
            elif words[0] == "python":
                res = run_script(words[1], *words[2:], env=env, timeout=240)
            else:
                res = subprocess.run(words, cwd=ROOT, capture_output=True, text=True, timeout=60)
            results[name].append((cmd, res.returncode, res.stderr[-1500:]))
            if res.returncode != 0:
                break
    return results, runs


def flags(words: list[str]) -> dict[str, list[str]]:
    """{--flag: [values]} of argv words (a flag without a value gets '')."""
    out: dict[str, list[str]] = {}
    for k, w in enumerate(words):
        if w.startswith("--"):
            nxt = words[k + 1] if k + 1 < len(words) else ""
            out.setdefault(w, []).append("" if nxt.startswith("--") else nxt)
    return out


def test_the_test_changes_only_budgets(tmp_path):
    demo, runs = tmp_path / "demo", tmp_path / "runs"
    for commands in readme_recipes().values():
        for cmd in commands:
            got = adapt(cmd, demo, runs)
            printed = cmd.replace(".cache/demo", str(demo)).replace("runs/recipes", str(runs))
            if isinstance(got, str):                     # the Python block: the filter of the 2-step seg model
                assert got == printed.replace(*NO_FILTER[1]) and got.count("mask_filter=False") <= 1
                continue
            if got[0] == "sh":
                assert got[2] == printed and "medgen" not in printed and "python" not in printed
                continue
            before, after = flags(shlex.split(printed)), flags(got)
            assert got[:2] == shlex.split(printed)[:2] or got[:3] == ["python", "medgen/cli.py", "export"]
            for flag, values in before.items():          # every printed flag keeps its value, budgets aside
                assert flag in BUDGET_FLAGS | {"--set"} or after.get(flag) == values, (cmd, flag)
            added = {f: v for f, v in after.items() if f not in before}
            assert set(added) <= {"--max_steps", "--set", NO_FILTER[0]}, (cmd, added)
            assert after.get("--set", []) in (before.get("--set", []), before.get("--set", []) + TRAIN_EXTRA[1::2])
            if NO_FILTER[0] in added:
                assert "--seg_model" in before
    changed = {c for cmds in readme_recipes().values() for c in cmds if "--image_size" in c}
    assert all(flags(adapt(c, demo, runs))["--image_size"] == flags(shlex.split(c))["--image_size"] for c in changed)


@pytest.mark.parametrize("name", JOBS)
def test_recipe_runs_as_written(ran, demo_root, name):
    results, runs = ran
    for cmd, code, err in results[name]:
        assert code == 0, f"{cmd}\n{err}"
    check = CHECKS.get(name)
    if check:
        check(runs, demo_root)


def _pngs(folder):
    return sorted(folder.glob("*.png"))


def _class(runs, demo=None):
    synth = runs / "lesions_synth"
    assert len(_pngs(synth / "melanoma")) == 32 and len(_pngs(synth / "nevus")) == 32    # as written
    assert len(_pngs(synth / "unconditional")) == 8
    assert (runs / "lesions_eval" / "report.md").is_file()


def _finetune(runs, demo=None):
    out = runs / "lesions_balanced"
    for c in ("melanoma", "nevus", "vascular"):                 # every class filled up to 40 (--balance_to)
        images = _pngs(out / c)
        assert len(images) + len(_pngs(demo / "lesions" / c)) == 40 and Image.open(images[0]).size == (128, 128)
    log = (runs / "melanoma_ft" / "train.log").read_text()
    assert "class embedding mapped by name" in log


def _chain(runs, demo=None):
    assert len(list((runs / "chain").glob("sample_*/bravo.nii.gz"))) == 4
    metrics = json.loads((runs / "paired_eval" / "metrics.json").read_text())
    assert any(m["metric"] == "mae" and m["value"] is not None for m in metrics["metrics"])


def _labels(runs, demo=None):
    import numpy as np
    for sample in sorted((runs / "labels_chain").glob("sample_*"))[:4]:
        assert set(np.unique(nib.load(str(sample / "seg.nii.gz")).get_fdata())) <= {0, 1, 2, 4}
    metrics = {m["metric"] for m in json.loads((runs / "labels_eval" / "metrics.json").read_text())["metrics"]}
    assert {"enhancement_ET", "intensity_t1_gd_ED"} <= metrics


def _inpaint(runs, demo=None):
    metrics = {m["metric"]: m for m in json.loads((runs / "inserted_eval" / "metrics.json").read_text())["metrics"]}
    assert metrics["inpaint_outside_max_abs_diff"]["value"] == 0.0
    assert "real+inpainted inserted x1" in (runs / "inserted_utility" / "utility.md").read_text()


def _control(runs, demo=None):
    assert "a ControlNet beside the frozen run" in (runs / "control" / "train.log").read_text()
    assert len(list((runs / "controlled").glob("sample_*/bravo.nii.gz"))) == len(
        list((runs / "paired").glob("sample_*/bravo.nii.gz")))


def _segment(runs, demo=None):
    assert "Dice" in (runs / "segmented" / "segmentation.md").read_text()
    assert len(list((runs / "segmented" / "volumes").glob("*/seg.nii.gz"))) == 2     # the two test subjects


def _utility(runs, demo=None):
    assert "real+chain x1" in (runs / "utility" / "utility.md").read_text()   # the recipe, named by its folder


def _volumes(runs, demo=None):
    vols = sorted((runs / "volumes").glob("sample_*/bravo.nii.gz"))
    assert len(vols) == 4 and nib.load(vols[0]).shape == (16, 16, 8)
    assert (runs / "volumes_eval" / "metrics.json").is_file()


def _latent(runs, demo=None):
    assert "latent" in (runs / "latent" / "train.log").read_text().splitlines()[0].lower()
    assert list((runs / "latent_synth").glob("sample_*/bravo.nii.gz"))


def _export(runs, demo=None):
    names = {p.name for p in (runs / "bravo_export").iterdir()}
    assert {"model.safetensors", "config.json", "scheduler_config.json", "MODEL_CARD.md"} <= names
    assert "CC-BY-4.0" in (runs / "bravo_export" / "MODEL_CARD.md").read_text()
    assert len(list((runs / "from_export").glob("sample_*/bravo.nii.gz"))) == len(
        list((runs / "paired").glob("sample_*/bravo.nii.gz")))                 # one per real test mask, as paired


def _api(runs, demo=None):
    assert len(list((runs / "api_synth").glob("sample_*/bravo.nii.gz"))) == len(
        list((runs / "paired").glob("sample_*/bravo.nii.gz")))


CHECKS = {"class": _class, "finetune": _finetune, "chain": _chain, "labels": _labels, "inpaint": _inpaint,
          "control": _control, "segment": _segment,
          "utility": _utility,
          "volumes": _volumes, "latent": _latent, "export": _export, "api": _api}
