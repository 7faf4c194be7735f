import argparse

import pytest
import yaml

from medgen.Generation.TrainGen.core.cli import TRAIN_FLAGS, add_config_flags, config_from_args
from medgen.Generation.TrainGen.core.config import Config, build_config, load_yaml, save_config
from medgen.common.errors import UserError
from medgen.config.paths import REPO_ROOT, PathConfig


def parse(*argv):
    p = argparse.ArgumentParser()
    add_config_flags(p)
    return config_from_args(p.parse_args(list(argv)))


def test_defaults_are_valid():
    cfg = build_config()
    assert cfg.strategy.num_timesteps == 1000 and cfg.optim.min_snr_gamma == 5.0 and cfg.ema.enabled


def test_original_flags_map_onto_fields():
    cfg = parse("--mode", "dual", "--strategy", "rflow", "--epochs", "7", "--batch_size", "3", "--image_size", "64",
                "--num_timesteps", "50", "--warmup_epochs", "2", "--val_interval", "4", "--no_ema", "--no_min_snr",
                "--multi_gpu", "--find_lr", "--seed", "9", "--max_steps", "11")
    assert (cfg.mode.name, cfg.strategy.name, cfg.optim.epochs, cfg.optim.batch_size) == ("dual", "rflow", 7, 3)
    assert (cfg.data.image_size, cfg.strategy.num_timesteps, cfg.optim.warmup_epochs) == (64, 50, 2)
    assert cfg.runtime.val_interval == 4 and cfg.runtime.multi_gpu and cfg.optim.find_lr
    assert not cfg.ema.enabled and not cfg.optim.min_snr
    assert (cfg.runtime.seed, cfg.optim.max_steps) == (9, 11)


def test_dash_spelling_is_accepted():
    assert parse("--batch-size", "5", "--image-size", "32").optim.batch_size == 5


def test_precedence_file_then_set_then_flag(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("optim:\n  lr: 0.5\n  batch_size: 2\ndata:\n  image_size: 48\n")
    cfg = parse("--config", str(f), "--set", "optim.batch_size=4", "--set", "data.image_size=40",
                "--image_size", "32")
    assert cfg.optim.lr == 0.5 and cfg.optim.batch_size == 4 and cfg.data.image_size == 32


@pytest.mark.parametrize("item,message", [
    ("optim.lrr=1", "unknown config key 'optim.lrr'"),
    ("nosuch.x=1", "unknown config key 'nosuch'"),
    ("optim.epochs=abc", "optim.epochs must be int"),
    ("runtime.multi_gpu=3", "runtime.multi_gpu must be bool"),
    ("strategy.ddpm.schedule=quadratic", "strategy.ddpm.schedule must be one of linear, cosine"),
    ("data.image_size=4", "data.image_size must be at least 8"),
    ("optim", "--set expects section.key=value"),
])
def test_bad_values_are_clear_errors(item, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        parse("--set", item)


def test_saved_config_round_trips(tmp_path):
    cfg = parse("--mode", "seg", "--set", "data.modalities={seg: '*_m'}", "--set", "data.layout=custom")
    save_config(cfg, tmp_path / "config.yaml")
    again = build_config(load_yaml(tmp_path / "config.yaml"))
    assert again == cfg and isinstance(again, Config)


@pytest.mark.parametrize("preset", sorted((REPO_ROOT / "config").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_presets_load(preset):
    build_config(yaml.safe_load(preset.read_text()) or {})


def test_every_flag_has_a_field():
    cfg = build_config()
    for name, (field, _) in TRAIN_FLAGS.items():
        section, key = field.split(".")
        assert hasattr(getattr(cfg, section), key), name


def test_paths_local_and_cluster(tmp_path):
    local = PathConfig.from_compute("local", {"MEDGEN_CACHE": str(tmp_path)})
    assert local.data_root == tmp_path / "demo" / "brain"
    with pytest.raises(UserError, match="MEDGEN_DATA_ROOT"):
        PathConfig.from_compute("cluster", {})
    cl = PathConfig.from_compute("cluster", {"MEDGEN_DATA_ROOT": "/d", "MEDGEN_OUTPUT_ROOT": "/o"})
    assert str(cl.data_root) == "/d" and str(cl.cache_root) == "/o/.cache"
    with pytest.raises(UserError, match="--compute"):
        PathConfig.from_compute("laptop", {})


def test_min_snr_switches():
    assert parse().optim.min_snr is None                 # the strategy decides
    assert parse("--min_snr").optim.min_snr is True and parse("--no_min_snr").optim.min_snr is False
    with pytest.raises(UserError, match="--no_min_snr and --min_snr contradict"):
        parse("--no_min_snr", "--min_snr")


def test_component_options_live_in_their_section_and_old_keys_still_work(capsys):
    cfg = build_config({"strategy": {"prediction": "v", "time_sampling": "logit-normal"},
                        "mode": {"ensemble": 3, "guidance_scale": 2.0}})
    assert cfg.strategy.ddpm.prediction == "v" and cfg.strategy.rflow.time_sampling == "logit-normal"
    assert cfg.mode.segment.ensemble == 3 and cfg.mode.labels.guidance_scale == 2.0
    assert "strategy.prediction is now strategy.ddpm.prediction" in capsys.readouterr().err
    both = build_config({"mode": {"ensemble": 3, "segment": {"ensemble": 5}}})
    assert both.mode.segment.ensemble == 5                      # the new key wins
    later = build_config({"mode": {"ensemble": 3}}, {"mode": {"segment": {"ensemble": 7}}})
    assert later.mode.segment.ensemble == 7                     # and later layers still win
    with pytest.raises(UserError, match="strategy.ddpm.schedule must be one of"):
        build_config({"strategy": {"schedule": "quadratic"}})


def test_checkpoints_with_the_old_keys_resume_and_load_silently(demo_root, tmp_path, capsys):
    """A run saved before the options moved into their sections still resumes (its fixed sections compare
    equal once read with today's keys) and loads for generation, with no notes about keys the user cannot
    change."""
    import torch
    from medgen.Generation.TrainGen.core.checkpoint import list_checkpoints
    from medgen.Generation.TrainGen.core.generation.models import load_model
    from medgen.Generation.TrainGen.core.run import train
    from tests.test_training import tiny_cfg
    cfg = tiny_cfg(demo_root, tmp_path, "bravo", "ddpm", optim={"max_steps": 2, "epochs": 1},
                   runtime={"val_interval": 100})
    assert train(cfg) == 0
    ckpt = list_checkpoints(tmp_path / "run")[-1]
    state = torch.load(ckpt, weights_only=True)
    old = state["config"]
    ddpm, rflow = old["strategy"].pop("ddpm"), old["strategy"].pop("rflow")   # as before the sections existed:
    old["strategy"].update(prediction=ddpm["prediction"], schedule=ddpm["schedule"],  # these keys at the top,
                           time_sampling=rflow["time_sampling"])                      # the later ones absent
    old["mode"].update(old["mode"].pop("labels"))
    old["mode"].update(old["mode"].pop("segment"))
    torch.save(state, ckpt)
    capsys.readouterr()
    resumed = tiny_cfg(demo_root, tmp_path, "bravo", "ddpm", optim={"max_steps": 3, "epochs": 1},
                       runtime={"val_interval": 100, "resume": str(ckpt)})
    assert train(resumed) == 0
    model = load_model(ckpt, "--image_model", torch.device("cpu"), None, "ddim", 2)
    assert model.cfg.strategy.ddpm.prediction == "epsilon"
    assert "note: config key" not in capsys.readouterr().err
