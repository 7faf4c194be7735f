"""Evaluate a synthetic dataset against a real one: FID (Inception, RadImageNet), LPIPS, MS-SSIM, MAE, PSNR.

    python eval/obj_eval/run_evaluation.py --synthetic_dir synth/bravo --real_dir data/test --metrics all --positive-only
    python eval/obj_eval/run_evaluation.py --synthetic-dir S --real-dir R --metrics fid,lpips --output results/run1
    python eval/obj_eval/run_evaluation.py --synthetic-dir S --real-dir R/test --real-train-dir R \
        --metrics all,faithfulness,memorization,domain --preset tiny

Writes <output>/metrics.json (every value with its N, 95% CI and method), report.md and metrics.png /
samples.png. A metric whose weights are missing, or that needs pairs the data do not have, is reported as
unavailable with the reason.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if not __package__:   # run as a script path: the checkout's root holds the medgen package
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from medgen.common.args import BIG, Int, Real  # noqa: E402
from medgen.common.cli import HelpFormatter  # noqa: E402
from medgen.eval.obj_eval.core.cli import add_fid_flags, add_flag, add_input_flags, add_weight_flags, options, run  # noqa: E402
from medgen.common.errors import run_main  # noqa: E402
from medgen.eval.obj_eval.utility.cli import add_downstream_flags, downstream_options  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False, formatter_class=HelpFormatter)
    add_input_flags(p)
    add_flag(p, "metrics", default="all", help="all (= fid, lpips, ms_ssim, mae, psnr), or a comma list of those and "
                                               "faithfulness, memorization, domain (these train a downstream network "
                                               "on --real-train-dir)")
    add_flag(p, "real-train-dir", default=None, metavar="DIR",
             help="faithfulness/memorization/domain: the real training data, a dataset root (train/val[/test]) or "
                  "its train/ folder; memorization needs it (the generator's training set, where copies come "
                  "from); faithfulness and domain default to --real-dir")
    add_downstream_flags(p)
    add_fid_flags(p, many=True)
    add_weight_flags(p, ("inception", "radimagenet", "alex", "vgg"))
    add_flag(p, "lpips-net", default="alex", choices=("alex", "vgg"))
    add_flag(p, "max-pairs", type=Int(1, BIG), default=2000, help="diversity: pairs drawn at most")
    add_flag(p, "data-range", type=Real(0, 1e6, low_open=True), default=1.0, help="value range of the images (MAE/PSNR/MS-SSIM)")
    args = p.parse_args(argv)
    return run(options(args, args.metrics, lpips_net=args.lpips_net, max_pairs=args.max_pairs,
                       data_range=args.data_range, real_train_dir=args.real_train_dir,
                       downstream=downstream_options(args), split_seed=args.split_seed,
                       val_fraction=args.val_fraction), strict=False)


if __name__ == "__main__":
    run_main(main)
