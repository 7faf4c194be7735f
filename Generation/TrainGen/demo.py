"""Build the embedded demo dataset and write its preview.

    python Generation/TrainGen/demo.py [--out DIR] [--subjects 40] [--test_subjects 12] [--shape 64 64 48]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if not __package__:   # run as a script path: the checkout's root holds the medgen package
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from medgen.config.paths import PathConfig  # noqa: E402
from medgen.common.args import Int, SEED  # noqa: E402
from medgen.common.cli import HelpFormatter  # noqa: E402
from medgen.common.errors import UserError, run_main  # noqa: E402
from medgen.Generation.TrainGen.core.phantom import DEMO_TEST_SUBJECTS, ensure_demo_data  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="demo root (default: the local cache, as --compute local uses)")
    p.add_argument("--subjects", type=Int(2, 10_000), default=40, help="brain phantoms in train/ and val/")
    p.add_argument("--test_subjects", type=Int(0, 10_000), default=DEMO_TEST_SUBJECTS,
                   help="brain phantoms in test/ (12: 10 of them hold a tumour, the utility study's minimum)")
    p.add_argument("--shape", type=Int(16, 512), nargs=3, default=(64, 64, 48), metavar=("X", "Y", "Z"), help="volume size")
    p.add_argument("--seed", type=SEED, default=0)
    args = p.parse_args(argv)
    from medgen.Generation.TrainGen.core.preview import preview_brain, preview_lesions   # torch: not for --help
    if args.subjects < 2 or args.test_subjects < 0 or min(args.shape) < 16:
        raise UserError("--subjects must be at least 2, --test_subjects at least 0 and every --shape size at least 16")
    root = args.out or PathConfig.from_compute("local").demo_root
    ensure_demo_data(root, args.subjects, tuple(args.shape), args.seed, args.test_subjects)
    print(f"demo dataset: {root / 'brain'} (NIfTI, original layout), {root / 'lesions'} (class image folders)")
    print(f"preview: {preview_brain(root / 'brain', root / 'preview_brain.png')}")
    print(f"preview: {preview_lesions(root / 'lesions', root / 'preview_lesions.png')}")
    return 0


if __name__ == "__main__":
    run_main(main)
