"""Turn evaluation results into a report: one metrics.json (or its folder) re-rendered as report.md and
metrics.png, or several compared side by side in one Markdown table.

    python eval/obj_eval/generate_report.py --results synth/bravo/eval [more results ...] [--output report.md]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if not __package__:   # run as a script path: the checkout's root holds the medgen package
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from medgen.common.cli import HelpFormatter  # noqa: E402
from medgen.eval.obj_eval.core.cli import add_flag  # noqa: E402
from medgen.common.errors import UserError, run_main  # noqa: E402
from medgen.common.fileio import atomic_write_text  # noqa: E402


def load(path: str) -> tuple[Path, dict]:
    p = Path(path)
    p = p / "metrics.json" if p.is_dir() else p
    if not p.is_file():
        raise UserError(f"--results {path}: no metrics.json there")
    try:
        return p, json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{p}: not valid JSON ({err.msg})") from None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False, formatter_class=HelpFormatter)
    add_flag(p, "results", nargs="+", required=True, help="metrics.json files or their folders")
    add_flag(p, "output", default=None, help="Markdown file (default: report.md beside the first results)")
    args = p.parse_args(argv)
    from tabulate import tabulate

    from medgen.eval.obj_eval.core.report import markdown, plot_metrics   # here: --help runs without torch
    loaded = [load(r) for r in args.results]
    out = Path(args.output) if args.output else loaded[0][0].parent / "report.md"
    if len(loaded) == 1:
        text = markdown(loaded[0][1])
        plot = plot_metrics(loaded[0][1], out.with_suffix(".png"))
    else:
        names = sorted({r["metric"] for _, res in loaded for r in res["metrics"]})
        table = []
        for name in names:
            row = [name]
            for _, res in loaded:
                rec = next((r for r in res["metrics"] if r["metric"] == name), None)
                row.append("" if rec is None else "unavailable" if rec.get("available") is False else
                           f"{rec['value']:.4g}" + (f" [{rec['ci95'][0]:.4g}, {rec['ci95'][1]:.4g}]" if rec.get("ci95") else ""))
            table.append(row)
        heads = ["metric"] + [Path(res["synthetic_dir"]).name or str(path) for path, res in loaded]
        text = "# Comparison\n\n" + tabulate(table, headers=heads, tablefmt="github") + "\n"
        plot = None
    atomic_write_text(out, text)
    print(text)
    print(f"wrote {out}" + (f", {plot}" if plot else ""))
    return 0


if __name__ == "__main__":
    run_main(main)
