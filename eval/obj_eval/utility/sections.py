"""The audit sections a report adds beside its metrics (faithfulness, memorization, domain distances), with the
reference segmenter or classifier they need: shared by the utility study and run_evaluation.py."""
from __future__ import annotations

from pathlib import Path

from medgen.common.errors import UserError
from medgen.config.paths import PathConfig
from medgen.eval.obj_eval.utility import audit, data, models, report


def reference_cache(compute: str) -> Path:
    """Where reference downstream models are cached, by content (data, settings, seed)."""
    return PathConfig.from_compute(compute).cache_root / "downstream"


def run_audits(audits: list[str], real: dict, synthetic: dict, settings, seed: int, device: str, out: Path,
               compute: str, notes: list[str] | None = None) -> list[dict]:
    if not audits:
        return []
    ref, log = models.cached_reference(settings, real["train"], real["val"], seed, reference_cache(compute))
    print(f"reference model (real train, seed {seed}): " + ("from the cache" if log["cached"] else "trained")
          + f", validation {log['val_metric']} {log['best_val']:.3f}")
    recs = []
    for name, syn in synthetic.items():
        tag = {"synthetic": name}
        if "faithfulness" in audits:
            rec = {**audit.faithfulness(ref, syn, real["test"], real["train"], device, seed), **tag}
            rec["plots"] = [str(report.plot_faithfulness(rec, out / f"faithfulness_{name}.png"))]
            recs.append(rec)
        if "memorization" in audits and syn.edited_from is not None and notes is not None:
            notes.append(f"{name}: lesions inserted into real training scans, which outside the inserted regions "
                         "are those scans by design; the memorization audit (closeness to training images) does "
                         "not apply to it")
        elif "memorization" in audits:
            sub = out / f"memorization_{name}"
            sub.mkdir(parents=True, exist_ok=True)
            recs.append({**audit.memorization(syn, real["train"], real["test"], ref, device, sub, seed=seed,
                                              notes=notes), **tag})
        if "domain" in audits:
            recs += [{**r, **tag} for r in audit.domain(ref, syn, real["test"], device, seed=seed)]
    return recs


def audit_records(names: list[str], real_dir, synthetic_dir, image_type: str, size: int | None, positive_only: bool,
                  layout: str, downstream: dict, seed: int, device: str, out: Path, compute: str,
                  split_seed: int | None = None, val_fraction: float | None = None,
                  flag: str = "--real-train-dir", labels: str | None = None) -> list[dict]:
    """run_evaluation.py --metrics faithfulness,memorization,domain: the same sections as the utility report,
    with the real training data at `real_dir` (a dataset root or its train split)."""
    roles = [r.strip() for r in image_type.split(",") if r.strip()]
    root, note = data.dataset_root(real_dir, flag)
    if isinstance(size, (list, tuple)):   # volumes: the grid both sets are read on
        natives = {synthetic_dir: None}
    else:
        natives = data.native_sizes([synthetic_dir])
        size = size or data.default_size(natives, root)
    real, notes = data.load_real(root, size, roles, positive_only, layout, seed, compute,
                                 data.generator_records([synthetic_dir]), split_seed, val_fraction, flag,
                                 vocab=data.mask_vocabulary([synthetic_dir], labels))
    task = "classification" if real["train"].classes else "segmentation"
    syn = {Path(synthetic_dir).name: data.load_synthetic(synthetic_dir, size, roles, real["train"], compute,
                                                         natives[synthetic_dir])}
    if "faithfulness" in names and task != "segmentation":
        raise UserError("faithfulness needs a segmentation dataset (images with masks)")
    settings = models.TrainSettings(task, device=device, **downstream)
    out.mkdir(parents=True, exist_ok=True)
    return run_audits(names, real, syn, settings, seed, device, out, compute, ([note] if note else []) + notes)
