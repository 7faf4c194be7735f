"""The utility study: the same downstream model trained on each recipe, at each real-data fraction and seed,
scored on the real test split only.

Recipes (names as they appear in the report):
  real                   the real training subset alone (the baseline every other recipe is compared with);
  real+<S> x<r>          plus r synthetic images of set S per real image (drawn without replacement, seeded);
  real+inpainted <S> x<r>  (a set written by generate.py --inpaint_into) plus r images per real image whose
                         lesions were inserted into the real subset's own scans: the lesion-insertion use case,
                         with no real anatomy from outside the subset (for such a set it replaces real+synthetic);
  <S> only               the synthetic set S alone;
  real+balanced <S>      (classification) plus synthetic images of each minority class of S up to the real
                         subset's majority count: the class-balancing use case.
At a real fraction f < 1 every recipe of one seed uses the same real subset (whole subjects; per class for
classification), so differences at one seed are paired. Each (fraction, recipe, seed) result is written
atomically when it finishes, with a key of everything that determines it: a killed study resumes from there.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medgen.common.errors import UserError
from medgen.common.fileio import atomic_write_text
from medgen.common.splits import digest, unit_name
from medgen.eval.obj_eval.utility import models, scores
from medgen.eval.obj_eval.utility.data import TaskSet, concat, warn
from medgen.eval.obj_eval.utility.names import RECIPE_KINDS  # noqa: F401 (re-exported)


@dataclass(frozen=True)
class Recipe:
    kind: str                    # one of RECIPE_KINDS
    synthetic: str | None = None
    ratio: float | None = None

    @property
    def name(self) -> str:
        if self.kind == "real":
            return "real"
        if self.kind == "synthetic":
            return f"{self.synthetic} only"
        if self.kind == "real+balanced":
            return f"real+balanced {self.synthetic}"
        if self.kind == "real+inpainted":
            return f"real+inpainted {self.synthetic} x{self.ratio:g}"
        return f"real+{self.synthetic} x{self.ratio:g}"

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.+-]+", "_", self.name)


def parse_list(text: str, flag: str, kind=float, low: float = 0.0, high: float | None = None) -> list:
    try:
        values = [kind(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag}: expected a comma list of numbers, got {text!r}") from None
    if not values or any(v <= low or (high is not None and v > high) for v in values):
        raise UserError(f"{flag}: every value must be > {low:g}" + (f" and <= {high:g}" if high is not None else "")
                        + f" (got {text})")
    return sorted(set(values))


def build_recipes(kinds: list[str], synthetic: list[str], ratios: list[float], task: str,
                  inpainted: frozenset = frozenset()) -> list[Recipe]:
    """The recipes of the kinds asked for, per synthetic set; `inpainted`: the sets of lesions inserted into real
    scans, whose added-data recipe is real+inpainted (real+synthetic would add scans of subjects outside the
    real subset at a fraction below 1)."""
    unknown = [k for k in kinds if k not in RECIPE_KINDS]
    if unknown:
        raise UserError(f"--recipes: unknown recipe {unknown[0]!r} (choose from {', '.join(RECIPE_KINDS)})")
    if "real+balanced" in kinds and task != "classification":
        raise UserError("--recipes real+balanced needs a classification dataset (class image folders)")
    if any(k != "real" for k in kinds) and not synthetic:
        raise UserError("--recipes: synthetic recipes need --synthetic_dir")
    if "real+inpainted" in kinds and not inpainted:
        raise UserError("--recipes real+inpainted needs a --synthetic_dir written by generate.py --inpaint_into")
    out = [Recipe("real")]
    for s in synthetic:
        adds = "real+inpainted" if s in inpainted else "real+synthetic"
        asked = "real+synthetic" in kinds or (s in inpainted and "real+inpainted" in kinds)
        out += [Recipe(adds, s, r) for r in ratios if asked]
        out += [Recipe("real+balanced", s)] if "real+balanced" in kinds else []
        out += [Recipe("synthetic", s)] if "synthetic" in kinds else []
    return out


def real_subset(train: TaskSet, fraction: float, seed: int) -> TaskSet:
    """A seeded subset of whole units (subjects); stratified by class for classification (each class keeps at
    least one image)."""
    if fraction >= 1.0:
        return train
    rng = np.random.default_rng([seed, int(round(fraction * 1e6))])
    units, unit_of = train.unit_index()
    if train.classes:
        labels = train.targets.numpy()
        keep = []
        for c in range(len(train.classes)):
            members = np.flatnonzero(labels == c)
            if len(members):
                keep += rng.choice(members, max(1, int(round(fraction * len(members)))), replace=False).tolist()
        return train.subset(sorted(keep))
    chosen = rng.choice(len(units), max(1, int(round(fraction * len(units)))), replace=False)
    return train.subset(np.flatnonzero(np.isin(unit_of, chosen)))


def compose(recipe: Recipe, real: TaskSet, synthetic: dict[str, TaskSet], seed: int) -> tuple[TaskSet, dict]:
    """The training set of one recipe, and what it holds."""
    if recipe.kind == "real":
        return real, {"n_real": len(real), "n_synthetic": 0}
    syn = synthetic[recipe.synthetic]
    rng = np.random.default_rng([seed, 7])
    if recipe.kind == "synthetic":
        return syn, {"n_real": 0, "n_synthetic": len(syn)}
    if recipe.kind in ("real+synthetic", "real+inpainted"):
        pool, of = np.arange(len(syn)), ""
        if recipe.kind == "real+inpainted":     # only lesions inserted into the subset's own scans
            schemes = {scheme for scheme, _ in syn.edited_from.values()}
            own = {(scheme, digest(unit_name(u), scheme)) for u in real.units for scheme in schemes}
            pool = np.flatnonzero([syn.edited_from.get(Path(u).name) in own for u in syn.units])
            of = " inserted into the real subset's own scans"
        want = int(round(recipe.ratio * len(real)))
        take = min(want, len(pool))
        if take < want:
            warn(f"{recipe.name}: asked for {want} synthetic images{of}, {syn.name} has {len(pool)}; "
                 "using all of them")
        pick = np.sort(rng.choice(pool, take, replace=False))
        return concat(recipe.name, [real, syn.subset(pick)]), {"n_real": len(real), "n_synthetic": int(take),
                                                               "n_synthetic_wanted": want,
                                                               "actual_ratio": take / max(1, len(real))}
    counts = real.counts()
    labels = syn.targets.numpy()
    picks, added = [], {}
    for c, name in enumerate(real.classes):
        need = int(counts.max() - counts[c])
        members = np.flatnonzero(labels == c)
        take = min(need, len(members))
        if take < need:
            warn(f"{recipe.name}: class {name} needs {need} synthetic images, {syn.name} has {len(members)}")
        picks += rng.choice(members, take, replace=False).tolist()
        added[name] = int(take)
    return concat(recipe.name, [real, syn.subset(sorted(picks))]), {"n_real": len(real), "n_synthetic": len(picks),
                                                                    "added_per_class": added}


def result_path(out: Path, fraction: float, recipe: Recipe, seed: int) -> Path:
    return Path(out) / "results" / f"real{fraction:g}" / recipe.slug / f"seed{seed}.json"


def read_result(path: Path, key: str) -> dict | None:
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return stored if stored.get("key") == key else None


def run_study(out: Path, task: str, recipes: list[Recipe], fractions: list[float], seeds: list[int],
              real: dict[str, TaskSet], synthetic: dict[str, TaskSet], settings: models.TrainSettings,
              data_key: str, reference_cache: Path | None = None) -> dict:
    """{(fraction, recipe name): [result per seed]}, training what is not on disk yet. With reference_cache, the
    `real` model at fraction 1 and the first seed is trained through models.cached_reference: it is the reference
    model of the audits (faithfulness, memorization, domain), which then load it instead of training it again."""
    results: dict[tuple[float, str], list[dict]] = {}
    real_of: dict[tuple[float, int], dict] = {}          # the real recipe's result, by fraction and seed
    total = len(fractions) * len(seeds) * len(recipes)
    done = 0
    for fraction in fractions:
        for seed in seeds:
            subset = real_subset(real["train"], fraction, seed)
            for recipe in recipes:
                done += 1
                path = result_path(out, fraction, recipe, seed)
                key = models.content_key(data_key, settings.key(), recipe.name, fraction, seed)
                res = read_result(path, key)
                tag = f"[{done}/{total}] real {fraction:g}, {recipe.name}, seed {seed}"
                if res is not None:
                    print(f"{tag}: done before ({path})")
                else:
                    train_set, info = compose(recipe, subset, synthetic, seed)
                    same = real_of.get((fraction, seed)) if recipe.kind != "real" and not info["n_synthetic"] else None
                    if same is not None and torch.equal(train_set.images, subset.images) \
                            and torch.equal(train_set.targets, subset.targets):
                        # nothing added: the real training set in its order and the same seed train the same model
                        res = {**same, "key": key, "recipe": recipe.name, "kind": recipe.kind,
                               "synthetic": recipe.synthetic, "ratio": recipe.ratio, "train": info,
                               "same_model_as": "real"}
                        print(f"{tag}: adds no synthetic image; the real recipe's model and scores")
                    else:
                        if reference_cache is not None and recipe.kind == "real" and fraction >= 1.0 \
                                and seed == seeds[0]:
                            model, log = models.cached_reference(settings, train_set, real["val"], seed,
                                                                 reference_cache)
                        else:
                            model, log = models.train(settings, train_set, real["val"], seed, desc=tag)
                        probs = models.predict(model, real["test"].images, task, settings.device, bf16=settings.bf16)
                        res = {"key": key, "recipe": recipe.name, "kind": recipe.kind, "synthetic": recipe.synthetic,
                               "ratio": recipe.ratio, "real_fraction": fraction, "seed": seed, "train": info,
                               "training": log, **scores.scores(task, probs, real["test"])}
                        print(f"{tag}: " + ", ".join(f"{k} {v:.4f}" for k, v in res["metrics"].items()
                                                     if np.isfinite(v)))
                    atomic_write_text(path, json.dumps(res, allow_nan=True))
                if recipe.kind == "real":
                    real_of[(fraction, seed)] = res
                results.setdefault((fraction, recipe.name), []).append(res)
    return results


def parse_comparison(text: str | None, recipes: list[Recipe], fractions: list[float]) -> tuple[str, float] | None:
    """--primary-comparison RECIPE[@FRACTION] -> (recipe name, fraction); the fraction may be left out when the
    study has one. Anything that names no comparison of this study is refused, listing those it has."""
    if text is None:
        return None
    name, _, frac = text.partition("@")
    names = [r.name for r in recipes if r.kind != "real"]
    listed = ", ".join(f"{n}@{f:g}" for n in names for f in fractions)
    try:
        fraction = float(frac) if frac else (fractions[0] if len(fractions) == 1 else None)
    except ValueError:
        fraction = None
    if name not in names or fraction not in fractions:
        raise UserError(f"--primary-comparison {text!r}: not a comparison of this study (choose one of {listed})")
    return name, fraction


def require_both(vs: dict) -> None:
    """'distinguishable' needs the difference to stand out over training runs (the seed-paired test) and over
    test subjects (the test-set bootstrap, the same sign): a recipe that helps some patients and hurts others
    shows a difference on one fixed test set that the seeds confirm and that another set of patients would
    not. The simulation in tests/test_evidence.py holds the false rate under such an interaction."""
    ts = vs.get("test_set") or {}
    ci = ts.get("units_ci95")
    over_subjects = bool(ci is not None and vs.get("diff") is not None and (ci[0] > 0 or ci[1] < 0)
                         and np.sign(ts["diff"]) == np.sign(vs["diff"]))
    vs["over_subjects"] = over_subjects
    if vs["distinguishable"] and not over_subjects:
        vs["distinguishable"] = False
        vs["only_over_seeds"] = True


def correct_family(rows: list[dict], correction: str = "holm", primary: tuple[str, float] | None = None) -> None:
    """Family-wise error control over the study's comparisons (every assessable recipe x fraction): Holm's
    adjusted p decides 'distinguishable'; a pre-declared primary comparison is tested alone, at full alpha."""
    tested = [r for r in rows if r.get("vs_real") and r["vs_real"].get("assessable") and r["vs_real"]["p"] is not None]
    is_primary = lambda r: primary is not None and (r["recipe"], r["real_fraction"]) == primary  # noqa: E731
    family = [r for r in tested if not is_primary(r)]
    adjusted = scores.holm([r["vs_real"]["p"] for r in family]) if correction == "holm" else \
        [r["vs_real"]["p"] for r in family]
    for r, p_adj in zip(family, adjusted):
        vs = r["vs_real"]
        vs.update(p_adjusted=p_adj, family_size=len(family), correction=correction,
                  distinguishable=bool(vs["distinguishable"] and p_adj < 0.05))
    for r in tested:
        if is_primary(r):
            r["vs_real"].update(p_adjusted=r["vs_real"]["p"], family_size=1, correction="pre-declared primary")


def summarise(results: dict, recipes: list[Recipe], fractions: list[float], primary: str, n_boot: int,
              seed: int, unit: str = "unit", correction: str = "holm",
              primary_comparison: tuple[str, float] | None = None) -> list[dict]:
    """One row per (fraction, recipe): every score's mean and seed CI, the training steps each seed ran; for
    every recipe but real, the verdict on the primary score (paired over seeds, scores.seed_paired_test, then
    corrected over the study's family of comparisons: correct_family) and the test-set uncertainty of these
    trained models (paired bootstrap over test units)."""
    rows = []
    for fraction in fractions:
        base = results[(fraction, "real")]
        for recipe in recipes:
            res = results[(fraction, recipe.name)]
            row = {"real_fraction": fraction, "recipe": recipe.name, "kind": recipe.kind,
                   "synthetic": recipe.synthetic, "ratio": recipe.ratio, "seeds": [r["seed"] for r in res],
                   "n_train": [r["train"]["n_real"] + r["train"]["n_synthetic"] for r in res],
                   "n_synthetic": [r["train"]["n_synthetic"] for r in res],
                   "n_test_items": res[0]["n_items"], "n_test_units": len(res[0]["units"]),
                   "steps": [r["training"]["steps"] for r in res],
                   "empty_predictions": [r["empty_predictions"] for r in res] if "empty_predictions" in res[0] else None,
                   "metrics": {m: scores.seed_ci([r["metrics"][m] for r in res]) for m in res[0]["metrics"]}}
            if "recall_per_class" in res[0]:
                row["recall_per_class"] = {c: scores.seed_ci([r["recall_per_class"][c] for r in res
                                                             if r["recall_per_class"][c] is not None])
                                           for c in res[0]["recall_per_class"]}
            if recipe.kind != "real":
                row["vs_real"] = {"metric": primary, **scores.seed_paired_test(res, base, primary, unit),
                                  "test_set": scores.paired_bootstrap(res, base, primary, n_boot, seed)}
                require_both(row["vs_real"])
                if not any(r["train"]["n_synthetic"] for r in res):     # no verdict on a comparison with itself
                    row["vs_real"].update(assessable=False, distinguishable=False,
                                          why_not="it adds no synthetic image here, so its models are the real "
                                                  "recipe's")
            rows.append(row)
    correct_family(rows, correction, primary_comparison)
    return rows
