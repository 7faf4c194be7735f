"""medgen export RUN OUT: a trained model as files anyone can read and check (core/exported.py says what each
holds): the EMA weights as safetensors, config.json with the architecture, strategy, mode and the data contract,
the schedule as a diffusers scheduler config, and MODEL_CARD.md. A model.backend diffusers run is also written
as a diffusers folder (unet/ + scheduler/, with model_index.json when it needs no conditioning), which diffusers'
UNet2DModel.from_pretrained and its DDPM/DDIM pipelines load as they are.

    medgen export runs/bravo exports/bravo --license "CC-BY-NC-4.0" --evaluation runs/bravo_eval --utility runs/util

The folder is written whole or not at all (a temp folder renamed at the end), and an existing folder is never
overwritten. Every export loads back with medgen.load, generate.py --image_model and train.py --init_from.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from medgen.common.args import Text, validated
from medgen.common.cli import HelpFormatter, add_flag
from medgen.common.outputs import check_apart, check_path
from medgen.common.errors import UserError
from medgen.Generation.TrainGen.core.config import stored_config, to_dict
# torch and the model code are imported by the functions that use them: `medgen export --help` runs without torch


def scheduler_config(strategy) -> dict:
    """The strategy's schedule as diffusers writes it. DDPM: DDPMScheduler with our betas as trained_betas (exact
    for either schedule: MONAI's cosine clips its betas differently from diffusers' squaredcos_cap_v2) and the
    'linspace' spacing our DDIM grid uses. Rectified flow: FlowMatchEulerDiscreteScheduler with the run's shift
    (diffusers' flow models output noise - x0, the negative of our velocity)."""
    import diffusers
    import torch
    if strategy.name == "ddpm":
        abar = strategy.alphas_cumprod
        betas = 1 - abar / torch.cat([torch.ones(1, dtype=abar.dtype), abar[:-1]])
        return {"_class_name": "DDPMScheduler", "_diffusers_version": diffusers.__version__,
                "num_train_timesteps": strategy.num_timesteps, "beta_schedule": "linear",
                "trained_betas": betas.float().tolist(),
                "prediction_type": "epsilon" if strategy.prediction == "epsilon" else "v_prediction",
                "clip_sample": bool(strategy.clip_sample), "clip_sample_range": 1.0, "variance_type": "fixed_small",
                "timestep_spacing": "linspace", "steps_offset": 0}
    if strategy.name == "rflow":
        return {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": diffusers.__version__,
                "num_train_timesteps": strategy.num_timesteps, "shift": float(strategy.shift),
                "use_dynamic_shifting": False}
    return {"_class_name": None}


SCHEDULER_NOTES = {
    "ddpm": "DDPMScheduler with this run's betas; our DDIM and DPM-Solver++ grids are diffusers' 'linspace' spacing",
    "rflow": "the network predicts the velocity x0 - noise: diffusers' flow schedulers step with its negative; our "
             "n-step grid is set_timesteps(sigmas=linspace(1, 0, n + 1)[:-1]) (the scheduler applies the shift)"}


def read_figures(evaluation: str | None, utility: str | None) -> dict:
    """The evaluation's metric records (metrics.json) and the utility study's verdict (utility.json)."""
    out = {}
    for name, folder, file in (("evaluation", evaluation, "metrics.json"), ("utility", utility, "utility.json")):
        if folder is None:
            continue
        path = Path(folder) / file if Path(folder).is_dir() else Path(folder)
        try:
            out[name] = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise UserError(f"--{name} {folder}: no readable {file} ({type(err).__name__})") from None
    return out


def _write_weights(state: dict, path: Path, kind: str) -> None:
    from safetensors.torch import save_file
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(path), metadata={"format": kind})


@validated(run=Text(path=True), out=Text(path=True), license=Text(optional=True),
           evaluation=Text(optional=True, path=True), utility=Text(optional=True, path=True))
def export(run: str | Path, out: str | Path, license: str | None = None, evaluation: str | None = None,
           utility: str | None = None) -> Path:
    """Write the export of `run` (a run folder, checkpoint file or another export) to the new folder `out`."""
    import torch

    from medgen.common.features import sha256_of
    from medgen.Generation.TrainGen.core.checkpoint import model_weights
    from medgen.Generation.TrainGen.core.exported import (AUTOENCODER_DIR, CONFIG_FILE, FORMAT, FORMAT_VERSION,
                                                          WEIGHTS_FILE, data_contract, read_model, record_digest)
    from medgen.Generation.TrainGen.core.parts import build_network, build_parts
    out = Path(out)
    check_apart(out, "OUT", {"RUN": run})
    check_path(out, "OUT")                       # a file, or a path under a file: one line
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"OUT {out}: exists and is not empty (an export is never written over another folder)")
    source, state = read_model(run, "RUN")
    if not isinstance(state, dict) or not {"config", "meta", "model"} <= set(state):
        raise UserError(f"RUN {source}: not a training checkpoint of this framework")
    cfg, meta = stored_config(state["config"]), dict(state["meta"])
    if meta.get("control"):               # the export carries the frozen weights: it checks no frozen run
        meta["control"] = {**meta["control"], "embedded": True}
    figures = read_figures(evaluation, utility)
    weights = model_weights(state)
    if not all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point()):
        raise UserError(f"RUN {source}: the weights hold NaN/inf values (a diverged run)")
    strategy, mode = build_parts(cfg, meta["num_classes"], meta["image_channels"],
                                 latent_scale=meta.get("latent_scale"))
    net = build_network(cfg, mode)
    try:
        net.load_state_dict(weights)
    except RuntimeError as err:
        raise UserError(f"RUN {source}: the weights do not fit the run's network "
                        f"({str(err).splitlines()[0]})") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        _write_weights(weights, tmp / WEIGHTS_FILE, FORMAT)
        sched = scheduler_config(strategy)
        info = {"format": FORMAT, "format_version": FORMAT_VERSION, "exported": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "source": {"file": source.name, "sha256": sha256_of(source)}, "license": license,
                "strategy": strategy.name, "prediction": strategy.prediction, "mode": meta["mode"],
                "scheduler_note": SCHEDULER_NOTES.get(strategy.name, "no diffusers scheduler represents it"),
                "architecture": architecture(cfg, mode, net), "data_contract": data_contract(cfg, mode, meta),
                "config": to_dict(cfg), "meta": meta}
        if hasattr(mode, "ae"):      # a latent run: its autoencoder travels with it
            export_autoencoder(mode.ae, tmp / AUTOENCODER_DIR)
            info["config"]["latent"]["autoencoder"] = AUTOENCODER_DIR
        info = json.loads(json.dumps(info, default=str))       # as config.json will hold it, then its digest
        info["config_sha256"] = record_digest(info)
        (tmp / CONFIG_FILE).write_text(json.dumps(info, indent=2))
        (tmp / "scheduler_config.json").write_text(json.dumps(sched, indent=2))
        if cfg.model.backend == "diffusers":
            write_diffusers(net, sched, mode, cfg.data.image_size, tmp)
        (tmp / "MODEL_CARD.md").write_text(model_card(info, figures, sha256_of(tmp / WEIGHTS_FILE)))
        if out.is_dir():
            out.rmdir()                     # empty (checked above)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def architecture(cfg, mode, net) -> dict:
    return {"backend": cfg.model.backend, "class": type(getattr(net, "unet", net)).__name__,
            "preset": cfg.model.preset, "spatial_dims": cfg.data.spatial_dims, "in_channels": mode.in_channels,
            "out_channels": mode.out_channels, "class_embeddings": mode.class_embeds,
            "parameters": sum(p.numel() for p in net.parameters())}


def export_autoencoder(ae, folder: Path) -> None:
    from medgen.Generation.TrainGen.core.exported import AUTOENCODER_FORMAT, CONFIG_FILE, WEIGHTS_FILE
    folder.mkdir()
    _write_weights(ae.net.state_dict(), folder / WEIGHTS_FILE, AUTOENCODER_FORMAT)
    (folder / CONFIG_FILE).write_text(json.dumps({"format": AUTOENCODER_FORMAT, "config": to_dict(ae.cfg),
                                                  "meta": ae.meta, "sha256": ae.sha256}, indent=2))


def write_diffusers(net, sched: dict, mode, size: int, folder: Path) -> None:
    """unet/ and scheduler/ (and model_index.json for an unconditional DDPM model: a DDPMPipeline folder)."""
    net.unet.register_to_config(sample_size=size)      # the pipelines draw noise of this size
    net.unet.save_pretrained(str(folder / "unet"), safe_serialization=True)
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2))
    if mode.needs is None and sched["_class_name"] == "DDPMScheduler":
        import diffusers
        (folder / "model_index.json").write_text(json.dumps({
            "_class_name": "DDPMPipeline", "_diffusers_version": diffusers.__version__,
            "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DModel"]}, indent=2))


def _metric_lines(records: list[dict]) -> list[str]:
    lines = ["| metric | value | 95% CI | N |", "|---|---|---|---|"]
    for r in records:
        if r.get("available", True) and isinstance(r.get("value"), (int, float)):
            ci = r.get("ci95")
            lines.append(f"| {r.get('metric')} | {r['value']:.4g} | "
                         f"{f'{ci[0]:.4g} to {ci[1]:.4g}' if ci else 'n/a'} | {r.get('n', '')} |")
        else:
            lines.append(f"| {r.get('metric')} | not available: {r.get('reason', '')} | | |")
    return lines


def mask_text(masks: dict | None) -> str:
    if not masks:
        return "none"
    vocab = masks["vocabulary"]
    if vocab["name"] == "binary":
        source = masks["binary_from"]
        source = source if isinstance(source, str) else "labels " + ", ".join(map(str, source))
        return f"binary (files hold {', '.join(map(str, masks['file_values']))}; the mask is {source})"
    labels = ", ".join(f"{i} {n}" for i, n in zip(vocab["ids"], vocab["names"]))
    regions = ", ".join(f"{r} = {'+'.join(map(str, ids))}" for r, ids in vocab["regions"].items())
    return f"label maps, vocabulary {vocab['name']}: {labels}; regions {regions}"


def model_card(info: dict, figures: dict, weights_sha256: str) -> str:
    from medgen.Generation.TrainGen.core.exported import WEIGHTS_FILE
    meta, contract, cfg = info["meta"], info["data_contract"], info["config"]
    units = meta.get("data_units") or {}
    counts = ", ".join(f"{len(units.get(s, []))} {s}" for s in ("train", "val")) if units else "not recorded"
    unit = "subjects" if cfg["data"]["format"] != "images" and meta["mode"] != "class" else "images"
    licence = info["license"] or "not set (the owner of the training data and weights decides; pass --license)"
    sampler, steps = cfg["strategy"]["sampler"], cfg["strategy"]["sample_steps"]
    lines = [f"# {meta['mode']} x {info['strategy']} diffusion model", "",
             f"Exported by medgen on {info['exported']} from `{info['source']['file']}`. Licence: "
             f"{licence}.", "",
             "## What it generates", "",
             f"- mode `{meta['mode']}`: generates {', '.join(contract['generated'])}"
             + (f", conditioned on {', '.join(contract['conditioning'])}" if contract["conditioning"] else "")
             + (f", classes {', '.join(contract['classes'])}" if contract.get("classes") else ""),
             f"- grid: {contract['grid']}, {contract['spatial_dims']}D; values {contract['values']}",
             f"- strategy `{info['strategy']}` predicting `{info['prediction']}`; default sampler "
             f"{sampler or 'the strategy default'}, {steps or 'default'} steps",
             f"- network: {info['architecture']['class']} "
             f"({info['architecture']['parameters'] / 1e6:.2f}M parameters)", "",
             "## Training data", "",
             f"- {counts} {unit} (names are not recorded: the run keeps keyed digests of them, HMAC-SHA-256 with "
             "the training site's key, config.json `meta.data_units`, so an evaluation where that key is can refuse "
             "test data the model saw)",
             f"- preprocessing: {contract['normalisation']}",
             "- masks: " + mask_text(contract["mask_labels"]), "",
             "## Intended use and limits", "",
             "- Research: synthetic images to augment training sets of downstream models, and studies of generative "
             "models. Not for diagnosis, and not a substitute for real patients' images in clinical validation.",
             "- It reproduces the scanners, protocols and population of its training data; outside them (other "
             "field strengths, contrasts, anatomies, ages) its images are not evidence of anything.",
             "- Check faithfulness, memorization and downstream utility on your own held-out data before use "
             "(`medgen evaluate`, `medgen utility`).", ""]
    if "evaluation" in figures:
        ev = figures["evaluation"]
        lines += ["## Evaluation", "", f"Synthetic {ev.get('synthetic', {}).get('n', '?')} against real "
                  f"{ev.get('real', {}).get('n', '?')} images:", ""] + _metric_lines(ev.get("metrics", [])) + [""]
    if "utility" in figures:
        from medgen.eval.obj_eval.utility.report import verdict
        lines += ["## Downstream utility", "", verdict(figures["utility"]), ""]
    lines += ["## Provenance", "",
              f"- source checkpoint SHA-256: `{info['source']['sha256']}`",
              f"- {WEIGHTS_FILE} SHA-256: `{weights_sha256}`"]
    if meta.get("autoencoder_sha256"):
        lines.append(f"- autoencoder checkpoint SHA-256: `{meta['autoencoder_sha256']}`")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="medgen export", description=__doc__, formatter_class=HelpFormatter,
                                allow_abbrev=False)
    p.add_argument("run", metavar="RUN", help="a run folder (its best.pt), a checkpoint file or an exported folder")
    p.add_argument("out", metavar="OUT", help="the new folder to write")
    add_flag(p, "license", default=None, help="the licence of the weights, written into the model card")
    add_flag(p, "evaluation", default=None, metavar="DIR", help="a run_evaluation.py output folder (metrics.json)")
    add_flag(p, "utility", default=None, metavar="DIR", help="a run_utility.py output folder (utility.json)")
    args = p.parse_args(argv)
    out = export(args.run, args.out, args.license, args.evaluation, args.utility)
    print(f"exported {args.run} to {out}: {', '.join(sorted(f.name for f in out.iterdir()))}")
    return 0
