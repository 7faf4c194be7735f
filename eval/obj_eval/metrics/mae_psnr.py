"""MAE and PSNR on pairs (synthetic sample vs the real slice it was conditioned on, or the same sample id).

    python eval/obj_eval/metrics/mae_psnr.py --synthetic-dir S --real-dir R --data-range 1.0
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if not __package__:   # run as a script path: the checkout's root holds the medgen package
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from medgen.common.args import Real  # noqa: E402
from medgen.common.cli import HelpFormatter  # noqa: E402
from medgen.eval.obj_eval.core.cli import add_flag, add_input_flags, options, run  # noqa: E402
from medgen.common.errors import run_main  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False, formatter_class=HelpFormatter)
    add_input_flags(p)
    add_flag(p, "data-range", type=Real(0, 1e6, low_open=True), default=1.0, help="value range of the images (1.0 for [0, 1])")
    args = p.parse_args(argv)
    return run(options(args, "mae,psnr", modes=("quality",), data_range=args.data_range), strict=True)


if __name__ == "__main__":
    run_main(main)
