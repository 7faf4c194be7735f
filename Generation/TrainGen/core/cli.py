"""The original research flags, each mapped onto exactly one config field, plus --config and --set."""
from __future__ import annotations

import argparse

from medgen.Generation.TrainGen.core.config import Config, build_config, load_yaml, parse_set
from medgen.common.cli import add_flag
from medgen.common.errors import UserError

# flag -> (config field, type); `None` type means a store_true flag that sets the given value
TRAIN_FLAGS = {
    "mode": ("mode.name", str), "strategy": ("strategy.name", str), "epochs": ("optim.epochs", int),
    "val_interval": ("runtime.val_interval", int), "batch_size": ("optim.batch_size", "int_or_auto"),
    "image_size": ("data.image_size", int), "compute": ("paths.compute", str),
    "num_timesteps": ("strategy.num_timesteps", int), "warmup_epochs": ("optim.warmup_epochs", int),
    "data_dir": ("data.data_dir", str), "run_dir": ("paths.run_dir", str), "seed": ("runtime.seed", int),
    "max_steps": ("optim.max_steps", int), "resume": ("runtime.resume", str), "run_name": ("paths.run_name", str),
    "init_from": ("runtime.init_from", str), "lr": ("optim.lr", float),
    "control_from": ("runtime.control_from", str),
    "spatial_dims": ("data.spatial_dims", int), "stage": ("runtime.stage", str), "latent": ("latent.autoencoder", str),
}
SWITCHES = {
    "multi_gpu": ("runtime.multi_gpu", True), "find_lr": ("optim.find_lr", True), "no_ema": ("ema.enabled", False),
    "no_min_snr": ("optim.min_snr", False), "min_snr": ("optim.min_snr", True), "skip_bad": ("data.skip_bad", True), "compile": ("runtime.compile", True),
    "positive_only": ("data.positive_only", True), "no_compile": ("runtime.compile", False),
}


BUILTIN_NAMES = {"mode": ("seg", "bravo", "dual", "class", "segment", "image", "inpaint"),   # core/modes
                 "strategy": ("ddpm", "rflow")}                                           # core/strategies


def registered_names(kind: str) -> tuple[str, ...]:
    """The --mode / --strategy names: the registry's when it is loaded (a plugin added to it), else the built-in
    ones, so that `--help` runs without importing torch (tests/test_package.py checks that they agree)."""
    import sys
    module_name, registry = {"mode": ("modes", "MODES"), "strategy": ("strategies", "STRATEGIES")}[kind]
    module = sys.modules.get(f"medgen.Generation.TrainGen.core.{module_name}")
    return BUILTIN_NAMES[kind] if module is None else tuple(getattr(module, registry))


def field_help(field: str) -> str:
    """'-> section.key (default V; one of a, b)' from the config dataclasses, for the train.py flags."""
    import typing
    section, key = field.split(".")
    defaults = getattr(Config(), section)
    value = getattr(defaults, key)
    tp = typing.get_type_hints(type(defaults))[key]
    choices = typing.get_args(tp) if typing.get_origin(tp) is typing.Literal else ()
    if field in ("mode.name", "strategy.name"):
        choices = registered_names(field.split(".")[0])
    text = f"-> {field} (default {value})"
    return text[:-1] + f"; one of {', '.join(map(str, choices))})" if choices else text


def int_or_auto(text: str):
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {text!r}") from None


def add_config_flags(parser: argparse.ArgumentParser, flags=TRAIN_FLAGS, switches=SWITCHES) -> None:
    add_flag(parser, "config", action="append", default=[], metavar="FILE", help="YAML preset(s), applied in order")
    add_flag(parser, "set", action="append", default=[], metavar="KEY=VALUE",
             help="override any field, e.g. --set optim.lr=3e-4 (repeatable)")
    for name, (field, tp) in flags.items():
        add_flag(parser, name, type=int_or_auto if tp == "int_or_auto" else tp, default=None, help=field_help(field))
    for name, (field, value) in switches.items():
        add_flag(parser, name, action="store_true", help=f"-> {field}={value}")


def _nested(field: str, value) -> dict:
    out: dict = {}
    node = out
    keys = field.split(".")
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value
    return out


def config_from_args(args: argparse.Namespace, flags=TRAIN_FLAGS, switches=SWITCHES) -> Config:
    layers = [load_yaml(path) for path in args.config]
    layers += [parse_set(item) for item in args.set]
    layers += [_nested(field, getattr(args, name)) for name, (field, tp) in flags.items()
               if getattr(args, name) is not None and not (tp == "int_or_auto" and getattr(args, name) == "auto")]
    layers += [_nested("optim.auto_batch_size", True) for name, (_, tp) in flags.items()
               if tp == "int_or_auto" and getattr(args, name) == "auto"]
    given = [(name, field, value) for name, (field, value) in switches.items() if getattr(args, name)]
    for name, field, value in given:
        other = next((n for n, f, v in given if f == field and v != value), None)
        if other:
            raise UserError(f"--{name} and --{other} contradict each other (both set {field})")
    layers += [_nested(field, value) for _, field, value in given]
    return build_config(*layers)
