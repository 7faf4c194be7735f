"""Synthetic datasets from trained models.

Guarantees, in order of importance:
  * sample i is the same array whatever the batch size, the number of processes or an interruption: every
    sample draws its noise (initial and, for ancestral DDPM, per step) from its own generator seeded by
    (seed, i, stream, attempt);
  * no work is lost or duplicated: each sample's files are written atomically, then its manifest row
    (<out>/.rows/sample_XXXXXX.json) as the commit mark; a re-run skips committed samples;
  * processes (torchrun ranks and --shard i/n array tasks) take disjoint index sets; whoever finishes merges
    every committed row into manifest.csv, so the last one to finish leaves the complete manifest.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import time
import types
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from tqdm import tqdm

from Generation.TrainGen.core.checkpoint import best_checkpoint, model_weights, safe_load
from Generation.TrainGen.core.config import build_config
from Generation.TrainGen.core.data import GENERATED_MARKER, fit_square, from_slices, to_slices
from Generation.TrainGen.core.errors import UserError
from Generation.TrainGen.core.features import sha256_of
from Generation.TrainGen.core.fileio import atomic_write, atomic_write_text, remove_stale_tmp
from Generation.TrainGen.core.grid import save_grid
from Generation.TrainGen.core.data import MASK_ROLE
from Generation.TrainGen.core.network import build_unet
from Generation.TrainGen.core.sampling import sample
from Generation.TrainGen.core.trainer import build_parts

ROWS_DIR = ".rows"
SETTINGS_FILE = GENERATED_MARKER  # also tells the loaders that the images are already in [0, 1]
MASK_STREAM, IMAGE_STREAM = 0, 1
MANIFEST_FIELDS = ("index", "sample_id", "seed", "sample_seed", "strategy", "sampler", "steps", "guidance",
                   "class", "condition", "mask_attempts", "mask_rejections", "checkpoint_sha256", "seg_strategy",
                   "seg_sampler", "seg_steps", "seg_checkpoint_sha256", "files")


def sample_id(index: int) -> str:
    return f"sample_{index:06d}"


def sample_seed(seed: int, index: int, stream: int, attempt: int = 0) -> int:
    """A 63-bit seed for one sample's noise, statistically independent across (seed, index, stream, attempt)."""
    hi, lo = np.random.SeedSequence([seed, index, stream, attempt]).generate_state(2, np.uint32)
    return (int(hi) << 32 | int(lo)) & (2**63 - 1)


# ---------------------------------------------------------------- models
def _row_linear(self, x: torch.Tensor) -> torch.Tensor:
    """nn.Linear on (B, C) computed one row at a time in a single bmm: every row goes through the M = 1 kernel,
    whatever B is. A plain GEMM picks its kernel by B, and the time-embedding rows would then round differently
    in a batch of 2 than in a batch of 8."""
    if x.dim() != 2:
        return torch.nn.functional.linear(x, self.weight, self.bias)
    w = self.weight.t().unsqueeze(0).expand(x.shape[0], -1, -1)
    y = torch.bmm(x.unsqueeze(1), w).squeeze(1)
    return y + self.bias if self.bias is not None else y


class BatchInvariant(torch.nn.Module):
    """Wraps a UNet so that each sample's output does not depend on the batch it is computed in (checked on
    CPU for batch sizes 1-16). Two things are not batch-invariant by themselves: the Linear layers on (B, C)
    embeddings (replaced by `_row_linear`), and convolutions on a single image, for which oneDNN picks
    another algorithm (a batch of one is run as two copies)."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        for module in net.modules():
            if isinstance(module, torch.nn.Linear):
                module.forward = types.MethodType(_row_linear, module)
        self.net = net

    def forward(self, x, timesteps, class_labels=None):
        if x.shape[0] > 1:
            return self.net(x, timesteps, class_labels=class_labels)
        two = lambda v: None if v is None else v.expand(2, *v.shape[1:])  # noqa: E731
        return self.net(two(x), two(timesteps), class_labels=two(class_labels))[:1]


def resolve_glob(path: str, flag: str) -> Path:
    """path itself, or the single file or folder a glob pattern in it matches (else a UserError listing them)."""
    import glob
    if not glob.has_magic(str(path)):
        return Path(path)
    matches = sorted(glob.glob(str(path)))
    if len(matches) != 1:
        shown = "; ".join(matches[:10]) + (f"; ... ({len(matches)} in all)" if len(matches) > 10 else "")
        raise UserError(f"{flag} {path}: the pattern matches " + (f"{len(matches)} paths, not one: {shown}"
                                                                  if matches else "nothing"))
    return Path(matches[0])


@dataclass
class Model:
    net: torch.nn.Module
    strategy: object
    mode: object
    cfg: object
    meta: dict
    path: Path
    sha256: str
    sampler: str
    steps: int


def load_model(path, flag: str, device, strategy: str | None, sampler: str | None, num_steps: int | None,
               compile_model: bool = False) -> Model:
    """A run folder (its best.pt, else its latest checkpoint) or a checkpoint file, with EMA weights; a glob
    (runs/seg_*/best.pt) must match exactly one."""
    file = best_checkpoint(resolve_glob(path, flag))
    state = safe_load(file, "checkpoint")
    if not isinstance(state, dict) or not {"config", "meta", "model"} <= set(state):
        raise UserError(f"{flag} {file}: not a training checkpoint of this framework")
    cfg, meta = build_config(state["config"]), state["meta"]
    if strategy and strategy != meta["strategy"]:
        raise UserError(f"--strategy {strategy} contradicts {flag} {file}, which was trained with strategy "
                        f"{meta['strategy']!r} (leave --strategy out to use the checkpoint's)")
    strat, mode = build_parts(cfg, meta["num_classes"], meta["image_channels"])
    net = build_unet(cfg.model, mode.in_channels, mode.out_channels, mode.class_embeds)
    weights = model_weights(state)
    if not all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point()):
        raise UserError(f"{flag} {file}: the weights hold NaN/inf values (a diverged run); sample from an "
                        "earlier checkpoint of that run")
    net.load_state_dict(weights)
    net = BatchInvariant(net.to(device).eval())
    if compile_model:
        net = torch.compile(net)
    try:
        chosen = strat.check_sampler(sampler or cfg.strategy.sampler)
    except UserError as err:
        raise UserError(f"--sampler for {flag}: {err}") from None
    return Model(net, strat, mode, cfg, meta, file, sha256_of(file), chosen, num_steps or strat.default_steps[chosen])


# ---------------------------------------------------------------- mask quality filter
@dataclass
class MaskFilter:
    """Rejects generated masks that are empty or outside component-count and area bounds (area as a fraction
    of the image; components 8-connected)."""
    min_area: float = 0.0005
    max_area: float = 0.25
    min_components: int = 1
    max_components: int = 8

    def __post_init__(self):
        if not (0 <= self.min_area <= self.max_area <= 1):
            raise UserError("--min_mask_area and --max_mask_area must satisfy 0 <= min <= max <= 1")
        if not (1 <= self.min_components <= self.max_components):
            raise UserError("--min_components and --max_components must satisfy 1 <= min <= max")

    def reason(self, mask: np.ndarray) -> str | None:
        """None when the mask is accepted, else why it is rejected."""
        mask = np.asarray(mask) > 0.5
        area = float(mask.mean())
        if area == 0:
            return "empty"
        if area < self.min_area:
            return "too small"
        if area > self.max_area:
            return "too large"
        n = ndimage.label(mask, structure=np.ones((3, 3)))[1]
        if n < self.min_components:
            return "too few components"
        if n > self.max_components:
            return "too many components"
        return None


# ---------------------------------------------------------------- settings of one generation job
@dataclass
class Job:
    mode: str
    output_dir: Path
    num_images: int
    batch_size: int
    seed: int = 0
    image_model: Model | None = None
    seg_model: Model | None = None
    guidance: float | None = None
    real_conditions: torch.Tensor | None = None      # (N, C, H, W) in [0, 1], the mode's condition roles, when
    real_sources: list[str] = field(default_factory=list)   # they come from a real dataset (--masks_from)
    masks_from: str | None = None
    class_plan: list[int] | None = None              # class id of every index (label-conditioned modes)
    class_counts: str | None = None
    mask_filter: MaskFilter = field(default_factory=MaskFilter)
    max_attempts: int = 20
    output_size: int | None = None
    png: bool = False
    progression: bool = False
    worker: int = 0                                  # this process's position among `workers`
    workers: int = 1
    device: torch.device = torch.device("cpu")
    autocast: object = None
    rejections: Counter = field(default_factory=Counter)

    @property
    def main_model(self) -> Model:
        return self.image_model or self.seg_model

    @property
    def main_mode(self):
        return self.main_model.mode

    @property
    def chained_seg(self) -> Model | None:
        """The seg model when it only supplies masks to an image model (None in seg mode)."""
        return self.seg_model if self.seg_model is not self.main_model else None

    def guidance_of(self, model: Model) -> float:
        return self.guidance if self.guidance is not None else model.cfg.mode.guidance_scale

    def settings(self) -> dict:
        """Everything that decides a sample's content: a re-run into the same folder must match it."""
        m, s = self.main_model, self.seg_model
        return {"mode": self.mode, "seed": self.seed, "sha256": m.sha256, "sampler": m.sampler, "steps": m.steps,
                "guidance": self.guidance, "seg_sha256": self.chained_seg.sha256 if self.chained_seg else None,
                "seg_sampler": s.sampler if s else None, "seg_steps": s.steps if s else None,
                "masks_from": self.masks_from, "class_counts": self.class_counts,
                "mask_filter": self.mask_filter.__dict__ if s else None, "max_attempts": self.max_attempts,
                "output_size": self.output_size, "png": self.png}

    def roles(self) -> list[str]:
        return self.main_mode.written_roles()

    def class_names(self) -> list[str]:
        return self.image_model.meta.get("class_names") or [str(i) for i in range(self.image_model.meta["num_classes"])]

    def file_roles(self, index: int) -> list[tuple[str, str]]:
        """[(relative file, the role it holds)] of sample `index`, as the mode declares its output layout."""
        sid = sample_id(index)
        if self.main_mode.writes == "class_folders":
            return [(f"{self.class_names()[self.class_plan[index]]}/{sid}.png", self.main_mode.generated_roles[0])]
        out = [(f"{sid}/{r}.nii.gz", r) for r in self.roles()]
        return out + ([(f"{sid}/{r}.png", r) for r in self.roles()] if self.png else [])

    def files(self, index: int) -> list[str]:
        return [rel for rel, _ in self.file_roles(index)]


def parse_class_counts(text: str, class_names: list[str]) -> list[int]:
    """'melanoma=5900,nevus=100' -> the class id of every index, classes in the order given."""
    plan = []
    for item in text.split(","):
        name, sep, count = item.strip().partition("=")
        if not sep or not count.strip().isdigit():
            raise UserError(f"--class_counts: expected name=count, got {item.strip()!r}")
        if name not in class_names:
            raise UserError(f"--class_counts: unknown class {name!r} (the model knows: {', '.join(class_names)})")
        plan += [class_names.index(name)] * int(count)
    if not plan:
        raise UserError("--class_counts asks for no images")
    return plan


def load_real_conditions(directory: str, model: Model, positive_only: bool = True, skip_bad: bool = False,
                         compute: str = "auto") -> tuple[torch.Tensor, list[str]]:
    """The model's condition roles (masks, or any modality a mode conditions on) from every split of a NIfTI
    dataset, preprocessed as its training data (size, crop, layout), as (N, C, H, W) in [0, 1] ordered by
    (subject, slice). Slices without mask voxels are left out when a mask is among the roles, unless
    positive_only is False."""
    from config.paths import PathConfig
    from Generation.TrainGen.core.dataset import load_folder
    roles = model.mode.condition_roles
    data_cfg = replace(model.cfg.data, data_dir=str(directory), positive_only=positive_only, format="nifti",
                       skip_bad=skip_bad)
    cache = PathConfig.from_compute(compute).cache_root / "slices" if data_cfg.cache else None
    data = load_folder(data_cfg, Path(directory), roles, cache)
    if len(data) == 0:
        raise UserError(f"--masks_from {directory}: no usable slices of {', '.join(roles)}")
    image_roles = [r for r in roles if r != MASK_ROLE]
    channels = [data.masks.float() if r == MASK_ROLE else data.images[:, image_roles.index(r)][:, None].float()
                for r in roles]
    keys = data.slice_keys()
    order = sorted(range(len(keys)), key=lambda i: (data.sources[i], data.slice_index[i]))
    return torch.cat(channels, 1)[order].clamp(0, 1), [keys[i] for i in order]


# ---------------------------------------------------------------- sampling
def draw(job: Job, model: Model, seeds: list[int], cond: dict, trajectory: list | None = None) -> torch.Tensor:
    """Samples in [-1, 1], one per seed, each from its own generator."""
    size = model.cfg.data.image_size
    gens = [torch.Generator(job.device).manual_seed(s) for s in seeds]
    noise = torch.stack([torch.randn(model.mode.out_channels, size, size, generator=g, device=job.device)
                         for g in gens])
    return sample(model.net, model.strategy, model.mode, cond, noise, model.sampler, model.steps,
                  job.guidance_of(model), gens, job.autocast, trajectory)


def conditions_for(job: Job, indices: list[int]) -> tuple[torch.Tensor, dict[int, int], dict[int, Counter]]:
    """(B, C, H, W) conditioning in [0, 1] of the main model's condition roles: from the real dataset
    (--masks_from) or, for a mask, from the seg model (generated masks that pass the filter)."""
    if job.real_conditions is not None:
        n = len(job.real_conditions)
        return (torch.stack([job.real_conditions[i % n] for i in indices]).to(job.device), {i: 0 for i in indices},
                {i: Counter() for i in indices})
    masks, attempts, why = generated_masks(job, indices)
    return torch.stack([masks[i] for i in indices]), attempts, why


def generated_masks(job: Job, indices: list[int]) -> tuple[dict[int, torch.Tensor], dict[int, int], dict[int, Counter]]:
    """{index: (1, H, W) mask} from the seg model that pass the filter; a rejected mask is redrawn with the
    next attempt's seed until it passes or max_attempts is reached."""
    accepted, attempts, why = {}, {i: 0 for i in indices}, {i: Counter() for i in indices}
    todo = list(indices)
    while todo:
        seeds = [sample_seed(job.seed, i, MASK_STREAM, attempts[i]) for i in todo]
        masks = job.seg_model.mode.outputs(draw(job, job.seg_model, seeds, {}))[MASK_ROLE]
        retry = []
        for i, m in zip(todo, masks):
            reason = job.mask_filter.reason(m[0].cpu().numpy())
            if reason is None:
                accepted[i] = m
                continue
            job.rejections[reason] += 1
            why[i][reason] += 1
            attempts[i] += 1
            if attempts[i] >= job.max_attempts:
                raise UserError(f"sample {i}: {job.max_attempts} generated masks in a row were rejected "
                                f"({', '.join(f'{k} {v}' for k, v in why[i].items())}); loosen --min_mask_area/"
                                f"--max_mask_area/--min_components/--max_components or raise --max_attempts")
            retry.append(i)
        todo = retry
    return accepted, attempts, why


def generate_batch(job: Job, indices: list[int], trajectory: list | None = None) -> dict[int, dict]:
    """{index: {'arrays': {role: (C, H, W) tensor in [0,1]}, 'row': manifest fields}} for one batch."""
    mode = job.main_mode
    info = {i: {"condition": ""} for i in indices}
    outs, cond = {}, {}
    if mode.needs == "label":
        cond = {"labels": torch.tensor([job.class_plan[i] for i in indices], device=job.device)}
        for i in indices:
            info[i]["class"] = job.class_names()[job.class_plan[i]]
    elif mode.needs is not None or mode.makes_masks:   # conditioning (or the masks themselves) per sample
        conds, attempts, why = conditions_for(job, indices)
        real = job.real_conditions is not None
        for i in indices:
            info[i] = {"mask_attempts": 0 if real else attempts[i] + 1,
                       "mask_rejections": ";".join(f"{k}:{v}" for k, v in sorted(why[i].items())),
                       "condition": (job.real_sources[i % len(job.real_sources)] if real
                                     else f"generated:seg_seed={sample_seed(job.seed, i, MASK_STREAM, attempts[i])}")}
        roles = [MASK_ROLE] if mode.makes_masks else mode.condition_roles
        outs = {r: conds[:, k:k + 1] for k, r in enumerate(roles)}
        cond = {"concat": conds * 2 - 1}
    if not mode.makes_masks:
        x = draw(job, job.main_model, [sample_seed(job.seed, i, IMAGE_STREAM) for i in indices], cond, trajectory)
        outs.update(mode.outputs(x))
    if job.output_size and job.output_size != next(iter(outs.values())).shape[-1]:
        outs = {r: fit_square(v.float(), job.output_size, None, "nearest" if r == MASK_ROLE else "bilinear").clamp(0, 1)
                for r, v in outs.items()}
    return {i: {"arrays": {r: v[k].float().cpu() for r, v in outs.items()}, "row": info[i]}
            for k, i in enumerate(indices)}


# ---------------------------------------------------------------- writing
def nifti_bytes(image: np.ndarray, is_mask: bool) -> bytes:
    """A (H, W) slice as a fresh 2D NIfTI (RAS, 1 mm, empty description and aux file, no extensions), gzip
    with mtime 0 so the same array always gives the same bytes."""
    vol = from_slices(image[None])
    img = nib.Nifti1Image(vol.astype(np.uint8 if is_mask else np.float32), np.eye(4))
    img.header.set_xyzt_units("mm")
    img.header["descrip"] = b""
    img.header["aux_file"] = b""
    return gzip.compress(img.to_bytes(), compresslevel=6, mtime=0)


def png_bytes(image: np.ndarray) -> bytes:
    """(C, H, W) in [0, 1] -> 8-bit grey or RGB PNG."""
    arr = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
    pil = Image.fromarray(arr[0] if arr.shape[0] == 1 else arr[:3].transpose(1, 2, 0))
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return buf.getvalue()


def write_sample(job: Job, index: int, arrays: dict[str, torch.Tensor], row: dict) -> dict:
    out = job.output_dir
    files = job.files(index)
    for rel, role in job.file_roles(index):
        arr = arrays[role].numpy()
        if rel.endswith(".nii.gz"):
            data = nifti_bytes(arr[0], role == MASK_ROLE)
        else:
            data = png_bytes(arr)
        atomic_write(out / rel, lambda tmp, d=data: Path(tmp).write_bytes(d))
    m, s = job.main_model, job.chained_seg
    full = {"index": index, "sample_id": sample_id(index), "seed": job.seed,
            "sample_seed": sample_seed(job.seed, index, MASK_STREAM if job.main_mode.makes_masks else IMAGE_STREAM),
            "strategy": m.strategy.name, "sampler": m.sampler, "steps": m.steps, "guidance": job.guidance_of(m),
            "class": "", "condition": "", "mask_attempts": "", "mask_rejections": "", "checkpoint_sha256": m.sha256,
            "seg_strategy": s.strategy.name if s else "", "seg_sampler": s.sampler if s else "",
            "seg_steps": s.steps if s else "", "seg_checkpoint_sha256": s.sha256 if s else "",
            "files": ";".join(files), **row}
    atomic_write_text(out / ROWS_DIR / f"{sample_id(index)}.json", json.dumps(full))  # the commit mark
    return full


def is_done(job: Job, index: int) -> bool:
    row = job.output_dir / ROWS_DIR / f"{sample_id(index)}.json"
    return row.is_file() and all((job.output_dir / f).is_file() for f in job.files(index))


def read_rows(out: Path) -> list[dict]:
    rows = []
    for path in sorted((Path(out) / ROWS_DIR).glob("sample_*.json")):
        try:
            rows.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError):
            continue  # cannot happen for rows written atomically; a hand-edited file is simply not listed
    return sorted(rows, key=lambda r: r["index"])


def write_manifest(out: Path) -> list[dict]:
    rows = read_rows(out)

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=MANIFEST_FIELDS, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
    atomic_write(Path(out) / "manifest.csv", write)
    return rows


def read_sample(out: Path, row: dict) -> dict[str, np.ndarray]:
    """{role: (C, H, W) float array in [0, 1]} of a committed sample, read back from its files (NIfTI for
    subject samples, the PNG for class samples)."""
    files = row["files"].split(";")
    arrays = {}
    for rel in files:
        path = Path(out) / rel
        if rel.endswith(".nii.gz"):
            arrays[path.name.split(".")[0]] = to_slices(np.asanyarray(nib.load(str(path)).dataobj))[:1].astype(np.float32)
    if not arrays:
        img = np.asarray(Image.open(Path(out) / files[0]), dtype=np.float32) / 255
        arrays["image"] = img[None] if img.ndim == 2 else img.transpose(2, 0, 1)
    return arrays


def write_previews(job: Job, rows: list[dict]) -> list[Path]:
    """preview_4x4.png and preview_8x8.png from the first committed samples (mask outlines on images)."""
    picked = [read_sample(job.output_dir, r) for r in rows[:64]]
    if not picked:
        return []
    show = next((r for r in reversed(job.roles()) if r != MASK_ROLE), MASK_ROLE)
    images = torch.stack([torch.from_numpy(a[show]) for a in picked])
    outline = show != MASK_ROLE and all(MASK_ROLE in a for a in picked)   # masks drawn over the images
    masks = torch.stack([torch.from_numpy(a[MASK_ROLE]) for a in picked]) if outline else None
    return [save_grid(images[:side * side], job.output_dir / f"preview_{side}x{side}.png", nrow=side,
                      masks=None if masks is None else masks[:side * side], scale=max(1, 128 // images.shape[-1]))
            for side in (4, 8)]


def write_progression(job: Job, n_samples: int = 4, n_frames: int = 8) -> Path:
    """A grid of the denoising trajectory: one row per sample, noise on the left, the sample on the right."""
    indices = list(range(min(n_samples, job.num_images)))
    trajectory: list = []
    generate_batch(replace(job, output_size=None, rejections=Counter()), indices, trajectory)
    picks = np.unique(np.linspace(0, len(trajectory) - 1, n_frames).round().astype(int))
    # masks are shown thresholded, as they are written; images as the raw state (first channel)
    as_tile = ((lambda x: job.main_mode.outputs(x)[MASK_ROLE]) if job.main_mode.makes_masks else
               (lambda x: ((x[:, :1] + 1) / 2).clamp(0, 1)))
    frames = [as_tile(trajectory[k]).float().cpu() for k in picks]
    tiles = torch.stack([frame[i] for i in range(len(indices)) for frame in frames])
    return save_grid(tiles, job.output_dir / "progression.png", nrow=len(picks),
                     scale=max(1, 128 // tiles.shape[-1]))


def run_job(job: Job, barrier=None) -> dict:
    """Generate this worker's missing samples, then merge the manifest (after `barrier` when distributed)."""
    out = job.output_dir
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(out, older_than_s=600)  # other shards may be writing now: only files left long ago
    settings_path = out / SETTINGS_FILE
    settings = job.settings()
    if settings_path.is_file():
        old = json.loads(settings_path.read_text())
        diff = [k for k in settings if old.get(k) != settings[k]]
        if diff:
            raise UserError(f"--output_dir {out} holds samples made with different settings ({', '.join(diff)}); "
                            f"use a new --output_dir or the same settings to continue it")
    elif job.worker == 0:
        atomic_write_text(settings_path, json.dumps(settings, indent=2))
    mine = [i for i in range(job.num_images) if i % job.workers == job.worker]
    todo = [i for i in mine if not is_done(job, i)]
    t0 = time.perf_counter()
    with tqdm(total=len(mine), initial=len(mine) - len(todo), desc="generating", unit="img",
              disable=job.worker != 0) as bar:
        for start in range(0, len(todo), job.batch_size):
            chunk = todo[start:start + job.batch_size]
            for i, res in generate_batch(job, chunk).items():
                write_sample(job, i, res["arrays"], res["row"])
            bar.update(len(chunk))
    elapsed = time.perf_counter() - t0
    if barrier is not None:
        barrier()
    summary = {"generated": len(todo), "seconds": elapsed, "images_per_s": len(todo) / elapsed if todo else 0.0,
               "rejections": dict(job.rejections), "skipped": len(mine) - len(todo)}
    if job.worker == 0 or barrier is None:
        rows = write_manifest(out)
        summary["committed"] = len(rows)
        summary["previews"] = [str(p) for p in write_previews(job, rows)]
        if job.progression and job.worker == 0:
            summary["progression"] = str(write_progression(job))
    return summary


def split_work(shard: str | None, rank: int, world: int) -> tuple[int, int]:
    """(worker id, number of workers) from --shard i/n and the torchrun rank: ranks split each shard."""
    k, n = 0, 1
    if shard:
        try:
            k, n = (int(v) for v in shard.split("/"))
        except ValueError:
            raise UserError(f"--shard expects i/n such as 0/4, got {shard!r}") from None
        if not 0 <= k < n:
            raise UserError(f"--shard {shard}: i must be in [0, n)")
    return k * world + rank, n * world


def throughput_line(summary: dict) -> str:
    rate = summary["images_per_s"]
    text = f"generated {summary['generated']} samples in {summary['seconds']:.1f} s ({rate:.2f} images/s)"
    if summary["skipped"]:
        text += f"; {summary['skipped']} already present were kept"
    if summary["rejections"]:
        text += "; masks rejected: " + ", ".join(f"{k} {v}" for k, v in sorted(summary["rejections"].items()))
    return text
