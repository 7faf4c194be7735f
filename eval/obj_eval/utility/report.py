"""utility.md (a verdict in words, then tables) and the PNGs: score vs real fraction per recipe with seed CI
bands, faithfulness by tumour size, memorization histograms and the closest synthetic/training pairs."""
from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
from tabulate import tabulate

from medgen.common.fileio import atomic_write
from medgen.common.grid import save_grid
from medgen.eval.obj_eval.utility.scores import MIN_SEEDS, MIN_TEST_UNITS, higher_is_better, metric_label

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _f(v, digits: int = 3) -> str:
    return "-" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.{digits}f}"


def _ci(ci, digits: int = 3, sign: str = "") -> str:
    return "-" if not ci else f"[{ci[0]:{sign}.{digits}f}, {ci[1]:{sign}.{digits}f}]"


def _pct(fraction: float) -> str:
    return f"{fraction * 100:g}% real data"


def _what(row: dict) -> str:
    return (f"adding {row['ratio']:g}x {row['synthetic']}" if row["kind"] == "real+synthetic" else
            f"adding {row['ratio']:g}x {row['synthetic']} (lesions inserted into the subset's own scans)"
            if row["kind"] == "real+inpainted" else
            f"balancing the classes with {row['synthetic']}" if row["kind"] == "real+balanced" else
            f"training on {row['synthetic']} alone")


def comparison(row: dict, label: str, primary: str) -> str:
    """One recipe's verdict in words: not assessable (with the counts), a difference distinguishable from
    zero, or one that is not, with the difference this study could have detected."""
    vs, where = row["vs_real"], _pct(row["real_fraction"])
    what = _what(row)
    if not vs.get("assessable", True):
        return f"{what} at {where}: not assessable ({vs['why_not']})"
    if vs.get("ci95") is None:
        return f"{what} at {where}: no interval (a seed without a score)"
    better = (vs["diff"] > 0) == higher_is_better(primary)
    if vs["distinguishable"]:
        return (f"{what} {'improved' if better else 'worsened'} test {label} by {vs['diff']:+.3f} "
                f"{_ci(vs['ci95'], sign='+')} at {where} (distinguishable from zero over {vs['n_seeds']} seeds, "
                f"p = {vs['p']:.3f}{_adjusted(vs)})")
    if vs.get("only_over_seeds"):
        ts = vs["test_set"]
        return (f"{what} changed test {label} by {vs['diff']:+.3f} {_ci(vs['ci95'], sign='+')} at {where}: it "
                f"stands out over the {vs['n_seeds']} training runs (p = {vs['p']:.3f}) but not over the "
                f"{vs['n_units']} test units (their interval {_ci(ts['units_ci95'], sign='+')} includes zero), so "
                "not distinguishable: the difference may belong to these particular patients")
    if vs["p"] < 0.05 and vs.get("p_adjusted") is not None and vs["p_adjusted"] >= 0.05:
        return (f"{what} changed test {label} by {vs['diff']:+.3f} {_ci(vs['ci95'], sign='+')} at {where}: p = "
                f"{vs['p']:.3f} alone, but not distinguishable from zero once corrected for the "
                f"{vs['family_size']} comparisons of this study (Holm-adjusted p = {vs['p_adjusted']:.2f})")
    return (f"{what} changed test {label} by {vs['diff']:+.3f} {_ci(vs['ci95'], sign='+')} at {where}, not "
            f"distinguishable from zero (p = {vs['p']:.2f}); with the seed-to-seed spread seen here this study "
            f"detects about {vs['detectable']:.3f} (80% power; up to {vs['detectable_upper']:.3f} at the 90% "
            f"upper bound of a spread estimated from {vs['n_seeds']} seeds), so a smaller effect is not ruled out")


def _adjusted(vs: dict) -> str:
    if vs.get("correction") == "pre-declared primary":
        return ", the pre-declared primary comparison, tested alone"
    if vs.get("correction") == "holm" and vs.get("family_size", 1) > 1:
        return f", Holm-adjusted p = {vs['p_adjusted']:.3f} over {vs['family_size']} comparisons"
    return ""


def verdict(study: dict) -> str:
    """The plain-language paragraph at the top of the report."""
    primary, label = study["primary"], metric_label(study["primary"])
    unit = study["unit"]
    lines = [comparison(row, label, primary) for row in study["rows"] if row.get("vs_real")]
    n_seeds = len(study["rows"][0]["seeds"]) if study["rows"] else 0
    text = ("; ".join(lines) + ". ") if lines else "Only the real recipe was trained. "
    text = text[0].upper() + text[1:]
    if lines:
        text += (f"Each comparison pairs the recipe with `real` on the same {n_seeds} seeds: the interval and p are "
                 f"over the per-seed differences, each scored on all {study['rows'][0]['n_test_units']} test "
                 f"{unit}s, so they include what changes between training runs; scores are on the real test "
                 f"split only." + family_sentence(study))
    for rec in study.get("audit", []):
        if rec.get("metric") == "faithfulness_dice" and rec.get("value") is not None:
            text += (f" Faithfulness: the real-data segmenter finds the conditioning mask in the synthetic images "
                     f"with Dice {rec['value']:.3f} {_ci(rec['ci95'])}, against {_f(rec['ceiling']['mean'])} on real "
                     f"test images ({rec['n_low']} of {rec['n']} below {rec['low_dice_threshold']})")
            if rec.get("regions"):
                text += "; per region " + ", ".join(f"{r} {_f(v['value'])} (real {_f(v['ceiling']['mean'])})"
                                                    for r, v in rec["regions"].items())
            text += "."
        if rec.get("metric") == "memorization":
            text += " " + memorization_sentence(rec)
    return text


def family_sentence(study: dict) -> str:
    """How the study's comparisons were corrected for their number."""
    vs = [r["vs_real"] for r in study["rows"] if r.get("vs_real") and r["vs_real"].get("family_size")]
    if not vs:
        return ""
    family = [v for v in vs if v.get("correction") != "pre-declared primary"]
    primary = [r for r in study["rows"] if r.get("vs_real", {}).get("correction") == "pre-declared primary"]
    text = ""
    if family and family[0]["correction"] == "holm" and family[0]["family_size"] > 1:
        text = (f" The {family[0]['family_size']} comparisons form one family: 'distinguishable' needs a "
                "Holm-adjusted p below 0.05, so that the chance of any false 'distinguishable' stays at 5%.")
    elif family and family[0]["correction"] == "none" and family[0]["family_size"] > 1:
        text = (f" The {family[0]['family_size']} comparisons are not corrected for their number (--correction "
                "none): with several, a false 'distinguishable' somewhere is more likely than 5%.")
    if primary:
        text += (f" {primary[0]['recipe']} at {_pct(primary[0]['real_fraction'])} was declared the primary "
                 "comparison before the study and is tested alone, at 5%.")
    return text


def memorization_sentence(rec: dict) -> str:
    px = rec["sections"]["pixel"]
    p1 = px["below"]["p1"]
    lo, hi = p1["null_range"]
    verdict = ("more than expected without copying: inspect the closest pairs" if p1["excess"] else
               "within what is expected without copying")
    return (f"Memorization: {p1['fraction'] * 100:.1f}% of synthetic images are closer to a training image "
            f"(allowing {rec['tolerance']}) than the held-out 1st-percentile threshold; "
            f"{p1['expected'] * 100:.1f}% expected without copying with {rec['n_heldout_units']} held-out subjects "
            f"(95% range {lo * 100:.1f}-{hi * 100:.1f}%), {verdict}.")


def markdown(study: dict) -> str:
    primary = study["primary"]
    metric_names = list(study["rows"][0]["metrics"]) if study["rows"] else []
    out = [f"# Downstream utility: {study['task']}", "", verdict(study), ""]
    out += [f"Real data: {study['real_dir']}; synthetic: {', '.join(study['synthetic_dirs']) or '(none)'}; "
            f"{size_label(study['image_size'])}; downstream model: {study['model']}; training: {study['training']}.", ""]
    out += [f"- {n}" for n in study.get("notes", [])] + ([""] if study.get("notes") else [])
    head = ["real fraction", "recipe", "N train (synthetic)", "steps"] + [metric_label(m) for m in metric_names] + \
           [f"{metric_label(primary)} vs real [95% CI over seeds]", "p", "adjusted p", "test-set CI (models fixed)"]
    body = []
    for r in study["rows"]:
        cells = [f"{r['real_fraction']:g}", r["recipe"], f"{int(np.mean(r['n_train']))} ({int(np.mean(r['n_synthetic']))})",
                 _steps(r.get("steps"))]
        for m in metric_names:
            s = r["metrics"][m]
            cells.append(f"{_f(s['mean'])} {_ci(s['ci95'])}")
        cells += _vs_cells(r.get("vs_real"))
        body.append(cells)
    out += ["## Scores on the real test split", "",
            "Mean over seeds with the 95% t-interval. The comparison with `real` pairs the same seeds: its interval "
            "and p come from the per-seed differences (a paired t-test over seeds), the verdict's basis; the "
            "adjusted p corrects p for the number of comparisons (Holm), and decides 'distinguishable'. The "
            "test-set CI resamples test units with the trained models fixed: how much the figure would move on "
            "another test set, not on another training run. A comparison needs at least "
            f"{MIN_SEEDS} seeds and {MIN_TEST_UNITS} test {study['unit']}s; below that it reads 'not assessable'.", "",
            tabulate(body, head, tablefmt="github"), ""]
    out += _budget_notes(study)
    classes = [c for r in study["rows"][:1] for c in r.get("recall_per_class", {})]
    if classes:
        body = [[f"{r['real_fraction']:g}", r["recipe"]] + [f"{_f(r['recall_per_class'][c]['mean'])}" for c in classes]
                for r in study["rows"]]
        out += ["### Recall per class (mean over seeds)", "",
                tabulate(body, ["real fraction", "recipe"] + classes, tablefmt="github"), ""]
    for rec in study.get("audit", []):
        out += _audit_section(rec)
    out += ["## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in study.get("plots", [])] + [""]
    return "\n".join(out)


def _budget_notes(study: dict) -> list[str]:
    """Lines saying when recipes trained for different numbers of steps, and how many empty predictions HD95
    scored at the image diagonal."""
    out = []
    steps = {r["recipe"]: r.get("steps") or [] for r in study["rows"]}
    means = {k: np.mean(v) for k, v in steps.items() if v}
    if means and max(means.values()) > 1.1 * min(means.values()):
        out.append("Note: the recipes trained for different numbers of steps (the steps column: --epochs counts "
                   "passes over each recipe's own data, so a larger training set also trains longer, and early "
                   "stopping ends runs at different points); a difference may come from the budget, not the data.")
    empty = [r for r in study["rows"] if any(r.get("empty_predictions") or [])]
    if empty:
        out.append("Note: HD95 scores an empty prediction of a tumour at the image diagonal; empty predictions per "
                   "seed: " + ", ".join(f"{r['recipe']} at {r['real_fraction']:g}: "
                                        f"{'/'.join(map(str, r['empty_predictions']))}"
                                        for r in empty) + ".")
    return out + ([""] if out else [])


def _steps(steps) -> str:
    """Training steps of a row's seeds: one number when they agree, else the range (early stopping, --epochs)."""
    if not steps:
        return "-"
    return f"{min(steps)}" if min(steps) == max(steps) else f"{min(steps)}-{max(steps)}"


def _vs_cells(vs) -> list[str]:
    if not vs:
        return ["", "", "", ""]
    test_set = _ci(vs["test_set"]["ci95"], sign="+") if vs.get("test_set") else "-"
    if not vs.get("assessable", True):
        return ["not assessable", "-", "-", test_set]
    adjusted = ("primary" if vs.get("correction") == "pre-declared primary" else _f(vs.get("p_adjusted")))
    return [f"{vs['diff']:+.3f} {_ci(vs['ci95'], sign='+')}", _f(vs.get("p")), adjusted, test_set]


def _below_cells(b: dict) -> list[str]:
    lo, hi = b["null_range"]
    return [f"{b['fraction'] * 100:.1f}%" + (" EXCESS" if b["excess"] else ""),
            f"{b['expected'] * 100:.1f}% ({lo * 100:.1f}-{hi * 100:.1f}%)"]


def _audit_section(rec: dict) -> list[str]:
    if rec.get("available") is False:
        return [f"## {rec['metric']}", "", f"Unavailable: {rec['reason']}", ""]
    name = rec["metric"]
    if name == "faithfulness_dice":
        rows = [[b["bin"], f"{b['area_fraction'][0]:.3f}-{b['area_fraction'][1]:.3f}", b["synthetic"]["n"],
                 f"{_f(b['synthetic']['mean'])} {_ci(b['synthetic']['ci95'])}", b["real_test"]["n"],
                 f"{_f(b['real_test']['mean'])} {_ci(b['real_test']['ci95'])}"] for b in rec["bins"]]
        rows.append(["all", "", rec["n"], f"{_f(rec['value'])} {_ci(rec['ci95'])}", rec["ceiling"]["n"],
                     f"{_f(rec['ceiling']['mean'])} {_ci(rec['ceiling']['ci95'])}"])
        low = ", ".join(f"{x['id']} ({x['dice']:.2f})" for x in rec["low"][:30])
        regions = []
        for region, r in (rec.get("regions") or {}).items():     # label maps: each region with its size bins
            rows_r = [[b["bin"], f"{b['area_fraction'][0]:.3f}-{b['area_fraction'][1]:.3f}", b["synthetic"]["n"],
                       f"{_f(b['synthetic']['mean'])} {_ci(b['synthetic']['ci95'])}", b["real_test"]["n"],
                       f"{_f(b['real_test']['mean'])} {_ci(b['real_test']['ci95'])}"] for b in r["bins"]]
            rows_r.append(["all", "", r["n"], f"{_f(r['value'])} {_ci(r['ci95'])}", r["ceiling"]["n"],
                           f"{_f(r['ceiling']['mean'])} {_ci(r['ceiling']['ci95'])}"])
            regions += [f"### Region {region}", "", tabulate(rows_r, ["size", "area fraction", "N synthetic",
                                                                      "Dice synthetic", "N real test",
                                                                      "Dice real test (ceiling)"],
                                                            tablefmt="github"), ""]
        return ["## Mask faithfulness", "", rec["method"]["segmenter"] + "; " + rec["method"]["dice"] + ".", "",
                tabulate(rows, ["tumour size", "area fraction", "N synthetic", "Dice synthetic",
                                "N real test", "Dice real test (ceiling)"], tablefmt="github"), "", *regions,
                f"{rec['n_low']} synthetic images below Dice {rec['low_dice_threshold']}" + (f": {low}" if low else "."),
                f"Synthetic images with an empty conditioning mask: {rec['empty_masks']['n']} "
                f"({rec['empty_masks']['predicted_foreground']} with predicted foreground).", ""]
    if name == "memorization":
        rows = [[s["space"], *(cell for q in ("p1", "p5") for cell in _below_cells(s["below"][q])),
                 _f(s["synthetic_nn"]["median"], 4), _f(s["heldout_nn"]["median"], 4), _f(s["synthetic_nn"]["min"], 4)]
                for s in rec["sections"].values()]
        pairs = ", ".join(f"{c['synthetic']} ~ {c['train']} (d {c['distance']:.4f}, SSIM {c['ssim']:.3f})"
                          for c in rec["closest"][:5])
        return ["## Memorization", "",
                f"Nearest training image of each of {rec['n']} synthetic images, against the nearest-neighbour "
                f"distances to the same {rec['n_train']} training images of one image drawn from each of the "
                f"{rec['n_heldout_units']} held-out subjects or files ({rec['n_heldout']} held-out images; the "
                "slices of one subject are not independent). The threshold is an order statistic of those "
                "distances; without copying the share below it is beta-binomial, whose mean and 95% range are the "
                "'expected' columns (synthetic images taken as independent); a share above the range is marked "
                "EXCESS.", "",
                tabulate(rows, ["distance", "below held-out p1", "expected (95% range)", "below p5",
                                "expected (95% range)", "median NN synthetic", "median NN held-out",
                                "min NN synthetic"], tablefmt="github"), "",
                f"The held-out image of each subject is drawn with seed {rec.get('heldout_seed', 0)}. The pixel "
                f"distance detects {rec['detects']}; it does not detect {rec['misses']} (measured on phantoms: "
                "docs/utility.md, 'What the copy distance detects').", "",
                *[f"- warning: {w}" for w in rec.get("warnings", [])], *[f"- note: {n}" for n in rec.get("notes", [])],
                f"Closest pairs: {pairs}.", ""]
    warn = [f"- warning: {rec['warning']}", ""] if rec.get("warning") else []
    if name == "fid_domain":
        return ["## Domain feature space", "", f"Fréchet distance {_f(rec['value'])} {_ci(rec['ci95'])} "
                f"(N = {rec['n']['synthetic']} synthetic, {rec['n']['real']} real); feature space: {rec['method']['space']}.",
                ""] + warn
    if name == "kid_domain":
        return [f"KID (unbiased at any N) {_f(rec['value'], 4)} +- {_f(rec['se'], 4)} (standard error), same "
                "feature space.", ""]
    if name == "prdc_domain":
        v = rec["value"]
        return [f"Precision {v['precision']:.3f}, recall {v['recall']:.3f}, density {v['density']:.3f}, coverage "
                f"{v['coverage']:.3f} (k = {rec['method']['k']}, {rec['method']['reference']}), same feature space.",
                ""] + warn
    return []


def _save(fig, path: Path) -> Path:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return path


def plot_fractions(study: dict, path: Path) -> Path:
    """Each score vs the real fraction, one line per recipe, seed CI as a band."""
    metrics = list(study["rows"][0]["metrics"])
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
    recipes = list(dict.fromkeys(r["recipe"] for r in study["rows"]))
    for ax, m in zip(axes[0], metrics):
        for name in recipes:
            rows = sorted((r for r in study["rows"] if r["recipe"] == name), key=lambda r: r["real_fraction"])
            x = [r["real_fraction"] for r in rows]
            y = [r["metrics"][m]["mean"] if r["metrics"][m]["mean"] is not None else np.nan for r in rows]
            ax.plot(x, y, marker="o", label=name)
            lo = [r["metrics"][m]["ci95"][0] if r["metrics"][m]["ci95"] else np.nan for r in rows]
            hi = [r["metrics"][m]["ci95"][1] if r["metrics"][m]["ci95"] else np.nan for r in rows]
            ax.fill_between(x, lo, hi, alpha=0.15)
        ax.set_xscale("log" if len(set(r["real_fraction"] for r in study["rows"])) > 2 else "linear")
        ax.set_xlabel("fraction of the real training data")
        ax.set_title(metric_label(m))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    return _save(fig, path)


def plot_faithfulness(rec: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5, 3.4))
    x = np.arange(len(rec["bins"]))
    for k, (key, label) in enumerate((("synthetic", "synthetic vs conditioning mask"), ("real_test", "real test (ceiling)"))):
        means = [b[key]["mean"] if b[key]["mean"] is not None else 0 for b in rec["bins"]]
        err = np.array([[m - b[key]["ci95"][0], b[key]["ci95"][1] - m] if b[key]["ci95"] else [0, 0]
                        for m, b in zip(means, rec["bins"])]).T
        ax.bar(x + (k - 0.5) * 0.38, means, 0.38, yerr=err, capsize=3, label=label)
    ax.set_xticks(x, [b["bin"] for b in rec["bins"]])
    ax.set_ylabel("Dice")
    ax.set_ylim(0, 1)
    ax.set_title("mask faithfulness by tumour size")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_memorization(sections: dict, path: Path) -> Path:
    fig, axes = plt.subplots(1, len(sections), figsize=(5 * len(sections), 3.4), squeeze=False)
    for ax, (name, s) in zip(axes[0], sections.items()):
        both = np.concatenate([s["_d_synth"], s["_d_held"]])
        bins = np.linspace(both.min(), both.max() + 1e-9, 40)
        ax.hist(s["_d_held"], bins, alpha=0.6, density=True, label="real held-out -> train")
        ax.hist(s["_d_synth"], bins, alpha=0.6, density=True, label="synthetic -> train")
        ax.axvline(s["below"]["p1"]["threshold"], color="k", ls="--", lw=1, label="held-out 1st-percentile threshold")
        ax.set_title(f"nearest-neighbour distance ({name})")
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_closest_pairs(synthetic, train, order, nn, path: Path) -> Path:
    """Top row: the synthetic images closest to a training image; bottom row: those training images."""
    import torch
    top = synthetic.images[list(order)]
    bottom = train.images[[int(nn[i]) for i in order]]
    save_grid(torch.cat([top, bottom]), path, nrow=max(1, len(order)))
    return path


def size_label(size) -> str:
    """'64 px', or '16x16x16 volumes' for a volume grid."""
    return "x".join(map(str, size)) + " volumes" if isinstance(size, (list, tuple)) else f"{size} px"
