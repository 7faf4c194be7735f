"""FID of a synthetic set against a real set (Inception-v3 FID weights or RadImageNet ResNet-50).

    python eval/obj_eval/metrics/fid.py --synthetic-dir S --real-dir R --image-type bravo [--feature-network radimagenet]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if not __package__:   # run as a script path: the checkout's root holds the medgen package
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from medgen.common.cli import HelpFormatter  # noqa: E402
from medgen.eval.obj_eval.core.cli import add_fid_flags, add_input_flags, add_weight_flags, options, run  # noqa: E402
from medgen.common.errors import UserError, run_main  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False, formatter_class=HelpFormatter)
    add_input_flags(p)
    add_fid_flags(p, many=False)
    add_weight_flags(p, ("network",))
    args = p.parse_args(argv)
    if "," in args.feature_network and args.weights:
        raise UserError("--weights names one file: give one --feature-network with it")
    return run(options(args, "fid", weights_kind=args.feature_network), strict=True)


if __name__ == "__main__":
    run_main(main)
