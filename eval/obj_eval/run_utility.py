"""Does synthetic data help a downstream model? Train the same MONAI segmenter or classifier on real data, real
plus synthetic data (at several ratios), synthetic data alone and, for class data, real data balanced with
synthetic minority images; at several fractions of the real training data and several seeds; score every model
on the real test split only and compare each recipe with `real`, paired by seed and test subject.
Beside the study: mask faithfulness, a memorization audit and the Fréchet distance / precision-recall in the
downstream network's feature space (--audit).

    python eval/obj_eval/run_utility.py --real_dir data/brats --synthetic_dir synth/bravo \\
        --real_fraction 0.1,0.25,1 --synthetic_ratio 0.5,1,2 --seeds 3 --preset full --output results/utility

Writes <output>/utility.json (every number with N, seeds, CI and the recipe), utility.md (a verdict in words,
then tables) and PNGs; each trained model's scores go to <output>/results/ as it finishes, so a killed study
resumes where it stopped.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from medgen.common.errors import run_main  # noqa: E402
from medgen.eval.obj_eval.utility.cli import main  # noqa: E402

if __name__ == "__main__":
    run_main(lambda: main(doc=__doc__))
