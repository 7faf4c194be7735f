"""MS-SSIM: quality (synthetic vs its paired real slice) or diversity (among synthetic samples; lower = more
diverse). The window and the number of scales fit the image size and are reported (7 px, 5 scales at 128).

    python eval/obj_eval/metrics/ms_ssim.py --mode diversity --synthetic-dir S [--real-dir R]
    python eval/obj_eval/metrics/ms_ssim.py --mode quality --synthetic-dir S --real-dir R
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if not __package__:   # run as a script path: the checkout's root holds the medgen package
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from medgen.common.args import BIG, Int, Real  # noqa: E402
from medgen.common.cli import HelpFormatter  # noqa: E402
from medgen.eval.obj_eval.core.cli import add_flag, add_input_flags, options, run  # noqa: E402
from medgen.common.errors import run_main  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False, formatter_class=HelpFormatter)
    add_input_flags(p, real_required=False)
    add_flag(p, "mode", default="quality", choices=("quality", "diversity"), help="quality: pairs; diversity: among samples")
    add_flag(p, "max-pairs", type=Int(1, BIG), default=2000, help="diversity: pairs drawn at most")
    add_flag(p, "data-range", type=Real(0, 1e6, low_open=True), default=1.0, help="value range of the images")
    args = p.parse_args(argv)
    return run(options(args, "ms_ssim", modes=(args.mode,), max_pairs=args.max_pairs, data_range=args.data_range),
               strict=True)


if __name__ == "__main__":
    run_main(main)
