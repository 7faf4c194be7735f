"""Hostile input found without being told where: every numeric flag of every command and every parameter of
every public API function gets wrong types and out-of-range values, and every writer meets a folder holding a
user's own file and a folder inside an input. New flags and parameters are covered the day they are added."""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os

import pytest
import torch

import medgen
from medgen.cli import COMMANDS
from medgen.common.args import Arg, Int, validated
from medgen.common.errors import UserError
from tests.conftest import run_script

BAD_NUMBERS = ["nan", "inf", "-inf", "1e30", "-1e30", "abc", ""]
GENERATE = "Generation/TrainGen/generate.py"


class _Parser(Exception):
    pass


def parser_of(module_name: str) -> argparse.ArgumentParser:
    """The parser a command's main() builds, caught before it parses anything."""
    module = importlib.import_module(module_name)
    original = argparse.ArgumentParser.parse_args

    def catch(self, *args, **kwargs):
        raise _Parser(self)
    argparse.ArgumentParser.parse_args = catch
    try:
        module.main([])
    except _Parser as caught:
        return caught.args[0]
    finally:
        argparse.ArgumentParser.parse_args = original
    raise AssertionError(f"{module_name}.main did not build a parser")


def unchecked_numeric_flags(parser: argparse.ArgumentParser) -> list[str]:
    """Flags whose values are numbers but whose type is not an Arg of the shared layer, or that accept one of
    BAD_NUMBERS (unbounded, NaN, text)."""
    bad = []
    for action in parser._actions:
        if action.type in (int, float):
            bad.append(f"{action.option_strings[0]} (type={action.type.__name__}, no range)")
        elif isinstance(action.type, Arg):
            for text in BAD_NUMBERS:
                try:
                    action.type(text)
                except argparse.ArgumentTypeError:
                    continue
                bad.append(f"{action.option_strings[0]} accepts {text!r}")
    return bad


def unchecked_config_flags(flags: dict) -> list[str]:
    """train.py's research flags map onto config fields (core/cli.py), whose types and ranges the config layer
    checks: each numeric one must refuse every one of BAD_NUMBERS, by argparse or by the config layer."""
    import contextlib
    import io
    from medgen.Generation.TrainGen.core.cli import add_config_flags, config_from_args
    parser = argparse.ArgumentParser()
    add_config_flags(parser, flags)
    bad = []
    for action in parser._actions:
        if action.type not in (int, float) and getattr(action.type, "__name__", "") != "int_or_auto":
            continue
        for text in BAD_NUMBERS + ["-1", str(10**20)]:     # integers out of every field's range, too
            try:
                with contextlib.redirect_stderr(io.StringIO()):
                    args = parser.parse_args([action.option_strings[0], text])
            except SystemExit:
                continue
            try:
                config_from_args(args, flags)
            except UserError:
                continue
            bad.append(f"{action.option_strings[0]} accepts {text!r}")
    return bad


CONFIG_MAPPED = {"train"}


@pytest.mark.parametrize("command", sorted(set(COMMANDS) - CONFIG_MAPPED))
def test_every_numeric_flag_is_bounded_by_the_argument_layer(command):
    assert unchecked_numeric_flags(parser_of(COMMANDS[command][0])) == []


def test_every_numeric_train_flag_is_bounded_by_the_config_layer():
    from medgen.Generation.TrainGen.core.cli import TRAIN_FLAGS
    assert unchecked_config_flags(TRAIN_FLAGS) == []
    planted = {**TRAIN_FLAGS, "planted": ("ema.update_every", int)}      # a config field nothing bounds
    assert unchecked_config_flags(planted) == ["--planted accepts '-1'", f"--planted accepts '{10**20}'"]


def test_the_flag_check_fails_on_a_planted_unchecked_flag():
    p = argparse.ArgumentParser()
    p.add_argument("--planted", type=int)
    p.add_argument("--bounded", type=Int(1, 10))
    assert unchecked_numeric_flags(p) == ["--planted (type=int, no range)"]


def test_a_bad_flag_value_is_one_line_naming_the_flag():
    res = run_script(GENERATE, "--output_dir", "x", "--num_images", "1e30")
    assert res.returncode == 2 and "argument --num_images/--num-images: expected an integer" in res.stderr
    assert "Traceback" not in res.stderr


# ---- the Python API: every parameter, by its annotation -----------------------------------------------------

def public_functions(pipe, samples):
    return {"load": medgen.load, "Pipeline.sample": pipe.sample, "Samples.save": samples.save,
            "train": medgen.train, "evaluate": medgen.evaluate, "utility": medgen.utility,
            "export": medgen.export, "fetch_weights": medgen.fetch_weights}


def test_every_api_parameter_is_checked(tiny_models):
    pipe = medgen.load(tiny_models["seg"], steps=1)
    samples = pipe.sample(1, mask_filter=False)
    for name, fn in public_functions(pipe, samples).items():
        assert not unchecked_parameters(fn), (name, unchecked_parameters(fn))


def unchecked_parameters(fn) -> list[str]:
    specs, inside = getattr(fn, "__arg_specs__", None), getattr(fn, "__checked_inside__", ())
    if specs is None:
        return ["(not @validated)"]
    return [p for p in inspect.signature(fn).parameters if p != "self" and p not in specs and p not in inside]


def test_the_parameter_check_fails_on_a_planted_parameter():
    @validated(n=Int(1, 10))
    def planted(n: int, planted: int = 0):
        return n
    assert unchecked_parameters(planted) == ["planted"]
    assert unchecked_parameters(lambda x: x) == ["(not @validated)"]


WRONG = {int: [2.5, "3", True, None, [], float("nan")], float: ["1", None, [], float("nan"), float("inf")],
         bool: [1, "yes", None], str: [3, None, b"x"]}
OUT_OF_RANGE = {int: [-1, 2**70], float: [-1.0, 1e30]}


def hostile_values(spec: Arg, annotation):
    base = next((t for t in (bool, int, float, str) if t.__name__ in str(annotation)), None)
    values = list(WRONG.get(base, [])) + list(OUT_OF_RANGE.get(base, []))
    return [v for v in values if not (v is None and spec.optional)]


def test_wrong_types_and_ranges_are_one_user_error_naming_the_parameter(tiny_models, tmp_path):
    pipe = medgen.load(tiny_models["seg"], steps=1)
    samples = pipe.sample(1, mask_filter=False)
    valid = {"Pipeline.sample": dict(n=1, mask_filter=False), "load": dict(path=str(tiny_models["seg"])),
             "Samples.save": {}, "fetch_weights": dict(kind="radimagenet", dest=str(tmp_path / "w"))}
    tried = 0
    for name, fn in public_functions(pipe, samples).items():
        if name not in valid:
            continue
        params = inspect.signature(fn).parameters
        for pname, spec in fn.__arg_specs__.items():
            for value in hostile_values(spec, params[pname].annotation):
                with pytest.raises(UserError, match=f"^{pname}=") as err:
                    fn(**{**valid[name], pname: value})
                assert "\n" not in str(err.value)
                tried += 1
    assert tried > 60


def test_api_cases_of_the_review(tiny_models, tmp_path):
    seg = medgen.load(tiny_models["seg"], steps=1)
    bravo = medgen.load(tiny_models["bravo"], steps=1)
    for call, match in ((lambda: seg.sample(-1), "^n="), (lambda: seg.sample(0), "^n="),
                        (lambda: seg.sample(2, seed="abc"), "^seed="), (lambda: seg.sample(2, steps="10"), "^steps="),
                        (lambda: medgen.load(tiny_models["seg"], steps=-3), "^steps="),
                        (lambda: bravo.sample(masks=torch.zeros(0, 1, 32, 32)), "no masks"),
                        (lambda: bravo.sample(masks=torch.full((2, 1, 32, 32), 0.4)), "soft masks")):
        with pytest.raises(UserError, match=match):
            call()


# ---- writers: a user's own file, and a folder inside an input ----------------------------------------------

def test_writers_keep_a_users_file_and_refuse_a_folder_inside_an_input(tiny_models, demo_root, tmp_path):
    mine = tmp_path / "mine"
    (mine / "sample_000000").mkdir(parents=True)
    (mine / "sample_000000" / "seg.nii.gz").write_bytes(b"my own file")
    samples = medgen.load(tiny_models["seg"], steps=1).sample(2, mask_filter=False)
    with pytest.raises(UserError, match="holds sample_000000, which medgen did not make"):
        samples.save(mine)
    assert (mine / "sample_000000" / "seg.nii.gz").read_bytes() == b"my own file"
    with pytest.raises(UserError, match="exists and is not a folder"):
        samples.save(mine / "sample_000000" / "seg.nii.gz")
    with pytest.raises(UserError, match="is a file, not a folder"):
        samples.save(mine / "sample_000000" / "seg.nii.gz" / "sub")

    data = demo_root / "brain" / "test"
    before = sorted((p.relative_to(data), p.stat().st_size) for p in data.rglob("*"))
    res = run_script(GENERATE, "--image_model", str(tiny_models["bravo"]), "--masks_from", str(data),
                     "--num_images", "2", "--num_steps", "1", "--output_dir", str(data / "synth"))
    assert res.returncode == 2 and "lies inside --masks_from" in res.stderr
    res = run_script(GENERATE, "--image_model", str(tiny_models["bravo"]), "--masks_from", str(data),
                     "--num_images", "2", "--num_steps", "1", "--output_dir", str(demo_root / "brain"))
    assert res.returncode == 2 and "holds --masks_from" in res.stderr
    assert sorted((p.relative_to(data), p.stat().st_size) for p in data.rglob("*")) == before

    user = tmp_path / "userdir"
    (user / "results").mkdir(parents=True)
    (user / "results" / "thesis.csv").write_text("precious")
    res = run_script("Generation/TrainGen/demo.py", "--out", str(user), "--subjects", "2", "--test_subjects", "0",
                     "--shape", "16", "16", "16")
    assert res.returncode == 2 and "which medgen did not make" in res.stderr
    assert (user / "results" / "thesis.csv").read_text() == "precious"


def test_a_planted_symlink_keeps_every_write_inside_the_output(tiny_models, demo_root, tmp_path):
    out, target = tmp_path / "esc", tmp_path / "escape_target"
    out.mkdir()
    target.mkdir()
    os.symlink(target, out / ".rows")
    res = run_script(GENERATE, "--image_model", str(tiny_models["bravo"]), "--masks_from",
                     str(demo_root / "brain" / "test"), "--num_images", "2", "--num_steps", "1", "--output_dir", str(out))
    assert res.returncode == 2 and "symbolic link" in res.stderr or "did not make" in res.stderr
    assert list(target.iterdir()) == []


def test_damaged_locks_are_one_line_or_taken_over(tiny_models, demo_root, tmp_path):
    from medgen.common.locks import acquire, release
    for content, old in (("[1, 2]", True), ("garbage", True), ("null", True), ("[1, 2]", False)):
        folder = tmp_path / f"l{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        (folder / ".lock").write_text(content)
        if old:
            os.utime(folder / ".lock", (0, 0))
            release(acquire(folder, "--output_dir"))          # older than a minute: stale, taken over
        else:
            with pytest.raises(UserError, match="being written or is damaged"):
                acquire(folder, "--output_dir")


def test_an_edited_export_config_is_refused_naming_the_field(tiny_models, tmp_path):
    out = medgen.export(tiny_models["bravo"], tmp_path / "e")
    info = json.loads((out / "config.json").read_text())
    for edit, match in ((lambda i: i["config"]["strategy"].update(name="rflow" if i["strategy"] == "ddpm" else "ddpm"),
                         "'strategy' is"),
                        (lambda i: i["config"]["data"].update(image_size=64), "SHA-256 recorded"),
                        (lambda i: i["meta"].update(mode="seg"), "'mode' is")):
        changed = json.loads(json.dumps(info))
        edit(changed)
        (out / "config.json").write_text(json.dumps(changed))
        with pytest.raises(UserError, match=match):
            medgen.load(out)
    (out / "config.json").write_text(json.dumps(info))
    assert medgen.load(out, steps=1).sample(masks=torch.ones(1, 1, 32, 32)).images["bravo"].shape == (1, 1, 32, 32)
