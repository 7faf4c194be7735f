"""Hostile input on the newest surfaces: names that would escape the output folder, label CSVs with duplicate,
conflicting, short or non-UTF-8 rows, a second job on a locked run or output folder, an autoencoder of another
role, plugins that replace, exit or register junk, complex and absurdly large volumes, broken diffusers
configs, absurd sizes, and anonymised manifest sources. Each is one clear line, exit 2, nothing written
outside the folder the user named."""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from medgen.common import locks
from medgen.common.data import read_volume
from medgen.common.errors import UserError
from medgen.common.imagefolder import read_labels_csv
from medgen.common.names import check_name, inside
from medgen.Generation.TrainGen.core.config import build_config
from tests.conftest import ROOT, run_script

TRAIN, GENERATE = "Generation/TrainGen/train.py", "Generation/TrainGen/generate.py"


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


# ---------------------------------------------------------------- names that become paths
@pytest.mark.parametrize("name", ["../../../escaped_vascular", "", "  ", "a/b", "/etc/x", "..", "C:\\x", "tab\there",
                                  " padded"])
def test_names_that_are_not_one_path_component_are_refused(name):
    with pytest.raises(UserError, match="labels.csv line 7: the name"):
        check_name(name, "labels.csv line 7")


def test_inside_refuses_escapes_and_symlinked_folders(tmp_path):
    out = tmp_path / "out"
    (out / "ok").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", out / "link")
    assert inside(out, "ok/sample.png") == out / "ok" / "sample.png"
    for rel in ("../x.png", "link/x.png", "/tmp/x.png"):
        with pytest.raises(UserError, match="refusing to write"):
            inside(out, rel)


def _write_images(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(names):
        Image.new("L", (16, 16), 30 * i).save(folder / n)


def test_label_csv_rows(tmp_path):
    _write_images(tmp_path, ["a.png", "b.png", "c.png"])
    cases = {
        "escape": ("filename,label\na.png,nevus\nb.png,../../../escaped_vascular\n", "line 3: the name"),
        "empty": ("filename,label\na.png,nevus\nb.png,\n", "line 3: the name '' empty"),
        "nested": ("filename,label\na.png,a/b\n", "holds a path separator"),
        "conflict": ("filename,label\na.png,nevus\nb.png,nevus\na.png,melanoma\n",
                     "image 'a.png' has label 'nevus' on line 2 and 'melanoma' on line 4"),
        "short": ("filename,label\na.png,nevus\nb.png\n", "line 3 does not have the header's 2 fields"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / f"{name}.csv").write_text(text)
        with pytest.raises(UserError, match=message):
            read_labels_csv(tmp_path, tmp_path / f"{name}.csv")
    (tmp_path / "latin1.csv").write_bytes("filename,label\na.png,nevus\nb.png,n\xe6vus\n".encode("latin-1"))
    with pytest.raises(UserError, match="line 3 is not UTF-8 .*0xe6"):
        read_labels_csv(tmp_path, tmp_path / "latin1.csv")
    (tmp_path / "excel.csv").write_bytes("\ufefffilename,label\na.png,nævus\nb.png,nevus\n".encode("utf-8"))
    items, _ = read_labels_csv(tmp_path, tmp_path / "excel.csv")       # a BOM and non-ASCII labels: fine
    assert [c for _, c in items] == ["nævus", "nevus"]
    (tmp_path / "dup.csv").write_text("filename,label\na.png,nevus\nb.png,nevus\na.png,nevus\n")
    items, problems = read_labels_csv(tmp_path, tmp_path / "dup.csv")
    assert len(items) == 2 and len(problems) == 1 and not problems[0].fatal and "listed again" in str(problems[0])


def test_train_py_refuses_a_hostile_label_without_a_traceback(tmp_path):
    _write_images(tmp_path / "imgs", ["a.png", "b.png", "c.png", "d.png"])
    (tmp_path / "labels.csv").write_text("filename,label\na.png,x\nb.png,x\nc.png,../../../escaped\nd.png,y\n")
    res = run_script(TRAIN, "--config", "config/tiny.yaml", "--mode", "class", "--data_dir", str(tmp_path / "imgs"),
                     "--set", f"data.labels_csv={tmp_path / 'labels.csv'}", "--max_steps", "1",
                     "--run_dir", str(tmp_path / "run"), env={"MEDGEN_CACHE": str(tmp_path / "c")})
    assert res.returncode == 2 and "Traceback" not in res.stderr and "line 4: the name" in res.stderr


def test_a_checkpoint_with_a_hostile_class_name_writes_nothing(tiny_models, tmp_path):
    state = torch.load(sorted(tiny_models["class"].glob("ckpt_*.pt"))[-1], weights_only=True)
    state["meta"]["class_names"] = ["../../../escaped"] + state["meta"]["class_names"][1:]
    bad = tmp_path / "bad" / "ckpt_00000004.pt"
    bad.parent.mkdir()
    torch.save(state, bad)
    out = tmp_path / "out" / "a" / "b" / "c"
    res = run_script(GENERATE, "--image_model", str(bad), "--class_counts", "../../../escaped=1", "--num_images", "1",
                     "--num_steps", "2", "--output_dir", str(out), "--device", "cpu")
    assert res.returncode == 2 and "class_names: the name '../../../escaped'" in res.stderr
    assert not (tmp_path / "out" / "escaped").exists() and not files_under(tmp_path / "out")
    res = run_script(GENERATE, "--image_model", str(tiny_models["class"]), "--class_counts", "../../../x=1",
                     "--num_images", "1", "--output_dir", str(out), "--device", "cpu")
    assert res.returncode == 2 and "--class_counts: the name '../../../x'" in res.stderr


# ---------------------------------------------------------------- locks
def test_lock_owners_stale_and_live(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        host = socket.gethostname()
        for owner, refused in (({"host": host, "pid": sleeper.pid}, True),          # alive on this host
                               ({"host": "other-node", "pid": 1}, True),           # cannot be checked
                               ({"host": host, "pid": 2 ** 22 + 7}, False),        # gone
                               ({"host": "other-node", "pid": 1, "slurm_job": "77"}, False)):   # requeued job
            (folder / ".lock").write_text(json.dumps(owner))
            env = {"SLURM_JOB_ID": "77"} if owner.get("slurm_job") else {}
            old = {k: os.environ.get(k) for k in env}
            os.environ.update(env)
            try:
                if refused:
                    with pytest.raises(UserError, match=f"is in use by {owner['host']} pid {owner['pid']}"):
                        locks.acquire(folder, "--run_dir")
                else:
                    path = locks.acquire(folder, "--run_dir")
                    assert json.loads(path.read_text())["pid"] == os.getpid()
                    locks.release(path)
                    assert not path.exists()
            finally:
                for k, v in old.items():
                    os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.fixture
def running_training(demo_root, tmp_path):
    """A training in its own process group, stopped (and its group killed) whatever the test does."""
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, TRAIN, "--config", "config/tiny.yaml", "--mode", "seg", "--data_dir",
                             str(demo_root / "brain"), "--epochs", "400", "--run_dir", str(run_dir)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                            env={**os.environ, "MEDGEN_CACHE": str(tmp_path / "c"), "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 90
        started = lambda: (run_dir / ".lock").is_file() and (run_dir / "train.log").is_file()  # noqa: E731
        while not started() and proc.poll() is None and time.time() < deadline:   # lock, config, then the log
            time.sleep(0.2)
        assert started(), proc.stderr.read() if proc.poll() is not None else "no lock and log in 90 s"
        yield run_dir, proc
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:       # the test killed it already
            pass
        proc.wait(timeout=30)
        proc.stderr.close()


def test_a_second_training_on_a_running_folder_is_refused_then_allowed(running_training, demo_root, tmp_path):
    run_dir, proc = running_training
    args = ["--config", "config/tiny.yaml", "--mode", "seg", "--data_dir", str(demo_root / "brain"), "--max_steps",
            "1", "--run_dir", str(run_dir), "--seed", "7"]
    before = (run_dir / "config.yaml").read_text()
    res = run_script(TRAIN, *args, env={"MEDGEN_CACHE": str(tmp_path / "c")})
    assert res.returncode == 2 and f"pid {proc.pid}" in res.stderr and "is in use by" in res.stderr
    assert (run_dir / "config.yaml").read_text() == before          # the running job's config is untouched
    os.killpg(proc.pid, signal.SIGKILL)                               # the owner dies without releasing
    proc.wait(timeout=30)
    res = run_script(TRAIN, *args, "--resume", "auto", env={"MEDGEN_CACHE": str(tmp_path / "c")})
    assert res.returncode == 0, res.stderr[-2000:]
    assert "seed: 7" in (run_dir / "config.yaml").read_text() and not (run_dir / ".lock").exists()


def test_output_folder_settings_are_created_once(tmp_path):
    from medgen.Generation.TrainGen.core.generation.writers import open_output_dir
    open_output_dir(tmp_path, "generation.json", {"seed": 1})
    with pytest.raises(UserError, match=f"different settings \\(seed: 1 there, 2 now\\): use a new --output_dir, "
                                        f"rerun with the folder's settings to continue it, or delete {tmp_path} "
                                        "to start over"):
        open_output_dir(tmp_path, "generation.json", {"seed": 2})
    assert json.loads((tmp_path / "generation.json").read_text())["seed"] == 1
    path = locks.acquire(tmp_path, "--output_dir", ".lock-0")            # a shard runs ...
    try:
        other = locks.acquire(tmp_path, "--output_dir", ".lock-1")       # ... another shard beside it
        locks.release(other)
        (tmp_path / ".lock-0").write_text(json.dumps({"host": "other-node", "pid": 9}))
        with pytest.raises(UserError, match="in use by other-node pid 9"):
            locks.acquire(tmp_path, "--output_dir", ".lock-0")           # the same shard twice: refused
    finally:
        path.unlink(missing_ok=True)


# ---------------------------------------------------------------- latent roles, plugins
def test_latent_run_refuses_an_autoencoder_of_another_role(tmp_path):
    from medgen.Generation.TrainGen.core.latent import check_fits, load_autoencoder
    from medgen.Generation.TrainGen.core.modes import MODES
    from tests.test_evidence import _autoencoder_run
    ae = load_autoencoder(_autoencoder_run(tmp_path))
    seg = MODES["seg"](build_config({"mode": {"name": "seg"}}).mode, None, None)
    with pytest.raises(UserError, match="codes bravo .*mode seg generates seg"):
        check_fits(ae, seg, 2)
    check_fits(ae, MODES["bravo"](build_config({"mode": {"name": "bravo"}}).mode, None, 1), 2)


@pytest.mark.parametrize("body, message", [
    ("from Generation.TrainGen.core.modes import MODES, TrainingMode\nclass B(TrainingMode):\n    pass\n"
     "MODES['bravo'] = B\n", "MODES\\['bravo'\\] is already registered"),
    ("from Generation.TrainGen.core.modes import MODES\nMODES['x'] = 42\n", "MODES\\['x'\\] = 42 is not a"),
    ("import sys\nsys.exit(0)\n", "called sys.exit\\(0\\) while loading"),
    ("from Generation.TrainGen.core.strategies import STRATEGIES\ndel STRATEGIES['rflow']\n", "removed STRATEGIES"),
])
def test_plugins_that_replace_exit_or_register_junk(tmp_path, body, message):
    plugin = tmp_path / "p.py"
    plugin.write_text(body)
    res = run_script(TRAIN, "--plugin", str(plugin), "--max_steps", "1")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert f"--plugin {plugin}" in res.stderr and __import__("re").search(message, res.stderr), res.stderr


def test_two_plugins_with_one_name_and_an_explicit_override(tmp_path):
    from medgen.Generation.TrainGen.core import plugins
    from medgen.Generation.TrainGen.core.modes import MODES
    saved, loaded = dict(MODES), dict(plugins._loaded)
    mode = ("from Generation.TrainGen.core.modes import MODES, TrainingMode\nclass T(TrainingMode):\n    pass\n"
            "MODES['t2'] = T\n")
    for k in "ab":
        (tmp_path / f"{k}.py").write_text(mode)
    (tmp_path / "c.py").write_text("OVERRIDES = {'t2'}\n" + mode)
    try:
        plugins.load_plugins([str(tmp_path / "a.py")])
        with pytest.raises(UserError, match="MODES\\['t2'\\] is already registered"):
            plugins.load_plugins([str(tmp_path / "b.py")])
        plugins.load_plugins([str(tmp_path / "c.py")])                 # said on purpose: allowed
        assert MODES["t2"].__module__.endswith("_c")
    finally:
        MODES.clear()
        MODES.update(saved)
        plugins._loaded.clear()
        plugins._loaded.update(loaded)


# ---------------------------------------------------------------- volumes, diffusers configs, sizes
def test_complex_and_absurdly_large_volumes_are_unreadable_not_fatal(tmp_path, monkeypatch):
    img = nib.Nifti1Image(np.zeros((4, 4, 4), np.complex64), np.eye(4))
    nib.save(img, tmp_path / "complex.nii.gz")
    _, _, problem = read_volume(tmp_path / "complex.nii.gz")
    assert "voxel type complex64 is not a real number type" in problem.message
    big = nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4))
    big.header.set_data_shape((30000, 30000, 30000))
    (tmp_path / "big.nii").write_bytes(big.header.binaryblock + b"\0" * 4 + b"\0" * 32)
    _, _, problem = read_volume(tmp_path / "big.nii")
    assert "30000x30000x30000 array" in problem.message and "MEDGEN_MAX_VOLUME_GB" in problem.message
    monkeypatch.setenv("MEDGEN_MAX_VOLUME_GB", "1e9")
    _, _, problem = read_volume(tmp_path / "big.nii")                # allowed now: still one line, no crash
    assert "unreadable or truncated" in problem.message


def test_check_data_refuses_a_complex_volume_and_skip_bad_skips_it(demo_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(demo_root / "brain" / "train", root / "train")
    victim = sorted((root / "train").iterdir())[0]
    nib.save(nib.Nifti1Image(np.zeros((32, 32, 24), np.complex64), np.eye(4)), victim / "bravo.nii.gz")
    res = run_script(TRAIN, "--check_data", "--mode", "bravo", "--data_dir", str(root),
                     env={"MEDGEN_CACHE": str(tmp_path / "c")})
    assert res.returncode != 0 and "complex64" in res.stderr + res.stdout and "Traceback" not in res.stderr
    res = run_script(TRAIN, "--check_data", "--mode", "bravo", "--data_dir", str(root), "--skip_bad",
                     env={"MEDGEN_CACHE": str(tmp_path / "c")})
    assert res.returncode == 0, res.stderr[-1500:]


@pytest.mark.parametrize("change, message", [
    ({"colour": 1}, "unknown UNet2DModel key 'colour'"),
    ({"norm_num_groups": 7}, "norm_num_groups 7 does not divide block_out_channels"),
    ({"layers_per_block": "two"}, "layers_per_block must be a positive whole number"),
    ({"block_out_channels": [200000, 400000]}, "more than 8192 channels"),
    ({"block_out_channels": [4096, 8192], "norm_num_groups": 32, "layers_per_block": 8}, "billion convolution"),
    ({"in_channels": 1}, "in_channels 1 contradicts the weights"),
])
def test_broken_diffusers_configs_are_one_line(tmp_path, change, message):
    from medgen.Generation.TrainGen.core import pretrained
    from tests.test_pretrained import save_pipeline
    save_pipeline(tmp_path / "pipe")
    conf_path = tmp_path / "pipe" / "unet" / "config.json"
    conf_path.write_text(json.dumps({**json.loads(conf_path.read_text()), **change}))
    with pytest.raises(UserError, match=message):
        pretrained.read_weights(pretrained.read_folder(tmp_path / "pipe"))


def test_a_pickled_bin_and_absurd_sizes_are_refused(tmp_path):
    from medgen.Generation.TrainGen.core import pretrained
    from tests.test_pretrained import save_pipeline
    save_pipeline(tmp_path / "pipe")
    unet = tmp_path / "pipe" / "unet"
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({"conv_in.weight": torch.zeros(1), "junk": Path("x")}, unet / "diffusion_pytorch_model.bin")
    with pytest.raises(UserError, match="holds objects other than tensors") as err:
        pretrained.read_weights(pretrained.read_folder(tmp_path / "pipe"))
    assert "weights_only=False" not in str(err.value)
    sched = tmp_path / "pipe" / "scheduler" / "scheduler_config.json"
    sched.write_text(json.dumps({**json.loads(sched.read_text()), "num_train_timesteps": 1e10}))
    with pytest.raises(UserError, match="strategy.num_timesteps must be in \\[2, 100000\\]"):
        pretrained.apply_to_config(build_config({}), pretrained.read_folder(tmp_path / "pipe"))
    for layer, message in (({"data": {"volume_shape": [4096, 4096, 4096]}}, "256.0 GiB per float32 channel"),
                           ({"model": {"channels": [200000, 400000]}}, "at most 8192 per level"),
                           ({"data": {"image_size": 100000}}, "image_size must be at most 4096")):
        with pytest.raises(UserError, match=message):
            build_config(layer)


# ---------------------------------------------------------------- manifest privacy, wording
def test_unit_digests_are_keyed_and_a_record_of_another_key_is_refused(tmp_path, monkeypatch):
    """Review 7.09: an unsalted SHA-256 of a folder name is reversed by trying candidate MRNs. The digest is an
    HMAC with a site key kept outside every output folder: the same guess no longer finds the subject, another
    key's record is refused naming both keys, and a record from before keyed digests is still checked."""
    import hashlib
    from medgen.common import splits
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv("MEDGEN_KEY_FILE", raising=False)
    name = "DOE_JOHN_MRN4711"
    keyed = splits.digest(name)                                 # made on first use, owner-only
    made = tmp_path / "config" / "medgen" / "unit-key"
    assert made.is_file() and made.stat().st_mode & 0o077 == 0 and len(made.read_bytes()) == 32
    guesses = {hashlib.sha256(f"DOE_JOHN_MRN{k:04d}".encode()).hexdigest()[:20]: k for k in range(10 ** 4)}
    assert keyed not in guesses and splits.digest(name, "sha256") in guesses      # the old scheme falls
    other = tmp_path / "other.key"
    other.write_bytes(bytes(range(32)))
    monkeypatch.setenv("MEDGEN_KEY_FILE", str(other))
    assert splits.digest(name) != keyed
    foreign = {"key_id": splits.key_id(), "train": [splits.digest(name)]}
    monkeypatch.setenv("MEDGEN_KEY_FILE", str(made))
    with pytest.raises(UserError, match=f"site key {foreign['key_id']}.*is {splits.key_id()}.*MEDGEN_KEY_FILE"):
        splits.check_no_leak({"image": foreign}, {"test": [f"/d/test/{name}"]}, "--real_dir d")
    own = {"key_id": splits.key_id(), "train": [keyed]}
    legacy = {"train": [splits.digest(name, "sha256")]}         # a record from before keyed digests
    for rec in (own, legacy):
        with pytest.raises(UserError, match=f"1 of the 1 test subjects.*{name}"):
            splits.check_no_leak({"image": rec}, {"test": [f"/d/test/{name}"]}, "--real_dir d")
    monkeypatch.setenv("MEDGEN_KEY_FILE", str(tmp_path / "missing.key"))
    with pytest.raises(UserError, match="missing.key: no such key file"):
        splits.digest(name)


def test_anonymized_sources_keep_pairing(tiny_models, demo_root, tmp_path):
    from medgen.eval.obj_eval.core.inputs import load_set, pair
    out = tmp_path / "anon"
    val = demo_root / "brain" / "val"
    assert run_script(GENERATE, "--image_model", str(tiny_models["bravo"]), "--masks_from", str(val),
                      "--num_images", "3", "--num_steps", "2", "--sampler", "ddim", "--anonymize_sources",
                      "--output_dir", str(out), "--device", "cpu").returncode == 0
    with open(out / "manifest.csv", newline="") as f:
        conditions = [r["condition"] for r in csv.DictReader(f)]
    names = [p.name for p in val.iterdir()]
    assert all(c.startswith("hmac:") for c in conditions) and not any(n in c for c in conditions for n in names)
    synth, real = load_set(out, what="--synthetic-dir"), load_set(val)
    s_idx, r_idx, how = pair(synth, real)
    assert len(s_idx) == 3 and how.startswith("conditioning mask")


def test_memorization_flag_is_named_in_its_own_errors(tmp_path):
    from medgen.eval.obj_eval.utility.data import dataset_root
    with pytest.raises(UserError, match="^--real-train-dir .*folder does not exist"):
        dataset_root(tmp_path / "missing", "--real-train-dir")
    from medgen.common.errors import grid_text
    assert grid_text((48, 64, 80)) == "64x80x48"
