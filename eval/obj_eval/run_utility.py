"""Does synthetic data help a downstream model? The study is eval/obj_eval/utility/cli.py (its DOC is the help)."""
from __future__ import annotations

import sys
from pathlib import Path

if not __package__:   # run as a script path: the checkout's root holds the medgen package
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from medgen.common.errors import run_main  # noqa: E402
from medgen.eval.obj_eval.utility.cli import main  # noqa: E402

if __name__ == "__main__":
    run_main(main)
