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

import hashlib
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from medgen.common.data import MASK_ROLE, fit_square
from medgen.common.errors import UserError
from medgen.common.labels import nesting_violations
from medgen.common.locks import locked
from medgen.common.splits import anonymous_key, key_id
from medgen.Generation.TrainGen.core.generation.conditions import FIX, MaskFilter
from medgen.Generation.TrainGen.core.generation.copies import CopyCheck
from medgen.Generation.TrainGen.core.generation.models import Model
from medgen.Generation.TrainGen.core.generation import writers
from medgen.Generation.TrainGen.core.generation.writers import (IMAGE_STREAM, MASK_STREAM, SETTINGS_FILE,
                                                                open_output_dir, sample_id, sample_seed,
                                                                write_manifest)
from medgen.common.grid import save_grid
from medgen.Generation.TrainGen.core.sampling import sample


COPY = "copy of a training image"   # the --reject_copies entry of Job.rejections
UNCONDITIONAL = "unconditional"     # the folder of --class_counts none=N samples (the null label, no guidance)
FAIL_FAST = 20                      # masks drawn with none accepted before a chained job stops and says why


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
    class_list: list[str] | None = None              # the classes of the plan (--balance: the data's), when set
    class_models: dict[str, Model] = field(default_factory=dict)  # class name -> its own model (--class_model)
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
    masks_drawn: int = 0                             # generated masks so far, and how many passed the filter
    masks_accepted: int = 0
    copy_check: CopyCheck | None = None              # --reject_copies
    anonymize_sources: bool = False                  # condition column: hashed subject names, not paths
    extra_roles: list[str] = field(default_factory=list)   # files beside the mode's roles (--inpaint_into: seg,
    inpaint: dict | None = None                      # region) and the insertion's settings
    source_units: list[str] | None = None            # --inpaint_into: the edited scans' units, hashed (a study
                                                     # must not test on scans whose edits it trains on)
    contents: dict = field(default_factory=dict)     # {flag: content_digest} of the data read from input
                                                     # folders: a resume after they changed is refused

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
        return self.guidance if self.guidance is not None else model.cfg.mode.labels.guidance_scale

    def settings(self) -> dict:
        """Everything that decides a sample's content: a re-run into the same folder must match it."""
        m, s = self.main_model, self.seg_model
        return {"mode": self.mode, "seed": self.seed, "sha256": m.sha256, "sampler": m.sampler, "steps": m.steps,
                "guidance": self.guidance, "seg_sha256": self.chained_seg.sha256 if self.chained_seg else None,
                "seg_sampler": s.sampler if s else None, "seg_steps": s.steps if s else None,
                "masks_from": self.masks_from, "class_counts": self.class_counts,
                "mask_filter": ({k: v for k, v in self.mask_filter.__dict__.items() if k != "enabled" or not v}
                                if s else None), "max_attempts": self.max_attempts,
                "output_size": self.output_size, "png": self.png,
                **({"reject_copies": self.copy_check.threshold} if self.copy_check else {}),
                **({"anonymize_sources": True} if self.anonymize_sources else {}),
                **({"class_models": {n: m.sha256 for n, m in sorted(self.class_models.items())}}
                   if self.class_models else {}), **({"inpaint": self.inpaint} if self.inpaint else {}),
                **({"contents": self.contents} if self.contents else {})}

    def provenance(self) -> dict:
        """What generation.json records beside the settings: the hashed training units of each model, so that an
        evaluation can refuse test data a generator saw (common/splits.py)."""
        models = {"image": self.image_model, "seg": self.seg_model}
        record = {"training_data": {k: m.meta["data_units"] for k, m in models.items()
                                    if m is not None and m.meta.get("data_units")}}
        if self.main_mode.needs != "label":          # what the masks' values mean (common/labels.py)
            record["labels"] = self.main_mode.vocab.record()
        if self.source_units:
            record["training_data"]["scans"] = {"key_id": key_id(), "train": self.source_units}
        if self.anonymize_sources:                   # the key the manifest's 'hmac:' names were made with
            record["anonymous_key_id"] = key_id()
        return record

    def inputs(self) -> dict:
        """{flag: path} of everything this job reads, which its output folder must keep apart from."""
        return {"--image_model": self.image_model and str(self.image_model.path),
                "--seg_model": self.seg_model and str(self.seg_model.path), "--masks_from": self.masks_from,
                "--inpaint_into": (self.inpaint or {}).get("inpaint_into"),
                "--class_model": [str(m.path) for m in self.class_models.values()]}

    def use_real_conditions(self, directory, conditions: torch.Tensor, sources: list[str]) -> None:
        """--masks_from DIR (or masks=DIR): the real conditions read from it, its resolved path and a digest of
        what was read (a resume after its files changed is refused)."""
        self.real_conditions, self.real_sources = conditions, sources
        self.masks_from = str(Path(directory).resolve())
        self.contents["--masks_from"] = content_digest(sources, conditions)

    def roles(self) -> list[str]:
        return list(dict.fromkeys(self.extra_roles + self.main_mode.written_roles()))

    def class_names(self) -> list[str]:
        return self.class_list or model_classes(self.image_model)

    def plan_name(self, index: int) -> str:
        """The class sample `index` is drawn as: a class name, or UNCONDITIONAL (--class_counts none=N)."""
        names = self.class_names()
        k = self.class_plan[index]
        return names[k] if k < len(names) else UNCONDITIONAL

    def model_for(self, class_name: str) -> tuple[Model, int]:
        """The model that draws a class (its own --class_model, else the image model) and the class's label
        id in that model (the null label, num_classes, for unconditional samples)."""
        if class_name == UNCONDITIONAL:
            return self.image_model, len(model_classes(self.image_model))
        model = self.class_models.get(class_name, self.image_model)
        return model, model_classes(model).index(class_name)

    def file_roles(self, index: int) -> list[tuple[str, str]]:
        """[(relative file, the role it holds)] of sample `index`, as the mode declares its output layout."""
        sid = sample_id(index)
        if self.main_mode.writes == "class_folders":
            return [(f"{self.plan_name(index)}/{sid}.png", self.main_mode.generated_roles[0])]
        out = [(f"{sid}/{r}.nii.gz", r) for r in self.roles()]
        return out + ([(f"{sid}/{r}.png", r) for r in self.roles()] if self.png else [])

    def files(self, index: int) -> list[str]:
        return [rel for rel, _ in self.file_roles(index)]


def content_digest(keys: list[str], *tensors) -> str:
    """SHA-256 of what a job read from an input folder (the slice keys and the tensors built from them): the same
    folder path with other files gives another digest."""
    h = hashlib.sha256("\n".join(keys).encode())
    for t in tensors:
        if t is not None:
            h.update(str(tuple(t.shape)).encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def source_name(slice_key: str, anonymize: bool) -> str:
    """A real slice's key as the manifest records it: its path, or with --anonymize_sources its anonymous key."""
    return anonymous_key(slice_key) if anonymize else slice_key


def model_classes(model: Model) -> list[str]:
    return model.meta.get("class_names") or [str(i) for i in range(model.meta["num_classes"])]


# ---------------------------------------------------------------- sampling
def draw(job: Job, model: Model, seeds: list[int], cond: dict, trajectory: list | None = None, known=None,
         jumps: int = 1, replace_every: bool = True) -> torch.Tensor:
    """Samples in [-1, 1], one per seed, each from its own generator (known, jumps, replace_every: inpainting,
    core/sampling.py)."""
    gens = [torch.Generator(job.device).manual_seed(s) for s in seeds]
    noise = torch.stack([torch.randn(model.mode.out_channels, *model.shape, generator=g, device=job.device)
                         for g in gens])
    return sample(model.net, model.strategy, model.mode, cond, noise, model.sampler, model.steps,
                  job.guidance_of(model), gens, job.autocast, trajectory, known, jumps, replace_every)


def draw_checked(job: Job, model: Model, indices: list[int], cond: dict, trajectory: list | None = None
                 ) -> tuple[torch.Tensor, dict[int, dict]]:
    """draw(), then with --reject_copies every sample closer to a training image than the threshold is drawn
    again from its next seed (attempt 1, 2, ...), at most max_attempts times; (samples, manifest fields)."""
    x = draw(job, model, [sample_seed(job.seed, i, IMAGE_STREAM) for i in indices], cond, trajectory)
    if job.copy_check is None:
        return x, {i: {} for i in indices}
    images = lambda t: torch.cat(list(model.mode.outputs(t).values()), 1)  # noqa: E731 - roles in [0, 1]
    dist = job.copy_check.distances(images(x))
    attempts = {i: 0 for i in indices}
    for _ in range(job.max_attempts):
        bad = [k for k in range(len(indices)) if dist[k] < job.copy_check.threshold]
        if not bad:
            break
        for k in bad:
            attempts[indices[k]] += 1
        job.rejections[COPY] += len(bad)
        again = draw(job, model, [sample_seed(job.seed, indices[k], IMAGE_STREAM, attempts[indices[k]]) for k in bad],
                     {key: v[bad] for key, v in cond.items()})
        x[bad] = again
        dist[bad] = job.copy_check.distances(images(again))
    return x, {i: {"copy_rejections": attempts[i], "copy_distance": round(float(dist[k]), 5),
                   "sample_seed": sample_seed(job.seed, i, IMAGE_STREAM, attempts[i])} for k, i in enumerate(indices)}


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
        job.masks_drawn += len(todo)
        for i, m in zip(todo, masks):
            reason = job.mask_filter.reason(m[0].cpu().numpy(), job.seg_model.mode.vocab)
            if reason is None:
                accepted[i] = m
                job.masks_accepted += 1
                continue
            job.rejections[reason] += 1
            why[i][reason] += 1
            attempts[i] += 1
            if attempts[i] >= job.max_attempts:
                raise UserError(f"sample {i}: {job.max_attempts} generated masks in a row were rejected "
                                f"({', '.join(f'{k} {v}' for k, v in why[i].items())}); loosen --min_mask_area/"
                                f"--max_mask_area/--min_components/--max_components or raise --max_attempts")
            retry.append(i)
        if job.masks_accepted == 0 and job.masks_drawn >= FAIL_FAST:
            counts = {k: v for k, v in job.rejections.items() if k != COPY}
            raise UserError(f"the first {job.masks_drawn} masks from the seg model were all rejected ("
                            + ", ".join(f"{k}: {v}" for k, v in counts.items()) + "); "
                            + "; ".join(f"{k}: {FIX[k.split(' of ')[0]]}" for k in counts
                                        if k.split(" of ")[0] in FIX)
                            + " (or --no_mask_filter for a smoke test)")
        todo = retry
    return accepted, attempts, why


def generate_batch(job: Job, indices: list[int], trajectory: list | None = None) -> dict[int, dict]:
    """{index: {'arrays': {role: (C, H, W) tensor in [0,1]}, 'row': manifest fields}} for one batch."""
    mode = job.main_mode
    info = {i: {"condition": ""} for i in indices}
    outs, cond = {}, {}
    if mode.needs == "label":   # grouped by the model that draws each class; a sample depends on its seed only
        groups = {}
        for k, i in enumerate(indices):
            model, label = job.model_for(job.plan_name(i))
            groups.setdefault(id(model), (model, []))[1].append((k, i, label))
            info[i]["class"] = job.plan_name(i)
            if model is not job.main_model:
                info[i].update(checkpoint_sha256=model.sha256, strategy=model.strategy.name, sampler=model.sampler,
                               steps=model.steps, guidance=job.guidance_of(model))
        x = [None] * len(indices)
        for model, members in groups.values():
            cond = {"labels": torch.tensor([lab for _, _, lab in members], device=job.device)}
            drawn, fields = draw_checked(job, model, [i for _, i, _ in members], cond,
                                         trajectory if len(groups) == 1 else None)
            for (k, i, _), sample_x in zip(members, drawn):
                x[k] = sample_x
                info[i].update(fields[i])
        outs.update(mode.outputs(torch.stack(x)))
    elif mode.needs is not None or mode.makes_masks:   # conditioning (or the masks themselves) per sample
        conds, attempts, why = conditions_for(job, indices)
        real = job.real_conditions is not None
        for i in indices:
            info[i] = {"mask_attempts": 0 if real else attempts[i] + 1,
                       "mask_rejections": ";".join(f"{k}:{v}" for k, v in sorted(why[i].items())),
                       "condition": (source_name(job.real_sources[i % len(job.real_sources)], job.anonymize_sources)
                                     if real
                                     else f"generated:seg_seed={sample_seed(job.seed, i, MASK_STREAM, attempts[i])}")}
        roles = [MASK_ROLE] if mode.makes_masks else mode.condition_roles
        outs = {r: conds[:, k:k + 1] for k, r in enumerate(roles)}
        cond = {} if mode.makes_masks else mode.condition(conds)
    if not mode.makes_masks and mode.needs != "label":
        x, fields = draw_checked(job, job.main_model, indices, cond, trajectory)
        for i in indices:
            info[i].update(fields[i])
        outs.update(mode.outputs(x))
    if job.output_size and job.output_size != next(iter(outs.values())).shape[-1]:
        outs = {r: fit_square(v.float(), job.output_size, None, "nearest") if r == MASK_ROLE else
                fit_square(v.float(), job.output_size, None, "bilinear").clamp(0, 1) for r, v in outs.items()}
    vocab = (job.seg_model or job.main_model).mode.vocab
    if MASK_ROLE in outs and not vocab.binary:        # label maps: what each holds, and how they nest
        for k, i in enumerate(indices):
            info[i].update(label_fields(outs[MASK_ROLE][k, 0].cpu().numpy(), vocab))
    return {i: {"arrays": {r: v[k].float().cpu() for r, v in outs.items()}, "row": info[i]}
            for k, i in enumerate(indices)}


def label_fields(labels: np.ndarray, vocab) -> dict:
    """Manifest fields of a label map: voxels per label, and the nesting check's violations per pair."""
    counts = {n: int((labels == i).sum()) for i, n in zip(vocab.ids, vocab.names)}
    nesting = nesting_violations(labels, vocab)
    return {"label_voxels": ";".join(f"{n}:{c}" for n, c in counts.items()),
            "nesting_violations": ";".join(f"{k}:{v}" for k, v in nesting.items())}


def write_sample(job: Job, index: int, arrays: dict[str, torch.Tensor], row: dict) -> dict:
    """Write sample `index` and commit its manifest row (the model fields, then the sample's own)."""
    m, s = job.main_model, job.chained_seg
    full = {"index": index, "sample_id": sample_id(index), "seed": job.seed,
            "sample_seed": sample_seed(job.seed, index, MASK_STREAM if job.main_mode.makes_masks else IMAGE_STREAM),
            "strategy": m.strategy.name, "sampler": m.sampler, "steps": m.steps, "guidance": job.guidance_of(m),
            "class": "", "condition": "", "mask_attempts": "", "mask_rejections": "", "copy_rejections": "",
            "copy_distance": "", "label_voxels": "", "nesting_violations": "", "lesion": "", "placement_shift": "",
            "checkpoint_sha256": m.sha256,
            "seg_strategy": s.strategy.name if s else "", "seg_sampler": s.sampler if s else "",
            "seg_steps": s.steps if s else "", "seg_checkpoint_sha256": s.sha256 if s else "",
            "files": ";".join(job.files(index)), **row}
    vocab = (s or m).mode.vocab if MASK_ROLE in arrays else m.mode.vocab
    return writers.write_sample(job.output_dir, index, job.file_roles(index), arrays, full, m.meta.get("spacing"),
                                not vocab.binary)


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


WRITER_THREADS = 1       # encoding (gzip, PNG) and fsync release the GIL; one thread keeps up (a few ms a sample)
                         # and, on a CPU-only machine, competes least with the sampling threads
WRITE_BACKLOG = 2        # batches written behind the one being sampled, at most (bounds the memory held)


class SampleWriter:
    """Writes samples on a thread pool while the next batch is sampled: gzip/PNG encoding and each file's
    atomic write (temp file, fsync, rename; the row last) leave the main loop. Each sample is still committed
    only when all its files are on disk, so a kill at any point leaves whole samples; the first write error
    is raised in the main thread at the next batch (or when the writer closes)."""

    def __init__(self, job: Job):
        from concurrent.futures import ThreadPoolExecutor
        self.job, self.pool, self.pending = job, ThreadPoolExecutor(WRITER_THREADS, "writer"), []

    def put(self, results: dict[int, dict]) -> None:
        self.pending.append([self.pool.submit(write_sample, self.job, i, r["arrays"], r["row"])
                             for i, r in results.items()])
        while len(self.pending) > WRITE_BACKLOG:
            for f in self.pending.pop(0):
                f.result()

    def __enter__(self) -> "SampleWriter":
        return self

    def __exit__(self, exc_type, *rest) -> None:
        if exc_type is not None:        # the loop failed: finish what is being written, drop the queue
            self.pool.shutdown(wait=True, cancel_futures=True)
            return
        try:
            for batch in self.pending:
                for f in batch:
                    f.result()
        finally:
            self.pool.shutdown(wait=True)


def run_job(job: Job, barrier=None, make=None) -> dict:
    """Generate this worker's missing samples, then merge the manifest (after `barrier` when distributed).
    make(indices) -> {index: {'arrays', 'row'}} draws a batch (default generate_batch; the Python API passes the
    samples it drew already)."""
    out = job.output_dir
    created = open_output_dir(out, SETTINGS_FILE, job.settings(), record=job.provenance(), inputs=job.inputs())
    try:
        with locked(out, f"--output_dir (worker {job.worker} of {job.workers})", f".lock-{job.worker}"):
            return _run_locked(job, barrier, make or (lambda chunk: generate_batch(job, chunk)))
    except BaseException:
        if created:
            writers.forget_settings(out, SETTINGS_FILE)
        raise


def _run_locked(job: Job, barrier, make) -> dict:
    out = job.output_dir
    mine = [i for i in range(job.num_images) if i % job.workers == job.worker]
    todo = [i for i in mine if not writers.is_done(out, i, job.files(i))]
    t0 = time.perf_counter()
    with tqdm(total=len(mine), initial=len(mine) - len(todo), desc="generating", unit="img",
              disable=job.worker != 0) as bar, SampleWriter(job) as writer:
        for start in range(0, len(todo), job.batch_size):
            chunk = todo[start:start + job.batch_size]
            writer.put(make(chunk))
            bar.update(len(chunk))
    elapsed = time.perf_counter() - t0
    if barrier is not None:
        barrier()
    summary = {"generated": len(todo), "seconds": elapsed, "images_per_s": len(todo) / elapsed if todo else 0.0,
               "rejections": dict(job.rejections), "skipped": len(mine) - len(todo)}
    if job.worker == 0 or barrier is None:
        rows = write_manifest(out)
        summary["committed"] = len(rows)
        summary["previews"] = [str(p) for p in writers.write_previews(out, rows, job.roles())]
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
    masks = {k: v for k, v in summary["rejections"].items() if k != COPY}
    if masks:
        text += "; masks rejected: " + ", ".join(f"{k} {v}" for k, v in sorted(masks.items()))
    if summary["rejections"].get(COPY):
        text += f"; copies of training images redrawn: {summary['rejections'][COPY]}"
    return text
