"""Reports from metrics.json: a Markdown table (tabulate), a bar plot with 95% intervals beside the
real-vs-real floor, and real vs synthetic sample grids side by side."""
from __future__ import annotations

from pathlib import Path

import torch
from tabulate import tabulate

from medgen.common.fileio import atomic_write
from medgen.common.grid import save_grid

LOWER_IS_BETTER = {"fid_inception": True, "fid_radimagenet": True, "mae": True, "psnr": False,
                   "ms_ssim_quality": False, "lpips_quality": True, "faithfulness_dice": False,
                   "memorization": True, "fid_domain": True, "precision_domain": False, "recall_domain": False,
                   "density_domain": False, "coverage_domain": False, "kid_inception": True,
                   "kid_radimagenet": True, "kid_domain": True, "inpaint_outside_max_abs_diff": True}


def _fmt(v, digits=4):
    return "" if v is None else f"{v:.{digits}g}"


def _n(rec) -> str:
    n = rec.get("n")
    if isinstance(n, dict) and "synthetic_volumes" in n:
        return (f"{n['synthetic_volumes']} volumes ({n['synthetic']} slices) synth / {n['real_volumes']} volumes "
                f"({n['real']} slices) real")
    return f"{n['synthetic']} synth / {n['real']} real" if isinstance(n, dict) else str(n)


def _method(rec) -> str:
    m = rec.get("method", {})
    keys = ("feature_network", "network", "pairs_by", "window", "scales", "data_range")
    return ", ".join(f"{k}={m[k]}" for k in keys if k in m)


def rows(result: dict) -> list[list[str]]:
    out = []
    for r in result["metrics"]:
        if r.get("available") is False:
            out.append([r["metric"], "unavailable", "", "", "", r["reason"][:120]])
            continue
        ci = r.get("ci95")
        floor = (r.get("floor") or r.get("real") or {}).get("value")    # real vs real, or the real images' value
        out.append([r["metric"], _fmt(r["value"]), f"[{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else "", _fmt(floor),
                    _n(r), _method(r) + (f"; {r['warning']}" if "warning" in r else "")])
    return out


def size_text(result: dict) -> str:
    """'128 px' or, for volumes, '64x64x48 volumes'."""
    if "volume_shape" in result:
        return "x".join(map(str, result["volume_shape"])) + " volumes"
    return f"{result['image_size']} px"


def markdown(result: dict) -> str:
    unit = "volumes" if "volume_shape" in result else "images"
    head = (f"# Evaluation\n\nsynthetic: `{result['synthetic_dir']}` ({result['n_synthetic']} {unit})  \n"
            f"real: `{result['real_dir']}` ({result['n_real']} {unit})  \n"
            f"{size_text(result)}, modality {result['image_type']}, positive-only {result['positive_only']}, "
            f"seed {result['seed']}\n\n")
    table = tabulate(rows(result), headers=["metric", "value", "95% CI", "real", "N", "method"],
                     tablefmt="github")
    return head + table + "\n\nThe real column is what to read each value against: the real-vs-real floor (FID " \
                          "between two halves of the real set; diversity among real slices), or for region " \
                          "intensities the real images' own value.\n" + "".join(notes(result))


def notes(result: dict) -> list[str]:
    """Caveats a reader of the table needs: MS-SSIM settings that differ from the literature's."""
    settings = {(m["window"], m["scales"]) for r in result["metrics"] if r["metric"].startswith("ms_ssim")
                for m in [r.get("method", {})] if "window" in m}
    return [f"\nNote: MS-SSIM uses a {w}-px window and {k} scales to fit {size_text(result)}; these "
            f"values are not comparable with MS-SSIM values in the literature (11-px window, 5 scales).\n"
            for w, k in sorted(settings) if (w, k) != (11, 5)]


def plot_metrics(result: dict, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    recs = [r for r in result["metrics"] if r.get("available") is not False and r.get("value") is not None]
    fig, axes = plt.subplots(1, max(1, len(recs)), figsize=(2.6 * max(1, len(recs)), 3.2), squeeze=False)
    for ax, r in zip(axes[0], recs):
        vals, labels = [r["value"]], ["synthetic"]
        if "floor" in r:
            vals.append(r["floor"]["value"])
            labels.append("real vs real")
        ax.bar(labels, vals, color=["#3b75af", "#999999"][:len(vals)])
        if r.get("ci95"):  # drawn from its ends, so an interval that misses the value shows as such
            lo, hi = r["ci95"]
            ax.vlines(0, lo, hi, color="black", lw=1.2)
            ax.hlines([lo, hi], -0.12, 0.12, color="black", lw=1.2)
        if r["metric"].endswith("diversity"):
            arrow = "lower = more diverse" if r["metric"].startswith("ms_ssim") else "higher = more diverse"
        else:
            arrow = "lower is better" if LOWER_IS_BETTER.get(r["metric"], True) else "higher is better"
        ax.set_title(f"{r['metric']}\n({arrow})", fontsize=9)
        ax.tick_params(labelsize=8)
    if not recs:
        axes[0][0].text(0.5, 0.5, "no metric available", ha="center")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return path


def plot_samples(synth, real, path: Path, n: int = 32) -> Path:
    """Left half real, right half synthetic: n images each, 8 per row."""
    g = torch.Generator().manual_seed(0)
    pick = lambda s: s.images[torch.randperm(len(s), generator=g)[:n]]  # noqa: E731
    a, b = pick(real), pick(synth)
    k = min(len(a), len(b))
    tiles = []
    for row in range(0, k, 4):
        tiles += list(a[row:row + 4]) + [torch.zeros_like(a[0])] * (4 - len(a[row:row + 4]))
        tiles += list(b[row:row + 4]) + [torch.zeros_like(b[0])] * (4 - len(b[row:row + 4]))
    return save_grid(torch.stack(tiles), path, nrow=8, scale=max(1, 96 // a.shape[-1]))
