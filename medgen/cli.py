"""`medgen COMMAND [FLAGS]`: one command for every job. Each subcommand is the script of the same job (its flags
and help are that script's), so `medgen train --mode bravo` and `python Generation/TrainGen/train.py --mode
bravo` are the same run."""
from __future__ import annotations

import importlib
import sys

from medgen.common.errors import run_main

# name -> (module with main(argv), one line of help)
COMMANDS = {
    "train": ("medgen.Generation.TrainGen.train", "train a diffusion model, or check a dataset (--check_data)"),
    "generate": ("medgen.Generation.TrainGen.generate", "build a synthetic dataset from trained models"),
    "evaluate": ("medgen.eval.obj_eval.run_evaluation", "FID, KID, LPIPS, MS-SSIM, MAE, PSNR of a synthetic set"),
    "utility": ("medgen.eval.obj_eval.utility.cli", "does synthetic data help a downstream model?"),
    "report": ("medgen.eval.obj_eval.generate_report", "tables and plots from saved evaluations"),
    "export": ("medgen.exports", "a run as safetensors + config.json + MODEL_CARD.md (and diffusers files)"),
    "fetch-weights": ("medgen.weights", "download the feature networks' weights (Inception, LPIPS, RadImageNet)"),
    "demo": ("medgen.Generation.TrainGen.demo", "build the embedded demo dataset and its preview"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    return ("usage: medgen COMMAND [FLAGS]   (medgen COMMAND --help for its flags)\n\ncommands:\n"
            + "\n".join(f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    sys.argv = [f"medgen {name}", *rest]       # the subcommand's usage lines say `medgen NAME`
    run_main(lambda: module.main(rest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
