"""Validation of a training run, on every rank (no rank waits alone in a collective): the unweighted loss
on the validation split, samples from the EMA weights, their Dice and IoU when the mode is scored by Dice
(mode.segment.ensemble samples averaged), and a grid of each sample beside the real image or mask."""
from __future__ import annotations

from pathlib import Path

import torch

from medgen.common.data import MASK_ROLE
from medgen.common.grid import save_grid
from medgen.Generation.TrainGen.core.sampling import sample
from medgen.common.overlap import dice_iou, region_dice


@torch.no_grad()
def validation_scores(tr) -> tuple[dict, dict, dict]:
    """({'val/loss': ..., and 'val/dice', 'val/iou' for Dice-scored modes}, generated outputs, real batch)."""
    cfg, rt = tr.cfg, tr.rt
    data = tr.val_data if tr.val_data is not None and len(tr.val_data) > 0 else tr.train_data
    model = tr.sample_model()
    model.eval()
    gen = torch.Generator(rt.device).manual_seed(cfg.runtime.seed + 4242)
    bs = max(1, min(cfg.optim.batch_size, len(data) // rt.world))
    order = data.batch_indices(bs, 0, cfg.runtime.seed, rt.rank, rt.world)[:32]
    total = torch.zeros((), device=rt.device, dtype=torch.float64)
    for idx in order:
        _, per, _ = tr.loss(tr.to_device(data.batch(idx)), generator=gen, model=model, train=False)
        total += per.double().mean()
    scalars = {"val/loss": float(rt.mean(total / max(1, len(order))))}
    n = min(cfg.runtime.num_val_samples, len(data))
    pick = torch.randperm(len(data), generator=torch.Generator().manual_seed(cfg.runtime.seed))[:n]
    batch = tr.to_device(data.batch(pick))
    x0, cond = tr.mode.split(batch)
    metric, _ = tr.mode.validation
    outs = []
    for _ in range(max(1, cfg.mode.segment.ensemble if metric == "dice" else 1)):
        noise = torch.randn(x0.shape, generator=gen, device=rt.device)
        outs.append(sample(model, tr.strategy, tr.mode, cond, noise, cfg.strategy.sampler, cfg.strategy.sample_steps,
                           cfg.mode.labels.guidance_scale, gen, rt.autocast))
    outputs = tr.mode.outputs(torch.stack(outs).mean(0))
    if metric == "dice":
        lesion = lambda m: (m > 0).float()  # noqa: E731 - the whole lesion, whatever its labels
        scalars["val/dice"], scalars["val/iou"] = dice_iou(lesion(outputs[MASK_ROLE]), lesion(batch["masks"]))
        if not tr.mode.vocab.binary:        # label maps: Dice per region, and their mean is the score
            per_region = region_dice(outputs[MASK_ROLE], batch["masks"], tr.mode.vocab)
            scalars.update({f"val/dice_{name}": v for name, v in per_region.items()})
            scalars["val/dice"] = sum(per_region.values()) / len(per_region)
    tr.net.train()
    return scalars, outputs, batch


def write_sample_grid(mode, outputs: dict, batch: dict, path: Path) -> Path:
    """Rows of samples: each generated output next to the real image or mask it should resemble."""
    pixel_mode = getattr(mode, "mode", mode)   # a latent run's real images are shown as they are, not re-coded
    real = pixel_mode.outputs(pixel_mode.split(batch)[0])
    # masks are outlined on images that were made from them (conditioning) or that they were made from
    outline = batch.get("masks") if MASK_ROLE in mode.condition_roles or mode.needs == "image" else None
    tiles, marks = [], []
    for i in range(len(next(iter(outputs.values())))):
        for role in outputs:
            for src in (outputs, real):
                tiles.append(src[role][i])
                marks.append(outline[i] if outline is not None and role != MASK_ROLE else torch.zeros_like(src[role][i][:1]))
    return save_grid(torch.stack(tiles), path, nrow=min(16, 2 * len(outputs) * 4), masks=torch.stack(marks), scale=2)
