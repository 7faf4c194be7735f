"""Train a diffusion model: a strategy (how to diffuse) x a mode (what to generate).

    python Generation/TrainGen/train.py --mode bravo --strategy rflow --epochs 500 --batch_size 16 --image_size 128
    python Generation/TrainGen/train.py --check_data --data_dir DIR       # scan a dataset and report problems
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if not __package__:   # run as a script path: the checkout's root holds the medgen package
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from medgen.common.cli import HelpFormatter, add_flag  # noqa: E402
from medgen.Generation.TrainGen.core.cli import add_config_flags, config_from_args  # noqa: E402
from medgen.common.errors import run_main  # noqa: E402
from medgen.Generation.TrainGen.core.plugins import load_plugins, plugin_paths  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    load_plugins(plugin_paths(argv))  # first, so that --mode/--strategy know the plugins' names
    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                     formatter_class=HelpFormatter)
    add_config_flags(parser)
    add_flag(parser, "check_data", action="store_true", help="scan the dataset in full, report problems, exit")
    add_flag(parser, "plugin", action="append", default=[], metavar="FILE.py",
             help="a Python file that registers strategies or modes (repeatable; see core/plugins.py)")
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    if args.check_data:
        from medgen.Generation.TrainGen.core.datasource import check_data
        return check_data(cfg, every_modality=args.mode is None)
    from medgen.Generation.TrainGen.core.run import train
    return train(cfg)


if __name__ == "__main__":
    run_main(main)
