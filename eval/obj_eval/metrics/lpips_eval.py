"""LPIPS (AlexNet v0.1 by default, VGG optional), torchvision-free.

    python eval/obj_eval/metrics/lpips_eval.py --mode quality   --synthetic-dir S --real-dir R   # pairs
    python eval/obj_eval/metrics/lpips_eval.py --mode diversity --synthetic-dir S --real-dir R   # among samples
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if not __package__:   # run as a script path: the checkout's root holds the medgen package
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from medgen.common.args import BIG, Int  # noqa: E402
from medgen.common.cli import HelpFormatter  # noqa: E402
from medgen.eval.obj_eval.core.cli import add_flag, add_input_flags, add_weight_flags, options, run  # noqa: E402
from medgen.common.errors import run_main  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False, formatter_class=HelpFormatter)
    add_input_flags(p, real_required=False)
    add_flag(p, "mode", default="quality", choices=("quality", "diversity"), help="quality: pairs; diversity: among samples")
    add_flag(p, "net", default="alex", choices=("alex", "vgg"), help="trunk (its torchvision weights file)")
    add_weight_flags(p, ("trunk",))
    add_flag(p, "max-pairs", type=Int(1, BIG), default=2000, help="diversity: pairs drawn at most")
    args = p.parse_args(argv)
    return run(options(args, "lpips", weights_kind=args.net, lpips_net=args.net, modes=(args.mode,),
                       max_pairs=args.max_pairs), strict=True)


if __name__ == "__main__":
    run_main(main)
