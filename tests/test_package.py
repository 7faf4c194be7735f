"""medgen as a library: the installed command and package, the wheel's one top-level name, the Python API
against generate.py, exports that load back everywhere (and in diffusers), and weight fetching against a server
on 127.0.0.1."""
from __future__ import annotations

import contextlib
import filecmp
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import medgen
from medgen.common.errors import UserError
from medgen.common.features import RADIMAGENET_FILE, resolve_weights, sha256_of
from tests.conftest import ROOT, run_script

BIN = Path(sys.executable).parent


def installed() -> bool:
    from importlib import metadata
    try:
        metadata.distribution("medgen")
    except metadata.PackageNotFoundError:
        return False
    return True


# ---------------------------------------------------------------- packaging
@pytest.mark.skipif(not installed(), reason="medgen is not installed in this environment (make venv installs it)")
def test_the_command_and_the_package_work_from_any_folder(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([str(BIN / "medgen"), "--help"], cwd=tmp_path, capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 0 and "fetch-weights" in res.stdout and "export" in res.stdout
    code = ("import medgen, medgen.common.data as d; print(medgen.load.__module__, d.__file__)\n"
            "for name in ('common', 'config', 'eval', 'Generation'):\n"
            "    try:\n        __import__(name)\n    except ModuleNotFoundError:\n        continue\n"
            "    raise SystemExit(f'{name} is importable as a top-level module')\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["medgen.api", str(ROOT / "common" / "data.py")]


def test_the_wheel_holds_one_top_level_package_and_the_presets(tmp_path):
    src = tmp_path / "src"
    for name in ("medgen", "common", "config", "eval", "Generation"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                          str(tmp_path / "wheel"), str(src)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    names = zipfile.ZipFile(next((tmp_path / "wheel").glob("medgen-*.whl"))).namelist()
    assert {n.split("/")[0] for n in names} == {"medgen", next(n.split("/")[0] for n in names if ".dist-info" in n)}
    assert "medgen/config/tiny.yaml" in names and "medgen/Generation/TrainGen/core/trainer.py" in names


def test_medgen_subcommands_are_the_scripts(capsys):
    from medgen.cli import COMMANDS, main
    assert main(["--help"]) == 0
    shown = capsys.readouterr().out
    assert all(name in shown for name in COMMANDS)
    assert main(["no-such-command"]) == 2
    with pytest.raises(SystemExit) as stop:
        main(["train", "--help"])
    assert stop.value.code == 0 and "usage: medgen train" in capsys.readouterr().out


HELP_WITHOUT_TORCH = """
import contextlib, importlib, io, sys
from medgen.cli import COMMANDS
for name, (module, _) in COMMANDS.items():
    with contextlib.redirect_stdout(io.StringIO()) as shown, contextlib.suppress(SystemExit):
        importlib.import_module(module).main(["--help"])
    assert "usage: " in shown.getvalue(), name
    heavy = [m for m in ("torch", "monai") if m in sys.modules]
    assert not heavy, (name, heavy)
print("ok", len(COMMANDS))
"""


def test_every_command_help_runs_without_importing_torch():
    """`medgen <job> --help` answers in a fraction of a second: nothing on the way to the parser imports torch
    (its import alone takes seconds), and the --mode / --strategy names it lists are the registries'."""
    res = subprocess.run([sys.executable, "-c", HELP_WITHOUT_TORCH], capture_output=True, text=True, cwd=ROOT,
                         timeout=60)
    assert res.returncode == 0 and res.stdout.startswith("ok"), res.stderr[-2000:]
    from medgen.Generation.TrainGen.core.cli import BUILTIN_NAMES, registered_names
    from medgen.Generation.TrainGen.core.modes import MODES
    from medgen.Generation.TrainGen.core.strategies import STRATEGIES
    builtin = {k: v for k, v in MODES.items() if v.__module__.startswith("medgen.")}
    assert BUILTIN_NAMES["mode"] == tuple(builtin) and registered_names("mode") == tuple(MODES)
    assert BUILTIN_NAMES["strategy"] == tuple(k for k, v in STRATEGIES.items() if v.__module__.startswith("medgen."))


# ---------------------------------------------------------------- the Python API
def same_folders(a: Path, b: Path) -> list[str]:
    """Files that differ or exist on one side only (the lock files of a finished job are gone on both)."""
    def walk(c):
        bad = c.diff_files + c.left_only + c.right_only + c.funny_files
        return bad + [x for sub in c.subdirs.values() for x in walk(sub)]
    return walk(filecmp.dircmp(a, b, ignore=[]))


def test_api_samples_and_files_equal_generate_py(tiny_models, demo_root, tmp_path):
    pipe = medgen.load(tiny_models["bravo"])
    assert pipe.needs == "mask" and pipe.shape == (32, 32)
    out = pipe.sample(masks=demo_root / "brain" / "test", seed=3, batch_size=4)
    assert set(out.images) == {"seg", "bravo"} and out.images["bravo"].shape[1:] == (1, 32, 32)
    assert 0 <= float(out.images["bravo"].min()) and float(out.images["bravo"].max()) <= 1
    out.save(tmp_path / "api")
    res = run_script("Generation/TrainGen/generate.py", "--image_model", str(tiny_models["bravo"]), "--masks_from",
                     str(demo_root / "brain" / "test"), "--seed", "3", "--output_dir", str(tmp_path / "cli"))
    assert res.returncode == 0, res.stderr
    assert same_folders(tmp_path / "api", tmp_path / "cli") == []      # byte for byte, manifest and previews too
    again = pipe.sample(masks=demo_root / "brain" / "test", seed=3, batch_size=7)   # any batch size
    assert torch.equal(again.images["bravo"], out.images["bravo"])
    # masks as a tensor: the same images as the same masks from the folder
    arr = pipe.sample(masks=out.images["seg"], seed=3)
    assert torch.equal(arr.images["bravo"], out.images["bravo"])


def test_api_class_labels_equal_generate_py_class_counts(tiny_models, tmp_path):
    pipe = medgen.load(tiny_models["class"])
    out = pipe.sample(labels=["melanoma"] * 3 + ["nevus"] * 2, guidance=2.0, seed=1)
    out.save(tmp_path / "api")
    res = run_script("Generation/TrainGen/generate.py", "--image_model", str(tiny_models["class"]), "--class_counts",
                     "melanoma=3,nevus=2", "--guidance_scale", "2.0", "--seed", "1", "--output_dir",
                     str(tmp_path / "cli"))
    assert res.returncode == 0, res.stderr
    assert same_folders(tmp_path / "api", tmp_path / "cli") == []
    assert [r["class"] for r in out.rows] == ["melanoma"] * 3 + ["nevus"] * 2
    counted = pipe.sample(labels={"melanoma": 3, "nevus": 2}, guidance=2.0, seed=1)      # as --class_counts
    assert torch.equal(counted.images["image"], out.images["image"])
    for labels, message in (({"melanoma": 2.5}, "whole numbers"), ({"melanoma": 0}, "every count is 0"),
                            (3, "not int")):
        with pytest.raises(UserError, match=message):
            pipe.sample(labels=labels)


def test_api_chains_a_seg_model_and_refuses_what_does_not_fit(tiny_models):
    seg, bravo = medgen.load(tiny_models["seg"]), medgen.load(tiny_models["bravo"])
    chained = bravo.sample(3, masks=seg, seed=0, sampler="ddim", steps=3, mask_filter=False)   # an untrained seg model
    assert chained.images["seg"].shape == (3, 1, 32, 32) and set(chained.images["seg"].unique().tolist()) <= {0., 1.}
    assert chained.rows[0]["condition"].startswith("generated:seg_seed=")
    masks = seg.sample(2, seed=0, mask_filter=False)
    assert set(masks.images) == {"seg"}
    for call, message in [(lambda: bravo.sample(masks=torch.zeros(2, 1, 16, 16)), "masks= has shape"),
                          (lambda: bravo.sample(2, labels=["a"]), "labels= does not apply"),
                          (lambda: bravo.sample(masks=torch.full((1, 1, 32, 32), 2.0)), r"in \[0, 1\]"),
                          (lambda: medgen.load(tiny_models["class"]).sample(labels=["dog"]), "unknown class 'dog'"),
                          (lambda: bravo.sample(masks=bravo), "does not make masks"),
                          (lambda: seg.sample(2, guidance=3.0), "guidance= applies")]:
        with pytest.raises(UserError, match=message):
            call()


def test_api_train_returns_the_run_folder(demo_root, tmp_path):
    run = medgen.train(["tiny", {"optim.max_steps": 2, "runtime": {"val_interval": 100}}], mode="seg",
                       data_dir=str(demo_root / "brain"), run_dir=str(tmp_path / "run"), positive_only=True)
    assert run == tmp_path / "run" and (run / "best.pt").is_file()
    with pytest.raises(UserError, match="unknown flag 'epoch'"):
        medgen.train("tiny", epoch=3)


# ---------------------------------------------------------------- export
def test_export_loads_back_everywhere_with_identical_samples(tiny_models, demo_root, tmp_path):
    from medgen.Generation.TrainGen.core.generation.models import load_model
    from medgen.Generation.TrainGen.core.pretrained import load_init_weights
    out = medgen.export(tiny_models["bravo"], tmp_path / "export", license="CC-BY-4.0")
    assert sorted(p.name for p in out.iterdir()) == ["MODEL_CARD.md", "config.json", "model.safetensors",
                                                     "scheduler_config.json"]
    info = json.loads((out / "config.json").read_text())
    assert info["data_contract"]["generated"] == ["bravo"] and info["data_contract"]["conditioning"] == ["seg"]
    masks = info["data_contract"]["mask_labels"]
    assert masks["vocabulary"]["name"] == "binary" and masks["binary_from"] == [1, 4] and info["license"] == "CC-BY-4.0"
    card = (out / "MODEL_CARD.md").read_text()
    assert "6 train, 2 val subjects" in card and "CC-BY-4.0" in card and sha256_of(out / "model.safetensors") in card
    assert not any(name in card for name in os.listdir(demo_root / "brain" / "train"))   # no subject names
    masks = demo_root / "brain" / "test"
    want = medgen.load(tiny_models["bravo"]).sample(masks=masks, seed=5).images["bravo"]
    assert torch.equal(medgen.load(out).sample(masks=masks, seed=5).images["bravo"], want)
    res = run_script("Generation/TrainGen/generate.py", "--image_model", str(out), "--masks_from", str(masks),
                     "--seed", "5", "--output_dir", str(tmp_path / "gen"))
    assert res.returncode == 0, res.stderr
    from medgen.Generation.TrainGen.core.generation.writers import read_rows, read_sample
    got = np.stack([read_sample(tmp_path / "gen", r)["bravo"] for r in read_rows(tmp_path / "gen")])
    assert np.abs(got - want.numpy()).max() <= 0.5 / 255 + 1e-6 or np.allclose(got, want.numpy(), atol=1e-6)
    run_model = load_model(tiny_models["bravo"], "-", "cpu", None, None, None)
    fresh = load_model(out, "-", "cpu", None, None, None).net.net          # a network to load into
    torch.nn.init.zeros_(next(fresh.parameters()))
    notes = load_init_weights(fresh, run_model.mode, str(out), run_model.meta)   # train.py --init_from EXPORT
    assert notes[-1].startswith("initialised weights from")
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), run_model.net.net.state_dict().values()))
    with pytest.raises(UserError, match="exists and is not (empty|a folder)"):
        medgen.export(tiny_models["bravo"], out)


def test_rflow_export_writes_the_flow_scheduler_with_its_shift(tiny_models, tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler
    state = torch.load(tiny_models["bravo_rflow"] / "best.pt", weights_only=True)
    state["config"]["strategy"]["rflow"]["shift"] = 3.0                   # the same weights, sampled with a shift
    torch.save(state, tmp_path / "shifted.pt")
    out = medgen.export(tmp_path / "shifted.pt", tmp_path / "export")
    config = json.loads((out / "scheduler_config.json").read_text())
    sched = FlowMatchEulerDiscreteScheduler.from_config(config)
    sched.set_timesteps(sigmas=np.linspace(1, 0, 7)[:-1])                # as config.json's scheduler_note says
    model = medgen.load(out).model
    assert model.strategy.shift != 1.0 and config["shift"] == model.strategy.shift
    grid = [t for t, _ in model.strategy.timesteps(6, "euler")] + [0.0]
    assert np.allclose(sched.sigmas.numpy(), grid, atol=1e-6)


@pytest.fixture(scope="module")
def diffusers_run(demo_root, tmp_path_factory):
    """An unconditional (seg) DDPM run on the diffusers backend with a 50-step schedule, trained 4 steps."""
    from medgen.Generation.TrainGen.core.run import train
    from tests.test_training import tiny_cfg
    root = tmp_path_factory.mktemp("diffusers_run")
    train(tiny_cfg(demo_root, root, "seg", "ddpm", optim={"max_steps": 4}, runtime={"val_interval": 100},
                   model={"backend": "diffusers"}, strategy={"num_timesteps": 50}))
    return root / "run"


def test_diffusers_export_samples_the_same_images_in_a_ddpm_pipeline(diffusers_run, tmp_path):
    from diffusers import DDPMPipeline, UNet2DModel
    from medgen.Generation.TrainGen.core.generate import Job, draw
    from medgen.Generation.TrainGen.core.generation.writers import MASK_STREAM, sample_seed
    out = medgen.export(diffusers_run, tmp_path / "export")
    assert UNet2DModel.from_pretrained(out / "unet").config.sample_size == 32
    pipe = DDPMPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    seeds = [sample_seed(0, i, MASK_STREAM) for i in range(3)]
    theirs = pipe(batch_size=3, generator=[torch.Generator().manual_seed(s) for s in seeds], num_inference_steps=50,
                  output_type="np").images                                       # (B, H, W, 1) in [0, 1]
    ours = medgen.load(out, sampler="ddpm", steps=50).model
    x = draw(Job(mode="seg", output_dir=tmp_path, num_images=3, batch_size=3, seg_model=ours), ours, seeds, {})
    mine = ((x + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert np.abs(mine - theirs).max() < 1e-4 and theirs.std() > 0.05      # diffusers keeps its schedule in float32


# ---------------------------------------------------------------- fetch-weights
@contextlib.contextmanager
def serving(files: dict[str, tuple[bytes, int | None]]):
    """An HTTP server on 127.0.0.1 serving path -> (body, declared Content-Length or None for the true one)."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path not in files:
                self.send_error(404)
                return
            body, length = files[self.path]
            self.send_response(200)
            self.send_header("Content-Length", str(length if length is not None else len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def torch_file(path: Path) -> bytes:
    torch.save({"conv1.weight": torch.randn(4, 3, 3, 3)}, path)
    return path.read_bytes()


def test_fetch_weights_downloads_checks_and_records(tmp_path, monkeypatch):
    from medgen.weights import fetch_weights, main
    monkeypatch.setenv("MEDGEN_WEIGHTS", str(tmp_path / "weights"))
    body = torch_file(tmp_path / "w.pt")
    html = b"<!DOCTYPE html><html><body>Google Drive can't scan this file for viruses</body></html>"
    with serving({"/w.pt": (body, None), "/short.pt": (body[:100], len(body)), "/page": (html, None)}) as url:
        # no published digest (RadImageNet): downloaded where the tools look, the digest recorded beside it
        assert main(["radimagenet", "--url", f"{url}/w.pt"]) == 0
        target = tmp_path / "weights" / RADIMAGENET_FILE
        digest = sha256_of(target)
        assert resolve_weights(None, RADIMAGENET_FILE, "x", "y", "z") == (target, digest)
        assert (tmp_path / "weights" / f"{RADIMAGENET_FILE}.sha256").read_text().split()[0] == digest
        for kind, link, sha, message in [
                ("lpips-vgg", "/w.pt", "0" * 64, "does not match the expected"),
                ("inception", "/w.pt", None, "does not start with 6726825d"),     # the published name's prefix
                ("lpips-alex", "/short.pt", None, "truncated"),
                ("lpips-alex", "/page", None, "a web page, not a weights file"),
                ("lpips-alex", "/missing.pt", None, "HTTP 404")]:
            with pytest.raises(UserError, match=message):
                fetch_weights(kind, url=url + link, sha256=sha, progress=False)
        assert sorted(p.name for p in (tmp_path / "weights").iterdir()) == [RADIMAGENET_FILE,
                                                                           f"{RADIMAGENET_FILE}.sha256"]
        # pinned: the right digest passes, and a file already there is checked, not fetched again
        assert fetch_weights("lpips-vgg", tmp_path / "other", f"{url}/w.pt", digest, progress=False).is_file()
        with pytest.raises(UserError, match="does not match"):
            fetch_weights("lpips-vgg", tmp_path / "other", sha256="f" * 64, progress=False)


def test_missing_weights_name_the_fetch_command(tmp_path, monkeypatch):
    from medgen.eval.obj_eval.core.networks import resolve_weights as eval_weights
    monkeypatch.setenv("MEDGEN_WEIGHTS", str(tmp_path))
    for kind, fetch in (("inception", "inception"), ("alex", "lpips-alex"), ("radimagenet", "radimagenet")):
        with pytest.raises(UserError, match=f"medgen fetch-weights {fetch}"):
            eval_weights(kind)


def test_a_latent_export_carries_its_autoencoder(demo_root, tmp_path):
    data = str(demo_root / "brain")
    ae = medgen.train(["tiny", {"optim.max_steps": 2}], stage="autoencoder", mode="bravo", data_dir=data,
                      run_dir=str(tmp_path / "ae"))
    run = medgen.train(["tiny", {"optim.max_steps": 2, "runtime.val_interval": 100}], mode="bravo",
                       strategy="rflow", latent=str(ae), data_dir=data, run_dir=str(tmp_path / "latent"))
    out = medgen.export(run, tmp_path / "export")
    assert (out / "autoencoder" / "model.safetensors").is_file()
    masks = demo_root / "brain" / "test"
    want = medgen.load(run).sample(masks=masks, seed=0).images["bravo"]
    shutil.rmtree(ae)                                   # the export decodes without the original autoencoder run
    assert torch.equal(medgen.load(out).sample(masks=masks, seed=0).images["bravo"], want)
